"""Nearest-neighbour search by LPIPS (random-weight backbones), the memorisation verdict, and the stage."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vqtool.artifacts import load_artifact
from vqtool.errors import VqtoolError
from vqtool.eval.neighbours import memorisation_verdict, nearest_neighbours, preselect, thumbnails
from vqtool.eval.perceptual import load_lpips, lpips_distance
from vqtool.eval.stage import NeighbourSettings, neighbour_check
from vqtool.grids import to_uint8


@pytest.fixture(scope="module")
def lpips_model():
    return load_lpips("alex", random_backbone=True)


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "alexnet-random.pth"
    # torchvision's format, random weights; only `features.*` (the part LPIPS uses) to keep the file small.
    torch.save(torchvision.models.alexnet().features.state_dict(prefix="features."), path)
    return path


def _images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _batches(x: torch.Tensor, size: int):
    for i in range(0, x.shape[0], size):
        yield x[i:i + size]


def test_streamed_preselection_equals_global_top_c():
    train = _images(50, seed=0)
    queries = _images(4, seed=1)
    cand, pool, seen = preselect(queries, _batches(train, 7), candidates=5, thumb_size=4)
    d = torch.cdist(thumbnails(queries, 4), thumbnails(train, 4))
    expected = d.topk(5, dim=1, largest=False).indices
    assert seen == 50
    assert torch.equal(cand.sort(1).values, expected.sort(1).values)
    # Only the candidates' pixels are kept, exactly as uint8 of the originals.
    assert set(pool) == set(expected.flatten().tolist())
    i = int(expected[0, 0])
    assert torch.equal(pool[i], ((train[i].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))


def test_search_with_every_image_as_candidate_equals_brute_force_lpips(lpips_model):
    train = _images(12, seed=2)
    queries = _images(3, seed=3)
    found = nearest_neighbours(queries, _batches(train, 5), lpips_model, k=4, candidates=12, batch_size=64)
    # Brute force on the same uint8-rounded pixels the search keeps.
    rounded = ((train.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    for q in range(3):
        d = lpips_distance(lpips_model, queries[q:q + 1].expand(12, -1, -1, -1), rounded)
        top = d.topk(4, largest=False)
        assert torch.equal(found.indices[q], top.indices)
        assert torch.allclose(found.distances[q], top.values, atol=1e-6)
    assert found.images.shape == (3, 4, 3, 16, 16)
    assert torch.allclose(found.images[0, 0], rounded[found.indices[0, 0]])


def test_a_planted_copy_is_found_at_distance_zero(lpips_model):
    train = _images(300, seed=4)
    queries = torch.cat([_images(3, seed=5), train[217:218]])
    queries = ((queries + 1) * 127.5).round() / 127.5 - 1  # on the pixel grid, as decoded images are
    train = ((train + 1) * 127.5).round() / 127.5 - 1
    found = nearest_neighbours(queries, _batches(train, 64), lpips_model, k=3, candidates=16)
    assert int(found.indices[3, 0]) == 217
    assert float(found.distances[3, 0]) < 1e-6
    assert (found.distances[:3, 0] > 1e-3).all()


def test_verdict_flags_memorisation_copies_and_clean_models():
    g = torch.Generator().manual_seed(6)
    val = 0.2 + 0.4 * torch.rand(200, generator=g, dtype=torch.float64)
    # Novel samples: spread like the val distances, none below its 5th percentile.
    clean = torch.quantile(val, torch.linspace(0.1, 0.95, 16, dtype=torch.float64))
    v = memorisation_verdict(clean, val)
    assert v.verdict == "no sign of memorisation" and v.copies == []
    assert v.threshold == pytest.approx(float(torch.quantile(val, 0.05)))
    # One exact copy among otherwise novel samples: flagged, and called out as a possible copy.
    one_copy = clean.clone()
    one_copy[3] = 0.0
    v = memorisation_verdict(one_copy, val)
    assert 3 in v.flagged and v.copies == [3] and v.verdict == "possible copies"
    assert "sample(s) 3" in v.message
    # Most samples far closer than val images: memorisation by the binomial test.
    memorised = clean.clone()
    memorised[:10] = 0.01
    v = memorisation_verdict(memorised, val)
    assert v.verdict == "memorisation" and len(v.flagged) >= 10 and v.p_value < 1e-6
    assert v.fraction == pytest.approx(len(v.flagged) / 16)


def test_lpips_weights_map_onto_the_backbone(alexnet_file):
    import torchvision

    model = load_lpips("alex", alexnet_file)
    reference = torchvision.models.alexnet()
    reference.load_state_dict(torch.load(alexnet_file, weights_only=True), strict=False)
    assert torch.equal(model.net.slice1[0].weight, reference.features[0].weight)
    assert torch.equal(model.net.slice5._modules["10"].weight, reference.features[10].weight)


def test_missing_lpips_weights_is_one_line_and_net_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(VqtoolError) as err:
        load_lpips("squeeze", download=False)
    msg = str(err.value)
    assert "squeezenet1_1-b8a52dc0.pth" in msg and "https://download.pytorch.org/models/" in msg
    assert "--lpips-weights PATH" in msg and "\n" not in msg
    with pytest.raises(VqtoolError, match="--net 'resnet': choose one of alex, vgg, squeeze"):
        load_lpips("resnet")
    wrong = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(VqtoolError, match="expected torchvision alex weights|does not fit the alex backbone"):
        load_lpips("alex", wrong)


def test_neighbours_stage_finds_and_flags_a_planted_training_image(tiny_run, alexnet_file, tmp_path):
    from vqtool.data.loader import ShardLoader

    train = torch.cat([x for x, _ in ShardLoader(tiny_run / "shards", "train", batch_size=64, infinite=False)])
    folder = tmp_path / "samples"
    folder.mkdir()
    novel = _images(3, seed=7)
    # Sample 2 is an exact copy of training image 11; the others are noise.
    for i, image in enumerate([novel[0], novel[1], train[11], novel[2]]):
        Image.fromarray(to_uint8(image)).save(folder / f"{i}.png")
    s = NeighbourSettings(n=4, k=3, candidates=8, n_val=12, batch_size=16, fake=str(folder),
                          lpips_weights=str(alexnet_file), download=False)
    r = neighbour_check(tiny_run, s, device="cpu", show_progress=False)
    assert int(r.indices[2, 0]) == 11 and float(r.distances[2, 0]) < 1e-6
    assert r.distances.shape == (4, 3) and (r.distances[:, 1:] >= r.distances[:, :-1]).all()
    assert r.val_nearest.shape == (12,)
    assert 2 in r.verdict.flagged and 2 in r.verdict.copies and r.verdict.verdict != "no sign of memorisation"
    report = json.loads(r.json_path.read_text())
    assert report["samples"][2]["neighbours"][0]["train_index"] == 11 and report["samples"][2]["flagged"]
    assert report["train_images"] == 36 and report["verdict"] == r.verdict.verdict
    art = load_artifact(r.artifact_path, "eval-report")
    assert torch.equal(art.tensors["indices"], r.indices)
    with Image.open(r.grid_path) as grid:
        # 4 rows of (sample + 3 neighbours), tiles enlarged from 16 px to 64 px with a caption strip.
        assert grid.size[0] > 4 * 64 and grid.size[1] > 4 * 64
    with pytest.raises(VqtoolError, match="neighbours.json exists; pass --overwrite"):
        neighbour_check(tiny_run, s, device="cpu", show_progress=False)


def test_neighbours_stage_refuses_bad_settings(tiny_run):
    with pytest.raises(VqtoolError, match="--candidates 2: must be at least --k 3"):
        neighbour_check(tiny_run, NeighbourSettings(k=3, candidates=2), device="cpu", show_progress=False)
    with pytest.raises(VqtoolError, match="--percentile 100"):
        neighbour_check(tiny_run, NeighbourSettings(percentile=100), device="cpu", show_progress=False)
