"""train-vq end to end on the tiny synthetic shards: exact resume, outputs, refusals, NaN stop."""

import json

import pytest
import torch

from vqtool.artifacts import load_artifact, read_metadata
from vqtool.errors import VqtoolError
from vqtool.runs import RunPaths
from vqtool.vq.model import VQConfig
from vqtool.vq.store import load_vq
from vqtool.vq.train import TrainVQConfig, VQTrainer, train_vq


def tiny_vq(**kw) -> VQConfig:
    base = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=8, codebook_size=16,
                code_dim=4, kmeans_init=True, restart_threshold=0.5, usage_decay=0.5)
    base.update(kw)
    return VQConfig(**base)


def tiny_train(**kw) -> TrainVQConfig:
    # disc_start 3: the discriminator, DiffAugment and the adaptive weight run inside the resume window.
    base = dict(batch_size=4, perceptual="none", disc_start=3, disc_layers=2, disc_ch=8, kmeans_batches=2,
                shuffle_buffer=8, log_every=1, eval_every=3, checkpoint_every=3, eval_images=8, grid_images=4,
                ema_decay=0.9)
    base.update(kw)
    return TrainVQConfig(**base)


def train_losses(run) -> list[dict]:
    lines = RunPaths.of(run).log("train-vq").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def strip_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.mark.parametrize("channels_last", [None, True])
def test_exact_resume_matches_uninterrupted_run(tiny_shards, tmp_path, channels_last):
    # channels_last: the fused Adam kernel needs the moments back in their parameter's layout on resume
    full, half = tmp_path / "full", tmp_path / "half"
    train = dict(channels_last=channels_last)
    a = train_vq(full, tiny_vq(), tiny_train(max_steps=6, **train), seed=3, device="cpu", shards=tiny_shards)
    assert a.step == 6 and a.reason == "max-steps"
    train_vq(half, tiny_vq(), tiny_train(max_steps=3, **train), seed=3, device="cpu", shards=tiny_shards)
    b = train_vq(half, tiny_vq(), tiny_train(max_steps=6, **train), seed=3, device="cpu", shards=tiny_shards,
                 resume=True)
    assert b.step == 6
    la, lb = strip_time(train_losses(full)), strip_time(train_losses(half))
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert la == lb  # every logged loss, bit for bit, including the discriminator's
    assert any("d_loss" in r and "disc_weight" in r for r in la[2:])
    wa = load_artifact(RunPaths.of(full).vq, "vq-model").tensors
    wb = load_artifact(RunPaths.of(half).vq, "vq-model").tensors
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_outputs_artifact_and_contracts(tiny_shards, tmp_path):
    run = tmp_path / "run"
    r = train_vq(run, tiny_vq(), tiny_train(max_steps=3), seed=0, device="cpu", shards=tiny_shards)
    paths = RunPaths.of(run)
    meta = read_metadata(paths.vq, "vq-model")
    assert meta.parents == {"dataset": json.loads(json.dumps(meta.parents))["dataset"]}
    assert meta.config["model"]["resolution"] == 16 and meta.config["train"]["batch_size"] == 4
    assert meta.extra["image_size"] == 16 and meta.extra["latent_shape"] == [8, 8]
    cb = meta.extra["codebook"]
    assert 0 < cb["usage"] <= 1 and 1 <= cb["perplexity"] <= 16
    assert meta.extra["val"]["psnr"] > 0
    names = meta.extra["_tensors"]
    assert any(k.startswith("ema.") for k in names) and any(k.startswith("model.") for k in names)
    assert r.grid is not None and r.grid.exists() and r.grid.parent == paths.figures("train-vq")
    assert paths.checkpoint("train-vq").exists()

    vq = load_vq(paths.vq)
    assert not vq.model.training
    assert vq.model.codebook_size == 16 and vq.model.downsample == 2 and vq.model.latent_shape(16) == (8, 8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        tokens = vq.model.encode_to_tokens(x)
        assert tokens.shape == (2, 8, 8) and tokens.dtype == torch.int64
        assert vq.model.decode_tokens(tokens).shape == (2, 3, 16, 16)
    raw = load_vq(paths.vq, weights="model")
    assert not torch.equal(raw.model.decoder.conv_out.weight, vq.model.decoder.conv_out.weight)
    with pytest.raises(VqtoolError, match="--weights"):
        load_vq(paths.vq, weights="best")

    # a second run into the same folder needs --overwrite or --resume
    with pytest.raises(VqtoolError, match="--overwrite"):
        train_vq(run, tiny_vq(), tiny_train(max_steps=3), device="cpu", shards=tiny_shards)
    # resuming with a different model shape is refused with the setting named
    with pytest.raises(VqtoolError, match="model"):
        train_vq(run, tiny_vq(codebook_size=32), tiny_train(max_steps=4), device="cpu", shards=tiny_shards,
                 resume=True)


def test_kmeans_init_happens_once_and_codes_land_on_encoder_outputs(tiny_shards, tmp_path):
    task = VQTrainer(tiny_vq(restart_threshold=0.0), tiny_train(), tiny_shards, tmp_path / "vq.safetensors",
                     tmp_path / "fig", seed=0)
    before = task.model.quantizer.embedding.detach().clone()
    task.train_step()
    q = task.model.quantizer
    assert int(q.initialized) == 1
    assert not torch.allclose(before, q.embedding.detach())
    # the EMA copy took the k-means codebook at once instead of averaging it with the random one
    assert torch.allclose(task.ema.shadow["quantizer.embedding"], q.embedding.detach(), atol=0.2)
    assert int(task.ema.shadow["quantizer.initialized"]) == 1
    after_first = q.embedding.detach().clone()
    task.train_step()
    assert (q.embedding.detach() - after_first).abs().max() < 0.05  # an Adam step, not a second k-means


def test_bad_settings_are_one_line_errors(tiny_shards, tmp_path):
    with pytest.raises(VqtoolError, match="disc_layers"):
        VQTrainer(tiny_vq(), tiny_train(disc_layers=3), tiny_shards, tmp_path / "v", tmp_path / "f")
    with pytest.raises(VqtoolError, match="resolution"):
        VQTrainer(tiny_vq(resolution=32), tiny_train(), tiny_shards, tmp_path / "v", tmp_path / "f")
    with pytest.raises(VqtoolError, match="divisible"):
        VQTrainer(tiny_vq(ch_mult=[1, 1, 1, 1, 1, 1]), tiny_train(), tiny_shards, tmp_path / "v", tmp_path / "f")
    with pytest.raises(VqtoolError, match="diffaug"):
        VQTrainer(tiny_vq(), tiny_train(diffaug=["rotate"]), tiny_shards, tmp_path / "v", tmp_path / "f")
    with pytest.raises(VqtoolError, match="perceptual"):
        VQTrainer(tiny_vq(), tiny_train(perceptual="lpips"), tiny_shards, tmp_path / "v", tmp_path / "f")
    with pytest.raises(VqtoolError, match="shards folder not found"):
        train_vq(tmp_path / "empty", tiny_vq(), tiny_train(max_steps=1), device="cpu")


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_shards, tmp_path):
    run = tmp_path / "run"
    train_vq(run, tiny_vq(), tiny_train(max_steps=3), seed=0, device="cpu", shards=tiny_shards)
    ckpt = RunPaths.of(run).checkpoint("train-vq")
    before = ckpt.read_bytes()
    # an absurd learning rate makes the losses blow up to inf/NaN within a few steps
    with pytest.raises(VqtoolError, match="became"):
        train_vq(run, tiny_vq(), tiny_train(max_steps=40, lr=1e30, checkpoint_every=1000), seed=0, device="cpu",
                 shards=tiny_shards, resume=True)
    assert ckpt.read_bytes() == before


