"""Builders for torchtune configs: wrap any supported decoder by ``_component_`` path.

    model:
      _component_: apex_tune.builders.apex_model
      base:
        _component_: torchtune.models.llama3_2.llama3_2_1b
      ratio: 0.1875
      delta: True
"""

from typing import Any, Mapping, Optional, Union

from omegaconf import OmegaConf
from torch import nn
from torchtune import config

from apex_tune.model import apply_apex, set_apex_trainable
from apex_tune.settings import ApexSettings


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
) -> nn.Module:
    """``base`` wrapped with APEX (placeholder selection, M = 0) and only APEX trainable.

    ``base`` is a model, or a config node with its own ``_component_`` (torchtune
    does not instantiate nested nodes, so this builder does).

    The result computes exactly ``base``. Before training, score units with
    :class:`apex_tune.ActivationRanker` and call :func:`apex_tune.set_selection`;
    the ``apex_finetune`` recipe does all of this from its ``apex`` section.
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
    )
    if isinstance(base, Mapping):
        base = config.instantiate(OmegaConf.create(dict(base)))
    apply_apex(base, settings)
    set_apex_trainable(base, settings)
    return base
