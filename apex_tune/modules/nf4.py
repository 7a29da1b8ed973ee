"""QAPEX: APEX over a base kept in 4-bit NF4 (torchao), with deferred fusion.

APEX never trains the base weights, so like QLoRA it can keep them in NF4
(``apex.quantize_base: true``). :func:`quantize_apex_base_` (called by
:func:`~apex_tune.modules.model.apply_apex`) stores the weight of every layer's seven
projections (q, k, v, output_proj, w1, w3, w2) as a torchao ``NF4Tensor``, as
torchtune's QLoRA builders do; ``F.linear`` on it dequantizes on the fly
(torchao's ``linear_nf4``), saving only the 4-bit weight for backward.

What changes for the wrappers
-----------------------------
- Column wrappers (v, w1, w3; q, k with the delta) only read the weight
  through ``F.linear``, then mix the tuned *outputs*: unchanged.
- Row wrappers (output_proj, w2) used to read the tuned weight columns, which an
  NF4 tensor cannot give (no ``index_select``; its 64-element blocks run along
  rows). Here they act on the *inputs* instead, an identity of the same math:
  W' = (W + Delta) R with R = I except (R x)_N = a * x_N and
  (R x)_P = x_P + M^T x_N, so y = W (R x) + Delta (R x)_T. M^T is applied with
  :meth:`~apex_tune.modules.monarch.MonarchMatrix.apply_transposed`, O(n sqrt(n)).

Fusion: deferred, never re-quantized
------------------------------------
Folding a stage into an NF4 weight means dequantize, fold, quantize again, and
every re-quantization adds error, also to the rows and columns APEX never
touched (NF4 is not idempotent: double-quantized scalers shift). Over T stages
that piles up. Keeping the changed rows/columns in high precision instead
costs ~16 bits per changed weight, and APEX changes K units per stage in five
of seven projections (about 19-38% of those weights per stage): more than the
4-bit base itself after one stage.

So a stage boundary (:func:`~apex_tune.modules.model.merge_apex_`) freezes the stage's
operators instead: M's factors, ``a``, the unit ids, and each wrapper's ``b``
and delta are copied into the layer's ``apex_history`` (an
:class:`ApexHistory`), and the live operators start again from M = 0. The
wrappers apply the frozen stages in order, then the live one; the NF4 base is
never rewritten. A frozen stage costs what its operators cost (about 0.1% of
the parameters without the delta), so T stages cost T times that. The plain
model is folded once, in fp32, from the dequantized base
(:func:`~apex_tune.modules.model.fuse_apex`, used by the recipe's checkpoints): the
fused model equals the wrapped one up to fp32 rounding after every stage, so
the error after T stages is no larger than after one. Checkpoints are written
in the run dtype (bf16 or fp32), like torchtune's QLoRA.

Distributed
-----------
FSDP2 cannot shard NF4 weights with torch 2.13 and torchao 0.15: its
world-size-1 fast path all-gathers only the first of the NF4 tensor's three
inner tensors, and the multi-rank path fails on the same unpacking
(torchtune's own QLoRA sharding fails the same way here). :func:`shard_model`
therefore leaves the NF4 weights (and the frozen stages) out of FSDP
(``ignored_params``): every rank keeps the whole 4-bit base, as in a
single-device QLoRA run, and FSDP shards what trains.
:func:`load_from_full_model_state_dict` quantizes those weights as it loads
them, one tensor at a time, so the full-precision model is never resident.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.modules.module import _IncompatibleKeys
from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
from torchtune import training

from apex_tune.modules._dtensor import full_value
from apex_tune.modules.expansion import ApexColumnLinear, ApexExpansion, ApexRowLinear, _ApexLinear, _owner, unit_positions
from apex_tune.modules.model import HEADS, CHANNELS, _wrapped_layers, _wrappers, param_kind
from apex_tune.modules.monarch import monarch_apply

NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256
PROJECTIONS = (("attn", ("q_proj", "k_proj", "v_proj", "output_proj")), ("mlp", ("w1", "w3", "w2")))
HISTORY = ".apex_history."


def is_nf4(t: torch.Tensor) -> bool:
    return isinstance(t, NF4Tensor)


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight in its original dtype, whether NF4, sharded or plain."""
    if isinstance(weight, DTensor) and is_nf4(weight._local_tensor):
        weight = training._distributed._gather_nf4_tensor(weight)
    if is_nf4(weight):
        return weight.get_original_weight()
    return full_value(weight)


# --------------------------------------------------------------- frozen stages
class _FrozenParts(nn.Module):
    """One wrapper's own frozen operators of a stage: ``b`` (v, w1, w3) and the delta."""

    def __init__(self, wrapper: _ApexLinear, device: torch.device, values: bool):
        super().__init__()
        for name in ("b", "delta"):
            live = getattr(wrapper, name, None)
            self.register_parameter(name, None if live is None else _frozen_like(live, device, values))


