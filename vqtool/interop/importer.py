"""The import stage: a published checkpoint of either paper, or a diffusers VQModel folder → a vqtool
`vq-model` or `prior-model`.

`import_checkpoint` reads the file without running any of it (vqtool.interop.torchfile), detects the
layout from its keys, converts it (vqtool.interop.unleashing / .taming), loads the result strictly into
vqtool's own model to prove every tensor found its place, and writes the artifact. The artifact's extra
records the source file's name, sha256 and format, what was inferred and what was dropped.

A folder with a config.json is read as a diffusers VQModel (vqtool.interop.vqmodel_folder); the
source sha256 recorded is its weights file's.

Taming's transformer checkpoints carry their first-stage VQGAN: with `vq` it is checked to be the same
model as that artifact (which becomes the prior's parent); without, it is written beside the prior.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vqtool.artifacts import file_sha256, read_metadata
from vqtool.errors import VqtoolError
from vqtool.interop import taming, unleashing, vqmodel_folder
from vqtool.interop.convert import Converted, check_fits, without_init
from vqtool.interop.torchfile import read_torch_file
from vqtool.prior.store import save_prior
from vqtool.prior.transformer import Transformer
from vqtool.runs import RunPaths
from vqtool.vq.model import VQModel
from vqtool.vq.store import load_vq, save_vq


@dataclass
class Written:
    role: str  # "vq" or "prior"
    path: Path
    converted: Converted
    parameters: int
    sha256: str
    reused: bool = False  # an existing artifact (--vq) was checked and used instead of writing one


@dataclass
class ImportResult:
    source: Path
    source_sha256: str
    written: list[Written] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read_yaml(path: Path | None) -> dict | None:
    if path is None:
        return None
    import yaml

    if not path.exists():
        raise VqtoolError(f"{path}: project YAML not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise VqtoolError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise VqtoolError(f"{path}: a project YAML must be a mapping")
    return data


def _state_dict(obj: Any, where: str) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, whether it came from a Lightning checkpoint)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], True
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        return obj, False
    raise VqtoolError(f"{where}: holds neither a state dict nor a Lightning checkpoint")


def detect(state: dict, lightning: bool, where: str) -> str:
    """The layout of a state dict: one of the four formats vqtool imports."""
    if unleashing.is_vqgan(state):
        return "unleashing-transformers/vqgan"
    if unleashing.is_absorbing(state):
        return "unleashing-transformers/absorbing"
    if taming.is_transformer(state):
        return "taming-transformers/transformer"
    if taming.is_vqmodel(state):
        return "taming-transformers/vqgan"
    if any(k.startswith("net.") or k.startswith("_denoise_fn.") for k in state):
        raise VqtoolError(f"{where}: an Unleashing Transformers sampler other than the absorbing one; "
                          "vqtool imports its VQGAN and absorbing prior")
    kind = "Lightning checkpoint" if lightning else "state dict"
    sample = ", ".join(sorted(state)[:3])
    raise VqtoolError(f"{where}: a {kind} of no layout vqtool imports (keys like {sample}); expected an "
                      "Unleashing Transformers vqgan/absorbing .th or a Taming Transformers last.ckpt")


def _check_architecture(conv: Converted, where: str) -> None:
    """Prove the converted weights fit vqtool's model exactly: every name, every shape, nothing left over.

    The model is built without its random initialisation (seconds for 80M parameters, and memory it
    would touch) and then takes the converted tensors in place of its own.
    """
    try:
        with without_init():
            model = VQModel(conv.config) if conv.kind == "vq-model" else Transformer(conv.config)
    except ValueError as exc:
        raise VqtoolError(f"{where}: the inferred architecture is not valid ({exc})") from None
    check_fits(model, conv.state, where)


def _latent_shape(conv: Converted) -> tuple[int, int]:
    side = conv.config.resolution // 2 ** (len(conv.config.ch_mult) - 1)
    return side, side


def _parameters(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for k, t in state.items() if t.is_floating_point() and "usage" not in k)


def _source_extra(conv: Converted, src: Path, sha: str) -> dict[str, Any]:
    return {"format": conv.format, "file": src.name, "sha256": sha, "inferred": conv.inferred,
            "dropped": conv.dropped}


def _write_vq(conv: Converted, out: Path, src: Path, sha: str, overwrite: bool) -> Written:
    _check_architecture(conv, str(src))
    _refuse_existing(out, overwrite)
    cfg = conv.config
    extra = {"image_size": cfg.resolution, "latent_shape": list(_latent_shape(conv)),
             **{k: v for k, v in conv.extra.items() if not k.startswith("_")}, "source": _source_extra(conv, src, sha)}
    if conv.discriminator:
        extra["discriminator"] = conv.discriminator_config
    digest = save_vq(out, cfg, conv.state, {}, train_config={}, parents={}, extra=extra,
                     discriminator=conv.discriminator)
    return Written("vq", out, conv, _parameters(conv.state), digest)


def _write_prior(conv: Converted, out: Path, src: Path, sha: str, parents: dict[str, str],
                 extra: dict[str, Any], overwrite: bool) -> Written:
    _check_architecture(conv, str(src))
    _refuse_existing(out, overwrite)
    extra = {**extra, **{k: v for k, v in conv.extra.items() if not k.startswith("_")},
             "source": _source_extra(conv, src, sha)}
    digest = save_prior(out, conv.prior, conv.config, conv.objective, conv.state, {}, parents=parents, extra=extra)
    return Written("prior", out, conv, _parameters(conv.state), digest)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise VqtoolError(f"{path}: already exists; pass --overwrite to replace it")


def _vq_grid(vq_path: Path) -> tuple[tuple[int, int], int, int]:
    art = read_metadata(vq_path, "vq-model")
    model = art.config.get("model") or {}
    image_size = int(art.extra.get("image_size") or model.get("resolution") or 0)
    shape = art.extra.get("latent_shape")
    if not shape:
        raise VqtoolError(f"{vq_path}: vq-model without a latent_shape in its metadata")
    return (int(shape[0]), int(shape[1])), int(model.get("codebook_size", 0)), image_size


def _same_vq(conv: Converted, vq_path: Path, where: str) -> None:
    """Refuse a --vq that is not the transformer's own first stage."""
    _check_architecture(conv, where)
    theirs = load_vq(vq_path).model.state_dict()
    for key, value in conv.state.items():
        if "quantizer.usage" in key or "quantizer.initialized" in key:
            continue
        if key not in theirs or theirs[key].shape != value.shape or not torch.equal(theirs[key], value):
            raise VqtoolError(f"{vq_path}: is not this transformer's first-stage VQGAN (weights differ at {key}); "
                              "import the VQGAN it was trained on, or leave out --vq to write it from the checkpoint")


