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
The base ``weight``/``bias`` keep their names, so base checkpoints load as is.

Precision: the APEX parameters (M's factors, ``a``, ``b``, delta) are stored
in fp32 (``APEX_PARAM_DTYPE``) whatever the base dtype, so that an optimizer
step of about the learning rate is not rounded away (near 1.0 a bf16 step is
2^-8 .. 2^-7). The forward casts them to the input's dtype where they are
used (compute in the run dtype); folds are computed in fp32 and cast once
into the base weight's dtype.
Index buffers and parameter shapes depend only on the configured sizes, so a
new selection at a stage boundary changes values, never shapes.
"""

from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from apex_tune.modules._dtensor import assign_, full_value
from apex_tune.modules.monarch import MonarchMatrix

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


class ApexExpansion(nn.Module):
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

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """M = 0 and a = 1: the wrapped layers compute the base weights again."""
        self.monarch.reset_parameters(generator)
        assign_(self.a, torch.ones(self.a.shape, device=self.a.device))

    def adapter_params(self) -> List[str]:
        return ["monarch.L1", "monarch.L2", "a"]


class _ApexLinear(nn.Module):
    """Common state of the wrappers: the base linear's parameters, the tuned
    positions and the optional zero-initialised dense delta on them."""

    def __init__(self, base: nn.Linear, num_tuned: int, group: int, width: int, dim: int, delta: bool):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.group, self.width, self.dim = group, width, dim
        # Same Parameter objects as the base layer: names and checkpoints unchanged.
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.register_buffer(
            "positions",
            unit_positions(torch.arange(num_tuned, device=device), group, width),
            persistent=False,
        )
        delta_shape = (
            (len(self.positions), self.in_features) if dim == 0 else (self.out_features, len(self.positions))
        )
        self.delta = (
            nn.Parameter(torch.zeros(delta_shape, device=device, dtype=APEX_PARAM_DTYPE))
            if delta
            else None
        )

    def set_units(self, units: torch.Tensor) -> None:
        positions = unit_positions(units.to(self.positions.device), self.group, self.width)
        if positions.shape != self.positions.shape:
            raise ValueError(
                f"selection has {len(units)} units, this layer was built for "
                f"{len(self.positions) // (self.group * self.width)}"
            )
        self.positions.copy_(positions)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        if self.delta is not None:
            assign_(self.delta, torch.zeros(self.delta.shape, device=self.delta.device))

    def adapter_params(self) -> List[str]:
        return ["delta"] if self.delta is not None else []

    def folded(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Full W' (delta and operators folded in; nothing is written), the folded
        bias (None where folding leaves it unchanged), and the change of the tuned
        slice, W'_T - W_T, in fp32 (W' - W is zero outside the slice)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge_(self) -> torch.Tensor:
        """Write W' into ``weight``/``bias``; the wrapper then computes the same
        function only after :meth:`reset_parameters`. Returns the tuned slice's
        change (see :meth:`folded`)."""
        weight, bias, change = self.folded()
        assign_(self.weight, weight)
        if bias is not None:
            assign_(self.bias, bias)
        return change

    def fuse_(self) -> None:
        """Fold everything into ``weight``/``bias`` for the plain model (:func:`fuse_apex`).
        Here the same as :meth:`merge_`; the quantized wrappers also fold their
        frozen stages and dequantize."""
        self.merge_()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"tuned={len(self.positions)}, delta={self.delta is not None}"
        )


class ApexColumnLinear(_ApexLinear):
    """Wrapper whose units are output rows (q, k, v_proj; FFN w1, w3).

    With an ``expansion`` (v_proj, w1, w3) it mixes the N rows from the P rows
    and scales P by its own vector ``b``; without one (q, k) it only adds the
    delta to the tuned rows.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_tuned: int,
        width: int,
        expansion: Optional[ApexExpansion] = None,
        delta: bool = False,
    ):
        super().__init__(base, num_tuned, group=1, width=width, dim=0, delta=delta)
        # Not registered as a child: the owning attention/FFN module holds it.
        self._expansion = [expansion] if expansion is not None else []
        self.b = (
            nn.Parameter(torch.ones(expansion.n, device=base.weight.device, dtype=APEX_PARAM_DTYPE))
            if expansion is not None
            else None
        )

    @property
    def expansion(self) -> Optional[ApexExpansion]:
        return self._expansion[0] if self._expansion else None

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        super().reset_parameters(generator)
        if self.b is not None:
            assign_(self.b, torch.ones(self.b.shape, device=self.b.device))

    def adapter_params(self) -> List[str]:
        return super().adapter_params() + (["b"] if self.b is not None else [])

    def _mix(self, tuned: torch.Tensor) -> torch.Tensor:
        """Apply the expansion to tuned outputs/rows laid out ``[N, P, E]`` on the last dim."""
        exp = self.expansion
        n = exp.n
        disadvantageous, advantageous = tuned[..., :n], tuned[..., n : 2 * n]
        mixed = disadvantageous * exp.a.to(tuned.dtype) + exp.monarch(advantageous)
        return torch.cat([mixed, advantageous * self.b.to(tuned.dtype), tuned[..., 2 * n :]], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._expand(x, F.linear(x, self.weight, self.bias))

    def _expand(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """This stage's change to the outputs ``y`` of the weights it wraps."""
        if self.delta is not None:
            tuned = y.index_select(-1, self.positions) + F.linear(x, self.delta.to(x.dtype))
        elif self.expansion is not None:
            tuned = y.index_select(-1, self.positions)
        else:
            return y
        if self.expansion is not None:
            tuned = self._mix(tuned)
        return y.index_copy(-1, self.positions, tuned)

    @torch.no_grad()
    def folded(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        weight = full_value(self.weight)
        base_rows = weight.index_select(0, self.positions).float()  # fold in fp32, cast once below
        rows = base_rows
        if self.delta is not None:
            rows = rows + full_value(self.delta).float()
        if self.expansion is not None:
            rows = self._merged_rows(rows)
        change = rows.float() - base_rows.float()
        folded_weight = weight.index_copy(0, self.positions, rows.to(weight.dtype))
        folded_bias = None
        if self.bias is not None and self.expansion is not None:
            bias = full_value(self.bias)
            tuned = self._merged_rows(bias.index_select(0, self.positions).unsqueeze(-1)).squeeze(-1)
            folded_bias = bias.index_copy(0, self.positions, tuned.to(bias.dtype))
        return folded_weight, folded_bias, change

    def _merged_rows(self, rows: torch.Tensor) -> torch.Tensor:
        # rows: (tuned, in). The expansion mixes along rows, so work on the transpose.
        with _full_fp32_params(self.expansion, self):
            mixed = self._mix(rows.T.float())
        return mixed.T


class ApexRowLinear(_ApexLinear):
    """Wrapper whose units are input columns (output_proj, FFN w2).

    W'[:, N] = W~[:, N] diag(a) + W~[:, P] M^T, computed on the tuned columns
    only: y = W x + (W'_T - W_T) x_T, so no full-size weight copy is built.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_tuned: int,
        group: int,
        width: int,
        expansion: ApexExpansion,
        delta: bool = False,
    ):
        super().__init__(base, num_tuned, group=group, width=width, dim=1, delta=delta)
        self._expansion = [expansion]

    @property
    def expansion(self) -> ApexExpansion:
        return self._expansion[0]

    def _tuned_columns(self, columns: torch.Tensor, delta: Optional[torch.Tensor]) -> torch.Tensor:
        """W'_T from the base tuned columns (out, tuned), laid out ``[N, P, E]``."""
        if delta is not None:
            columns = columns + delta.to(columns.dtype)
        exp = self.expansion
        out, g, n = columns.shape[0], self.group, exp.n
        # The tuned columns are laid out (group, units, width) (see unit_positions):
        # view them per group slice, each slice ordered [N, P, E] like M mixes.
        grouped = columns.reshape(out, g, -1)
        disadvantageous = grouped[..., :n]
        advantageous = grouped[..., n : 2 * n]
        mixed = disadvantageous * exp.a.to(columns.dtype) + exp.monarch(advantageous)
        return torch.cat([mixed, grouped[..., n:]], dim=-1).reshape(out, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        base_cols = self.weight.index_select(1, self.positions)
        change = self._tuned_columns(base_cols, self.delta) - base_cols
        return y + F.linear(x.index_select(-1, self.positions), change)

    @torch.no_grad()
    def folded(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        weight = full_value(self.weight)
        columns = weight.index_select(1, self.positions).float()
        with _full_fp32_params(self.expansion, self):
            delta = self.delta.float() if self.delta is not None else None
            merged = self._tuned_columns(columns, delta)
        folded_weight = weight.index_copy(1, self.positions, merged.to(weight.dtype))
        return folded_weight, None, merged - columns


@contextmanager
def _full_fp32_params(*modules: nn.Module) -> Iterator[None]:
    """Temporarily swap the adapter parameters of ``modules`` (possibly sharded)
    for their full fp32 values, so fusion reuses the forward math exactly."""
    saved = []
    try:
        for module in modules:
            for name, param in list(module.named_parameters()):
                if name in ("weight", "bias"):
                    continue
                owner, attr = _owner(module, name)
                saved.append((owner, attr, param))
                owner._parameters[attr] = full_value(param).float()
        yield
    finally:
        for owner, attr, param in reversed(saved):
            owner._parameters[attr] = param


def _owner(module: nn.Module, name: str):
    *path, attr = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, attr
