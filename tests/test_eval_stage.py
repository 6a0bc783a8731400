"""The `eval` stage end to end on tiny shards: every source, exact --n, the feature cache, recon, reports.

A randomly initialised Inception of torch-fidelity's architecture, saved to a temporary weights file and
passed as `feature_weights`, runs the full FID/KID/PRDC path. For speed these tests feed it 75 px inputs and
use its 64-d layer (torch-fidelity's `feature_layer_fid` option): the 2048-d default makes FID an eigenvalue
problem of a 2048×2048 matrix, tens of seconds on a busy CPU; the 2048-d path is covered in test_eval_features.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vqtool.artifacts import file_sha256, load_artifact
from vqtool.errors import VqtoolError
from vqtool.eval import features
from vqtool.eval.metrics import fid
from vqtool.eval.stage import EvalSettings, evaluate
from vqtool.grids import to_uint8


@pytest.fixture(autouse=True)
def small_inputs(monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # torch-fidelity reads Inception weights only in PyTorch's own format, so this file is a torch.save.
    # One file per test session, shared by the eval test modules (it is ~100 MB).
    path = tmp_path_factory.getbasetemp() / "eval-inception-random.pth"
    return path if path.exists() else features.write_random_weights(path, seed=0)


@pytest.fixture(scope="module")
def extractor(weights):
    return features.load_extractor("inception", weights, "cpu", download=False, layer="64")


def _settings(weights, **kw) -> EvalSettings:
    base = dict(metrics=["fid", "kid", "prdc"], n=5, batch_size=4, feature_weights=str(weights),
                feature_layer="64", download=False, nearest_k=2, kid_subsets=5)
    base.update(kw)
    return EvalSettings(**base)


def _split_images(shards, split: str) -> torch.Tensor:
    from vqtool.data.loader import ShardLoader

    return torch.cat([x for x, _ in ShardLoader(shards, split, batch_size=64, infinite=False)])


def _tiny_vq(run):
    from vqtool.data.manifest import manifest_sha256
    from vqtool.vq.model import VQConfig, VQModel
    from vqtool.vq.store import save_vq

    torch.manual_seed(0)
    cfg = VQConfig(resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=8,
                   codebook_size=16, code_dim=4)
    model = VQModel(cfg).eval()
    save_vq(run / "vq.safetensors", cfg, model.state_dict(), model.state_dict(), {},
            parents={"dataset": manifest_sha256(run / "shards")}, extra={"image_size": 16})
    return model


def test_fid_kid_prdc_of_train_vs_val_end_to_end(tiny_run, weights, extractor):
    r = evaluate(tiny_run, _settings(weights, n=5, n_real=6, fake=str(tiny_run / "shards"), fake_split="val"),
                 device="cpu", show_progress=False)
    # The same numbers straight from the images, the extractor and torch-fidelity / prdc.
    real = features.extract_features(extractor, [_split_images(tiny_run / "shards", "train")[:6]])
    fake = features.extract_features(extractor, [_split_images(tiny_run / "shards", "val")[:5]])
    assert r.metrics["fid"] == pytest.approx(fid(real, fake), rel=1e-4)
    assert set(r.metrics) == {"fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage"}
    # Reports: JSON and artifact agree, settings and parents recorded.
    report = json.loads(r.json_path.read_text())
    assert r.json_path == tiny_run / "eval" / "report.json"
    assert report["metrics"]["fid"] == pytest.approx(r.metrics["fid"])
    assert report["real"]["n"] == 6 and report["fake"]["n"] == 5 and report["settings"]["n"] == 5
    assert report["kid"]["subset_size"] == 5  # capped at the smaller set
    art = load_artifact(r.artifact_path, "eval-report")
    assert art.tensors["metric.fid"].item() == pytest.approx(r.metrics["fid"])
    assert art.parents["real_dataset"] == file_sha256(tiny_run / "shards" / "manifest.json")
    assert art.parents["real_features"] == file_sha256(report["real"]["features_cache"])
    assert report["artifact"]["sha256"] == file_sha256(r.artifact_path)
    # The real features were cached, exactly n of them.
    cached = load_artifact(report["real"]["features_cache"], "features").tensors["features"]
    assert cached.shape == (6, 64) and torch.allclose(cached, real, atol=1e-5)
    assert report["real"]["cache_hit"] is False


def test_second_eval_reads_real_features_from_the_cache(tiny_run, weights, monkeypatch):
    s = _settings(weights, n=4, fake=str(tiny_run / "shards"), fake_split="val")
    first = evaluate(tiny_run, s, device="cpu", show_progress=False)
    seen = []
    original = features.extract_features

    def counting(extractor, batches, on_batch=None):
        out = original(extractor, batches, on_batch)
        seen.append(out.shape[0])
        return out

    monkeypatch.setattr(features, "extract_features", counting)
    second = evaluate(tiny_run, _settings(weights, n=4, fake=str(tiny_run / "shards"), fake_split="val",
                                          name="again"), device="cpu", show_progress=False)
    assert seen == [4]  # only the fake set went through the network
    assert second.report["real"]["cache_hit"] is True
    assert second.metrics == pytest.approx(first.metrics)


def test_a_set_against_itself_has_fid_zero_and_perfect_prdc(tiny_run, weights):
    r = evaluate(tiny_run, _settings(weights, n=6, fake=str(tiny_run / "shards"), metrics=["fid", "prdc"]),
                 device="cpu", show_progress=False)
    assert abs(r.metrics["fid"]) < 1e-3
    assert r.metrics["precision"] == 1.0 and r.metrics["recall"] == 1.0 and r.metrics["coverage"] == 1.0


def test_n_is_honoured_exactly_across_partial_batches(tiny_run, weights):
    # 7 images in batches of 4: the last, partial batch is kept.
    r = evaluate(tiny_run, _settings(weights, n=7, n_real=9, fake=str(tiny_run / "shards"), fake_split="val",
                                     metrics=["fid"]), device="cpu", show_progress=False)
    cached = load_artifact(r.report["real"]["features_cache"], "features").tensors["features"]
    assert cached.shape[0] == 9 and r.report["fake"]["n"] == 7


def test_image_folder_as_fake_equals_the_same_pixels_from_shards(tiny_run, weights, tmp_path):
    val = _split_images(tiny_run / "shards", "val")[:5]
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, array in enumerate(to_uint8(val)):
        Image.fromarray(array).save(folder / f"{i:03d}.png")
    from_folder = evaluate(tiny_run, _settings(weights, fake=str(folder), metrics=["fid"], name="folder"),
                           device="cpu", show_progress=False)
    from_shards = evaluate(tiny_run, _settings(weights, fake=str(tiny_run / "shards"), fake_split="val",
                                               metrics=["fid"], name="shards"), device="cpu", show_progress=False)
    assert from_folder.report["fake"]["type"] == "folder"
    assert from_folder.metrics["fid"] == pytest.approx(from_shards.metrics["fid"], rel=1e-5)


def test_too_few_images_stops_before_any_work_with_one_line(tiny_run, weights):
    with pytest.raises(VqtoolError, match=r"--real .*\(train\): holds 36 images, fewer than the 100 asked for"):
        evaluate(tiny_run, _settings(weights, n=100, fake=str(tiny_run / "shards")), device="cpu",
                 show_progress=False)
    with pytest.raises(VqtoolError, match=r"--fake .*\(val\): holds 12 images, fewer than the 20"):
        evaluate(tiny_run, _settings(weights, n=20, fake=str(tiny_run / "shards"), fake_split="val"),
                 device="cpu", show_progress=False)
    assert not (tiny_run / "eval" / "report.json").exists()


def test_existing_report_is_not_replaced_without_overwrite(tiny_run, weights):
    s = _settings(weights, n=3, fake=str(tiny_run / "shards"), metrics=["fid"])
    evaluate(tiny_run, s, device="cpu", show_progress=False)
    with pytest.raises(VqtoolError, match="report.json exists; pass --overwrite"):
        evaluate(tiny_run, s, device="cpu", show_progress=False)
    evaluate(tiny_run, s, device="cpu", overwrite=True, show_progress=False)


def test_bad_settings_are_one_line_errors(tiny_run, weights):
    with pytest.raises(VqtoolError, match="--metrics fid,isc: choose from fid,kid,prdc,recon,nll"):
        evaluate(tiny_run, _settings(weights, metrics=["fid", "isc"]), device="cpu", show_progress=False)
    with pytest.raises(VqtoolError, match="--fake .*nowhere: not found"):
        evaluate(tiny_run, _settings(weights, fake=str(tiny_run / "nowhere")), device="cpu", show_progress=False)
    with pytest.raises(VqtoolError, match="no prior here"):
        evaluate(tiny_run, _settings(weights), device="cpu", show_progress=False)


def test_missing_feature_weights_stop_the_stage_with_one_line(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(VqtoolError) as err:
        evaluate(tiny_run, EvalSettings(n=4, fake=str(tiny_run / "shards"), download=False), device="cpu",
                 show_progress=False)
    assert "weights-inception-2015-12-05-6726825d.pth" in str(err.value) and "--feature-weights" in str(err.value)
    assert "\n" not in str(err.value)


def test_recon_matches_a_direct_reconstruction(tiny_run, weights, extractor, tmp_path):
    import torchvision

    model = _tiny_vq(tiny_run)
    lpips_weights = tmp_path / "alexnet-random.pth"
    # torchvision's format, random weights; only `features.*` (the part LPIPS uses) to keep the file small.
    torch.save(torchvision.models.alexnet().features.state_dict(prefix="features."), lpips_weights)
    r = evaluate(tiny_run, _settings(weights, metrics=["recon"], n=10, lpips_weights=str(lpips_weights)),
                 device="cpu", show_progress=False)
    val = _split_images(tiny_run / "shards", "val")[:10]
    with torch.no_grad():
        tokens = model.encode_to_tokens(val)
        recon = model.decode_tokens(tokens)
    mse = ((recon - val) / 2).pow(2).flatten(1).mean(1)
    assert r.metrics["recon_psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-4)
    assert r.metrics["recon_l1"] == pytest.approx(float(((recon - val).abs() / 2).mean()), rel=1e-4)
    used = torch.bincount(tokens.flatten(), minlength=16)
    assert r.metrics["codebook_usage"] == pytest.approx(float((used > 0).float().mean()))
    p = used[used > 0].double() / used.sum()
    assert r.metrics["codebook_perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
    expected_rfid = fid(features.extract_features(extractor, [val]), features.extract_features(extractor, [recon]))
    assert r.metrics["recon_fid"] == pytest.approx(expected_rfid, rel=1e-3)
    assert r.metrics["recon_lpips"] is not None and r.metrics["recon_lpips"] > 0
    assert r.report["recon"]["n"] == 10 and r.report["parents"]["vq"] == file_sha256(tiny_run / "vq.safetensors")


def test_recon_without_lpips_weights_reports_the_rest_and_says_why(tiny_run, weights, tmp_path, monkeypatch):
    _tiny_vq(tiny_run)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    r = evaluate(tiny_run, _settings(weights, metrics=["recon"], n=4), device="cpu", show_progress=False)
    assert r.metrics["recon_lpips"] is None and r.metrics["recon_psnr"] > 0
    assert "LPIPS skipped" in r.report["recon"]["note"] and "--lpips-weights" in r.report["recon"]["note"]
    assert r.report["metrics"]["recon_lpips"] is None


def test_samples_artifact_as_fake_is_decoded_through_its_vq(tiny_run, weights, extractor):
    from vqtool.samples import save_samples

    model = _tiny_vq(tiny_run)
    tokens = torch.randint(0, 16, (5, 8, 8), generator=torch.Generator().manual_seed(0))
    path = tiny_run / "samples" / "samples.safetensors"
    save_samples(path, tokens, None, {"seed": 0}, parents={"vq": file_sha256(tiny_run / "vq.safetensors")},
                 codebook_size=16)
    r = evaluate(tiny_run, _settings(weights, fake=str(path.parent), metrics=["fid"]), device="cpu",
                 show_progress=False)
    with torch.no_grad():
        decoded = model.decode_tokens(tokens)
    real = features.extract_features(extractor, [_split_images(tiny_run / "shards", "train")[:5]])
    assert r.metrics["fid"] == pytest.approx(fid(real, features.extract_features(extractor, [decoded])), rel=1e-4)
    assert r.report["fake"]["type"] == "samples" and r.report["parents"]["fake_samples"] == file_sha256(path)
    # Samples made with another VQ are refused.
    save_samples(path, tokens, None, {"seed": 0}, parents={"vq": "0" * 64}, codebook_size=16)
    with pytest.raises(VqtoolError, match="different vq"):
        evaluate(tiny_run, _settings(weights, fake=str(path), name="other"), device="cpu", show_progress=False)


def test_fake_images_sampled_on_the_fly_from_the_runs_prior(tiny_run, weights):
    from vqtool.prior.sample import SampleSettings
    from vqtool.prior.store import save_prior
    from vqtool.prior.transformer import Transformer, TransformerConfig

    _tiny_vq(tiny_run)
    cfg = TransformerConfig(vocab_size=16, grid=(8, 8), n_layer=1, n_head=2, n_embd=16)
    prior = Transformer(cfg)
    save_prior(tiny_run / "prior.safetensors", "absorbing", cfg, {}, prior.state_dict(), prior.state_dict(),
               parents={"vq": file_sha256(tiny_run / "vq.safetensors")})
    sample = SampleSettings(steps=2, batch_size=3, seed=1)
    r = evaluate(tiny_run, _settings(weights, n=5, metrics=["fid", "kid"]), sample, device="cpu",
                 show_progress=False)
    assert r.report["fake"]["type"] == "prior" and r.report["fake"]["settings"]["steps"] == 2
    assert r.report["parents"]["fake_prior"] == file_sha256(tiny_run / "prior.safetensors")
    assert np.isfinite(r.metrics["fid"])
    assert r.report["settings"]["sample"]["steps"] == 2


def _tiny_latents_and_prior(run, kind: str):
    from vqtool.latents import Latents, Split, save_latents
    from vqtool.prior.store import save_prior
    from vqtool.prior.transformer import Transformer, TransformerConfig

    model = _tiny_vq(run)
    splits = {}
    with torch.no_grad():
        for name in ("train", "val"):
            splits[name] = Split(tokens=model.encode_to_tokens(_split_images(run / "shards", name)))
    vq_sha = file_sha256(run / "vq.safetensors")
    save_latents(run / "latents.safetensors", Latents(splits=splits, codebook_size=16, latent_shape=(8, 8),
                                                      image_size=16), parents={"vq": vq_sha})
    torch.manual_seed(1)
    cfg = TransformerConfig(vocab_size=16, grid=(8, 8), n_layer=1, n_head=2, n_embd=16,
                            causal=kind == "autoregressive")
    objective = {"T": 8, "mask_schedule": "random", "loss": "elbo", "nll_samples": 2} if kind == "absorbing" else {}
    prior = Transformer(cfg)
    save_prior(run / "prior.safetensors", kind, cfg, objective, prior.state_dict(), prior.state_dict(),
               parents={"latents": file_sha256(run / "latents.safetensors"), "vq": vq_sha})
    return splits


@pytest.mark.parametrize("kind", ["absorbing", "autoregressive"])
def test_nll_on_train_and_val_latents_matches_dataset_nll(tiny_run, weights, kind):
    from vqtool.prior.likelihood import dataset_nll
    from vqtool.prior.store import load_prior

    splits = _tiny_latents_and_prior(tiny_run, kind)
    r = evaluate(tiny_run, _settings(weights, metrics=["nll"], n=5), device="cpu", seed=3, show_progress=False)
    prior = load_prior(tiny_run / "prior.safetensors")
    for name in ("train", "val"):
        # eval's default ELBO: 16 stratified t draws per image
        expected = dataset_nll(prior, splits[name].tokens[:5], None, 4, torch.Generator().manual_seed(3),
                               nll_samples=16 if kind == "absorbing" else None)
        assert r.metrics[f"nll_{name}_bpt"] == pytest.approx(float(expected.double().mean()), rel=1e-5)
        # bits/dim: an image's 64 tokens' bits spread over its 3·16·16 colour values.
        assert r.metrics[f"nll_{name}_bpd"] == pytest.approx(r.metrics[f"nll_{name}_bpt"] * 64 / 768)
    assert r.metrics["nll_gap_bpt"] == pytest.approx(r.metrics["nll_val_bpt"] - r.metrics["nll_train_bpt"])
    assert r.report["nll"]["bound"] == ("elbo" if kind == "absorbing" else "exact")
    assert r.report["nll"]["n"] == {"train": 5, "val": 5}
    art = load_artifact(r.artifact_path, "eval-report")
    assert art.tensors["nll.train"].shape == (5,)
    assert art.parents["latents"] == file_sha256(tiny_run / "latents.safetensors")


def test_recon_alone_without_any_weights_reports_what_needs_none(tiny_run, tmp_path, monkeypatch):
    _tiny_vq(tiny_run)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    r = evaluate(tiny_run, EvalSettings(metrics=["recon"], n=4, download=False), device="cpu", show_progress=False)
    assert r.metrics["recon_fid"] is None and r.metrics["recon_lpips"] is None
    assert r.metrics["recon_psnr"] > 0 and 0 < r.metrics["codebook_usage"] <= 1
    note = r.report["recon"]["note"]
    assert "LPIPS skipped" in note and "recon FID skipped" in note and "--feature-weights" in note
    # Asking for FID as well, the missing weights are an error again.
    with pytest.raises(VqtoolError, match="weights-inception"):
        evaluate(tiny_run, EvalSettings(metrics=["recon", "fid"], n=4, download=False, name="x",
                                        fake=str(tiny_run / "shards")), device="cpu", show_progress=False)


def test_held_out_latents_of_the_same_vq_are_scored_and_named(tiny_run, weights):
    from vqtool.latents import Latents, Split, load_latents, save_latents

    splits = _tiny_latents_and_prior(tiny_run, "absorbing")
    vq_sha = file_sha256(tiny_run / "vq.safetensors")
    # A "test set": other images (here the val grids, flipped) encoded by the same VQ, saved on their own.
    test = {"train": Split(tokens=splits["val"].tokens.flip(-1)), "val": Split(tokens=splits["train"].tokens[:2])}
    test_path = tiny_run / "test-latents.safetensors"
    save_latents(test_path, Latents(splits=test, codebook_size=16, latent_shape=(8, 8), image_size=16),
                 parents={"vq": vq_sha, "dataset": "1" * 64})
    r = evaluate(tiny_run, _settings(weights, metrics=["nll"], n=100, latents=str(test_path), split_name="test",
                                     nll_samples=4, name="test"), device="cpu", seed=0, show_progress=False)
    n_test = sum(s.tokens.shape[0] for s in test.values())
    assert r.report["nll"]["n"] == {"test": n_test} and r.report["nll"]["latents_role"] == "held-out"
    assert r.metrics["nll_test_bpt"] > 0 and r.metrics["nll_test_bpt_se"] > 0 and "nll_gap_bpt" not in r.metrics
    assert r.report["parents"]["latents"] == file_sha256(test_path)
    assert "NLL test (bits/token)" in r.markdown and "±" in r.markdown
    # Without --split-name the latents keep their own split names.
    r = evaluate(tiny_run, _settings(weights, metrics=["nll"], n=100, latents=str(test_path), nll_samples=4,
                                     name="own-names"), device="cpu", seed=0, show_progress=False)
    assert set(r.report["nll"]["n"]) == {"train", "val"}

    # Latents of another VQ are refused, and so are latents that do not say which VQ made them.
    other = tiny_run / "other-vq-latents.safetensors"
    save_latents(other, load_latents(test_path), parents={"vq": "2" * 64})
    with pytest.raises(VqtoolError, match="encoded by another VQ"):
        evaluate(tiny_run, _settings(weights, metrics=["nll"], latents=str(other), name="x"), device="cpu",
                 show_progress=False)
    unknown = tiny_run / "unknown-vq-latents.safetensors"
    save_latents(unknown, load_latents(test_path), parents={})
    with pytest.raises(VqtoolError, match="does not record its VQ"):
        evaluate(tiny_run, _settings(weights, metrics=["nll"], latents=str(unknown), name="y"), device="cpu",
                 show_progress=False)


@pytest.mark.parametrize("value, ok", [(16, True), ("all", True), (0, False), ("some", False)])
def test_nll_samples_takes_a_count_or_all(value, ok):
    settings = EvalSettings(metrics=["nll"], nll_samples=value)
    if ok:
        settings.validate()
    else:
        with pytest.raises(VqtoolError, match="--nll-samples"):
            settings.validate()
