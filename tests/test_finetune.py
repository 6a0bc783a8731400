"""Fine-tuning from a model artifact: train-vq --init and train-prior --init on tiny CPU runs.

The init artifacts are built here as `vqtool import` writes them (ema.* only, a discriminator with a
shape train-vq would not choose, Unleashing-style VQ switches, an exact-GELU transformer), from seeds
other than the runs', so "starts from the init weights" cannot pass by coincidence.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vqtool import statepack
from vqtool.artifacts import file_sha256, load_artifact, read_metadata
from vqtool.cli import app
from vqtool.errors import VqtoolError
from vqtool.latents import Latents, Split, save_latents
from vqtool.prior.store import save_prior
from vqtool.prior.train import train_prior
from vqtool.prior.transformer import Transformer, TransformerConfig
from vqtool.runs import RunPaths
from vqtool.vq.losses import PatchDiscriminator
from vqtool.vq.model import VQConfig, VQModel
from vqtool.vq.store import save_vq
from vqtool.vq.train import VQTrainer, train_vq

VQ_SHA = "cd" * 32
DISC = {"disc_ch": 4, "disc_layers": 1}  # neither train-vq's defaults (64, 3) nor anything a test run sets


def imported_vq_config(**kw) -> VQConfig:
    # The Unleashing layout in miniature: no 1×1 convs, as many decoder blocks as encoder blocks, plain lookup.
    base = dict(resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=8,
                codebook_size=16, code_dim=8, quant_convs=False, decoder_res_blocks=1, swish_before_out=False,
                cosine=False, restart_threshold=0.0)
    base.update(kw)
    return VQConfig(**base)


def save_imported_vq(path: Path, cfg: VQConfig | None = None, disc: bool = True, seed: int = 123,
                     weights: str = "ema") -> Path:
    """A vq-model artifact as `vqtool import` writes it: one weight set, no train config, no parents."""
    cfg = cfg or imported_vq_config()
    torch.manual_seed(seed)
    model = VQModel(cfg)
    model.quantizer.initialized.fill_(1)  # a trained codebook
    extra = {"image_size": cfg.resolution, "latent_shape": list(model.latent_shape(cfg.resolution)),
             "source": {"format": "test", "file": "vqgan_ema_0.th"}}
    discriminator = None
    if disc:
        extra["discriminator"] = dict(DISC)
        d = PatchDiscriminator(DISC["disc_ch"], DISC["disc_layers"])
        d.main[3].running_mean.normal_()  # statistics a fresh discriminator does not have
        discriminator = d.state_dict()
    state = model.state_dict()
    save_vq(path, cfg, state if weights == "ema" else {}, state if weights == "model" else {}, train_config={},
            parents={}, extra=extra, discriminator=discriminator)
    return path


def vq_train(**kw) -> dict:
    base = dict(batch_size=4, perceptual="none", disc_start=1, kmeans_batches=1, shuffle_buffer=8, log_every=1,
                eval_every=2, checkpoint_every=2, eval_images=8, grid_images=4, ema_decay=0.9)
    base.update(kw)
    return base


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(f"{prefix}."): v for k, v in tensors.items() if k.startswith(f"{prefix}.")}


def checkpoint_state(path: Path) -> dict:
    art = load_artifact(path)
    return statepack.unpack(art.tensors, art.extra["state"])["task"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def records(log: Path, split: str = "train") -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"}
            for r in map(json.loads, log.read_text().splitlines()) if r["split"] == split]


# --------------------------------------------------------------------------------------------------
# train-vq --init


def test_vq_starts_from_the_init_weights_and_its_discriminator(tiny_shards, tmp_path):
    init = save_imported_vq(tmp_path / "imported.safetensors")
    src = load_artifact(init).tensors
    run = tmp_path / "run"
    # 0 steps: what the run starts from is what it exports, and what its checkpoint holds.
    r = train_vq(run, {"restart_threshold": 0.3}, vq_train(max_steps=0), device="cpu", shards=tiny_shards,
                 init=init)
    assert r.step == 0 and r.init == init and r.init_sha256 == file_sha256(init)
    out = load_artifact(RunPaths.of(run).vq, "vq-model")
    assert same(prefixed(out.tensors, "ema"), prefixed(src, "ema"))  # the EMA starts from the init weights
    assert same(prefixed(out.tensors, "model"), prefixed(src, "ema"))  # and so does the model itself
    assert out.parents == {"dataset": out.parents["dataset"], "init": file_sha256(init)}
    model_cfg = out.config["model"]
    assert model_cfg["quant_convs"] is False and model_cfg["swish_before_out"] is False  # the init's architecture
    assert model_cfg["restart_threshold"] == 0.3  # a collapse remedy may be changed
    assert model_cfg["kmeans_init"] is False
    assert out.config["train"]["disc_ch"] == 4 and out.config["train"]["disc_layers"] == 1  # not 64 and 3
    state = checkpoint_state(RunPaths.of(run).checkpoint("train-vq"))
    disc = prefixed(src, "disc")
    assert same(state["disc"], disc)  # loaded, not re-initialised:
    torch.manual_seed(0)
    fresh = PatchDiscriminator(DISC["disc_ch"], DISC["disc_layers"]).state_dict()
    assert not torch.equal(fresh["main.0.weight"], disc["main.0.weight"])


def test_vq_first_step_trains_from_the_init_weights(tiny_shards, tmp_path):
    init = save_imported_vq(tmp_path / "imported.safetensors")
    src = load_artifact(init).tensors
    lr = 1e-4
    train_vq(tmp_path / "run", None, vq_train(max_steps=1, lr=lr), device="cpu", shards=tiny_shards, init=init)
    state = checkpoint_state(RunPaths.of(tmp_path / "run").checkpoint("train-vq"))
    # Adam's first step moves every weight by at most lr: both networks were at the init weights before it.
    for trained, start in ((state["model"], prefixed(src, "ema")), (state["disc"], prefixed(src, "disc"))):
        moved = {k: (trained[k] - start[k]).abs().max().item() for k in start
                 if start[k].is_floating_point() and "running" not in k and "usage" not in k}
        assert max(moved.values()) <= lr * 1.001
        assert max(moved.values()) > 0  # and it did train (the discriminator too: disc_start 1)


def test_vq_kmeans_runs_only_when_asked(tiny_shards, tmp_path, monkeypatch):
    # An artifact whose own config asked for k-means (as a trained one may): a fine-tuning run must not redo it.
    init = save_imported_vq(tmp_path / "trained.safetensors", imported_vq_config(kmeans_init=True), disc=False)
    calls = []
    monkeypatch.setattr(VQTrainer, "_kmeans_init", lambda self: calls.append(int(self.model.quantizer.initialized)))
    train = vq_train(max_steps=1, disc_ch=8, disc_layers=2)  # no discriminator in the artifact: ours, fresh
    train_vq(tmp_path / "a", {}, train, device="cpu", shards=tiny_shards, init=init)
    assert calls == []
    assert read_metadata(RunPaths.of(tmp_path / "a").vq).config["model"]["kmeans_init"] is False
    train_vq(tmp_path / "b", {"kmeans_init": True}, train, device="cpu", shards=tiny_shards, init=init)
    assert calls == [0]  # asked explicitly: the trained codebook is marked for k-means at the first step


def test_vq_refusals(tiny_shards, tmp_path):
    init = save_imported_vq(tmp_path / "imported.safetensors")

    def start(vq=None, train=None, **kw):
        return train_vq(tmp_path / "run", vq, vq_train(max_steps=1, **(train or {})), device="cpu",
                        shards=tiny_shards, init=kw.pop("init", init), **kw)

    with pytest.raises(VqtoolError, match=r"^vq\.ch = 16 conflicts with --init .*imported\.safetensors \(ch = 8\)"):
        start({"ch": 16})
    with pytest.raises(VqtoolError, match=r"vq\.cosine = True conflicts .*\(cosine = False\)"):
        start({"cosine": True})
    with pytest.raises(VqtoolError, match=r"vq\.ch = 16 conflicts"):
        start(imported_vq_config(ch=16, resolution=None))  # a dataclass chooses what differs from the defaults
    with pytest.raises(VqtoolError, match=r"train_vq\.disc_ch = 8 conflicts .*\(disc_ch = 4, the shape of its "):
        start(train={"disc_ch": 8})
    big = save_imported_vq(tmp_path / "big.safetensors", imported_vq_config(resolution=32))
    with pytest.raises(VqtoolError, match=r"is a model of 32 px images but the shards in .* are 16 px"):
        start(init=big)
    empty = tmp_path / "empty.safetensors"
    save_vq(empty, imported_vq_config(), {}, {}, train_config={}, parents={}, extra={"image_size": 16})
    with pytest.raises(VqtoolError, match="neither ema.* nor model.* weights"):
        start(init=empty)
    assert not (tmp_path / "run").exists()  # every refusal came before any training


def test_vq_falls_back_to_raw_weights(tiny_shards, tmp_path):
    init = save_imported_vq(tmp_path / "raw.safetensors", weights="model", disc=False)
    train_vq(tmp_path / "run", {}, vq_train(max_steps=0, disc_layers=2), device="cpu", shards=tiny_shards, init=init)
    out = load_artifact(RunPaths.of(tmp_path / "run").vq).tensors
    assert same(prefixed(out, "ema"), prefixed(load_artifact(init).tensors, "model"))


def test_vq_resume_after_init_is_exact(tiny_shards, tmp_path):
    init = save_imported_vq(tmp_path / "imported.safetensors")
    full, half = tmp_path / "full", tmp_path / "half"
    settings = dict(disc_start=2)
    train_vq(full, {"restart_threshold": 0.5}, vq_train(max_steps=4, **settings), seed=1, device="cpu",
             shards=tiny_shards, init=init)
    train_vq(half, {"restart_threshold": 0.5}, vq_train(max_steps=2, **settings), seed=1, device="cpu",
             shards=tiny_shards, init=init)
    # Neither --init nor the tunable setting named again: the checkpoint holds both.
    r = train_vq(half, {}, vq_train(max_steps=4, **settings), seed=1, device="cpu", shards=tiny_shards, resume=True)
    assert r.step == 4 and r.init is None and r.init_sha256 == file_sha256(init)
    assert records(RunPaths.of(full).log("train-vq")) == records(RunPaths.of(half).log("train-vq"))
    assert any("d_loss" in rec for rec in records(RunPaths.of(full).log("train-vq")))
    a, b = load_artifact(RunPaths.of(full).vq), load_artifact(RunPaths.of(half).vq)
    assert same(a.tensors, b.tensors) and a.parents == b.parents and "init" in b.parents

    # The same file again is fine; another one, or one for a run started without it, is refused.
    train_vq(half, {}, vq_train(max_steps=5, **settings), seed=1, device="cpu", shards=tiny_shards, resume=True,
             init=init)
    other = save_imported_vq(tmp_path / "other.safetensors", seed=7)
    with pytest.raises(VqtoolError, match=r"--init .*other\.safetensors \(sha256 .*\) is not the artifact the run"):
        train_vq(half, {}, vq_train(max_steps=6, **settings), seed=1, device="cpu", shards=tiny_shards,
                 resume=True, init=other)
    with pytest.raises(VqtoolError, match=r"vq\.ch = 16 conflicts with the checkpoint"):
        train_vq(half, {"ch": 16}, vq_train(max_steps=6, **settings), seed=1, device="cpu", shards=tiny_shards,
                 resume=True)
    plain = tmp_path / "plain"
    train_vq(plain, imported_vq_config(resolution=None), vq_train(max_steps=1, **DISC), device="cpu",
             shards=tiny_shards)
    with pytest.raises(VqtoolError, match="was started without --init"):
        train_vq(plain, imported_vq_config(resolution=None), vq_train(max_steps=2, **DISC), device="cpu",
                 shards=tiny_shards, resume=True, init=init)


def test_vq_cli_init(tiny_run, tmp_path):
    init = save_imported_vq(tmp_path / "imported.safetensors")
    common = ["train-vq", "--run", str(tiny_run), "--init", str(init), "--max-steps", "1", "--device", "cpu",
              "--threads", "1", "--perceptual", "none", "--batch-size", "4", "--set", "eval_images=8",
              "--set", "shuffle_buffer=8"]
    r = CliRunner().invoke(app, [*common, "--set", "vq.ch=16"])
    assert r.exit_code == 2 and "vq.ch = 16 conflicts" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, common)
    assert r.exit_code == 0, r.output
    assert "init" in r.output and file_sha256(init)[:12] in r.output
    assert read_metadata(RunPaths.of(tiny_run).vq).parents["init"] == file_sha256(init)


# --------------------------------------------------------------------------------------------------
# train-prior --init


def make_latents(path: Path, codebook: int = 16, labels: bool = True, vq: str = VQ_SHA) -> Path:
    """Diagonal-stripe grids on 4×4 tokens with 3 classes, as in test_train_prior."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        base = torch.randint(0, codebook, (n, 1, 1), generator=g)
        tokens = (base + torch.arange(4)[None, :, None] + torch.arange(4)[None, None, :]) % codebook
        return Split(tokens, torch.randint(0, 3, (n,), generator=g) if labels else None)

    lat = Latents(splits={"train": split(24), "val": split(8)}, codebook_size=codebook, latent_shape=(4, 4),
                  image_size=16, classes=["a", "b", "c"] if labels else [])
    save_latents(path, lat, parents={"vq": vq})
    return path


