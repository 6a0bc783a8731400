"""Inpainting with the absorbing prior: regenerate the tokens under a mask, keep all the others.

The image is brought to the VQ's size exactly as `prepare` does (centre square crop, resize), encoded
to tokens, and every token whose cell (the `downsample` × `downsample` pixel block it stands for)
overlaps the masked region is set to MASK. The reverse process then continues from the step whose
number of masked tokens matches (vqtool.prior.schedules.plan), so a small hole takes few steps.
Tokens outside the mask are never touched. `--keep-pixels` pastes the original pixels outside the
mask back over the decoded result, hiding the VQ's reconstruction error there.

Only the absorbing prior can do this: an autoregressive prior predicts each token from the tokens
before it in raster order, so it cannot condition on the part of the image below or right of the hole.
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vqtool.errors import VqtoolError
from vqtool.outputs import check_writable, matcher, naming, refuse_enclosing, removed_on_failure, staged_folder
from vqtool.prior.sample import (
    QUANTIZE,
    Progress,
    Sampler,
    SampleSettings,
    check_guidance,
    class_request,
    default_labels,
    in_batches,
    make_sampler,
    quantize_int8,
    resolve_class,
)
from vqtool.prior.schedules import reveal
from vqtool.prior.store import LoadedPrior

# The files `inpaint` writes into its folder; anything else found there (such as the pipeline's
# source.png) is kept when the folder is replaced.
INPAINT_OUTPUTS = matcher("original.png", "reconstruction.png", "mask.png", "completion-*.png", "grid.png",
                          "inpaint.safetensors", ".*.tmp")

AR_REFUSAL = ("inpainting needs an absorbing prior: an autoregressive prior sees only the tokens before "
              "each one in raster order, so it cannot use the image below or right of the hole")


# --------------------------------------------------------------------------------------------------
# Geometry: from the user's mask to the tokens to regenerate


def parse_box(text: str) -> tuple[int, int, int, int]:
    """'x0,y0,x1,y1' (pixels, x1/y1 exclusive) → a tuple of ints; VqtoolError otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        box = tuple(int(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4:
        raise VqtoolError(f"--box {text!r}: expected four integers x0,y0,x1,y1 in pixels")
    return box  # type: ignore[return-value]


def box_mask(box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """A boolean (H, W) pixel mask, True inside the box; `size` is (W, H) like PIL's."""
    x0, y0, x1, y1 = box
    w, h = size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise VqtoolError(f"--box {x0},{y0},{x1},{y1}: must satisfy 0 ≤ x0 < x1 ≤ {w} and 0 ≤ y0 < y1 ≤ {h} "
                          "(pixels of the input image)")
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def crop_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centre square crop `prepare` uses, as a PIL box (left, top, right, bottom)."""
    w, h = size
    side = min(w, h)
    left, top = round((w - side) * 0.5), round((h - side) * 0.5)
    return left, top, left + side, top + side


def centre_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The middle quarter (half the width, half the height) of an image of `size` (W, H)."""
    w, h = size
    return w // 4, h // 4, w - w // 4, h - h // 4


def fit_mask(mask: np.ndarray, image_size: int) -> np.ndarray:
    """A pixel mask of the input image → the VQ-sized square, with the image's crop. A pixel of the
    result is masked when any part of the input pixels it covers is (area resampling, then > 0)."""
    from PIL import Image

    h, w = mask.shape
    if (w, h) == (image_size, image_size):
        return mask.copy()
    img = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    resized = img.resize((image_size, image_size), Image.Resampling.BOX, box=crop_box((w, h)))
    return np.asarray(resized) > 0


def token_mask(pixel_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(S, S) bool pixel mask → (h, w) bool: True for every token whose cell overlaps the mask."""
    pooled = F.adaptive_max_pool2d(pixel_mask.float()[None, None], grid)
    return pooled[0, 0] > 0


def cell_mask(tokens_masked: torch.Tensor, image_size: int) -> torch.Tensor:
    """(h, w) token mask → (S, S) pixel mask of the cells those tokens stand for."""
    return F.interpolate(tokens_masked.float()[None, None], size=(image_size, image_size), mode="nearest")[0, 0] > 0


# --------------------------------------------------------------------------------------------------
# The algorithm


def inpaint_tokens(prior: LoadedPrior, tokens: torch.Tensor, masked: torch.Tensor, n: int,
                   settings: SampleSettings | Sampler, labels: torch.Tensor | None = None,
                   progress: Progress | None = None) -> torch.Tensor:
    """n completions (n, h, w) int64 of one token grid `tokens` (h, w) where `masked` (h, w) is True.

    Tokens outside the mask are copied unchanged. The reverse process starts at the step of a
    `settings.steps`-step schedule over the whole grid whose masked count equals the mask's.
    `settings` may be a Sampler made for this grid (`make_sampler(settings, prior, shape=(h, w))`).
    """
    if prior.kind != "absorbing":
        raise VqtoolError(AR_REFUSAL)
    if n < 1:
        raise VqtoolError(f"--n must be at least 1 (got {n})")
    if tokens.shape != masked.shape or tokens.dim() != 2:
        raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(masked.shape)} must be the same (h, w)")
    shape = tuple(tokens.shape)
    sampler = settings if isinstance(settings, Sampler) else make_sampler(settings, prior, shape=shape)
    if sampler.shape != shape:
        raise ValueError(f"the sampler fills a {sampler.shape} grid, the tokens are {shape}")
    settings = sampler.settings
    check_guidance(sampler, prior, labels)
    model = prior.model
    device = next(model.parameters()).device
    mask_id = model.cfg.mask_id
    n_tokens = shape[0] * shape[1]
    flat = tokens.reshape(-1).to(device=device, dtype=torch.long)
    start_state = flat.masked_fill(masked.reshape(-1).to(device), mask_id)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    total = sampler.work(n, int(masked.sum()))

    def draw_batch(b: int, batch_labels: torch.Tensor | None, tick) -> torch.Tensor:
        state = start_state.expand(b, n_tokens).clone()
        return reveal(sampler.predictor(model, batch_labels), state, mask_id, sampler.schedule, settings.steps,
                      sampler.draw, generator, tick, n_tokens=n_tokens)

    return in_batches(model, n, settings.batch_size, labels, total, progress, draw_batch).reshape(n, *shape)


# --------------------------------------------------------------------------------------------------
# The stage


@dataclass
class InpaintResult:
    tokens: torch.Tensor  # (n, h, w) completions
    masked_tokens: int
    steps_run: int
    original: Path
    overlay: Path
    completions: list[Path]
    grid: Path
    artifact: Path
    seconds: float
    precision: str = "fp32"  # fp32 | bf16 | fp16: what the VQ and the prior ran in


def load_image(path: Path, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image file → ((3, S, S) in [-1, 1] cropped and resized like `prepare`, its original (W, H))."""
    from PIL import Image

    from vqtool.data.images import ConvertSettings, SkipImage, convert_image
    from vqtool.grids import from_uint8

    path = Path(path)
    if not path.is_file():
        raise VqtoolError(f"{path}: image not found")
    data = path.read_bytes()
    try:
        array, _ = convert_image(data, ConvertSettings(size=image_size, crop="center"))
        with Image.open(io.BytesIO(data)) as img:
            size = _oriented_size(img)
    except SkipImage as exc:
        raise VqtoolError(f"{path}: cannot use this image ({exc})") from None
    return from_uint8(array), size


def read_image_size(path: Path) -> tuple[int, int]:
    """(W, H) of an image file as `inpaint` sees it (EXIF orientation applied)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return _oriented_size(img)
    except (OSError, UnidentifiedImageError) as exc:
        raise VqtoolError(f"{path}: cannot read the inpaint image ({str(exc).splitlines()[0]})") from None


def _oriented_size(img) -> tuple[int, int]:
    from PIL import ImageOps

    return (ImageOps.exif_transpose(img) or img).size


def load_mask(path: Path, image_wh: tuple[int, int], image_size: int) -> np.ndarray:
    """A mask PNG (white = regenerate) the size of the input image, or already VQ-sized → (H, W) bool."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise VqtoolError(f"{path}: mask not found")
    try:
        with Image.open(path) as img:
            if img.mode in ("RGBA", "LA") or "transparency" in img.info:
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(background, img)
            gray = np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError) as exc:
        raise VqtoolError(f"{path}: cannot read the mask ({str(exc).splitlines()[0]})") from None
    h, w = gray.shape
    if (w, h) not in (tuple(image_wh), (image_size, image_size)):
        raise VqtoolError(f"{path}: the mask is {w}x{h}, but the image is {image_wh[0]}x{image_wh[1]}; "
                          f"draw it at the image's size (or at {image_size}x{image_size})")
    return gray > 127


def overlay(image: torch.Tensor, region: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Tint the pixels of `region` (S, S) red over `image` (3, S, S), to show what gets regenerated."""
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    tinted = (1 - alpha) * image + alpha * red
    return torch.where(region.unsqueeze(0), tinted, image)


def inpaint_image(
    prior_path: Path,
    vq_path: Path,
    image_path: Path,
    out_dir: Path,
    n: int,
    settings: SampleSettings,
    mask_path: Path | None = None,
    box: tuple[int, int, int, int] | None = None,
    keep_pixels: bool = False,
    class_id: int | str | None = None,
    device: str = "auto",
    quantize: str = "none",
    overwrite: bool = False,
    progress: Progress | None = None,
    precision: str = "auto",
) -> InpaintResult:
    """The `inpaint` stage: n completions of IMAGE under a mask (a PNG or a box), as PNGs.

    Writes out_dir/original.png (the image at the VQ's size), reconstruction.png (its tokens decoded),
    mask.png (the regenerated token cells tinted red), completion-NN.png, grid.png (all of them in one
    row), and inpaint.safetensors (the completions' tokens, kind `samples`), through a staging folder
    that replaces out_dir at the end (a failed run leaves the previous outputs intact).
    """
    from vqtool.artifacts import file_sha256, read_metadata
    from vqtool.device import resolve_device
    from vqtool.grids import save_grid, save_png
    from vqtool.precision import autocast, resolve_precision
    from vqtool.prior.sample import decode, load_pair
    from vqtool.samples import save_samples

    if n < 1:
        raise VqtoolError(f"--n must be at least 1 (got {n})")
    if (mask_path is None) == (box is None):
        raise VqtoolError("pass exactly one of --mask MASK.png or --box x0,y0,x1,y1")
    if quantize not in QUANTIZE:
        raise VqtoolError(f"--quantize must be one of {', '.join(QUANTIZE)} (got {quantize!r})")
    out_dir = Path(out_dir)
    artifact = out_dir / "inpaint.safetensors"
    if artifact.exists() and not overwrite:
        raise VqtoolError(f"{artifact} exists; pass --overwrite to replace it, or choose another --out")
    if Path(prior_path).exists() and read_metadata(prior_path, "prior-model").config.get("prior") != "absorbing":
        raise VqtoolError(f"{prior_path}: {AR_REFUSAL}")
    refuse_enclosing(out_dir, (prior_path, vq_path))  # IMAGE may live there (the pipeline's source.png)
    with removed_on_failure(check_writable(out_dir, folder=True)):
        dev = resolve_device(device)
        chosen = resolve_precision(precision, dev)
        prior, vq = load_pair(prior_path, vq_path, dev)
        if quantize == "int8":
            prior = dataclasses.replace(prior, model=quantize_int8(prior.model))
        size = vq.image_size
        grid = vq.model.latent_shape(size)

        image, image_wh = load_image(image_path, size)
        pixels = box_mask(box, image_wh) if box is not None else load_mask(mask_path, image_wh, size)
        pixels = torch.from_numpy(fit_mask(pixels, size))
        if not bool(pixels.any()):
            raise VqtoolError("the mask covers no pixels of the cropped image; mark the region to regenerate "
                              "in white (--mask) or check the --box coordinates")
        with torch.inference_mode(), autocast(dev, chosen):
            tokens = vq.model.encode_to_tokens(image[None].to(dev))[0].cpu()
        masked = token_mask(pixels, tuple(tokens.shape))
        if tuple(tokens.shape) != tuple(grid):
            raise VqtoolError(f"{vq_path}: encoded a {tuple(tokens.shape)} grid, expected {tuple(grid)}")
        class_id = resolve_class(prior, class_id)
        labels = default_labels(prior, n, class_id)

        sampler = make_sampler(settings, prior, shape=tuple(tokens.shape))
        start = time.perf_counter()
        with autocast(dev, chosen):
            completions = inpaint_tokens(prior, tokens, masked, n, sampler, labels, progress)
        seconds = time.perf_counter() - start
        steps_run = sampler.calls(int(masked.sum()))

        decoded = decode(vq.model, torch.cat([tokens[None], completions]), settings.batch_size, dev, chosen)
        reconstruction, results = decoded[0], decoded[1:]
        if keep_pixels:
            results = torch.where(pixels.unsqueeze(0).unsqueeze(0), results, image.unsqueeze(0))

        shown = overlay(image, cell_mask(masked, size))
        digits = max(2, len(str(n - 1)))
        names = [f"completion-{i:0{digits}d}.png" for i in range(n)]
        pngs = [("original.png", image), ("reconstruction.png", reconstruction), ("mask.png", shown),
                *zip(names, results, strict=True)]
        record = {**dataclasses.asdict(settings), "n": n, "prior_kind": prior.kind, "quantize": quantize,
                  "class": class_request(class_id), "device": dev.type, "precision": chosen,
                  "box": list(box) if box is not None else None,
                  "mask": str(mask_path) if mask_path is not None else None, "keep_pixels": keep_pixels,
                  "masked_tokens": int(masked.sum()), "steps_run": steps_run}
        record["shape"] = list(tokens.shape)
        # Hashed before the folder is replaced: IMAGE may live in it (the pipeline's source.png).
        parents = {"prior": prior.artifact.sha256, "vq": vq.artifact.sha256, "image": file_sha256(image_path)}
        # Everything goes into a staging folder that replaces out_dir only once it is complete.
        with staged_folder(out_dir, INPAINT_OUTPUTS) as staging:
            for name, picture in pngs:
                with naming(out_dir / name):
                    save_png(picture, staging / name)
            with naming(out_dir / "grid.png"):
                row = torch.cat([image[None], shown[None], results])
                save_grid(row, staging / "grid.png", nrow=min(len(row), 10))
            with naming(artifact):
                save_samples(staging / artifact.name, completions, labels, record, parents=parents,
                             codebook_size=prior.cfg.vocab_size,
                             extra={"original_tokens": tokens.reshape(-1).tolist(),
                                    "token_mask": masked.reshape(-1).int().tolist(), "seconds": seconds})
    original_path, overlay_path, grid_path = out_dir / "original.png", out_dir / "mask.png", out_dir / "grid.png"
    paths = [out_dir / name for name in names]
    return InpaintResult(tokens=completions, masked_tokens=int(masked.sum()), steps_run=steps_run,
                         original=original_path, overlay=overlay_path, completions=paths, grid=grid_path,
                         artifact=artifact, seconds=seconds, precision=chosen)


# --------------------------------------------------------------------------------------------------
# The pipeline's inpaint source: a held-out image of the run's own shards


def extract_image(shards: Path, index: int, dest: Path, write: bool = True) -> tuple[Path, int | None]:
    """Write image `index` of the val split (the train split if val is empty) to `dest`; return (dest, label).

    With `write` False nothing is written; a `dest` that is missing or holds another image is then
    reported as a path that does not exist (its stage has to run).
    """
    from vqtool.data.loader import ShardLoader
    from vqtool.data.manifest import read_manifest
    from vqtool.grids import png_bytes, to_uint8

    manifest = read_manifest(shards)
    split = "val" if manifest["counts"].get("val", 0) > 0 else "train"
    if not 0 <= index < manifest["counts"][split]:
        raise VqtoolError(f"inpaint.val_index {index}: the {split} split of {shards} has "
                          f"{manifest['counts'][split]} images")
    seen = 0
    for images, labels in ShardLoader(shards, split, batch_size=64, infinite=False):
        if index < seen + images.shape[0]:
            data = png_bytes(to_uint8(images[index - seen]))
            label = int(labels[index - seen]) if labels is not None else None
            if not dest.exists() or dest.read_bytes() != data:  # an unchanged file keeps its hash cache
                if not write:
                    return dest.with_name(dest.name + ".not-made-yet"), label
                from vqtool.artifacts import atomic_write_bytes

                atomic_write_bytes(dest, data)
            return dest, label
        seen += images.shape[0]
    raise VqtoolError(f"{shards}: image {index} of the {split} split not found")