class ApexFrozenStage(nn.Module):
    """A finished stage of one expansion pair: M's factors, ``a``, the unit ids
    ``[N, P, E]`` and each wrapper's ``b``/delta, all frozen, in the live dtype."""

    def __init__(
        self, expansion: ApexExpansion, wrappers: Sequence[_ApexLinear], device: torch.device, values: bool
    ):
        super().__init__()
        self.n = expansion.n
        self.L1 = _frozen_like(expansion.monarch.L1, device, values)
        self.L2 = _frozen_like(expansion.monarch.L2, device, values)
        self.a = _frozen_like(expansion.a, device, values)
        self.units = _frozen_like(expansion.units, device, values)
        self.parts = nn.ModuleDict({w._apex_name: _FrozenParts(w, device, values) for w in wrappers})


def _frozen_like(live: torch.Tensor, device: torch.device, values: bool) -> nn.Parameter:
    if values:
        data = full_value(live).clone().to(device)
    else:
        data = torch.empty(live.shape, dtype=live.dtype, device=device)
    return nn.Parameter(data, requires_grad=False)


class ApexHistory(nn.ModuleList):
    """The frozen stages of one attention or FFN, oldest first (``owner.apex_history``)."""

    @torch.no_grad()
    def freeze_(self, expansion: ApexExpansion, wrappers: Sequence[_ApexLinear]) -> None:
        """Stage boundary: keep the live operators (whole, even if sharded) as a new frozen stage."""
        self.append(ApexFrozenStage(expansion, wrappers, expansion.a.device, values=True))

    def grow_(self, count: int, expansion: ApexExpansion, wrappers: Sequence[_ApexLinear]) -> None:
        """Add empty stages (values to be loaded) until there are ``count``."""
        while len(self) < count:
            self.append(ApexFrozenStage(expansion, wrappers, expansion.a.device, values=False))


# -------------------------------------------------------------------- wrappers
def _mix_columns(t: torch.Tensor, n: int, a, L1, L2, b) -> torch.Tensor:
    """Column-weight mixing on the last dim laid out [N, P, E]: N <- a N + M P, P <- b P,
    in ``t``'s dtype (the operators are stored in fp32)."""
    a, L1, L2, b = (p.to(t.dtype) for p in (a, L1, L2, b))
    mixed = t[..., :n] * a + monarch_apply(t[..., n : 2 * n], L1, L2, n)
    return torch.cat([mixed, t[..., n : 2 * n] * b, t[..., 2 * n :]], dim=-1)


def _row_inputs(x: torch.Tensor, positions, group: int, n: int, a, L1, L2, delta):
    """One row-weight stage on the inputs: ``(R x, Delta (R x)_T or None)``, in ``x``'s dtype."""
    a, L1, L2 = (p.to(x.dtype) for p in (a, L1, L2))
    tuned = x.index_select(-1, positions)
    grouped = tuned.reshape(*tuned.shape[:-1], group, -1)
    disadvantageous, advantageous = grouped[..., :n], grouped[..., n : 2 * n]
    grouped = torch.cat(
        [
            disadvantageous * a,
            advantageous + monarch_apply(disadvantageous, L1, L2, n, transpose=True),
            grouped[..., 2 * n :],
        ],
        dim=-1,
    )
    tuned = grouped.reshape(tuned.shape)
    extra = F.linear(tuned, delta.to(x.dtype)) if delta is not None else None
    return x.index_copy(-1, positions, tuned), extra


def _fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else full_value(t).float()


class _QuantizedWrapper:
    """Shared parts of the wrappers over an NF4 base (mixed into the two classes below)."""

    _apex_name: str
    _history: List[ApexHistory]

    def _stages(self) -> List[Tuple[torch.Tensor, ApexFrozenStage, _FrozenParts]]:
        out = []
        for stage in self._history[0]:
            positions = unit_positions(stage.units, self.group, self.width)
            out.append((positions, stage, stage.parts[self._apex_name]))
        return out

    def merge_(self) -> None:
        raise RuntimeError(
            "a wrapper over an NF4 base is not merged on its own: merge_apex_ freezes the "
            "stage into apex_history, fuse_apex folds everything into a plain weight"
        )

    @torch.no_grad()
    def fuse_(self) -> None:
        """Fold the frozen stages and the live one, in fp32, into a plain (dequantized) weight."""
        base = dequantized(self.weight)
        weight = base.float()
        bias = _fp32(self.bias)
        for positions, stage, parts in self._stages():
            weight, bias = self._fold(weight, bias, positions, stage.n, stage.a.float(), stage.L1.float(),
                                      stage.L2.float(), _fp32(parts.b), _fp32(parts.delta))
        exp = self.expansion
        if exp is None:  # q/k: delta only
            weight, bias = self._fold(weight, bias, self.positions, 0, None, None, None, None, _fp32(self.delta))
        else:
            weight, bias = self._fold(
                weight, bias, self.positions, exp.n, _fp32(exp.a), _fp32(exp.monarch.L1),
                _fp32(exp.monarch.L2), _fp32(getattr(self, "b", None)), _fp32(self.delta),
            )
        self.weight = nn.Parameter(weight.to(base.dtype), requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.to(self.bias.dtype), requires_grad=False)


