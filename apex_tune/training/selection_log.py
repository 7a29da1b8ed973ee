"""``output_dir/apex_selection.json``: per stage, the units selected, the scores behind
them and, once the stage is folded, the effective rank of its weight change."""

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from apex_tune.modules.selection import LayerSelection

SELECTION_LOG = "apex_selection.json"


def _write(path: Path, entries: list) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


def _read(path: Path) -> list:
    return json.loads(path.read_text()) if path.exists() else []


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


def log_stage_end(
    output_dir: Path,
    stage: int,
    ranks: Optional[List[Dict[str, float]]],
    step: int,
    selection: Optional[Sequence[LayerSelection]],
    scores: dict,
) -> Dict[str, float]:
    """At the end of stage ``stage`` (optimizer step ``step``), in one rewrite of the file:
    its effective rank of W' - W per layer and projection into its entry (``ranks``; None
    records none), then the next stage's selection appended (None at the last boundary).
    One rewrite, because the file grows with every stage's scores (about 1 MB after 25
    stages at the benchmark's size) and rewriting it is a boundary's largest logging cost.
    Returns the mean rank over layers per projection (for the metric log; {} without)."""
    if ranks is None and selection is None:
        return {}
    path = Path(output_dir) / SELECTION_LOG
    entries = _read(path)
    if ranks is not None:
        for entry in entries:
            if entry["stage"] == stage:
                entry["effective_rank"] = ranks
    if selection is not None:
        entries = _with_selection(entries, stage + 1, step, selection, scores)
    _write(path, entries)
    names = sorted({name for layer in ranks or [] for name in layer})
    return {
        f"effective_rank_{name}": sum(layer[name] for layer in ranks if name in layer)
        / sum(name in layer for layer in ranks)
        for name in names
    }
