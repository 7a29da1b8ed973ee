"""MonarchMatrix: layout, exact dense equivalence, zero init, density, size, no dense hot path."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from apex_tune.modules.monarch import MonarchMatrix, monarch_layout, nearest_sqrt_divisor

pytestmark = pytest.mark.usefixtures("one_thread")


def _perm(nblocks: int, block_size: int) -> torch.Tensor:
    """P as an index: (P v)[j] = v[perm[j]], P reading the (nblocks, block_size) grid column-major."""
    return torch.arange(nblocks * block_size).view(nblocks, block_size).T.reshape(-1)


def reference_apply(L1: torch.Tensor, L2: torch.Tensor, n: int, x: torch.Tensor) -> torch.Tensor:
    """x @ M.T with M = P^T BD(L2) P BD(L1) (restricted to the first n), built from
    dense block-diagonal matrices and index permutations, independently of forward()."""
    b, p, _ = L1.shape
    padded = b * p
    perm = _perm(b, p)
    h = torch.nn.functional.pad(x.double(), (0, padded - n))
    h = h @ torch.block_diag(*L1.double()).T  # BD(L1)
    h = h[:, perm]  # P
    h = h @ torch.block_diag(*L2.double()).T  # BD(L2)
    out = torch.empty_like(h)
    out[:, perm] = h  # P^T
    return out[:, :n]


def reference_dense(m: MonarchMatrix) -> torch.Tensor:
    eye = torch.eye(m.n, dtype=torch.float64)
    return reference_apply(m.L1.detach(), m.L2.detach(), m.n, eye).T


def randomized(n: int, seed: int = 0) -> MonarchMatrix:
    torch.manual_seed(seed)
    m = MonarchMatrix(n)
    with torch.no_grad():
        m.L1.normal_()
        m.L2.normal_()
    return m


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, (1, 1, 1)),
        (2, (2, 1, 2)),
        (16, (16, 4, 4)),
        (131, (132, 11, 12)),  # prime: padded to a balanced size
        (256, (256, 16, 16)),
        (768, (768, 24, 32)),  # Llama-2-7B heads
        (2064, (2064, 43, 48)),  # Llama-2-7B channels
        (2688, (2688, 48, 56)),  # Llama-3.1-8B channels
        (4096, (4096, 64, 64)),
    ],
)
def test_layout(n, expected):
    assert monarch_layout(n) == expected
    m = MonarchMatrix(n)
    assert (m.padded_n, m.nblocks, m.block_size) == expected
    assert m.L1.shape == m.L2.shape == (expected[1], expected[2], expected[2])


def test_layout_properties():
    for n in range(1, 600):
        padded, b, p = monarch_layout(n)
        assert b * p == padded >= n
        assert b <= p, n  # hence every Monarch matrix is fully dense (see below)
        if nearest_sqrt_divisor(n) * 2 >= math.isqrt(n):
            assert padded == n, n  # no padding where n has a balanced divisor
    assert nearest_sqrt_divisor(768) == 24 and nearest_sqrt_divisor(2064) == 43
    with pytest.raises(ValueError):
        nearest_sqrt_divisor(0)


@pytest.mark.parametrize("n", [1, 2, 3, 16, 131, 256, 768, 2064])
def test_to_dense_matches_forward_and_reference(n):
    m = randomized(n, seed=n)
    dense = m.to_dense().detach()
    assert dense.shape == (n, n)
    ref = reference_dense(m)
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    assert (dense.double() - ref).abs().max().item() <= tol
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(1))
    y = m(x).detach()
    assert y.shape == (2, 3, n)
    assert (y.double() - x.double() @ ref.T).abs().max().item() <= tol * max(1, math.sqrt(n))
    assert torch.allclose(y, x @ dense.T, rtol=1e-4, atol=1e-4 * max(1, math.sqrt(n)))


@pytest.mark.parametrize("n", [1, 16, 131, 768, 2064])
def test_zero_at_init(n):
    torch.manual_seed(0)
    m = MonarchMatrix(n)
    assert torch.count_nonzero(m.L2) == 0
    bound = 1 / math.sqrt(m.block_size)
    assert torch.count_nonzero(m.L1) == m.L1.numel()
    assert m.L1.abs().max() <= bound
    assert torch.count_nonzero(m.to_dense()) == 0
    x = torch.randn(4, n)
    assert torch.count_nonzero(m(x)) == 0
    # reset_parameters brings it back to zero after training moved it.
    with torch.no_grad():
        m.L2.normal_()
    assert torch.count_nonzero(m.to_dense()) > 0
    m.reset_parameters(torch.Generator().manual_seed(3))
    assert torch.count_nonzero(m.to_dense()) == 0


@pytest.mark.parametrize("n", [2, 16, 24, 131, 768, 2064])
def test_fully_dense_when_blocks_fit(n):
    m = randomized(n, seed=n + 1)
    assert m.nblocks <= m.block_size
    dense = m.to_dense().detach()
    assert torch.count_nonzero(dense) == n * n, "Monarch matrix has structural zeros"


def test_block_diagonal_only_without_permutation_would_be_sparse():
    # Control for the density test: with L2 = identity blocks, M = P^T P BD(L1) = BD(L1)
    # is block-diagonal, so density really comes from the permutation + second factor.
    m = randomized(16, seed=5)
    with torch.no_grad():
        m.L2.copy_(torch.eye(4).expand(4, 4, 4))
    dense = m.to_dense().detach()
    assert torch.count_nonzero(dense) == 4 * 16
    assert torch.allclose(dense, torch.block_diag(*m.L1.detach()), atol=1e-6)


@pytest.mark.parametrize(
    "n, params", [(768, 49_152), (2064, 198_144), (256, 8_192), (2688, 301_056)]
)
def test_parameter_counts(n, params):
    with torch.device("meta"):
        m = MonarchMatrix(n)
    assert sum(p.numel() for p in m.parameters()) == params
    assert params == 2 * m.nblocks * m.block_size**2


class _RecordSizes(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_forward_is_structured_at_4096():
    n, rows = 4096, 8
    m = randomized(n, seed=2)
    b, p = m.nblocks, m.block_size
    assert sum(t.numel() for t in m.parameters()) == 2 * b * p * p == 524_288  # vs n*n = 16.8M
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(4))
    with _RecordSizes() as rec, torch.no_grad():
        y = m(x)
    # No tensor in forward is anywhere near n x n: only activations and the factors.
    assert rec.max_numel <= max(rows * n, m.L1.numel())
    assert rec.max_numel < n * n // 16
    ref = reference_apply(m.L1.detach(), m.L2.detach(), n, x[:3])
    assert torch.allclose(y[:3].double(), ref, rtol=1e-4, atol=1e-3)


def test_gradients_reach_both_factors():
    m = randomized(24, seed=9)
    m(torch.randn(5, 24)).square().sum().backward()
    assert m.L1.grad is not None and m.L1.grad.abs().sum() > 0
    assert m.L2.grad is not None and m.L2.grad.abs().sum() > 0
