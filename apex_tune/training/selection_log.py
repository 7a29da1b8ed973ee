"""``output_dir/apex_selection.json``: per stage, the units selected, the scores behind
them and, once the stage is folded, the effective rank of its weight change."""

import json
import os
from pathlib import Path
from typing import Dict, List, Sequence

from apex_tune.modules.selection import LayerSelection

SELECTION_LOG = "apex_selection.json"


def _write(path: Path, entries: list) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


def log_selection(output_dir: Path, stage: int, step: int, selection: Sequence[LayerSelection], scores: dict) -> None:
    """Append stage ``stage``'s selection, chosen at optimizer step ``step``."""
    path = Path(output_dir) / SELECTION_LOG
    entries = json.loads(path.read_text()) if path.exists() else []
    entries = [e for e in entries if e["step"] < step]  # a resumed run rewrites its future
    entries.append({"stage": stage, "step": step, "layers": [s.to_dict() for s in selection], "scores": scores})
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, entries)


def log_effective_ranks(output_dir: Path, stage: int, ranks: List[Dict[str, float]]) -> Dict[str, float]:
    """Record stage ``stage``'s effective rank of W' - W per layer and projection in its
    entry; returns the mean over layers per projection (for the metric log)."""
    path = Path(output_dir) / SELECTION_LOG
    entries = json.loads(path.read_text())
    for entry in entries:
        if entry["stage"] == stage:
            entry["effective_rank"] = ranks
    _write(path, entries)
    names = sorted({name for layer in ranks for name in layer})
    return {
        f"effective_rank_{name}": sum(layer[name] for layer in ranks if name in layer)
        / sum(name in layer for layer in ranks)
        for name in names
    }