def save_imported_prior(path: Path, kind: str = "absorbing", seed: int = 5, vq: str | None = VQ_SHA) -> Path:
    """A prior-model artifact as `vqtool import` writes it: ema.* only, exact GELU, flat positions."""
    cfg = TransformerConfig(vocab_size=16, grid=(4, 4), n_layer=1, n_head=2, n_embd=16, n_classes=3,
                            causal=kind == "autoregressive", pos_emb="flat", gelu="exact")
    torch.manual_seed(seed)
    model = Transformer(cfg)
    objective = ({"T": 12, "mask_schedule": "random", "loss": "reweighted-elbo", "nll_samples": None}
                 if kind == "absorbing" else {})
    save_prior(path, kind, cfg, objective, model.state_dict(), {}, parents={"vq": vq} if vq else {},
               extra={"source": {"format": "test"}})
    return path


def prior_train(**kw) -> dict:
    # Optimisation and run settings only: the model and the objective come from the init prior.
    base = dict(batch_size=8, lr=1e-4, warmup_steps=0, weight_decay=0.0, log_every=1, eval_every=2,
                checkpoint_every=2, val_batches=1, val_nll_samples=2, device="cpu")
    base.update(kw)
    return base


def prior_paths(folder: Path) -> dict[str, Path]:
    return {"out": folder / "prior.safetensors", "checkpoint": folder / "ck.safetensors", "log": folder / "log.jsonl"}