class QApexColumnLinear(_QuantizedWrapper, ApexColumnLinear):
    """:class:`~apex_tune.modules.expansion.ApexColumnLinear` over an NF4 weight, after its frozen stages."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        for positions, stage, parts in self._stages():
            tuned = y.index_select(-1, positions)
            if parts.delta is not None:
                tuned = tuned + F.linear(x, parts.delta.to(x.dtype))
            if parts.b is not None:
                tuned = _mix_columns(tuned, stage.n, stage.a, stage.L1, stage.L2, parts.b)
            y = y.index_copy(-1, positions, tuned)
        return self._expand(x, y)

    @staticmethod
    def _fold(weight, bias, positions, n, a, L1, L2, b, delta):
        rows = weight.index_select(0, positions)
        if delta is not None:
            rows = rows + delta
        if b is not None:
            rows = _mix_columns(rows.T, n, a, L1, L2, b).T
            if bias is not None:
                tuned = _mix_columns(bias.index_select(0, positions).unsqueeze(0), n, a, L1, L2, b)
                bias = bias.index_copy(0, positions, tuned.squeeze(0))
        return weight.index_copy(0, positions, rows), bias


class QApexRowLinear(_QuantizedWrapper, ApexRowLinear):
    """:class:`~apex_tune.modules.expansion.ApexRowLinear` over an NF4 weight: the stages act on the
    inputs, newest first, y = W0 (R_1 ... R_t x) + the deltas' terms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exp = self.expansion
        x, extra = _row_inputs(x, self.positions, self.group, exp.n, exp.a, exp.monarch.L1, exp.monarch.L2, self.delta)
        extras = [extra]
        for positions, stage, parts in reversed(self._stages()):
            x, extra = _row_inputs(x, positions, self.group, stage.n, stage.a, stage.L1, stage.L2, parts.delta)
            extras.append(extra)
        y = F.linear(x, self.weight, self.bias)
        for extra in extras:
            if extra is not None:
                y = y + extra
        return y

    def _fold(self, weight, bias, positions, n, a, L1, L2, b, delta):
        columns = weight.index_select(1, positions)
        if delta is not None:
            columns = columns + delta
        grouped = columns.reshape(columns.shape[0], self.group, -1)
        mixed = grouped[..., :n] * a + monarch_apply(grouped[..., n : 2 * n], L1, L2, n)
        columns = torch.cat([mixed, grouped[..., n:]], dim=-1).reshape(columns.shape)
        return weight.index_copy(1, positions, columns), bias


# ------------------------------------------------------------------ conversion
def _check_quantizable(weight: torch.Tensor, where: str) -> None:
    quantum = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE
    if weight.numel() % quantum:
        raise ValueError(
            f"apex.quantize_base: {where}.weight has shape {tuple(weight.shape)} "
            f"({weight.numel()} elements), not a multiple of {NF4_BLOCK_SIZE} * "
            f"{NF4_SCALER_BLOCK_SIZE} = {quantum} (NF4 block and scaler block sizes), so it "
            "cannot be kept in NF4; set apex.quantize_base=false for this model"
        )


@torch.no_grad()
def quantize_apex_base_(model: nn.Module) -> nn.Module:
    """Store the base weight of every wrapped layer's projections as NF4 and switch the
    wrappers to their quantized versions, in place (meta device included).

    Called by :func:`~apex_tune.modules.model.apply_apex` with ``quantize_base``. The
    projections APEX does not wrap (q, k without the delta) become frozen NF4
    linears, like torchtune's ``FrozenNF4Linear``.
    """
    for layer in _wrapped_layers(model):
        for owner_name, names in PROJECTIONS:
            owner = getattr(layer, owner_name)
            if isinstance(getattr(owner, "apex_history", None), ApexHistory):
                raise ValueError(f"layer {layer.index} is already quantized")
            history = ApexHistory()
            for name in names:
                module = getattr(owner, name)
                where = f"layers.{layer.index}.{owner_name}.{name}"
                _check_quantizable(module.weight, where)
                weight = to_nf4(module.weight.detach(), NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)
                module.weight = nn.Parameter(weight, requires_grad=False)
                if isinstance(module, _ApexLinear):
                    module.__class__ = QApexColumnLinear if isinstance(module, ApexColumnLinear) else QApexRowLinear
                    module._apex_name = name
                    module._history = [history]
            if hasattr(owner, "apex_expansion"):  # a kind with expansion off has no stages
                owner.apex_history = history
    return model


