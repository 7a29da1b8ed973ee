"""The recipe's memory switches: what runs where, and a clear refusal where it cannot.

==================================  ===========  ==============================================
switch                              runs on      notes
==================================  ===========  ==============================================
``apex.quantize_base``              CPU, GPU     NF4 base, deferred fusion (apex_tune.modules.nf4)
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

The recipe keeps exact resume with the torchao low-bit optimizers: every rank
saves its own shard of their codes and scales as they are (apex_tune.training.checkpointing;
quantizing a dequantized state again would not be exact).
"""

import contextlib

import torch
from torch import nn
from torchtune import training

LOW_BIT_OPTIMIZERS = ("torchao.optim.AdamW8bit", "torchao.optim.AdamW4bit", "torchao.optim.AdamWFp8")
CUDA_ONLY_OPTIMIZERS = {
    "torchao.optim.CPUOffloadOptimizer": "it offloads optimizer states and the step from the GPU to the host",
    "torchao.prototype.low_bit_optim.CPUOffloadOptimizer": "it offloads optimizer states and the step from the GPU to the host",
    "bitsandbytes.optim.": "bitsandbytes' optimizers run CUDA kernels",
}


def check_memory_options(
    device: torch.device, *, activation_offloading: bool, activation_checkpointing: bool, optimizer: str
) -> None:
    """Refuse, with what to change, a memory switch the run's device cannot use
    (``optimizer``: the optimizer's ``_component_`` path)."""
    if activation_offloading:
        if device.type != "cuda":
            raise ValueError(
                f"enable_activation_offloading=True needs a CUDA GPU (device={device.type}): "
                "torchtune's OffloadActivations moves activations to pinned host memory on CUDA "
                "streams. Set enable_activation_offloading=False (enable_activation_checkpointing "
                "works on CPU)"
            )
        if not activation_checkpointing:
            raise ValueError(
                "enable_activation_offloading=True needs enable_activation_checkpointing=True "
                "(as in torchtune's recipes: it offloads the checkpointed layer inputs)"
            )
    if device.type != "cuda":
        for prefix, why in CUDA_ONLY_OPTIMIZERS.items():
            if optimizer == prefix or (prefix.endswith(".") and optimizer.startswith(prefix)):
                raise ValueError(
                    f"optimizer._component_={optimizer} needs a CUDA GPU (device={device.type}): "
                    f"{why}. On CPU use torch.optim.AdamW or one of {', '.join(LOW_BIT_OPTIMIZERS)}"
                )


def activation_offloading(model: nn.Module, enabled: bool):
    """torchtune's activation-offloading context (a null context when off)."""
    if not enabled:
        return contextlib.nullcontext()
    return training.get_act_offloading_ctx_manager(model, True)

