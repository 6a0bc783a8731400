"""The speed table's papers'-style transformer computes what vqtool's does with the same weights, so
the table's ratio between the two is the code's and not a different model's."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from reference_transformer import PapersTransformer  # noqa: E402

from vqtool.prior.transformer import Transformer, TransformerConfig  # noqa: E402


@pytest.mark.parametrize("pos_emb", ["2d", "flat"])
def test_same_logits_as_vqtool_with_the_same_weights(pos_emb):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=12, grid=(3, 4), n_layer=2, n_head=2, n_embd=16, pos_emb=pos_emb,
                            gelu="exact")
    model = Transformer(cfg).eval()
    for p in model.parameters():  # off the zero-initialised biases and positions, so every weight counts
        p.data.add_(0.05 * torch.randn_like(p))
    papers = PapersTransformer.from_vqtool(model).eval()
    idx = torch.randint(0, cfg.vocab_size + 1, (3, cfg.n_tokens))
    with torch.no_grad():
        expected, got = model(idx), papers(idx)
    assert got.shape == (3, cfg.n_tokens, cfg.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The same parameters, with the positions as one flat table.
    ours = sum(p.numel() for n, p in model.named_parameters() if n not in ("row_emb", "col_emb", "pos"))
    assert sum(p.numel() for p in papers.parameters()) == ours + cfg.n_tokens * cfg.n_embd


def test_refuses_a_model_it_cannot_mirror():
    causal = Transformer(TransformerConfig(vocab_size=8, grid=(2, 2), n_layer=1, n_head=1, n_embd=8, causal=True))
    with pytest.raises(ValueError, match="bidirectional"):
        PapersTransformer.from_vqtool(causal)
