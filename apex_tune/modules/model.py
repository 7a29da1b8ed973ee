"""Apply APEX to a torchtune ``TransformerDecoder``, fuse it back, and report its size.

Works on decoders whose layers hold a ``MultiHeadAttention`` (``attn``) and a
SwiGLU ``FeedForward`` (``mlp`` with w1, w2, w3): torchtune's Llama 2,
Llama 3/3.1/3.2 and Qwen2/2.5 builders. Under GQA a head unit is a KV group:
one V head and the ``num_heads // num_kv_heads`` output_proj column slices
that read it.
"""

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import FeedForward, MultiHeadAttention, TiedLinear
from torchtune.modules.tied_linear import Linear as TiedLinearFunction
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from apex_tune.modules.effective_rank import effective_rank
from apex_tune.modules.expansion import APEX_PARAM_DTYPE, ApexColumnLinear, ApexExpansion, ApexRowLinear, _ApexLinear
from apex_tune.modules.selection import LayerSelection, UnitSelection
from apex_tune.modules.config import ApexSettings

HEADS, CHANNELS = "heads", "channels"
EMBEDDING_PARAMS = ("tok_embeddings.weight", "output.weight")


@dataclass
class ApexLayer:
    """The attention and FFN of one decoder layer, with their unit geometry."""

    index: int
    attn: MultiHeadAttention
    mlp: FeedForward

    @property
    def num_head_units(self) -> int:
        return self.attn.num_kv_heads

    @property
    def heads_per_unit(self) -> int:
        return self.attn.num_heads // self.attn.num_kv_heads

    @property
    def num_channel_units(self) -> int:
        return self.mlp.w1.out_features

    def num_units(self, kind: str) -> int:
        return self.num_head_units if kind == HEADS else self.num_channel_units

    def expansion(self, kind: str) -> Optional[ApexExpansion]:
        """The kind's shared expansion; None where it is not expanded (or not wrapped)."""
        owner = self.attn if kind == HEADS else self.mlp
        return getattr(owner, "apex_expansion", None)

    @property
    def expanded_kinds(self) -> List[str]:
        return [kind for kind in (HEADS, CHANNELS) if self.expansion(kind) is not None]

    def history(self, kind: str) -> Optional[nn.Module]:
        """The frozen earlier stages of a quantized base (None without ``quantize_base``)."""
        owner = self.attn if kind == HEADS else self.mlp
        return getattr(owner, "apex_history", None)


