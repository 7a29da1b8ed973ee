"""MonarchMatrix: layout, exact dense equivalence, zero init, density, size, no dense hot path."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from apex_tune.modules import monarch as monarch_module
from apex_tune.modules.monarch import MonarchMatrix, monarch_apply, monarch_layout, nearest_sqrt_divisor

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


def _abs_apply(L1, L2, n, x):
    """The same products on absolute values: bounds every rounding error of the real ones."""
    return reference_apply(L1.abs(), L2.abs(), n, x.abs())


@pytest.mark.parametrize("n", [1, 16, 64, 131, 256, 768, 1024])  # square, padded square, non-square blocks
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("strided_bmm", [False, True])
def test_apply_and_its_gradients_match_the_reference(n, transpose, strided, strided_bmm, monkeypatch):
    """monarch_apply (both directions; for square blocks both forward layouts, the one
    with strided bmm operands that fp32 takes and the one CPU bf16 takes) and every
    gradient it returns, in fp32, against the float64 reference through autograd.

    Tolerance: each output (and each gradient entry) is a sum of products accumulated
    over at most ``depth`` terms, so fp32 computes it within gamma_depth * (the same
    computation on absolute values), gamma_k = k u / (1 - k u), u = 2^-24. Depth is
    2 * block_size for the forward and for the input gradient (two block products),
    plus the number of rows for the factor gradients (a sum over rows); margin 2."""
    monkeypatch.setattr(monarch_module, "_bmm_reads_strided", lambda x: strided_bmm)
    m = randomized(n, seed=n + 3)
    L1, L2 = m.L1.detach(), m.L2.detach()
    rows = 6
    gen = torch.Generator().manual_seed(n)
    wide = torch.randn(rows, n + 5, generator=gen)
    x = (wide[:, 2 : n + 2] if strided else wide[:, :n].contiguous()).requires_grad_()  # strided: a slice, as mix passes
    g = torch.randn(rows, n, generator=gen)
    L1r, L2r = L1.clone().requires_grad_(), L2.clone().requires_grad_()
    y = monarch_apply(x, L1r, L2r, n, transpose=transpose)
    y.backward(g)

    dense = reference_dense(m)  # M, float64
    if transpose:
        ref_fn = lambda xx, l1, l2: xx @ reference_apply(l1, l2, n, torch.eye(n, dtype=torch.float64)).T
    else:
        ref_fn = lambda xx, l1, l2: reference_apply(l1, l2, n, xx)
    x64, L1_64, L2_64 = (t.detach().double().requires_grad_() for t in (x, L1, L2))
    ref = ref_fn(x64, L1_64, L2_64)
    ref.backward(g.double())
    xa, L1a, L2a = (t.detach().double().abs().requires_grad_() for t in (x, L1, L2))
    bound = ref_fn(xa, L1a, L2a)
    bound.backward(g.double().abs())

    u = 2.0**-24
    gamma = lambda k: k * u / (1 - k * u)
    depth = 2 * m.block_size
    assert torch.all((y.detach().double() - ref).abs() <= 2 * gamma(depth) * bound.detach() + 1e-30)
    assert torch.all((x.grad.double() - x64.grad).abs() <= 2 * gamma(depth) * xa.grad + 1e-30)
    for got, want, limit in ((L1r.grad, L1_64.grad, L1a.grad), (L2r.grad, L2_64.grad, L2a.grad)):
        assert torch.all((got.double() - want).abs() <= 2 * gamma(depth + rows) * limit + 1e-30)
    assert torch.allclose(ref, x64 @ (dense if transpose else dense.T))  # the reference is M itself


@pytest.mark.parametrize("transpose", [False, True])
def test_apply_keeps_leading_dims_and_empty_batches(transpose):
    m = randomized(64, seed=1)  # 8 x 8: the square path
    L1, L2 = m.L1.detach(), m.L2.detach()
    x = torch.randn(2, 3, 4, 64)
    y = monarch_apply(x, L1, L2, 64, transpose=transpose)
    assert y.shape == x.shape
    assert torch.allclose(y.reshape(-1, 64), monarch_apply(x.reshape(-1, 64), L1, L2, 64, transpose=transpose))
    assert monarch_apply(torch.randn(0, 64), L1, L2, 64, transpose=transpose).shape == (0, 64)


@pytest.mark.parametrize("transpose", [False, True])
def test_bf16_apply_within_bf16_rounding(transpose):
    """The path bf16 takes on this device, forward and input gradient, against the float64
    reference on the same (bf16-representable) values. Every output is a sum over
    depth = 2 * block_size products with results stored in bf16; even accumulated in bf16
    it lies within gamma_depth (u = 2^-8) times the computation on absolute values. Margin 2.
    (The permutations themselves are checked exactly, in fp32, by the test above.)"""
    n, rows = 64, 5
    m = randomized(n, seed=11)
    L1, L2 = (t.detach().to(torch.bfloat16) for t in (m.L1, m.L2))
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(rows, n, generator=gen).to(torch.bfloat16).requires_grad_()
    g = torch.randn(rows, n, generator=gen).to(torch.bfloat16)
    y = monarch_apply(x, L1, L2, n, transpose=transpose)
    y.backward(g)
    assert y.dtype == x.grad.dtype == torch.bfloat16

    def ref_fn(xx, l1, l2):
        if transpose:
            return xx @ reference_apply(l1, l2, n, torch.eye(n, dtype=torch.float64)).T
        return reference_apply(l1, l2, n, xx)

    x64 = x.detach().double().requires_grad_()
    ref_fn(x64, L1.double(), L2.double()).backward(g.double())
    xa = x.detach().double().abs().requires_grad_()
    bound = ref_fn(xa, L1.double().abs(), L2.double().abs())
    bound.backward(g.double().abs())
    depth, u = 2 * m.block_size, 2.0**-8
    gamma = depth * u / (1 - depth * u)
    assert torch.all((y.detach().double() - ref_fn(x64.detach(), L1.double(), L2.double())).abs() <= 2 * gamma * bound.detach())
    assert torch.all((x.grad.double() - x64.grad).abs() <= 2 * gamma * xa.grad)
