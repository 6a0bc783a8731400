"""GPU behaviour tested on CPU: the precision policy, the device of a torchrun rank, per-device random
state, collectives only in explicit trainer calls, one read-back per step, backward outside autocast,
one inference precision for both priors, pinned batches, and the checkpoint of the last step written once.

CUDA is stood in for by monkeypatched torch.cuda functions and by a recording stand-in for
vqtool.precision.autocast. A few tests enter a real CPU bf16 autocast region around a model of a few
hundred parameters: the dtypes that flow through it are those a GPU run sees, at a cost of milliseconds
(vqtool itself never autocasts on a CPU).
"""

from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch
from test_train_prior import make_latents
from test_training import ToyTask
from typer.testing import CliRunner

import vqtool.precision as P
import vqtool.training as T
from vqtool import distributed as D
from vqtool.artifacts import load_artifact, read_metadata
from vqtool.cli import app
from vqtool.data.loader import ShardLoader
from vqtool.device import resolve_device
from vqtool.errors import VqtoolError
from vqtool.latents import load_latents
from vqtool.prior.sample import TransformerPredictor
from vqtool.prior.train import PriorTrainTask, TrainPriorConfig, train_prior
from vqtool.prior.transformer import Transformer, TransformerConfig
from vqtool.vq.model import VQConfig, VQModel
from vqtool.vq.train import TrainVQConfig, VQTrainer