def import_checkpoint(
    source: str | Path,
    out: str | Path | None = None,
    run: str | Path | None = None,
    config: str | Path | None = None,
    vq: str | Path | None = None,
    image_size: int | None = None,
    heads: int | None = None,
    vq_out: str | Path | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Convert `source` into a vqtool artifact at `out` (and, for a Taming transformer without `vq`, its
    first stage at `vq_out`, default `<out stem>-vq.safetensors` beside it).

    With `run` instead of `out`, the run folder's standard names are used (RUN/vq.safetensors,
    RUN/prior.safetensors), so every later stage finds the import with `--run` alone.
    """
    if out is None and run is None:
        raise VqtoolError("give --out PATH or --run DIR for the imported artifact")
    src = Path(source)
    paths = RunPaths.of(run) if run is not None else None
    if not src.exists():
        raise VqtoolError(f"{src}: file not found")
    if image_size is not None and image_size < 1:
        raise VqtoolError(f"--image-size {image_size}: must be positive")
    if src.is_dir():
        given = {"--config": config, "--vq": vq, "--vq-out": vq_out, "--heads": heads}
        return _import_folder(src, Path(out) if out is not None else paths.vq, image_size, given, overwrite)
    if heads is not None and heads < 1:
        raise VqtoolError(f"--heads {heads}: must be positive")
    vq_path = Path(vq) if vq is not None else None
    if vq_path is not None and not vq_path.exists():
        raise VqtoolError(f"{vq_path}: no VQ model here (--vq)")
    where = str(src)
    project = _read_yaml(Path(config) if config is not None else None)
    with ThreadPoolExecutor(1) as pool:  # hash the source while reading it: both mostly wait on memory and disk
        pending_sha = pool.submit(file_sha256, src)
        state, lightning = _state_dict(read_torch_file(src), where)
        sha = pending_sha.result()
    fmt = detect(state, lightning, where)
    result = ImportResult(source=src, source_sha256=sha)
    is_vq = fmt.endswith("/vqgan")
    out = Path(out) if out is not None else (paths.vq if is_vq else paths.prior)
    if vq_out is None and paths is not None:
        vq_out = paths.vq

    if fmt.startswith("unleashing") and project is not None:
        raise VqtoolError(f"{config}: --config is for Taming checkpoints; Unleashing files take "
                          "--image-size and --heads")
    if fmt != "unleashing-transformers/absorbing" and heads is not None and fmt != "taming-transformers/transformer":
        raise VqtoolError("--heads applies to transformer checkpoints only")

    if fmt == "unleashing-transformers/vqgan":
        conv = unleashing.convert_vqgan(state, where, image_size)
        del state
        result.written.append(_write_vq(conv, out, src, sha, overwrite))
    elif fmt == "taming-transformers/vqgan":
        params = taming.project_params(project, str(config), (taming.VQ_TARGET,))
        conv = taming.convert_vqmodel(state, where, params, image_size)
        del state
        result.written.append(_write_vq(conv, out, src, sha, overwrite))
    elif fmt == "unleashing-transformers/absorbing":
        grid, parents, extra = None, {}, {}
        if vq_path is not None:
            grid, codebook, vq_size = _vq_grid(vq_path)
            parents = {"vq": file_sha256(vq_path)}
            extra["image_size"] = vq_size
        conv = unleashing.convert_absorbing(state, where, heads, grid)
        del state
        if vq_path is not None:
            _check_codebook(conv, vq_path, codebook)
        else:
            result.notes.append("no --vq given: the prior records no VQ parent; sample, inpaint and eval need "
                                "--vq (the VQGAN it was trained on)")
        result.written.append(_write_prior(conv, out, src, sha, parents, extra, overwrite))
    else:
        if heads is not None:
            raise VqtoolError("--heads: a Taming transformer's head count comes from its project YAML (--config)")
        params = taming.project_params(project, str(config), (taming.GPT_TARGET,))
        taming.conditioning(params, where)  # refuse what vqtool cannot model before any conversion work
        first = dict(params.get("first_stage_config") or {})
        target = str(first.get("target", taming.VQ_TARGET))
        taming.refuse_target(target, str(config))
        if target != taming.VQ_TARGET:
            raise VqtoolError(f"{config}: first stage {target} is not supported (only {taming.VQ_TARGET})")
        vq_conv = taming.convert_vqmodel(state, where, dict(first.get("params") or {}), image_size,
                                         prefix="first_stage_model.")
        vq_model_grid = _latent_shape(vq_conv)
        stray = sorted(k for k in state if not k.startswith(("first_stage_model.", "transformer.")))
        if stray:
            raise VqtoolError(f"{where}: tensor {stray[0]} is neither the first stage's nor the transformer's "
                              "(a conditioning stage with weights is not supported)")
        for key in [k for k in state if k.startswith("first_stage_model.")]:
            del state[key]
        conv = taming.convert_transformer(state, where, params, vq_model_grid)
        del state
        if vq_path is not None:
            _same_vq(vq_conv, vq_path, str(vq_path))
            result.written.append(Written("vq", vq_path, vq_conv, _parameters(vq_conv.state),
                                          file_sha256(vq_path), reused=True))
        else:
            target_vq = Path(vq_out) if vq_out is not None else out.with_name(f"{out.stem}-vq.safetensors")
            if target_vq.resolve() == out.resolve():
                raise VqtoolError(f"{out}: the prior and its first-stage VQ cannot share one path")
            result.written.append(_write_vq(vq_conv, target_vq, src, sha, overwrite))
            result.notes.append(f"wrote the checkpoint's first-stage VQGAN to {target_vq}")
        parents = {"vq": result.written[-1].sha256}
        extra = {"image_size": vq_conv.config.resolution}
        result.written.append(_write_prior(conv, out, src, sha, parents, extra, overwrite))
    return result


def _import_folder(src: Path, out: Path, image_size: int | None, given: dict[str, Any],
                   overwrite: bool) -> ImportResult:
    """A diffusers VQModel folder (config.json + weights) → a vq-model artifact."""
    if not (src / vqmodel_folder.CONFIG_FILE).is_file():
        if (src / "model_index.json").is_file() and (src / "vqvae" / vqmodel_folder.CONFIG_FILE).is_file():
            raise VqtoolError(f"{src}: a diffusers pipeline folder; give its VQ model, {src / 'vqvae'}")
        raise VqtoolError(f"{src}: is a folder without a config.json; give a checkpoint file (.th or last.ckpt) "
                          "or a diffusers VQModel folder")
    for flag, value in given.items():
        if value is not None:
            raise VqtoolError(f"{flag} does not apply to a diffusers VQModel folder (its config.json says it all; "
                              "only --image-size may override its sample_size)")
    conv, weights = vqmodel_folder.convert_folder(src, image_size)
    sha = file_sha256(weights)
    result = ImportResult(source=src, source_sha256=sha)
    result.written.append(_write_vq(conv, out, src, sha, overwrite))
    return result


def _check_codebook(conv: Converted, vq_path: Path, codebook: int) -> None:
    if codebook != conv.config.vocab_size:
        raise VqtoolError(f"{vq_path}: codebook of {codebook} codes, but the prior predicts "
                          f"{conv.config.vocab_size}; pass the VQGAN the prior was trained on")
    copy = conv.extra.get("_codebook")
    if copy is not None:
        codes = load_vq(vq_path).model.quantizer.embedding.detach()
        if codes.shape != copy.shape or not torch.allclose(codes, copy.to(codes.dtype)):
            raise VqtoolError(f"{vq_path}: its codebook differs from the copy inside the prior checkpoint; "
                              "pass the VQGAN the prior was trained on")


def architecture(conv: Converted) -> str:
    """One line describing the model, for the summary table."""
    cfg = conv.config
    if conv.kind == "vq-model":
        dec = cfg.decoder_res_blocks if cfg.decoder_res_blocks is not None else cfg.num_res_blocks + 1
        attn = ", ".join(str(r) for r in cfg.attn_resolutions) or "none"
        groups = f", GroupNorm {cfg.norm_groups} groups" if cfg.norm_groups is not None else ""
        return (f"VQGAN, ch {cfg.ch} × {list(cfg.ch_mult)}, ResBlocks per level {cfg.num_res_blocks} (encoder) / "
                f"{dec} (decoder), attention at {attn} px{'' if cfg.mid_attention else ' (none in the bottleneck)'}, "
                f"z {cfg.z_channels}, {'1×1 quant convs' if cfg.quant_convs else 'no quant convs'}{groups}")
    kind = "causal GPT" if cfg.causal else "bidirectional transformer"
    cond = f", {cfg.n_classes} classes" if cfg.n_classes else ""
    return (f"{kind}, {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, learned 1-D positions, "
            f"{cfg.gelu} GELU{cond}")


def summary_rows(result: ImportResult) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [("source", f"{result.source} (sha256 {result.source_sha256[:12]}…)")]
    for w in result.written:
        conv, cfg = w.converted, w.converted.config
        tag = w.role
        rows.append((f"{tag}: format", conv.format))
        rows.append((f"{tag}: kind", conv.kind if conv.kind == "vq-model" else f"prior-model ({conv.prior})"))
        rows.append((f"{tag}: architecture", architecture(conv)))
        rows.append((f"{tag}: parameters", f"{w.parameters:,}"))
        if conv.kind == "vq-model":
            side = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
            rows.append((f"{tag}: image size", f"{cfg.resolution} px"))
            rows.append((f"{tag}: token grid", f"{side}×{side}"))
            rows.append((f"{tag}: codebook", f"{cfg.codebook_size} codes × {cfg.code_dim} dims"))
            if conv.discriminator_config:
                d = conv.discriminator_config
                rows.append((f"{tag}: discriminator", f"PatchGAN, {d['disc_layers']} layers, {d['disc_ch']} "
                             "channels (kept for fine-tuning)"))
        else:
            rows.append((f"{tag}: token grid", f"{cfg.grid[0]}×{cfg.grid[1]}"))
            rows.append((f"{tag}: codebook", f"{cfg.vocab_size} codes"))
        for key, why in conv.inferred.items():
            rows.append((f"{tag}: inferred {key}", why))
        for key, why in conv.dropped.items():
            rows.append((f"{tag}: dropped {key}", why))
        rows.append((f"{tag}: {'checked, used' if w.reused else 'wrote'}", f"{w.path} (sha256 {w.sha256[:12]}…)"))
    return rows
