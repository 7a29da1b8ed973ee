"""Read and write parameters whole, whether plain tensors, FSDP2 shards or NF4 weights.

Fusion and operator resets happen outside forward, where FSDP2 parameters are
sharded DTensors. Every rank computes the same full value, then keeps its shard.
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import training


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered if it is a DTensor), detached."""
    if isinstance(t, DTensor):
        return t.detach().full_tensor()
    return t.detach()


def local_value(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: its shard if it is a DTensor, else ``t``; detached."""
    return (t.to_local() if isinstance(t, DTensor) else t).detach()


def collective_device() -> torch.device:
    """Where tensors for a collective of the default process group live: the current
    GPU under NCCL, the CPU otherwise (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_meta(t: torch.Tensor) -> bool:
    """Whether ``t`` (or its local shard) is on the meta device: nothing to read or move yet."""
    return local_value(t).is_meta


def is_nf4(t: torch.Tensor) -> bool:
    return isinstance(t, NF4Tensor)


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight in its original dtype, whether NF4 (``quantize_base``), sharded or plain."""
    if isinstance(weight, DTensor) and is_nf4(weight._local_tensor):
        weight = training._distributed._gather_nf4_tensor(weight)
    if is_nf4(weight):
        return weight.get_original_weight()
    return full_value(weight)


@torch.no_grad()
def assign_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full ``value`` into ``param`` in place, keeping only the local shard."""
    if isinstance(param, DTensor):
        local = distribute_tensor(
            value.to(param.dtype), param.device_mesh, param.placements
        ).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(value)
