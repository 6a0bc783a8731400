"""Inpainting: mask geometry, tokens outside the mask never change, the process continues from the
matching step, AR priors are refused, and the `inpaint` command end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_sampling import Spy, V, tiny_prior, write_tiny_run
from typer.testing import CliRunner

from vqtool.errors import VqtoolError
from vqtool.prior.inpaint import (
    box_mask,
    cell_mask,
    centre_box,
    extract_image,
    fit_mask,
    inpaint_tokens,
    parse_box,
    read_image_size,
    token_mask,
)
from vqtool.prior.sample import SampleSettings, TransformerPredictor
from vqtool.prior.schedules import Draw, RandomSchedule, reveal

# --------------------------------------------------------------------------------------------------
# Geometry


def test_box_to_token_cells():
    pixels = torch.from_numpy(box_mask((4, 4, 9, 8), (16, 16)))
    assert int(pixels.sum()) == 5 * 4
    tokens = token_mask(pixels, (4, 4))  # 4×4 pixel cells
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[1, 1:3] = True  # rows 4..7 → token row 1; columns 4..8 touch token columns 1 and 2
    assert torch.equal(tokens, want)
    cells = cell_mask(tokens, 16)
    assert int(cells.sum()) == 2 * 16 and bool(cells[4:8, 4:12].all())
    # A single pixel masks its whole token.
    one = torch.zeros(16, 16, dtype=torch.bool)
    one[15, 0] = True
    assert token_mask(one, (4, 4)).nonzero().tolist() == [[3, 0]]


def test_parse_box_and_bounds():
    assert parse_box("1, 2,3,4") == (1, 2, 3, 4)
    with pytest.raises(VqtoolError, match="--box"):
        parse_box("1,2,3")
    with pytest.raises(VqtoolError, match="--box"):
        parse_box("a,b,c,d")
    with pytest.raises(VqtoolError, match="--box"):
        box_mask((5, 0, 5, 4), (16, 16))  # empty
    with pytest.raises(VqtoolError, match="--box"):
        box_mask((0, 0, 17, 4), (16, 16))  # outside


def test_the_pipeline_source_image_is_a_val_image_of_the_shards(tiny_shards, tmp_path):
    dest = tmp_path / "source.png"
    assert extract_image(tiny_shards, 3, dest, write=False)[0].name == "source.png.not-made-yet"
    assert not dest.exists()
    path, label = extract_image(tiny_shards, 3, dest)
    assert path == dest and 0 <= label < 8 and read_image_size(dest) == (16, 16)
    assert extract_image(tiny_shards, 3, dest, write=False) == (dest, label)  # already there: nothing to make
    assert extract_image(tiny_shards, 4, dest, write=False)[0] != dest  # another image: its stage has to run
    assert centre_box((16, 12)) == (4, 3, 12, 9)
    with pytest.raises(VqtoolError, match="inpaint.val_index 12: the val split .* has 12 images"):
        extract_image(tiny_shards, 12, dest)


def test_fit_mask_follows_the_centre_crop():
    # A 20 wide × 16 high image: the centre crop drops 2 columns on each side, then 16 → 8 pixels.
    mask = np.zeros((16, 20), dtype=bool)
    mask[:, :2] = True  # only in the cropped-away strip
    assert not fit_mask(mask, 8).any()
    mask[:, 2] = True  # first column kept by the crop
    fitted = fit_mask(mask, 8)
    assert fitted.shape == (8, 8) and fitted[:, 0].all() and not fitted[:, 1:].any()
    same = np.eye(8, dtype=bool)
    assert np.array_equal(fit_mask(same, 8), same)  # already VQ-sized


# --------------------------------------------------------------------------------------------------
# The algorithm


@pytest.mark.parametrize("schedule", ["random", "confidence"])
def test_inpainting_never_changes_tokens_outside_the_mask(schedule):
    prior = tiny_prior()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (4, 4), generator=g)
    masked = torch.zeros(4, 4, dtype=torch.bool)
    masked[1:3, 0:3] = True
    out = inpaint_tokens(prior, tokens, masked, 5, SampleSettings(steps=8, schedule=schedule, batch_size=2))
    assert out.shape == (5, 4, 4) and out.dtype == torch.long
    assert torch.equal(out[:, ~masked], tokens[~masked].expand(5, -1))
    assert (out >= 0).all() and (out < V).all()
    # The masked part is redrawn: with 6 tokens × 5 completions it cannot all equal the original.
    assert not torch.equal(out[:, masked], tokens[masked].expand(5, -1))


def test_inpainting_continues_from_the_matching_step():
    model = tiny_prior().model
    tokens = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))
    tokens[:, [2, 5, 11, 12]] = V  # 4 of 16 masked
    spy = Spy(TransformerPredictor(model))
    out = reveal(spy, tokens, V, RandomSchedule(), 16, Draw(), torch.Generator().manual_seed(0))
    assert len(spy.calls) == 4  # a 16-step schedule has 4 steps left when 4 tokens are masked
    spy = Spy(TransformerPredictor(model))
    reveal(spy, tokens, V, RandomSchedule(), 4, Draw(), torch.Generator().manual_seed(0))
    assert len(spy.calls) == 1  # a 4-step schedule reveals 4 per step: one step left
    keep = tokens != V
    assert torch.equal(out[keep], tokens[keep]) and (out != V).all()


def test_inpainting_is_seeded():
    prior = tiny_prior()
    tokens = torch.randint(0, V, (4, 4), generator=torch.Generator().manual_seed(2))
    masked = torch.rand(4, 4, generator=torch.Generator().manual_seed(3)) < 0.5
    a = inpaint_tokens(prior, tokens, masked, 3, SampleSettings(steps=16, seed=4))
    b = inpaint_tokens(prior, tokens, masked, 3, SampleSettings(steps=16, seed=4))
    assert torch.equal(a, b)


def test_autoregressive_prior_is_refused():
    prior = tiny_prior(causal=True)
    tokens = torch.zeros(4, 4, dtype=torch.long)
    with pytest.raises(VqtoolError, match="absorbing prior"):
        inpaint_tokens(prior, tokens, tokens == 0, 1, SampleSettings())


# --------------------------------------------------------------------------------------------------
# The command


def _photo(path, size=(20, 16)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_inpaint_command_with_a_box(tmp_path):
    from vqtool.cli import app
    from vqtool.samples import load_samples

    run = tmp_path / "run"
    vq_sha = write_tiny_run(run)
    image = tmp_path / "photo.png"
    _photo(image)
    args = ["inpaint", str(image), "--run", str(run), "--box", "2,0,10,8", "--n", "3", "--steps", "64",
            "--device", "cpu", "--keep-pixels"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    out = run / "inpaint"
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["completion-00.png", "completion-01.png", "completion-02.png", "grid.png", "mask.png",
                     "original.png", "reconstruction.png"]
    s = load_samples(out / "inpaint.safetensors")
    assert s.artifact.parents["vq"] == vq_sha and "image" in s.artifact.parents
    # Box x 2..9 of the 20-wide image = x 0..7 after the crop, at 16 px (scale 1): token cells 0..3 of 8.
    masked = torch.tensor(s.artifact.extra["token_mask"]).bool().view(8, 8)
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[0:4, 0:4] = True
    assert torch.equal(masked, want)
    original = torch.tensor(s.artifact.extra["original_tokens"]).view(8, 8)
    assert torch.equal(s.tokens[:, ~masked], original[~masked].expand(3, -1))
    assert s.settings["steps_run"] == 16 and s.settings["masked_tokens"] == 16
    # --keep-pixels: outside the box every pixel is the original's.
    orig = np.asarray(Image.open(out / "original.png"))
    comp = np.asarray(Image.open(out / "completion-01.png"))
    outside = np.ones((16, 16), dtype=bool)
    outside[0:8, 0:8] = False
    assert np.array_equal(comp[outside], orig[outside])
    assert not np.array_equal(comp[~outside], orig[~outside])
    assert Image.open(out / "grid.png").size[0] > 5 * 16


def test_inpaint_command_with_a_mask_png_and_errors(tmp_path):
    from vqtool.cli import app
    from vqtool.samples import load_samples

    run = tmp_path / "run"
    write_tiny_run(run)
    image = tmp_path / "photo.png"
    _photo(image, (16, 16))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[10:12, 10:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    runner = CliRunner()
    base = ["inpaint", str(image), "--run", str(run), "--device", "cpu", "--n", "2"]
    r = runner.invoke(app, [*base, "--mask", str(tmp_path / "mask.png")])
    assert r.exit_code == 0, r.output
    s = load_samples(run / "inpaint" / "inpaint.safetensors")
    assert s.settings["masked_tokens"] == 1  # pixels 10..11 are token (5, 5)

    def error(extra):
        res = runner.invoke(app, [*base, *extra])
        assert res.exit_code == 2, res.output
        assert len(res.output.strip().splitlines()) == 1
        return res.output

    assert "--overwrite" in error(["--mask", str(tmp_path / "mask.png")])
    assert "exactly one" in error(["--overwrite"])
    assert "exactly one" in error(["--overwrite", "--mask", str(tmp_path / "mask.png"), "--box", "0,0,2,2"])
    Image.fromarray(np.zeros((5, 7), dtype=np.uint8)).save(tmp_path / "small.png")
    assert "mask is 7x5" in error(["--overwrite", "--mask", str(tmp_path / "small.png")])
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "empty.png")
    assert "covers no pixels" in error(["--overwrite", "--mask", str(tmp_path / "empty.png")])
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert "cannot use this image" in runner.invoke(
        app, ["inpaint", str(tmp_path / "junk.png"), "--run", str(run), "--box", "0,0,4,4", "--device", "cpu",
              "--overwrite"]).output

    ar = tmp_path / "ar"
    write_tiny_run(ar, kind="autoregressive")
    res = runner.invoke(app, ["inpaint", str(image), "--run", str(ar), "--box", "0,0,4,4", "--device", "cpu"])
    assert res.exit_code == 2 and "absorbing prior" in res.output
