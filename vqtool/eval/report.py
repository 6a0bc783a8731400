"""Evaluation outputs: a JSON report, an `eval-report` safetensors artifact, and a markdown table.

The JSON holds every number, the settings and the parents' sha256; the artifact holds the same numbers
as float64 tensors (`metric.<name>`) plus any per-image arrays, with the report in its metadata.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

import torch

from vqtool import __version__
from vqtool.artifacts import atomic_write_json, command_line, save_artifact

# How each metric is shown: label, format, and which direction is better.
LABELS: dict[str, tuple[str, str, str]] = {
    "fid": ("FID", "{:.3f}", "lower"),
    "kid_mean": ("KID (mean)", "{:.5f}", "lower"),
    "kid_std": ("KID (std)", "{:.5f}", ""),
    "precision": ("Precision", "{:.4f}", "higher"),
    "recall": ("Recall", "{:.4f}", "higher"),
    "density": ("Density", "{:.4f}", "higher"),
    "coverage": ("Coverage", "{:.4f}", "higher"),
    "recon_psnr": ("Recon PSNR (dB)", "{:.2f}", "higher"),
    "recon_l1": ("Recon L1", "{:.4f}", "lower"),
    "recon_lpips": ("Recon LPIPS", "{:.4f}", "lower"),
    "recon_fid": ("Recon FID", "{:.3f}", "lower"),
    "codebook_usage": ("Codebook usage", "{:.1%}", "higher"),
    "codebook_perplexity": ("Codebook perplexity", "{:.1f}", "higher"),
    "nll_train_bpt": ("NLL train (bits/token)", "{:.4f}", "lower"),
    "nll_val_bpt": ("NLL val (bits/token)", "{:.4f}", "lower"),
    "nll_train_bpd": ("NLL train (bits/dim)", "{:.4f}", "lower"),
    "nll_val_bpd": ("NLL val (bits/dim)", "{:.4f}", "lower"),
    "nll_gap_bpt": ("NLL val − train (bits/token)", "{:.4f}", ""),
    "nll_gap_bpd": ("NLL val − train (bits/dim)", "{:.4f}", ""),
    "sample_nn_median": ("Sample→train nearest LPIPS (median)", "{:.4f}", ""),
    "sample_nn_min": ("Sample→train nearest LPIPS (min)", "{:.4f}", ""),
    "val_nn_median": ("Val→train nearest LPIPS (median)", "{:.4f}", ""),
    "val_nn_percentile": ("Val→train nearest LPIPS (percentile)", "{:.4f}", ""),
    "flagged_fraction": ("Samples below that percentile", "{:.1%}", "lower"),
    "binomial_p": ("Binomial p (memorisation)", "{:.3g}", "higher"),
}


def json_safe(value: Any) -> Any:
    """Non-finite floats become None (JSON has no inf/NaN); tensors become lists; tuples become lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def label(name: str) -> tuple[str, str, str]:
    """(label, format, better) of a metric; NLL metrics are named after their split (nll_test_bpt, …)."""
    if name in LABELS:
        return LABELS[name]
    if name.startswith("nll_") and name.endswith(("_bpt", "_bpd")):
        split, unit = name[4:-4], {"_bpt": "bits/token", "_bpd": "bits/dim"}[name[-4:]]
        return f"NLL {split} ({unit})", "{:.4f}", "lower"
    return name, "{:.4g}", ""


def format_value(name: str, value: float | None) -> str:
    return "—" if value is None else label(name)[1].format(value)


def markdown_table(metrics: dict[str, float | None], title: str = "Evaluation") -> str:
    """One row per metric; a metric's standard error (`<name>_se`) is shown in its row as `value ± se`."""
    lines = [f"**{title}**", "", "| metric | value | better |", "|---|---:|---|"]
    for name, value in metrics.items():
        if name.endswith("_se") and name[:-3] in metrics:
            continue
        text, _, better = label(name)
        shown = format_value(name, value)
        se = metrics.get(f"{name}_se")
        if value is not None and se is not None:
            shown += f" ± {format_value(name, se)}"
        lines.append(f"| {text} | {shown} | {better} |")
    return "\n".join(lines)


def write_report(
    json_path: Path,
    artifact_path: Path,
    metrics: dict[str, float | None],
    body: dict[str, Any],
    settings: dict[str, Any],
    parents: dict[str, str],
    tensors: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Write the JSON report and the eval-report artifact; return the report (with the artifact's sha256)."""
    report = json_safe({
        "metrics": metrics,
        **body,
        "settings": settings,
        "parents": parents,
        "vqtool_version": __version__,
        "command": command_line(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    all_tensors = {f"metric.{k}": torch.tensor([v], dtype=torch.float64) for k, v in metrics.items() if v is not None}
    all_tensors.update(tensors or {})
    sha = save_artifact(artifact_path, "eval-report", all_tensors, config=report["settings"], parents=parents,
                        extra={k: v for k, v in report.items() if k not in ("settings", "parents")})
    report["artifact"] = {"path": str(artifact_path), "sha256": sha}
    atomic_write_json(json_path, report)
    return report
