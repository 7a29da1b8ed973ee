"""Effective ranks on the background thread: the synchronous values, errors not lost."""

import pytest
import torch

from apex_tune import ApexSettings, apply_apex, fold_apex_, set_selection
from apex_tune.training.effective_ranks import BackgroundEffectiveRanks

from conftest import build_tiny, perturb_apex, random_selection


def _folded_model():
    model = build_tiny("llama3_gqa")
    settings = ApexSettings(ratio=0.25, delta=True, tuned_ratio_heads=0.5, tuned_ratio_channels=0.6)
    apply_apex(model, settings)
    set_selection(model, random_selection(model, settings, seed=0))
    perturb_apex(model, seed=1)
    return model


def test_background_ranks_equal_the_synchronous_ones():
    synchronous = fold_apex_(_folded_model(), seed=2, effective_ranks=True)
    model = _folded_model()  # the same model, stage and fold
    changes = fold_apex_(model, seed=2, weight_changes=True)
    assert all(c.dtype == torch.float32 and c.device.type == "cpu" for layer in changes for c in layer.values())
    with BackgroundEffectiveRanks() as ranking:
        ranking.submit(changes)
        perturb_apex(model, seed=3)  # training goes on while the worker ranks the copies
        background = ranking.join()
    # Same function on the same tensors: equal, not merely close.
    assert background == synchronous
    assert len(background) == 2 and all(len(layer) == 7 for layer in background)


def test_worker_error_is_raised_at_join():
    with BackgroundEffectiveRanks() as ranking:
        ranking.submit([{"q_proj": torch.zeros(2, 3, 4)}])  # not a matrix: effective_rank raises
        with pytest.raises(ValueError, match="takes a matrix"):
            ranking.join()
        with pytest.raises(RuntimeError, match="no effective ranks were submitted"):
            ranking.join()  # an error is reported once, then the worker is free again
        ranking.submit([{"w1": torch.eye(3)}])
        assert ranking.join() == [{"w1": pytest.approx(3.0, rel=1e-12)}]
