"""Square Monarch matrices: M = P^T . BD(L2) . P . BD(L1).

BD(L) is block-diagonal with ``nblocks`` blocks of ``block_size x block_size``
(``nblocks * block_size == n``); P is the reshape-transpose permutation that
views a length-n vector as ``(nblocks, block_size)`` and reads it back
column-major. Applying M costs two batched matmuls, O(n sqrt(n)) per vector,
and never builds the dense n x n matrix; :meth:`MonarchMatrix.to_dense` exists
for fusion checks and tests.
"""

import math
from typing import Optional

import torch
from torch import nn

from apex_tune.modules._dtensor import assign_


def nearest_sqrt_divisor(n: int) -> int:
    """The divisor of ``n`` closest to sqrt(n); the smaller one on a tie.

    The smaller divisor is never farther from sqrt(n) than its cofactor, so the
    result ``b`` always satisfies ``b <= n // b``.
    """
    if n < 1:
        raise ValueError(f"Monarch size must be positive, got {n}")
    root = math.sqrt(n)
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0 and abs(d - root) <= abs(best - root):
            best = d
    return best


def monarch_layout(n: int) -> tuple[int, int, int]:
    """Choose ``(padded_n, nblocks, block_size)`` for an n x n Monarch matrix.

    As in the APEX reference, ``nblocks`` is the divisor of n closest to sqrt(n),
    with no padding. Only where that divisor is degenerate (prime or nearly-prime
    n, where it is below sqrt(n) / 2 and the factors would approach two dense
    n x n blocks) is n padded up to the next size with a balanced divisor. The
    padding rows/columns are never read back, so M restricted to n is exact.
    """
    padded = n
    while True:
        nblocks = nearest_sqrt_divisor(padded)
        if padded <= 3 or nblocks * 2 >= math.isqrt(padded):
            return padded, nblocks, padded // nblocks
        padded += 1


