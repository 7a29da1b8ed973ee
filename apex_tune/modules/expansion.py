"""APEX expansion wrappers for the linear layers of attention and SwiGLU FFNs.

Units are heads (a KV group under GQA) or FFN channels. A unit ``u`` of a
weight occupies ``group * width`` consecutive rows (column wrappers) or columns
(row wrappers), read as ``group`` slices of ``width``:

- v_proj: group 1, width head_dim; output_proj: group q_per_kv, width head_dim
  (the q_per_kv query heads that read KV head u); w1/w3/w2: group 1, width 1.

Per layer and kind, one :class:`ApexExpansion` holds the Monarch matrix M
(n x n, n = K * width), the mixing vector ``a`` and the selected unit ids in
the order ``[N, P, E]``. The wrappers share it:

- column weights (V; w1, w3):  W'_N = diag(a) W~_N + M W~_P,  W'_P = diag(b) W~_P
- row weights (output_proj; w2): W'[:, N] = W~[:, N] diag(a) + W~[:, P] M^T

with W~ = W + Delta on the tuned units (N, P, E) when the dense delta is on.
Both formulas are written once, in :func:`mix` (N <- a N + M P, P <- b P on the
last dim) and its transpose :func:`mix_transposed` (N <- a N, P <- P + M^T N):

- a column wrapper mixes its tuned *outputs* with :func:`mix`;
- a row wrapper mixes its tuned *inputs* with :func:`mix_transposed`, since
  W' = W~ R with (R x)_N = a x_N, (R x)_P = x_P + M^T x_N: y = W (R x) + Delta (R x)_T,
  one frozen matmul plus the delta's slice, the Monarch on tokens, no weight copies;
- a fold (:meth:`_ApexLinear.fold_`) applies :func:`mix` to the tuned rows (column
  wrappers, transposed) or columns (row wrappers) of W~, in fp32.
The base ``weight``/``bias`` keep their names, so base checkpoints load as is.

How the matmuls run over a dense frozen base (over NF4: frozen matmul plus slice matmuls):

- tuned units first in the weight, in [N, P, E] order (the contiguous layout, which
  :func:`~apex_tune.modules.model.set_selection` gives FFN channels): matmuls over row or
  column slices of the weight write into one output (``_PrefixRowsLinear``,
  ``_PrefixColumnsLinear``); no gather, weight copy or write-back, and only the delta's
  weight gradient is computed;
- tuned units scattered (heads, or the layout off): the tuned slice W_T + Delta is
  swapped into the frozen weight for one matmul (``_SliceSwappedLinear``), the tuned
  entries gathered and written back.

Precision: the APEX parameters (M's factors, ``a``, ``b``, delta) are stored
in fp32 (``APEX_PARAM_DTYPE``) whatever the base dtype, so that an optimizer
step of about the learning rate is not rounded away (near 1.0 a bf16 step is
2^-8 .. 2^-7). The forward casts them to the input's dtype where they are
used (compute in the run dtype); folds are computed in fp32 and cast once
into the base weight's dtype.
Index buffers and parameter shapes depend only on the configured sizes, so a
new selection at a stage boundary changes values, never shapes (the one
exception, :class:`MergedStages` over an NF4 base, grows with the rows/columns
the stages changed and lives outside FSDP like the NF4 weights).
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules.peft import AdapterModule

from apex_tune.modules._dtensor import assign_, dequantized, full_value, local_value
from apex_tune.modules.monarch import MonarchMatrix, monarch_apply

# Storage dtype of every trainable APEX parameter, whatever the base dtype.
APEX_PARAM_DTYPE = torch.float32


def unit_positions(units: torch.Tensor, group: int, width: int) -> torch.Tensor:
    """Flat row/column positions of ``units``, laid out ``(group, len(units), width)``.

    Slice ``j`` of every unit comes before slice ``j + 1`` of any unit, so a
    ``(..., group, len(units) * width)`` view puts each group's slices in the
    same unit order that M mixes.
    """
    slice_ids = torch.arange(group, device=units.device).view(group, 1, 1)
    offsets = torch.arange(width, device=units.device).view(1, 1, width)
    pos = units.view(1, -1, 1) * (group * width) + slice_ids * width + offsets
    return pos.reshape(-1)


class Operators(NamedTuple):
    """One stage's shared operators as the wrappers apply them: M's factors and ``a``
    for N and P of ``n`` entries (the live parameters, a frozen stage's copies, or
    their full fp32 values for a fold)."""

    n: int
    a: torch.Tensor
    L1: torch.Tensor
    L2: torch.Tensor

    def full_fp32(self) -> "Operators":
        return Operators(self.n, *(full_value(t).float() for t in (self.a, self.L1, self.L2)))


class Stage(NamedTuple):
    """What one stage applies in one wrapper: the tuned positions, the shared operators
    (None for q/k, delta only), the wrapper's ``b`` (column wrappers that mix) and delta."""

    positions: torch.Tensor
    ops: Optional[Operators]
    b: Optional[torch.Tensor]
    delta: Optional[torch.Tensor]

    def full_fp32(self) -> "Stage":
        ops = None if self.ops is None else self.ops.full_fp32()
        return Stage(self.positions, ops, _fp32(self.b), _fp32(self.delta))