def test_prior_starts_from_the_init_weights(tmp_path):
    latents = make_latents(tmp_path / "latents.safetensors")
    init = save_imported_prior(tmp_path / "imported.safetensors")
    src = prefixed(load_artifact(init).tensors, "ema")
    p = prior_paths(tmp_path / "zero")
    r = train_prior(latents, prior_train(max_steps=0, dropout=0.1), **p, init=init)
    assert r.steps == 0 and r.kind == "absorbing" and r.init_sha256 == file_sha256(init)
    out = load_artifact(p["out"], "prior-model")
    assert same(prefixed(out.tensors, "ema"), src) and same(prefixed(out.tensors, "model"), src)
    assert out.parents == {"latents": file_sha256(latents), "vq": VQ_SHA, "init": file_sha256(init)}
    assert out.config["model"]["gelu"] == "exact" and out.config["model"]["pos_emb"] == "flat"  # the init's model
    assert out.config["model"]["dropout"] == 0.1  # the one setting that may change
    assert out.config["objective"]["T"] == 12

    p = prior_paths(tmp_path / "one")
    lr = 1e-4
    train_prior(latents, prior_train(max_steps=1, lr=lr, grad_clip=None), **p, init=init)
    trained = checkpoint_state(p["checkpoint"])["model"]
    moved = max((trained[k] - src[k]).abs().max().item() for k in src)
    assert 0 < moved <= lr * 1.001  # Adam's first step, from the init weights


