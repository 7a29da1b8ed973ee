"""Crash-safe recipe state and fused checkpoints of a wrapped model."""

import importlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torchtune import training, utils

from apex_tune.training.testing import fault_point
from apex_tune.training.inputs import InputError, safetensors_header
from apex_tune.training.distributed import build_rope_caches_, check_same_resume_point
from apex_tune.training.run_options import ConfigError
from apex_tune.modules._dtensor import local_value
from apex_tune.modules.layout import channel_layout_state, load_channel_layout_
from apex_tune.modules.model import (
    apply_apex,
    unwrap_apex,
    materialize_apex_buffers_,
    param_kind,
    set_apex_trainable,
    set_selection,
)
from apex_tune.modules.nf4 import HISTORY, is_nf4
from apex_tune.modules.selection import LayerSelection
from apex_tune.modules.config import ApexSettings

# The resume state (see README "Failures and resume"): a folder per save holding, for
# every rank r, rank_<r>.safetensors (its shards of the wrapped model and optimizer
# state, its RNG) and rank_<r>.json (progress, selection, data loader, scores); and
# latest.json naming the last whole one. No pickle anywhere: loading executes nothing.
RECIPE_STATE_DIR = "apex_recipe_state"
STATE_MANIFEST = "latest.json"
LEGACY_STATE_FILE = "apex_recipe_state.pt"  # apex_tune <= 0.1 (a pickle): refused, never loaded
STATE_FORMAT = 2
# what rank_<r>.json holds, written by save_recipe_state and read by restore_recipe_state
STATE_KEYS = ("progress", "selection", "optimizer", "dataloader", "ranker", "data_counts")
# torchao's low-bit optimizer states (tensor subclasses), rebuilt from their parts
LOW_BIT_STATES = {
    "torchao.optim.subclass_8bit.OptimState8bit",
    "torchao.optim.subclass_4bit.OptimState4bit",
    "torchao.optim.subclass_fp8.OptimStateFp8",
}


log = utils.get_logger("INFO")


