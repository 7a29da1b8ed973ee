"""Per-GPU memory plan of an APEX run under FSDP2, from the meta-device model.

``apex-tune params --config NAME --world-size N [--dtype bf16]`` answers "does this
fit on N GPUs?" before anything is downloaded. What the recipe keeps per GPU:

- **exact** (byte counts of the meta-device model, as the recipe shards it):
  the frozen base in ``dtype``, sharded by FSDP2 over N ranks; an NF4 base
  (``apex.quantize_base``) is replicated instead (FSDP2 cannot shard NF4, see
  apex_tune/modules/nf4.py), and so are the frozen operators of earlier stages
  (counted at the last stage, where there are T - 1 of them); the trainable
  parameters in fp32, their fp32 gradients and the optimizer state, sharded.
  FSDP2 shards every tensor along dim 0 into ``ceil(dim0 / N)`` rows per rank
  (rank 0 holds the largest shard; that is the number given).
- **estimated**: FSDP2's working set (the root unit, embeddings and output head, stays
  unsharded through the step; two decoder layers unsharded at a time, the one
  computing and the one prefetched; one unit's fp32 gradients whole before their
  reduce-scatter) and activations from a formula (see :func:`activation_bytes`; it
  models the wrappers over a dense base, not QAPEX's, which dequantize per forward).

Not counted: the CUDA context and NCCL buffers (about 1 GiB per GPU), allocator
fragmentation, and a mid-stage fused checkpoint, which rank 0 builds in CPU memory.
"""

import math
from typing import Dict, Optional

import torch
from torch import nn
from torchtune.modules import TransformerSelfAttentionLayer

from apex_tune.modules.geometry import CHANNELS, HEADS, KINDS, find_apex_layers, param_kind, wrapped_layers
from apex_tune.modules.config import ApexSettings
from apex_tune.modules.nf4 import grow_history_

GIB = 1024**3
FP32 = 4
# Optimizer state bytes per trainable element (fp32 moments; torchao's low-bit ones
# hold 1 or 0.5 byte per element plus one fp32 scale per block of 256 / 128, and keep
# tensors under 4096 elements in fp32: a slight undercount for those).
OPTIMIZER_STATE_BYTES = {
    "torch.optim.AdamW": 2 * FP32,
    "torch.optim.Adam": 2 * FP32,
    "torch.optim.SGD": FP32,  # the momentum buffer (none without momentum: an upper bound)
    "torchao.optim.AdamW8bit": 2 * (1 + FP32 / 256),
    "torchao.optim.AdamWFp8": 2 * (1 + FP32 / 256),
    "torchao.optim.AdamW4bit": 2 * (0.5 + FP32 / 128),
}


def _tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor; an NF4 tensor counts its codes, scalers and tables."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _shard_elements(shape, world_size: int) -> int:
    """Elements of rank 0's FSDP2 shard: ceil(dim0 / N) rows of the rest."""
    if len(shape) == 0:
        return 1
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / world_size) * rest


def _fsdp_units(model: nn.Module):
    """The (name, parameter) pairs of each FSDP unit as the recipe wraps the model: one
    per decoder layer, then the root (embeddings, final norm, output head)."""
    units, seen = [], set()
    for prefix, module in model.named_modules():
        if isinstance(module, TransformerSelfAttentionLayer):
            named = [(f"{prefix}.{n}", p) for n, p in module.named_parameters()]
            seen.update(id(p) for _, p in named)
            units.append(named)
    units.append([(n, p) for n, p in model.named_parameters() if id(p) not in seen])
    return units


