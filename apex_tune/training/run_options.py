"""The ``apex_finetune`` recipe's run options: read and checked before anything runs,
and every config mistake turned into one line that names the field and the fix.

:func:`read_run_options` checks the plain fields; :func:`load_base_checkpoint`,
:func:`build_tokenizer` and :func:`build_dataset` build from the config, checking the
files they read (``apex_tune.training.inputs``) and naming the config section that
failed (:func:`config_step`). The recipe's ``main`` prints a :class:`ConfigError` as
``apex_finetune: config error: ...`` and a :class:`TrainingFault` or a
``CheckpointError`` as ``apex_finetune: stopped: ...`` (:func:`exit_with_one_line`).
"""

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig, ListConfig
from torchtune import config, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.datasets import ConcatDataset

from apex_tune.modules.config import ApexSchedule, ApexSettings, parse_apex_config
from apex_tune.training.inputs import (
    InputError,
    check_data_file,
    check_finite,
    check_hf_config,
    check_weight_files,
    dataset_columns,
    model_dims,
    tokenizer_error,
)
from apex_tune.training.memory_options import check_memory_options


class ConfigError(ValueError):
    """A problem with the run's configuration or inputs, found before training."""


class TrainingFault(RuntimeError):
    """Training stopped on purpose: a non-finite value or a failed fusion check."""


