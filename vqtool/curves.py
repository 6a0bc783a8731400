"""Training curves: RUN/curves/<stage>.png, drawn from a trainer's JSONL log RUN/<stage>.jsonl.

One small figure per log, one panel per quantity the trainer records (its losses, the validation bound
in bits/token or the PSNR, codebook usage and perplexity, the learning rate), against optimisation steps
along the bottom and minutes of training along the top. A panel whose quantities the log lacks is left
out. The log may still be growing: a line cut off halfway (being written, or by a kill) is skipped.

matplotlib is imported inside `draw_curves` only, and drawn through its Agg canvas: nothing needs a
screen, and the CLI starts without it.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.artifacts import atomic_write_bytes

CURVES = "curves"  # folder in the run
PANEL_PX = (320, 240)  # width, height of one panel in pixels
DPI = 100
MAX_COLUMNS = 3
# An interval between two records this much slower per step than the median, and longer than PAUSE_SECONDS,
# is a pause between sessions (a resume the next day), not training: the minutes axis counts it at the median.
PAUSE_FACTOR = 20.0
PAUSE_SECONDS = 600.0


@dataclass(frozen=True)
class Series:
    split: str  # "train" or "val": which records of the log
    key: str
    label: str
    scale: float = 1.0


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]


VQ_PANELS = (
    Panel("train losses", (Series("train", "loss", "total"), Series("train", "l1", "L1"),
                           Series("train", "lpips", "LPIPS"), Series("train", "q_loss", "codebook"),
                           Series("train", "g_loss", "generator"), Series("train", "d_loss", "discriminator"))),
    Panel("val PSNR (dB)", (Series("val", "psnr", "PSNR"),)),
    Panel("codebook usage (val, % of codes)", (Series("val", "usage", "usage", 100.0),)),
    Panel("codebook perplexity (val)", (Series("val", "perplexity", "perplexity"),)),
    Panel("learning rate", (Series("train", "lr", "lr"),)),
)
PRIOR_PANELS = (
    Panel("train loss", (Series("train", "loss", "loss"),)),
    Panel("bits/token", (Series("train", "bpt", "train"), Series("val", "bpt", "val bound"),
                         Series("val", "best_bpt", "best val"))),
    Panel("learning rate", (Series("train", "lr", "lr"),)),
    Panel("gradient norm (before clipping)", (Series("train", "grad_norm", "grad norm"),)),
)


def panels_for(stage: str) -> tuple[Panel, ...]:
    """The panels of a trainer's log, by its stage name (train-vq, train-prior, train-prior-ar, …)."""
    return VQ_PANELS if stage.startswith("train-vq") else PRIOR_PANELS


@dataclass
class Curves:
    """What `draw_curves` found in one log and drew."""

    stage: str
    log: Path
    png: Path | None  # None: the log has no records yet
    records: int = 0
    last_step: int | None = None
    last_time: float | None = None  # time.time() of the last record
    panels: list[str] = field(default_factory=list)
    minutes_axis: bool = False  # drawn when the log has two or more steps with times
    last_val: dict[str, float] = field(default_factory=dict)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL training log in step order; a cut-off or foreign line is skipped."""
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record.get("split") in ("train", "val"):
            records.append(record)
    return sorted(records, key=lambda r: r["step"])  # stable: a val record stays after its step's train record


def training_logs(root: Path) -> list[Path]:
    """The trainers' logs in a run folder: train-vq first, then the priors by name."""
    return sorted(Path(root).glob("train-*.jsonl"), key=lambda p: (not p.stem.startswith("train-vq"), p.name))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _points(records: list[dict[str, Any]], series: Series) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        value = _number(r.get(series.key)) if r["split"] == series.split else None
        if value is not None:
            steps.append(r["step"])
            values.append(value * series.scale)
    return steps, values


