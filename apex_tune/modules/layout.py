"""The physical order of each layer's FFN channels (``apex.contiguous_channels``).

A SwiGLU FFN computes ``w2(act(w1 x) * w3 x)`` channel by channel, so permuting its
channels (the rows of w1 and w3 and their biases, and the same columns of w2)
leaves its function unchanged. With the layout on,
:func:`~apex_tune.modules.model.set_selection` moves the selected channels first, in
the order the expansion mixes them ([N, P, E]), followed by the other channels in
ascending order: the wrappers' tuned positions are then the prefix ``0 .. T-1``,
and their gathers and scatters of weights and activations are contiguous slices.

Bookkeeping, on the FFN's :class:`~apex_tune.modules.expansion.ApexExpansion`:

- ``slots``: a non-persistent buffer, base channel id -> physical position
  (identity until a selection moves the channels; the live layout is always the
  one :func:`layout_order` gives for the current selection, so a saved selection
  is enough to know the layout of saved weights);
- ``contiguous``: whether selections move the channels (off: the base layout stays).

A resume state holds the live weights, so it holds the layout too
(:func:`channel_layout_state`, restored by :func:`load_channel_layout_` before the
weights are copied in).

Only the live wrapped model is in the physical layout. The expansion's ``units``,
selections, the ranker's scores, selection logs and every saved plain model are in
base ids and the base layout; the wrappers alone see physical positions (through
``set_units``). Heads keep the base layout.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from apex_tune.modules._dtensor import assign_, full_value, is_meta
from apex_tune.modules.expansion import ApexExpansion, _ApexLinear
from apex_tune.modules.geometry import CHANNELS, PROJECTIONS, ApexLayer, find_apex_layers

# The expansion's buffer mapping base channel ids to physical positions (identity when built).
SLOTS = "slots"


def add_channel_layout(expansion: ApexExpansion, num_channels: int, contiguous: bool) -> None:
    """Give an FFN's expansion its layout bookkeeping: the identity ``slots``, and
    whether selections lay the channels out contiguously."""
    expansion.register_buffer(
        SLOTS, torch.arange(num_channels, device=expansion.units.device), persistent=False
    )
    expansion.contiguous = contiguous


def layout_order(units: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Physical position -> base channel id of the contiguous layout of ``units``
    (ordered [N, P, E]): those first, then the other channels ascending."""
    # Sort keys: i for the i-th unit, num_channels + id for the others (no boolean
    # indexing, whose size is data-dependent: this also runs on the meta device).
    keys = torch.arange(num_channels, device=units.device) + num_channels
    keys[units] = torch.arange(len(units), device=units.device)
    return torch.argsort(keys)


def target_order(expansion: ApexExpansion, units: torch.Tensor) -> torch.Tensor:
    """The layout a selection of ``units`` (base ids, [N, P, E]) puts the channels in."""
    num_channels = len(expansion.slots)
    if expansion.contiguous:
        return layout_order(units.to(expansion.slots.device), num_channels)
    return torch.arange(num_channels, device=expansion.slots.device)


def _slots_of(order: torch.Tensor) -> torch.Tensor:
    """The inverse of ``order``: base channel id -> physical position."""
    return torch.empty_like(order).index_copy_(0, order, torch.arange(len(order), device=order.device))


