"""Where evaluation images come from, as streams of batches that hold exactly the number asked for.

A source is a run's shards split, another shards folder, a folder of image files, a samples artifact
(decoded through the VQ), a prior sampled on the fly, or a tensor already in memory. `batches(n, b)`
yields batches of at most `b` images in [-1, 1] totalling exactly `n`, and stops with one line when the
source holds fewer than `n` (the reference code silently drops the last partial batch instead).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vqtool.artifacts import file_sha256, read_metadata
from vqtool.errors import VqtoolError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

BatchFn = Callable[[int, int], Iterator[torch.Tensor]]


@dataclass
class ImageSource:
    name: str  # how messages and the report name it, e.g. "runs/x/shards (train)"
    option: str  # the command-line option it came from, for error messages
    available: int | None  # images it holds; None when unlimited (a prior)
    image_size: int | None
    _batches: BatchFn
    _key: Callable[[], str]  # content identity, computed only when a cache needs it
    parents: dict[str, str] = field(default_factory=dict)
    describe: dict[str, Any] = field(default_factory=dict)  # for the report

    def key(self) -> str:
        return self._key()

    def check(self, n: int) -> None:
        if n < 1:
            raise VqtoolError(f"--n {n}: must be at least 1")
        if self.available is not None and n > self.available:
            raise VqtoolError(
                f"{self.option} {self.name}: holds {self.available} images, fewer than the {n} asked for; lower --n"
            )

    def batches(self, n: int, batch_size: int) -> Iterator[torch.Tensor]:
        """Batches (B, 3, H, W) in [-1, 1] of exactly `n` images in total, in the source's fixed order."""
        self.check(n)
        remaining = n
        for images in self._batches(n, batch_size):
            if remaining <= 0:
                break
            images = images[:remaining]
            remaining -= images.shape[0]
            yield images
        if remaining > 0:
            raise VqtoolError(f"{self.option} {self.name}: ran out after {n - remaining} of {n} images")


