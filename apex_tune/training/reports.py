"""What a config trains and what it needs, without loading weights: the reports behind
``apex-tune params`` (on the config's model built on the meta device)."""

from typing import Optional

import torch
from omegaconf import OmegaConf
from torchtune import config, training

from apex_tune.models.builders import builder_settings, uses_apex_model
from apex_tune.modules.config import ApexSchedule, parse_apex_config
from apex_tune.modules.model import apply_apex, set_apex_trainable, trainable_parameter_report
from apex_tune.training.memory_plan import memory_plan


def meta_model(cfg, dtype_name: Optional[str] = None):
    """The config's model on the meta device (no weights), wrapped and frozen as the
    recipe does; with its settings, schedule and dtype."""
    model_cfg = cfg.model
    if uses_apex_model(model_cfg):  # a torchtune recipe config
        base, settings, _ = builder_settings(OmegaConf.to_container(model_cfg, resolve=True))
        model_cfg = OmegaConf.create(base)
        schedule = ApexSchedule(num_stages=1)  # torchtune's own recipes train one stage
    else:
        settings, schedule = parse_apex_config(cfg.get("apex"))
    dtype = training.get_dtype(dtype_name or cfg.get("dtype", "fp32"), device=torch.device("cpu"))
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = config.instantiate(model_cfg)
    apply_apex(model, settings)
    set_apex_trainable(model, settings)
    return model, settings, schedule, dtype


def parameter_report(cfg) -> dict:
    """Trainable and frozen parameters of the config's wrapped model, by kind."""
    model, settings, _, _ = meta_model(cfg)
    report = trainable_parameter_report(model)
    report["settings"] = settings.to_dict()
    return report


def format_parameter_report(report: dict) -> str:
    lines = [
        f"base parameters:      {report['base_params']:>16,}",
        f"trainable parameters: {report['trainable_params']:>16,}  "
        f"({100 * report['trainable_fraction']:.3f}% of base)",
    ]
    for kind, counts in report["by_kind"].items():
        lines.append(
            f"  {kind:<11} trainable {counts['trainable']:>16,}  of {counts['total']:>16,}  "
            f"{'/'.join(counts['dtypes']) or '-':<14} {counts['bytes'] / 2**30:>9.3f} GiB"
        )
    for name, value in report["per_layer"].items():
        lines.append(f"per layer {name}: {value:,}")
    memory = report["memory"]
    lines.append(
        f"memory: weights {memory['weights_bytes'] / 2**30:.3f} GiB; training adds "
        f"{memory['gradient_and_adamw_bytes'] / 2**30:.3f} GiB (gradients and AdamW moments of the "
        f"trainable parameters), of which fp32 trainable parameters cost "
        f"{memory['fp32_trainable_extra_bytes'] / 2**30:.3f} GiB with their weights over the base dtype "
        "(before FSDP sharding, without activations)"
    )
    return "\n".join(lines)


def memory_plan_report(
    cfg,
    world_size: int,
    dtype: Optional[str] = None,
    batch_size: Optional[int] = None,
    seq_len: Optional[int] = None,
    activation_checkpointing: Optional[bool] = None,
    gpu_memory_gib: float = 80.0,
) -> dict:
    """The per-GPU memory plan of the config on ``world_size`` GPUs (apex_tune/training/memory_plan.py);
    the arguments left None come from the config."""
    model, settings, schedule, run_dtype = meta_model(cfg, dtype)
    seq_len = seq_len or cfg.get("tokenizer", {}).get("max_seq_len")
    if not seq_len:
        raise ValueError("tokenizer.max_seq_len is not set: give --seq-len")
    if activation_checkpointing is None:
        activation_checkpointing = bool(cfg.get("enable_activation_checkpointing", False))
    return memory_plan(
        model,
        settings,
        world_size=world_size,
        dtype=run_dtype,
        optimizer=cfg.optimizer._component_,
        num_stages=schedule.num_stages,
        batch_size=batch_size or cfg.batch_size,
        seq_len=seq_len,
        activation_checkpointing=activation_checkpointing,
        gpu_memory_gib=gpu_memory_gib,
    )