@torch.no_grad()
def _gather_(param: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    """``param`` <- ``param.index_select(dim, index)``, whole (a DTensor keeps its shard).

    A plain tensor gets new storage instead of being overwritten: the frozen base
    weights of several models may share storage (``load_state_dict(assign=True)``),
    and this permutes only this model's."""
    value = full_value(param)
    permuted = value.index_select(dim, index.to(value.device))
    if isinstance(param, DTensor):
        assign_(param, permuted)
    else:
        param.data = permuted


@torch.no_grad()
def relayout_(layer: ApexLayer, order: torch.Tensor) -> None:
    """Put ``layer``'s FFN channels in ``order`` (physical position -> base id): one
    gather per weight (none if they are there already), then point the wrappers at
    the physical positions of the expansion's units. On the meta device only the
    wrappers are pointed (there is nothing to move)."""
    expansion = layer.expansion(CHANNELS)
    slots = expansion.slots
    wrappers = layer.wrappers(CHANNELS)
    if not slots.is_meta and not any(is_meta(w.weight) for w in wrappers):
        order = order.to(slots.device)
        # New position p holds base channel order[p], now at position slots[order[p]].
        source = slots.index_select(0, order)
        if not torch.equal(source, torch.arange(len(source), device=source.device)):
            for wrapper in wrappers:  # w1, w3: rows (and their biases); w2: columns
                _gather_(wrapper.weight, wrapper.dim, source)
                if wrapper.bias is not None and wrapper.dim == 0:
                    _gather_(wrapper.bias, 0, source)
            slots.copy_(_slots_of(order))
    physical = expansion.units if slots.is_meta else slots.index_select(0, expansion.units)
    for wrapper in wrappers:
        wrapper.set_units(physical)


def restore_base_layout_(model: nn.Module) -> None:
    """Move every layer's FFN channels back to the base layout (wrappers follow)."""
    for layer in find_apex_layers(model):
        expansion = layer.expansion(CHANNELS)
        if expansion is not None:
            relayout_(layer, torch.arange(len(expansion.slots)))


# Keys of the layout in a saved state: one ``slots`` tensor per layer with channel expansion.
LAYOUT_STATE_PREFIX = "channel_layout."


def _layout_key(layer: ApexLayer) -> str:
    return f"{LAYOUT_STATE_PREFIX}layers.{layer.index}.{SLOTS}"


def _layers_with_layout(model: nn.Module) -> List[ApexLayer]:
    """The layers whose FFN channels have a layout (none in a model without APEX)."""
    if not any(isinstance(m, ApexExpansion) and hasattr(m, SLOTS) for m in model.modules()):
        return []
    return [layer for layer in find_apex_layers(model) if layer.expansion(CHANNELS) is not None]


def channel_layout_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The FFN channel layout of every layer (``slots``, on the CPU), to save beside
    weights taken in it."""
    return {_layout_key(layer): layer.expansion(CHANNELS).slots.detach().cpu().clone()
            for layer in _layers_with_layout(model)}


@torch.no_grad()
def load_channel_layout_(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Record that the model's FFN weights are in the layout ``state`` saved
    (:func:`channel_layout_state`; a state without it was saved in the base layout),
    moving nothing: call it before copying weights saved in that layout into the model.
    A selection set afterwards moves the channels from there as usual. Raises
    ValueError naming the key of a layout that does not fit the model."""
    expected = set()
    for layer in _layers_with_layout(model):
        expansion = layer.expansion(CHANNELS)
        key = _layout_key(layer)
        expected.add(key)
        slots = expansion.slots
        saved = state.get(key)
        if saved is None:
            slots.copy_(torch.arange(len(slots)))
            continue
        is_permutation = (
            saved.shape == slots.shape
            and saved.dtype == slots.dtype
            and torch.equal(saved.sort().values, torch.arange(len(slots)))
        )
        if not is_permutation:
            raise ValueError(f"{key} is not an order of the layer's {len(slots)} FFN channels")
        slots.copy_(saved)
    extra = sorted(k for k in state if k.startswith(LAYOUT_STATE_PREFIX) and k not in expected)
    if extra:
        raise ValueError(f"{extra[0]} is not a layer of this model with channel expansion")


def physical_to_base(expansion: Optional[ApexExpansion]) -> Optional[torch.Tensor]:
    """Index turning a physically ordered channel dim into base order (None: same order)."""
    if expansion is None or not getattr(expansion, "contiguous", False):
        return None
    return expansion.slots  # base channel u sits at position slots[u]


def base_layout_weights(
    wrapper: _ApexLinear, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Full ``weight``/``bias`` of ``wrapper``, as the live model holds them, in the
    base layout (w1, w3: rows and bias; w2: columns; other wrappers unchanged)."""
    index = physical_to_base(wrapper.expansion)
    if index is None:
        return weight, bias
    index = index.to(weight.device)
    weight = weight.index_select(wrapper.dim, index)
    if bias is not None and wrapper.dim == 0:
        bias = bias.index_select(0, index)
    return weight, bias


def base_layout_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A full (gathered) state dict of the wrapped ``model``, taken in its live layout,
    with the FFN weights in the base layout (a new dict; other tensors are shared).
    Keys are torchtune's decoder names, ``layers.<i>.mlp.<w1|w3|w2>.<weight|bias>``."""
    out = dict(state_dict)
    for layer in find_apex_layers(model):
        index = physical_to_base(layer.expansion(CHANNELS))
        if index is None:
            continue
        index = index.cpu()
        for name, wrapper in layer.named_wrappers(CHANNELS):
            prefix = f"layers.{layer.index}.{PROJECTIONS[CHANNELS][0]}.{name}"
            keys = [(f"{prefix}.weight", wrapper.dim)] + ([(f"{prefix}.bias", 0)] if wrapper.dim == 0 else [])
            for key, dim in keys:
                if key in out:
                    out[key] = out[key].index_select(dim, index.to(out[key].device))
                elif key.endswith(".weight"):
                    raise KeyError(f"{key} is not in the state dict: not a torchtune decoder's")
    return out
