"""Apply APEX to a torchtune ``TransformerDecoder``, fold it at stage boundaries, remove
it (the plain model), and report its size. Which layers and projections it wraps:
:mod:`apex_tune.modules.geometry`.
"""

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchtune.modules import TiedLinear
from torchtune.modules.tied_linear import Linear as TiedLinearFunction
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from apex_tune.modules._dtensor import collective_device
from apex_tune.modules.effective_rank import effective_rank
from apex_tune.modules.expansion import APEX_PARAM_DTYPE, ApexColumnLinear, ApexExpansion, ApexRowLinear, _ApexLinear
from apex_tune.modules.geometry import (  # noqa: F401  (HEADS, CHANNELS, ApexLayer: part of this module's API)
    CHANNELS,
    EMBEDDING_PARAMS,
    HEADS,
    KINDS,
    PROJECTIONS,
    ApexLayer,
    find_apex_layers,
    param_kind,
    wrapped_layers,
)
from apex_tune.modules.layout import SLOTS, add_channel_layout, relayout_, restore_base_layout_, target_order
from apex_tune.modules.nf4 import ApexHistory, quantize_projections_
from apex_tune.modules.selection import LayerSelection, UnitSelection
from apex_tune.modules.config import ApexSettings


def _linear(module: nn.Module) -> nn.Module:
    if not isinstance(module, (nn.Linear, _ApexLinear)):
        raise ValueError(
            f"APEX wraps plain nn.Linear projections, found {type(module).__name__}"
        )
    return module


def apply_apex(
    model: nn.Module,
    settings: ApexSettings,
    selection: Optional[Sequence[LayerSelection]] = None,
) -> nn.Module:
    """Wrap every supported layer's projections with APEX expansion wrappers, in place.

    With ``selection=None`` the units are placeholders (the wrapped model still
    computes the base model exactly, since M = 0); assess, then call
    :func:`set_selection`. Works on the meta device. A kind whose ratio is 0
    (``settings.kinds``) is left unwrapped.
    """
    layers = find_apex_layers(model)
    for layer in layers:
        if layer.expanded_kinds:
            raise ValueError(f"layer {layer.index} is already wrapped with APEX")
        if settings.quantize_base:
            quantize_projections_(layer)
        hd, group = layer.attn.head_dim, layer.heads_per_unit
        device = layer.attn.v_proj.weight.device  # APEX parameters are fp32 whatever the base dtype
        for kind in settings.kinds:
            owner = layer.owner(kind)
            expanded = settings.expanded_units(layer.num_units(kind), kind)
            tuned = 2 * expanded + settings.extra_units(layer.num_units(kind), kind)
            width = hd if kind == HEADS else 1
            expansion = owner.apex_expansion = ApexExpansion(expanded, tuned - 2 * expanded, width, device=device)
            if kind == CHANNELS:  # an NF4 base, never rewritten, keeps the base layout
                add_channel_layout(expansion, layer.num_units(kind), settings.contiguous_channels and not settings.quantize_base)
            # Over an NF4 base, never rewritten, the wrappers also apply the finished stages:
            # with the delta each as one merged correction, without it the owner's frozen
            # operator stages (see apex_tune.modules.nf4).
            merged = settings.quantize_base and settings.delta
            history = ApexHistory() if settings.quantize_base and not merged else None
            if history is not None:
                owner.apex_history = history

            def wrap(name, cls, *args, mixes=True):
                frozen = (history, name) if history is not None else None
                base = _linear(getattr(owner, name))
                wrapper = cls(base, tuned, *args, expansion if mixes else None, settings.delta, frozen, merged)
                setattr(owner, name, wrapper)

            if kind == HEADS:
                if settings.delta:  # q and k: the delta only, on the heads' rows
                    wrap("q_proj", ApexColumnLinear, group * hd, mixes=False)
                    wrap("k_proj", ApexColumnLinear, hd, mixes=False)
                wrap("v_proj", ApexColumnLinear, hd)
                wrap("output_proj", ApexRowLinear, group, hd)
            else:
                wrap("w1", ApexColumnLinear, 1)
                wrap("w3", ApexColumnLinear, 1)
                wrap("w2", ApexRowLinear, 1, 1)
    if selection is not None:
        set_selection(model, selection)
    return model