CPU = torch.device("cpu")
GPU0, GPU1 = torch.device("cuda", 0), torch.device("cuda", 1)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fake_gpu(monkeypatch, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


class Region:
    """A stand-in for vqtool.precision.autocast: records the precisions asked for and whether code runs inside."""

    def __init__(self):
        self.depth = 0
        self.asked: list[str] = []

    def __call__(self, device, precision):
        self.asked.append(precision)
        return self._inside()

    @contextlib.contextmanager
    def _inside(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


def cpu_bf16():
    # The dtypes of a GPU's autocast region, on a tiny model (see the module docstring).
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# The policy


def test_auto_is_fp32_on_cpu_and_low_precision_is_refused_there():
    assert P.resolve_precision("auto", CPU) == "fp32"
    assert P.resolve_precision("fp32", CPU) == "fp32"
    for name in ("bf16", "fp16"):
        with pytest.raises(VqtoolError, match=f"--precision {name} is for CUDA devices; on cpu vqtool runs fp32"):
            P.resolve_precision(name, CPU)
    with pytest.raises(VqtoolError, match="--precision must be one of auto, fp32, bf16, fp16"):
        P.resolve_precision("half", CPU)


def test_auto_on_cuda_is_bf16_where_supported_else_fp16(monkeypatch):
    fake_gpu(monkeypatch, bf16=True)
    assert [P.resolve_precision(n, GPU0) for n in ("auto", "fp32", "bf16", "fp16")] == ["bf16", "fp32", "bf16",
                                                                                       "fp16"]
    fake_gpu(monkeypatch, bf16=False)
    assert P.resolve_precision("auto", GPU0) == "fp16"
    with pytest.raises(VqtoolError, match="this GPU has no bf16 support; use --precision fp16"):
        P.resolve_precision("bf16", GPU0)


def test_autocast_scaler_and_dtypes(monkeypatch):
    assert isinstance(P.autocast(CPU, "fp32"), contextlib.nullcontext)
    with pytest.raises(VqtoolError, match="mixed precision is CUDA only"):
        P.autocast(CPU, "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the region is only built, never entered
        region = P.autocast(GPU0, "fp16")
    assert isinstance(region, torch.autocast) and region.fast_dtype == torch.float16 and region.device == "cuda"
    fake_gpu(monkeypatch)  # GradScaler disables itself without CUDA
    assert [P.grad_scaler(p).is_enabled() for p in ("fp32", "bf16", "fp16")] == [False, False, True]
    assert P.active_dtype(CPU, torch.float32) == torch.float32
    with cpu_bf16():
        assert P.active_dtype(CPU, torch.float32) == torch.bfloat16
        with P.full_precision(CPU):
            assert P.active_dtype(CPU, torch.float32) == torch.float32


def test_switch_note():
    assert P.switch_note(None, "bf16") is None and P.switch_note("bf16", "bf16") is None
    assert P.switch_note("bf16", "fp32") == "precision switches from bf16 (the checkpoint's) to fp32"
    assert P.switch_note("fp32", "fp16").endswith("; the fp16 loss scale starts afresh")


# --------------------------------------------------------------------------------------------------
# The device of a rank


def test_a_rank_uses_its_local_rank_gpu_and_refuses_another(monkeypatch):
    fake_gpu(monkeypatch)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda:1") == GPU1 and resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == GPU1 and resolve_device("auto") == GPU1 and resolve_device("cuda:1") == GPU1
    assert resolve_device("cpu") == CPU
    with pytest.raises(VqtoolError, match="this process is local rank 1, which trains on cuda:1; pass --device cuda"):
        resolve_device("cuda:0")
    with pytest.raises(VqtoolError, match="expected cuda or cuda:N"):
        resolve_device("cuda:x")


# --------------------------------------------------------------------------------------------------
# Random state: the rank's own device only


def test_a_cpu_run_never_touches_cuda_random_state(tmp_path, monkeypatch):
    ckpt, log = tmp_path / "ck.safetensors", tmp_path / "log.jsonl"
    T.run_loop(ToyTask(), T.LoopSettings(max_steps=2, checkpoint_every=2), ckpt, log)
    task, restored = ToyTask(), ToyTask()

    def refusal(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"torch.cuda.{name} was called on a CPU run")
        return refuse

    # As on a GPU machine told --device cpu: saving and restoring the random state leave CUDA alone.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all", "init",
                 "device_count", "current_device"):
        monkeypatch.setattr(torch.cuda, name, refusal(name))
    T.save_checkpoint(task, ckpt)
    assert T.load_checkpoint(restored, ckpt) == 1
    art = load_artifact(ckpt, "vq-checkpoint")
    assert not any("cuda" in name for name in art.tensors)


def test_a_gpu_rank_saves_and_restores_its_own_generator_only(tmp_path, monkeypatch):
    states = {0: torch.full((8,), 10, dtype=torch.uint8), 1: torch.full((8,), 11, dtype=torch.uint8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[torch.device(device).index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.clone(), device)))
    for name in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: pytest.fail("every GPU's generator was touched"))

    task = ToyTask()
    task.device = GPU1
    ckpt, log = tmp_path / "ck.safetensors", tmp_path / "log.jsonl"
    T.run_loop(task, T.LoopSettings(max_steps=2, checkpoint_every=2), ckpt, log)
    saved = [v for k, v in load_artifact(ckpt, "vq-checkpoint").tensors.items() if "cuda" in k]
    assert len(saved) == 2 and all(torch.equal(v, states[1]) for v in saved)  # "rng" and ranks[0]["rng"]

    again = ToyTask()
    again.device = GPU1
    T.run_loop(again, T.LoopSettings(max_steps=3, checkpoint_every=2), ckpt, log, resume=True)
    assert len(restored) == 1 and torch.equal(restored[0][0], states[1]) and restored[0][1] == GPU1

    # An older checkpoint holds every visible GPU's state: rank on cuda:1 takes entry 1.
    restored.clear()
    old = T._global_rng_state(CPU)
    old["cuda"] = [states[0], states[1]]
    T._set_global_rng_state(old, GPU1)
    assert torch.equal(restored[0][0], states[1])


# --------------------------------------------------------------------------------------------------
# The checkpoint of the last step


def test_the_last_checkpoint_is_written_once(tmp_path, monkeypatch):
    steps = []
    save = T.save_checkpoint
    monkeypatch.setattr(T, "save_checkpoint", lambda task, path, ranks=None: (steps.append(task.step),
                                                                             save(task, path, ranks)))
    ckpt, log = tmp_path / "ck.safetensors", tmp_path / "log.jsonl"
    T.run_loop(ToyTask(), T.LoopSettings(max_steps=6, eval_every=3, checkpoint_every=3), ckpt, log)
    assert steps == [3, 6]
    assert read_metadata(ckpt).extra["step"] == 6
    # A final evaluation after the loop's save changes the state (a task's best score): saved again.
    steps.clear()
    T.run_loop(ToyTask(), T.LoopSettings(max_steps=6, eval_every=4, checkpoint_every=3), ckpt, log, overwrite=True)
    assert steps == [3, 6, 6]
    # Not a multiple: saved once at the end.
    steps.clear()
    T.run_loop(ToyTask(), T.LoopSettings(max_steps=5, eval_every=5, checkpoint_every=3), ckpt, log, overwrite=True)
    assert steps == [3, 5]


# --------------------------------------------------------------------------------------------------
# Collectives only in explicit trainer calls


def tiny_vq(**kw) -> VQConfig:
    base = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=8, codebook_size=16,
                code_dim=4, kmeans_init=False, restart_threshold=0.5, usage_decay=0.5)
    return VQConfig(**{**base, **kw})


