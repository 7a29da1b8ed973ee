"""APEX fine-tuning recipe for torchtune: stages, fusion, FSDP2, checkpoints and resume.

Launch with ``tune run apex_finetune --config NAME [key=value ...]`` (NAME: a
shipped config such as ``llama3_2/1B_apex_cpt``, or a YAML path), or with
``tune run --nproc_per_node N apex_finetune ...`` for N processes.

A run: load the base model through a torchtune checkpointer; wrap it with APEX;
score ``apex.assess_samples`` training examples and select P/N/E per layer;
train the APEX parameters for T stages; at each boundary fuse the operators
into the weights, re-select from the stage's scores, reset the operators and
the optimizer state (the LR schedule continues); save the fused model in the
checkpointer's format after each stage.
"""

import apex_tune._torchao_log  # noqa: F401,I001  (first: before torchtune imports torchao)
import json
import math
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig
from torch import nn
from torch.distributed.tensor import DTensor
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.datasets import ConcatDataset
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from apex_tune import (
    ActivationRanker,
    apply_apex,
    get_selection,
    init_apex_,
    parse_apex_config,
    random_selection,
    set_apex_trainable,
    set_selection,
    trainable_parameter_report,
)
from apex_tune.training.checkpointing import (
    RECIPE_STATE_DIR,
    CheckpointError,
    check_fusion,
    decode,
    encode,
    plain_state_dict,
    load_local_model_state,
    load_local_optimizer_state,
    load_rank_state,
    local_model_state,
    local_optimizer_state,
    read_state_manifest,
    replace_dir,
    write_recipe_state,
)
from apex_tune.training._faults import fault_point
from apex_tune.training.assessment import assess
from apex_tune.cli.config_names import resolve_config
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
from apex_tune.training.memory_options import activation_offloading, check_memory_options
from apex_tune.modules.model import materialize_apex_buffers_, param_kind
from apex_tune.modules.nf4 import HISTORY, ensure_history_, load_from_full_model_state_dict, shard_model
from apex_tune.modules.selection import LayerSelection
from apex_tune.training.stages import NonFiniteParameterError, end_stage

log = utils.get_logger("INFO")

SELECTION_LOG = "apex_selection.json"
# Test hook (see apex_tune/training/_faults.py): poison the gradients of this optimizer step.
NAN_GRAD_ENV = "APEX_TUNE_NAN_GRAD_AT"


class ConfigError(ValueError):
    """A problem with the run's configuration or inputs, found before training."""


class TrainingFault(RuntimeError):
    """Training stopped on purpose: a non-finite value or a failed fusion check."""


def _config_step(field: str, fix: str):
    """Turn the errors of building ``field`` into one ConfigError that names it."""

    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            if exc is None or isinstance(exc, ConfigError):
                return False
            raise ConfigError(f"{field}: {type(exc).__name__}: {exc}. {fix}") from exc

    return _Guard()


def _init_process_group(device: torch.device, timeout_seconds: float) -> None:
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


def _check_elastic_launch(resume: bool) -> None:
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


