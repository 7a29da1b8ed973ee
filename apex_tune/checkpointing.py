"""Crash-safe recipe state and fused checkpoints of a wrapped model."""

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from apex_tune.model import apply_apex, fuse_apex, materialize_apex_buffers_, set_selection
from apex_tune.selection import LayerSelection
from apex_tune.settings import ApexSettings

RECIPE_STATE_FILE = "apex_recipe_state.pt"
STATE_FORMAT = 1


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary name, fsync, then rename: the old file stays until the new one is whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_recipe_state(output_dir: Path) -> Optional[Dict[str, Any]]:
    """The last whole recipe state in ``output_dir``, or None when there is none.

    A state that fails to load or lacks its keys is an error, never silently
    skipped: resuming from the wrong point would be worse than stopping.
    """
    path = Path(output_dir) / RECIPE_STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise RuntimeError(f"recipe state {path} is unreadable ({e}); delete it to start over") from e
    missing = {"format", "model", "selection", "optimizer", "progress"} - set(state)
    if missing or state["format"] != STATE_FORMAT:
        raise RuntimeError(f"recipe state {path} is incomplete or of another version (missing {sorted(missing)})")
    return state


def replace_dir(staged: Path, final: Path) -> None:
    """Move a fully written checkpoint folder into place under its final name."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)


@torch.no_grad()
def fused_state_dict(
    build_model: Callable[[], nn.Module],
    settings: ApexSettings,
    wrapped_state_dict: Dict[str, torch.Tensor],
    selection: List[LayerSelection],
) -> Dict[str, torch.Tensor]:
    """The plain model's state dict that a wrapped state dict fuses to.

    Rebuilds the wrapped model on the meta device around copies of the given
    tensors, fuses it with :func:`fuse_apex`, and returns the plain weights,
    leaving the live (possibly sharded) training model untouched.
    """
    with torch.device("meta"):
        model = build_model()
    apply_apex(model, settings)
    tensors = {k: v.detach().clone() for k, v in wrapped_state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    materialize_apex_buffers_(model, torch.device("cpu"))
    set_selection(model, selection)
    fuse_apex(model)
    return model.state_dict()