def test_a_training_forward_runs_no_collective(monkeypatch):
    # As if in a process group: any collective would fail here (and hang a rank that ran it alone).
    monkeypatch.setattr(D, "active", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: pytest.fail("collective in forward"))
    model = VQModel(tiny_vq(resolution=16)).train()
    before = model.quantizer.usage.clone()
    out = model(torch.randn(2, 3, 16, 16))
    assert out.recon.shape == (2, 3, 16, 16)
    assert torch.equal(model.quantizer.usage, before)  # the trainer updates it, explicitly


def vq_trainer(tiny_shards, tmp_path, precision: str = "fp32", **kw) -> VQTrainer:
    base = dict(batch_size=2, perceptual="none", disc_start=1, disc_layers=2, disc_ch=8, shuffle_buffer=8,
                diffaug=[], eval_images=4, grid_images=2, ema_decay=0.9)
    return VQTrainer(tiny_vq(), TrainVQConfig(**{**base, **kw}), tiny_shards, tmp_path / "vq.safetensors",
                     tmp_path / "figures", precision=precision)


def test_vq_step_sums_code_counts_in_one_collective(tiny_shards, tmp_path, monkeypatch):
    import vqtool.vq.train as V

    calls = []
    monkeypatch.setattr(V, "all_reduce_sum", lambda t: (calls.append(tuple(t.shape)), t)[1])
    trainer = vq_trainer(tiny_shards, tmp_path, grad_accum=3)
    before = trainer.model.quantizer.usage.clone()
    trainer.train_step()
    assert calls == [(3, 16)]  # one (micro-batches × codes) tensor for the whole step
    assert not torch.equal(trainer.model.quantizer.usage, before)


# --------------------------------------------------------------------------------------------------
# Backward outside autocast, in both trainers


def _record_backward(params, region: Region) -> list[int]:
    depths: list[int] = []
    for p in params:
        p.register_hook(lambda grad: depths.append(region.depth))
    return depths


def test_vq_trainer_runs_backward_outside_autocast(tiny_shards, tmp_path, monkeypatch):
    import vqtool.vq.train as V

    region = Region()
    monkeypatch.setattr(V, "autocast", region)
    trainer = vq_trainer(tiny_shards, tmp_path, precision="bf16")
    depths = _record_backward([trainer.model.last_layer, next(trainer.disc.parameters())], region)
    metrics = trainer.train_step()
    assert "d_loss" in metrics and "g_loss" in metrics  # the discriminator step ran too
    assert depths and set(depths) == {0}
    assert region.asked and set(region.asked) == {"bf16"}


def prior_task(tmp_path, precision: str = "fp32", **kw) -> PriorTrainTask:
    path = make_latents(tmp_path / "latents.safetensors")
    base = dict(n_layer=1, n_head=2, n_embd=16, batch_size=4, timesteps=16, lr=3e-3, warmup_steps=0,
                device="cpu", max_steps=4, val_batches=1, val_nll_samples=2)
    cfg = TrainPriorConfig(**{**base, **kw})
    return PriorTrainTask(cfg, load_latents(path), "0" * 64, tmp_path / "prior.safetensors", CPU,
                          precision=precision)


@pytest.mark.parametrize("kind", ["absorbing", "autoregressive"])
def test_prior_trainer_runs_backward_outside_autocast(tmp_path, monkeypatch, kind):
    import vqtool.prior.train as PT

    region = Region()
    monkeypatch.setattr(PT, "autocast", region)
    task = prior_task(tmp_path, precision="bf16", prior=kind, grad_accum=2)
    depths = _record_backward([task.model.tok_emb.weight], region)
    task.train_step()
    assert depths == [0, 0]  # both micro-batches' backward, outside the region
    assert region.asked == ["bf16", "bf16"]


# --------------------------------------------------------------------------------------------------
# The prior trainer: one collective and one read-back per step, the agreed NaN stop kept


