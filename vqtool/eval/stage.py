"""The `eval` and `neighbours` stages: the functions the CLI calls, usable from Python and tests.

`evaluate` scores generated images against real ones (FID, KID, PRDC on one feature pass), the VQ's
reconstructions (`recon`) and the prior's likelihood (`nll`), then writes eval/<name>.json and an
`eval-report` artifact. `neighbour_check` finds each sample's nearest training images by LPIPS, draws
them, and judges memorisation against held-out images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqtool.artifacts import file_sha256
from vqtool.config import to_dict
from vqtool.console import console, duration, with_forecast
from vqtool.console import progress as rich_progress
from vqtool.device import resolve_device
from vqtool.errors import VqtoolError
from vqtool.eval import features as feats
from vqtool.eval import metrics as M
from vqtool.eval.report import markdown_table, write_report
from vqtool.eval.sources import ImageSource, prior_source, resolve_path_source, shards_source
from vqtool.outputs import check_writable, removed_on_failure
from vqtool.precision import autocast, resolve_precision
from vqtool.runs import RunPaths

METRICS = ("fid", "kid", "prdc", "recon", "nll")
GENERATIVE = ("fid", "kid", "prdc")


@dataclass
class EvalSettings:
    metrics: list[str] = field(default_factory=lambda: ["fid", "kid", "prdc"])
    n: int = 10000  # generated images scored, exactly
    n_real: int | None = None  # real images (default: n)
    real: str = "train"  # train | val (the run's shards) | PATH (shards folder or image folder)
    real_split: str = "train"  # split used when --real is a shards folder
    fake: str | None = None  # None: sample the run's prior; or a samples artifact, shards folder, image folder
    fake_split: str = "train"
    features: str = feats.DEFAULT_EXTRACTOR
    feature_weights: str | None = None
    feature_layer: str | None = None  # default: the extractor's standard layer (Inception: "2048")
    download: bool = True  # fetch missing weights when online
    compile: bool = False  # torch.compile the extractor (minutes of compilation, then faster)
    nearest_k: int = 5
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    batch_size: int = 50
    recon_n: int | None = None  # val images for recon (default: min(n, val size))
    nll_n: int | None = None  # images per split for nll (default: min(n, split size))
    nll_samples: int | str = 16  # absorbing ELBO: K stratified t draws per image, or "all" (every t once)
    split_name: str | None = None  # nll: score all of --latents' splits together under this name (e.g. test)
    lpips_net: str = "alex"
    lpips_weights: str | None = None
    cache: bool = True  # keep real-set features in a `features` artifact
    cache_dir: str | None = None  # default: the run's eval/ folder
    name: str = "report"  # outputs eval/<name>.json and eval/<name>.safetensors
    vq: str | None = None  # explicit artifact paths override the run's standard names
    prior: str | None = None
    latents: str | None = None
    shards: str | None = None

    def validate(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise VqtoolError(f"--metrics {','.join(self.metrics)}: choose from {','.join(METRICS)}")
        for opt, value in (("--n", self.n), ("--n-real", self.n_real), ("--recon-n", self.recon_n),
                           ("--nll-n", self.nll_n), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise VqtoolError(f"{opt} {value}: must be at least 1")
        if self.nll_samples != "all" and not (isinstance(self.nll_samples, int) and self.nll_samples >= 1):
            raise VqtoolError(f"--nll-samples {self.nll_samples}: give a number of t draws (1 or more) or all")
        if self.split_name is not None and not self.split_name.replace("-", "_").isidentifier():
            raise VqtoolError(f"--split-name {self.split_name!r}: use letters, digits, - and _ (e.g. test)")
        if self.nearest_k < 1:
            raise VqtoolError(f"--nearest-k {self.nearest_k}: must be at least 1")
        if self.real_split not in ("train", "val") or self.fake_split not in ("train", "val"):
            raise VqtoolError("--real-split/--fake-split: choose train or val")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise VqtoolError(f"--name {self.name!r}: must be a plain file name")


@dataclass
class EvalResult:
    metrics: dict[str, float | None]
    report: dict[str, Any]
    json_path: Path
    artifact_path: Path
    markdown: str
    seconds: float
    precision: str = "fp32"  # what the VQ and the prior ran in (feature extractors always run fp32)


class _Bars:
    """Rich progress bars, or nothing when progress is off (tests, scripts)."""

    def __init__(self, enabled: bool):
        self.progress = rich_progress() if enabled else None

    def __enter__(self) -> _Bars:
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def counter(self, description: str, total: int | None) -> Callable[[int], None] | None:
        """advance(k) for a bar of `total` items."""
        if self.progress is None:
            return None
        task = self.progress.add_task(description, total=total, status="")
        return lambda k: self.progress.advance(task, k)

    def fraction(self, description: str) -> Callable[[int, int], None] | None:
        """update(done, total) for work that reports its own totals."""
        if self.progress is None:
            return None
        tasks: list = []

        def update(done: int, total: int) -> None:
            if not tasks:  # the bar appears when the work starts, not when the source is set up
                tasks.append(self.progress.add_task(description, total=total, status=""))
            self.progress.update(tasks[0], completed=done, total=total)

        return update


def _outputs(folder: Path, name: str, overwrite: bool) -> tuple[Path, Path]:
    json_path, artifact_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    for path in (json_path, artifact_path):
        if path.exists() and not overwrite:
            raise VqtoolError(f"{path} exists; pass --overwrite to replace it, or --name to write another report")
    return json_path, artifact_path


class _Input:
    """An input path of the stage: the settings' `key` when given, else the run's standard file of that name."""

    def __init__(self, key: str):
        self.key = key

    def __get__(self, stage, owner=None) -> Path:
        given = getattr(stage.s, self.key)
        return Path(given) if given else getattr(stage.paths, self.key)


@dataclass
class _Eval:
    """What the parts of one evaluation share: inputs, device, bars, and the report being filled in."""

    s: EvalSettings
    paths: RunPaths
    device: torch.device
    seed: int
    bars: _Bars
    cache_dir: Path | None
    extractor: feats.Extractor | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    parents: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _vq: Any = None

    shards = _Input("shards")
    vq_path = _Input("vq")
    prior_path = _Input("prior")
    latents_path = _Input("latents")

    def vq(self):
        if self._vq is None:
            from vqtool.vq.store import load_vq

            self.set_vq(load_vq(self.vq_path, self.device))
        return self._vq

    def set_vq(self, vq) -> None:
        self._vq = vq
        self.parents["vq"] = vq.sha256

    def extract(self, source: ImageSource, n: int, label: str) -> torch.Tensor:
        advance = self.bars.counter(f"features: {label}", n)
        return feats.extract_features(self.extractor, source.batches(n, self.s.batch_size), advance)


def evaluate(
    run: str | Path,
    settings: EvalSettings | None = None,
    sample=None,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = True,
    precision: str = "auto",
) -> EvalResult:
    """The `eval` stage. `sample` (a SampleSettings) is used when fake images are sampled on the fly.

    The VQ and the prior run in `precision` (vqtool.precision); feature extractors and LPIPS in fp32."""
    t0, c0 = time.perf_counter(), time.process_time()
    s = settings or EvalSettings()
    s.validate()
    paths = RunPaths.of(run)
    dev = resolve_device(device)
    chosen = resolve_precision(precision, dev)
    json_path, artifact_path = _outputs(paths.eval, s.name, overwrite)
    created = check_writable(json_path)  # before any sampling or feature extraction
    cache_dir = (Path(s.cache_dir) if s.cache_dir else paths.eval) if s.cache else None

    with removed_on_failure(created), _Bars(show_progress) as bars, autocast(dev, chosen):
        ev = _Eval(s=s, paths=paths, device=dev, seed=seed, bars=bars, cache_dir=cache_dir)
        wants = set(s.metrics)
        if wants & {*GENERATIVE, "recon"}:
            # Weights first: a missing file should stop the run before any sampling.
            try:
                ev.extractor = feats.load_extractor(s.features, s.feature_weights, dev, s.download,
                                                    s.feature_layer, s.compile)
            except VqtoolError as exc:
                if wants & set(GENERATIVE) or s.feature_weights is not None:
                    raise
                # recon alone: PSNR, L1 and codebook usage need no weights; only recon_fid is skipped.
                ev.body["recon_fid_note"] = f"recon FID skipped: {exc}"
            if ev.extractor is not None:
                ev.body["features"] = {**ev.extractor.key, "weights_path": str(ev.extractor.weights_path)}
        if wants & set(GENERATIVE):
            _generative(ev, sample)
        if "recon" in wants:
            _recon(ev)
        if "nll" in wants:
            _nll(ev)

    seconds = time.perf_counter() - t0
    ev.body["seconds"] = round(seconds, 3)
    ev.body["cpu_seconds"] = round(time.process_time() - c0, 3)  # all threads; wall time depends on the load
    settings_dict = {**to_dict(s), "device": dev.type, "precision": chosen, "seed": seed,
                     "sample": to_dict(sample) if sample is not None and s.fake is None else None}
    report = write_report(json_path, artifact_path, ev.metrics, ev.body, settings_dict, ev.parents, ev.tensors)
    return EvalResult(metrics=ev.metrics, report=report, json_path=json_path, artifact_path=artifact_path,
                      markdown=markdown_table(ev.metrics), seconds=seconds, precision=chosen)


def _sampling_forecast(run: Path, n: int) -> Callable[[float], None]:
    def tell(seconds: float) -> None:
        console.print(f"[yellow]eval:[/yellow] sampling {n:,} images from the prior will take about "
                      f"{duration(seconds)} at the rate measured so far. To score several metrics or settings, "
                      f"sample once (vqtool sample --run {run} --n {n}) and pass --fake {run}/samples.",
                      soft_wrap=True)
    return tell


def _generative(ev: _Eval, sample) -> None:
    s = ev.s
    n_real = s.n_real or s.n
    real = (shards_source(ev.shards, s.real, option="--real") if s.real in ("train", "val")
            else resolve_path_source(s.real, "--real", s.real_split))
    if s.fake is None:
        from vqtool.prior.sample import SampleSettings, load_pair, make_sampler

        prior, vq = load_pair(ev.prior_path, ev.vq_path, ev.device)
        ev.set_vq(vq)
        sampler = make_sampler(sample or SampleSettings(), prior)
        fake = prior_source(prior, vq, sampler, ev.device,
                            with_forecast(ev.bars.fraction("sampling"), _sampling_forecast(ev.paths.root, s.n)))
    else:
        fake = resolve_path_source(s.fake, "--fake", s.fake_split, real.image_size, ev.vq, ev.device)
    # Both counts are checked before any expensive work starts.
    real.check(n_real)
    fake.check(s.n)
    ev.parents.update({f"real_{k}": v for k, v in real.parents.items()})
    ev.parents.update({f"fake_{k}": v for k, v in fake.parents.items()})

    key = real.key() if ev.cache_dir is not None else ""
    real_feats, cache_file, hit = feats.cached_features(
        ev.cache_dir, key, n_real, ev.extractor, lambda: ev.extract(real, n_real, "real"), parents=real.parents)
    if cache_file is not None:
        ev.parents["real_features"] = file_sha256(cache_file)
    fake_feats = ev.extract(fake, s.n, "fake")
    ev.body["real"] = {**real.describe, "n": n_real, "features_cache": str(cache_file) if cache_file else None,
                       "cache_hit": hit}
    ev.body["fake"] = {**fake.describe, "n": s.n}

    if "fid" in s.metrics:
        ev.metrics["fid"] = M.fid(real_feats, fake_feats)
    if "kid" in s.metrics:
        ev.metrics["kid_mean"], ev.metrics["kid_std"] = M.kid(real_feats, fake_feats, s.kid_subsets,
                                                              s.kid_subset_size, ev.seed)
        ev.body["kid"] = {"subsets": s.kid_subsets,
                          "subset_size": M.kid_subset_size(n_real, s.n, s.kid_subset_size)}
    if "prdc" in s.metrics:
        ev.metrics.update(M.prdc(real_feats, fake_feats, s.nearest_k))
        ev.body["prdc"] = {"nearest_k": s.nearest_k}


def _recon(ev: _Eval) -> None:
    from vqtool.eval.perceptual import load_lpips
    from vqtool.eval.recon import reconstruction_metrics

    s = ev.s
    val = shards_source(ev.shards, "val", option="recon: the run's shards")
    if not val.available:
        raise VqtoolError(f"{ev.shards}: the val split is empty, so recon has nothing to reconstruct; "
                          f"prepare with --val-fraction > 0")
    n = min(s.recon_n or s.n, val.available)
    ev.parents["dataset"] = val.parents["dataset"]
    vq = ev.vq()
    lpips_model, lpips_note = None, None
    try:
        lpips_model = load_lpips(s.lpips_net, s.lpips_weights, ev.device, s.download)
    except VqtoolError as exc:
        if s.lpips_weights is not None:
            raise
        lpips_note = f"LPIPS skipped: {exc}"  # recon LPIPS is reported only when its weights exist
    key = val.key()
    has_features = ev.extractor is not None
    cached = feats.load_cached(ev.cache_dir, key, n, ev.extractor) if has_features else None
    result = reconstruction_metrics(vq, val.batches(n, s.batch_size), ev.device, ev.extractor,
                                    need_original_features=cached is None, lpips_model=lpips_model,
                                    on_batch=ev.bars.counter("reconstruct", n))
    originals = cached if cached is not None else result.original_features
    if has_features and cached is None and ev.cache_dir is not None:
        feats.store_cached(ev.cache_dir, key, n, ev.extractor, originals, val.parents)
    fid_note = ev.body.pop("recon_fid_note", None)
    lpips_note = "; ".join(note for note in (lpips_note, fid_note) if note) or None
    ev.metrics.update({
        "recon_psnr": result.psnr, "recon_l1": result.l1, "recon_lpips": result.lpips,
        "recon_fid": M.fid(originals, result.recon_features) if has_features else None,
        "codebook_usage": result.codebook_usage, "codebook_perplexity": result.codebook_perplexity,
    })
    ev.body["recon"] = {"n": n, "split": "val", "codes_used": result.codes_used,
                        "codebook_size": vq.model.codebook_size,
                        "lpips_net": s.lpips_net if lpips_model is not None else None, "note": lpips_note,
                        "original_features_cached": cached is not None}


def _nll(ev: _Eval) -> None:
    from vqtool.eval.nll import likelihood
    from vqtool.latents import load_latents
    from vqtool.prior.store import load_prior

    if not ev.prior_path.exists():
        raise VqtoolError(f"{ev.prior_path}: no prior here; run `vqtool train-prior` first (or pass --prior)")
    if not ev.latents_path.exists():
        raise VqtoolError(f"{ev.latents_path}: no latents here; run `vqtool encode` first (or pass --latents)")
    prior = load_prior(ev.prior_path, ev.device)
    latents = load_latents(ev.latents_path)
    role = check_latents_for_prior(prior.artifact, latents.artifact, ev.latents_path)
    ev.parents["prior"] = prior.artifact.sha256
    ev.parents["latents"] = latents.artifact.sha256
    K = prior.objective.get("T") if ev.s.nll_samples == "all" else ev.s.nll_samples
    result = likelihood(prior, latents, ev.s.nll_n or ev.s.n, ev.s.batch_size, ev.seed,
                        lambda split: ev.bars.fraction(f"nll: {split}"), K, split_name=ev.s.split_name)
    ev.metrics.update(result.metrics())
    ev.body["nll"] = {"bound": result.bound, "prior": prior.kind, "latents": str(ev.latents_path),
                      "latents_role": role, "t_draws_per_image": result.t_draws,
                      "exact_sum_over_t": bool(result.t_draws and result.t_draws == prior.objective.get("T")),
                      "n": {k: int(v.numel()) for k, v in result.per_image.items()},
                      "splits": result.describe(),
                      "tokens_per_image": result.tokens_per_image, "dims_per_image": result.dims_per_image}
    ev.tensors.update({f"nll.{k}": v for k, v in result.per_image.items()})


def check_latents_for_prior(prior, latents, latents_path: Path) -> str:
    """Whether the likelihood of `latents` under `prior` means something: "training" for the latents the
    prior was trained on, "held-out" for other latents encoded by the same VQ (a test set, say). Latents
    of another VQ, or whose VQ cannot be told, are refused: their token ids mean other codes."""
    if prior.parents.get("latents") in (None, latents.sha256):
        return "training"
    prior_vq, latents_vq = prior.parents.get("vq"), latents.parents.get("vq")
    if prior_vq is None or latents_vq is None:
        which = prior.path if prior_vq is None else latents_path
        raise VqtoolError(f"{latents_path} are not the latents {prior.path} was trained on, and {which} does not "
                          "record its VQ, so they cannot be checked to share its codebook")
    if prior_vq != latents_vq:
        raise VqtoolError(f"{latents_path} were encoded by another VQ (sha256 {latents_vq[:12]}…) than the one "
                          f"{prior.path} was trained on ({prior_vq[:12]}…); encode them with that VQ")
    return "held-out"


# --------------------------------------------------------------------------------------------------
# neighbours


@dataclass
class NeighbourSettings:
    n: int = 16  # samples checked
    k: int = 8  # neighbours shown per sample
    net: str = "alex"  # LPIPS backbone: alex | vgg | squeeze
    lpips_weights: str | None = None
    download: bool = True
    candidates: int = 64  # pre-selected per image by thumbnail distance, then re-ranked by LPIPS
    thumb_size: int = 8  # side of the thumbnails used for pre-selection
    n_val: int = 200  # held-out images whose nearest distances calibrate the verdict
    percentile: float = 5.0
    alpha: float = 0.01  # significance of the binomial test
    batch_size: int = 256
    fake: str | None = None  # samples: default the run's samples artifact, else sampled from the prior
    train: str | None = None  # default: the run's train split; or a shards folder / image folder
    val: str | None = None  # default: the run's val split; or a shards folder (val split) / image folder
    name: str = "neighbours"  # outputs eval/<name>.png, .json, .safetensors
    vq: str | None = None
    prior: str | None = None
    shards: str | None = None

    def validate(self) -> None:
        for opt, value in (("--n", self.n), ("--k", self.k), ("--candidates", self.candidates),
                           ("--thumb-size", self.thumb_size), ("--batch-size", self.batch_size)):
            if value < 1:
                raise VqtoolError(f"{opt} {value}: must be at least 1")
        if self.candidates < self.k:
            raise VqtoolError(f"--candidates {self.candidates}: must be at least --k {self.k}")
        if self.n_val < 0:
            raise VqtoolError(f"--n-val {self.n_val}: must be 0 or more")
        if not 0 < self.percentile < 100:
            raise VqtoolError(f"--percentile {self.percentile}: must lie between 0 and 100")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise VqtoolError(f"--name {self.name!r}: must be a plain file name")


@dataclass
class NeighbourResult:
    distances: torch.Tensor  # (n, k) LPIPS of each sample's neighbours, ascending
    indices: torch.Tensor  # (n, k) positions of the neighbours in the training split
    val_nearest: torch.Tensor | None  # (n_val,) nearest distance of each val image
    verdict: Any  # vqtool.eval.neighbours.Verdict, or None without val images
    metrics: dict[str, float | None]
    report: dict[str, Any]
    grid_path: Path
    json_path: Path
    artifact_path: Path
    seconds: float
    precision: str = "fp32"  # what the VQ and the prior ran in (LPIPS always runs fp32)


def _fit_size(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Samples drawn at another size (e.g. larger-than-training grids) are resized to the training size."""
    if size is None or images.shape[-1] == size and images.shape[-2] == size:
        return images
    import torch.nn.functional as F

    return F.interpolate(images.float(), size=(size, size), mode="area" if images.shape[-1] > size else "bilinear")


