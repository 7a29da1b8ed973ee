"""QAPEX: APEX over a base kept in 4-bit NF4 (torchao), with deferred fusion.

APEX never trains the base weights, so like QLoRA it can keep them in NF4
(``apex.quantize_base: true``). When :func:`~apex_tune.modules.model.apply_apex`
wraps the model, :func:`quantize_projections_` stores the weight of every layer's
seven projections (q, k, v, output_proj, w1, w3, w2) as a torchao ``NF4Tensor``, as
torchtune's QLoRA builders do, and the wrappers are built over it, knowing where
finished stages go (below); ``F.linear`` on an NF4 weight dequantizes on the fly
(torchao's ``linear_nf4``), saving only the 4-bit weight for backward.

The wrappers are the same classes as over a plain base: they only read the
weight through ``F.linear`` (column wrappers mix the tuned outputs, row
wrappers the tuned inputs; see :mod:`apex_tune.modules.expansion`), which an NF4
tensor supports, and apply the frozen stages with the same mixing code.

Fusion: deferred, never re-quantized
------------------------------------
Folding a stage into an NF4 weight means dequantize, fold, quantize again, and
every re-quantization adds error, also to the rows and columns APEX never
touched (NF4 is not idempotent: double-quantized scalers shift). Over T stages
that piles up. Keeping the changed rows/columns in high precision instead
costs ~16 bits per changed weight, and APEX changes K units per stage in five
of seven projections (about 19-38% of those weights per stage): more than the
4-bit base itself after one stage.

So a stage boundary (:func:`~apex_tune.modules.model.fold_apex_`) never rewrites
the NF4 base; the finished stages are kept in high precision, in the cheaper of
two forms:

- without the delta, as frozen operators: M's factors, ``a``, the unit ids and
  each wrapper's ``b`` are copied into the layer's ``apex_history`` (an
  :class:`ApexHistory`), about 0.1% of the parameters per stage; the wrappers
  apply the frozen stages in order, then the live one (a gather, a Monarch on
  the tokens and a scatter per stage).
- with the delta, as one merged correction per wrapper
  (:class:`~apex_tune.modules.expansion.MergedStages`, ``<wrapper>.apex_history``):
  W_T - W_0 on the rows/columns any stage changed, in fp32. A stage's delta
  already costs that much per stage; merged, T stages cost at most the union of
  their tuned slices (at most one fp32 weight) and one slice matmul, instead of
  T deltas and T matmuls, gathers and Monarchs.

Either way the live operators start again from M = 0. The plain
model is folded once, in fp32, from the dequantized base
(:func:`~apex_tune.modules.model.unwrap_apex`, used by the recipe's checkpoints): the
fused model equals the wrapped one up to fp32 rounding after every stage, so
the error after T stages is no larger than after one. Checkpoints are written
in the run dtype (bf16 or fp32), like torchtune's QLoRA.

Distributed
-----------
FSDP2 cannot shard NF4 weights with torch 2.13 and torchao 0.15: its
world-size-1 fast path all-gathers only the first of the NF4 tensor's three
inner tensors, and the multi-rank path fails on the same unpacking
(torchtune's own QLoRA sharding fails the same way here). :func:`shard_model`
therefore leaves the NF4 weights (and the finished stages) out of FSDP
(``ignored_params``): every rank keeps the whole 4-bit base, as in a
single-device QLoRA run, and FSDP shards what trains.
:func:`load_from_full_model_state_dict` quantizes those weights as it loads
them, one tensor at a time, so the full-precision model is never resident.
"""

from typing import Dict

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.modules.module import _IncompatibleKeys
from torchao.dtypes.nf4tensor import to_nf4
from torchtune import training

from apex_tune.modules._dtensor import full_value, is_nf4
from apex_tune.modules.expansion import ApexExpansion, MergedStages, Operators, _ApexLinear, unit_positions
from apex_tune.modules.geometry import HISTORY, KINDS, PROJECTIONS, ApexLayer, param_kind, wrapped_layers

NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256


# --------------------------------------------------------------- frozen stages
class _FrozenParts(nn.Module):
    """One wrapper's own frozen operators of a stage: ``b`` (v, w1, w3; stages are frozen
    this way only without the delta), and the stage's tuned positions in that wrapper
    (derived from the stage's units, kept so that no forward derives them again)."""

    def __init__(self, wrapper: _ApexLinear, device: torch.device, values: bool):
        super().__init__()
        for name in ("b",):
            live = getattr(wrapper, name, None)
            self.register_parameter(name, None if live is None else _frozen_like(live, device, values))
        self.group, self.width = wrapper.group, wrapper.width
        self.register_buffer("positions", wrapper.positions.new_empty(wrapper.positions.shape, device=device),
                             persistent=False)