class ApexFinetuneRecipe(FTRecipeInterface):
    """APEX fine-tuning with FSDP2 on any world size (one process included).

    Config fields beyond torchtune's full fine-tuning recipe: the ``apex``
    section (see README), ``save_every_n_steps`` and ``resume_from_checkpoint``
    (resumes from ``output_dir/apex_recipe_state/``, mid-stage included).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise ConfigError("dtype=fp16 is not supported; use bf16 or fp32")
        try:
            self.settings, self.schedule = parse_apex_config(cfg.get("apex"))
        except ValueError as e:
            raise ConfigError(str(e)) from e

        self._output_dir = Path(cfg.output_dir)
        self._batch_size = cfg.batch_size
        self._grad_accum = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._save_every_n_steps = cfg.get("save_every_n_steps", None)
        if self._save_every_n_steps is not None and (
            not isinstance(self._save_every_n_steps, int) or self._save_every_n_steps < 1
        ):
            raise ConfigError(
                f"save_every_n_steps={self._save_every_n_steps!r} must be a positive integer "
                "or null (save only at stage ends)"
            )
        for name in ("batch_size", "gradient_accumulation_steps", "epochs"):
            if not isinstance(cfg.get(name), int) or cfg.get(name) < 1:
                raise ConfigError(f"{name}={cfg.get(name)!r} must be a positive integer")
        self._on_nonfinite = cfg.get("on_nonfinite", "stop")
        if self._on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite={self._on_nonfinite!r} must be 'stop' or 'skip'")
        self._fusion_tolerance = cfg.get("fusion_check_tolerance", None)
        self._resume = cfg.get("resume_from_checkpoint", False)
        self._compile = cfg.get("compile", False)
        self._activation_checkpointing = cfg.get("enable_activation_checkpointing", False)
        self._activation_offloading = cfg.get("enable_activation_offloading", False)
        try:  # memory switches the device cannot use (apex_tune/training/memory_options.py)
            check_memory_options(cfg, self._device)
        except ValueError as e:
            raise ConfigError(str(e)) from e

        _check_elastic_launch(self._resume)
        _init_process_group(self._device, cfg.get("distributed_timeout_seconds", 600))
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0

        self.seed = training.set_seed(seed=cfg.seed)
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.epochs_run = 0
        self.global_step = 0
        self.steps_in_epoch = 0  # optimizer steps already taken in the current epoch
        self.stage = 0  # index of the current stage
        self._assessment: Dict[str, Any] = {}
        self._data_counts = {"rows": 0, "rows_without_targets": 0, "rows_at_max_seq_len": 0, "skipped_steps": 0}

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        """Build and validate everything first; only then write into output_dir."""
        self._cfg = cfg
        # Our own resume state lives in output_dir; torchtune's recipe-state
        # lookup in the checkpointer stays off.
        base_state = self._load_base(cfg)
        manifest = read_state_manifest(self._output_dir) if self._resume else None
        self._check_same_resume_point(manifest)
        if self._resume and manifest is None:
            utils.log_rank_zero(log, f"resume_from_checkpoint: no {RECIPE_STATE_DIR} in {self._output_dir}, starting fresh")
        if manifest is not None and manifest["world_size"] != self.world_size:
            raise ConfigError(
                f"the saved run used {manifest['world_size']} processes, this one {self.world_size}: "
                "resume with the same --nproc_per_node"
            )
        resumed = load_rank_state(self._output_dir, manifest, self.rank) if manifest else None

        state = base_state
        if resumed:  # frozen stages of a quantized base (replicated): the model needs their count
            state = {**base_state, **{k[len("model."):]: v for k, v in resumed["tensors"].items()
                                      if k.startswith("model.") and HISTORY in f".{k}"}}
        self._model = self._setup_model(cfg, state, fresh=not resumed)
        if resumed:  # every rank its own shards; NF4 base weights stay as quantized from the base
            load_local_model_state(self._model, resumed["tensors"], resumed["where"])
        del base_state, state
        self._activations_ctx = activation_offloading(self._model, self._activation_offloading)
        with _config_step("tokenizer", "Check tokenizer._component_."):
            _get_component_from_path(cfg.tokenizer._component_)
        try:
            self._tokenizer = config.instantiate(cfg.tokenizer)
        except Exception as e:  # a file that is not a tokenizer fails in many ways
            raise ConfigError(str(tokenizer_error(cfg.tokenizer.get("path"), e))) from e
        self._loss_fn = config.instantiate(cfg.loss)
        if self._compile:
            training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)
        if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)

        self._dataset = self._setup_dataset(cfg.dataset)
        self._dataloader = self._setup_dataloader(cfg)
        self._steps_per_epoch = len(self._dataloader) // self._grad_accum
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        if self._steps_per_epoch < 1:
            raise ConfigError(
                f"the dataset gives {len(self._dataloader)} batches per rank, fewer than "
                f"gradient_accumulation_steps={self._grad_accum}: no optimizer step would run. "
                "Use more data, a smaller batch_size or fewer processes"
            )
        self.total_steps = self.total_epochs * self._steps_per_epoch
        try:
            self.stage_ends = self.schedule.stage_ends(self.total_steps)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self._probe = self._probe_batch()

        self._optimizer = config.instantiate(
            cfg.optimizer, [p for p in self._model.parameters() if p.requires_grad]
        )
        self._ranker = ActivationRanker(self._model, self.settings)
        if resumed:
            self._restore(resumed)
        self._lr_scheduler = config.instantiate(
            cfg.lr_scheduler,
            self._optimizer,
            num_training_steps=self.total_steps,
            last_epoch=self.global_step - 1,
        ) if cfg.get("lr_scheduler") else None
        self._ignore_labels_cache = torch.full(
            (self._batch_size, 1), self._loss_fn.ignore_index, device=self._device
        )
        # Everything is validated: from here on the run writes into output_dir.
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)
        if not resumed:
            selection = self._initial_selection(cfg)
            self._check_same_selection(selection)
            set_selection(self._model, selection)
            self._log_selection(selection, step=0, scores=self._assessment)
        self._ranker.attach()
        if self._is_rank_zero:
            report = trainable_parameter_report(self._model)
            log.info(
                f"APEX trains {report['trainable_params']:,} of {report['base_params']:,} parameters "
                f"({100 * report['trainable_fraction']:.3f}%); stages end at steps {self.stage_ends}"
            )

    def _load_base(self, cfg: DictConfig) -> Dict[str, torch.Tensor]:
        """The base checkpoint, its files and config.json checked before and its values after loading."""
        checkpoint_dir = Path(cfg.checkpointer.get("checkpoint_dir", "."))
        hf_config = checkpoint_dir / "config.json"
        is_hf = str(cfg.checkpointer.get("_component_", "")).endswith("FullModelHFCheckpointer")
        try:
            if is_hf and hf_config.is_file():  # torchtune reads it first; name it if it is not JSON
                check_hf_config(hf_config, {}, {})
            with _config_step("checkpointer", "Check checkpoint_dir, checkpoint_files and model_type."):
                self._checkpointer = config.instantiate(
                    cfg.checkpointer, resume_from_checkpoint=False, should_load_recipe_state=False
                )
            table = check_weight_files(getattr(self._checkpointer, "_checkpoint_paths", []))
            if is_hf and hf_config.is_file():
                with _config_step("model", "Check model._component_ and its arguments."):
                    with torch.device("meta"):
                        dims = model_dims(config.instantiate(cfg.model))
                check_hf_config(hf_config, table, dims)
            with _config_step("checkpointer", "Check checkpoint_dir, checkpoint_files and model_type."):
                base_state = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
            check_finite(base_state, f"the checkpoint in {checkpoint_dir}")
        except InputError as e:
            raise ConfigError(f"checkpointer: {e}") from e
        return base_state

    def _setup_model(self, cfg: DictConfig, state_dict: Dict[str, torch.Tensor], fresh: bool) -> nn.Module:
        """Meta-init, wrap, shard, then load ``state_dict``: the base model (``fresh``:
        APEX starts from new operators; on resume the saved shards are copied in after)."""
        with _config_step("model", "Check model._component_ and its arguments."):
            with training.set_default_dtype(self._dtype), torch.device("meta"):
                model = config.instantiate(cfg.model)
        try:
            apply_apex(model, self.settings)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from e
        set_apex_trainable(model, self.settings)
        if self._compile:
            training.compile_model(model, verbose=self._is_rank_zero)
        if self._activation_checkpointing:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        mesh = dist.device_mesh.init_device_mesh(self._device.type, (self.world_size,))
        shard_model(  # torchtune's, with NF4 weights kept out of FSDP (apex_tune/modules/nf4.py)
            model=model,
            shard_conditions=[lambda name, m: isinstance(m, modules.TransformerSelfAttentionLayer)],
            cpu_offload=False,
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
            dp_mesh=mesh,
        )
        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if hasattr(m, "rope_init"):  # RoPE caches are not in the state dict
                    m.rope_init()

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
                full_sd[name] = torch.zeros(value.shape, dtype=value.dtype)  # re-initialised below
            else:
                raise ConfigError(f"checkpointer: the checkpoint lacks base weight {name}")
        load_from_full_model_state_dict(model, full_sd, self._device, strict=True)
        if fresh:
            init_apex_(model, self._device, seed=self.seed)
        else:  # operators come from the state; the selection is set by _restore
            materialize_apex_buffers_(model, self._device)
        training.validate_no_params_on_meta_device(model)
        dist.barrier()
        return model

    def _setup_dataset(self, cfg_dataset):
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
        with _config_step("dataset", "Check dataset.source, data_files, split and column names."):
            datasets = [config.instantiate(node, self._tokenizer) for node in nodes]
        ds = ConcatDataset(datasets) if len(datasets) > 1 else datasets[0]
        if len(ds) == 0:
            raise ConfigError("dataset: it has no examples; check dataset.data_files, source and split")
        return ds

    def _collate(self):
        collate = _get_component_from_path(self._cfg.get("collate_fn", "torchtune.data.padded_collate_sft"))
        return partial(collate, padding_idx=self._tokenizer.pad_id, ignore_idx=self._loss_fn.ignore_index)

    def _setup_dataloader(self, cfg: DictConfig) -> StatefulDataLoader:
        sampler = StatefulDistributedSampler(
            self._dataset, num_replicas=self.world_size, rank=self.rank, shuffle=cfg.shuffle, seed=self.seed
        )
        return StatefulDataLoader(
            self._dataset,
            batch_size=self._batch_size,
            sampler=sampler,
            collate_fn=self._collate(),
            drop_last=True,
        )

    # ------------------------------------------------------------- selection
    def _shift_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels aligned with the logits: position i is scored on token i + 1."""
        return torch.hstack((labels[..., 1:], self._ignore_labels_cache[: labels.shape[0]]))

    def _loss_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """Positions whose next token is trained: padding and ignored positions excluded."""
        return self._shift_labels(labels) != self._loss_fn.ignore_index

    def _initial_selection(self, cfg: DictConfig) -> List[LayerSelection]:
        if self.schedule.selection == "random":
            return random_selection(self._model, torch.Generator().manual_seed(self.seed))
        start = time.perf_counter()
        selection, self._assessment = assess(
            self._model, self._ranker, self._dataset, self._collate(), self._loss_mask, self._batch_size,
            self.schedule.assess_samples, self.seed, self._device, self.rank, self.world_size,
        )
        count = min(self.schedule.assess_samples, len(self._dataset))
        utils.log_rank_zero(
            log, f"assessment of {count} examples took {time.perf_counter() - start:.2f}s"
        )
        return selection

    def _log_selection(self, selection: List[LayerSelection], step: int, scores: dict) -> None:
        """Append the stage's selection (and the scores behind it) to output_dir/apex_selection.json."""
        if not self._is_rank_zero:
            return
        path = self._output_dir / SELECTION_LOG
        entries = json.loads(path.read_text()) if path.exists() else []
        entries = [e for e in entries if e["step"] < step]  # a resumed run rewrites its future
        entries.append(
            {
                "stage": self.stage + 1,
                "step": step,
                "layers": [s.to_dict() for s in selection],
                "scores": scores,
            }
        )
        self._output_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)

    def _log_effective_ranks(self, stage: int, ranks: List[Dict[str, float]]) -> None:
        """Stage ``stage``'s effective rank of W' - W per layer and projection: into its
        apex_selection.json entry, and the mean over layers into the metric log."""
        if not self._is_rank_zero or not any(ranks):  # a quantized base defers its fold: nothing to rank
            return
        path = self._output_dir / SELECTION_LOG
        entries = json.loads(path.read_text())
        for entry in entries:
            if entry["stage"] == stage:
                entry["effective_rank"] = ranks
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)
        names = sorted({name for layer in ranks for name in layer})
        self._metric_logger.log_dict(
            {
                f"effective_rank_{name}": sum(layer[name] for layer in ranks if name in layer)
                / sum(name in layer for layer in ranks)
                for name in names
            },
            step=self.global_step,
        )

    # ------------------------------------------------------------- training
    def train(self) -> None:
        if self._device.type == "cuda":  # torchtune's helper assumes a CUDA-like device
            training.cleanup_before_training()
        self._optimizer.zero_grad()
        pbar = tqdm(
            total=self.total_steps,
            initial=self.global_step,
            disable=not self._is_rank_zero,
            dynamic_ncols=True,
        )
        t0 = time.perf_counter()
        # loss sum, target tokens, rows, rows without targets, rows at max_seq_len
        stats = torch.zeros(5, dtype=torch.float64, device=self._device)
        max_seq_len = getattr(self._tokenizer, "max_seq_len", None)
        for epoch in range(self.epochs_run, self.total_epochs):
            self._dataloader.sampler.set_epoch(epoch)
            micro = 0
            for batch in self._dataloader:
                utils.batch_to_device(batch, self._device)
                labels = batch.pop("labels")
                labels = self._shift_labels(labels)
                targets = labels != self._loss_fn.ignore_index
                tokens = targets.sum()
                self._ranker.begin_microbatch(targets)
                with self._activations_ctx:
                    logits = self._model(**batch)
                if not isinstance(logits, list):
                    labels = labels.reshape(-1)
                    logits = logits.reshape(-1, logits.size(-1))
                if tokens.item() == 0:
                    # Nothing to learn here (the mean loss would be 0/0 = NaN), but every
                    # rank must still run backward for FSDP's collectives: a zero loss.
                    loss = sum(chunk.sum() for chunk in logits) * 0.0 if isinstance(logits, list) else logits.sum() * 0.0
                else:
                    loss = self._loss_fn(logits, labels) * tokens
                del logits
                loss.backward()
                at_max = 0
                if max_seq_len is not None and batch["tokens"].shape[1] >= max_seq_len:
                    at_max = (batch["tokens"][:, -1] != self._tokenizer.pad_id).sum()
                stats += torch.stack(
                    [loss.detach().double(), tokens.double(), torch.tensor(float(targets.shape[0]), device=self._device),
                     (targets.sum(1) == 0).sum().double(), torch.as_tensor(at_max, device=self._device).double()]
                )
                micro += 1
                if micro % self._grad_accum:
                    continue

                self._optimizer_step(stats, epoch, pbar, time.perf_counter() - t0)
                stats.zero_()
                fault_point(f"step:{self.global_step}")
                if self.global_step == self.stage_ends[self.stage]:
                    self._stage_boundary()
                elif self._save_every_n_steps and self.global_step % self._save_every_n_steps == 0:
                    self.save_checkpoint(label=f"step_{self.global_step}", fused=True)
                t0 = time.perf_counter()
                if self.steps_in_epoch >= self._steps_per_epoch:
                    break
            self.epochs_run += 1
            self.steps_in_epoch = 0
        pbar.close()
        if self._is_rank_zero:
            log.info(f"data: {self._data_counts}")

    def _optimizer_step(self, stats: torch.Tensor, epoch: int, pbar: tqdm, elapsed: float) -> None:
        """Normalise, check, clip and apply the accumulated gradients; log."""
        dist.all_reduce(stats)
        loss_sum, num_tokens, rows, without_targets, at_max = stats.tolist()
        counts = self._data_counts
        counts["rows"] += int(rows)
        counts["rows_without_targets"] += int(without_targets)
        counts["rows_at_max_seq_len"] += int(at_max)
        step = self.global_step + 1
        if os.environ.get(NAN_GRAD_ENV) == str(step):
            for p in self._model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        skip_reason = None
        grad_norm = None
        if num_tokens == 0:
            skip_reason = "no target tokens in the batch"
        else:
            # FSDP2 averages gradients over ranks; undo that, normalise by tokens.
            training.scale_grads(self._model, torch.tensor(self.world_size / num_tokens))
            max_norm = float(self._clip_grad_norm) if self._clip_grad_norm is not None else float("inf")
            grad_norm = nn.utils.clip_grad_norm_(self._model.parameters(), max_norm=max_norm)
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            grad_norm = grad_norm.item()
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                message = (
                    f"non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient'} at step {step} "
                    f"(stage {self.stage + 1}, epoch {epoch + 1}): loss sum {loss_sum}, grad norm {grad_norm}"
                )
                if self._on_nonfinite == "stop":
                    raise TrainingFault(
                        f"{message}. Nothing was applied or saved after it; the last good checkpoint "
                        f"in {self._output_dir} is kept. Lower optimizer.lr, set clip_grad_norm, or "
                        "set on_nonfinite=skip to skip such steps"
                    )
                skip_reason = message
        if skip_reason is None:
            self._optimizer.step()
        else:
            counts["skipped_steps"] += 1
            utils.log_rank_zero(log, f"skipping the update of step {step}: {skip_reason}")
        self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        self.global_step = step
        self.steps_in_epoch += 1

        loss_value = loss_sum / num_tokens if num_tokens else float("nan")
        pbar.update(1)
        pbar.set_description(
            f"stage {self.stage + 1}/{len(self.stage_ends)} | epoch {epoch + 1} | loss {loss_value:.4f}"
        )
        if self._is_rank_zero and step % self._log_every_n_steps == 0:
            metrics = {
                "loss": loss_value,
                "lr": get_lr(self._optimizer),
                "tokens_per_second_per_gpu": num_tokens / (elapsed * self.world_size),
                "stage": self.stage + 1,
                **{k: v for k, v in counts.items() if k != "rows"},
            }
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            if self._device.type == "cuda":
                metrics.update(training.get_memory_stats(device=self._device))
            self._metric_logger.log_dict(metrics, step=step)

    def _probe_batch(self) -> torch.Tensor:
        """A fixed small batch (the dataset's first examples) for fusion checks."""
        rows = [self._dataset[i] for i in range(min(2, len(self._dataset)))]
        tokens = self._collate()(rows)["tokens"][:, :64]
        return tokens.to(self._device)

    @torch.no_grad()
    def _probe_logits(self) -> torch.Tensor:
        self._model.eval()
        self._ranker.detach()
        logits = self._model(self._probe)
        self._ranker.attach()
        self._model.train()
        return torch.cat(logits, dim=1) if isinstance(logits, list) else logits

    def _tolerance(self) -> float:
        if self._fusion_tolerance is not None:
            return float(self._fusion_tolerance)
        return 1e-3 if self._dtype == torch.float32 else 5e-2

    def _check_same_resume_point(self, manifest) -> None:
        """Every rank must resume from the same saved step (or all start fresh): on
        several nodes ``output_dir`` has to be one folder that every node reads."""
        mine = None if manifest is None else manifest["global_step"]
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        if len(set(everyone)) > 1:
            steps = ", ".join(f"rank {r}: {'none' if s is None else f'step {s}'}" for r, s in enumerate(everyone))
            raise ConfigError(
                f"output_dir: the ranks found different resume states in {self._output_dir} ({steps}); "
                "on several nodes output_dir must be a shared folder (NFS, Lustre, a shared volume)"
            )

    def _check_same_selection(self, selection: List[LayerSelection]) -> None:
        """Every rank must have chosen the same units (their scores were all-reduced)."""
        mine = [s.to_dict() for s in selection]
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        if any(other != everyone[0] for other in everyone):
            raise TrainingFault("ranks disagree on the APEX selection; their scores were not summed alike")

    def _stage_boundary(self) -> None:
        """Fuse in fp32, re-select from the stage's scores, reset operators, ranker and
        optimizer state (apex_tune.training.stages.end_stage, shared with the benchmarks)."""
        start = time.perf_counter()
        finished = self.stage
        last = finished == len(self.stage_ends) - 1
        next_selection, scores = None, {}
        if not last:
            if self.schedule.selection == "random":
                next_selection = random_selection(
                    self._model, torch.Generator().manual_seed(self.seed + finished + 1)
                )
            else:
                self._ranker.all_reduce()
                next_selection = self._ranker.select()
                scores = self._ranker.scores()
            self._check_same_selection(next_selection)
        try:
            difference, effective_ranks = end_stage(
                self._model, self._optimizer, self._ranker, next_selection,
                seed=self.seed + finished + 1, probe=self._probe_logits, effective_ranks=True,
            )
        except NonFiniteParameterError as e:  # never fold a non-finite operator into the weights
            raise TrainingFault(
                f"stage {finished + 1} ends at step {self.global_step} with non-finite values in "
                f"{e.name}; not fusing. The last good checkpoint in {self._output_dir} is kept"
            ) from e
        fuse_seconds = time.perf_counter() - start
        self._log_effective_ranks(finished + 1, effective_ranks)
        check_fusion(difference, self._tolerance(), f"stage {finished + 1} fusion at step {self.global_step}")
        self.stage += 1
        if next_selection is not None:
            self._log_selection(next_selection, step=self.global_step, scores=scores)
        utils.log_rank_zero(
            log,
            f"stage {finished + 1} done at step {self.global_step}: fused in {fuse_seconds:.3f}s, "
            f"fused-vs-wrapped difference {difference:.2e} on the probe batch",
        )
        # The live model is fused now: its base weights are the plain model.
        self.save_checkpoint(label=f"stage_{finished + 1}", fused=False)
        utils.log_rank_zero(
            log, f"stage {finished + 1} boundary took {time.perf_counter() - start:.3f}s (fusion, checks, checkpoint)"
        )

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, label: str, fused: bool) -> None:
        """Write the plain model (HF in -> HF out) as ``output_dir/label`` and the resume state.

        ``fused=False``: the live model was just merged, so its base weights are
        the plain model. ``fused=True``: fuse a CPU copy, leaving training as is;
        it must reproduce the wrapped model on the probe batch, or nothing is saved.
        """
        fault_point(f"save:{label}")
        wrapped_sd = training.gather_cpu_state_dict(self._model, self._is_rank_zero)
        ranker_state = self._ranker.state_dict()
        # A save at an epoch's last step resumes at the next epoch's start.
        epoch_done = self.steps_in_epoch >= self._steps_per_epoch
        selection = get_selection(self._model)
        failure = [None]
        if self._is_rank_zero:
            if fused or self.settings.quantize_base:  # a quantized base is never merged in place
                plain, difference = plain_state_dict(
                    self._build_model_in_run_dtype, self.settings, wrapped_sd, selection, self._probe
                )
                log.info(f"checkpoint {label}: fused-vs-wrapped difference {difference:.2e} on the probe batch")
                try:
                    check_fusion(difference, self._tolerance(), f"checkpoint {label}")
                except CheckpointError as e:
                    failure = [str(e)]
            else:
                plain = {k: v for k, v in wrapped_sd.items() if param_kind(k) in ("base", "embeddings")}
            plain = {k: v.to(self._dtype) for k, v in plain.items()}  # trained embeddings are fp32
            if failure[0] is None and not all(torch.isfinite(v).all() for v in plain.values()):
                failure = [f"checkpoint {label}: the fused weights are not finite; nothing was saved"]
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise CheckpointError(failure[0])
        if self._is_rank_zero:
            self._write_model(plain, label)
            del plain
        del wrapped_sd
        fault_point(f"save_state:{label}")
        # Every rank saves its own shards (no gather): the optimizer's local state dict,
        # which reading never changes (torch's full-state helpers may take a step).
        tensors = local_model_state(self._model)
        tensors["rng"] = torch.get_rng_state()
        meta = {
            "progress": {
                "seed": self.seed,
                "epochs_run": self.epochs_run + int(epoch_done),
                "global_step": self.global_step,
                "steps_in_epoch": 0 if epoch_done else self.steps_in_epoch,
                "stage": self.stage,
                "total_steps": self.total_steps,
                "world_size": self.world_size,
                "checkpoint": label,
            },
            "selection": [s.to_dict() for s in selection],
            "optimizer": local_optimizer_state(self._optimizer, tensors),
            "dataloader": None if epoch_done else encode(self._dataloader.state_dict(), tensors, "dataloader"),
            # summed over ranks: rank 0 keeps the sums, the others restart from zero
            "ranker": encode(ranker_state, tensors, "ranker") if self._is_rank_zero else None,
            "data_counts": dict(self._data_counts),
        }
        write_recipe_state(
            self._output_dir, label, self.rank, tensors, meta, self.world_size, self.global_step, dist.barrier
        )
        dist.barrier()

    def _build_model_in_run_dtype(self) -> nn.Module:
        with training.set_default_dtype(self._dtype):
            return config.instantiate(self._cfg.model)

    def _write_model(self, state_dict: Dict[str, torch.Tensor], label: str) -> None:
        """Save through the torchtune checkpointer (it writes epoch_<n>), then move into place."""
        staging = self._output_dir / f"epoch_{self.global_step}"
        if staging.exists():  # left by a crash mid-write
            shutil.rmtree(staging)
        # The checkpointer names the staging folder in its messages; say where the files end up instead.
        with _without_checkpointer_messages():
            self._checkpointer.save_checkpoint(
                {training.MODEL_KEY: state_dict}, epoch=self.global_step, intermediate_checkpoint=False
            )
        final = self._output_dir / label
        replace_dir(staging, final)
        size = sum(p.stat().st_size for p in final.iterdir()) / 1024**3
        log.info(f"model checkpoint {label} ({size:.2f} GiB, checkpointer format) saved to {final}")

    def _restore(self, resumed: Dict[str, Any]) -> None:
        meta, tensors, where = resumed["meta"], resumed["tensors"], resumed["where"]
        try:
            progress = meta["progress"]
            if progress["total_steps"] != self.total_steps:
                raise ConfigError(
                    f"the saved run has {progress['total_steps']} optimizer steps, this config gives "
                    f"{self.total_steps}: resume with the same data, batch and epoch settings"
                )
            if progress["seed"] != self.seed:
                raise ConfigError(f"seed: the saved run used seed={progress['seed']}, this config seed={self.seed}")
            set_selection(self._model, [LayerSelection.from_dict(d) for d in meta["selection"]])
            load_local_optimizer_state(self._optimizer, meta["optimizer"], tensors, where)
            if meta["dataloader"] is not None:  # None: saved at an epoch end
                self._dataloader.load_state_dict(decode(meta["dataloader"], tensors, where))
            self._ranker.load_state_dict(decode(meta["ranker"], tensors, where), keep=self._is_rank_zero)
            torch.set_rng_state(tensors["rng"])
            self._data_counts.update(meta["data_counts"])
            self.epochs_run = int(progress["epochs_run"])
            self.global_step = int(progress["global_step"])
            self.steps_in_epoch = int(progress["steps_in_epoch"])
            self.stage = int(progress["stage"])
        except (ConfigError, CheckpointError):
            raise
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CheckpointError(
                f"resume state {where} does not fit this run ({type(e).__name__}: {e}); move "
                f"{self._output_dir / RECIPE_STATE_DIR} away to start over from the base model"
            ) from e
        if self._is_rank_zero:  # staging folders of saves that a crash cut short
            for step in range(self.global_step + 1, self.total_steps + 1):
                shutil.rmtree(self._output_dir / f"epoch_{step}", ignore_errors=True)
        utils.log_rank_zero(
            log, f"resumed from {meta['progress']['checkpoint']} at step {self.global_step}, stage {self.stage + 1}"
        )

    def cleanup(self) -> None:
        if self._is_rank_zero and hasattr(self, "_metric_logger"):
            self._metric_logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


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


def _resolve_config_arg(argv: List[str]) -> List[str]:
    """Let ``--config`` take a shipped name (``llama2/7B_apex``) as well as a path."""
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config") + 1
        if i < len(argv):
            try:
                argv[i] = str(resolve_config(argv[i]))
            except ValueError as e:
                sys.exit(f"apex_finetune: {e}")
    return argv


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="ApexFinetuneRecipe", cfg=cfg)
    recipe = ApexFinetuneRecipe(cfg=cfg)
    try:
        recipe.setup(cfg=cfg)
        recipe.train()
    finally:
        recipe.cleanup()


def main() -> None:
    sys.argv = [sys.argv[0]] + _resolve_config_arg(sys.argv[1:])
    try:
        recipe_main()
    except (ConfigError, TrainingFault, CheckpointError) as e:
        # One clear line, not a traceback: these are the run's inputs or state, not a bug.
        kind = "config error" if isinstance(e, ConfigError) else "stopped"
        message = " ".join(str(e).split())
        if os.environ.get("RANK", "0") == "0":  # every rank meets the same error: say it once
            print(f"apex_finetune: {kind}: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
