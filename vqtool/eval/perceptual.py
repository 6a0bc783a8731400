"""LPIPS distances from the `lpips` package, with its ImageNet backbone weights handled offline-safely.

The package ships its calibrated linear layers, but its backbone (AlexNet, VGG16 or SqueezeNet 1.1) comes
from torchvision's pretrained weights, downloaded on first use. Here the backbone is built untrained and
its weights are loaded from a resolved file (`--lpips-weights PATH`, or the torch hub cache), so a missing
file becomes one line instead of a hanging download or a traceback.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from vqtool.errors import VqtoolError
from vqtool.eval import pretrained
from vqtool.eval.pretrained import WeightsFile

NETS = ("alex", "vgg", "squeeze")
MIN_SIZE = 32  # AlexNet's pooling needs at least 32 px; smaller images are upsampled first


def backbone_weights(net: str) -> WeightsFile:
    from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

    enum = {"alex": AlexNet_Weights, "vgg": VGG16_Weights, "squeeze": SqueezeNet1_1_Weights}[net]
    url = enum.IMAGENET1K_V1.url
    return WeightsFile(f"LPIPS {net} backbone (torchvision ImageNet)", url.rsplit("/", 1)[1], url, "--lpips-weights")


def lpips_weights_present(net: str, weights: str | Path | None = None) -> bool:
    """Whether the LPIPS backbone's ImageNet weights are on this machine (never downloads)."""
    try:
        pretrained.locate(backbone_weights(net), weights, download=False)
    except VqtoolError:
        return False
    return True


def load_lpips(
    net: str = "alex",
    weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    download: bool = True,
    random_backbone: bool = False,
) -> torch.nn.Module:
    """An `lpips.LPIPS` module in eval mode; `random_backbone` keeps the backbone untrained (tests only)."""
    if net not in NETS:
        raise VqtoolError(f"--net {net!r}: choose one of {', '.join(NETS)}")
    import lpips

    state = None
    if not random_backbone:
        spec = backbone_weights(net)
        state = pretrained.load_state_dict(pretrained.locate(spec, weights, download), spec)
    # The package prints what it loads and calls torchvision's deprecated `pretrained=` argument.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    if state is not None:
        _load_backbone(model, state, weights or spec.filename, net)
    model.requires_grad_(False)
    return model.to(device).eval()


def _load_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor], source, net: str) -> None:
    # lpips splits torchvision's `features` Sequential into slices whose children keep their original
    # indices as names, so `features.<i>.<param>` maps to `<slice>.<i>.<param>`.
    mapped = {}
    for slice_name, block in model.net.named_children():
        for key in block.state_dict():
            index, _, rest = key.partition(".")
            source_key = f"features.{index}.{rest}"
            if source_key not in state:
                raise VqtoolError(f"--lpips-weights {source}: has no {source_key}; expected torchvision {net} weights")
            mapped[f"{slice_name}.{key}"] = state[source_key]
    try:
        model.net.load_state_dict(mapped)
    except RuntimeError as exc:
        raise VqtoolError(
            f"--lpips-weights {source}: does not fit the {net} backbone ({str(exc).strip().splitlines()[0]})"
        ) from None


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """LPIPS between paired images a[i], b[i] (each (N, 3, H, W) in [-1, 1]) → (N,) on the CPU, in fp32
    also inside a stage's autocast region (a distance must not depend on --precision)."""
    from vqtool.precision import full_precision

    if a.shape != b.shape:
        raise ValueError(f"paired images must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    device = next(model.parameters()).device
    out = []
    for i in range(0, a.shape[0], batch_size):
        x, y = _at_least(a[i:i + batch_size].to(device).float()), _at_least(b[i:i + batch_size].to(device).float())
        with full_precision(device):
            out.append(model(x, y).float().flatten().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _at_least(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    if min(h, w) >= MIN_SIZE:
        return x
    scale = MIN_SIZE / min(h, w)
    return F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