def test_prior_prefers_the_ema_weights_of_a_trained_artifact(tmp_path):
    latents = make_latents(tmp_path / "latents.safetensors")
    init = save_imported_prior(tmp_path / "imported.safetensors")
    meta = load_artifact(init)
    ema = prefixed(meta.tensors, "ema")
    raw = {k: v + 1 for k, v in ema.items()}  # a trained artifact keeps both; ema.* is the one meant for use
    trained = tmp_path / "trained.safetensors"
    save_prior(trained, "absorbing", TransformerConfig(**{**meta.config["model"], "grid": (4, 4)}),
               meta.config["objective"], ema, raw, parents={"vq": VQ_SHA})
    p = prior_paths(tmp_path / "r")
    train_prior(latents, prior_train(max_steps=0), **p, init=trained)
    assert same(prefixed(load_artifact(p["out"]).tensors, "ema"), ema)


def test_prior_refusals(tmp_path):
    latents = make_latents(tmp_path / "latents.safetensors")
    init = save_imported_prior(tmp_path / "imported.safetensors")
    p = prior_paths(tmp_path / "r")

    def start(settings=None, lat=latents, prior=init):
        return train_prior(lat, prior_train(max_steps=1, **(settings or {})), **p, init=prior)

    with pytest.raises(VqtoolError, match=r"^--prior autoregressive conflicts with --init .*, an absorbing prior"):
        start({"prior": "autoregressive"})
    with pytest.raises(VqtoolError, match=r"^n_layer = 2 conflicts with --init .*\(n_layer = 1\)"):
        start({"n_layer": 2})
    with pytest.raises(VqtoolError, match=r"timesteps = 8 conflicts .*\(timesteps = 12\)"):
        start({"timesteps": 8})
    with pytest.raises(VqtoolError, match=r"class_conditional = False conflicts"):
        start({"class_conditional": False})
    with pytest.raises(VqtoolError, match=r"codes of a 32-code codebook, but --init .* models 16 codes"):
        start(lat=make_latents(tmp_path / "k32.safetensors", codebook=32))
    with pytest.raises(VqtoolError, match=r"codes of another VQ"):
        start(lat=make_latents(tmp_path / "vq2.safetensors", vq="ef" * 32))
    with pytest.raises(VqtoolError, match=r"no labels, but --init .* is conditioned on 3 classes"):
        start(lat=make_latents(tmp_path / "plain.safetensors", labels=False))
    ar = save_imported_prior(tmp_path / "ar.safetensors", kind="autoregressive")
    with pytest.raises(VqtoolError, match=r"^--prior absorbing conflicts"):
        start({"prior": "absorbing"}, prior=ar)  # named explicitly, even though it is the default
    with pytest.raises(VqtoolError, match=r"timesteps: absorbing-prior settings, but --init .* is an autoregressive"):
        start({"timesteps": 8}, prior=ar)
    assert not p["out"].exists()


