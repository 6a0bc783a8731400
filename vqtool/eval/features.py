"""Image features through torch-fidelity's extractors, and the on-disk cache of real-set features.

One feature pass serves FID, KID and PRDC: the extractor's default layer for those metrics (Inception's
2048-d pool features by default). The extractors take uint8 images of any size and resize internally.
Weights are never fetched silently by torch-fidelity: `load_extractor` resolves the file first (see
`vqtool.eval.pretrained`) and passes it through torch-fidelity's `feature_extractor_weights_path`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch

from vqtool.artifacts import atomic_path, file_sha256, load_artifact, save_artifact
from vqtool.errors import VqtoolError
from vqtool.eval import pretrained
from vqtool.eval.pretrained import WeightsFile

DEFAULT_EXTRACTOR = "inception-v3-compat"
ALIASES = {"inception": "inception-v3-compat", "inception-v3": "inception-v3-compat"}

_HUB = "the torch hub cache"
_checked: set[str] = set()  # sha256 of weights files already proven to hold only tensors, in this process


def _inception_weights() -> WeightsFile:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return WeightsFile("Inception-v3 (torch-fidelity)", URL_INCEPTION_V3.rsplit("/", 1)[1], URL_INCEPTION_V3,
                       "--feature-weights")


def _vgg16_weights() -> WeightsFile:
    from torchvision.models import VGG16_Weights

    url = VGG16_Weights.IMAGENET1K_V1.url
    return WeightsFile("VGG16 (torchvision ImageNet)", url.rsplit("/", 1)[1], url, "--feature-weights")


def _clip_weights(name: str) -> WeightsFile:
    from torch_fidelity.feature_extractor_clip import MODEL_METADATA, MODEL_URLS

    # The file name torch-fidelity itself caches the model under.
    return WeightsFile(f"CLIP {name} (TorchScript)", f"{name}-{MODEL_METADATA[name]['hash']}.pt", MODEL_URLS[name],
                       "--feature-weights")


def extractor_names() -> list[str]:
    """Every extractor torch-fidelity registers (Inception, VGG16, CLIP and DINOv2 variants)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    return sorted(FEATURE_EXTRACTORS_REGISTRY)


def canonical_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in extractor_names():
        raise VqtoolError(f"--features {name!r}: unknown extractor; choose one of {', '.join(extractor_names())}")
    return name


@dataclass
class Extractor:
    model: torch.nn.Module  # a torch-fidelity FeatureExtractorBase
    name: str  # torch-fidelity registry name
    layer: str  # the feature layer used for FID, KID and PRDC
    weights_path: Path
    weights_sha256: str
    device: torch.device
    compiled: Callable | None = None  # torch.compile of `model`, run at one fixed batch shape
    _batch: int = 0  # the batch size the compiled graph was built for

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.model(x)[0]
        # A compiled graph is specialised to its input shape; a smaller last batch is padded to that shape
        # (the extractor is per-image in eval mode, so the padding changes nothing) instead of recompiling.
        if not self._batch:
            self._batch = x.shape[0]
        n = x.shape[0]
        if n < self._batch:
            x = torch.cat([x, x.new_zeros((self._batch - n, *x.shape[1:]))])
        if x.shape[0] > self._batch:
            return torch.cat([self(chunk) for chunk in x.split(self._batch)])
        return self.compiled(x)[0][:n]

    @property
    def key(self) -> dict[str, str]:
        """What identifies these features, for cache keys and reports."""
        return {"extractor": self.name, "layer": self.layer, "weights_sha256": self.weights_sha256}