class ApexFrozenStage(nn.Module):
    """A finished stage of one expansion pair: M's factors, ``a``, the unit ids
    ``[N, P, E]`` and each wrapper's ``b``, all frozen, in the live dtype."""

    def __init__(
        self, expansion: ApexExpansion, wrappers: Dict[str, _ApexLinear], device: torch.device, values: bool
    ):
        super().__init__()
        self.n = expansion.n
        self.L1 = _frozen_like(expansion.monarch.L1, device, values)
        self.L2 = _frozen_like(expansion.monarch.L2, device, values)
        self.a = _frozen_like(expansion.a, device, values)
        self.units = _frozen_like(expansion.units, device, values)
        self.parts = nn.ModuleDict({name: _FrozenParts(w, device, values) for name, w in wrappers.items()})
        self.derive_positions_()
        # Every way the units get values (freeze_, a state dict, the FSDP loader below)
        # derives the positions again; module.load_state_dict calls this after loading.
        self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module.derive_positions_())

    @torch.no_grad()
    def derive_positions_(self) -> None:
        """Each wrapper's tuned positions from the stage's units (after they change), on the
        units' device (a state loaded with ``assign=True`` into a meta-built model moves them)."""
        for part in self.parts.values():
            part.positions = unit_positions(self.units, part.group, part.width)

    def operators(self) -> Operators:
        return Operators(self.n, self.a, self.L1, self.L2)


def _frozen_like(live: torch.Tensor, device: torch.device, values: bool) -> nn.Parameter:
    if values:
        data = full_value(live).clone().to(device)
    else:
        data = torch.empty(live.shape, dtype=live.dtype, device=device)
    return nn.Parameter(data, requires_grad=False)


class ApexHistory(nn.ModuleList):
    """The frozen stages of one attention or FFN, oldest first (``owner.apex_history``)."""

    @torch.no_grad()
    def freeze_(self, expansion: ApexExpansion, wrappers: Dict[str, _ApexLinear]) -> None:
        """Stage boundary: keep the live operators (whole, even if sharded) as a new frozen stage."""
        self.append(ApexFrozenStage(expansion, wrappers, expansion.a.device, values=True))

    def grow_(self, count: int, expansion: ApexExpansion, wrappers: Dict[str, _ApexLinear]) -> None:
        """Add empty stages (values to be loaded) until there are ``count``."""
        while len(self) < count:
            self.append(ApexFrozenStage(expansion, wrappers, expansion.a.device, values=False))


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
def quantize_projections_(layer: ApexLayer) -> None:
    """Store the weight of the layer's seven projections as NF4, frozen, in place (meta
    device included), before :func:`~apex_tune.modules.model.apply_apex` wraps them.
    The projections APEX does not wrap (q, k without the delta) stay frozen NF4
    linears, like torchtune's ``FrozenNF4Linear``."""
    for kind in KINDS:
        owner_name, names = PROJECTIONS[kind]
        for name in names:
            module = getattr(layer.owner(kind), name)
            if is_nf4(module.weight):
                raise ValueError(f"layer {layer.index} is already quantized")
            _check_quantizable(module.weight, f"layers.{layer.index}.{owner_name}.{name}")
            weight = to_nf4(module.weight.detach(), NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)
            module.weight = nn.Parameter(weight, requires_grad=False)


def _state_dict_name(name: str) -> str:
    """A parameter/module name as state dicts spell it (without activation-checkpoint
    or compile wrapper prefixes)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (ApexHistory, MergedStages)) for m in model.modules())


def ensure_history_(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Give a quantized wrapped model the frozen stages and merged corrections of the
    sizes ``state_dict`` holds, so that it loads (resume; rebuilding a saved wrapped
    model). A no-op otherwise."""
    names = {id(m): _state_dict_name(name) for name, m in model.named_modules()}
    for layer in wrapped_layers(model):
        for kind in KINDS:
            history = layer.history(kind)
            if history is not None:
                prefix = f"{names[id(history)]}."
                stages = {int(k[len(prefix):].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
                if stages and stages != set(range(max(stages) + 1)):
                    raise ValueError(f"{prefix}: the state has stages {sorted(stages)}, not 0..{max(stages)}")
                history.grow_(len(stages), layer.expansion(kind), dict(layer.named_wrappers(kind)))
            for wrapper in layer.wrappers(kind):
                key = f"{names[id(wrapper)]}.apex_history.positions"
                if wrapper.apex_history is not None and key in state_dict:
                    wrapper.apex_history.resize_(len(state_dict[key]), wrapper)


def grow_history_(model: nn.Module, stages: int) -> None:
    """The most finished-stage state a quantized model holds after ``stages`` stages (meta
    device; for memory plans): that many frozen stages, or merged corrections over
    ``stages`` tuned slices (at most the whole weight)."""
    for layer in wrapped_layers(model):
        for kind in KINDS:
            history = layer.history(kind)
            if history is not None:
                history.grow_(stages, layer.expansion(kind), dict(layer.named_wrappers(kind)))
            for wrapper in layer.wrappers(kind):
                if wrapper.apex_history is not None:
                    size = wrapper.weight.shape[wrapper.dim]
                    wrapper.apex_history.resize_(min(stages * len(wrapper.positions), size), wrapper)


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
        *path, attr = raw_names[name].split(".")
        owner = model.get_submodule(".".join(path))
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    for stage in model.modules():
        if isinstance(stage, ApexFrozenStage):
            stage.derive_positions_()
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