def _grouped(t: torch.Tensor, group: int) -> torch.Tensor:
    # The tuned entries are laid out (group, units, width) (see unit_positions):
    # each group slice is ordered [N, P, E] like M mixes.
    return t.reshape(*t.shape[:-1], group, -1)


def _split(t: torch.Tensor, n: int, group: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # N, P, E of every group slice, as views. One split rather than three slices: in
    # backward, split joins the parts' gradients in one pass, where each slice would
    # scatter its part into a zero tensor of t's size and autograd would add those up.
    grouped = _grouped(t, group)
    return grouped.split([n, n, grouped.shape[-1] - 2 * n], dim=-1)


def mix(t: torch.Tensor, ops: Operators, b: Optional[torch.Tensor] = None, group: int = 1) -> torch.Tensor:
    """N <- a N + M P and P <- b P (P unchanged without ``b``) on the last dim of ``t``,
    laid out ``group`` times ``[N, P, E]``; in ``t``'s dtype (the operators are fp32)."""
    n = ops.n
    disadvantageous, advantageous, extra = _split(t, n, group)
    monarch = monarch_apply(advantageous, ops.L1.to(t.dtype), ops.L2.to(t.dtype), n)
    mixed = torch.addcmul(monarch, disadvantageous, ops.a.to(t.dtype))
    if b is not None:
        advantageous = advantageous * b.to(t.dtype)
    return torch.cat([mixed, advantageous, extra], dim=-1).reshape(t.shape)


def mix_transposed(t: torch.Tensor, ops: Operators, group: int = 1) -> torch.Tensor:
    """The transpose of :func:`mix` without ``b``: N <- a N, P <- P + M^T N."""
    n = ops.n
    disadvantageous, advantageous, extra = _split(t, n, group)
    # N is what backward keeps (for a's and M's gradients): a copy of its own, so that a
    # view of ``t`` (the caller's inputs, on the contiguous path) is not kept alive whole.
    # The Monarch would copy the strided view anyway.
    disadvantageous = disadvantageous.contiguous()
    L1, L2 = ops.L1.to(t.dtype), ops.L2.to(t.dtype)
    mixed = advantageous + monarch_apply(disadvantageous, L1, L2, n, transpose=True)
    return torch.cat([disadvantageous * ops.a.to(t.dtype), mixed, extra], dim=-1).reshape(t.shape)


class ApexExpansion(nn.Module, AdapterModule):
    """The shared parts of one expansion pair: M, ``a`` and the unit selection.

    Args:
        num_expanded (int): K, the size of P and of N.
        num_extra (int): size of E, the extra tuned units (delta only).
        width (int): elements per unit slice (head_dim for heads, 1 for channels).
    """

    def __init__(self, num_expanded: int, num_extra: int, width: int, device=None, dtype=APEX_PARAM_DTYPE):
        super().__init__()
        self.num_expanded = num_expanded
        self.num_extra = num_extra
        self.width = width
        n = num_expanded * width
        self.monarch = MonarchMatrix(n, device=device, dtype=dtype)
        self.a = nn.Parameter(torch.ones(n, device=device, dtype=dtype))
        # [N, P, E] unit ids; a placeholder selection until set_selection is called.
        # Not in the state dict: recipes save the selection on its own, so the
        # wrapped state dict is parameters only (what FSDP2 loaders expect).
        self.register_buffer(
            "units", torch.arange(2 * num_expanded + num_extra, device=device), persistent=False
        )

    @property
    def n(self) -> int:
        return self.monarch.n

    def operators(self) -> Operators:
        return Operators(self.n, self.a, self.monarch.L1, self.monarch.L2)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """M = 0 and a = 1: the wrapped layers compute the base weights again."""
        self.monarch.reset_parameters(generator)
        assign_(self.a, torch.ones(self.a.shape, device=self.a.device))

    @torch.no_grad()
    def is_identity(self) -> bool:
        """Whether the operators leave N as it is: L2 = 0 (so M = 0) and a = 1, as
        :meth:`reset_parameters` leaves them. Reads this rank's shards only."""
        return not local_value(self.monarch.L2).any() and bool((local_value(self.a) == 1).all())

    def adapter_params(self) -> List[str]:
        return ["monarch.L1", "monarch.L2", "a"]


class _ApexLinear(nn.Module, AdapterModule):
    """Common state of the wrappers: the base linear's parameters, the tuned
    positions and the optional zero-initialised dense delta on them."""

    dim: int  # the weight dimension the units run along: 0 (rows) or 1 (columns)
    # Set by apex_tune.modules.model.bypass_unchanged_wrappers: forward is the base linear alone.
    _bypassed = False

    def __init__(
        self,
        base: nn.Linear,
        num_tuned: int,
        group: int,
        width: int,
        expansion: Optional[ApexExpansion],
        delta: bool = False,
        history: Optional[Tuple[nn.Module, str]] = None,
        merged_stages: bool = False,
    ):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.group, self.width = group, width
        dim = self.dim
        # Same Parameter objects as the base layer: names and checkpoints unchanged.
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # Not registered as children: the owning attention/FFN module holds them.
        self._expansion = [expansion] if expansion is not None else []
        # Over a quantized base, which is never rewritten, the finished stages are kept
        # either as the owner's frozen operator stages (without the delta: ``history``,
        # the owner's ApexHistory and this wrapper's key in it) or as one merged
        # correction of this wrapper (with the delta: ``merged_stages``).
        self._history, self._history_key = ([history[0]], history[1]) if history is not None else (None, None)
        self.apex_history = MergedStages(dim, base.bias is not None and dim == 0) if merged_stages else None
        device = base.weight.device
        self.register_buffer(
            "positions",
            unit_positions(torch.arange(num_tuned, device=device), group, width),
            persistent=False,
        )
        self._tuned_prefix = _is_prefix(unit_positions(torch.arange(num_tuned, device="cpu"), group, width))
        delta_shape = (
            (len(self.positions), self.in_features) if dim == 0 else (self.out_features, len(self.positions))
        )
        self.delta = (
            nn.Parameter(torch.zeros(delta_shape, device=device, dtype=APEX_PARAM_DTYPE))
            if delta
            else None
        )

    @property
    def expansion(self) -> Optional[ApexExpansion]:
        return self._expansion[0] if self._expansion else None

    def set_units(self, units: torch.Tensor) -> None:
        positions = unit_positions(units.to(self.positions.device), self.group, self.width)
        if positions.shape != self.positions.shape:
            raise ValueError(
                f"selection has {len(units)} units, this layer was built for "
                f"{len(self.positions) // (self.group * self.width)}"
            )
        self.positions.copy_(positions)
        # On the meta device nothing runs: the positions are set again once materialized.
        self._tuned_prefix = not units.is_meta and _is_prefix(unit_positions(units.cpu(), self.group, self.width))

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        if self.delta is not None:
            assign_(self.delta, torch.zeros(self.delta.shape, device=self.delta.device))

    def adapter_params(self) -> List[str]:
        return ["delta"] if self.delta is not None else []

    @torch.no_grad()
    def computes_base(self) -> bool:
        """Whether this wrapper computes exactly its base linear: no finished stages kept
        beside the base (NF4), a zero delta, operators at their identity and ``b`` = 1, as
        apply_apex and every fold leave it. Then its mixing adds zeros and multiplies by
        ones. Reads this rank's shards only (see bypass_unchanged_wrappers)."""
        if self._history is not None and len(self._history[0]):
            return False
        if self.apex_history is not None and not self.apex_history.empty:
            return False
        if self.delta is not None and local_value(self.delta).any():
            return False
        if self.expansion is not None and not self.expansion.is_identity():
            return False
        b = getattr(self, "b", None)
        return b is None or bool((local_value(b) == 1).all())

    def _dense_live_stage_only(self) -> bool:
        """A dense, frozen base (plain tensor: a local one, or FSDP2's unsharded parameter
        in forward) with no frozen stages before the live one: not NF4 (frozen stages, a
        merged correction), where the delta stays a separate slice matmul."""
        weight, bias = self.weight, self.bias
        return (
            self._history is None
            and self.apex_history is None
            and not weight.requires_grad
            and (bias is None or not bias.requires_grad)
            and type(weight.data) is torch.Tensor  # not NF4, not a DTensor
        )

    def _prefix_path(self) -> bool:
        """Whether the wrapper runs matmuls over slices (``_Prefix*Linear``): its units are
        laid out contiguously (:mod:`apex_tune.modules.layout`) and the tuned ones are the
        first of the weight, in [N, P, E] order. The layout flag is fixed for the run and
        read first, so ``compile: True`` guards on it alone for the other wrappers: a new
        selection of heads that happens to be 0, 1, 2, ... changes no path (no recompile)."""
        return getattr(self.expansion, "contiguous", False) and self._tuned_prefix and self._dense_live_stage_only()

    def _partial_backprop(self) -> bool:
        """Whether the live delta runs in the frozen weight (:class:`_SliceSwappedLinear`)
        when the tuned units are scattered."""
        return self.delta is not None and self._dense_live_stage_only()

    def live_stage(self) -> Stage:
        """The stage being trained, as parameters."""
        exp = self.expansion
        return Stage(self.positions, exp.operators() if exp is not None else None, getattr(self, "b", None), self.delta)

    def frozen_stages(self) -> List[Stage]:
        """The finished stages kept as operators over a quantized base, oldest first
        (see :mod:`apex_tune.modules.nf4`); none over a plain base, whose weights hold them."""
        if self._history is None:
            return []
        return [
            Stage(
                stage.parts[self._history_key].positions,
                stage.operators() if self.expansion is not None else None,
                stage.parts[self._history_key].b,
                None,  # stages are frozen as operators only without the delta
            )
            for stage in self._history[0]
        ]

    @torch.no_grad()
    def folded(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Full W' (finished stages, delta and operators folded in, from the dequantized
        base; nothing is written), the folded bias (None without one), and the change
        of the live stage's tuned slice, W'_T - W_T, in fp32. Computed in fp32 and
        cast once into the base dtype."""
        weight, bias, change = self._folded_fp32()
        return weight.to(self.weight.dtype), None if bias is None else bias.to(self.bias.dtype), change

    def _folded_fp32(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        weight, bias = dequantized(self.weight).float(), _fp32(self.bias)
        for stage in self.frozen_stages():
            weight, bias = self.fold_stage(weight, bias, stage.full_fp32())
        if self.apex_history is not None:
            weight, bias = self.apex_history.added_to(weight, bias)
        before = weight.index_select(self.dim, self.positions)
        weight, bias = self.fold_stage(weight, bias, self.live_stage().full_fp32())
        return weight, bias, weight.index_select(self.dim, self.positions) - before

    def fold_stage(self, weight, bias, stage: "Stage") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One stage folded into full ``weight``/``bias`` (bias None without one)."""
        raise NotImplementedError

    @torch.no_grad()
    def fold_(self) -> torch.Tensor:
        """Stage boundary: write W' into ``weight``/``bias``; the wrapper then computes
        the same function only after :meth:`reset_parameters`. Returns the tuned
        slice's change (see :meth:`folded`). A quantized base is never rewritten: the
        stage goes into the merged correction (with the delta), or the owner freezes
        its operators (:func:`~apex_tune.modules.model.fold_apex_`)."""
        if self._history is not None:
            raise RuntimeError(
                "a wrapper over an NF4 base is not folded on its own: fold_apex_ freezes the "
                "stage into apex_history, unwrap_apex folds everything into a plain weight"
            )
        if self.apex_history is not None:
            weight, bias, change = self._folded_fp32()
            self.apex_history.set_(weight, bias, dequantized(self.weight), self.bias, self.positions)
            return change
        weight, bias, change = self.folded()
        assign_(self.weight, weight)
        if bias is not None:
            assign_(self.bias, bias)
        return change

    @torch.no_grad()
    def unwrap(self) -> nn.Linear:
        """The plain linear computing what this wrapper computes (everything folded,
        a quantized base dequantized). Over a plain base it keeps the (possibly
        sharded) ``weight``/``bias`` parameters, folded in place."""
        if self._history is None and self.apex_history is None:
            self.fold_()
            weight, bias = self.weight, self.bias
        else:
            weight, bias, _ = self.folded()
            weight = nn.Parameter(weight, requires_grad=False)
            bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        linear.weight = weight
        if bias is not None:
            linear.bias = bias
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"tuned={len(self.positions)}, delta={self.delta is not None}"
        )


