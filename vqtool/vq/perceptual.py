"""The LPIPS perceptual loss through the `lpips` package, with its backbone weights handled offline.

LPIPS has two sets of weights: small linear layers shipped inside the `lpips` package, and an
ImageNet backbone (VGG16 or AlexNet) that torchvision normally downloads into the torch hub cache on
first use. Downloading is not an option on an offline machine, so the network is always built with a
random backbone (no download attempted) and the backbone weights are then loaded from a file we find
or are given. When the file is missing the user gets one line saying which file, where it comes from
and how to provide it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from vqtool.errors import VqtoolError

PERCEPTUAL_CHOICES = ("lpips-vgg", "lpips-alex", "none")

_BACKBONES = {
    # choice: (lpips net name, torchvision weights enum name)
    "lpips-vgg": ("vgg", "VGG16_Weights"),
    "lpips-alex": ("alex", "AlexNet_Weights"),
}


def backbone_url(choice: str) -> str:
    """The URL torchvision downloads the backbone from (its file name is what the hub cache expects)."""
    from torchvision import models

    return getattr(models, _BACKBONES[choice][1]).IMAGENET1K_V1.url


def hub_checkpoint_path(choice: str) -> Path:
    """Where torchvision would cache the backbone: <torch hub dir>/checkpoints/<file name of the URL>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / backbone_url(choice).rsplit("/", 1)[-1]


class Perceptual(nn.Module):
    """LPIPS distance between image batches in [-1, 1]; returns the batch mean. Frozen, always in eval mode."""

    def __init__(self, lpips_net: nn.Module):
        super().__init__()
        self.net = lpips_net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> Perceptual:
        return super().train(False)  # dropout inside LPIPS must stay off

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, y).mean()


def build_lpips(choice: str) -> nn.Module:
    """The LPIPS network of `choice` with its linear layers from the package and a random backbone."""
    import lpips

    net_name = _BACKBONES[choice][0]
    with warnings.catch_warnings():  # torchvision's deprecation notes for `pretrained=`
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net=net_name, pretrained=True, pnet_rand=True, verbose=False)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # torchvision ships these as torch zip files; weights_only refuses anything but tensors and containers.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VqtoolError(f"{path}: cannot read perceptual backbone weights ({first})") from None
    if not isinstance(state, dict):
        raise VqtoolError(f"{path}: not a state dict of backbone weights")
    return state


def load_backbone(lpips_net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy torchvision `features.<i>.*` weights into the LPIPS slices that hold layer <i>."""
    owner = {}  # layer index in torchvision's `features` → prefix of that layer inside lpips_net.net
    for slice_name, block in lpips_net.net.named_children():
        for idx, _ in block.named_children():
            owner[idx] = f"{slice_name}.{idx}"
    target = lpips_net.net.state_dict()
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1] in owner:
            mapped[f"{owner[parts[1]]}.{parts[2]}"] = value
    missing = sorted(set(target) - set(mapped))
    if missing:
        raise VqtoolError(f"{source}: does not hold the backbone's feature weights (missing {missing[0]})")
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise VqtoolError(f"{source}: weight {key} has shape {tuple(value.shape)}, expected "
                              f"{tuple(target[key].shape)}; is it the right backbone?")
    lpips_net.net.load_state_dict(mapped)


def build_perceptual(choice: str, weights: str | Path | None = None) -> Perceptual | None:
    """The perceptual loss for `--perceptual CHOICE` (None for "none"), backbone weights loaded offline.

    `weights` is an explicit backbone file (torchvision .pth or .safetensors); without it the torch hub
    cache is searched.
    """
    if choice == "none":
        return None
    if choice not in _BACKBONES:
        raise VqtoolError(f"--perceptual must be one of {', '.join(PERCEPTUAL_CHOICES)} (got {choice!r})")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise VqtoolError(f"--perceptual-weights {path}: file not found")
    else:
        path = hub_checkpoint_path(choice)
        if not path.is_file():
            raise VqtoolError(
                f"--perceptual {choice}: backbone weights {path.name} not found in {path.parent} (torchvision "
                f"downloads them from {backbone_url(choice)}); copy that file there, or pass "
                f"--perceptual-weights PATH, or train with --perceptual none"
            )
    net = build_lpips(choice)
    load_backbone(net, _read_state_dict(path), str(path))
    return Perceptual(net)
