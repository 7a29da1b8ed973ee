"""Effective rank of each stage's weight change, as fold_apex_ records it."""

import torch

from apex_tune import fold_apex_
from apex_tune.modules.effective_rank import effective_rank

from conftest import trained_tiny_apex


def _svd_effective_rank(m: torch.Tensor) -> float:
    s = torch.linalg.svdvals(m.double())
    p = s[s > 0] / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def test_effective_rank_known_values():
    assert effective_rank(torch.zeros(4, 6)) == 0.0
    u = torch.randn(5, 1, dtype=torch.float64)
    assert abs(effective_rank(u @ torch.randn(1, 7, dtype=torch.float64)) - 1.0) < 1e-6
    # equal singular values: effective rank = rank
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert abs(effective_rank(q[:, :3].T * 2.0) - 3.0) < 1e-6


def test_effective_rank_matches_svd_on_rank_deficient_matrices():
    gen = torch.Generator().manual_seed(0)
    for rows, cols, rank in ((16, 64, 5), (96, 24, 24), (40, 40, 1)):
        m = torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen)
        # The Gram route squares the singular values; its float64 noise floor,
        # sqrt(n * eps) ~ 1e-7 of the largest, changes the entropy by < 1e-4.
        assert abs(effective_rank(m) - _svd_effective_rank(m)) <= 1e-4 * _svd_effective_rank(m)


def test_fold_records_effective_rank_of_each_change():
    model = trained_tiny_apex()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")}
    ranks = fold_apex_(model, seed=2, effective_ranks=True)
    after = dict(model.named_parameters())
    assert len(ranks) == 2
    for i, layer in enumerate(ranks):
        assert set(layer) == {"q_proj", "k_proj", "v_proj", "output_proj", "w1", "w3", "w2"}
        for name, value in layer.items():
            owner = "attn" if name in ("q_proj", "k_proj", "v_proj", "output_proj") else "mlp"
            key = f"layers.{i}.{owner}.{name}.weight"
            change = after[key].detach() - before[key]
            # fp32 weights: the full-matrix change carries the rounding of W' (~1e-7 of W) where
            # the recorded one is exact in fp32 arithmetic; agreement to 1e-3 relative.
            assert abs(value - _svd_effective_rank(change)) <= 1e-3 * value, (key, value)
            assert value > 1.0
    assert fold_apex_(model, seed=3) is None
