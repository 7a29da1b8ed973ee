"""apex_tune: APEX (Advantageous Parameter Expansion) for torchtune."""

from apex_tune import _torchao_log  # noqa: F401  (first: before anything imports torchao)

from apex_tune.modules.expansion import ApexColumnLinear, ApexExpansion, ApexRowLinear
from apex_tune.modules.model import (
    apex_trainable_params,
    apply_apex,
    find_apex_layers,
    fold_apex_,
    get_selection,
    init_apex_,
    placeholder_selection,
    random_selection,
    reset_apex_parameters,
    set_apex_trainable,
    set_selection,
    trainable_parameter_report,
    unwrap_apex,
)
from apex_tune.modules.monarch import MonarchMatrix, monarch_layout
from apex_tune.modules.ranking import ActivationRanker
from apex_tune.modules.selection import LayerSelection, UnitSelection, select_units
from apex_tune.modules.config import ApexSchedule, ApexSettings, parse_apex_config

__all__ = [
    "ActivationRanker",
    "ApexColumnLinear",
    "ApexExpansion",
    "ApexRowLinear",
    "ApexSchedule",
    "ApexSettings",
    "LayerSelection",
    "MonarchMatrix",
    "UnitSelection",
    "apex_trainable_params",
    "apply_apex",
    "find_apex_layers",
    "fold_apex_",
    "get_selection",
    "init_apex_",
    "placeholder_selection",
    "random_selection",
    "monarch_layout",
    "parse_apex_config",
    "reset_apex_parameters",
    "select_units",
    "set_apex_trainable",
    "set_selection",
    "trainable_parameter_report",
    "unwrap_apex",
]