def find_apex_layers(model: nn.Module) -> List[ApexLayer]:
    """The decoder layers APEX can expand; a clear error if there are none or one is malformed."""
    layers = getattr(model, "layers", None)
    found = []
    for i, layer in enumerate(layers or []):
        attn, mlp = getattr(layer, "attn", None), getattr(layer, "mlp", None)
        if not isinstance(attn, MultiHeadAttention) or not isinstance(mlp, FeedForward):
            continue
        if mlp.w3 is None:
            raise ValueError(f"layer {i}: APEX needs a gated (SwiGLU) FeedForward with w3")
        if attn.num_heads % attn.num_kv_heads != 0:
            raise ValueError(
                f"layer {i}: num_heads={attn.num_heads} is not a multiple of "
                f"num_kv_heads={attn.num_kv_heads}"
            )
        for name, features in (
            ("v_proj", attn.v_proj.out_features),
            ("k_proj", attn.k_proj.out_features),
        ):
            if features != attn.num_kv_heads * attn.head_dim:
                raise ValueError(
                    f"layer {i}: attn.{name} has {features} outputs, expected "
                    f"num_kv_heads * head_dim = {attn.num_kv_heads} * {attn.head_dim}"
                )
        if attn.output_proj.in_features != attn.num_heads * attn.head_dim:
            raise ValueError(
                f"layer {i}: attn.output_proj has {attn.output_proj.in_features} inputs, "
                f"expected num_heads * head_dim = {attn.num_heads} * {attn.head_dim}"
            )
        found.append(ApexLayer(i, attn, mlp))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no layers APEX supports: it needs "
            "model.layers[i].attn (torchtune MultiHeadAttention) and "
            "model.layers[i].mlp (torchtune FeedForward with w1, w2, w3), as built by "
            "torchtune's Llama 2, Llama 3.x and Qwen2.5 builders"
        )
    return found


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
        attn, mlp = layer.attn, layer.mlp
        hd, group = attn.head_dim, layer.heads_per_unit
        device = attn.v_proj.weight.device  # APEX parameters are fp32 whatever the base dtype

        if HEADS in settings.kinds:
            k_heads = settings.expanded_units(layer.num_head_units, HEADS)
            e_heads = settings.extra_units(layer.num_head_units, HEADS)
            heads = ApexExpansion(k_heads, e_heads, hd, device=device)
            tuned_heads = 2 * k_heads + e_heads
            attn.apex_expansion = heads
            if settings.delta:
                attn.q_proj = ApexColumnLinear(_linear(attn.q_proj), tuned_heads, group * hd, delta=True)
                attn.k_proj = ApexColumnLinear(_linear(attn.k_proj), tuned_heads, hd, delta=True)
            attn.v_proj = ApexColumnLinear(_linear(attn.v_proj), tuned_heads, hd, heads, settings.delta)
            attn.output_proj = ApexRowLinear(
                _linear(attn.output_proj), tuned_heads, group, hd, heads, settings.delta
            )

        if CHANNELS in settings.kinds:
            k_ch = settings.expanded_units(layer.num_channel_units, CHANNELS)
            e_ch = settings.extra_units(layer.num_channel_units, CHANNELS)
            channels = ApexExpansion(k_ch, e_ch, 1, device=device)
            tuned_ch = 2 * k_ch + e_ch
            mlp.apex_expansion = channels
            mlp.w1 = ApexColumnLinear(_linear(mlp.w1), tuned_ch, 1, channels, settings.delta)
            mlp.w3 = ApexColumnLinear(_linear(mlp.w3), tuned_ch, 1, channels, settings.delta)
            mlp.w2 = ApexRowLinear(_linear(mlp.w2), tuned_ch, 1, 1, channels, settings.delta)
    if settings.quantize_base:
        from apex_tune.modules.nf4 import quantize_apex_base_

        quantize_apex_base_(model)
    if selection is not None:
        set_selection(model, selection)
    return model


def _named_wrappers(layer: ApexLayer, kind: str) -> Iterator[Tuple[str, _ApexLinear]]:
    names = ("q_proj", "k_proj", "v_proj", "output_proj") if kind == HEADS else ("w1", "w3", "w2")
    owner = layer.attn if kind == HEADS else layer.mlp
    for name in names:
        module = getattr(owner, name)
        if isinstance(module, _ApexLinear):
            yield name, module


def _wrappers(layer: ApexLayer, kind: str) -> Iterator[_ApexLinear]:
    return (module for _, module in _named_wrappers(layer, kind))


def _wrapped_layers(model: nn.Module) -> List[ApexLayer]:
    layers = [layer for layer in find_apex_layers(model) if layer.expanded_kinds]
    if not layers:
        raise ValueError("the model is not wrapped with APEX: call apply_apex first")
    return layers


def get_selection(model: nn.Module) -> List[LayerSelection]:
    """The P/N/E sets the wrapped model currently uses (empty for a kind not expanded)."""
    selections = []
    for layer in _wrapped_layers(model):
        per_kind = {kind: UnitSelection.empty() for kind in (HEADS, CHANNELS)}
        for kind in layer.expanded_kinds:
            expansion = layer.expansion(kind)
            per_kind[kind] = UnitSelection.from_ordered(expansion.units.cpu(), expansion.num_expanded)
        selections.append(LayerSelection(**per_kind))
    return selections


def set_selection(model: nn.Module, selection: Sequence[LayerSelection]) -> None:
    """Point every wrapper at new P/N/E sets (same sizes: shapes never change)."""
    layers = _wrapped_layers(model)
    if len(selection) != len(layers):
        raise ValueError(f"selection covers {len(selection)} layers, the model has {len(layers)}")
    for layer, layer_sel in zip(layers, selection):
        for kind in (HEADS, CHANNELS):
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
            for wrapper in _wrappers(layer, kind):
                wrapper.set_units(units)