class NanAt:
    """The objective, with the loss of one micro-batch call made NaN."""

    def __init__(self, objective, call: int):
        self.objective, self.call, self.calls = objective, call, 0

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def loss(self, *args, **kwargs):
        self.calls += 1
        loss, metrics = self.objective.loss(*args, **kwargs)
        return (loss * float("nan"), metrics) if self.calls == self.call else (loss, metrics)


def test_prior_step_reduces_once_and_stops_on_nan_before_the_optimizer(tmp_path, monkeypatch):
    import vqtool.prior.train as PT

    reduced = []
    monkeypatch.setattr(PT, "all_reduce_mean", lambda t: (reduced.append(tuple(t.shape)), t)[1])
    task = prior_task(tmp_path, grad_accum=3)
    out = task.train_step()
    assert reduced == [(2,)]  # loss and bpt of the step, once, for three micro-batches
    assert all(isinstance(v, float) for v in out.values()) and set(out) >= {"loss", "bpt", "lr", "grad_norm"}

    task.objective = NanAt(task.objective, call=2)  # the second micro-batch of the next step
    depths = _record_backward([task.model.tok_emb.weight], Region())
    weights = {k: v.clone() for k, v in task.model.state_dict().items()}
    out = task.train_step()
    assert out["loss"] != out["loss"]  # NaN, for the loop to stop on
    assert len(depths) == 3  # every micro-batch ran its backward: no rank is left waiting in DDP's all-reduce
    assert all(torch.equal(v, task.model.state_dict()[k]) for k, v in weights.items())  # no optimizer step


def test_a_nan_stops_the_prior_run_without_saving(tmp_path, monkeypatch):
    import vqtool.prior.train as PT

    made = PT.make_objective
    built = []
    monkeypatch.setattr(PT, "make_objective", lambda kind, s: built.append(NanAt(made(kind, s), call=3)) or built[-1])
    latents = make_latents(tmp_path / "latents.safetensors")
    cfg = TrainPriorConfig(n_layer=1, n_head=2, n_embd=16, batch_size=4, timesteps=16, warmup_steps=0,
                           device="cpu", max_steps=4, checkpoint_every=10, val_batches=1, val_nll_samples=2)
    with pytest.raises(VqtoolError, match="loss became nan at step 3; stopped without saving"):
        train_prior(latents, cfg, tmp_path / "prior.safetensors", tmp_path / "ck.safetensors", tmp_path / "l.jsonl")
    assert not (tmp_path / "ck.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# Precision in checkpoints and artifacts; a resume in another precision


def test_prior_records_its_precision_and_a_resume_switches_with_a_note(tmp_path, monkeypatch, capsys):
    import vqtool.prior.train as PT

    latents = make_latents(tmp_path / "latents.safetensors")
    cfg = dict(n_layer=1, n_head=2, n_embd=16, batch_size=4, timesteps=16, warmup_steps=0, device="cpu",
               checkpoint_every=2, eval_every=2, val_batches=1, val_nll_samples=2)
    files = (tmp_path / "prior.safetensors", tmp_path / "ck.safetensors", tmp_path / "log.jsonl")
    with monkeypatch.context() as m:  # a "GPU" run in bf16: a real bf16 region, on CPU (module docstring)
        m.setattr(PT, "resolve_precision", lambda name, device: "bf16")
        m.setattr(PT, "autocast", lambda device, precision: cpu_bf16())
        r = train_prior(latents, TrainPriorConfig(**cfg, max_steps=2), *files)
    assert r.precision == "bf16"
    assert read_metadata(files[1]).extra["precision"] == "bf16"
    prior = load_artifact(files[0], "prior-model")
    assert prior.extra["precision"] == "bf16"
    assert {t.dtype for t in prior.tensors.values() if t.dtype.is_floating_point} == {torch.float32}
    capsys.readouterr()

    r = train_prior(latents, TrainPriorConfig(**cfg, max_steps=3), *files, resume=True)
    assert r.precision == "fp32" and r.steps == 3
    assert "precision switches from bf16 (the checkpoint's) to fp32" in capsys.readouterr().err
    assert read_metadata(files[1]).extra["precision"] == "fp32"


# --------------------------------------------------------------------------------------------------
# Inference: one rule for both priors


def tiny_prior(causal: bool) -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=16, grid=(4, 4), n_layer=1, n_head=2, n_embd=16, causal=causal)
    return Transformer(cfg).eval()