def get_selection(model: nn.Module) -> List[LayerSelection]:
    """The P/N/E sets the wrapped model currently uses (empty for a kind not expanded)."""
    selections = []
    for layer in wrapped_layers(model):
        per_kind = {kind: UnitSelection.empty() for kind in KINDS}
        for kind in layer.expanded_kinds:
            expansion = layer.expansion(kind)
            per_kind[kind] = UnitSelection.from_ordered(expansion.units.cpu(), expansion.num_expanded)
        selections.append(LayerSelection(**per_kind))
    return selections


def set_selection(model: nn.Module, selection: Sequence[LayerSelection]) -> None:
    """Point every wrapper at new P/N/E sets (same sizes: shapes never change).

    With ``contiguous_channels`` each layer's FFN channels are moved so that the
    selected ones come first, in [N, P, E] order (see :mod:`apex_tune.modules.layout`):
    the channel wrappers then get the physical positions ``0 .. T-1``. The selection
    itself (``get_selection``, the expansion's ``units``) stays in base unit ids.
    """
    layers = wrapped_layers(model)
    if len(selection) != len(layers):
        raise ValueError(f"selection covers {len(selection)} layers, the model has {len(layers)}")
    for layer, layer_sel in zip(layers, selection):
        for kind in KINDS:
            units_sel: UnitSelection = getattr(layer_sel, kind)
            units = units_sel.ordered()
            expansion = layer.expansion(kind)
            if expansion is None:
                if len(units):
                    raise ValueError(
                        f"layer {layer.index} {kind}: the selection has {len(units)} units but "
                        f"{kind} expansion is off"
                    )
                continue
            if len(units) != len(expansion.units) or len(units_sel.disadvantageous) != expansion.num_expanded:
                raise ValueError(
                    f"layer {layer.index} {kind}: selection sizes (P {len(units_sel.advantageous)}, "
                    f"N {len(units_sel.disadvantageous)}, E {len(units_sel.extra)}) do not match "
                    f"the wrapped sizes (K {expansion.num_expanded}, E {expansion.num_extra})"
                )
            if len(set(units.tolist())) != len(units) or min(units.tolist()) < 0 or max(units.tolist()) >= layer.num_units(kind):
                raise ValueError(f"layer {layer.index} {kind}: P, N, E must be disjoint unit ids")
            expansion.units.copy_(units.to(expansion.units.device))
            if kind == CHANNELS:
                relayout_(layer, target_order(expansion, units))  # points the wrappers too
            else:
                for wrapper in layer.wrappers(kind):
                    wrapper.set_units(units)


def placeholder_selection(model: nn.Module) -> List[LayerSelection]:
    """Units 0, 1, 2, ... as [N, P, E]: the selection a freshly wrapped model starts with."""
    selections = []
    for layer in wrapped_layers(model):
        per_kind = {kind: UnitSelection.empty() for kind in KINDS}
        for kind in layer.expanded_kinds:
            expansion = layer.expansion(kind)
            units = torch.arange(len(expansion.units))
            per_kind[kind] = UnitSelection.from_ordered(units, expansion.num_expanded)
        selections.append(LayerSelection(**per_kind))
    return selections


def random_selection(model: nn.Module, generator: torch.Generator) -> List[LayerSelection]:
    """Uniformly random P/N/E of the wrapped sizes (the ablation of activation ranking)."""
    selections = []
    for layer in wrapped_layers(model):
        per_kind = {kind: UnitSelection.empty() for kind in KINDS}
        for kind in layer.expanded_kinds:
            expansion = layer.expansion(kind)
            units = torch.randperm(layer.num_units(kind), generator=generator)[: len(expansion.units)]
            per_kind[kind] = UnitSelection.from_ordered(units, expansion.num_expanded)
        selections.append(LayerSelection(**per_kind))
    return selections


def materialize_apex_buffers_(model: nn.Module, device: torch.device) -> None:
    """Allocate on ``device`` the index buffers of a wrapped model built on the meta
    device (their values are set by :func:`set_selection`; the FFN channel layout
    starts as the base layout)."""
    for module in model.modules():
        if isinstance(module, (ApexExpansion, _ApexLinear)):
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.is_meta:
                    if name == SLOTS:
                        module._buffers[name] = torch.arange(buf.shape[0], dtype=buf.dtype, device=device)
                    else:
                        module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)