def placeholder_selection(model: nn.Module) -> List[LayerSelection]:
    """Units 0, 1, 2, ... as [N, P, E]: the selection a freshly wrapped model starts with."""
    selections = []
    for layer in _wrapped_layers(model):
        per_kind = {kind: UnitSelection.empty() for kind in (HEADS, CHANNELS)}
        for kind in layer.expanded_kinds:
            expansion = layer.expansion(kind)
            units = torch.arange(len(expansion.units))
            per_kind[kind] = UnitSelection.from_ordered(units, expansion.num_expanded)
        selections.append(LayerSelection(**per_kind))
    return selections


def random_selection(model: nn.Module, generator: torch.Generator) -> List[LayerSelection]:
    """Uniformly random P/N/E of the wrapped sizes (the ablation of activation ranking)."""
    selections = []
    for layer in _wrapped_layers(model):
        per_kind = {kind: UnitSelection.empty() for kind in (HEADS, CHANNELS)}
        for kind in layer.expanded_kinds:
            expansion = layer.expansion(kind)
            units = torch.randperm(layer.num_units(kind), generator=generator)[: len(expansion.units)]
            per_kind[kind] = UnitSelection.from_ordered(units, expansion.num_expanded)
        selections.append(LayerSelection(**per_kind))
    return selections


def materialize_apex_buffers_(model: nn.Module, device: torch.device) -> None:
    """Allocate on ``device`` the index buffers of a wrapped model built on the meta
    device (their values are set by :func:`set_selection`)."""
    for module in model.modules():
        if isinstance(module, (ApexExpansion, _ApexLinear)):
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.is_meta:
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
    for layer in _wrapped_layers(model):
        for kind_id, kind in enumerate((HEADS, CHANNELS)):
            if layer.expansion(kind) is None:
                continue
            generator = torch.Generator().manual_seed(seed * 1_000_003 + layer.index * 2 + kind_id)
            layer.expansion(kind).reset_parameters(generator)
            for wrapper in _wrappers(layer, kind):
                wrapper.reset_parameters()


@torch.no_grad()
def merge_apex_(model: nn.Module, seed: int = 0, effective_ranks: bool = False) -> Optional[List[Dict[str, float]]]:
    """Stage boundary: fold W' (with delta) into the base weights, then reset the operators.

    The model keeps its wrappers and computes the same function before and after.
    Over a quantized base the fold is deferred instead: the stage's operators
    are frozen into the layer's ``apex_history`` (see :mod:`apex_tune.modules.nf4`).

    With ``effective_ranks``, returns per layer {projection name: effective rank of
    its change over the stage, W' - W} (see :mod:`apex_tune.modules.effective_rank`);
    layers over a quantized base report nothing (their fold is deferred).
    """
    ranks = []
    for layer in _wrapped_layers(model):
        layer_ranks = {}
        for kind in layer.expanded_kinds:
            history = layer.history(kind)
            if history is not None:
                history.freeze_(layer.expansion(kind), list(_wrappers(layer, kind)))
                continue
            for name, wrapper in _named_wrappers(layer, kind):
                change = wrapper.merge_()
                if effective_ranks:
                    layer_ranks[name] = effective_rank(change)
        ranks.append(layer_ranks)
    reset_apex_parameters(model, seed)
    return ranks if effective_ranks else None


@torch.no_grad()
def fuse_apex(model: nn.Module) -> nn.Module:
    """Fold the operators into the weights and remove every wrapper, in place.

    The result is the plain base architecture: its state dict has exactly the
    base model's keys and shapes, and trained fp32 embeddings go back to the
    base dtype. A quantized base is folded with its frozen
    stages and dequantized: the result holds no NF4 weights.
    """
    for layer in _wrapped_layers(model):
        for kind in (HEADS, CHANNELS):
            for wrapper in _wrappers(layer, kind):
                wrapper.fuse_()
        for owner, names in ((layer.attn, ("q_proj", "k_proj", "v_proj", "output_proj")), (layer.mlp, ("w1", "w3", "w2"))):
            for name in names:
                module = getattr(owner, name)
                if isinstance(module, _ApexLinear):
                    setattr(owner, name, _plain_linear(module))
                elif hasattr(module.weight, "get_original_weight"):  # an NF4 weight APEX did not wrap
                    module.weight = nn.Parameter(
                        module.weight.get_original_weight(), requires_grad=module.weight.requires_grad
                    )
            if hasattr(owner, "apex_expansion"):
                del owner.apex_expansion
            if hasattr(owner, "apex_history"):
                del owner.apex_history
    _restore_embedding_dtypes_(model)
    return model