def _matmul_dtypes(model: Transformer) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    model.blocks[0].mlp[0].register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


def test_both_priors_run_in_the_callers_precision_and_sample_fp32_logits(monkeypatch):
    from vqtool.prior.autoregressive import sample_autoregressive
    from vqtool.prior.logits import Draw

    sampled = []
    draw_ids = Draw.ids
    monkeypatch.setattr(Draw, "ids",
                        lambda self, logits, *a: (sampled.append(logits.dtype), draw_ids(self, logits, *a))[1])
    ar = tiny_prior(causal=True)
    caches = []
    new_cache = ar.new_cache
    monkeypatch.setattr(ar, "new_cache", lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1])
    ar_seen = _matmul_dtypes(ar)
    absorbing = tiny_prior(causal=False)
    ab_seen = _matmul_dtypes(absorbing)
    predict = TransformerPredictor(absorbing)
    tokens = torch.full((2, 16), absorbing.cfg.mask_id)
    positions = torch.tensor([[0, 5], [3, 7]])

    for region, want in ((contextlib.nullcontext(), torch.float32), (cpu_bf16(), torch.bfloat16)):
        sampled.clear(), caches.clear(), ar_seen.clear(), ab_seen.clear()
        with region, torch.inference_mode():
            grids = sample_autoregressive(ar, 2, None, Draw(), None, torch.Generator().manual_seed(0))
            logits = predict(tokens, positions)
        assert grids.shape == (2, 4, 4)
        assert set(ar_seen) == set(ab_seen) == {want}  # the same rule for both priors
        # The cache holds what attention computes.
        assert caches and all(k.dtype == want for c in caches for k in c.k + c.v)
        assert set(sampled) == {torch.float32} and logits.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Data loading for a GPU


def test_pinned_batches_equal_the_plain_ones(tiny_shards, monkeypatch):
    pinned = []

    def pin(self):  # Tensor.pin_memory needs CUDA: record the call, keep the tensor
        pinned.append(self.shape)
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    for workers in (0, 1):
        plain = ShardLoader(tiny_shards, "val", batch_size=5, infinite=False, num_workers=workers)
        fast = ShardLoader(tiny_shards, "val", batch_size=5, infinite=False, num_workers=workers, pin_memory=True)
        pinned.clear()
        got, want = list(fast), list(plain)
        assert len(got) == len(want) == 3
        for (x, y), (a, b) in zip(got, want, strict=True):
            assert torch.equal(x, a) and torch.equal(y, b)
        assert pinned == [s for x, y in want for s in (x.shape, y.shape)]  # images and labels, every batch


# --------------------------------------------------------------------------------------------------
# The command line


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", [["train-vq", "--max-steps", "1"], ["train-prior", "--max-steps", "1"],
                                     ["encode"], ["sample"], ["eval", "--metrics", "recon"]])
def test_low_precision_on_cpu_is_one_line(tmp_path, command):
    r = invoke(*command, "--run", tmp_path / "run", "--device", "cpu", "--precision", "fp16")
    assert r.exit_code == 2, r.output
    assert "--precision fp16 is for CUDA devices" in r.output and "Traceback" not in r.output


def test_help_offers_precision_on_every_model_stage():
    for command in ("train-vq", "train-prior", "encode", "reconstruct", "decode", "sample", "inpaint", "eval",
                    "neighbours", "quickstart", "run"):
        assert "--precision" in invoke(command, "--help").output, command


def test_a_ledger_from_before_precision_keeps_train_vq_up_to_date(tmp_path):
    from vqtool.pipeline.ledger import Ledger

    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps({"format_version": 1, "stages": {
        "train-vq": {"settings": {"train_vq": {"amp": True, "lr": 1e-4}, "seed": 0}}}}))
    assert Ledger(path).get("train-vq")["settings"] == {"train_vq": {"lr": 1e-4}, "seed": 0}


@needs_cuda
def test_cuda_autocast_region_computes_in_the_resolved_dtype():
    precision = P.resolve_precision("auto", GPU0)
    x = torch.randn(8, 8, device=GPU0)
    with P.autocast(GPU0, precision):
        assert (x @ x).dtype == P.dtype(precision)
        with P.full_precision(GPU0):
            assert (x @ x).dtype == torch.float32