class CheckpointError(RuntimeError):
    """A saved state that cannot be used, or a fused model that failed its check."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------- JSON with tensors beside it
def encode(obj: Any, tensors: Dict[str, torch.Tensor], name: str) -> Any:
    """``obj`` as JSON, its tensors moved into ``tensors`` (saved as safetensors) and
    referenced by name; tuples and non-string dict keys are marked so they come back
    as they were. A DTensor is stored as this rank's local shard."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        is_dtensor = isinstance(obj, DTensor)
        local = obj.to_local() if is_dtensor else obj
        if type(local) is not torch.Tensor and not isinstance(local, nn.Parameter):
            cls = f"{type(local).__module__}.{type(local).__qualname__}"
            if cls not in LOW_BIT_STATES:
                raise TypeError(f"{name}: cannot save a {cls} in the resume state")
            attrs, ctx = local.__tensor_flatten__()
            for attr in attrs:
                tensors[f"{name}.{attr}"] = getattr(local, attr).detach().cpu().contiguous()
            return {"__subclass__": cls, "parts": {a: f"{name}.{a}" for a in attrs},
                    "ctx": encode(list(ctx), tensors, f"{name}.ctx"), "dtensor": is_dtensor}
        tensors[name] = local.detach().cpu().contiguous()
        return {"__tensor__": name, "dtensor": is_dtensor}
    if isinstance(obj, (list, tuple)):
        items = [encode(v, tensors, f"{name}.{i}") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{name}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, f"{name}.k{i}"), encode(v, tensors, f"{name}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"{name}: cannot save a {type(obj).__name__} in the resume state")


def decode(obj: Any, tensors: Dict[str, torch.Tensor], where: str,
           to_dtensor: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Any:
    """The inverse of :func:`encode`; ``to_dtensor`` turns a local shard back into the
    DTensor it came from (optimizer states of sharded parameters)."""
    if isinstance(obj, list):
        return [decode(v, tensors, where, to_dtensor) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tuple__" in obj:
        return tuple(decode(v, tensors, where, to_dtensor) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode(k, tensors, where): decode(v, tensors, where, to_dtensor) for k, v in obj["__items__"]}
    if "__tensor__" in obj or "__subclass__" in obj:
        try:
            if "__tensor__" in obj:
                local = tensors[obj["__tensor__"]]
            else:
                if obj["__subclass__"] not in LOW_BIT_STATES:  # never import a name from the file
                    raise KeyError(obj["__subclass__"])
                module, _, cls_name = obj["__subclass__"].rpartition(".")
                cls = getattr(importlib.import_module(module), cls_name)
                parts = {a: tensors[key] for a, key in obj["parts"].items()}
                local = cls.__tensor_unflatten__(parts, decode(obj["ctx"], tensors, where), None, None)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{where}: tensor {e} is missing or malformed; the state is damaged") from e
        if obj.get("dtensor"):
            if to_dtensor is None:
                raise CheckpointError(f"{where}: a sharded tensor where none belongs; the state is damaged")
            return to_dtensor(local)
        return local
    return {k: decode(v, tensors, where, to_dtensor) for k, v in obj.items()}


# ----------------------------------------------------------- model, optimizer
def local_model_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's part of the wrapped model: the local shard of every tensor, except
    NF4 base weights (a QAPEX base never changes: resume quantizes the base again),
    and the FFN channel layout the weights are in."""
    out = channel_layout_state(model)
    for name, value in model.state_dict().items():
        local = local_value(value)
        if not is_nf4(local):
            out[f"model.{name}"] = local.cpu().contiguous()
    return out


@torch.no_grad()
def load_local_model_state(model: nn.Module, tensors: Dict[str, torch.Tensor], where: str) -> None:
    """Copy this rank's saved shards into the (already sharded) model, in place, in
    the FFN channel layout they were saved in (see :mod:`apex_tune.modules.layout`;
    setting the saved selection afterwards then moves nothing)."""
    try:
        load_channel_layout_(model, tensors)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}; the state belongs to another model or is damaged") from e
    expected = set()
    for name, value in model.state_dict().items():
        local = local_value(value)
        if is_nf4(local):
            continue
        key = f"model.{name}"
        expected.add(key)
        saved = tensors.get(key)
        if saved is None:
            raise CheckpointError(f"{where}: tensor {key} is missing; the state belongs to another model or config")
        if saved.shape != local.shape or saved.dtype != local.dtype:
            raise CheckpointError(
                f"{where}: tensor {key} is {saved.dtype} {tuple(saved.shape)}, this rank's shard of the model is "
                f"{local.dtype} {tuple(local.shape)}: the state belongs to another model, config or world size"
            )
        local.copy_(saved)
    extra = sorted(k for k in tensors if k.startswith("model.") and k not in expected)
    if extra:
        raise CheckpointError(f"{where}: tensors {extra[:3]} are not in the model; the state belongs to another model")


def local_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor]) -> Any:
    """The optimizer's own ``state_dict()`` (states of sharded parameters are local
    shards) as JSON + tensors. Reading it changes nothing, unlike the full-state-dict
    helpers, which run a zero-grad step when the state is empty."""
    return encode(optimizer.state_dict(), tensors, "optimizer")


@torch.no_grad()
def load_local_optimizer_state(
    optimizer: torch.optim.Optimizer, saved: Any, tensors: Dict[str, torch.Tensor], where: str
) -> None:
    """Restore what :func:`local_optimizer_state` saved, shard by shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        groups = decode(saved["param_groups"], tensors, where)
        ids = [i for group in groups for i in group["params"]]
        if len(ids) != len(params) or len(groups) != len(optimizer.param_groups):
            raise ValueError(f"{len(ids)} parameters in {len(groups)} groups, the optimizer has {len(params)}")
        optimizer.load_state_dict({"state": {}, "param_groups": groups})
        by_id = dict(zip(ids, params))
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for key, entry in saved["state"]["__items__"] if saved["state"] else []:
            p = by_id[decode(key, tensors, where)]
            group = group_of[id(p)]

            def to_dtensor(local, p=p):
                return DTensor.from_local(local.to(p.device), p.device_mesh, p.placements,
                                          run_check=False, shape=p.shape, stride=p.stride())

            state = decode(entry, tensors, where, to_dtensor if isinstance(p, DTensor) else None)
            for name, value in state.items():
                if isinstance(value, DTensor) and value.to_local().shape != p.to_local().shape:
                    raise ValueError(f"state {name} has shape {tuple(value.to_local().shape)}, "
                                     f"the parameter's shard {tuple(p.to_local().shape)}")
                if name == "step" and (group.get("fused") or group.get("capturable")):
                    state[name] = value.to(dtype=torch.float32, device=p.device)  # as torch's load_state_dict
            optimizer.state[p] = state
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: the optimizer state does not fit this optimizer ({e}); "
                              "resume with the same optimizer and model config") from e


# ----------------------------------------------------------- save and load
def write_recipe_state(
    output_dir: Path,
    label: str,
    rank: int,
    tensors: Dict[str, torch.Tensor],
    meta: Dict[str, Any],
    world_size: int,
    global_step: int,
    barrier: Callable[[], None],
    defer_commit: bool = False,
) -> Optional[Callable[[], None]]:
    """Every rank writes its shard into ``apex_recipe_state/<label>/``; once all are on
    disk, rank 0 points ``latest.json`` at it (temporary name, fsync, rename) and removes
    older states. A crash at any point leaves the previous state whole and current.

    With ``defer_commit``, rank 0 returns that last part (the commit) instead of running
    it, for whoever must finish something first (the stage's effective ranks); until it
    runs, a resume starts from the previous state. Other ranks return None."""
    root = Path(output_dir) / RECIPE_STATE_DIR
    folder = root / label
    if rank == 0:
        try:
            current = read_state_manifest(output_dir, quiet=True)
        except CheckpointError:  # a fresh run over a damaged state: replaced below
            current = None
        if current is not None and current["state"] == label:
            raise CheckpointError(f"{folder} is the current resume state; not overwriting it")
        if folder.exists():  # a save that a crash cut short
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    barrier()
    safetensors.torch.save_file(tensors, str(folder / f"rank_{rank}.safetensors"))
    with open(folder / f"rank_{rank}.safetensors", "rb+") as f:
        os.fsync(f.fileno())
    _write_synced(folder / f"rank_{rank}.json", json.dumps(meta).encode("utf-8"))
    barrier()
    if rank != 0:
        return None

    def commit() -> None:
        _fsync_dir(folder)
        manifest = {"format": STATE_FORMAT, "state": label, "world_size": world_size, "global_step": global_step}
        tmp = root / f".{STATE_MANIFEST}.tmp"
        _write_synced(tmp, json.dumps(manifest).encode("utf-8"))
        fault_point(f"state_renaming:{label}")
        os.replace(tmp, root / STATE_MANIFEST)
        _fsync_dir(root)
        for old in root.iterdir():
            if old.is_dir() and old.name != label:
                shutil.rmtree(old)

    if defer_commit:
        return commit
    commit()
    return None


def _read_json(path: Path, root: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"resume state {path} is unreadable (not JSON: {type(e).__name__}); it was not written by "
            f"apex_tune. Move {root} away to start over from the base model"
        ) from e


def read_state_manifest(output_dir: Path, quiet: bool = False) -> Optional[Dict[str, Any]]:
    """``latest.json`` of the last whole resume state, or None when there is none.

    A state that is unreadable or of another version is an error, never silently
    skipped: resuming from the wrong point would be worse than stopping.
    """
    root = Path(output_dir) / RECIPE_STATE_DIR
    path = root / STATE_MANIFEST
    legacy = Path(output_dir) / LEGACY_STATE_FILE
    if not path.exists():
        if legacy.exists() and not quiet:
            raise CheckpointError(
                f"{legacy} is a resume state of an older apex_tune (a pickle, which could run code when "
                "loaded): it is not loaded. Move it away to start over from the base model"
            )
        return None
    manifest = _read_json(path, root)
    if not (
        isinstance(manifest, dict)
        and manifest.get("format") == STATE_FORMAT
        and isinstance(manifest.get("world_size"), int)
        and isinstance(manifest.get("global_step"), int)
        and isinstance(manifest.get("state"), str)
        and re.fullmatch(r"[A-Za-z0-9_]+", manifest["state"])  # a folder in root, nothing else
    ):
        raise CheckpointError(
            f"resume state {path} is incomplete or of another version; move {root} away to start "
            "over from the base model"
        )
    return manifest


def load_rank_state(output_dir: Path, manifest: Dict[str, Any], rank: int) -> Dict[str, Any]:
    """This rank's part of the state ``manifest`` names: its JSON (``meta``) and tensors."""
    folder = Path(output_dir) / RECIPE_STATE_DIR / manifest["state"]
    tensor_file, meta_file = folder / f"rank_{rank}.safetensors", folder / f"rank_{rank}.json"
    for path in (tensor_file, meta_file):
        if not path.is_file():
            raise CheckpointError(f"resume state {path} is missing; move {folder.parent} away to start over")
    try:
        safetensors_header(tensor_file)
        tensors = safetensors.torch.load_file(str(tensor_file))
    except (InputError, safetensors.SafetensorError) as e:
        raise CheckpointError(
            f"resume state {tensor_file} is unreadable: {e}. Move {folder.parent} away to start over from "
            "the base model"
        ) from e
    meta = _read_json(meta_file, folder.parent)
    missing = set(STATE_KEYS) - set(meta if isinstance(meta, dict) else {})
    if missing or "rng" not in tensors:
        raise CheckpointError(f"resume state {meta_file} is incomplete (missing {sorted(missing)})")
    return {"meta": meta, "tensors": tensors, "where": str(tensor_file)}


# ------------------------------------------------------- the recipe's state
class Progress(NamedTuple):
    """Where a run is: epochs done, optimizer steps done (in all and in the current
    epoch) and the index of the current stage."""

    epochs_run: int
    global_step: int
    steps_in_epoch: int
    stage: int


class RestoredState(NamedTuple):
    """What :func:`restore_recipe_state` gives back to the recipe."""

    progress: Progress
    checkpoint: str  # the label of the save resumed from
    data_counts: Dict[str, int]


def save_recipe_state(
    output_dir: Path,
    label: str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataloader,
    ranker_state: Optional[dict],
    selection: Sequence[LayerSelection],
    data_counts: Dict[str, int],
    progress: Progress,
    epoch_done: bool,
    seed: int,
    total_steps: int,
    rank: int,
    world_size: int,
    defer_commit: bool = False,
) -> Optional[Callable[[], None]]:
    """Every rank saves its own shards (no gather) and rank 0 makes the state current
    (with ``defer_commit``: returns the commit, see :func:`write_recipe_state`).

    A save at an epoch's last step (``epoch_done``) resumes at the next epoch's start.
    The optimizer is saved as its local state dict, which reading never changes
    (torch's full-state helpers may take a step). ``ranker_state``: the scores summed
    over ranks, given by rank 0 only (the others restart from zero).
    """
    tensors = local_model_state(model)
    tensors["rng"] = torch.get_rng_state()
    if epoch_done:
        progress = progress._replace(epochs_run=progress.epochs_run + 1, steps_in_epoch=0)
    meta = {
        "progress": {"seed": seed, **progress._asdict(), "total_steps": total_steps,
                     "world_size": world_size, "checkpoint": label},
        "selection": [s.to_dict() for s in selection],
        "optimizer": local_optimizer_state(optimizer, tensors),
        "dataloader": None if epoch_done else encode(dataloader.state_dict(), tensors, "dataloader"),
        "ranker": None if ranker_state is None else encode(ranker_state, tensors, "ranker"),
        "data_counts": dict(data_counts),
    }
    return write_recipe_state(
        output_dir, label, rank, tensors, meta, world_size, progress.global_step, dist.barrier, defer_commit
    )


def find_resume_state(output_dir: Path, resume: bool, rank: int, world_size: int) -> Optional[Dict[str, Any]]:
    """This rank's part of the resume state in ``output_dir`` when ``resume`` is set and
    one is there (:func:`load_rank_state`), else None. Every rank must find the same
    state, saved with as many processes."""
    manifest = read_state_manifest(output_dir) if resume else None
    check_same_resume_point(None if manifest is None else manifest["global_step"], world_size, output_dir)
    if resume and manifest is None:
        utils.log_rank_zero(log, f"resume_from_checkpoint: no {RECIPE_STATE_DIR} in {output_dir}, starting fresh")
        return None
    if manifest is not None and manifest["world_size"] != world_size:
        raise ConfigError(
            f"the saved run used {manifest['world_size']} processes, this one {world_size}: "
            "resume with the same --nproc_per_node"
        )
    return load_rank_state(output_dir, manifest, rank) if manifest else None

def base_state_with_history(base_state: Dict[str, torch.Tensor], resumed: Optional[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """The base state plus, on resume, the saved frozen stages of a quantized base
    (replicated): the model needs their count before the saved shards load."""
    if not resumed:
        return base_state
    history = {k[len("model."):]: v for k, v in resumed["tensors"].items() if k.startswith("model.") and HISTORY in f".{k}"}
    return {**base_state, **history}


def restore_recipe_state(
    resumed: Dict[str, Any],
    output_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataloader,
    ranker,
    keep_ranker: bool,
    seed: int,
    total_steps: int,
) -> RestoredState:
    """Restore what :func:`save_recipe_state` saved (the model's shards are loaded
    before, :func:`load_local_model_state`). A state of another run (steps, seed) is a
    ConfigError; a damaged one a CheckpointError."""
    meta, tensors, where = resumed["meta"], resumed["tensors"], resumed["where"]
    try:
        progress = meta["progress"]
        if progress["total_steps"] != total_steps:
            raise ConfigError(
                f"the saved run has {progress['total_steps']} optimizer steps, this config gives "
                f"{total_steps}: resume with the same data, batch and epoch settings"
            )
        if progress["seed"] != seed:
            raise ConfigError(f"seed: the saved run used seed={progress['seed']}, this config seed={seed}")
        set_selection(model, [LayerSelection.from_dict(d) for d in meta["selection"]])
        load_local_optimizer_state(optimizer, meta["optimizer"], tensors, where)
        if meta["dataloader"] is not None:  # None: saved at an epoch end
            dataloader.load_state_dict(decode(meta["dataloader"], tensors, where))
        ranker.load_state_dict(decode(meta["ranker"], tensors, where), keep=keep_ranker)
        torch.set_rng_state(tensors["rng"])
        restored = Progress(*(int(progress[k]) for k in Progress._fields))
        return RestoredState(restored, str(progress["checkpoint"]), dict(meta["data_counts"]))
    except (ConfigError, CheckpointError):
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(
            f"resume state {where} does not fit this run ({type(e).__name__}: {e}); move "
            f"{Path(output_dir) / RECIPE_STATE_DIR} away to start over from the base model"
        ) from e


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
def unwrapped_state_dict(
    build_model: Callable[[], nn.Module],
    settings: ApexSettings,
    wrapped_state_dict: Dict[str, torch.Tensor],
    selection: List[LayerSelection],
    probe_tokens: Optional[torch.Tensor] = None,
) -> Tuple[Dict[str, torch.Tensor], Optional[float]]:
    """The plain model's state dict that a wrapped state dict fuses to, on CPU.

    ``wrapped_state_dict`` is in the base channel layout (a live model's, taken in its
    layout, through :func:`~apex_tune.modules.layout.base_layout_state_dict`).
    Rebuilds the wrapped model on the meta device (``build_model`` gives the base
    architecture in the run's dtype) around copies of the given tensors and fuses
    it with :func:`unwrap_apex`, leaving the live (possibly sharded) training model
    untouched. With ``probe_tokens`` also returns the
    relative difference of the fused model's logits from the wrapped model's.
    """
    with torch.device("meta"):
        model = build_model()
    settings = replace(settings, contiguous_channels=False)  # folded where the tensors are: no permutation
    apply_apex(model, settings)
    set_apex_trainable(model, settings)  # fp32 trained embeddings, used in the model's dtype
    if settings.quantize_base:  # the frozen stages the state holds; weights load dequantized
        from apex_tune.modules.nf4 import ensure_history_

        ensure_history_(model, wrapped_state_dict)
    tensors = {k: v.detach().clone() for k, v in wrapped_state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    materialize_apex_buffers_(model, torch.device("cpu"))
    set_selection(model, selection)
    difference = None
    if probe_tokens is not None:
        with torch.device("cpu"):
            build_rope_caches_(model)
        model.eval()
        wrapped_logits = model(probe_tokens.cpu())
    unwrap_apex(model)
    if probe_tokens is not None:
        difference = relative_difference(wrapped_logits, model(probe_tokens.cpu()))
    return model.state_dict(), difference


def plain_checkpoint_state(
    wrapped_state_dict: Dict[str, torch.Tensor],
    *,
    fold: bool,
    build_model: Callable[[], nn.Module],
    settings: ApexSettings,
    selection: List[LayerSelection],
    probe_tokens: torch.Tensor,
    dtype: torch.dtype,
    tolerance: float,
    label: str,
) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """The plain model to save from a gathered wrapped state dict (in the base channel
    layout, see :func:`unwrapped_state_dict`), in the run's dtype, and why it must not
    be saved (None when it may).

    ``fold``: fold a CPU copy (:func:`unwrapped_state_dict`), which must reproduce the
    wrapped model on the probe batch within ``tolerance``; otherwise the live model
    was just folded and its base weights are the plain model.
    """
    failure = None
    if fold:
        plain, difference = unwrapped_state_dict(build_model, settings, wrapped_state_dict, selection, probe_tokens)
        log.info(f"checkpoint {label}: fused-vs-wrapped difference {difference:.2e} on the probe batch")
        try:
            check_fusion(difference, tolerance, f"checkpoint {label}")
        except CheckpointError as e:
            failure = str(e)
    else:
        plain = {k: v for k, v in wrapped_state_dict.items() if param_kind(k) in ("base", "embeddings")}
    plain = {k: v.to(dtype) for k, v in plain.items()}  # trained embeddings are fp32
    if failure is None and not all(torch.isfinite(v).all() for v in plain.values()):
        failure = f"checkpoint {label}: the fused weights are not finite; nothing was saved"
    return plain, failure


@contextmanager
def _without_checkpointer_messages():
    """Drop the torchtune checkpointer's own log records (its logger is shared with everything in torchtune)."""
    drop = lambda record: not record.pathname.endswith(os.path.join("checkpointing", "_checkpointer.py"))  # noqa: E731
    logger = utils.get_logger()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def write_model_checkpoint(checkpointer, state_dict: Dict[str, torch.Tensor], output_dir: Path, label: str, step: int) -> Path:
    """Save through the torchtune checkpointer (in its format; it writes ``epoch_<step>``),
    then move the folder into place as ``output_dir/label``."""
    staging = Path(output_dir) / f"epoch_{step}"
    if staging.exists():  # left by a crash mid-write
        shutil.rmtree(staging)
    # The checkpointer names the staging folder in its messages; say where the files end up instead.
    with _without_checkpointer_messages():
        checkpointer.save_checkpoint({training.MODEL_KEY: state_dict}, epoch=step, intermediate_checkpoint=False)
    final = Path(output_dir) / label
    replace_dir(staging, final)
    size = sum(p.stat().st_size for p in final.iterdir()) / 1024**3
    log.info(f"model checkpoint {label} ({size:.2f} GiB, checkpointer format) saved to {final}")
    return final


def remove_unfinished_checkpoints(output_dir: Path, after_step: int, total_steps: int) -> None:
    """The staging folders (``epoch_<step>``) of saves after ``after_step`` that a crash cut short."""
    for step in range(after_step + 1, total_steps + 1):
        shutil.rmtree(Path(output_dir) / f"epoch_{step}", ignore_errors=True)
