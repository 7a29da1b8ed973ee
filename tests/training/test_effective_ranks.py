"""Effective ranks on the background thread: the synchronous values, errors not lost,
what must follow them done before the join returns; and their place in the selection log."""

import json
import threading

import pytest
import torch

from apex_tune import fold_apex_
from apex_tune.modules.selection import LayerSelection, UnitSelection
from apex_tune.training.effective_ranks import BackgroundEffectiveRanks
from apex_tune.training.selection_log import (
    SELECTION_LOG, log_effective_ranks, log_selection, log_stage_end, mean_effective_ranks, record_effective_ranks,
)

from conftest import perturb_apex, trained_tiny_apex


def test_background_ranks_equal_the_synchronous_ones():
    synchronous = fold_apex_(trained_tiny_apex(), seed=2, effective_ranks=True)
    model = trained_tiny_apex()  # the same model, stage and fold
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


def test_what_follows_the_ranks_runs_on_the_worker_before_join_returns():
    followed = []
    with BackgroundEffectiveRanks() as ranking:
        assert not ranking.pending and not ranking.done()
        ranking.submit([{"w1": torch.eye(4)}], then=lambda ranks: followed.append((ranks, threading.current_thread())))
        assert ranking.pending
        ranks = ranking.join()
        assert not ranking.pending
    assert followed == [(ranks, followed[0][1])] and followed[0][1] is not threading.current_thread()
    assert ranks == [{"w1": pytest.approx(4.0, rel=1e-12)}]


def test_stage_ranks_join_the_selection_log_at_its_next_rewrite(tmp_path):
    """The worker records stage s's ranks in apex_effective_rank.json; the selection log takes
    them at the next boundary (only the stages before it: later ones may still be ranking)
    and at the end of the run."""
    selection = [LayerSelection(heads=UnitSelection.empty(), channels=UnitSelection.empty())]
    log_selection(tmp_path, 1, 0, selection, {})
    record_effective_ranks(tmp_path, 1, [{"w1": 3.0, "w2": 5.0}])
    log_stage_end(tmp_path, 1, 10, selection, {})  # stage 1 ends: its ranks are still being computed
    entries = json.loads((tmp_path / SELECTION_LOG).read_text())
    assert [e["stage"] for e in entries] == [1, 2] and all("effective_rank" not in e for e in entries)
    record_effective_ranks(tmp_path, 2, [{"w1": 2.0}])
    log_stage_end(tmp_path, 2, 20, None, {})  # the last boundary: stage 1's ranks are in now
    entries = json.loads((tmp_path / SELECTION_LOG).read_text())
    assert entries[0]["effective_rank"] == [{"w1": 3.0, "w2": 5.0}] and "effective_rank" not in entries[1]
    log_effective_ranks(tmp_path)  # the end of the run
    entries = json.loads((tmp_path / SELECTION_LOG).read_text())
    assert [e.get("effective_rank") for e in entries] == [[{"w1": 3.0, "w2": 5.0}], [{"w1": 2.0}]]
    assert mean_effective_ranks([{"w1": 3.0, "w2": 5.0}, {"w1": 1.0}]) == {
        "effective_rank_w1": 2.0, "effective_rank_w2": 5.0}