def training_minutes(steps: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Minutes of training at each of `steps` (strictly increasing), from the records' wall times.

    Counted from step 0 at the median rate before the first record; pauses between sessions (see
    PAUSE_FACTOR) are counted at the median rate too.
    """
    dt, ds = np.diff(times), np.diff(steps)
    rate = float(np.median(dt / ds)) if dt.size else 0.0
    dt = np.where((dt > PAUSE_SECONDS) & (dt > PAUSE_FACTOR * rate * ds), rate * ds, dt)
    seconds = np.concatenate([[rate * steps[0]], rate * steps[0] + np.cumsum(np.maximum(dt, 0.0))])
    return seconds / 60


def _extrapolating(xp: np.ndarray, fp: np.ndarray):
    """Piecewise-linear x → y through (xp, fp), continued linearly past both ends (the axis has margins)."""
    lo = (fp[1] - fp[0]) / (xp[1] - xp[0])
    hi = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])

    def f(x):
        x = np.asarray(x, dtype=float)
        y = np.interp(x, xp, fp)
        y = np.where(x < xp[0], fp[0] + (x - xp[0]) * lo, y)
        return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi, y)

    return f


def _time_unit(minutes: float) -> tuple[str, float]:
    """The unit the top axis counts in for a run of `minutes`, and its length in minutes."""
    if minutes < 2:
        return "seconds", 1 / 60
    return ("minutes", 1.0) if minutes < 180 else ("hours", 60.0)


def _short(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _minutes_of_steps(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, minutes) for the top axis; None with fewer than two logged steps."""
    first: dict[int, float] = {}
    for r in records:
        t = _number(r.get("time"))
        if t is not None:
            first.setdefault(r["step"], t)
    if len(first) < 2:
        return None
    steps = np.array(sorted(first), dtype=float)
    times = np.maximum.accumulate(np.array([first[int(s)] for s in steps]))
    minutes = training_minutes(steps, times)
    if steps[0] > 0:  # the run started at step 0, minute 0
        steps, minutes = np.concatenate([[0.0], steps]), np.concatenate([[0.0], minutes])
    return steps, minutes


def layout(n_panels: int) -> tuple[int, int]:
    """(columns, rows) of a figure of n panels; four go in two rows of two."""
    columns = 2 if n_panels == 4 else max(1, min(MAX_COLUMNS, n_panels))
    return columns, max(1, math.ceil(n_panels / columns))


def draw_curves(log: Path, out: Path, stage: str | None = None) -> Curves:
    """Draw the curves of `log` into the PNG `out` (written atomically). For a log with nothing to draw (a run
    started afresh) an older `out` is removed, so no stale figure is left beside it."""
    stage = stage or Path(log).stem
    records = read_log(log)
    curves = Curves(stage, Path(log), None, records=len(records))
    if not records:
        Path(out).unlink(missing_ok=True)
        return curves
    curves.last_step = records[-1]["step"]
    curves.last_time = next((t for r in reversed(records) if (t := _number(r.get("time"))) is not None), None)
    vals = [r for r in records if r["split"] == "val"]
    if vals:
        curves.last_val = {k: v for k, v in vals[-1].items() if k not in ("step", "split", "time")
                           and _number(v) is not None}
    drawn = [(p, [(s, *_points(records, s)) for s in p.series]) for p in panels_for(stage)]
    drawn = [(p, [d for d in data if d[1]]) for p, data in drawn]
    drawn = [(p, data) for p, data in drawn if data]
    curves.panels = [p.title for p, _ in drawn]
    if not drawn:
        Path(out).unlink(missing_ok=True)
        return curves
    minutes = _minutes_of_steps(records)
    atomic_write_bytes(out, _figure_png(stage, drawn, minutes))
    curves.png, curves.minutes_axis = Path(out), minutes is not None
    return curves


def _figure_png(stage: str, drawn: list, minutes: tuple[np.ndarray, np.ndarray] | None) -> bytes:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    columns, rows = layout(len(drawn))
    title, elapsed = stage, None
    if minutes is not None:
        unit, per = _time_unit(float(minutes[1][-1]))
        at_step = _extrapolating(*minutes)
        # The top axis labels the bottom axis's own ticks with the time they were reached: round times would
        # fall unevenly along the steps (evaluations, a slower session) and their labels would collide.
        elapsed = FuncFormatter(lambda step, _: _short(float(at_step(step)) / per))
        title = f"{stage}: steps along the bottom, {unit} of training along the top"
    width, height = columns * PANEL_PX[0], rows * PANEL_PX[1]
    with matplotlib.rc_context({"font.size": 7, "axes.titlesize": 8, "legend.fontsize": 6, "lines.linewidth": 1.0}):
        fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
        FigureCanvasAgg(fig)
        # Fixed margins in pixels: an automatic layout engine took twice as long as the drawing itself.
        fig.subplots_adjust(left=62 / width, right=1 - 14 / width, bottom=34 / height, top=1 - 54 / height,
                            wspace=0.32, hspace=0.3)
        # One step axis for every panel, so the minutes along the top row hold for the panels below too.
        axes = fig.subplots(rows, columns, squeeze=False, sharex=True)
        for ax in axes.flatten()[len(drawn):]:
            ax.set_visible(False)
        for i, (ax, (panel, data)) in enumerate(zip(axes.flatten(), drawn, strict=False)):
            for series, steps, values in data:
                marker = "o" if len(steps) <= 30 else None  # a few evaluations read better as dots
                ax.plot(steps, values, label=series.label, marker=marker, markersize=2.5)
            ax.set_title(panel.title, pad=3)
            ax.grid(True, alpha=0.3)
            if len(data) > 1:
                ax.legend(loc="best")
            if i + columns >= len(drawn):  # the lowest panel of its column
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xlabel("step", labelpad=1)
            if i < columns and elapsed is not None:
                ax.secondary_xaxis("top").xaxis.set_major_formatter(elapsed)
        # The top axis is named in the figure's title: a label above its ticks would run into the panel's.
        fig.suptitle(title, fontsize=8, y=1 - 4 / height, va="top")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def draw_run_curves(root: Path) -> list[Curves]:
    """RUN/curves/<stage>.png for every trainer log in the run folder `root`."""
    root = Path(root)
    return [draw_curves(log, root / CURVES / f"{log.stem}.png") for log in training_logs(root)]
