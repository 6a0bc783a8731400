"""Pretrained weight files of the evaluation networks (Inception, VGG, CLIP, DINOv2, LPIPS backbones).

A file is taken from an explicit option when given, else from the torch hub cache folder, else it is
downloaded when that is allowed. When none of that works the user gets one line naming the file, the URL
it normally comes from, and the option or folder that provides it. Offline, nothing waits on the network.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from vqtool.errors import VqtoolError

_DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class WeightsFile:
    what: str  # human name, e.g. "Inception-v3 (torch-fidelity)"
    filename: str  # name inside the torch hub checkpoints folder
    url: str
    option: str  # the command-line option that supplies the file instead


def hub_checkpoints_dir() -> Path:
    """Where torch (and torchvision, torch-fidelity, lpips) cache downloaded weights; follows $TORCH_HOME."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch(url: str, destination: Path) -> None:
    """Download `url` to `destination` (atomically: torch writes a temporary file and renames it)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(destination), progress=False)
    finally:
        socket.setdefaulttimeout(old)


def locate(spec: WeightsFile, explicit: str | Path | None = None, download: bool = True) -> Path:
    """The path of the weights file `spec`, or one VqtoolError line saying how to provide it."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise VqtoolError(
                f"{spec.option} {path}: file not found (the {spec.what} weights normally come from {spec.url})"
            )
        return path
    cached = hub_checkpoints_dir() / spec.filename
    if cached.is_file():
        return cached
    reason = "downloads are off"
    if download:
        try:
            fetch(spec.url, cached)
        except Exception as exc:  # any network or disk failure becomes the one-line message below
            reason = f"download failed: {_first_line(exc)}"
        else:
            return cached
    raise VqtoolError(
        f"{spec.what} weights missing: {cached} ({reason}; it comes from {spec.url}); "
        f"pass {spec.option} PATH or copy the file into {cached.parent}"
    )


def load_state_dict(path: Path, spec: WeightsFile) -> dict[str, torch.Tensor]:
    """Read a .safetensors file, or a PyTorch weights file with the restricted (tensors-only) unpickler."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors has its own error types
            raise VqtoolError(f"{spec.option} {path}: not a readable safetensors file ({_first_line(exc)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad or unsafe files
        raise VqtoolError(
            f"{spec.option} {path}: not a plain PyTorch state dict ({_first_line(exc)}); "
            f"expected the file from {spec.url}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VqtoolError(f"{spec.option} {path}: not a state dict of tensors; expected the file from {spec.url}")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