def _plain_linear(wrapper: _ApexLinear) -> nn.Linear:
    linear = nn.Linear(wrapper.in_features, wrapper.out_features, bias=wrapper.bias is not None, device="meta")
    linear.weight = wrapper.weight
    if wrapper.bias is not None:
        linear.bias = wrapper.bias
    return linear


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
    fp32 from here on, like the other APEX parameters, and cast to the base dtype
    where they are used (:func:`_train_embeddings_in_fp32_`). Call it before
    loading weights or sharding (on the meta device, as the recipe does).
    """
    if settings.train_embeddings:
        _train_embeddings_in_fp32_(model)
    set_trainable_params(model, apex_trainable_params(model, settings))


class _Fp32Embedding(nn.Embedding):
    """An embedding stored in fp32 whose output is in the model's compute dtype."""

    compute_dtype: torch.dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens).to(self.compute_dtype)


class _Fp32Linear(nn.Linear):
    """An output head stored in fp32, applied in its input's dtype."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class _CastingTiedLinearFunction(TiedLinearFunction):
    """torchtune's tied output projection, reading the (fp32) embedding in its input's dtype."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight.to(x.dtype))


def _upcast_parameter_(module: nn.Module, name: str) -> None:
    param = getattr(module, name)
    if param is not None and param.dtype != APEX_PARAM_DTYPE:
        module.register_parameter(
            name, nn.Parameter(param.detach().to(APEX_PARAM_DTYPE), requires_grad=param.requires_grad)
        )


@torch.no_grad()
def _train_embeddings_in_fp32_(model: nn.Module) -> None:
    """Store ``tok_embeddings`` and ``output`` in fp32, computing in the base dtype, in place."""
    embedding, output = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    if isinstance(embedding, nn.Embedding) and not isinstance(embedding, _Fp32Embedding):
        dtype = embedding.weight.dtype
        _upcast_parameter_(embedding, "weight")
        embedding.__class__ = _Fp32Embedding
        embedding.compute_dtype = dtype
    if isinstance(output, nn.Linear) and not isinstance(output, _Fp32Linear):
        dtype = output.weight.dtype
        _upcast_parameter_(output, "weight")
        _upcast_parameter_(output, "bias")
        output.__class__ = _Fp32Linear
        output.compute_dtype = dtype
    elif isinstance(output, TiedLinear):  # reads tok_embeddings.weight, now fp32
        output.linear.__class__ = _CastingTiedLinearFunction


@torch.no_grad()
def _restore_embedding_dtypes_(model: nn.Module) -> None:
    """Undo :func:`_train_embeddings_in_fp32_`: plain modules holding the compute dtype."""
    for name, plain in (("tok_embeddings", nn.Embedding), ("output", nn.Linear)):
        module = getattr(model, name, None)
        if isinstance(module, (_Fp32Embedding, _Fp32Linear)):
            for param_name in ("weight", "bias"):
                param = getattr(module, param_name, None)
                if param is not None:
                    module.register_parameter(
                        param_name,
                        nn.Parameter(param.detach().to(module.compute_dtype), requires_grad=param.requires_grad),
                    )
            module.__class__ = plain
    output = getattr(model, "output", None)
    if isinstance(output, TiedLinear) and isinstance(output.linear, _CastingTiedLinearFunction):
        output.linear.__class__ = TiedLinearFunction


def param_kind(name: str) -> str:
    """Report bucket of a parameter name."""
    if ".apex_history." in name:  # frozen operators of earlier stages (quantized base)
        return "history"
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("L1", "L2"):
        return "operators"
    if leaf in ("a", "b"):
        return "vectors"
    if leaf == "delta":
        return "deltas"
    if name in EMBEDDING_PARAMS:
        return "embeddings"
    return "base"


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
