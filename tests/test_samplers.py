"""Samplers as objects: the same tokens as before the refactor, the schedule registry, the Halton order."""

from __future__ import annotations

import dataclasses
from collections import Counter
from fractions import Fraction as F

import pytest
import torch
from PIL import Image
from test_sampling import Spy, tiny_prior, write_tiny_run

import vqtool.prior.inpaint
import vqtool.prior.sample
from vqtool.errors import VqtoolError
from vqtool.prior.inpaint import inpaint_image, inpaint_tokens
from vqtool.prior.logits import Draw
from vqtool.prior.orders import ORDERS, halton_order, make_order, radical_inverse
from vqtool.prior.sample import SampleSettings, sample_images, sample_tokens, total_work
from vqtool.prior.schedules import SCHEDULES, ConfidenceSchedule, RandomSchedule, make_schedule, reveal

HEX = "0123456789abcdef"


def hexes(tokens: torch.Tensor) -> str:
    """Token ids below 16 as one hex digit each, in raster order: a readable fingerprint of a draw."""
    return "".join(HEX[int(v)] for v in tokens.reshape(-1))


# --------------------------------------------------------------------------------------------------
# Unchanged behaviour: tokens recorded from the sampler before it became registry + Sampler objects.
# (prior kwargs, settings, n, total_work, tokens)
RECORDED = {
    "random": ({}, {"steps": 5, "temperature": 0.9, "batch_size": 2, "seed": 3}, 3, 10,
               "b794419747674414b647414bb917224194174b97b162bbb4"),
    "raster": ({}, {"steps": 4, "order": "raster", "batch_size": 3, "seed": 1}, 3, 4,
               "b211b94944444144b21bb14647466164bb1141b9b9b64946"),
    "confidence": ({}, {"steps": 6, "schedule": "confidence", "top_k": 5, "batch_size": 2, "seed": 2}, 3, 12,
                   "464447464447b14427b4b11117471bbb4144bb97b4474447"),
    "arccos": ({}, {"steps": 3, "schedule": "confidence", "curve": "arccos", "top_p": 0.9, "seed": 5}, 2, 3,
               "9b9b4b974174bb1741414b4111b74117"),
    "windows": ({}, {"steps": 4, "shape": (6, 5), "stride": 2, "batch_size": 2, "seed": 4}, 2, 4,
                "4b111b411411a6149b6b09b4129b194b177bb171444b747166b027bb140b"),
    "classes": ({"n_classes": 3}, {"steps": 4, "seed": 6}, 3, 4,
                "15558818111b8181155588181b158585181888181111b111"),
    "ar": ({"causal": True}, {"temperature": 0.8, "top_k": 6, "batch_size": 2, "seed": 7}, 3, 32,
           "77a227799719178177a9a7774917191877a77299271a7171"),
    "ar-recompute": ({"causal": True}, {"use_cache": False, "batch_size": 2, "seed": 7}, 3, 32,
                     "7729a7778229917977a9a7774917191877a77299271a7171"),
    "ar-wide": ({"causal": True}, {"shape": (5, 6), "top_p": 0.8, "seed": 8}, 2, 30,
                "77897a99977a99741a7a24497a174a77a77a72977082171a4717191a4777"),
    "ar-classes": ({"causal": True, "n_classes": 3}, {"seed": 9}, 3, 16,
                   "11111b81b881188b11111b818511ba9711111b81851bbb71"),
}


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_existing_samplers_draw_the_recorded_tokens(case):
    prior_kw, settings, n, work, want = RECORDED[case]
    prior = tiny_prior(**prior_kw)
    settings = SampleSettings(**settings)
    assert hexes(sample_tokens(prior, n, settings)) == want
    assert total_work(prior, n, settings) == work


@pytest.mark.parametrize("schedule, want", [
    ("random", "4446bb678341141440b64b6783b114174747bb67831144b9"),
    ("confidence", "9a47bb6783b1b44ba147416783b17bbb476b91678361bb76"),
])
def test_inpainting_draws_the_recorded_tokens(schedule, want):
    tokens = torch.randint(0, 12, (4, 4), generator=torch.Generator().manual_seed(2))
    masked = torch.rand(4, 4, generator=torch.Generator().manual_seed(3)) < 0.5
    assert hexes(tokens) == "035023678361b79b" and hexes(masked.long()) == "1111110000101111"
    settings = SampleSettings(steps=8, schedule=schedule, seed=4, batch_size=2)
    assert hexes(inpaint_tokens(tiny_prior(), tokens, masked, 3, settings)) == want