def _fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else full_value(t).float()


def _is_prefix(positions: torch.Tensor) -> bool:
    """Whether CPU ``positions`` are 0, 1, 2, ... (also under a meta default device)."""
    return bool(torch.equal(positions, torch.arange(len(positions), device="cpu")))


def _replaced(t: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``t`` with the entries at ``positions`` of its last dim replaced by ``values``, in a
    new tensor (``t`` may be the caller's, or saved for backward). Autograd keeps only
    the index for backward (``index_copy`` would also keep ``values``)."""
    out = t.clone()
    out[..., positions] = values
    return out


def _replaced_in_place(t: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """:func:`_replaced` writing into ``t``: for a column wrapper's output, which no
    backward saves (a linear's backward keeps its input and weight, ``index_select`` the
    index), so autograd allows it and the full-output copy is saved."""
    t[..., positions] = values
    return t


class _SliceSwappedLinear(torch.autograd.Function):
    """y = x W_eff^T (+ bias), W_eff = ``weight`` with its tuned rows (``dim`` 0) or columns
    (``dim`` 1) at ``positions`` replaced by W_T + Delta: S2FT-style partial back-propagation.

    One matmul instead of the frozen one plus a matmul of the slice: the slice W_T + Delta
    is written into the frozen weight in place, the matmul runs, and the saved W_T is
    copied back (a copy, no arithmetic: the weight is bit-identical afterwards); the same
    around dx = dy W_eff in backward. No full weight copy, and only the slice's weight
    gradient is computed: dDelta = dy_T^T x (rows) or dy^T x_T (columns), over all tokens.

    The swap writes through ``weight.data``, whose version counter is not the
    parameter's, so tensors that autograd saved elsewhere are not invalidated; that is
    safe because the weight is frozen (no gradient, not updated) and restored before
    anything else reads it. Under FSDP2 ``weight`` is the all-gathered unsharded
    parameter during forward and backward (restored before returning); under activation
    checkpointing the forward is recomputed in backward, swap and restore included.

    Precision: W_T + Delta is computed in fp32 and rounded once to the weight's dtype. In
    bf16 the forward thus uses round_bf16(W_T + Delta), not W_T x + Delta x: an update of
    W smaller than half a bf16 ulp of W is not yet seen by the forward, but it is kept in
    the fp32 Delta, whose gradient is exact, so updates accumulate until they show. This
    is how mixed-precision full fine-tuning with fp32 master weights behaves. In fp32 the
    sum's rounding is one fp32 ulp of the weight (the two-matmul form rounds too).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, positions, dim: int, width: int, x_tuned=None):
        # ``width``: the positions come in runs of ``width`` consecutive rows/columns (a
        # unit's slices), swapped as blocks. ``x_tuned`` (columns only): x's tuned entries,
        # already computed by the caller; all dDelta needs, so backward keeps it instead of
        # the whole x. Its gradient flows through ``x``, which holds the same values.
        frozen = weight.data  # the in-place swap bumps this alias's version counter only
        blocked, blocks = _blocks_of(frozen, dim, positions, width)
        with torch.no_grad():
            tuned = blocked.index_select(dim, blocks)
            swapped = _rounded_sum(tuned, delta)
        y = _with_slice(blocked, dim, blocks, tuned, swapped, lambda: _linear_not_a_view(x, frozen, bias))
        # A compute dtype below Delta's (bf16): keep the rounded slice for backward instead
        # of rounding it again (the two-matmul path kept Delta's cast copy, the same size);
        # in fp32 the sum is recomputed in backward, so nothing beyond x is saved.
        ctx.keeps_slice = swapped.dtype != delta.dtype
        kept_input = x if dim == 0 else x_tuned
        ctx.save_for_backward(kept_input, weight, delta, positions, *([swapped] if ctx.keeps_slice else []))
        ctx.dim, ctx.width = dim, width
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, delta, positions, *kept = ctx.saved_tensors
        dim = ctx.dim
        dx = None
        if ctx.needs_input_grad[0]:
            frozen = weight.data
            blocked, blocks = _blocks_of(frozen, dim, positions, ctx.width)
            with torch.no_grad():
                tuned = blocked.index_select(dim, blocks)
                swapped = kept[0] if ctx.keeps_slice else _rounded_sum(tuned, delta)
            dx = _with_slice(blocked, dim, blocks, tuned, swapped, lambda: dy.matmul(frozen))
        d_delta = None
        if ctx.needs_input_grad[3]:
            tokens_dy = dy.reshape(-1, dy.shape[-1])
            tokens_x = x.reshape(-1, x.shape[-1])  # x (rows) or x_T (columns)
            if dim == 0:  # dy_T^T x: (tuned outputs, in)
                d_delta = tokens_dy.index_select(1, positions).T.matmul(tokens_x)
            else:  # dy^T x_T: (out, tuned inputs)
                d_delta = tokens_dy.T.matmul(tokens_x)
            d_delta = d_delta.to(delta.dtype)
        return dx, None, None, d_delta, None, None, None, None


def _linear_not_a_view(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear written into a new tensor of the output's shape: F.linear over more than two
    dims returns a view of its 2-d result, and a custom Function's output that is a view
    cannot be written in place (the column wrappers write their tuned outputs back)."""
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    tokens, out = x.reshape(-1, x.shape[-1]), y.view(-1, weight.shape[0])
    if bias is None:
        torch.mm(tokens, weight.T, out=out)
    else:
        torch.addmm(bias, tokens, weight.T, out=out)
    return y


def _blocks_of(weight: torch.Tensor, dim: int, positions: torch.Tensor, width: int):
    """``weight`` viewed with ``dim`` split into blocks of ``width``, and the blocks that
    ``positions`` (runs of ``width``, see :func:`unit_positions`) cover, in their order:
    a head's columns move as contiguous runs instead of one strided element at a time."""
    shape = list(weight.shape)
    shape[dim : dim + 1] = [shape[dim] // width, width]
    return weight.view(shape), positions[::width] // width


def _with_slice(blocked: torch.Tensor, dim: int, blocks: torch.Tensor, tuned: torch.Tensor,
                swapped: torch.Tensor, compute):
    """``compute()`` while the ``blocks`` of the frozen weight (viewed as ``blocked``) along
    ``dim`` hold ``swapped``; then they hold ``tuned`` (their copy) again
    (see :class:`_SliceSwappedLinear`)."""
    with torch.no_grad():
        blocked.index_copy_(dim, blocks, swapped)
        try:
            return compute()
        finally:
            blocked.index_copy_(dim, blocks, tuned)


@torch.compiler.disable
def _slice_swapped_linear(x, weight, bias, delta, positions, dim: int, width: int, x_tuned=None) -> torch.Tensor:
    # Run eagerly under ``compile: True`` (a graph break around each wrapper's matmul, the
    # same every step: no recompiles). Dynamo can trace the Function, but AOT autograd's
    # functionalization turns the in-place swap and restore into out-of-place
    # ``index_copy``s, i.e. full copies of the weight per forward, which the swap avoids.
    return _SliceSwappedLinear.apply(x, weight, bias, delta, positions, dim, width, x_tuned)


# Elements per block of the rounded sum below on the CPU: a 256 KB fp32 block stays in cache.
_ROUNDED_SUM_BLOCK = 1 << 16


def _rounded_sum(tuned: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W_T + Delta computed in Delta's dtype (fp32) and rounded once to ``tuned``'s (the
    weight's) dtype, as a new tensor of ``tuned``'s shape: ``delta``'s, or the blocked shape
    of the swapped slice with its elements in the same order. ``tuned`` may be a strided
    slice of the weight. Below fp32 on the CPU it runs over row blocks of about 64K elements,
    bit-identical to the whole slice at once but without a slice-sized fp32 temporary, which
    glibc often hands back to the OS when it is freed, so that the next forward page-faults
    it in again (``python -m bench.rounded_sum``: blocks take the same time every call, the
    whole slice 0.8x to 4x that, by the allocator's state). Elsewhere (a caching allocator,
    a launch per kernel) the whole slice at once."""
    out = tuned.new_empty(tuned.shape)
    weight, target = tuned.reshape(delta.shape), out.view(delta.shape)
    if tuned.dtype == delta.dtype:
        torch.add(weight, delta, out=target)
    elif tuned.device.type != "cpu":
        target.copy_(weight.to(delta.dtype).add_(delta))
    else:
        rows = max(1, _ROUNDED_SUM_BLOCK // max(1, weight.shape[1]))
        for start in range(0, weight.shape[0], rows):
            stop = start + rows
            target[start:stop] = weight[start:stop].to(delta.dtype).add_(delta[start:stop])
    return out


class _PrefixRowsLinear(torch.autograd.Function):
    """Rows ``[start, stop)`` of a column wrapper's output whose tuned rows are the first
    ones of ``weight`` (the contiguous layout, see :mod:`apex_tune.modules.layout`), written
    after ``head`` (already computed outputs of rows ``[0, start)``, or None):
    ``y = [head, x W_eff[start:stop]^T (+ bias[start:stop])]``, W_eff's rows
    ``[start, start + len(delta))`` holding W + Delta (Delta None: the frozen rows only).

    One matmul per slice (the tuned rows, the frozen rows), written into one output: no
    gather, no write-back, no weight swap. The rounded tuned slice is formed once per forward
    and (below fp32) kept for backward; only Delta's gradient is computed (partial
    back-propagation), dDelta = dy_T^T x. ``head``'s gradient is its part of dy, a view."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, head, start: int, stop: int):
        tokens = x.reshape(-1, x.shape[-1])
        frozen = weight.detach()[:stop]
        tuned_stop = start + (delta.shape[0] if delta is not None else 0)
        tuned = None
        if delta is not None:
            tuned = _rounded_sum(frozen[start:tuned_stop], delta)
        head_width = head.shape[-1] if head is not None else 0
        y = tokens.new_empty(tokens.shape[0], head_width + stop - start)
        if head is not None:
            y[:, :head_width] = head.reshape(-1, head_width)
        column = head_width
        for part, first in ((tuned, start), (frozen[tuned_stop:], tuned_stop)):
            if part is None or part.shape[0] == 0:
                continue
            out = y[:, column : column + part.shape[0]]
            if bias is None:
                torch.mm(tokens, part.T, out=out)
            else:
                torch.addmm(bias[first : first + part.shape[0]], tokens, part.T, out=out)
            column += part.shape[0]
        ctx.keeps_slice = tuned is not None and tuned.dtype != delta.dtype
        ctx.start, ctx.stop, ctx.head_width, ctx.x_shape = start, stop, head_width, x.shape
        # x only for dDelta: without the delta nothing beyond the frozen weight is kept
        ctx.save_for_backward(x if delta is not None else None, weight, delta, *([tuned] if ctx.keeps_slice else []))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, delta, *kept = ctx.saved_tensors
        start, stop, head_width = ctx.start, ctx.stop, ctx.head_width
        frozen = weight.detach()[:stop]
        tuned_stop = start + (delta.shape[0] if delta is not None else 0)
        grads = dy.reshape(-1, dy.shape[-1])
        split = head_width + tuned_stop - start
        tuned_dy, frozen_dy = grads[:, head_width:split], grads[:, split:]
        dx = d_delta = d_head = None
        if ctx.needs_input_grad[0]:
            dx = frozen_dy.matmul(frozen[tuned_stop:])
            if delta is not None:
                tuned = kept[0] if ctx.keeps_slice else _rounded_sum(frozen[start:tuned_stop], delta)
                dx.addmm_(tuned_dy, tuned)
            dx = dx.view(ctx.x_shape)
        if delta is not None and ctx.needs_input_grad[3]:
            d_delta = tuned_dy.T.matmul(x.reshape(-1, x.shape[-1])).to(delta.dtype)
        if ctx.needs_input_grad[4]:
            d_head = grads[:, :head_width].view(*dy.shape[:-1], head_width)
        return dx, None, None, d_delta, d_head, None, None


class _PrefixColumnsLinear(torch.autograd.Function):
    """A row wrapper's output when its tuned columns are the first ones of ``weight`` (the
    contiguous layout): ``y = mixed W_eff[:, :t]^T + rest W[:, t:]^T (+ bias)``, where
    ``mixed`` are the tuned inputs after the operators (``t`` of them, [N, P, E]) and
    ``rest`` the inputs after them; W_eff's tuned columns hold W + Delta (Delta None: W).

    Two matmuls over column slices of the frozen weight accumulate into one output, so the
    caller's inputs are never copied or written. Only Delta's gradient is computed:
    dDelta = dy^T mixed."""

    @staticmethod
    def forward(ctx, mixed, rest, weight, bias, delta):
        tuned_width = mixed.shape[-1]
        frozen = weight.detach()
        tuned = frozen[:, :tuned_width]
        if delta is not None:
            tuned = _rounded_sum(tuned, delta)
        tokens_mixed = mixed.reshape(-1, tuned_width)
        if bias is None:
            y = torch.mm(tokens_mixed, tuned.T)
        else:
            y = torch.addmm(bias, tokens_mixed, tuned.T)
        if rest.shape[-1]:
            y.addmm_(rest.reshape(-1, rest.shape[-1]), frozen[:, tuned_width:].T)
        ctx.keeps_slice = delta is not None and tuned.dtype != delta.dtype
        ctx.mixed_shape = mixed.shape
        # mixed only for dDelta; rest not at all: the frozen columns get no gradient
        ctx.save_for_backward(mixed if delta is not None else None, weight, delta, *([tuned] if ctx.keeps_slice else []))
        return y.view(*mixed.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        mixed, weight, delta, *kept = ctx.saved_tensors
        mixed_shape = ctx.mixed_shape
        tuned_width = mixed_shape[-1]
        frozen = weight.detach()
        if delta is None:
            tuned = frozen[:, :tuned_width]
        else:
            tuned = kept[0] if ctx.keeps_slice else _rounded_sum(frozen[:, :tuned_width], delta)
        grads = dy.reshape(-1, dy.shape[-1])
        d_mixed = d_rest = d_delta = None
        if ctx.needs_input_grad[0]:
            d_mixed = grads.matmul(tuned).view(mixed_shape)
        if ctx.needs_input_grad[1]:
            d_rest = grads.matmul(frozen[:, tuned_width:]).view(*mixed_shape[:-1], -1)
        if delta is not None and ctx.needs_input_grad[4]:
            d_delta = grads.T.matmul(mixed.reshape(-1, tuned_width)).to(delta.dtype)
        return d_mixed, d_rest, None, None, d_delta


# Run eagerly under ``compile: True``, like _slice_swapped_linear: the same graph break every
# step, no recompiles; the Functions write matmuls into slices of one output (``out=``).
_prefix_rows_linear = torch.compiler.disable(_PrefixRowsLinear.apply)
_prefix_columns_linear = torch.compiler.disable(_PrefixColumnsLinear.apply)


class MergedStages(nn.Module):
    """The finished stages of a wrapper over a base that is never rewritten (NF4), as one
    correction: W_T - W_0 on the rows (column wrappers) or columns (row wrappers) that
    any stage changed (``positions``, sorted), in fp32, and the bias change (column
    wrappers with a bias). W_T - W_0 is zero elsewhere, so the wrapper adds one slice
    matmul however many stages there were, and keeps at most one weight's worth.

    Empty (no parameters) until the first stage is folded in, so a fresh run's
    state dict is the base's; :meth:`resize_` makes room for a saved state's.
    """

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.dim, self.has_bias = dim, bias
        for name in ("positions", "weight", "bias"):
            self.register_parameter(name, None)

    @property
    def empty(self) -> bool:
        return self.positions is None

    @torch.no_grad()
    def resize_(self, count: int, like: nn.Module) -> None:
        """Uninitialised parameters for ``count`` positions of the wrapper ``like`` (values to be loaded)."""
        other = like.in_features if self.dim == 0 else like.out_features
        shape = (count, other) if self.dim == 0 else (other, count)
        device = like.positions.device
        self._set(torch.empty(count, dtype=torch.int64, device=device),
                  torch.empty(shape, dtype=APEX_PARAM_DTYPE, device=device),
                  torch.empty(count, dtype=APEX_PARAM_DTYPE, device=device) if self.has_bias else None)

    def _set(self, positions, weight, bias) -> None:
        self.positions = nn.Parameter(positions, requires_grad=False)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @torch.no_grad()
    def set_(self, weight, bias, base_weight, base_bias, live_positions) -> None:
        """Fold a stage in: ``weight``/``bias`` (fp32) are the wrapper's whole function
        after it, over ``base_weight``/``base_bias``; the live stage changed ``live_positions``."""
        positions = live_positions if self.empty else torch.cat([self.positions, live_positions])
        positions = torch.unique(positions)  # sorted
        change = weight.index_select(self.dim, positions) - base_weight.float().index_select(self.dim, positions)
        bias_change = None
        if self.has_bias:
            bias_change = bias.index_select(0, positions) - _fp32(base_bias).index_select(0, positions)
        self._set(positions, change, bias_change)

    def added_to(self, weight, bias) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The full fp32 ``weight``/``bias`` of the base with the correction added."""
        if self.empty:
            return weight, bias
        weight = weight.index_add(self.dim, self.positions, full_value(self.weight).float())
        if self.bias is not None:
            bias = bias.index_add(0, self.positions, full_value(self.bias).float())
        return weight, bias


class ApexColumnLinear(_ApexLinear):
    """Wrapper whose units are output rows (q, k, v_proj; FFN w1, w3).

    With an ``expansion`` (v_proj, w1, w3) it mixes the N outputs from the P
    outputs and scales P by its own vector ``b``; without one (q, k) it only adds
    the delta to the tuned rows.
    """

    dim = 0

    def __init__(
        self,
        base: nn.Linear,
        num_tuned: int,
        width: int,
        expansion: Optional[ApexExpansion] = None,
        delta: bool = False,
        history: Optional[Tuple[nn.Module, str]] = None,
        merged_stages: bool = False,
    ):
        super().__init__(base, num_tuned, 1, width, expansion, delta, history, merged_stages)
        self.b = (
            nn.Parameter(torch.ones(expansion.n, device=base.weight.device, dtype=APEX_PARAM_DTYPE))
            if expansion is not None
            else None
        )

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        super().reset_parameters(generator)
        if self.b is not None:
            assign_(self.b, torch.ones(self.b.shape, device=self.b.device))

    def adapter_params(self) -> List[str]:
        return super().adapter_params() + (["b"] if self.b is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bypassed:
            return F.linear(x, self.weight, self.bias)
        if self._prefix_path():
            return self._prefix_forward(x)
        if self._partial_backprop():
            stage = self.live_stage()
            # y_T = x (W_T + Delta)^T + bias_T already: only the operators remain
            y = _slice_swapped_linear(x, self.weight, self.bias, stage.delta, stage.positions, 0, self.width)
            return self._apply_stage(x, y, stage._replace(delta=None))
        y = F.linear(x, self.weight, self.bias)
        for stage in self.frozen_stages():
            y = self._apply_stage(x, y, stage)
        merged = self.apex_history
        if merged is not None and not merged.empty:
            bias = merged.bias.to(x.dtype) if merged.bias is not None else None
            y = y.index_add(-1, merged.positions, F.linear(x, merged.weight.to(x.dtype), bias))
        return self._apply_stage(x, y, self.live_stage())

    def _prefix_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The tuned outputs are the first ones: they (with the delta) come out of their own
        matmul and are mixed, then the frozen rows' matmul writes after them."""
        stage = self.live_stage()  # with operators: only FFN channels are laid out
        tuned_width = len(stage.positions)
        tuned = _prefix_rows_linear(x, self.weight, self.bias, stage.delta, None, 0, tuned_width)
        mixed = mix(tuned, stage.ops, stage.b)
        return _prefix_rows_linear(x, self.weight, self.bias, None, mixed, tuned_width, self.out_features)

    @staticmethod
    def _apply_stage(x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        """One stage on the outputs ``y`` of the weights before it: the tuned outputs
        plus the delta's, mixed."""
        if stage.delta is None and stage.ops is None:
            return y
        tuned = y.index_select(-1, stage.positions)
        if stage.delta is not None:
            tuned = tuned + F.linear(x, stage.delta.to(x.dtype))
        if stage.ops is not None:
            tuned = mix(tuned, stage.ops, stage.b)
        return _replaced_in_place(y, stage.positions, tuned)

    def fold_stage(self, weight, bias, stage: Stage):
        rows = weight.index_select(0, stage.positions)
        if stage.delta is not None:
            rows = rows + stage.delta
        if stage.ops is not None:
            rows = mix(rows.T, stage.ops, stage.b).T  # the expansion mixes along rows
            if bias is not None:
                tuned = mix(bias.index_select(0, stage.positions), stage.ops, stage.b)
                bias = bias.index_copy(0, stage.positions, tuned)
        return weight.index_copy(0, stage.positions, rows), bias


class ApexRowLinear(_ApexLinear):
    """Wrapper whose units are input columns (output_proj, FFN w2).

    W' = W~ R acts on the inputs: y = W (R x) + Delta (R x)_T, with R mixing the
    tuned input columns (:func:`mix_transposed`); the Monarch runs on the tokens
    and no weight slice is copied. Over a quantized base the frozen stages act on
    the inputs too, newest first: y = W0 (R_1 ... R_t x) + the deltas' terms.
    """

    dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bypassed:
            return F.linear(x, self.weight, self.bias)
        if self._prefix_path():
            # y = W_eff (R x): the tuned inputs mixed on their own, the others read in place
            stage = self.live_stage()
            tuned_width = len(stage.positions)
            tuned, rest = x.split([tuned_width, x.shape[-1] - tuned_width], dim=-1)
            mixed = mix_transposed(tuned, stage.ops, self.group)
            return _prefix_columns_linear(mixed, rest, self.weight, self.bias, stage.delta)
        if self._partial_backprop():
            # y = W_eff (R x), W_eff's tuned columns W_T + Delta: one matmul
            stage = self.live_stage()
            x, tuned = self._mixed_inputs(x, stage)
            return _slice_swapped_linear(x, self.weight, self.bias, stage.delta, stage.positions, 1, self.width, tuned)
        # W_T = W_0 R_1 ... R_t + D (frozen stages, or the merged correction D), then
        # the live stage: y = W_T (R x) + Delta (R x)_T.
        x, extra = self._apply_stage(x, self.live_stage())
        extras = [extra]
        merged = self.apex_history
        if merged is not None and not merged.empty:
            extras.append(F.linear(x.index_select(-1, merged.positions), merged.weight.to(x.dtype)))
        for stage in reversed(self.frozen_stages()):
            x, extra = self._apply_stage(x, stage)
            extras.append(extra)
        y = F.linear(x, self.weight, self.bias)
        for extra in extras:
            if extra is not None:
                y = y + extra
        return y

    def _mixed_inputs(self, x: torch.Tensor, stage: Stage) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(R x, (R x)_T)``: the inputs with the stage's tuned entries mixed, and those entries."""
        tuned = mix_transposed(x.index_select(-1, stage.positions), stage.ops, self.group)
        return _replaced(x, stage.positions, tuned), tuned

    def _apply_stage(self, x: torch.Tensor, stage: Stage) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One stage on the inputs: ``(R x, Delta (R x)_T or None)``, in ``x``'s dtype."""
        mixed, tuned = self._mixed_inputs(x, stage)
        extra = F.linear(tuned, stage.delta.to(x.dtype)) if stage.delta is not None else None
        return mixed, extra

    def fold_stage(self, weight, bias, stage: Stage):
        columns = weight.index_select(1, stage.positions)
        if stage.delta is not None:
            columns = columns + stage.delta
        return weight.index_copy(1, stage.positions, mix(columns, stage.ops, None, self.group)), bias
