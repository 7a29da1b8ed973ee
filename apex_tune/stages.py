"""The stage-boundary protocol, one code path for the recipe and the benchmarks.

At the end of a stage (:func:`end_stage`): check the APEX parameters are
finite, fold the stage into the weights in fp32 (:func:`~apex_tune.model.merge_apex_`),
point the wrappers at the next selection, reset the operators (done by the
merge) and the ranker's scores, and reset the optimizer state truly: the
next update is the first update of a fresh optimizer (Adam step 1, zero
moments); the learning-rate schedule goes on.

Saving must not undo that reset. torch's ``get_optimizer_state_dict`` (under
torchtune's ``get_full_optimizer_state_dict``) initialises an empty optimizer
state with a zero-gradient, lr=0 step, after which the stage's first real step
is Adam's step 2 with zero moments (about 0.74x the first update for betas
(0.9, 0.95)). :func:`optimizer_state_to_save` and :func:`load_optimizer_state`
keep an empty state empty.
"""

from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchtune import training

from apex_tune._dtensor import full_value
from apex_tune.checkpointing import relative_difference
from apex_tune.memory_options import load_from_full_optimizer_state_dict
from apex_tune.model import merge_apex_, set_selection
from apex_tune.ranking import ActivationRanker
from apex_tune.selection import LayerSelection


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


def reset_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """Forget every moment and step count; keep the hyperparameters (``param_groups``,
    where the LR schedule writes). The next step is a fresh optimizer's first step."""
    optimizer.state.clear()


def end_stage(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ranker: Optional[ActivationRanker],
    next_selection: Optional[Sequence[LayerSelection]],
    seed: int,
    probe: Optional[Callable[[], torch.Tensor]] = None,
) -> Optional[float]:
    """The stage boundary, in place: check, fold in fp32, re-select, reset.

    ``next_selection`` None keeps the current units (the last stage). ``seed``
    draws the fresh operators. With ``probe`` (a function giving the model's
    logits on a fixed batch) returns the relative difference of those logits
    across the fold, which must be rounding only. Raises
    :class:`NonFiniteParameterError` before touching anything.
    """
    name = first_nonfinite_parameter(model)
    if name is not None:
        raise NonFiniteParameterError(name)
    before = probe() if probe is not None else None
    merge_apex_(model, seed=seed)
    difference = relative_difference(before, probe()) if probe is not None else None
    if next_selection is not None:
        set_selection(model, next_selection)
    if ranker is not None:
        ranker.reset()
    reset_optimizer_state_(optimizer)
    return difference


def _has_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any rank's optimizer holds state (ranks agree after a reset, but ask them all
    so that every rank takes the same, possibly collective, path)."""
    flag = torch.tensor([float(any(len(s) for s in optimizer.state.values()))])
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.to(optimizer.param_groups[0]["params"][0].device)  # where the backend communicates
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def optimizer_state_to_save(
    model: nn.Module, optimizer: torch.optim.Optimizer, is_rank_zero: bool
) -> Dict[str, Any]:
    """The optimizer's full state dict for a resume state, without changing the optimizer.

    A non-empty state goes through torchtune's ``get_full_optimizer_state_dict``
    (a collective; rank 0 gets the dict, the others ``{}``). An empty one (just
    after a boundary, or before the first step) is saved as its hyperparameters
    alone, ``{"state": {}, "param_groups": [...]}``, since the torch function
    would first step it.
    """
    if _has_state(optimizer):
        return training.get_full_optimizer_state_dict(model, optimizer, is_rank_zero)
    if not is_rank_zero:
        return {}
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return {"state": {}, "param_groups": groups}


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: Dict[str, Any], device: torch.device
) -> None:
    """Load what :func:`optimizer_state_to_save` returned. An empty state restores the
    hyperparameters only and leaves the optimizer fresh (no initialising step)."""
    if saved["state"]:
        load_from_full_optimizer_state_dict(model, optimizer, saved, device)
        return
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"the saved optimizer has {len(saved['param_groups'])} parameter groups, this one "
            f"{len(optimizer.param_groups)}"
        )
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