def activation_bytes(
    *,
    tokens: int,
    num_layers: int,
    embed_dim: int,
    kv_dim: int,
    intermediate_dim: int,
    vocab_size: int,
    dtype_bytes: int,
    activation_checkpointing: bool,
    ratio_heads: float,
    ratio_channels: float,
    tuned_heads: float,
    tuned_channels: float,
    delta: bool,
    train_embeddings: bool,
) -> Dict[str, int]:
    """An estimate of what one micro-batch keeps for backward (bytes).

    Counted from the tensors autograd saves in a forward pass of a wrapped torchtune
    Llama (``tests/training/test_memory_plan.py`` checks it against them). h: embed_dim, kv:
    K/V width, i: intermediate_dim, K_h / K_c: K as a fraction of the head units /
    channels (``apex.ratio_heads`` / ``ratio_channels``, 0 for a kind that is off),
    r_h / r_c: the tuned fraction of head units / channels (2K, P and N, without the delta). Per layer and token, in
    ``dtype`` elements: the frozen base's q, k and v (torchtune expands K/V to every
    query head), attention output and FFN w1, w3, gate outputs, 4h + 3i (frozen
    projections keep no inputs); APEX's gathered slices, the column wrappers' (v, w1,
    w3: the tuned outputs and the Monarch's intermediates) r_h kv + K_h kv + 2 r_c i +
    2 K_c i and the row wrappers' (output_proj, w2: a copy of the N inputs and the
    Monarch's two intermediates on them) 3 K_h h + 3 K_c i; with the delta
    also the normed inputs and the row wrappers' mixed inputs, 2h + r_h h + r_c i; plus
    both norms' inputs in fp32 (8h bytes). No weight slices (the row wrappers act on
    their inputs) and no scattered copies (the wrappers write the tuned entries back
    keeping only their index).

    Without activation checkpointing every layer keeps all of it; with it (one
    checkpoint per layer) each keeps its input (h per token) and one layer at a time
    is recomputed whole. The model keeps the final norm's fp32 input (and the output
    head's input when it trains), and the loss the logits and their fp32 log-softmax
    (torchtune's chunked cross-entropy): tokens x vocab x (dtype + 4) bytes.
    """
    h, kv, i, K_h, K_c = embed_dim, kv_dim, intermediate_dim, ratio_heads, ratio_channels
    per_token = 4 * h + 3 * i
    per_token += tuned_heads * kv + K_h * kv + 2 * tuned_channels * i + 2 * K_c * i
    per_token += 3 * K_h * h + 3 * K_c * i
    if delta:
        per_token += 2 * h + tuned_heads * h + tuned_channels * i
    layer = round(tokens * (per_token * dtype_bytes + 2 * h * FP32))
    if activation_checkpointing:
        layers = num_layers * tokens * h * dtype_bytes + layer
    else:
        layers = num_layers * layer
    layers += tokens * (h * FP32 + (h * dtype_bytes if train_embeddings else 0))
    logits = tokens * vocab_size * (dtype_bytes + FP32)
    return {"decoder_layers": int(layers), "logits_and_loss": int(logits)}


