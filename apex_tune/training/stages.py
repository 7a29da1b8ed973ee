"""The stage-boundary protocol, one code path for the recipe and the benchmarks.

Units are chosen by :func:`choose_selection` (before stage 1, after the assessment
pass of ``apex_tune.training.assessment``, and at every boundary): at random from a seed
(the ablation), or from the ranker's scores summed over ranks; every rank must
choose the same. At the end of a stage (:func:`end_stage`): check the APEX
parameters are finite, choose the next units, fold the stage into the weights in
fp32 (:func:`~apex_tune.modules.model.fold_apex_`), point the wrappers at the next
selection, reset the operators (done by the merge) and the ranker's scores, and
reset the optimizer state truly: the next update is the first update of a fresh
optimizer (Adam step 1, zero moments); the learning-rate schedule goes on.

Saving must not undo that reset. torch's ``get_optimizer_state_dict`` (under
torchtune's ``get_full_optimizer_state_dict``) initialises an empty optimizer
state with a zero-gradient, lr=0 step, after which the stage's first real step
is Adam's step 2 with zero moments (about 0.74x the first update for betas
(0.9, 0.95)). The recipe therefore saves the optimizer's own local state dict
(:func:`apex_tune.training.checkpointing.local_optimizer_state`), which keeps an empty
state empty.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from apex_tune.modules._dtensor import full_value
from apex_tune.training.checkpointing import relative_difference
from apex_tune.training.distributed import check_same_selection
from apex_tune.modules.config import SELECTION_METHODS
from apex_tune.modules.model import fold_apex_, random_selection, set_selection
from apex_tune.modules.ranking import ActivationRanker
from apex_tune.modules.selection import LayerSelection


class NonFiniteParameterError(FloatingPointError):
    """A trainable parameter holds NaN or inf at a stage boundary; nothing was folded."""

    def __init__(self, name: str):
        super().__init__(f"non-finite values in {name}")
        self.name = name


def first_nonfinite_parameter(model: nn.Module) -> Optional[str]:
    """The name of the first trainable parameter with a NaN or inf (whole, if sharded), or None."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(full_value(param)).all():
            return name
    return None


class StageEnd(NamedTuple):
    """What :func:`end_stage` did and measured: the probe logits' relative change across
    the fold (None without a probe), per layer {projection: effective rank} (None unless
    asked), the next stage's units and the scores behind them (None and {} when kept),
    and per layer {projection: weight change} to be ranked later (None unless asked)."""

    difference: Optional[float]
    effective_ranks: Optional[List[Dict[str, float]]]
    selection: Optional[List[LayerSelection]]
    scores: dict
    weight_changes: Optional[List[Dict[str, torch.Tensor]]] = None


def choose_selection(
    model: nn.Module, ranker: Optional[ActivationRanker], method: str, seed: int
) -> Tuple[List[LayerSelection], dict]:
    """The units of the next stage and the scores behind them (``apex.selection``):
    ``"random"`` draws them from ``seed`` (the ablation; no scores), ``"activation"``
    selects from the ranker's scores, summed over ranks first. In a process group every
    rank must have chosen the same."""
    if method == "random":
        selection, scores = random_selection(model, torch.Generator().manual_seed(seed)), {}
    elif method == "activation":
        ranker.all_reduce()
        selection, scores = ranker.select(), ranker.scores()
    else:
        raise ValueError(f"selection {method!r} must be one of {SELECTION_METHODS}")
    if dist.is_available() and dist.is_initialized():
        check_same_selection(selection, dist.get_world_size())
    return selection, scores


def reset_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """Forget every moment and step count; keep the hyperparameters (``param_groups``,
    where the LR schedule writes). The next step is a fresh optimizer's first step."""
    optimizer.state.clear()


def end_stage(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ranker: Optional[ActivationRanker],
    selection: Optional[str],
    seed: int,
    probe: Optional[Callable[[], torch.Tensor]] = None,
    effective_ranks: bool = False,
    weight_changes: bool = False,
) -> StageEnd:
    """The stage boundary, in place: check, re-select, fold in fp32, reset.

    ``selection``: how the next units are chosen (:func:`choose_selection`; None keeps
    the current units, the last stage). ``seed`` draws the random units and the fresh
    operators. With ``probe`` (a function giving the model's logits on a fixed batch)
    the result has the relative difference of those logits across the fold, which
    must be rounding only; with ``effective_ranks``, the effective rank of each wrapped
    projection's change over the stage (:func:`~apex_tune.modules.model.fold_apex_`);
    with ``weight_changes`` instead, those changes, for
    :class:`~apex_tune.training.effective_ranks.BackgroundEffectiveRanks` to rank.
    Raises :class:`NonFiniteParameterError` before touching anything.
    """
    name = first_nonfinite_parameter(model)
    if name is not None:
        raise NonFiniteParameterError(name)
    next_units, scores = choose_selection(model, ranker, selection, seed) if selection else (None, {})
    before = probe() if probe is not None else None
    folded = fold_apex_(model, seed=seed, effective_ranks=effective_ranks, weight_changes=weight_changes)
    difference = relative_difference(before, probe()) if probe is not None else None
    if next_units is not None:
        set_selection(model, next_units)
    if ranker is not None:
        ranker.reset()
    reset_optimizer_state_(optimizer)
    return StageEnd(
        difference, folded if effective_ranks else None, next_units, scores, folded if weight_changes else None
    )
