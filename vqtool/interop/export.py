"""The export stage: a `vq-model` artifact → a diffusers VQModel folder that `VQModel.from_pretrained` loads.

The folder holds config.json, diffusion_pytorch_model.safetensors (the EMA weights by default) and a
model card, README.md: what made the model (data, settings, the vqtool commands), its codebook and
token grid, and how to load it with diffusers and with vqtool. The folder is staged beside OUT and
swapped in when complete (vqtool.outputs); other files already in OUT are carried over. Settings
a VQModel config cannot express are refused in one line (vqtool.interop.vqmodel_folder); what the
folder leaves out on purpose is listed in the card and in the result's notes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vqtool import __version__
from vqtool.artifacts import Artifact, command_line, read_metadata, write_safetensors
from vqtool.errors import VqtoolError
from vqtool.interop import vqmodel_folder
from vqtool.outputs import matcher, naming, refuse_enclosing, staged_folder
from vqtool.vq.model import VQConfig
from vqtool.vq.store import load_vq

FORMATS = ("diffusers",)
CARD_FILE = "README.md"


@dataclass
class ExportResult:
    source: Path
    source_sha256: str
    folder: Path
    files: list[Path]
    config: dict[str, Any]  # the VQModel config.json
    parameters: int
    notes: list[str] = field(default_factory=list)  # what the folder does not carry, and why


def export_vq(vq: str | Path, out: str | Path, fmt: str = "diffusers", weights: str = "ema",
              overwrite: bool = False) -> ExportResult:
    """Write the VQ artifact `vq` as a diffusers VQModel folder `out`."""
    if fmt not in FORMATS:
        raise VqtoolError(f"--format {fmt!r}: vqtool exports {', '.join(FORMATS)} (a diffusers VQModel folder)")
    vq, out = Path(vq), Path(out)
    if out.exists() and not out.is_dir():
        raise VqtoolError(f"{out}: exists and is not a folder (--out names the folder to write)")
    refuse_enclosing(out, [vq])
    stored = set(read_metadata(vq, "vq-model").extra["_tensors"]) if vq.exists() else set()
    loaded = load_vq(vq, weights=weights)
    cfg, art = loaded.model.cfg, loaded.artifact
    config = vqmodel_folder.diffusers_config(cfg, art.extra.get("diffusers") or {}, str(vq))
    tensors = vqmodel_folder.to_diffusers(loaded.model.state_dict(), cfg, str(vq))
    files = [out / vqmodel_folder.WEIGHTS_FILE, out / vqmodel_folder.CONFIG_FILE, out / CARD_FILE]
    existing = [f for f in files if f.exists()]
    if existing and not overwrite:
        raise VqtoolError(f"{existing[0]}: already exists; pass --overwrite to replace it")
    result = ExportResult(source=vq, source_sha256=art.sha256, folder=out, files=files, config=config,
                          parameters=sum(t.numel() for t in tensors.values()),
                          notes=_notes(cfg, art.path.name, weights, stored))
    with staged_folder(out, matcher(*(f.name for f in files))) as staging:
        with naming(files[0]):
            write_safetensors(staging / files[0].name, tensors, {"format": "pt"})  # what Hugging Face's loaders expect
        with naming(files[1]):
            (staging / files[1].name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        with naming(files[2]):
            (staging / files[2].name).write_text(model_card(result, cfg, art, weights), encoding="utf-8")
    return result


def _notes(cfg: VQConfig, name: str, weights: str, stored: set[str]) -> list[str]:
    other = ("model.", "the raw (non-EMA) weights") if weights == "ema" else ("ema.", "the EMA weights")
    kept = [what for prefix, what in (other, ("disc.", "the discriminator"))
            if any(k.startswith(prefix) for k in stored)]
    notes = [f"{' and '.join(kept)} stay in {name}"] if kept else []
    notes += ["training-only settings are not part of a VQModel config: beta (diffusers' quantizer fixes 0.25), "
             "dropout, dead-code restarts, usage decay, k-means init"]
    if cfg.cosine:
        notes.append("cosine codebook: stored as unit vectors, for which diffusers' Euclidean lookup picks the "
                     "same codes")
    if not cfg.quant_convs:
        notes.append("no 1×1 convs around the lookup: written as identity quant_conv and post_quant_conv")
    return notes


def model_card(result: ExportResult, cfg: VQConfig, art: Artifact, weights: str) -> str:
    """README.md of the folder: a Hugging Face model card with its YAML header."""
    side = cfg.resolution
    grid = side // 2 ** (len(cfg.ch_mult) - 1)
    config = result.config
    attn = ", ".join(f"{r} px" for r in sorted(cfg.attn_resolutions, reverse=True)) or "none"
    lookup = "cosine (codes stored as unit vectors)" if cfg.cosine else "Euclidean nearest code"
    rows = [
        ("image size", f"{side}×{side} px, RGB in [-1, 1]"),
        ("token grid", f"{grid}×{grid} (downsampling ×{side // grid})"),
        ("codebook", f"{cfg.codebook_size} codes × {cfg.code_dim} dims; lookup: {lookup}"),
        ("architecture", f"widths {config['block_out_channels']}, ResBlocks per level {cfg.num_res_blocks} "
                         f"(encoder) / {cfg.num_res_blocks + 1} (decoder), attention at {attn}"
                         f"{' and in the bottleneck' if cfg.mid_attention else ''}, latent channels "
                         f"{cfg.z_channels}, GroupNorm {config['norm_num_groups']} groups"),
        ("parameters", f"{result.parameters:,}"),
        ("weights", f"{weights} ({'exponential moving average' if weights == 'ema' else 'raw'}) weights of "
                    f"{art.path.name}, sha256 {result.source_sha256[:12]}…"),
    ]
    lines = ["---", "library_name: diffusers", "tags:", "  - vqgan", "  - vq-model", "  - image-tokenizer",
             "  - vqtool", "---", "",
             f"# VQGAN: {cfg.codebook_size} codes, {grid}×{grid} tokens at {side} px", "",
             "A vector-quantised image autoencoder (VQGAN) "
             + ("imported into vqtool" if art.extra.get("source") else "trained with vqtool")
             + ", exported as a diffusers `VQModel`.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Data and settings", ""] + _provenance(art) + [""]
    lines += ["## How it was made", "", "```bash"]
    if art.command:
        lines.append(f"{art.command}    # wrote {art.path.name}")
    lines += [f"{command_line()}    # wrote this folder (vqtool {__version__})", "```", ""]
    lines += ["## Load it", "", "With diffusers:", "", "```python", "import torch",
              "from diffusers import VQModel", "",
              f"vq = VQModel.from_pretrained({json.dumps(str(result.folder))}).eval()",
              f"images = torch.rand(4, 3, {side}, {side}) * 2 - 1  # RGB in [-1, 1]",
              "with torch.no_grad():",
              "    latents = vq.encode(images).latents",
              "    _, _, (_, _, indices) = vq.quantize(latents)",
              f"    tokens = indices.reshape(len(images), {grid}, {grid})  # code indices",
              "    recon = vq.decode(latents).sample.clamp(-1, 1)  # quantizes, then decodes",
              "```", "", "With vqtool (back to a `vq-model` artifact; then encode your images and train a prior):", "",
              "```bash", f"vqtool import {result.folder} --out vq.safetensors",
              f"vqtool prepare ~/photos --size {side} --run runs/photos",
              "vqtool encode --run runs/photos --vq vq.safetensors",
              "vqtool train-prior --run runs/photos --prior absorbing --max-minutes 60",
              "vqtool sample --run runs/photos --vq vq.safetensors --n 16", "```", "",
              "## What the export changed or left out", ""]
    lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def _provenance(art: Artifact) -> list[str]:
    extra, out = art.extra, []
    source = extra.get("source") or {}
    if source:
        out.append(f"- imported from `{source.get('file')}` ({source.get('format')}, sha256 "
                   f"{str(source.get('sha256', ''))[:12]}…) by `vqtool import`")
    if art.parents.get("dataset"):
        out.append(f"- data: the shards whose manifest has sha256 {art.parents['dataset'][:12]}… (`vqtool prepare`)")
    if art.parents.get("init"):
        out.append(f"- fine-tuned from the vq-model with sha256 {art.parents['init'][:12]}…")
    if extra.get("step") is not None:
        out.append(f"- {extra['step']:,} training steps, seed {extra.get('seed', '?')}")
    val = extra.get("val") or {}
    if val.get("l1") is not None:
        out.append(f"- validation reconstruction: L1 {val['l1']:.4f}, PSNR {val.get('psnr', float('nan')):.2f} dB")
    book = extra.get("codebook") or {}
    if book.get("usage") is not None:
        out.append(f"- codebook on {book.get('images')} {book.get('split', 'validation')} images: "
                   f"{100 * book['usage']:.1f}% of the codes used, perplexity {book.get('perplexity', 0):.1f}")
    if not out:
        out.append("- no record of the data or the training in the artifact")
    train = (art.config or {}).get("train") or {}
    model = (art.config or {}).get("model") or {}
    if train:
        out += ["", "train-vq settings:", "", "```json", json.dumps(train, sort_keys=True), "```"]
    out += ["", "vq settings (vqtool's `vq:` section):", "", "```json", json.dumps(model, sort_keys=True), "```"]
    return out