def test_train_step_with_perceptual_loss_random_vgg_backbone(tiny_shards, tmp_path):
    from vqtool.vq.perceptual import Perceptual, build_lpips

    task = VQTrainer(tiny_vq(), tiny_train(disc_start=1), tiny_shards, tmp_path / "v", tmp_path / "f")
    task.perceptual = Perceptual(build_lpips("lpips-vgg"))  # same architecture, random weights: no download
    frozen = {k: v.clone() for k, v in task.perceptual.state_dict().items()}
    metrics = task.train_step()
    assert {"lpips", "g_loss", "d_loss", "disc_weight"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["lpips"] > 0
    assert all(torch.equal(frozen[k], v) for k, v in task.perceptual.state_dict().items())  # never trained


def plain_step(task: VQTrainer) -> dict[str, float]:
    """The train-vq step in its plain form, for comparison: λ from two extra last-layer gradients and one
    backward of the whole loss, the discriminator called on real and reconstructed images separately,
    torch's default Adam (the form of Taming's code, and of vqtool's before issue 16)."""
    from test_vq_losses import adaptive_weight

    from vqtool.vq.diffaug import diff_augment
    from vqtool.vq.losses import hinge_d_loss, hinge_g_loss

    cfg, q = task.cfg, task.model.quantizer
    x = task._next_batch()
    out = task.model(x)
    l1 = (x - out.recon).abs().mean()
    g_loss = hinge_g_loss(task.disc(diff_augment(out.recon, cfg.diffaug, task.generator)))
    weight = adaptive_weight(l1, g_loss, task.model.last_layer, cfg.disc_weight_max)
    loss = l1 + cfg.codebook_weight * out.q_loss + weight * g_loss
    task.opt_ae.zero_grad(set_to_none=True)
    loss.backward()
    task.opt_ae.step()
    q.update_usage(q.code_counts(out.indices))
    task.opt_d.zero_grad(set_to_none=True)
    real = task.disc(diff_augment(x, cfg.diffaug, task.generator))
    fake = task.disc(diff_augment(out.recon.detach(), cfg.diffaug, task.generator))
    d_loss = hinge_d_loss(real, fake)
    d_loss.backward()
    task.opt_d.step()
    values = {"loss": loss, "l1": l1, "q_loss": out.q_loss, "g_loss": g_loss, "disc_weight": weight, "d_loss": d_loss}
    return {k: float(v.detach()) for k, v in values.items()}


@pytest.mark.parametrize("channels_last", [None, True])
def test_optimised_step_matches_the_plain_step(tiny_shards, tmp_path, channels_last):
    """Three steps with the discriminator on: the same losses, λ and weights as the plain step, within
    float rounding (one backward from the reconstruction, one discriminator pass, fused Adam)."""
    settings = dict(disc_start=1, channels_last=channels_last, diffaug=["color", "translation", "cutout"])
    fast = VQTrainer(tiny_vq(kmeans_init=False, restart_threshold=0.0), tiny_train(**settings), tiny_shards,
                     tmp_path / "a", tmp_path / "fa", seed=5)
    plain = VQTrainer(tiny_vq(kmeans_init=False, restart_threshold=0.0), tiny_train(**settings), tiny_shards,
                      tmp_path / "b", tmp_path / "fb", seed=5)
    # channels_last None: NCHW on CPU (GroupNorm's NHWC kernel is the slow one there)
    assert fast.memory_format == (torch.channels_last if channels_last else torch.contiguous_format)
    betas = tuple(plain.cfg.betas)
    plain.opt_ae = torch.optim.Adam(plain.model.parameters(), lr=plain.cfg.lr, betas=betas)
    plain.opt_d = torch.optim.Adam(plain.disc.parameters(), lr=plain.cfg.lr, betas=betas)
    for _ in range(3):
        a, b = fast.train_step(), plain_step(plain)
        for key, value in b.items():
            assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    checked = 0
    for (name, p), r in zip([*fast.model.named_parameters(), *fast.disc.named_parameters()],
                            [*plain.model.parameters(), *plain.disc.parameters()], strict=True):
        # Adam moves every weight by about lr per step, rounding by a tiny fraction of that; except where
        # the gradient is zero but for rounding (a conv bias before a GroupNorm, the key bias of attention),
        # which Adam turns into steps of lr in both runs alike
        real = r.grad.abs() > 1e-7
        assert ((p - r).abs() < 0.05 * fast.cfg.lr)[real].all(), name
        checked += int(real.sum())
    assert checked > 0.9 * sum(p.numel() for p in [*fast.model.parameters(), *fast.disc.parameters()])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        fast.model.eval(), plain.model.eval(), fast.disc.eval(), plain.disc.eval()
        assert torch.allclose(fast.model(x).recon, plain.model(x).recon, atol=1e-4)
        assert torch.allclose(fast.disc(x), plain.disc(x), atol=1e-4)
    for name, buf in fast.disc.named_buffers():
        assert torch.allclose(buf.float(), dict(plain.disc.named_buffers())[name].float(), atol=1e-5), name


def test_compile_setting_compiles_all_but_the_last_layer(tiny_shards, tmp_path):
    """--compile wraps the encoder, the decoder up to its last GroupNorm and the discriminator (lazily: the
    graphs are built at the first step); the decoder's last norm and conv, where the adaptive weight takes
    its gradient, stay eager. The model's state-dict keys do not change."""
    plain = VQTrainer(tiny_vq(), tiny_train(), tiny_shards, tmp_path / "a", tmp_path / "fa")
    task = VQTrainer(tiny_vq(), tiny_train(compile=True), tiny_shards, tmp_path / "b", tmp_path / "fb")
    dec = task.model.decoder
    compiled = [task.model.encoder, dec.conv_in, dec.mid, *dec.levels, task.disc]
    assert all(m._compiled_call_impl is not None for m in compiled)
    assert dec.norm_out._compiled_call_impl is None and dec.conv_out._compiled_call_impl is None
    assert all(m._compiled_call_impl is None for m in plain.model.modules())
    assert list(task.model.state_dict()) == list(plain.model.state_dict())
    assert list(task.disc.state_dict()) == list(plain.disc.state_dict())