def init_apex_(model: nn.Module, device: torch.device, seed: int = 0) -> None:
    """Give a wrapped model built on the meta device its APEX buffers on ``device``
    and fresh operators. Call after the base weights (and APEX parameters, any
    values) are loaded, e.g. by torchtune's ``load_from_full_model_state_dict``."""
    materialize_apex_buffers_(model, device)
    set_selection(model, placeholder_selection(model))
    reset_apex_parameters(model, seed)


def reset_apex_parameters(model: nn.Module, seed: int = 0) -> None:
    """Fresh operators everywhere (M = 0, a = b = 1, delta = 0), reproducibly from ``seed``."""
    for layer in wrapped_layers(model):
        for kind_id, kind in enumerate(KINDS):
            if layer.expansion(kind) is None:
                continue
            generator = torch.Generator().manual_seed(seed * 1_000_003 + layer.index * 2 + kind_id)
            layer.expansion(kind).reset_parameters(generator)
            for wrapper in layer.wrappers(kind):
                wrapper.reset_parameters()


@contextmanager
def bypass_unchanged_wrappers(model: nn.Module) -> Iterator[int]:
    """Within it, every APEX wrapper that computes exactly its base linear
    (:meth:`~apex_tune.modules.expansion._ApexLinear.computes_base`) runs as that linear
    alone; yields how many do. For forwards that only read activations, such as the
    assessment before stage 1 (every wrapper as apply_apex made it): the same function
    without the operators' and the delta's work (with the delta in bf16, a fifth of the bench
    model's assessment batch and a quarter of SmolLM2-135M's: ``python -m bench.assessment_cost``,
    ``python -m bench.real_model_assessment``). A model whose wrappers changed runs
    as before. Under torch.distributed a wrapper is bypassed only if it is unchanged on
    every rank (each reads its own shards), so every rank runs the same computation.
    The check reads every APEX parameter once; within an enclosing bypass, the wrappers
    it bypassed are neither checked again nor restored on exit."""
    wrappers = [m for m in model.modules() if isinstance(m, _ApexLinear) and not m._bypassed]
    unchanged = torch.tensor([w.computes_base() for w in wrappers], dtype=torch.int32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        on_every_rank = unchanged.to(collective_device())
        dist.all_reduce(on_every_rank, op=dist.ReduceOp.MIN)
        unchanged = on_every_rank.cpu()
    bypassed = [w for w, keep in zip(wrappers, unchanged.tolist()) if keep]
    for wrapper in bypassed:
        wrapper._bypassed = True
    try:
        yield len(bypassed)
    finally:
        for wrapper in bypassed:
            del wrapper._bypassed  # back to the class's False


@torch.no_grad()
def fold_apex_(
    model: nn.Module, seed: int = 0, effective_ranks: bool = False, weight_changes: bool = False
) -> Optional[List[Dict[str, Any]]]:
    """Stage boundary: fold W' (with delta) into the base weights, then reset the operators.

    The model keeps its wrappers and computes the same function before and after.
    Over a quantized base the NF4 weights are never rewritten: with the delta each
    wrapper folds the stage into its merged correction, without it the stage's
    operators are frozen into the layer's ``apex_history`` (see :mod:`apex_tune.modules.nf4`).

    With ``effective_ranks``, returns per layer {projection name: effective rank of
    its change over the stage, W' - W} (see :mod:`apex_tune.modules.effective_rank`),
    computed here. With ``weight_changes`` instead, returns per layer {projection name:
    that change, the tuned slice's W'_T - W_T in fp32 on the CPU}, for the caller to
    rank later (off the boundary's critical path); from a CUDA model the copies are
    asynchronous, so the caller synchronizes with the current stream before reading
    them. Layers over a quantized base report nothing (their fold is deferred).
    """
    if effective_ranks and weight_changes:
        raise ValueError("fold_apex_ returns either effective_ranks or weight_changes, not both")
    changes = []
    for layer in wrapped_layers(model):
        layer_changes = {}
        for kind in layer.expanded_kinds:
            history = layer.history(kind)
            if history is not None:
                history.freeze_(layer.expansion(kind), dict(layer.named_wrappers(kind)))
                continue
            for name, wrapper in layer.named_wrappers(kind):
                change = wrapper.fold_()  # a fresh fp32 tensor: nothing else holds or writes it
                if wrapper.apex_history is not None:
                    continue
                if effective_ranks:  # ranked now: the slice is freed before the next one is folded
                    layer_changes[name] = effective_rank(change)
                elif weight_changes:
                    layer_changes[name] = change.detach().to("cpu", non_blocking=change.is_cuda)
        changes.append(layer_changes)
    reset_apex_parameters(model, seed)
    return changes if effective_ranks or weight_changes else None


@torch.no_grad()
def unwrap_apex(model: nn.Module) -> nn.Module:
    """Fold everything into the weights and remove every wrapper, in place: the plain model.

    The result is the plain base architecture: its state dict has exactly the
    base model's keys and shapes, and trained fp32 embeddings go back to the
    base dtype. A quantized base is folded with its frozen
    stages and dequantized: the result holds no NF4 weights. FFN channels go back
    to the base layout first.
    """
    restore_base_layout_(model)
    for layer in wrapped_layers(model):
        for kind in KINDS:
            owner = layer.owner(kind)
            for name in PROJECTIONS[kind][1]:
                module = getattr(owner, name)
                if isinstance(module, _ApexLinear):
                    setattr(owner, name, module.unwrap())
                elif hasattr(module.weight, "get_original_weight"):  # an NF4 weight APEX did not wrap
                    module.weight = nn.Parameter(
                        module.weight.get_original_weight(), requires_grad=module.weight.requires_grad
                    )
            for attr in ("apex_expansion", "apex_history"):
                if hasattr(owner, attr):
                    delattr(owner, attr)
    _restore_embedding_dtypes_(model)
    return model


def apex_trainable_params(model: nn.Module, settings: ApexSettings) -> Dict[str, nn.Parameter]:
    """Name -> parameter of everything APEX trains (operators, vectors, deltas, embeddings)."""
    params = get_adapter_params(model)
    if settings.train_embeddings:
        named = dict(model.named_parameters())
        for name in EMBEDDING_PARAMS:
            if name in named:
                params[name] = named[name]
    return params


def set_apex_trainable(model: nn.Module, settings: ApexSettings) -> None:
    """Freeze the base model; train only what :func:`apex_trainable_params` names.

    With ``train_embeddings`` the token embeddings and output head are stored in
    fp32 from here on (new modules replace them), like the other APEX parameters, and cast to the base dtype
    where they are used (:func:`_train_embeddings_in_fp32_`). Call it before
    loading weights or sharding (on the meta device, as the recipe does).
    """
    if settings.train_embeddings:
        _train_embeddings_in_fp32_(model)
    set_trainable_params(model, apex_trainable_params(model, settings))


def _as_parameter(param: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[nn.Parameter]:
    if param is None:
        return None
    return nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)


class _Fp32Embedding(nn.Embedding):
    """An embedding stored in fp32 whose output is in the model's compute dtype (that of
    the plain embedding it replaces)."""

    def __init__(self, plain: nn.Embedding):
        super().__init__(plain.num_embeddings, plain.embedding_dim, plain.padding_idx, plain.max_norm,
                         plain.norm_type, plain.scale_grad_by_freq, plain.sparse, device="meta")
        self.weight = _as_parameter(plain.weight, APEX_PARAM_DTYPE)
        self.compute_dtype = plain.weight.dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens).to(self.compute_dtype)

    def plain(self) -> nn.Embedding:
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, self.max_norm,
                                 self.norm_type, self.scale_grad_by_freq, self.sparse, device="meta")
        embedding.weight = _as_parameter(self.weight, self.compute_dtype)
        return embedding