def _state_dict_name(name: str) -> str:
    """A parameter/module name as state dicts spell it (without activation-checkpoint
    or compile wrapper prefixes)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, ApexHistory) for m in model.modules())


def ensure_history_(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Give a quantized wrapped model as many frozen stages as ``state_dict`` holds,
    so that it loads (resume; rebuilding a saved wrapped model). A no-op otherwise."""
    names = {id(m): name for name, m in model.named_modules()}
    for layer in _wrapped_layers(model):
        for kind in (HEADS, CHANNELS):
            history = layer.history(kind)
            if history is None:
                continue
            prefix = f"{_state_dict_name(names[id(history)])}."
            stages = {int(k[len(prefix):].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
            if stages and stages != set(range(max(stages) + 1)):
                raise ValueError(f"{prefix}: the state has stages {sorted(stages)}, not 0..{max(stages)}")
            history.grow_(len(stages), layer.expansion(kind), list(_wrappers(layer, kind)))


# ---------------------------------------------------------- sharding and loading
def _outside_fsdp(name: str, param: torch.Tensor) -> bool:
    return not isinstance(param, DTensor) and (is_nf4(param) or HISTORY in f".{name}")


def shard_model(
    model: nn.Module,
    shard_conditions,
    *,
    cpu_offload: bool,
    reshard_after_forward: bool = True,
    dp_mesh=None,
) -> None:
    """torchtune's ``training.shard_model``, leaving NF4 weights out of FSDP2.

    Same arguments and behaviour; with NF4 weights present (``quantize_base``)
    they are passed to ``fully_shard`` as ``ignored_params``: kept whole on
    every rank, never all-gathered (see the module docstring for why).
    """
    ignored = {p for name, p in model.named_parameters() if _outside_fsdp(name, p)}
    if not ignored:
        return training.shard_model(
            model=model,
            shard_conditions=shard_conditions,
            cpu_offload=cpu_offload,
            reshard_after_forward=reshard_after_forward,
            dp_mesh=dp_mesh,
        )
    fsdp_kwargs = {"reshard_after_forward": reshard_after_forward, "mesh": dp_mesh, "ignored_params": ignored}
    if cpu_offload:
        fsdp_kwargs["offload_policy"] = CPUOffloadPolicy()
    sharded = 0
    for n, m in reversed(list(model.named_modules())):
        if any(condition(n, m) for condition in shard_conditions):
            fully_shard(m, **fsdp_kwargs)
            sharded += 1
    if sharded == 0:
        raise ValueError("No layer modules were sharded. Please check if shard conditions are working as expected.")
    fully_shard(model, **fsdp_kwargs)


def load_from_full_model_state_dict(
    model: nn.Module,
    full_sd: Dict[str, torch.Tensor],
    device: torch.device,
    strict: bool = False,
    cpu_offload: bool = False,
) -> _IncompatibleKeys:
    """torchtune's ``training.load_from_full_model_state_dict``, plus what lives outside
    FSDP over a quantized base: each NF4 weight is quantized from its full tensor as
    it is loaded (same block sizes), and frozen stages are copied as they are."""
    raw_names = {}
    outside = {}
    for name, p in model.named_parameters():
        if _outside_fsdp(name, p):
            raw_names[_state_dict_name(name)] = name
            outside[_state_dict_name(name)] = p
    if not outside:
        return training.load_from_full_model_state_dict(model, full_sd, device, strict=strict, cpu_offload=cpu_offload)
    missing = []
    for name, param in outside.items():
        if name not in full_sd:
            missing.append(name)
            continue
        value = full_sd[name].to(device=device, dtype=param.dtype)
        if is_nf4(param):
            value = to_nf4(value, param.block_size, param.scaler_block_size)
        else:
            value = value.clone()
        owner, attr = _owner(model, raw_names[name])
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    rest = {k: v for k, v in full_sd.items() if k not in outside}
    result = training.load_from_full_model_state_dict(model, rest, device, strict=False, cpu_offload=cpu_offload)
    missing += [k for k in result.missing_keys if _state_dict_name(k) not in outside]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return _IncompatibleKeys(missing, unexpected)


def resume_state_dict(saved: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The state a quantized run resumes from: APEX parameters, frozen stages and
    embeddings from ``saved``, the frozen base weights from the ``base`` checkpoint.

    A QAPEX run never changes its base weights (fusion is deferred), and saved
    states hold them dequantized; quantizing those again would not give back the
    same NF4 codes, while quantizing the base checkpoint again does, bit for bit.
    """
    return {**saved, **{k: base[k] for k in saved if param_kind(k) == "base" and k in base}}
