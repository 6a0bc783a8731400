"""RUN/index.html: one static page with what a run made, built from the files in the run folder.

Sections: the stages (from RUN/pipeline.json), the training curves (vqtool.curves, redrawn from the
trainers' logs each time), the sample grid, reconstructions of held-out images, the inpainting, the
nearest-neighbour grid and the metrics table. Images are referenced by paths relative to the run folder,
so the folder can be copied or served as it is; no JavaScript, no external assets. A part the run did not
make is named as missing, with the stage that makes it. `write_report` (`vqtool report RUN`) writes the
page for any run folder, finished, still training, or with only some stages done.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vqtool import __version__
from vqtool.artifacts import atomic_write_text, read_metadata
from vqtool.curves import Curves, draw_run_curves, training_logs
from vqtool.errors import VqtoolError
from vqtool.runs import RunPaths

INDEX_NAME = "index.html"
RECONSTRUCTIONS = Path("figures") / "reconstructions.png"
MAX_WIDTH = 960  # CSS pixels; small images are scaled up by a whole factor, pixelated

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
img { image-rendering: pixelated; border: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.missing { color: #a60; } .note { color: #555; font-size: 0.92em; } code { background: #f4f4f4; }
.done { color: #070; } .failed, .interrupted, .running { color: #b00; }
"""


def _rel(path: Path, root: Path) -> str:
    return html.escape(path.relative_to(root).as_posix(), quote=True)


