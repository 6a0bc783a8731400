"""Feature extraction through torch-fidelity with a random-weights Inception; weights handling; the cache."""

from __future__ import annotations

import pickle
import urllib.error

import pytest
import torch

from vqtool.artifacts import file_sha256, read_metadata
from vqtool.errors import VqtoolError
from vqtool.eval import features, pretrained
from vqtool.eval.metrics import fid


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    # torch-fidelity reads Inception weights only in PyTorch's own format, so this file is a torch.save.
    # One file per test session, shared by the eval test modules (it is ~100 MB).
    path = tmp_path_factory.getbasetemp() / "eval-inception-random.pth"
    return path if path.exists() else features.write_random_weights(path, seed=0)


@pytest.fixture(scope="module")
def extractor(inception_weights):
    return features.load_extractor("inception", inception_weights, "cpu", download=False)


@pytest.fixture
def small_inputs(monkeypatch):
    """Test speed only: the same network fed 75 px (Inception's smallest input) instead of 299 px, ~16x cheaper."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache with nothing in it, and any download attempt failing like an offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, destination):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(pretrained, "fetch", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_random_inception_gives_2048_d_features(extractor):
    assert extractor.name == "inception-v3-compat" and extractor.layer == "2048"
    f = features.extract_features(extractor, [_images(2, seed=0)])
    assert f.shape == (2, 2048) and f.dtype == torch.float32
    assert torch.isfinite(f).all() and f.std() > 0


def test_self_fid_is_zero_and_batching_does_not_change_features(inception_weights, small_inputs):
    ex = features.load_extractor("inception", inception_weights, "cpu", download=False, layer="64")
    assert ex.layer == "64" and ex.key["layer"] == "64"
    x = _images(6, seed=0)
    f = features.extract_features(ex, [x[:4], x[4:]])
    assert f.shape == (6, 64)
    assert abs(fid(f, f)) < 1e-6
    assert torch.allclose(f, features.extract_features(ex, [x]), atol=1e-5)
    assert fid(f, features.extract_features(ex, [_images(6, seed=1)])) > 0


def test_unknown_feature_layer_lists_the_layers(inception_weights):
    with pytest.raises(VqtoolError, match="--feature-layer '4096': inception-v3-compat provides 64, 192, 768, 2048"):
        features.load_extractor("inception", inception_weights, "cpu", download=False, layer="4096")


def test_uint8_conversion_rounds_to_the_pixel_grid():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 5, 1, 1).expand(1, 5, 1, 1)
    out = features.to_uint8_batch(x)
    assert out.dtype == torch.uint8
    assert out.flatten().tolist() == [0, 64, 128, 255, 255]


def test_missing_inception_weights_offline_is_one_line_naming_file_url_and_option(empty_hub):
    with pytest.raises(VqtoolError) as err:
        features.load_extractor("inception", None, "cpu", download=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert "weights-inception-2015-12-05-6726825d.pth" in msg
    assert "https://github.com/toshas/torch-fidelity/releases" in msg
    assert "--feature-weights PATH" in msg and str(empty_hub) in msg
    assert "download failed" in msg
    with pytest.raises(VqtoolError, match="downloads are off"):
        features.load_extractor("inception", None, "cpu", download=False)


def test_weights_in_the_hub_cache_are_found_without_the_option(empty_hub, inception_weights):
    empty_hub.mkdir(parents=True)
    (empty_hub / "weights-inception-2015-12-05-6726825d.pth").symlink_to(inception_weights)
    ex = features.load_extractor("inception", None, "cpu", download=False)
    assert ex.weights_path == empty_hub / "weights-inception-2015-12-05-6726825d.pth"
    assert ex.weights_sha256 == file_sha256(inception_weights)


def test_weight_probes_say_whether_the_weights_are_here_without_downloading(empty_hub, inception_weights):
    from vqtool.eval.perceptual import backbone_weights, lpips_weights_present

    assert not features.feature_weights_present("inception")  # `empty_hub` fails any download attempt
    assert not lpips_weights_present("alex")
    assert features.feature_weights_present("inception", inception_weights)
    empty_hub.mkdir(parents=True)
    (empty_hub / "weights-inception-2015-12-05-6726825d.pth").symlink_to(inception_weights)
    (empty_hub / backbone_weights("alex").filename).write_bytes(b"")  # the probe locates, it does not load
    assert features.feature_weights_present("inception") and lpips_weights_present("alex")
    assert not lpips_weights_present("vgg")


def test_explicit_weights_path_that_does_not_exist(tmp_path):
    with pytest.raises(VqtoolError, match=r"--feature-weights .*missing\.pth: file not found .*github"):
        features.load_extractor("inception", tmp_path / "missing.pth", "cpu", download=False)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weights_that_are_not_a_plain_state_dict_are_refused_before_torch_fidelity_unpickles_them(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"Conv2d_1a_3x3.conv.weight": _Payload()}))
    with pytest.raises(VqtoolError, match="not a plain PyTorch state dict"):
        features.load_extractor("inception", path, "cpu", download=False)
    assert "this must never run" not in capsys.readouterr().out


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(VqtoolError, match="does not fit the inception-v3-compat architecture"):
        features.load_extractor("inception", path, "cpu", download=False)


def test_safetensors_weights_give_the_same_features(tmp_path, inception_weights, extractor, small_inputs):
    from safetensors.torch import save_file

    state = torch.load(inception_weights, weights_only=True)
    path = tmp_path / "inception.safetensors"
    save_file(state, str(path))
    ex = features.load_extractor("inception", path, "cpu", download=False)
    x = _images(1, seed=1)
    assert torch.allclose(features.extract_features(ex, [x]), features.extract_features(extractor, [x]), atol=1e-5)


def test_unknown_extractor_lists_the_choices():
    with pytest.raises(VqtoolError, match="choose one of .*inception-v3-compat.*vgg16"):
        features.canonical_name("resnet")


def test_dinov2_refuses_a_weights_path():
    with pytest.raises(VqtoolError, match="takes no weights path for dinov2-vit-s-14"):
        features.load_extractor("dinov2-vit-s-14", "/tmp/x.pth", "cpu", download=False)


def test_feature_cache_computes_once_and_keys_on_data_n_and_weights(tmp_path, extractor):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6, dtype=torch.float32).view(3, 2)

    f1, path, hit = features.cached_features(tmp_path, "shards:abc:train", 3, extractor, compute, {"dataset": "abc"})
    assert not hit and len(calls) == 1 and path.exists()
    meta = read_metadata(path, "features")
    assert meta.config["source"] == "shards:abc:train" and meta.config["n"] == 3
    assert meta.config["weights_sha256"] == extractor.weights_sha256 and meta.parents == {"dataset": "abc"}
    f2, path2, hit2 = features.cached_features(tmp_path, "shards:abc:train", 3, extractor, compute)
    assert hit2 and path2 == path and len(calls) == 1 and torch.equal(f1, f2)
    # Another n or another dataset is another entry.
    assert features.cache_path(tmp_path, "shards:abc:train", 4, extractor) != path
    assert features.cache_path(tmp_path, "shards:abd:train", 3, extractor) != path
    assert features.load_cached(tmp_path, "shards:abc:val", 3, extractor) is None
    # No cache folder: always computed.
    _, none_path, hit3 = features.cached_features(None, "k", 3, extractor, compute)
    assert none_path is None and not hit3 and len(calls) == 2


def test_compiled_extractor_always_sees_one_batch_shape_and_gives_the_same_features(inception_weights,
                                                                                     small_inputs):
    # A stand-in for torch.compile (real compilation takes minutes): the eager model, recording shapes.
    ex = features.load_extractor("inception", inception_weights, "cpu", download=False, layer="64")
    shapes = []

    def compiled(x):
        shapes.append(tuple(x.shape))
        return ex.model(x)

    x = _images(7, seed=2)
    eager = features.extract_features(ex, [x])
    ex.compiled = compiled
    out = features.extract_features(ex, [x[:3], x[3:6], x[6:]])  # batches of 3, 3 and a partial 1
    assert torch.allclose(out, eager, atol=1e-5) and out.shape == (7, 64)
    assert set(shapes) == {(3, 3, 16, 16)}
