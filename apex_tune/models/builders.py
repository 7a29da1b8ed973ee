"""Builders for torchtune configs: wrap any supported decoder by ``_component_`` path.

    model:
      _component_: apex_tune.models.apex_model
      base:
        _component_: torchtune.models.llama3_2.llama3_2_1b
      ratio: 0.1875
      delta: True
      selection_file: /tmp/run/apex_selection_assessed.json   # from `apex-tune assess`

With this ``model:`` torchtune's ``full_finetune_single_device`` recipe trains
one APEX stage and saves a plain checkpoint (see README, "Using APEX in
torchtune's own recipes").
"""

from typing import Any, Mapping, Optional, Tuple, Union

from omegaconf import OmegaConf
from torch import nn
from torchtune import config
from torchtune.config._errors import InstantiationError
from torchtune.config._utils import _get_component_from_path

from apex_tune.modules.selection import read_selection_file
from apex_tune.modules.model import apply_apex, set_apex_trainable, set_selection
from apex_tune.modules.plain_state_dict import enable_plain_state_dict
from apex_tune.modules.config import ApexSettings


def apex_model(
    base: Union[nn.Module, Mapping[str, Any]],
    ratio: float = 0.1875,
    ratio_heads: Optional[float] = None,
    ratio_channels: Optional[float] = None,
    tuned_ratio_heads: Optional[float] = None,
    tuned_ratio_channels: Optional[float] = None,
    delta: bool = False,
    train_embeddings: bool = False,
    quantize_base: bool = False,
    contiguous_channels: bool = True,
    selection_file: Optional[str] = None,
    plain_state_dict: bool = True,
) -> nn.Module:
    """``base`` wrapped with APEX (M = 0) and only APEX trainable.

    ``base`` is a model, or a config node with its own ``_component_`` (torchtune
    does not instantiate nested nodes, so this builder does).

    ``selection_file``: the P/N/E per layer written by ``apex-tune assess``
    (None: a placeholder selection, units 0, 1, 2, ..., which is not the method).
    ``plain_state_dict``: load a base state dict strictly (operators at identity)
    and save the plain base keys with the operators folded in, as torchtune's
    full fine-tuning recipes need (see :mod:`apex_tune.modules.plain_state_dict`).

    The result computes exactly ``base``.
    """
    settings = ApexSettings(
        ratio=ratio,
        ratio_heads=ratio_heads,
        ratio_channels=ratio_channels,
        tuned_ratio_heads=tuned_ratio_heads,
        tuned_ratio_channels=tuned_ratio_channels,
        delta=delta,
        train_embeddings=train_embeddings,
        quantize_base=quantize_base,
        contiguous_channels=contiguous_channels,
    )
    selection = read_selection_file(selection_file, settings) if selection_file is not None else None
    if isinstance(base, Mapping):
        base = config.instantiate(OmegaConf.create(dict(base)))
    apply_apex(base, settings)
    set_apex_trainable(base, settings)
    if selection is not None:
        set_selection(base, selection)
    if plain_state_dict:
        enable_plain_state_dict(base, selection)
    return base


def uses_apex_model(model_cfg: Mapping[str, Any]) -> bool:
    """Whether a ``model:`` node builds through :func:`apex_model` (by any import path)."""
    try:
        return _get_component_from_path(model_cfg.get("_component_", "")) is apex_model
    except InstantiationError:
        return False


def builder_settings(model_cfg: Mapping[str, Any]) -> Tuple[Mapping[str, Any], ApexSettings, Optional[str]]:
    """For a ``model:`` node that uses :func:`apex_model`: its base node, settings and selection file."""
    args = {k: v for k, v in dict(model_cfg).items() if k != "_component_"}
    base = args.pop("base")
    selection_file = args.pop("selection_file", None)
    args.pop("plain_state_dict", None)
    return base, ApexSettings(**args), selection_file