def _image(path: Path, root: Path, alt: str) -> str:
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
    scale = max(1, min(4, MAX_WIDTH // max(w, 1)))
    return (f'<img src="{_rel(path, root)}" width="{w * scale}" height="{h * scale}" '
            f'alt="{html.escape(alt, quote=True)}">')


def _missing(what: str, stage: str) -> str:
    return f'<p class="missing">No {html.escape(what)} in this run (made by the <code>{stage}</code> stage).</p>'


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


@torch.no_grad()
def reconstruction_figure(run: str | Path, n: int = 8, device: str = "cpu") -> Path | None:
    """RUN/figures/reconstructions.png: n held-out images (top row) over their VQ reconstructions (bottom).

    None when the run has no VQ model or no shards yet.
    """
    from vqtool.data.loader import ShardLoader
    from vqtool.data.manifest import read_manifest
    from vqtool.grids import make_grid, save_png
    from vqtool.vq.store import load_vq

    paths = RunPaths.of(run)
    if not paths.vq.exists() or not (paths.shards / "manifest.json").exists():
        return None
    manifest = read_manifest(paths.shards)
    split = "val" if manifest["counts"].get("val", 0) > 0 else "train"
    images, _ = next(iter(ShardLoader(paths.shards, split, batch_size=n, infinite=False)))
    vq = load_vq(paths.vq, device)
    if vq.image_size != images.shape[-1]:
        return None  # a VQ trained at another size than these shards: nothing meaningful to show
    recon = vq.model.decode_tokens(vq.model.encode_to_tokens(images.to(device))).float().cpu()
    out = paths.root / RECONSTRUCTIONS
    save_png(make_grid(torch.cat([images, recon]), nrow=images.shape[0]), out)
    return out


def _stages_table(root: Path) -> str:
    ledger = _read_json(root / "pipeline.json")
    if not ledger or not isinstance(ledger.get("stages"), dict):
        return '<p class="note">No pipeline record (RUN/pipeline.json): the stages were run one by one.</p>'
    rows = []
    for stage, entry in ledger["stages"].items():
        status = str(entry.get("status", "?"))
        rows.append(f"<tr><td>{html.escape(stage)}</td><td class=\"{html.escape(status)}\">{html.escape(status)}"
                    f"</td><td class=\"num\">{float(entry.get('seconds', 0)):.0f} s</td>"
                    f"<td>{html.escape(str(entry.get('summary', '')))}</td></tr>")
    return ("<table><tr><th>stage</th><th>status</th><th>time</th><th>result</th></tr>"
            + "".join(rows) + "</table>")


def _samples(root: Path, paths: RunPaths) -> str:
    grid = paths.samples / "grid.png"
    if not grid.exists() or not paths.samples_artifact.exists():
        return _missing("samples", "sample")
    meta = read_metadata(paths.samples_artifact, "samples")
    cfg = meta.config
    caption = (f"{cfg.get('n', '?')} images from the {cfg.get('prior_kind', '')} prior: {cfg.get('schedule', '')} "
               f"schedule, {cfg.get('steps', '?')} steps, temperature {cfg.get('temperature', '?')}")
    classes = meta.extra.get("classes") or []
    if "labels" in meta.extra.get("_tensors", {}) and classes:
        caption += (f"; class {classes[int(cfg['class'])]}" if cfg.get("class") is not None
                    else "; " + cycled_classes_caption([str(c) for c in classes], int(cfg.get("n", 0))))
    return f"{_image(grid, root, 'sample grid')}<p class=\"note\">{html.escape(caption)}</p>"


def cycled_classes_caption(classes: list[str], n: int, grid_max: int = 64) -> str:
    """Where each class is in the sample grid when `sample` cycled the classes 0, 1, 2, ….

    The grid is square (`sample` puts ⌈√shown⌉ images in a row), so the classes run along the rows and,
    when a row holds a whole number of cycles, each column shows one class (8 classes, 64 images: column
    c is class c, and every row holds one image of each class)."""
    columns = max(1, math.ceil(math.sqrt(min(n, grid_max))))
    if columns % len(classes) == 0:
        names = ", ".join(classes)
        repeat = f", repeating every {len(classes)} columns" if columns > len(classes) else ""
        return f"one class per column, left to right: {names}{repeat}"
    return f"classes in turn, left to right along each row: {', '.join(classes[:12])}"


def _reconstructions(root: Path, figure: Path | None) -> str:
    if figure is None or not figure.exists():
        return _missing("VQ model", "train-vq")
    return (f"{_image(figure, root, 'reconstructions')}<p class=\"note\">Top: held-out images. Bottom: the same "
            f"images encoded to tokens and decoded by vq.safetensors (EMA weights).</p>")


def _inpainting(root: Path, paths: RunPaths) -> str:
    grid = paths.inpaint / "grid.png"
    if not grid.exists():
        return _missing("inpainting", "inpaint")
    return (f"{_image(grid, root, 'inpainting')}<p class=\"note\">The original, the regenerated token cells in "
            f"red, then the completions.</p>")


def _neighbours(root: Path, paths: RunPaths) -> str:
    skipped = _read_json(paths.eval / "neighbours.skipped.json")
    report = _read_json(paths.eval / "neighbours.json")
    grid = paths.eval / "neighbours.png"
    if report is None or not grid.exists():
        if skipped:
            return f'<p class="missing">{html.escape(str(skipped.get("message", "skipped")))}</p>'
        return _missing("nearest-neighbour check", "neighbours")
    distance = "pixel RMS distance" if report.get("distance") == "pixel-rms" else "LPIPS"
    parts = [_image(grid, root, "nearest neighbours"),
             f"<p>{html.escape(str(report.get('message', '')))}</p>",
             f"<p class=\"note\">Each row: a sample, then its nearest training images by {distance} "
             f"(distance and training index under each).</p>"]
    if report.get("note"):
        parts.append(f"<p class=\"note\">{html.escape(str(report['note']))}</p>")
    return "".join(parts)


def _metrics(paths: RunPaths) -> str:
    from vqtool.eval.report import format_value, label

    rows, notes = [], []
    for name, title in (("report.json", "eval"), ("neighbours.json", "neighbours")):
        report = _read_json(paths.eval / name)
        if not report:
            continue
        pixel = report.get("distance") == "pixel-rms"
        for key, value in (report.get("metrics") or {}).items():
            text, _, better = label(key)
            if pixel:
                text = text.replace("LPIPS", "pixel RMS")
            rows.append(f"<tr><td>{html.escape(text)}</td><td class=\"num\">{html.escape(format_value(key, value))}"
                        f"</td><td>{html.escape(better)}</td><td>{title}</td></tr>")
        note = (report.get("recon") or {}).get("note")
        if note:
            notes.append(note)
        for note in report.get("notes") or []:
            notes.append(str(note))
    if not rows:
        return _missing("evaluation report", "eval")
    text = ("<table><tr><th>metric</th><th>value</th><th>better</th><th>from</th></tr>" + "".join(rows)
            + "</table><p class=\"note\">— : not computed (see the notes). NLL of the absorbing prior is its ELBO, "
              "an upper bound.</p>")
    return text + "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)


def _files(root: Path, paths: RunPaths) -> str:
    found = [p for p in (paths.shards / "manifest.json", paths.vq, paths.latents, paths.prior, paths.samples_artifact,
                         paths.inpaint / "inpaint.safetensors", paths.eval / "report.json",
                         paths.eval / "neighbours.json", root / "pipeline.json") if p.exists()]
    found += training_logs(root)
    items = "".join(f'<li><a href="{_rel(p, root)}">{html.escape(p.relative_to(root).as_posix())}</a></li>'
                    for p in found)
    return f"<ul>{items}</ul><p class=\"note\">Describe any artifact with <code>vqtool info PATH</code>.</p>"


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _curves(root: Path, curves: list[Curves]) -> str:
    if not curves:
        return ('<p class="missing">No training logs in this run (RUN/train-vq.jsonl and RUN/train-prior.jsonl are '
                'written by the <code>train-vq</code> and <code>train-prior</code> stages).</p>')
    parts = []
    for c in curves:
        parts.append(f"<h3>{html.escape(c.stage)}</h3>")
        if c.png is None:
            parts.append(f'<p class="note">{html.escape(c.log.name)} has no records yet.</p>')
            continue
        last = f", the last written {_when(c.last_time)}" if c.last_time is not None else ""
        top = "; top: minutes of training (pauses between sessions left out)" if c.minutes_axis else ""
        parts.append(f"{_image(c.png, root, c.stage + ' curves')}<p class=\"note\">{c.records} records of "
                     f"<a href=\"{_rel(c.log, root)}\">{html.escape(c.log.name)}</a> up to step {c.last_step}{last}. "
                     f"Bottom axis: optimisation steps{top}.</p>")
    return "".join(parts)


def check_run_folder(root: Path) -> None:
    """Refuse, in one line, a path that is not a vqtool run folder (nothing any stage writes is in it)."""
    if not root.is_dir():
        raise VqtoolError(f"{root}: run folder not found")
    paths = RunPaths.of(root)
    made = [root / "pipeline.json", paths.shards / "manifest.json", paths.vq, paths.latents, paths.prior,
            paths.samples_artifact, paths.inpaint / "inpaint.safetensors", paths.eval / "report.json",
            paths.eval / "neighbours.json"]
    if not any(p.exists() for p in made) and not training_logs(root) and not any(
            paths.checkpoints.glob("train-*-last.safetensors")):
        raise VqtoolError(f"{root}: not a vqtool run folder (no shards, models, training logs or pipeline.json); "
                          "give the --run folder of a vqtool command")


@dataclass
class IndexReport:
    """What `write_report` wrote: the page, the images it shows and the parts it names as missing."""

    path: Path
    images: list[str] = field(default_factory=list)  # paths relative to the run folder
    missing: list[str] = field(default_factory=list)  # section titles
    curves: list[Curves] = field(default_factory=list)


def write_report(run: str | Path, device: str = "cpu") -> IndexReport:
    """`vqtool report RUN`: (re)write RUN/index.html with fresh curves for any run folder."""
    root = RunPaths.of(run).root
    check_run_folder(root)
    return _write(root, device)


def write_index(run: str | Path, device: str = "cpu") -> Path:
    """Write RUN/index.html (and the figures it shows); return its path."""
    root = RunPaths.of(run).root
    if not root.is_dir():
        raise VqtoolError(f"{root}: run folder not found")
    return _write(root, device).path


def _write(root: Path, device: str) -> IndexReport:
    paths = RunPaths.of(root)
    figure = reconstruction_figure(root, device="cpu" if device == "auto" else device)
    curves = draw_run_curves(root)
    now = _when(datetime.datetime.now().timestamp())
    sections = [
        ("Stages", _stages_table(root)),
        ("Training curves", _curves(root, curves)),
        ("Samples", _samples(root, paths)),
        ("Reconstructions", _reconstructions(root, figure)),
        ("Inpainting", _inpainting(root, paths)),
        ("Nearest training images", _neighbours(root, paths)),
        ("Metrics", _metrics(paths)),
        ("Files", _files(root, paths)),
    ]
    body = [f"<h1>vqtool run <code>{html.escape(root.name)}</code></h1>",
            f"<p class=\"note\">Written {now} by vqtool {html.escape(__version__)}.</p>"]
    for title, text in sections:
        body += [f"<h2>{title}</h2>", text]
    page = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>vqtool: {html.escape(root.name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    out = root / INDEX_NAME
    atomic_write_text(out, page)
    images = [html.unescape(src) for _, text in sections for src in re.findall(r'<img src="([^"]+)"', text)]
    missing = [title for title, text in sections if 'class="missing"' in text]
    return IndexReport(out, images, missing, curves)
