"""Samplers as objects: the same tokens as before the refactor, the schedule registry, the Halton order."""

from __future__ import annotations

import pytest
import torch
from test_sampling import tiny_prior

from vqtool.prior.inpaint import inpaint_tokens
from vqtool.prior.sample import SampleSettings, sample_tokens, total_work

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