# --------------------------------------------------------------------------------------------------
# The registries


def test_schedule_and_order_registries_round_trip():
    for name, kind in SCHEDULES.items():
        schedule = make_schedule(name, grid=(4, 4))
        assert type(schedule) is kind and schedule.name == name
        for order in kind.orders:
            assert make_schedule(name, order, grid=(4, 4)).order.name == order
    for name, kind in ORDERS.items():
        order = make_order(name, (4, 4))
        assert type(order) is kind and order.name == name
    assert sorted(SCHEDULES) == ["confidence", "random"] and sorted(ORDERS) == ["halton", "random", "raster"]


def test_registry_refusals_name_the_valid_values():
    with pytest.raises(VqtoolError, match=r"--schedule must be one of random, confidence \(got 'linear'\)"):
        make_schedule("linear")
    with pytest.raises(VqtoolError, match=r"--order must be one of random, raster, halton \(got 'spiral'\)"):
        make_schedule("random", "spiral")
    with pytest.raises(VqtoolError, match=r"--curve must be one of cosine, arccos"):
        make_schedule("random", curve="linear")
    with pytest.raises(VqtoolError, match=r"--order raster applies to --schedule random; "
                                          r"the confidence schedule takes random \| halton"):
        make_schedule("confidence", "raster")
    with pytest.raises(VqtoolError, match="needs the token grid"):
        make_order("halton")


def test_a_new_schedule_is_one_class_and_one_registry_entry(monkeypatch):
    class AllAtOnce(RandomSchedule):
        """Every token in one step."""

        name = "all-at-once"

        def masked_after(self, n_tokens: int, steps: int) -> list[int]:
            return [n_tokens, 0]

    monkeypatch.setitem(SCHEDULES, "all-at-once", AllAtOnce)
    prior = tiny_prior()
    settings = SampleSettings(schedule="all-at-once", order="halton", steps=50, batch_size=2)
    tokens = sample_tokens(prior, 3, settings)
    assert tokens.shape == (3, 4, 4) and (tokens < 12).all()
    assert total_work(prior, 3, settings) == 2  # two batches of one step each


def test_a_draw_checks_its_settings_when_made():
    for kwargs, option in [({"temperature": 0.0}, "--temperature"), ({"top_k": 0}, "--top-k"),
                           ({"top_p": 0.0}, "--top-p")]:
        with pytest.raises(VqtoolError, match=option):
            Draw(**kwargs)


# --------------------------------------------------------------------------------------------------
# The Halton order


def test_radical_inverse_exact_values():
    assert [radical_inverse(i, 2) for i in range(1, 9)] == [
        F(1, 2), F(1, 4), F(3, 4), F(1, 8), F(5, 8), F(3, 8), F(7, 8), F(1, 16)]
    assert [radical_inverse(i, 3) for i in range(1, 10)] == [
        F(1, 3), F(2, 3), F(1, 9), F(4, 9), F(7, 9), F(2, 9), F(5, 9), F(8, 9), F(1, 27)]
    assert radical_inverse(0, 2) == 0 and radical_inverse(6, 2) == F(3, 8)  # 6 = 110₂ → 0.011₂


def test_halton_order_of_a_4x4_grid_by_hand():
    # Point i = (φ₂(i), φ₃(i)) falls into row ⌊4·φ₂⌋, column ⌊4·φ₃⌋, position 4·row + column:
    # i=1 (1/2, 1/3) → 9; i=2 (1/4, 2/3) → 6; i=3 (3/4, 1/9) → 12; i=4 (1/8, 4/9) → 1; i=5 (5/8, 7/9) → 11;
    # i=6 (3/8, 2/9) → 4; i=7 (7/8, 5/9) → 14; i=8 (1/16, 8/9) → 3; i=9 (9/16, 1/27) → 8;
    # i=10 (5/16, 10/27) → 5; i=11 (13/16, 19/27) → 14 again, skipped; i=12 (3/16, 4/27) → 0.
    assert halton_order((4, 4))[:11] == (9, 6, 12, 1, 11, 4, 14, 3, 8, 5, 0)


@pytest.mark.parametrize("grid", [(1, 1), (1, 7), (7, 1), (3, 5), (4, 4), (7, 2), (8, 8), (13, 11), (16, 16)])
def test_halton_order_visits_every_position_exactly_once(grid):
    order = halton_order(grid)
    assert sorted(order) == list(range(grid[0] * grid[1]))