class _Fp32Linear(nn.Linear):
    """An output head stored in fp32, applied in its input's dtype."""

    def __init__(self, plain: nn.Linear):
        super().__init__(plain.in_features, plain.out_features, bias=plain.bias is not None, device="meta")
        self.weight, self.bias = _as_parameter(plain.weight, APEX_PARAM_DTYPE), _as_parameter(plain.bias, APEX_PARAM_DTYPE)
        self.compute_dtype = plain.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)

    def plain(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = _as_parameter(self.weight, self.compute_dtype), _as_parameter(self.bias, self.compute_dtype)
        return linear


class _CastingTiedLinearFunction(TiedLinearFunction):
    """torchtune's tied output projection, reading the (fp32) embedding in its input's dtype."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight.to(x.dtype))


@torch.no_grad()
def _train_embeddings_in_fp32_(model: nn.Module) -> None:
    """Replace ``tok_embeddings`` and ``output`` by fp32-stored modules computing in the base dtype."""
    embedding, output = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    if isinstance(embedding, nn.Embedding) and not isinstance(embedding, _Fp32Embedding):
        model.tok_embeddings = _Fp32Embedding(embedding)
    if isinstance(output, nn.Linear) and not isinstance(output, _Fp32Linear):
        model.output = _Fp32Linear(output)
    elif isinstance(output, TiedLinear) and output.tied_module is embedding:  # reads tok_embeddings.weight
        output.tied_module = model.tok_embeddings
        output.linear = _CastingTiedLinearFunction()


@torch.no_grad()
def _restore_embedding_dtypes_(model: nn.Module) -> None:
    """Undo :func:`_train_embeddings_in_fp32_`: plain modules holding the compute dtype."""
    embedding, output = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    if isinstance(embedding, _Fp32Embedding):
        model.tok_embeddings = embedding.plain()
    if isinstance(output, _Fp32Linear):
        model.output = output.plain()
    elif isinstance(output, TiedLinear) and output.tied_module is embedding:
        output.tied_module = model.tok_embeddings
        output.linear = TiedLinearFunction()


def _storage(param: torch.Tensor) -> tuple:
    """(dtype name, bytes) of a parameter: NF4 counts its codes and scalers, a sharded
    parameter its whole size."""
    if type(param).__name__ == "NF4Tensor":
        inner, _ = param.__tensor_flatten__()
        return "nf4", sum(getattr(param, n).numel() * getattr(param, n).element_size() for n in inner)
    return str(param.dtype).replace("torch.", ""), param.numel() * param.element_size()


def trainable_parameter_report(model: nn.Module) -> dict:
    """Counts of all and of trainable parameters, by kind; works on the meta device.

    Kinds: operators (Monarch L1, L2), vectors (a, b), deltas, embeddings
    (token embeddings and output head), history (the frozen operators of earlier
    stages over a quantized base), base (anything else). The base total
    excludes APEX's own parameters, so ``trainable_fraction`` is relative to the
    plain model that fusion gives back.

    Precision: per kind the storage dtypes and bytes; ``memory`` gives the
    bytes of all weights, and of what training adds per trainable parameter
    (its gradient and AdamW's two moments, all in the parameter's dtype), and
    ``fp32_trainable_extra_bytes``, what keeping the trainable parameters in
    fp32 costs over keeping them in the base dtype (weights, gradients, moments).
    """
    by_kind = {
        k: {"total": 0, "trainable": 0, "dtypes": set(), "bytes": 0}
        for k in ("operators", "vectors", "deltas", "embeddings", "history", "base")
    }
    trainable_bytes = trainable_numel = 0
    for name, param in model.named_parameters():  # shared parameters are listed once
        kind = param_kind(name)
        dtype, size = _storage(param)
        by_kind[kind]["total"] += param.numel()
        by_kind[kind]["dtypes"].add(dtype)
        by_kind[kind]["bytes"] += size
        if param.requires_grad:
            by_kind[kind]["trainable"] += param.numel()
            trainable_bytes += size
            trainable_numel += param.numel()
    for counts in by_kind.values():
        counts["dtypes"] = sorted(counts["dtypes"])
    # The base dtype: that of its frozen plain tensors (norm scales; NF4 weights excepted).
    base_itemsize = next(
        (p.element_size() for n, p in model.named_parameters() if param_kind(n) == "base" and _storage(p)[0] != "nf4"),
        torch.finfo(APEX_PARAM_DTYPE).bits // 8,
    )
    base_total = by_kind["base"]["total"] + by_kind["embeddings"]["total"]
    trainable = sum(v["trainable"] for v in by_kind.values())
    per_layer = {}
    layers = [layer for layer in find_apex_layers(model) if layer.expanded_kinds]
    if layers:
        first = layers[0]
        per_layer = {
            f"{kind}_operator_params": sum(p.numel() for p in first.expansion(kind).monarch.parameters())
            for kind in first.expanded_kinds
        }
    return {
        "base_params": base_total,
        "trainable_params": trainable,
        "trainable_fraction": trainable / base_total if base_total else 0.0,
        "by_kind": by_kind,
        "per_layer": per_layer,
        "memory": {
            "weights_bytes": sum(v["bytes"] for v in by_kind.values()),
            "trainable_bytes": trainable_bytes,
            "gradient_and_adamw_bytes": 3 * trainable_bytes,
            "fp32_trainable_extra_bytes": 4 * (trainable_bytes - trainable_numel * base_itemsize),
        },
    }
