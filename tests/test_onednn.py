"""vqtool.prior.onednn: inference Linear layers through oneDNN on CPU, the same numbers as F.linear,
only where no gradient is needed, and used by the samplers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_sampling import tiny_prior

from vqtool.prior import onednn
from vqtool.prior.inpaint import inpaint_tokens
from vqtool.prior.sample import SampleSettings, sample_tokens

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear op")


@pytest.fixture
def calls(monkeypatch):
    """The number of F.linear calls that went through oneDNN."""
    seen = []
    real = onednn.linear

    def counting(x, weight, bias=None):
        seen.append(tuple(x.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(onednn, "linear", counting)
    return seen


@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_same_numbers_as_f_linear(shape, with_bias, calls):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(24, 16)
    b = torch.randn(24) if with_bias else None
    want = F.linear(x, w, b)
    with onednn.onednn_linears("cpu"), torch.inference_mode():
        got = F.linear(x, w, b)
        sliced = F.linear(x, w[8:], None if b is None else b[8:])  # row slices, as the samplers take them
        module = torch.nn.Linear(16, 24, bias=with_bias)
        by_module = module(x)
    assert len(calls) == 3
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced, want[..., 8:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_module, F.linear(x, module.weight, module.bias), rtol=1e-5, atol=1e-5)


def test_leaves_autograd_other_dtypes_and_non_cpu_models_alone(calls):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with onednn.onednn_linears("cpu"):
        y = layer(x)  # the weight needs a gradient: plain F.linear, which autograd can differentiate
        y.sum().backward()
        assert layer.weight.grad is not None
        with torch.no_grad():
            F.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16())
    with onednn.onednn_linears("meta"), torch.no_grad():  # a model that is not on a CPU
        layer(x)
    with onednn.onednn_linears("cpu", enabled=False), torch.no_grad():
        layer(x)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(onednn.SWITCH, "0")  # the user's switch
        with onednn.onednn_linears("cpu"), torch.no_grad():
            layer(x)
    assert calls == []
    with onednn.onednn_linears("cpu"), torch.no_grad():
        layer(x)
    assert calls == [(4, 16)]


def test_samplers_use_it_and_draw_the_same_tokens(calls, monkeypatch):
    prior = tiny_prior(grid=(4, 4), n_classes=3)
    settings = SampleSettings(steps=6, batch_size=4, seed=3, schedule="confidence", guidance=1.0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    fast = sample_tokens(prior, 6, settings, labels)
    assert calls, "sample_tokens did not run its Linear layers through oneDNN"
    masked = torch.zeros(4, 4, dtype=torch.bool)
    masked[1:3, 1:3] = True
    calls.clear()
    fast_fill = inpaint_tokens(prior, fast[0], masked, 3, SampleSettings(steps=4, seed=1), labels[:3])
    assert calls, "inpainting did not run its Linear layers through oneDNN"

    monkeypatch.setattr(onednn, "available", lambda: False)
    plain = sample_tokens(prior, 6, settings, labels)
    plain_fill = inpaint_tokens(prior, fast[0], masked, 3, SampleSettings(steps=4, seed=1), labels[:3])
    # Float rounding may in principle tip a draw; on these tiny grids it does not.
    assert torch.equal(fast, plain)
    assert torch.equal(fast_fill, plain_fill)


def test_a_compiled_body_samples_without_the_mode(calls, monkeypatch):
    """Traced under the mode, inductor refuses the oneDNN op's weight ("weight must be a graph constant"):
    with `compile`, the sampler leaves the linears to inductor."""
    from vqtool.prior import sample

    monkeypatch.setattr(sample.torch, "compile", lambda fn, **options: fn)  # real compilation takes a minute
    prior = tiny_prior(grid=(4, 4))
    tokens = sample_tokens(prior, 3, SampleSettings(steps=4, batch_size=3, seed=2), compile=True)
    assert calls == []
    assert torch.equal(tokens, sample_tokens(prior, 3, SampleSettings(steps=4, batch_size=3, seed=2)))
    assert calls