def saved_bytes_of_forward(model: nn.Module, *inputs) -> int:
    """Measured: bytes of the distinct storages autograd saves in one forward of
    ``model(*inputs)`` (parameters excluded), what :func:`activation_bytes` estimates.
    A tensor subclass (an NF4 weight) is a parameter, counted by its storages elsewhere."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if not hasattr(p, "__tensor_flatten__")}
    saved = {}

    def pack(t):
        if not hasattr(t, "__tensor_flatten__"):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(saved.values())


def parameter_copy_bytes(model: nn.Module, dtype_bytes: int, activation_checkpointing: bool) -> int:
    """Bytes of the ``dtype`` copies of fp32 trainable parameters that autograd keeps.

    Under a bf16 base the wrappers cast their fp32 parameters to bf16 where they are
    used (``param.to(x.dtype)``), and the matmuls keep those copies for backward: per
    wrapper, its own ``b`` and delta, and the layer's shared M and ``a`` once per wrapper
    that mixes with them (2 for heads: v_proj, output_proj; 3 for channels: w1, w3, w2),
    an upper bound since some uses keep no copy; and a trained output head's weight (or
    the tied embedding read as one). With activation checkpointing one layer's copies
    live at a time. None under fp32 (no cast, no copy).
    """
    if dtype_bytes >= FP32:
        return 0
    per_layer = []
    for layer in wrapped_layers(model):
        elements = 0
        for kind in KINDS:
            expansion = layer.expansion(kind)
            wrappers = layer.wrappers(kind)
            if expansion is not None:
                mixing = sum(w.expansion is expansion for w in wrappers)
                elements += mixing * sum(p.numel() for p in expansion.parameters() if p.requires_grad)
            for wrapper in wrappers:
                elements += sum(p.numel() for n, p in wrapper.named_parameters() if p.requires_grad)
        per_layer.append(elements * dtype_bytes)
    layers = max(per_layer, default=0) if activation_checkpointing else sum(per_layer)
    output = getattr(model, "output", None)
    head = output.weight if isinstance(output, nn.Linear) else getattr(model.tok_embeddings, "weight", None)
    head_bytes = head.numel() * dtype_bytes if head is not None and head.requires_grad else 0
    return layers + head_bytes


def memory_plan(
    model: nn.Module,
    settings: ApexSettings,
    *,
    world_size: int,
    dtype: torch.dtype,
    optimizer: str,
    num_stages: int,
    batch_size: int,
    seq_len: int,
    activation_checkpointing: bool,
    gpu_memory_gib: Optional[float] = None,
) -> dict:
    """The plan for a wrapped meta-device ``model`` (``apply_apex`` + ``set_apex_trainable``
    done, base built in ``dtype``). Returns bytes per GPU by item, and totals. Over a
    quantized base it first gives ``model`` its T - 1 frozen stages, to count them."""
    if world_size < 1:
        raise ValueError(f"--world-size {world_size}: must be at least 1")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(
            f"optimizer._component_={optimizer}: no memory plan for it; known: {', '.join(OPTIMIZER_STATE_BYTES)}"
        )
    if settings.quantize_base and num_stages > 1:
        grow_history_(model, num_stages - 1)  # the most it holds: T - 1 at the last stage
    dtype_bytes = torch.empty((), dtype=dtype).element_size()

    items = {k: 0 for k in ("frozen_base_sharded", "frozen_base_replicated", "frozen_stages_replicated",
                            "trainable_params", "gradients", "optimizer_states")}
    trainable_tensors = 0
    for name, p in model.named_parameters():  # shared parameters are listed once
        if param_kind(name) == "history":
            items["frozen_stages_replicated"] += _tensor_bytes(p)
        elif p.requires_grad:
            shard = _shard_elements(p.shape, world_size)
            items["trainable_params"] += shard * FP32  # fp32 master weights (issue #9)
            items["gradients"] += shard * FP32
            items["optimizer_states"] += int(shard * OPTIMIZER_STATE_BYTES[optimizer])
            trainable_tensors += 1
        elif hasattr(p, "__tensor_flatten__"):  # NF4: kept whole on every rank
            items["frozen_base_replicated"] += _tensor_bytes(p)
        else:
            items["frozen_base_sharded"] += _shard_elements(p.shape, world_size) * dtype_bytes
    if optimizer.startswith("torch.optim.Adam"):
        items["optimizer_states"] += trainable_tensors * FP32  # the per-tensor step count

    # FSDP2 working set: the root unit (embeddings, norm, output head) stays unsharded
    # for the whole step (FSDP2 does not reshard the root after forward); decoder layers
    # are all-gathered two at a time (the one computing and the one prefetched); one
    # unit's gradients are whole before their reduce-scatter. Gathered in their dtype
    # (fp32 if trained); NF4 weights and frozen stages are never all-gathered.
    def unit_bytes(named_params):
        gathered = sum(p.numel() * (FP32 if p.requires_grad else dtype_bytes) for n, p in named_params
                       if not hasattr(p, "__tensor_flatten__") and param_kind(n) != "history")
        grads = sum(p.numel() * FP32 for _, p in named_params if p.requires_grad)
        return gathered, grads

    *layer_units, root_unit = [unit_bytes(u) for u in _fsdp_units(model)]
    working = root_unit[0] + 2 * max(g for g, _ in layer_units) + max(g for _, g in [*layer_units, root_unit])

    layers = find_apex_layers(model)
    attn = layers[0].attn
    kv_dim = attn.num_kv_heads * attn.head_dim
    embed_dim = attn.embed_dim
    intermediate_dim = layers[0].mlp.w1.out_features
    vocab_size = next(m for m in model.modules() if isinstance(m, nn.Embedding)).num_embeddings
    # Per kind, K and the tuned units (N, P and, with the delta, E) as fractions of the
    # layer's units, from the same rounding the wrappers were built with (0 for a kind
    # that is off).
    fraction = {}
    for kind in KINDS:
        units = layers[0].num_units(kind)
        k = settings.expanded_units(units, kind)
        fraction[kind] = (k / units, (2 * k + settings.extra_units(units, kind)) / units)
    activations = activation_bytes(
        tokens=batch_size * seq_len,
        num_layers=len(layers),
        embed_dim=embed_dim,
        kv_dim=kv_dim,
        intermediate_dim=intermediate_dim,
        vocab_size=vocab_size,
        dtype_bytes=dtype_bytes,
        activation_checkpointing=activation_checkpointing,
        ratio_heads=fraction[HEADS][0],
        ratio_channels=fraction[CHANNELS][0],
        tuned_heads=fraction[HEADS][1],
        tuned_channels=fraction[CHANNELS][1],
        delta=settings.delta,
        train_embeddings=settings.train_embeddings,
    )
    activations["parameter_copies"] = parameter_copy_bytes(model, dtype_bytes, activation_checkpointing)
    exact = sum(items.values())
    estimated = working + sum(activations.values())
    plan = {
        "world_size": world_size,
        "dtype": str(dtype).replace("torch.", ""),
        "optimizer": optimizer,
        "micro_batch": {"batch_size": batch_size, "seq_len": seq_len,
                        "activation_checkpointing": activation_checkpointing},
        "exact_bytes": items,
        "estimated_bytes": {"fsdp_working_set": int(working), **activations},
        "total_exact_bytes": exact,
        "total_bytes": exact + estimated,
    }
    if gpu_memory_gib is not None:
        plan["gpu_memory_gib"] = gpu_memory_gib
        plan["fits"] = plan["total_bytes"] <= gpu_memory_gib * GIB
    return plan


def format_plan(plan: dict) -> str:
    """The plan as a table in GiB."""
    mb = plan["micro_batch"]
    lines = [
        f"per-GPU memory plan: FSDP2 over {plan['world_size']} GPUs, base in {plan['dtype']}, "
        f"trainable in fp32, {plan['optimizer']}",
        "exact (rank 0's shards):",
    ]
    for name, value in plan["exact_bytes"].items():
        lines.append(f"  {name:<26} {value / GIB:>9.2f} GiB")
    ac = "with" if mb["activation_checkpointing"] else "without"
    lines.append(f"estimated (micro-batch {mb['batch_size']} x {mb['seq_len']} tokens, {ac} activation checkpointing):")
    for name, value in plan["estimated_bytes"].items():
        lines.append(f"  {name:<26} {value / GIB:>9.2f} GiB")
    lines.append(f"total exact                  {plan['total_exact_bytes'] / GIB:>9.2f} GiB")
    lines.append(f"total with estimates         {plan['total_bytes'] / GIB:>9.2f} GiB")
    if "fits" in plan:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"{verdict} in {plan['gpu_memory_gib']:g} GiB per GPU (CUDA context and fragmentation not counted)")
    return "\n".join(lines)