class MonarchMatrix(nn.Module):
    """A trainable square Monarch matrix acting on the last dimension.

    ``forward(x)`` returns ``x @ M.T`` (M applied to every length-n row of x).
    At init ``L1`` is Kaiming-uniform and ``L2`` is zero, so M == 0.

    Args:
        n (int): size of the square matrix.
    """

    def __init__(self, n: int, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.n = n
        self.padded_n, self.nblocks, self.block_size = monarch_layout(n)
        shape = (self.nblocks, self.block_size, self.block_size)
        self.L1 = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.L2 = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """L1 Kaiming-uniform (a = sqrt(5), fan-in = block size), L2 = 0, so M = 0."""
        if self.L1.is_meta:
            return
        bound = 1.0 / math.sqrt(self.block_size)
        values = torch.rand(self.L1.shape, generator=generator, dtype=torch.float32)
        assign_(self.L1, ((values * 2 - 1) * bound).to(self.L1.device))
        assign_(self.L2, torch.zeros(self.L2.shape, device=self.L2.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The factors may be stored in higher precision than x (fp32 over a bf16 base).
        return monarch_apply(x, self.L1.to(x.dtype), self.L2.to(x.dtype), self.n)

    def to_dense(self) -> torch.Tensor:
        """The dense n x n matrix M (for fusion checks and tests, not the hot path)."""
        eye = torch.eye(self.n, device=self.L1.device, dtype=self.L1.dtype)
        return self(eye).T

    def extra_repr(self) -> str:
        pad = f", padded_n={self.padded_n}" if self.padded_n != self.n else ""
        return f"n={self.n}, nblocks={self.nblocks}, block_size={self.block_size}{pad}"


class _Transposed2d(torch.autograd.Function):
    """``x`` read as a contiguous ``(rows, numel / rows)`` matrix and transposed into
    contiguous memory. Forward and backward are each one plain 2D transpose, which ATen
    copies with a blocked kernel: on CPU several times faster than the same permutation
    written as a 3D permute, or read as a strided view by the next elementwise op.
    Autograd's own backward of ``.t().contiguous()`` would hand the preceding bmm a
    transposed gradient, which reduced-precision bmm copies again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        ctx.shape, ctx.rows, ctx.cols = x.shape, rows, cols
        return x.reshape(rows, cols).t().contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.reshape(ctx.cols, ctx.rows).t().contiguous().view(ctx.shape), None, None


def _transposed_2d(x: torch.Tensor, rows: int) -> torch.Tensor:
    return _Transposed2d.apply(x, rows, x.numel() // rows if rows else 0)


class _BlockMatmul(torch.autograd.Function):
    """``torch.bmm(h, w)`` with the factor's gradient computed as ``(grad^T h)^T``.

    ``h`` is an activation read in place with a unit last stride (often a transposed view
    with a batch stride of one block); autograd's ``h^T grad`` hands bmm that view
    transposed, which CPU bmm copies (bf16: the whole operand, 2-5x the product's time)
    or loops over; ``grad^T h`` reads both operands as they lie."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, w)
        return torch.bmm(h, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, w = ctx.saved_tensors
        # A gradient that arrives as a view (of a permuted output) is made contiguous first:
        # a copy of runs, cheaper than a bmm over its transpose.
        grad = grad.contiguous()
        grad_h = torch.bmm(grad, w.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), h).transpose(1, 2) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w


def _block_matmul(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _BlockMatmul.apply(h, w)


def _bmm_reads_strided(x: torch.Tensor) -> bool:
    """Whether bmm on ``x``'s device and dtype reads permuted (strided) operands without
    copying them: CPU reduced-precision bmm (oneDNN) copies them, fp32 (MKL) and cuBLAS don't."""
    return x.dtype == torch.float32 or x.device.type != "cpu"


def _square_apply(x: torch.Tensor, L1: torch.Tensor, L2: torch.Tensor, transpose: bool) -> torch.Tensor:
    """:func:`monarch_apply` for square blocks (nblocks == block_size == s) on ``x`` of
    shape ``(rows, s * s)``. P is then its own inverse, and on a ``(rows, s, s)`` grid P
    swaps the last two axes; that swap is one 2D transpose of a ``(blocks, rows * s)``
    (or ``(rows * s, s)``) matrix. Every bmm reads ``(blocks, rows, s)`` operands with a
    unit last stride and writes contiguous ``(blocks, rows, s)`` results, the layouts
    that fp32 (MKL) and bf16 (oneDNN) bmm on CPU and cuBLAS all take without copying.
    Two bmms and two copies each way; the copies are realised permutations. The fp32
    forward (and any forward off the CPU) saves one copy with strided bmm operands."""
    s = L1.shape[0]
    rows = x.shape[0]
    if not transpose and _bmm_reads_strided(x):
        # BD(L1) computed as (block i, element o, rows): after P, block j = o holds element
        # j of every block i, a strided view bmm reads as is, so P costs no copy. CPU
        # reduced-precision bmm (oneDNN) copies both strided operands, hence the path below.
        h = torch.bmm(L1, x.reshape(rows, s, s).permute(1, 2, 0))
        h = torch.bmm(h.permute(1, 2, 0), L2.transpose(1, 2))  # P, BD(L2): (j, rows, o)
        return _transposed_2d(h, s).view(rows, s * s)  # P^T: element o of block j at o * s + j
    if not transpose:
        # BD(L1): block i of every row, (i, rows, o); x's (rows, s, s) grid read as is.
        h = _block_matmul(x.reshape(rows, s, s).transpose(0, 1), L1.transpose(1, 2))
        # P: (rows, o, i) in memory, read as block o = j holding element j of every block i.
        h = _transposed_2d(h, s).view(rows, s, s).transpose(0, 1)
        h = _block_matmul(h, L2.transpose(1, 2))  # BD(L2): (j, rows, o)
        return _transposed_2d(h, s).view(rows, s * s)  # P^T: element o of block j at o * s + j
    # M^T = BD(L1)^T P BD(L2)^T P on columns; on rows, x @ M: P, BD(L2)^T, P, BD(L1)^T.
    h = _transposed_2d(x, rows * s).view(s, rows, s)  # P: block j holds element j of every block
    h = _block_matmul(h, L2)  # BD(L2)^T: (j, rows, o)
    h = _transposed_2d(h, s).view(rows, s, s).transpose(0, 1)  # P: (o, rows, j)
    h = _block_matmul(h, L1)  # BD(L1)^T: (o, rows, k)
    return h.transpose(0, 1).reshape(rows, s * s)  # back to rows: copies runs of s


def monarch_apply(
    x: torch.Tensor, L1: torch.Tensor, L2: torch.Tensor, n: int, transpose: bool = False
) -> torch.Tensor:
    """``x @ M.T`` (or ``x @ M`` with ``transpose``) for M = P^T . BD(L2) . P . BD(L1).

    ``L1``/``L2`` are the ``(nblocks, block_size, block_size)`` factors; rows of
    ``x`` have length ``n`` (zero-padded to ``nblocks * block_size`` inside).
    As column-vector operators, M = P^T BD(L2) P BD(L1), so
    M^T = BD(L1)^T P^T BD(L2)^T P: the transposed apply runs the same steps in
    reverse order with untransposed blocks.
    """
    lead = x.shape[:-1]
    b, p = L1.shape[0], L1.shape[1]
    padded_n = b * p
    if padded_n != n:
        x = nn.functional.pad(x, (0, padded_n - n))
    if b == p:
        h = _square_apply(x.reshape(-1, padded_n), L1, L2, transpose)
        return h.reshape(*lead, padded_n)[..., :n]
    h = x.reshape(-1, b, p)  # (rows, blocks, p): a view for contiguous x
    rows = h.shape[0]
    # Every step is one bmm over the blocks or one copy that realises a permutation.
    # No n x n matrix.
    if transpose:
        # P: read each row's (b, p) grid column-major.
        h = h.transpose(1, 2).contiguous().view(rows, b, p)
        h = _block_matmul(h.transpose(0, 1), L2)  # BD(L2)^T: (blocks, rows, p)
        # P^T: each row's (b, p) grid read as (p, b), transposed back.
        h = h.transpose(0, 1).reshape(rows, p, b).transpose(1, 2).contiguous()
        h = _block_matmul(h.view(rows, b, p).transpose(0, 1), L1)  # BD(L1)^T
        out = h.transpose(0, 1)
    else:
        h = _block_matmul(h.transpose(0, 1), L1.transpose(1, 2))  # BD(L1): (blocks, rows, p)
        # P: each row's (b, p) grid read column-major, i.e. as (p, b), regrouped into b
        # blocks: (rows, p, b) in memory, one 2D transpose of (b, rows * p).
        h = _transposed_2d(h, b).view(rows, b, p)
        h = _block_matmul(h.transpose(0, 1), L2.transpose(1, 2))  # BD(L2)
        out = h.transpose(0, 1).reshape(rows, p, b).transpose(1, 2)  # P^T
    h = out.reshape(rows, padded_n)
    if padded_n != n:
        h = h[:, :n]
    return h.reshape(*lead, n)
