"""`vqtool eval` (FID, KID, PRDC, reconstruction, NLL) and `vqtool neighbours` (LPIPS memorisation check)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markdown import Markdown
from rich.markup import escape

from vqtool.cli import options, stage_command
from vqtool.config import Part, load_recipe, stage_settings
from vqtool.console import console, summary_table

_SampleBatch = typer.Option(None, "--sample-batch-size", help="Sampling on the fly: images drawn at once (16).")
_Fake = typer.Option(None, "--fake", help="Generated images: a samples .safetensors (or its folder), a shards "
                                          "folder or an image folder (default: sample the run's prior).")
_Download = typer.Option(None, "--download/--no-download",
                         help="Fetch missing pretrained weights when online (default: yes).")
_LpipsWeights = typer.Option(None, "--lpips-weights",
                             help="torchvision ImageNet weights of the LPIPS backbone (.pth or .safetensors).")


@stage_command("eval")
@options.sampling
@options.common
def eval_command(
    run: Path = options.Run,
    metrics: str = typer.Option(None, "--metrics", help="Comma-separated: fid,kid,prdc,recon,nll "
                                                        "(default fid,kid,prdc)."),
    n: int = typer.Option(None, "--n", help="Generated images scored, exactly (default 10000)."),
    n_real: int = typer.Option(None, "--n-real", help="Real images (default: --n)."),
    real: str = typer.Option(None, "--real", help="train | val (the run's shards) | PATH: shards or image folder."),
    real_split: str = typer.Option(None, "--real-split", help="Split when --real is a shards folder (train)."),
    fake: str = _Fake,
    fake_split: str = typer.Option(None, "--fake-split", help="Split when --fake is a shards folder (train)."),
    features: str = typer.Option(None, "--features", help="torch-fidelity extractor: inception-v3-compat (default), "
                                                          "vgg16, clip-vit-b-32, dinov2-vit-s-14, …"),
    feature_weights: Path = typer.Option(None, "--feature-weights", help="Weights file of the extractor, passed "
                                                                         "to torch-fidelity (.pth or .safetensors)."),
    feature_layer: str = typer.Option(None, "--feature-layer", help="Feature layer (default: the extractor's "
                                                                    "standard one; Inception: 2048)."),
    download: bool = _Download,
    compile_: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the extractor: minutes of "
                                                                       "compilation, then faster (large --n)."),
    nearest_k: int = typer.Option(None, "--nearest-k", help="PRDC neighbourhood size (default 5)."),
    kid_subsets: int = typer.Option(None, "--kid-subsets", help="KID: random subsets averaged (default 100)."),
    kid_subset_size: int = typer.Option(None, "--kid-subset-size", help="KID: subset size (1000, capped at --n)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per feature-extraction batch (default 50)."),
    recon_n: int = typer.Option(None, "--recon-n", help="recon: val images (default: min(--n, val size))."),
    nll_n: int = typer.Option(None, "--nll-n", help="nll: images per split (default: min(--n, split size))."),
    nll_samples: str = typer.Option(None, "--nll-samples", help="nll, absorbing prior: stratified t draws per image "
                                                                "for the ELBO (default 16), or all (every t once)."),
    split_name: str = typer.Option(None, "--split-name", help="nll: score all splits of --latents together under "
                                                              "this name, e.g. test for a held-out set."),
    lpips_net: str = typer.Option(None, "--lpips-net", help="recon LPIPS backbone: alex | vgg | squeeze."),
    lpips_weights: Path = _LpipsWeights,
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the real-feature cache."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Folder of the real-feature cache (default RUN/eval)."),
    name: str = typer.Option(None, "--name", help="Report name: RUN/eval/NAME.json (default report)."),
    vq: Path = options.VQ,
    prior: Path = options.Prior,
    latents: Path = typer.Option(None, "--latents", help="Latents artifact (default: RUN/latents.safetensors)."),
    shards: Path = options.Shards,
    sample_batch_size: int = _SampleBatch,
    sampling=None,
    common=None,
) -> None:
    """Score a run: FID/KID/PRDC of generated vs real images, VQ reconstruction, prior NLL → RUN/eval/report.json."""
    from vqtool.eval.stage import EvalSettings, evaluate

    cli = dict(metrics=[m.strip() for m in metrics.split(",") if m.strip()] if metrics else None, n=n,
               n_real=n_real, real=real, real_split=real_split, fake=fake, fake_split=fake_split, features=features,
               feature_weights=_str(feature_weights), feature_layer=feature_layer, download=download,
               compile=compile_,
               nearest_k=nearest_k, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, batch_size=batch_size,
               recon_n=recon_n, nll_n=nll_n, nll_samples=_draws(nll_samples), split_name=split_name,
               lpips_net=lpips_net,
               lpips_weights=_str(lpips_weights), cache=False if no_cache else None, cache_dir=_str(cache_dir),
               name=name, vq=_str(vq), prior=_str(prior), latents=_str(latents), shards=_str(shards))
    settings, sample = _settings(EvalSettings, "eval", cli, sampling, sample_batch_size, common)
    result = evaluate(run, settings, sample, device=common.device, seed=common.seed, overwrite=common.overwrite,
                      precision=common.precision)
    console.print(Markdown(result.markdown))
    rows = [("report", result.json_path), ("artifact", result.artifact_path)]
    real_info = result.report.get("real")
    if real_info:
        rows.append(("real features", "from cache" if real_info.get("cache_hit") else "computed"
                     + (f", cached in {real_info['features_cache']}" if real_info.get("features_cache") else "")))
    note = (result.report.get("recon") or {}).get("note")
    if note:
        rows.append(("note", note))
    rows.append(("precision", f"{result.precision} (VQ and prior; feature extractors fp32)"))
    rows.append(("time", f"{result.seconds:.1f} s"))
    console.print(summary_table("eval", [(k, escape(str(v))) for k, v in rows]))


@stage_command("neighbours")
@options.sampling
@options.common
def neighbours_command(
    run: Path = options.Run,
    n: int = typer.Option(None, "--n", help="Samples checked (default 16)."),
    k: int = typer.Option(None, "--k", help="Nearest training images shown per sample (default 8)."),
    net: str = typer.Option(None, "--net", help="LPIPS backbone: alex (default) | vgg | squeeze."),
    lpips_weights: Path = _LpipsWeights,
    download: bool = _Download,
    candidates: int = typer.Option(None, "--candidates", help="Pre-selected per image by thumbnail distance, "
                                                              "then re-ranked by LPIPS (default 64)."),
    thumb_size: int = typer.Option(None, "--thumb-size", help="Thumbnail side for pre-selection (default 8)."),
    n_val: int = typer.Option(None, "--n-val", help="Val images calibrating the verdict (default 200; 0: none)."),
    percentile: float = typer.Option(None, "--percentile", help="Val percentile a sample is flagged under (5)."),
    alpha: float = typer.Option(None, "--alpha", help="Significance of the memorisation test (0.01)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per batch (default 256)."),
    fake: str = _Fake,
    train: str = typer.Option(None, "--train", help="Training images: shards or image folder (default: RUN's)."),
    val: str = typer.Option(None, "--val", help="Held-out images: shards or image folder (default: RUN's val)."),
    name: str = typer.Option(None, "--name", help="Output name: RUN/eval/NAME.png/.json (default neighbours)."),
    vq: Path = options.VQ,
    prior: Path = options.Prior,
    shards: Path = options.Shards,
    sample_batch_size: int = _SampleBatch,
    sampling=None,
    common=None,
) -> None:
    """Find each sample's nearest training images by LPIPS, draw them, and judge memorisation against val."""
    from vqtool.eval.stage import NeighbourSettings, neighbour_check

    cli = dict(n=n, k=k, net=net, lpips_weights=_str(lpips_weights), download=download, candidates=candidates,
               thumb_size=thumb_size, n_val=n_val, percentile=percentile, alpha=alpha, batch_size=batch_size,
               fake=fake, train=train, val=val, name=name, vq=_str(vq), prior=_str(prior), shards=_str(shards))
    settings, sample = _settings(NeighbourSettings, "neighbours", cli, sampling, sample_batch_size, common)
    r = neighbour_check(run, settings, sample, device=common.device, overwrite=common.overwrite,
                        precision=common.precision)
    colour = {"memorisation": "red", "possible copies": "yellow"}.get(r.report["verdict"], "green")
    console.print(f"[bold {colour}]{escape(r.report['message'])}[/bold {colour}]", soft_wrap=True)
    rows = [
        ("grid", r.grid_path), ("report", r.json_path), ("artifact", r.artifact_path),
        ("training images searched", f"{r.report['train_images']:,}"),
        ("sample→train nearest LPIPS", _median_range(r.distances[:, 0])),
    ]
    if r.val_nearest is not None:
        rows.append(("val→train nearest LPIPS", _median_range(r.val_nearest)))
    rows.append(("precision", f"{r.precision} (sampling; LPIPS fp32)"))
    rows.append(("time", f"{r.seconds:.1f} s"))
    console.print(summary_table("neighbours", [(key, escape(str(v))) for key, v in rows]))


def _settings(cls: type, section: str, cli: dict, sampling, batch_size: int | None, common):
    """The stage's own settings, and the sampling settings it uses when it samples the prior on the fly."""
    from vqtool.prior.sample import SampleSettings

    parts = Part(cls, (section,)), Part(SampleSettings, ("sample",))
    sample = dict(vars(sampling), batch_size=batch_size, seed=common.seed)
    chosen = stage_settings(parts, load_recipe(common.config), common.set_, {section: cli, "sample": sample})
    return chosen[section], chosen["sample"]


def _draws(value: str | None) -> int | str | None:
    """--nll-samples: a count, or `all`; anything else is left for EvalSettings.validate to refuse."""
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        return value


def _median_range(d) -> str:
    return f"median {float(d.median()):.4f} (min {float(d.min()):.4f}, max {float(d.max()):.4f})"


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