def neighbour_check(
    run: str | Path,
    settings: NeighbourSettings | None = None,
    sample=None,
    device: str = "auto",
    overwrite: bool = False,
    show_progress: bool = True,
    precision: str = "auto",
) -> NeighbourResult:
    """The `neighbours` stage: nearest training images of n samples by LPIPS, and the memorisation verdict.

    Sampling and decoding run in `precision` (vqtool.precision), LPIPS in fp32."""
    from vqtool.artifacts import atomic_write_bytes
    from vqtool.eval.figures import neighbour_grid
    from vqtool.eval.neighbours import memorisation_verdict, nearest_neighbours
    from vqtool.eval.perceptual import load_lpips
    from vqtool.eval.sources import samples_source
    from vqtool.grids import png_bytes

    t0, c0 = time.perf_counter(), time.process_time()
    s = settings or NeighbourSettings()
    s.validate()
    paths = RunPaths.of(run)
    dev = resolve_device(device)
    chosen = resolve_precision(precision, dev)
    shards = Path(s.shards) if s.shards else paths.shards
    vq_path = Path(s.vq) if s.vq else paths.vq
    prior_path = Path(s.prior) if s.prior else paths.prior
    json_path, artifact_path = _outputs(paths.eval, s.name, overwrite)
    grid_path = paths.eval / f"{s.name}.png"
    parents: dict[str, str] = {}
    loaded: dict[str, Any] = {}

    def vq():
        if "vq" not in loaded:
            from vqtool.vq.store import load_vq

            loaded["vq"] = load_vq(vq_path, dev)
            parents["vq"] = loaded["vq"].sha256
        return loaded["vq"]

    train = (resolve_path_source(s.train, "--train", "train") if s.train
             else shards_source(shards, "train", option="--run"))
    if s.val:
        val = resolve_path_source(s.val, "--val", "val", train.image_size)
    else:
        val = shards_source(shards, "val", option="--run") if s.n_val else None
    n_val = min(s.n_val, val.available or 0) if val is not None else 0
    created = check_writable(json_path)  # before any sampling or LPIPS
    with removed_on_failure(created):
        lpips_model = load_lpips(s.net, s.lpips_weights, dev, s.download)  # before sampling: fail fast

    with removed_on_failure(created), _Bars(show_progress) as bars:
        if s.fake:
            fake = resolve_path_source(s.fake, "--fake", "train", train.image_size, vq, dev)
        elif paths.samples_artifact.exists():
            fake = samples_source(paths.samples_artifact, vq(), dev, option="--run")
        else:
            from vqtool.prior.sample import SampleSettings, load_pair, make_sampler

            prior, vq_loaded = load_pair(prior_path, vq_path, dev)
            loaded["vq"] = vq_loaded
            parents["vq"] = vq_loaded.sha256
            sampler = make_sampler(sample or SampleSettings(), prior)
            fake = prior_source(prior, vq_loaded, sampler, dev, bars.fraction("sampling"))
        fake.check(s.n)
        train.check(1)
        with autocast(dev, chosen):  # sampling and decoding; the thumbnails and LPIPS stay fp32
            samples = _fit_size(torch.cat(list(fake.batches(s.n, s.batch_size))), train.image_size).float()
        val_images = (_fit_size(torch.cat(list(val.batches(n_val, s.batch_size))), train.image_size)
                      if n_val else samples[:0])
        queries = torch.cat([samples, val_images])
        found = nearest_neighbours(
            queries, train.batches(train.available, s.batch_size), lpips_model, s.k, s.candidates, s.thumb_size,
            s.batch_size, on_train_batch=bars.counter("pre-select: train images", train.available),
            on_query=bars.counter("LPIPS re-rank", queries.shape[0]))

    parents.update({f"fake_{k}": v for k, v in fake.parents.items()})
    parents.update({f"train_{k}": v for k, v in train.parents.items()})
    d_samples, i_samples = found.distances[:s.n], found.indices[:s.n]
    sample_nearest = d_samples[:, 0]
    val_nearest = found.distances[s.n:, 0] if n_val else None
    verdict = memorisation_verdict(sample_nearest, val_nearest, s.percentile, s.alpha) if n_val else None

    grid = neighbour_grid(samples, found.images[:s.n], d_samples, set(verdict.flagged) if verdict else set(),
                          i_samples)
    atomic_write_bytes(grid_path, png_bytes(np.asarray(grid)))

    metrics: dict[str, float | None] = {
        "sample_nn_median": float(sample_nearest.median()),
        "sample_nn_min": float(sample_nearest.min()),
        "val_nn_median": float(val_nearest.median()) if n_val else None,
        "val_nn_percentile": verdict.threshold if verdict else None,
        "flagged_fraction": verdict.fraction if verdict else None,
        "binomial_p": verdict.p_value if verdict else None,
    }
    body = {
        "verdict": verdict.verdict if verdict else "unavailable (no val images)",
        "message": verdict.message if verdict else "no val images to compare with; prepare with --val-fraction > 0",
        "flagged": verdict.flagged if verdict else [],
        "possible_copies": verdict.copies if verdict else [],
        "samples": [
            {"sample": i, "flagged": bool(verdict and i in verdict.flagged),
             "neighbours": [{"train_index": int(t), "lpips": float(d)} for t, d in zip(i_samples[i], d_samples[i],
                                                                                        strict=True)]}
            for i in range(s.n)
        ],
        "val_nearest": val_nearest.tolist() if n_val else [],
        "train_images": found.train_seen,
        "n_val": n_val,
        "fake": {**fake.describe, "n": s.n},
        "train": train.describe,
        "grid": str(grid_path),
    }
    seconds = time.perf_counter() - t0
    body["seconds"] = round(seconds, 3)
    body["cpu_seconds"] = round(time.process_time() - c0, 3)
    tensors = {"distances": d_samples, "indices": i_samples}
    if n_val:
        tensors["val_nearest"] = val_nearest
    report = write_report(json_path, artifact_path, metrics, body,
                          {**to_dict(s), "device": dev.type, "precision": chosen}, parents, tensors)
    return NeighbourResult(distances=d_samples, indices=i_samples, val_nearest=val_nearest, verdict=verdict,
                           metrics=metrics, report=report, grid_path=grid_path, json_path=json_path,
                           artifact_path=artifact_path, seconds=seconds, precision=chosen)