def load_extractor(
    name: str = DEFAULT_EXTRACTOR,
    weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    download: bool = True,
    layer: str | None = None,
    compile: bool = False,
) -> Extractor:
    """Build torch-fidelity's extractor `name` with resolved weights, in eval mode on `device`.

    `layer` picks another of the extractor's feature layers (torch-fidelity's `feature_layer_fid` option);
    the default is the extractor's standard layer for FID/KID/PRDC (Inception: the 2048-d pool features).
    `compile` runs it through torch.compile: minutes of compilation, then faster extraction (worth it for
    thousands of images).
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    name = canonical_name(name)
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    provided = cls.get_provided_features_list()
    layer = layer or cls.get_default_feature_layer_for_metric("fid")
    if layer not in provided:
        raise VqtoolError(f"--feature-layer {layer!r}: {name} provides {', '.join(provided)}")
    if name.startswith("dinov2"):
        path = _dinov2_checkpoint(name, weights, download)
        kwargs = {}
    else:
        if name == "inception-v3-compat":
            spec = _inception_weights()
        elif name == "vgg16":
            spec = _vgg16_weights()
        else:
            spec = _clip_weights(name)
        path = pretrained.locate(spec, weights, download)
        kwargs = {"feature_extractor_weights_path": str(path)}
    with tempfile.TemporaryDirectory() as tmp:
        if not name.startswith(("clip", "dinov2")):
            # torch-fidelity unpickles this file without restrictions; proving it loads with the tensors-only
            # unpickler first means nothing but tensors can come out of it. It reads only PyTorch's format,
            # so a .safetensors file is handed over as a temporary copy in that format.
            if path.suffix == ".safetensors":
                kwargs["feature_extractor_weights_path"] = str(Path(tmp) / "weights.pth")
                torch.save(pretrained.load_state_dict(path, spec), kwargs["feature_extractor_weights_path"])
            elif file_sha256(path) not in _checked:
                pretrained.load_state_dict(path, spec)
                _checked.add(file_sha256(path))
        try:
            with redirect_stdout(sys.stderr), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = create_feature_extractor(name, [layer], cuda=False, verbose=False, **kwargs)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise VqtoolError(f"--feature-weights {path}: does not fit the {name} architecture ({first})") from None
    device = torch.device(device)
    model.to(device).eval()
    return Extractor(model=model, name=name, layer=layer, weights_path=path, weights_sha256=file_sha256(path),
                     device=device, compiled=torch.compile(model, dynamic=False) if compile else None)


def feature_weights_present(name: str, weights: str | Path | None = None, layer: str | None = None) -> bool:
    """Whether extractor `name` loads with the weights on this machine (never downloads)."""
    try:
        load_extractor(name, weights, "cpu", download=False, layer=layer)
    except VqtoolError:
        return False
    return True


def _dinov2_checkpoint(name: str, weights: str | Path | None, download: bool) -> Path:
    # torch-fidelity builds DINOv2 through torch.hub (a cached repository plus a checkpoint) and takes no path.
    from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA

    if weights is not None:
        raise VqtoolError(
            f"--feature-weights: torch-fidelity takes no weights path for {name}; put the facebookresearch/dinov2 "
            f"hub repository and its checkpoint into {pretrained.hub_checkpoints_dir().parent}"
        )
    arch = MODEL_METADATA[name]
    filename = f"{arch}_pretrain.pth"
    url = f"https://dl.fbaipublicfiles.com/dinov2/{arch}/{filename}"
    repo = pretrained.hub_checkpoints_dir().parent / "facebookresearch_dinov2_main"
    checkpoint = pretrained.hub_checkpoints_dir() / filename
    if not download and not (repo.is_dir() and checkpoint.is_file()):
        missing = repo if not repo.is_dir() else checkpoint
        raise VqtoolError(
            f"DINOv2 {name} weights missing: {missing} (downloads are off; the checkpoint comes from {url}); "
            f"copy the facebookresearch/dinov2 repository and {filename} into {_HUB} {repo.parent}"
        )
    if download and not checkpoint.is_file():
        pretrained.locate(WeightsFile(f"DINOv2 {name}", filename, url, "the torch hub cache"), None, True)
    return checkpoint


def to_uint8_batch(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in [-1, 1] → uint8, the input torch-fidelity's extractors expect."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def extract_features(
    extractor: Extractor,
    batches: Iterable[torch.Tensor],
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Features (N, D) float32 on the CPU of every image in `batches` (each (B, 3, H, W) in [-1, 1]).

    Always in fp32, also inside a stage's autocast region: scores must not depend on --precision."""
    from vqtool.precision import full_precision

    out = []
    for images in batches:
        x = to_uint8_batch(images).to(extractor.device)
        with full_precision(torch.device(extractor.device)):
            out.append(extractor(x).float().cpu())
        if on_batch is not None:
            on_batch(images.shape[0])
    if not out:
        raise VqtoolError("no images to extract features from")
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# The feature cache: one `features` artifact per (data, split, n, extractor, layer, weights).


