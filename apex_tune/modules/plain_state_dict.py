"""Make a wrapped model load and save like its base, for torchtune's own recipes.

torchtune's full fine-tuning recipes load the base checkpoint strictly into the
model and save ``model.state_dict()`` through the HF checkpointer. With
:func:`enable_plain_state_dict` (what :func:`apex_tune.models.apex_model`
does) a wrapped model

- saves the plain base keys and shapes: each wrapped weight is saved folded
  (W', operators and delta included) and APEX's own parameters are left out,
  like torchtune's NF4/QAT state-dict hooks, in the base channel layout (see
  :mod:`apex_tune.modules.layout`); the live model is not changed;
- loads a base state dict strictly: APEX parameters the state dict lacks start
  at identity (M = 0, a = b = 1, delta = 0), so the model computes the base.
  The FFN channels go back to the base layout before the load, and the
  selection applied after it lays them out again.

It is opt-in: the ``apex_finetune`` recipe saves and resumes the wrapped state
dict itself.
"""

from typing import List, Optional, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from apex_tune.modules._dtensor import is_meta, local_value
from apex_tune.modules.expansion import _ApexLinear
from apex_tune.modules.layout import base_layout_weights, restore_base_layout_
from apex_tune.modules.model import (
    find_apex_layers,
    materialize_apex_buffers_,
    param_kind,
    placeholder_selection,
    reset_apex_parameters,
    set_selection,
)
from apex_tune.modules.selection import LayerSelection

APEX_KINDS = ("operators", "vectors", "deltas")
# Module-name parts that torchtune's activation checkpointing and compile add and
# that the state dict does not show.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _state_dict_name(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``value`` (full) as ``reference`` holds it: sharded the same way if it is a DTensor."""
    if isinstance(reference, DTensor):
        return distribute_tensor(value.to(reference.dtype), reference.device_mesh, reference.placements)
    return value.to(reference.dtype)


def enable_plain_state_dict(
    model: nn.Module, selection: Optional[Sequence[LayerSelection]] = None, seed: int = 0
) -> nn.Module:
    """Fold on save, identity on load (see the module doc). ``selection``: the P/N/E
    sets to (re)apply after every load, e.g. once buffers built on the meta device
    are materialised (None: the placeholder selection); ``seed`` fixes the fresh
    operators a base load starts from."""
    if any(".apex_history." in name for name, _ in model.named_parameters()):
        raise ValueError(
            "quantize_base: the plain state dict of a wrapped NF4 base is not supported in torchtune's "
            "recipes; use the apex_finetune recipe for QAPEX"
        )
    model._apex_plain = {"selection": list(selection) if selection is not None else None, "seed": seed}
    model.register_state_dict_post_hook(_fold_on_save)
    model.register_load_state_dict_pre_hook(_identity_for_missing)
    model.register_load_state_dict_post_hook(_after_load)
    return model


def _apex_linears(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, _ApexLinear):
            yield _state_dict_name(name), module


def _fold_on_save(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    for name, wrapper in _apex_linears(module):
        key = f"{prefix}{name}.weight"
        # A model still on the meta device (FSDP loaders read its state dict for
        # the keys and shapes) has nothing to fold.
        if key not in state_dict or is_meta(wrapper.weight):
            continue
        weight, bias = base_layout_weights(wrapper, *wrapper.folded()[:2])
        state_dict[key] = _like(weight, state_dict[key])
        if bias is not None:
            state_dict[f"{prefix}{name}.bias"] = _like(bias, state_dict[f"{prefix}{name}.bias"])
    for key in [k for k in state_dict if k.startswith(prefix) and param_kind(k[len(prefix):]) in APEX_KINDS]:
        del state_dict[key]


def _identity_for_missing(
    module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """Fill the APEX parameters a base state dict lacks (set to identity after the load),
    and put the FFN channels back in the base layout, the state dict's."""
    restore_base_layout_(module)
    missing: List[str] = []
    device = next(
        (local_value(v).device for v in state_dict.values()), torch.device("cpu")
    )
    for name, param in module.named_parameters():
        key = prefix + _state_dict_name(name)
        if param_kind(key) in APEX_KINDS and key not in state_dict:
            state_dict[key] = _like(torch.zeros(param.shape, device=device), param)
            missing.append(key)
    module._apex_plain["loaded_base"] = bool(missing)


def _after_load(module: nn.Module, incompatible_keys) -> None:
    plain = module._apex_plain
    weight = find_apex_layers(module)[0].attn.v_proj.weight
    materialize_apex_buffers_(module, local_value(weight).device)
    set_selection(module, plain["selection"] or placeholder_selection(module))
    if plain.pop("loaded_base", False):
        reset_apex_parameters(module, plain["seed"])
