"""Distributed set-up of an APEX run: the process group, torchrun's restart pitfalls,
FSDP2 sharding with the base loaded into the shards, and the checks that every rank
agrees (resume point, selection)."""

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchtune import modules, training, utils

from apex_tune.modules.model import param_kind
from apex_tune.modules.nf4 import ensure_history_, load_from_full_model_state_dict, shard_model
from apex_tune.modules.selection import LayerSelection
from apex_tune.training.run_options import ConfigError, TrainingFault

log = utils.get_logger("INFO")


def init_process_group(device: torch.device, timeout_seconds: float) -> None:
    """torchrun sets the rendezvous; a plain ``tune run`` is a group of one."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    # A bounded timeout: a rank stuck in a collective fails instead of hanging forever.
    dist.init_process_group(
        training.get_distributed_backend(device.type), timeout=timedelta(seconds=timeout_seconds)
    )


def check_elastic_launch(resume: bool) -> None:
    """Warn about torchrun ``--max-restarts`` set-ups whose restarts cannot work.

    torchrun re-runs the same command after a failure; that continues the run only
    with ``resume_from_checkpoint=True``. And with torchrun's default shared
    rendezvous store, restarted workers can read the previous attempt's addresses
    and fail to connect (pytorch/pytorch#135712); the launcher needs
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which gives every attempt a new store.
    """
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) < 1 or os.environ.get("RANK") != "0":
        return
    if not resume:
        log.warning("torchrun --max-restarts: a restart starts the run over; set resume_from_checkpoint=True")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        log.warning(
            "torchrun --max-restarts with the shared rendezvous store: restarted workers may fail to "
            "connect (pytorch/pytorch#135712); launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
        )


def _everyone(value, world_size: int) -> list:
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def check_same_resume_point(global_step: Optional[int], world_size: int, output_dir: Path) -> None:
    """Every rank must resume from the same saved step (or all start fresh): on
    several nodes ``output_dir`` has to be one folder that every node reads."""
    everyone = _everyone(global_step, world_size)
    if len(set(everyone)) > 1:
        steps = ", ".join(f"rank {r}: {'none' if s is None else f'step {s}'}" for r, s in enumerate(everyone))
        raise ConfigError(
            f"output_dir: the ranks found different resume states in {output_dir} ({steps}); "
            "on several nodes output_dir must be a shared folder (NFS, Lustre, a shared volume)"
        )


def check_same_selection(selection: List[LayerSelection], world_size: int) -> None:
    """Every rank must have chosen the same units (their scores were all-reduced)."""
    everyone = _everyone([s.to_dict() for s in selection], world_size)
    if any(other != everyone[0] for other in everyone):
        raise TrainingFault("ranks disagree on the APEX selection; their scores were not summed alike")


def shard_apex_model(
    model: nn.Module, device: torch.device, dtype: torch.dtype, world_size: int, reshard_after_forward: bool
) -> None:
    """FSDP2 over all ranks, one unit per decoder layer (NF4 weights kept out of FSDP,
    apex_tune/modules/nf4.py); then the RoPE caches, which are not in the state dict."""
    mesh = dist.device_mesh.init_device_mesh(device.type, (world_size,))
    shard_model(
        model=model,
        shard_conditions=[lambda name, m: isinstance(m, modules.TransformerSelfAttentionLayer)],
        cpu_offload=False,
        reshard_after_forward=reshard_after_forward,
        dp_mesh=mesh,
    )
    with training.set_default_dtype(dtype), device:
        build_rope_caches_(model)


def build_rope_caches_(model: nn.Module) -> None:
    """(Re)build the RoPE caches of a model built on the meta device, on the current
    default device and dtype: they are buffers outside the state dict, so no load fills them."""
    for m in model.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()


def load_base_state(model: nn.Module, state_dict: Dict[str, torch.Tensor], device: torch.device) -> None:
    """Load a full base state dict into the sharded wrapped model; APEX parameters the
    checkpoint lacks get zeros (initialised afterwards). A checkpoint that does not fit
    the model is a ConfigError naming the first misfit."""
    full_sd = dict(state_dict)
    ensure_history_(model, full_sd)  # frozen stages of a quantized base, on resume
    expected = model.state_dict()
    unexpected = sorted(set(full_sd) - set(expected))
    if unexpected:
        raise ConfigError(
            f"checkpointer: the checkpoint has keys the model does not ({unexpected[:3]}...): "
            "do checkpointer.model_type and model match?"
        )
    for name, value in expected.items():
        if name in full_sd:
            if tuple(full_sd[name].shape) != tuple(value.shape):
                raise ConfigError(
                    f"checkpointer: tensor {name} has shape {tuple(full_sd[name].shape)} in the "
                    f"checkpoint, the model expects {tuple(value.shape)}: does the model config "
                    "match the checkpoint?"
                )
        elif param_kind(name) in ("operators", "vectors", "deltas"):
            full_sd[name] = torch.zeros(value.shape, dtype=value.dtype)  # re-initialised by the caller
        else:
            raise ConfigError(f"checkpointer: the checkpoint lacks base weight {name}")
    load_from_full_model_state_dict(model, full_sd, device, strict=True)
