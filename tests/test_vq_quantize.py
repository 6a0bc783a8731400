"""The quantizer: nearest lookup, straight-through gradients, losses, k-means and dead-code restarts."""

import math

import torch
import torch.nn.functional as F

from vqtool.vq.quantize import VectorQuantizer, codebook_stats, kmeans


def test_nearest_lookup_and_losses_match_hand_computation():
    q = VectorQuantizer(4, 2, beta=0.25, cosine=False)
    q.embedding.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    z = torch.tensor([[0.9, 0.1], [0.1, 0.8], [4.0, 4.5], [-0.2, 0.1]]).reshape(1, 2, 2, 2).permute(0, 3, 1, 2)
    out = q(z)
    assert out.indices.tolist() == [[[1, 2], [3, 0]]]
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    codes = q.embedding.data[out.indices.flatten()]
    mse = ((flat - codes) ** 2).mean()
    assert torch.allclose(out.loss, mse * 1.25)
    assert torch.allclose(out.z_q.permute(0, 2, 3, 1).reshape(-1, 2), codes)


def test_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 3, cosine=False)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    g = torch.randn(2, 3, 4, 4)
    (q(z).z_q * g).sum().backward()
    assert torch.allclose(z.grad, g)


def test_straight_through_gradient_in_cosine_mode_passes_through_normalisation():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 3, cosine=True)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    g = torch.randn(2, 3, 4, 4)
    (q(z).z_q * g).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=1) * g).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)
    # the codes it returns are unit vectors
    assert torch.allclose(q(z).z_q.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)


def test_codebook_loss_trains_codes_and_commitment_trains_encoder():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, beta=0.25, cosine=False)
    z = torch.randn(1, 2, 3, 3, requires_grad=True)
    out = q(z)
    out.loss.backward()
    used = out.indices.unique()
    grad_rows = q.embedding.grad.abs().sum(1)
    assert (grad_rows[used] > 0).all()
    unused = torch.tensor([i for i in range(4) if i not in used.tolist()], dtype=torch.long)
    assert (grad_rows[unused] == 0).all()
    assert z.grad.abs().sum() > 0


def test_usage_tracks_lookup_share_when_the_trainer_updates_it():
    q = VectorQuantizer(4, 2, cosine=False, usage_decay=0.5)
    q.embedding.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    z = torch.zeros(1, 2, 2, 2)  # every vector picks code 0
    for mode in (q.eval, q.train):  # a forward alone never touches the usage (and runs no collective)
        mode()
        out = q(z)
        assert torch.allclose(q.usage, torch.full((4,), 0.25))
    counts = q.code_counts(out.indices)
    assert counts.tolist() == [4.0, 0.0, 0.0, 0.0]
    q.update_usage(counts)
    assert torch.allclose(q.usage, torch.tensor([0.625, 0.125, 0.125, 0.125]))
    # Rows of micro-batches are applied in order, as one update each.
    q.update_usage(torch.stack([counts, torch.tensor([0.0, 0.0, 0.0, 2.0])]))
    assert torch.allclose(q.usage, torch.tensor([0.40625, 0.03125, 0.03125, 0.53125]))


def test_restart_reseeds_exactly_the_dead_codes_from_batch_vectors():
    torch.manual_seed(0)
    q = VectorQuantizer(6, 3, cosine=False)
    q.usage.copy_(torch.tensor([0.3, 0.001, 0.3, 0.001, 0.398, 0.0]))
    before = q.embedding.data.clone()
    vectors = torch.randn(10, 3) + 100.0  # far from every initial code
    restarted = q.restart_dead(vectors, torch.Generator().manual_seed(0), threshold=0.1)
    assert sorted(restarted.tolist()) == [1, 3, 5]
    for i in range(6):
        if i in (1, 3, 5):
            assert not torch.equal(q.embedding.data[i], before[i])
            assert any(torch.equal(q.embedding.data[i], v) for v in vectors)
            assert q.usage[i] == 1 / 6
        else:
            assert torch.equal(q.embedding.data[i], before[i])
    # distinct batch vectors when there are enough of them
    assert len({tuple(q.embedding.data[i].tolist()) for i in (1, 3, 5)}) == 3
    # nothing dead → nothing changes
    assert q.restart_dead(vectors, torch.Generator().manual_seed(0), threshold=0.1).numel() == 0


def test_restart_revives_a_collapsed_codebook_in_training():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, cosine=False, usage_decay=0.5)
    q.embedding.data = torch.randn(8, 2) * 0.01 + torch.tensor([50.0, 50.0])  # all codes far away
    q.embedding.data[0] = 0.0  # one code near the data takes every lookup
    z = torch.randn(4, 2, 4, 4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        out = q(z)
        q.update_usage(q.code_counts(out.indices))
        q.restart_dead(out.vectors, gen, threshold=0.5)
    used = q(z).indices.unique().numel()
    assert used >= 6


def test_kmeans_finds_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    data = torch.cat([c + 0.1 * torch.randn(50, 2, generator=gen) for c in centres])
    found = kmeans(data, 4, torch.Generator().manual_seed(3), iters=20)
    for c in centres:
        assert (found - c).norm(dim=1).min() < 0.1


def test_kmeans_init_moves_every_code_onto_the_data():
    q = VectorQuantizer(8, 2, cosine=False)
    q.embedding.data.fill_(100.0)
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(200, 2, generator=gen)
    q.init_kmeans(data, torch.Generator().manual_seed(0), iters=5)
    assert int(q.initialized) == 1
    assert q.embedding.data.abs().max() < 5
    assert q(data.T.reshape(1, 2, 10, 20)).indices.unique().numel() == 8


def test_kmeans_init_cosine_gives_unit_codes_and_fewer_points_than_codes_works():
    q = VectorQuantizer(16, 3, cosine=True)
    data = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)) * 7
    q.init_kmeans(data, torch.Generator().manual_seed(0))
    assert torch.allclose(q.embedding.data.norm(dim=1), torch.ones(16), atol=1e-5)


def test_codebook_stats():
    stats = codebook_stats(torch.tensor([5, 5, 0, 0]))
    assert stats["usage"] == 0.5
    assert math.isclose(stats["perplexity"], 2.0)
    stats = codebook_stats(torch.tensor([1, 1, 1, 1]))
    assert stats["usage"] == 1.0 and math.isclose(stats["perplexity"], 4.0)
    assert codebook_stats(torch.zeros(3))["usage"] == 0.0
