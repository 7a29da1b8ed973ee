"""The recipe's memory switches: what runs where, and a clear refusal where it cannot.

==================================  ===========  ==============================================
switch                              runs on      notes
==================================  ===========  ==============================================
``apex.quantize_base``              CPU, GPU     NF4 base, deferred fusion (apex_tune.quantization)
``enable_activation_checkpointing`` CPU, GPU     torchtune's, one checkpoint per decoder layer
``enable_activation_offloading``    CUDA only    torchtune's ``OffloadActivations`` (CUDA streams,
                                                 pinned host memory); needs activation
                                                 checkpointing, as torchtune's recipes require
``optimizer._component_:``          CPU, GPU     8-bit / 4-bit / FP8 Adam states; the step is
``torchao.optim.AdamW8bit``,                     ``torch.compile``-d (the first step compiles,
``AdamW4bit``, ``AdamWFp8``                      with the system C++ compiler on CPU); they
                                                 quantize only tensors of >= 4096 elements
``torchao.optim.CPUOffloadOptimizer``  CUDA only  moves states and the step to the host
``bitsandbytes.optim.*``            CUDA only    paged / 8-bit optimizers of bitsandbytes
==================================  ===========  ==============================================

The recipe keeps exact resume with the torchao low-bit optimizers: a full
state dict cannot re-shard torchao's quantized state tensors, so
:func:`load_from_full_optimizer_state_dict` loads them dequantized, then copies
their saved codes and scales back (quantizing again would not be exact: the
signed 8/4-bit code books do not map a dequantized block onto itself).
"""

import contextlib
import math
from typing import Any, Dict, Tuple

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torchtune import training

LOW_BIT_OPTIMIZERS = ("torchao.optim.AdamW8bit", "torchao.optim.AdamW4bit", "torchao.optim.AdamWFp8")
CUDA_ONLY_OPTIMIZERS = {
    "torchao.optim.CPUOffloadOptimizer": "it offloads optimizer states and the step from the GPU to the host",
    "torchao.prototype.low_bit_optim.CPUOffloadOptimizer": "it offloads optimizer states and the step from the GPU to the host",
    "bitsandbytes.optim.": "bitsandbytes' optimizers run CUDA kernels",
}


def check_memory_options(cfg: DictConfig, device: torch.device) -> None:
    """Refuse, with what to change, a memory switch the run's device cannot use."""
    if cfg.get("enable_activation_offloading", False):
        if device.type != "cuda":
            raise ValueError(
                f"enable_activation_offloading=True needs a CUDA GPU (device={device.type}): "
                "torchtune's OffloadActivations moves activations to pinned host memory on CUDA "
                "streams. Set enable_activation_offloading=False (enable_activation_checkpointing "
                "works on CPU)"
            )
        if not cfg.get("enable_activation_checkpointing", False):
            raise ValueError(
                "enable_activation_offloading=True needs enable_activation_checkpointing=True "
                "(as in torchtune's recipes: it offloads the checkpointed layer inputs)"
            )
    component = str((cfg.get("optimizer") or {}).get("_component_", ""))
    if device.type != "cuda":
        for prefix, why in CUDA_ONLY_OPTIMIZERS.items():
            if component == prefix or (prefix.endswith(".") and component.startswith(prefix)):
                raise ValueError(
                    f"optimizer._component_={component} needs a CUDA GPU (device={device.type}): "
                    f"{why}. On CPU use torch.optim.AdamW or one of {', '.join(LOW_BIT_OPTIMIZERS)}"
                )


def activation_offloading(model: nn.Module, enabled: bool):
    """torchtune's activation-offloading context (a null context when off)."""
    if not enabled:
        return contextlib.nullcontext()
    return training.get_act_offloading_ctx_manager(model, True)


def _low_bit(t: Any) -> bool:
    local = t.to_local() if isinstance(t, DTensor) else t
    return hasattr(local, "dequantize") and type(local).__module__.startswith("torchao.optim")


def _local_range(p: torch.Tensor) -> Tuple[int, int]:
    """(first element, element count) of this rank's shard of ``p`` in its flat row-major order."""
    if not isinstance(p, DTensor):
        return 0, p.numel()
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
    return offset[0] * row if p.dim() else 0, math.prod(local_shape)


def _fill_from_full(buffer: torch.Tensor, full: torch.Tensor, p: torch.Tensor) -> None:
    """Copy the codes and scales of a whole low-bit state into this rank's state shard, as
    they are: quantizing a dequantized state again is not exact for the signed 8/4-bit maps."""
    local = buffer.to_local() if isinstance(buffer, DTensor) else buffer
    start, count = _local_range(p)
    names, _ = local.__tensor_flatten__()
    for name in names:
        mine, whole = getattr(local, name), getattr(full, name)
        if mine.numel() == whole.numel():  # unsharded, or per-tensor (the code book)
            mine.copy_(whole.view(mine.shape))
            continue
        per = p.numel() // whole.numel()  # elements per entry: 1 (codes), 2 (4-bit codes), block (scales)
        mine.copy_(whole.reshape(-1)[start // per : (start + count) // per].view(mine.shape))


@torch.no_grad()
def load_from_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any], device: torch.device
) -> None:
    """torchtune's ``training.load_from_full_optimizer_state_dict``, also for torchao's
    low-bit optimizers, whose whole quantized states a full state dict cannot re-shard:
    they are loaded dequantized, then their exact codes and scales are copied back."""
    raw: Dict[Tuple[str, str], torch.Tensor] = {}
    plain_state = dict(state)
    plain_state["state"] = {}
    for fqn, param_state in state.get("state", {}).items():
        plain_state["state"][fqn] = dict(param_state)
        for key, value in param_state.items():
            if _low_bit(value):
                raw[(fqn, key)] = value
                plain_state["state"][fqn][key] = value.dequantize()
    training.load_from_full_optimizer_state_dict(model, optimizer, plain_state, device)
    if not raw:
        return
    signed = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}
    for fqn, p in model.named_parameters():
        param_state = optimizer.state.get(p, {})
        for key in signed:
            if (fqn, key) in raw and key in param_state:
                buffer = optimizer._new_buffer(p, signed[key])
                _fill_from_full(buffer, raw[(fqn, key)], p)
                param_state[key] = buffer