def cache_key(source_key: str, n: int, extractor: Extractor) -> str:
    fields = {"source": source_key, "n": n, **extractor.key}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: Path, source_key: str, n: int, extractor: Extractor) -> Path:
    return Path(cache_dir) / f"features-{cache_key(source_key, n, extractor)[:20]}.safetensors"


def load_cached(cache_dir: Path | None, source_key: str, n: int, extractor: Extractor) -> torch.Tensor | None:
    """Cached features (n, D) of this exact (data, n, extractor, layer, weights), or None."""
    if cache_dir is None:
        return None
    path = cache_path(cache_dir, source_key, n, extractor)
    if not path.exists():
        return None
    art = load_artifact(path, "features")
    feats = art.tensors.get("features")
    expected = {"source": source_key, "n": n, **extractor.key}
    if art.config != expected or feats is None or feats.ndim != 2 or feats.shape[0] != n:
        return None  # a stale or foreign file under this name: recompute and replace it
    return feats.float()


def store_cached(cache_dir: Path, source_key: str, n: int, extractor: Extractor, features: torch.Tensor,
                 parents: dict[str, str] | None = None) -> Path:
    if features.shape[0] != n:
        raise ValueError(f"{features.shape[0]} feature rows for n={n}")
    path = cache_path(cache_dir, source_key, n, extractor)
    config = {"source": source_key, "n": n, **extractor.key}
    save_artifact(path, "features", {"features": features}, config=config, parents=parents or {},
                  extra={"dim": int(features.shape[1])})
    return path


def cached_features(
    cache_dir: Path | None,
    source_key: str,
    n: int,
    extractor: Extractor,
    compute: Callable[[], torch.Tensor],
    parents: dict[str, str] | None = None,
) -> tuple[torch.Tensor, Path | None, bool]:
    """Features of a real set from the cache, or computed and stored there; returns (features, path, hit)."""
    feats = load_cached(cache_dir, source_key, n, extractor)
    if feats is not None:
        return feats, cache_path(cache_dir, source_key, n, extractor), True
    feats = compute()
    if cache_dir is None:
        return feats, None, False
    return feats, store_cached(cache_dir, source_key, n, extractor, feats, parents), False


# --------------------------------------------------------------------------------------------------
# Randomly initialised weights, for offline smoke tests and benchmarks (never for reported numbers).


def write_random_weights(path: str | Path, name: str = DEFAULT_EXTRACTOR, seed: int = 0) -> Path:
    """Save a randomly initialised state dict of extractor `name`'s architecture to `path`.

    torch-fidelity only reads weights in PyTorch's own format, so this is a `torch.save` file. Convolutions
    get variance-preserving (He) initialisation so features keep a useful scale through the deep network.
    """
    name = canonical_name(name)
    path = Path(path)
    if name == "inception-v3-compat":
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        class _Unloaded(FeatureExtractorInceptionV3):
            def load_state_dict(self, state_dict, strict=True, assign=False):
                return None  # keep the random initialisation

        with atomic_path(path) as empty:  # the constructor insists on reading some weights file
            torch.save({}, empty)
            model: torch.nn.Module = _Unloaded(name, ["2048"], feature_extractor_weights_path=str(empty))
    elif name == "vgg16":
        import torchvision

        model = torchvision.models.vgg16()
    else:
        raise ValueError(f"random weights are only offered for inception-v3-compat and vgg16, not {name}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path
