"""``output_dir/apex_selection.json``: per stage, the units selected, the scores behind
them and the effective rank of its weight change.

The effective ranks are computed after the boundary, while the next stage trains
(:mod:`apex_tune.training.effective_ranks`): the worker writes each stage's into the
small ``output_dir/apex_effective_rank.json`` as soon as they are known (before the
boundary's resume state becomes current, so a resume never lacks them), and they
join the stage's entry here at the next rewrite of this file (the next boundary, or
the end of the run)."""

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from apex_tune.modules.selection import LayerSelection

SELECTION_LOG = "apex_selection.json"
EFFECTIVE_RANK_LOG = "apex_effective_rank.json"


def _write(path: Path, entries: list) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


def _read(path: Path, empty=list):
    return json.loads(path.read_text()) if path.exists() else empty()


def _with_selection(entries: list, stage: int, step: int, selection: Sequence[LayerSelection], scores: dict) -> list:
    entries = [e for e in entries if e["step"] < step]  # a resumed run rewrites its future
    entries.append({"stage": stage, "step": step, "layers": [s.to_dict() for s in selection], "scores": scores})
    return entries


def log_selection(output_dir: Path, stage: int, step: int, selection: Sequence[LayerSelection], scores: dict) -> None:
    """Append stage ``stage``'s selection, chosen at optimizer step ``step``."""
    path = Path(output_dir) / SELECTION_LOG
    entries = _with_selection(_read(path), stage, step, selection, scores)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, entries)


def record_effective_ranks(output_dir: Path, stage: int, ranks: List[Dict[str, float]]) -> None:
    """Stage ``stage``'s effective rank of W' - W per layer and projection into
    ``apex_effective_rank.json`` ({stage: ranks}; a stage run again is overwritten)."""
    path = Path(output_dir) / EFFECTIVE_RANK_LOG
    recorded = _read(path, dict)
    recorded[str(stage)] = ranks
    _write(path, recorded)


def _with_effective_ranks(output_dir: Path, entries: list, before_stage: Optional[int] = None) -> list:
    """The selection log's entries with the recorded effective ranks of every stage
    (before ``before_stage``, whose later stages may still be ranking) in them."""
    recorded = _read(Path(output_dir) / EFFECTIVE_RANK_LOG, dict)
    for entry in entries:
        ranks = recorded.get(str(entry["stage"]))
        if ranks is not None and (before_stage is None or entry["stage"] < before_stage):
            entry["effective_rank"] = ranks
    return entries


def log_stage_end(
    output_dir: Path, stage: int, step: int, selection: Optional[Sequence[LayerSelection]], scores: dict
) -> None:
    """At the end of stage ``stage`` (optimizer step ``step``), in one rewrite of the file:
    the effective ranks recorded so far (the earlier stages') into their entries, and the
    next stage's selection appended (None at the last boundary). One rewrite, because the
    file grows with every stage's scores (about 1 MB after 25 stages at the benchmark's
    size) and rewriting it is a boundary's largest logging cost."""
    path = Path(output_dir) / SELECTION_LOG
    entries = _with_effective_ranks(output_dir, _read(path), before_stage=stage)
    if selection is not None:
        entries = _with_selection(entries, stage + 1, step, selection, scores)
    _write(path, entries)


def log_effective_ranks(output_dir: Path) -> None:
    """At the end of a run: every recorded effective rank into the selection log."""
    path = Path(output_dir) / SELECTION_LOG
    if path.exists():
        _write(path, _with_effective_ranks(output_dir, _read(path)))


def mean_effective_ranks(ranks: List[Dict[str, float]]) -> Dict[str, float]:
    """The mean rank over layers per projection, as metric-log entries."""
    names = sorted({name for layer in ranks for name in layer})
    return {
        f"effective_rank_{name}": sum(layer[name] for layer in ranks if name in layer)
        / sum(name in layer for layer in ranks)
        for name in names
    }
