"""apex_tune: APEX (Advantageous Parameter Expansion) for torchtune."""

from apex_tune.layers import ApexColumnLinear, ApexExpansion, ApexRowLinear
from apex_tune.model import (
    apex_trainable_params,
    apply_apex,
    find_apex_layers,
    fuse_apex,
    get_selection,
    merge_apex_,
    reset_apex_parameters,
    set_apex_trainable,
    set_selection,
    trainable_parameter_report,
)
from apex_tune.monarch import MonarchMatrix, monarch_layout
from apex_tune.ranking import ActivationRanker
from apex_tune.selection import LayerSelection, UnitSelection, select_units
from apex_tune.settings import ApexSettings

__all__ = [
    "ActivationRanker",
    "ApexColumnLinear",
    "ApexExpansion",
    "ApexRowLinear",
    "ApexSettings",
    "LayerSelection",
    "MonarchMatrix",
    "UnitSelection",
    "apex_trainable_params",
    "apply_apex",
    "find_apex_layers",
    "fuse_apex",
    "get_selection",
    "merge_apex_",
    "monarch_layout",
    "reset_apex_parameters",
    "select_units",
    "set_apex_trainable",
    "set_selection",
    "trainable_parameter_report",
]