@contextmanager
def config_step(field: str, fix: str):
    """Turn the errors of building ``field`` into one ConfigError that names it."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{field}: {type(exc).__name__}: {exc}. {fix}") from exc


# How long ranks other than 0 wait before exiting on a config error, so that rank 0's line
# is printed before torchrun stops the workers (it does so as soon as one exits). Rank 0
# prints within milliseconds of the error every rank meets; the wait only has to outlast
# scheduling noise on a loaded machine.
OTHER_RANKS_EXIT_DELAY_S = 2.0


def exit_with_one_line(error: Exception, program: str = "apex_finetune") -> None:
    """One clear line, not a traceback (the run's inputs or state, not a bug), then exit 1."""
    kind = "config error" if isinstance(error, ConfigError) else "stopped"
    message = " ".join(str(error).split())
    if os.environ.get("RANK", "0") == "0":  # every rank meets the same error: say it once
        print(f"{program}: {kind}: {message}", file=sys.stderr, flush=True)
    else:  # torchrun stops every worker once one exits: let rank 0 say it first
        time.sleep(OTHER_RANKS_EXIT_DELAY_S)
    sys.exit(1)


@dataclass(frozen=True)
class RunOptions:
    """The plain fields of a run, checked (see README "Configuration")."""

    device: torch.device
    dtype: torch.dtype
    settings: ApexSettings
    schedule: ApexSchedule
    output_dir: Path
    batch_size: int
    gradient_accumulation_steps: int
    epochs: int
    max_steps_per_epoch: Optional[int]
    clip_grad_norm: Optional[float]
    log_every_n_steps: int
    save_every_n_steps: Optional[int]
    on_nonfinite: str
    fusion_check_tolerance: Optional[float]
    resume: bool
    compile: bool
    activation_checkpointing: bool
    activation_offloading: bool
    reshard_after_forward: bool
    distributed_timeout_seconds: float

    @property
    def fusion_tolerance(self) -> float:
        """How far a fused model may be from the wrapped one on the probe batch (relative):
        the config's, else rounding of the run's dtype with a wide margin."""
        if self.fusion_check_tolerance is not None:
            return float(self.fusion_check_tolerance)
        return 1e-3 if self.dtype == torch.float32 else 5e-2


def read_run_options(cfg: DictConfig) -> RunOptions:
    """The run's options, or a ConfigError naming the first field that is wrong."""
    device = utils.get_device(device=cfg.device)
    dtype = training.get_dtype(cfg.dtype, device=device)
    if dtype == torch.float16:
        raise ConfigError("dtype=fp16 is not supported; use bf16 or fp32")
    try:
        settings, schedule = parse_apex_config(cfg.get("apex"))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    save_every = cfg.get("save_every_n_steps", None)
    if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
        raise ConfigError(
            f"save_every_n_steps={save_every!r} must be a positive integer or null (save only at stage ends)"
        )
    for name in ("batch_size", "gradient_accumulation_steps", "epochs"):
        if not isinstance(cfg.get(name), int) or cfg.get(name) < 1:
            raise ConfigError(f"{name}={cfg.get(name)!r} must be a positive integer")
    on_nonfinite = cfg.get("on_nonfinite", "stop")
    if on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"on_nonfinite={on_nonfinite!r} must be 'stop' or 'skip'")
    options = RunOptions(
        device=device,
        dtype=dtype,
        settings=settings,
        schedule=schedule,
        output_dir=Path(cfg.output_dir),
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        epochs=cfg.epochs,
        max_steps_per_epoch=cfg.get("max_steps_per_epoch", None),
        clip_grad_norm=cfg.get("clip_grad_norm", None),
        log_every_n_steps=cfg.get("log_every_n_steps", 1),
        save_every_n_steps=save_every,
        on_nonfinite=on_nonfinite,
        fusion_check_tolerance=cfg.get("fusion_check_tolerance", None),
        resume=cfg.get("resume_from_checkpoint", False),
        compile=cfg.get("compile", False),
        activation_checkpointing=cfg.get("enable_activation_checkpointing", False),
        activation_offloading=cfg.get("enable_activation_offloading", False),
        reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
        distributed_timeout_seconds=cfg.get("distributed_timeout_seconds", 600),
    )
    try:  # memory switches the device cannot use (apex_tune/training/memory_options.py)
        check_memory_options(
            device,
            activation_offloading=options.activation_offloading,
            activation_checkpointing=options.activation_checkpointing,
            optimizer=str((cfg.get("optimizer") or {}).get("_component_", "")),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return options


def steps_per_epoch(batches_per_rank: int, options: RunOptions) -> int:
    """Optimizer steps per epoch; a ConfigError when the data gives none."""
    steps = batches_per_rank // options.gradient_accumulation_steps
    if options.max_steps_per_epoch is not None:
        steps = min(steps, options.max_steps_per_epoch)
    if steps < 1:
        raise ConfigError(
            f"the dataset gives {batches_per_rank} batches per rank, fewer than "
            f"gradient_accumulation_steps={options.gradient_accumulation_steps}: no optimizer step would run. "
            "Use more data, a smaller batch_size or fewer processes"
        )
    return steps


def stage_ends(schedule: ApexSchedule, total_steps: int) -> list:
    try:
        return schedule.stage_ends(total_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from e


# ------------------------------------------------ built from the config, checked
def load_base_checkpoint(cfg: DictConfig) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """The checkpointer and the base model's state dict, its files and config.json
    checked before and its values after loading."""
    checkpoint_dir = Path(cfg.checkpointer.get("checkpoint_dir", "."))
    hf_config = checkpoint_dir / "config.json"
    is_hf = str(cfg.checkpointer.get("_component_", "")).endswith("FullModelHFCheckpointer")
    fix = "Check checkpoint_dir, checkpoint_files and model_type."
    try:
        if is_hf and hf_config.is_file():  # torchtune reads it first; name it if it is not JSON
            check_hf_config(hf_config, {}, {})
        # Our own resume state lives in output_dir; torchtune's recipe-state lookup stays off.
        with config_step("checkpointer", fix):
            checkpointer = config.instantiate(
                cfg.checkpointer, resume_from_checkpoint=False, should_load_recipe_state=False
            )
        table = check_weight_files(getattr(checkpointer, "_checkpoint_paths", []))
        if is_hf and hf_config.is_file():
            with config_step("model", "Check model._component_ and its arguments."):
                with torch.device("meta"):
                    dims = model_dims(config.instantiate(cfg.model))
            check_hf_config(hf_config, table, dims)
        with config_step("checkpointer", fix):
            base_state = checkpointer.load_checkpoint()[training.MODEL_KEY]
        check_finite(base_state, f"the checkpoint in {checkpoint_dir}")
    except InputError as e:
        raise ConfigError(f"checkpointer: {e}") from e
    return checkpointer, base_state


def build_tokenizer(cfg_tokenizer: DictConfig):
    with config_step("tokenizer", "Check tokenizer._component_."):
        _get_component_from_path(cfg_tokenizer._component_)
    try:
        return config.instantiate(cfg_tokenizer)
    except Exception as e:  # a file that is not a tokenizer fails in many ways
        raise ConfigError(str(tokenizer_error(cfg_tokenizer.get("path"), e))) from e


def build_dataset(cfg_dataset, tokenizer):
    """The dataset (several concatenated), every local data file checked first."""
    nodes = list(cfg_dataset) if isinstance(cfg_dataset, ListConfig) else [cfg_dataset]
    for node in nodes:
        files = node.get("data_files")
        for f in [files] if isinstance(files, str) else list(files or []):
            if not Path(f).exists():
                raise ConfigError(f"dataset.data_files: {f} does not exist; point it at your data")
            try:
                check_data_file(Path(f), str(node.get("source", "")), dataset_columns(node))
            except InputError as e:
                raise ConfigError(f"dataset.data_files: {e}") from e
    with config_step("dataset", "Check dataset.source, data_files, split and column names."):
        datasets = [config.instantiate(node, tokenizer) for node in nodes]
    ds = ConcatDataset(datasets) if len(datasets) > 1 else datasets[0]
    if len(ds) == 0:
        raise ConfigError("dataset: it has no examples; check dataset.data_files, source and split")
    return ds