def test_prior_resume_after_init_is_exact(tmp_path):
    latents = make_latents(tmp_path / "latents.safetensors")
    init = save_imported_prior(tmp_path / "imported.safetensors", kind="autoregressive", vq=None)
    a, b = prior_paths(tmp_path / "a"), prior_paths(tmp_path / "b")
    ra = train_prior(latents, prior_train(max_steps=4, dropout=0.1), **a, init=init)
    assert ra.kind == "autoregressive"
    train_prior(latents, prior_train(max_steps=2, dropout=0.1), **b, init=init)
    rb = train_prior(latents, prior_train(max_steps=4), **b, resume=True)  # no --init, no dropout: recorded
    assert rb.steps == 4 and rb.init is None and rb.init_sha256 == file_sha256(init)
    assert records(a["log"]) == records(b["log"]) and records(a["log"], "val") == records(b["log"], "val")
    assert same(load_artifact(a["checkpoint"]).tensors, load_artifact(b["checkpoint"]).tensors)
    pa, pb = load_artifact(a["out"]), load_artifact(b["out"])
    assert same(pa.tensors, pb.tensors) and pb.parents["init"] == file_sha256(init)

    other = save_imported_prior(tmp_path / "other.safetensors", kind="autoregressive", seed=9)
    with pytest.raises(VqtoolError, match="is not the artifact the run"):
        train_prior(latents, prior_train(max_steps=5), **b, resume=True, init=other)
    with pytest.raises(VqtoolError, match=r"dropout = 0.2 conflicts with the checkpoint"):
        train_prior(latents, prior_train(max_steps=5, dropout=0.2), **b, resume=True)


def test_prior_cli_init(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    make_latents(run / "latents.safetensors")
    init = save_imported_prior(tmp_path / "imported.safetensors")
    common = ["train-prior", "--run", str(run), "--init", str(init), "--max-steps", "1", "--device", "cpu",
              "--threads", "1", "--set", "batch_size=8", "--set", "val_batches=1", "--set", "val_nll_samples=2"]
    res = CliRunner().invoke(app, [*common, "--layers", "3"])
    assert res.exit_code == 2 and "n_layer = 3 conflicts" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, common)
    assert res.exit_code == 0, res.output
    assert "absorbing" in res.output and file_sha256(init)[:12] in res.output
    assert read_metadata(run / "prior.safetensors").parents["init"] == file_sha256(init)