def _rebatch(stream: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of image batches into batches of exactly `batch_size` (the last may be smaller)."""
    pending: list[torch.Tensor] = []
    count = 0
    for images in stream:
        pending.append(images)
        count += images.shape[0]
        while count >= batch_size:
            joined = torch.cat(pending)
            yield joined[:batch_size]
            rest = joined[batch_size:]
            pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
    if count:
        yield torch.cat(pending)


# --------------------------------------------------------------------------------------------------
# Real images


def shards_source(shards_dir: str | Path, split: str = "train", option: str = "--real") -> ImageSource:
    """One split of a prepared shards folder, read once in manifest order (prepare already shuffled it)."""
    from vqtool.data.manifest import manifest_sha256, read_manifest

    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    if split not in manifest["counts"]:
        raise VqtoolError(f"{option} {shards_dir}: no split {split!r}; choose train or val")
    sha = manifest_sha256(shards_dir)

    def batches(n: int, batch_size: int) -> Iterator[torch.Tensor]:
        from vqtool.data.loader import ShardLoader

        loader = ShardLoader(shards_dir, split=split, batch_size=batch_size, infinite=False)
        for images, _labels in loader:
            yield images

    return ImageSource(
        name=f"{shards_dir} ({split})", option=option, available=int(manifest["counts"][split]),
        image_size=int(manifest["image_size"]), _batches=batches, _key=lambda: f"shards:{sha}:{split}",
        parents={"dataset": sha}, describe={"type": "shards", "path": str(shards_dir), "split": split,
                                            "manifest_sha256": sha},
    )


def folder_source(folder: str | Path, image_size: int | None = None, option: str = "--real") -> ImageSource:
    """Image files under `folder` (recursively, sorted by path), made RGB and square like `prepare` does."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise VqtoolError(f"{option} {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    if image_size is None:
        from PIL import Image

        with Image.open(files[0]) as im:
            image_size = min(im.size)

    def batches(n: int, batch_size: int) -> Iterator[torch.Tensor]:
        from vqtool.data.images import ConvertSettings, SkipImage, convert_image

        settings = ConvertSettings(size=image_size)
        for start in range(0, n, batch_size):
            arrays = []
            for path in files[start:start + batch_size]:
                try:
                    array, _ = convert_image(path.read_bytes(), settings)
                except SkipImage as exc:
                    raise VqtoolError(f"{option} {path}: unusable image ({exc}); remove it or fix it") from None
                arrays.append(torch.from_numpy(array))
            yield torch.stack(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def key() -> str:
        h = hashlib.sha256()
        for path in files:
            h.update(f"{path.relative_to(folder)}\0{file_sha256(path)}\n".encode())
        return f"folder:{h.hexdigest()}"

    return ImageSource(name=str(folder), option=option, available=len(files), image_size=image_size,
                       _batches=batches, _key=key,
                       describe={"type": "folder", "path": str(folder), "files": len(files)})


def tensor_source(images: torch.Tensor, name: str = "tensor", option: str = "images") -> ImageSource:
    """Images already in memory (N, 3, H, W) in [-1, 1]; for the Python API and tests."""

    def batches(n: int, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, n, batch_size):
            yield images[start:start + batch_size]

    def key() -> str:
        data = images.detach().float().cpu().contiguous().numpy().tobytes()
        return f"tensor:{hashlib.sha256(data).hexdigest()}"

    return ImageSource(name=name, option=option, available=int(images.shape[0]), image_size=int(images.shape[-1]),
                       _batches=batches, _key=key, describe={"type": "tensor", "images": int(images.shape[0])})


# --------------------------------------------------------------------------------------------------
# Generated images


def _decode(vq, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return vq.model.decode_tokens(tokens.to(device)).float().cpu()


def samples_source(path: str | Path, vq, device: torch.device | str = "cpu", option: str = "--fake") -> ImageSource:
    """A samples artifact's token grids, decoded through the VQ they were sampled for."""
    from vqtool.artifacts import require_parent
    from vqtool.samples import load_samples

    path = Path(path)
    samples = load_samples(path)
    require_parent(samples.artifact, "vq", vq.artifact.path)
    tokens = samples.tokens
    device = torch.device(device)
    sha = file_sha256(path)

    def batches(n: int, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, n, batch_size):
            yield _decode(vq, tokens[start:start + batch_size], device)

    return ImageSource(name=str(path), option=option, available=int(tokens.shape[0]), image_size=vq.image_size,
                       _batches=batches, _key=lambda: f"samples:{sha}", parents={"samples": sha},
                       describe={"type": "samples", "path": str(path), "sha256": sha,
                                 "tokens": list(tokens.shape)})


def prior_source(prior, vq, sampler, device: torch.device | str = "cpu", progress=None,
                 option: str = "--run") -> ImageSource:
    """Images sampled on the fly: the prior's tokens decoded by the VQ. `sampler` is a Sampler made for
    this prior (vqtool.prior.sample.make_sampler), or SampleSettings to make one from.

    The tokens are exactly those `vqtool sample` draws with the same settings and n (class-conditional
    priors get their classes cycled, as there); `progress(done, total)` follows the sampling.
    """
    from vqtool.config import to_dict
    from vqtool.prior.sample import as_sampler, default_labels, sample_tokens

    device = torch.device(device)
    sampler = as_sampler(sampler, prior)
    settings_dict = to_dict(sampler.settings)
    prior_sha = prior.artifact.sha256

    def batches(n: int, batch_size: int) -> Iterator[torch.Tensor]:
        tokens = sample_tokens(prior, n, sampler, default_labels(prior, n), progress)
        for start in range(0, n, batch_size):
            yield _decode(vq, tokens[start:start + batch_size], device)

    def key() -> str:
        blob = json.dumps({"prior": prior_sha, "settings": settings_dict}, sort_keys=True)
        return f"prior:{hashlib.sha256(blob.encode()).hexdigest()}"

    return ImageSource(name=str(prior.artifact.path), option=option, available=None, image_size=vq.image_size,
                       _batches=batches, _key=key, parents={"prior": prior_sha},
                       describe={"type": "prior", "path": str(prior.artifact.path), "kind": prior.kind,
                                 "settings": settings_dict})


# --------------------------------------------------------------------------------------------------
# Turning a command-line value into a source


def is_shards_folder(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def resolve_path_source(path: str | Path, option: str, split: str = "train", image_size: int | None = None,
                        vq_loader: Callable[[], Any] | None = None, device: torch.device | str = "cpu",
                        ) -> ImageSource:
    """A shards folder, a samples artifact (file or the folder holding samples.safetensors), or an image folder."""
    path = Path(path)
    if not path.exists():
        raise VqtoolError(f"{option} {path}: not found")
    if path.is_dir() and (path / "samples.safetensors").is_file():
        path = path / "samples.safetensors"
    if path.is_file():
        if path.suffix != ".safetensors":
            raise VqtoolError(
                f"{option} {path}: expected a samples .safetensors file, a shards folder or an image folder"
            )
        kind = read_metadata(path).kind
        if kind != "samples":
            raise VqtoolError(f"{option} {path}: is a {kind!r} artifact; expected a 'samples' artifact")
        if vq_loader is None:
            raise VqtoolError(f"{option} {path}: decoding samples needs the run's VQ; pass --run or --vq")
        return samples_source(path, vq_loader(), device, option)
    if is_shards_folder(path):
        return shards_source(path, split, option)
    return folder_source(path, image_size, option)
