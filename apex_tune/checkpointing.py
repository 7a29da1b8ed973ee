"""Crash-safe recipe state and fused checkpoints of a wrapped model."""

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from apex_tune._faults import fault_point
from apex_tune.model import apply_apex, fuse_apex, materialize_apex_buffers_, set_apex_trainable, set_selection
from apex_tune.selection import LayerSelection
from apex_tune.settings import ApexSettings

RECIPE_STATE_FILE = "apex_recipe_state.pt"
STATE_FORMAT = 1


class CheckpointError(RuntimeError):
    """A saved state that cannot be used, or a fused model that failed its check."""


def atomic_torch_save(obj: Any, path: Path, fault_label: str = "") -> None:
    """Write to a temporary name, fsync, then rename: the old file stays until the new one is whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    fault_point(f"state_renaming:{fault_label}")
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
        raise CheckpointError(
            f"recipe state {path} is unreadable ({type(e).__name__}: {e}); it was not written by a "
            "finished save. Move it away to start over from the base model"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"recipe state {path} is not an apex_tune recipe state")
    missing = {"format", "model", "selection", "optimizer", "progress"} - set(state)
    if missing or state["format"] != STATE_FORMAT:
        raise CheckpointError(
            f"recipe state {path} is incomplete or of another version (missing {sorted(missing)})"
        )
    return state


def replace_dir(staged: Path, final: Path) -> None:
    """Move a fully written checkpoint folder into place under its final name."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)


def relative_difference(expected: torch.Tensor, got: torch.Tensor) -> float:
    """max |got - expected| / max |expected|; inf where either is not finite."""
    expected, got = expected.float(), got.float()
    if not (torch.isfinite(expected).all() and torch.isfinite(got).all()):
        return float("inf")
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def check_fusion(difference: float, tolerance: float, where: str) -> None:
    """Refuse a fused model that is not finite or does not reproduce the wrapped one."""
    if not difference <= tolerance:
        raise CheckpointError(
            f"{where}: the fused model differs from the wrapped model by {difference:.3g} "
            f"(relative, on the probe batch; tolerance {tolerance:g}); nothing was saved and "
            "the last good checkpoint is kept"
        )


@torch.no_grad()
def fused_state_dict(
    build_model: Callable[[], nn.Module],
    settings: ApexSettings,
    wrapped_state_dict: Dict[str, torch.Tensor],
    selection: List[LayerSelection],
    probe_tokens: Optional[torch.Tensor] = None,
) -> Tuple[Dict[str, torch.Tensor], Optional[float]]:
    """The plain model's state dict that a wrapped state dict fuses to, on CPU.

    Rebuilds the wrapped model on the meta device (``build_model`` gives the base
    architecture in the run's dtype) around copies of the given tensors and fuses
    it with :func:`fuse_apex`, leaving the live (possibly sharded) training model
    untouched. With ``probe_tokens`` also returns the
    relative difference of the fused model's logits from the wrapped model's.
    """
    with torch.device("meta"):
        model = build_model()
    apply_apex(model, settings)
    set_apex_trainable(model, settings)  # fp32 trained embeddings, used in the model's dtype
    if settings.quantize_base:  # the frozen stages the state holds; weights load dequantized
        from apex_tune.quantization import ensure_history_

        ensure_history_(model, wrapped_state_dict)
    tensors = {k: v.detach().clone() for k, v in wrapped_state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    materialize_apex_buffers_(model, torch.device("cpu"))
    set_selection(model, selection)
    difference = None
    if probe_tokens is not None:
        for m in model.modules():
            if hasattr(m, "rope_init"):
                with torch.device("cpu"):
                    m.rope_init()
        model.eval()
        wrapped_logits = model(probe_tokens.cpu())
    fuse_apex(model)
    if probe_tokens is not None:
        difference = relative_difference(wrapped_logits, model(probe_tokens.cpu()))
    return model.state_dict(), difference