def test_halton_order_spreads_every_prefix_over_the_grid():
    first = halton_order((8, 8))[:8]
    assert sorted(p // 8 for p in first) == list(range(8)) == sorted(p % 8 for p in first)  # a rook placement
    # 64 of 256 positions: 4 per 4×4 block on average; the sequence keeps every block within one of that.
    blocks = Counter((p // 16 // 4, p % 16 // 4) for p in halton_order((16, 16))[:64])
    assert len(blocks) == 16 and set(blocks.values()) <= {3, 4, 5}


def uniform_predict(tokens, positions):
    return torch.zeros(*positions.shape, 12)


def test_random_schedule_reveals_in_halton_order():
    for steps, per_step in [(16, 1), (4, 4)]:
        spy = Spy(uniform_predict)
        reveal(spy, torch.full((2, 16), 12), 12, make_schedule("random", "halton", grid=(4, 4)), steps, Draw(),
               torch.Generator().manual_seed(0))
        order = torch.cat([p for _, p in spy.calls], dim=1)
        assert all(p.shape == (2, per_step) for _, p in spy.calls)
        assert order.tolist() == [list(halton_order((4, 4)))] * 2


def test_confidence_with_halton_lays_its_noise_out_in_halton_order():
    order = make_order("halton", (4, 4))
    everything = torch.arange(16).expand(2, 16)
    rank = torch.tensor(halton_order((4, 4))).argsort()  # rank[p]: p's place in the order
    assert torch.allclose(order.preference(everything, 16, torch.Generator()), 1 - (rank + 0.5) / 16)
    # Equal confidences everywhere: the noise alone picks, so the first masked positions in Halton order win.
    tokens = torch.full((1, 16), 12)
    tokens[0, 9] = 3  # already revealed: the first Halton position is not masked
    masked = tokens == 12
    ConfidenceSchedule(order=order).step(uniform_predict, tokens, masked, 3, 0.0, Draw(), torch.Generator())
    assert sorted(torch.nonzero(~masked[0]).flatten().tolist()) == sorted([9, 6, 12, 1])


@pytest.mark.parametrize("schedule", ["random", "confidence"])
def test_halton_samples_are_reproducible_from_the_seed(schedule):
    prior = tiny_prior()
    settings = SampleSettings(schedule=schedule, order="halton", steps=5, batch_size=2, seed=3)
    a = sample_tokens(prior, 3, settings)
    assert torch.equal(a, sample_tokens(prior, 3, settings))
    assert not torch.equal(a, sample_tokens(prior, 3, dataclasses.replace(settings, seed=4)))
    # A larger grid gets its own Halton order over the whole grid.
    wide = sample_tokens(prior, 2, dataclasses.replace(settings, shape=(6, 5), stride=2))
    assert wide.shape == (2, 6, 5) and (wide < 12).all()


# --------------------------------------------------------------------------------------------------
# Built once per call


def test_sample_and_inpaint_build_their_sampler_once(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_tiny_run(run)
    made = Counter()
    for module, name in [(vqtool.prior.sample, "make_sampler"), (vqtool.prior.inpaint, "make_sampler"),
                         (vqtool.prior.sample, "make_schedule")]:
        def counted(*args, _inner=getattr(module, name), _name=name, **kwargs):
            made[_name] += 1
            return _inner(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    settings = SampleSettings(steps=3, batch_size=2)
    sample_images(run / "prior.safetensors", run / "vq.safetensors", tmp_path / "samples", 5, settings,
                  device="cpu")
    assert made == {"make_sampler": 1, "make_schedule": 1}
    made.clear()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "red.png")
    r = inpaint_image(run / "prior.safetensors", run / "vq.safetensors", tmp_path / "red.png", tmp_path / "inpaint",
                      3, settings, box=(0, 0, 8, 8), device="cpu")
    assert made == {"make_sampler": 1, "make_schedule": 1} and r.steps_run >= 1


def test_sample_command_takes_order_halton(tmp_path):
    from typer.testing import CliRunner

    from vqtool.cli import app
    from vqtool.samples import load_samples

    run = tmp_path / "run"
    write_tiny_run(run)
    args = ["sample", "--run", str(run), "--n", "2", "--steps", "4", "--device", "cpu", "--schedule", "confidence"]
    r = CliRunner().invoke(app, [*args, "--order", "halton"])
    assert r.exit_code == 0, r.output
    s = load_samples(run / "samples" / "samples.safetensors")
    assert s.settings["order"] == "halton" and s.tokens.shape == (2, 8, 8)
    r = CliRunner().invoke(app, [*args, "--order", "raster", "--out", str(tmp_path / "other")])
    assert r.exit_code == 2 and "the confidence schedule takes random | halton" in r.output
