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

Training support lives in ``apex_tune.training``: run options and their one-line
errors (``run_options``), process group and sharding (``distributed``), the stage
protocol (``stages``, ``assessment``), the resume state and checkpoints
(``checkpointing``), the selection log, and the testing seam (``testing``).
"""

import apex_tune._torchao_log  # noqa: F401,I001  (first: before torchtune imports torchao)
import math
import os
import sys
import time
from functools import partial
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, modules, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from apex_tune import (
    ActivationRanker,
    apply_apex,
    get_selection,
    init_apex_,
    set_apex_trainable,
    set_selection,
    trainable_parameter_report,
)
from apex_tune.cli.config_names import resolve_config_argument
from apex_tune.modules.layout import base_layout_state_dict
from apex_tune.modules.model import materialize_apex_buffers_
from apex_tune.training.assessment import assess
from apex_tune.training.checkpointing import (
    CheckpointError,
    Progress,
    base_state_with_history,
    check_fusion,
    find_resume_state,
    load_local_model_state,
    plain_checkpoint_state,
    remove_unfinished_checkpoints,
    restore_recipe_state,
    save_recipe_state,
    write_model_checkpoint,
)
from apex_tune.training.distributed import check_elastic_launch, init_process_group, load_base_state, shard_apex_model
from apex_tune.training.memory_options import activation_offloading
from apex_tune.training.run_options import (
    ConfigError,
    TrainingFault,
    build_dataset,
    build_tokenizer,
    config_step,
    exit_with_one_line,
    load_base_checkpoint,
    read_run_options,
    stage_ends,
    steps_per_epoch,
)
from apex_tune.training.effective_ranks import BackgroundEffectiveRanks
from apex_tune.training.selection_log import (
    log_effective_ranks, log_selection, log_stage_end, mean_effective_ranks, record_effective_ranks,
)
from apex_tune.training.stages import NonFiniteParameterError, choose_selection, end_stage
from apex_tune.training.testing import fault_point

log = utils.get_logger("INFO")


class ApexFinetuneRecipe(FTRecipeInterface):
    """APEX fine-tuning with FSDP2 on any world size (one process included).

    Config fields beyond torchtune's full fine-tuning recipe: the ``apex``
    section (see README), ``save_every_n_steps`` and ``resume_from_checkpoint``
    (resumes from ``output_dir/apex_recipe_state/``, mid-stage included).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.options = read_run_options(cfg)  # a ConfigError names the first wrong field
        self.settings, self.schedule = self.options.settings, self.options.schedule
        self._device, self._dtype = self.options.device, self.options.dtype
        self._output_dir = self.options.output_dir
        self._batch_size = self.options.batch_size
        self._grad_accum = self.options.gradient_accumulation_steps
        self._clip_grad_norm = self.options.clip_grad_norm
        self._log_every_n_steps = self.options.log_every_n_steps
        self._save_every_n_steps = self.options.save_every_n_steps
        self._on_nonfinite = self.options.on_nonfinite

        check_elastic_launch(self.options.resume)
        init_process_group(self._device, self.options.distributed_timeout_seconds)
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0

        self.seed = training.set_seed(seed=cfg.seed)
        self.total_epochs = self.options.epochs
        self.epochs_run = 0
        self.global_step = 0
        self.steps_in_epoch = 0  # optimizer steps already taken in the current epoch
        self.stage = 0  # index of the current stage
        self._data_counts = {"rows": 0, "rows_without_targets": 0, "rows_at_max_seq_len": 0, "skipped_steps": 0}

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        """Build and validate everything first; only then write into output_dir."""
        self._cfg = cfg
        self._checkpointer, base_state = load_base_checkpoint(cfg)
        resumed = find_resume_state(self._output_dir, self.options.resume, self.rank, self.world_size)
        self._model = self._setup_model(cfg, base_state_with_history(base_state, resumed), fresh=not resumed)
        if resumed:  # every rank its own shards; NF4 base weights stay as quantized from the base
            load_local_model_state(self._model, resumed["tensors"], resumed["where"])
        del base_state
        self._activations_ctx = activation_offloading(self._model, self.options.activation_offloading)
        self._tokenizer = build_tokenizer(cfg.tokenizer)
        self._loss_fn = config.instantiate(cfg.loss)
        if self.options.compile:
            training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)
        if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)

        self._dataset = build_dataset(cfg.dataset, self._tokenizer)
        self._dataloader = self._setup_dataloader(cfg)
        self._steps_per_epoch = steps_per_epoch(len(self._dataloader), self.options)
        self.total_steps = self.total_epochs * self._steps_per_epoch
        self.stage_ends = stage_ends(self.schedule, self.total_steps)
        self._probe = self._probe_batch()

        self._optimizer = config.instantiate(
            cfg.optimizer, [p for p in self._model.parameters() if p.requires_grad]
        )
        self._ranker = ActivationRanker(self._model, self.settings)
        self._ranking = BackgroundEffectiveRanks()  # a stage's effective ranks, while the next one trains
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
            selection, scores = self._initial_selection()
            set_selection(self._model, selection)
            self._log_selection(selection, step=0, scores=scores)
        self._ranker.attach()
        if self._is_rank_zero:
            report = trainable_parameter_report(self._model)
            log.info(
                f"APEX trains {report['trainable_params']:,} of {report['base_params']:,} parameters "
                f"({100 * report['trainable_fraction']:.3f}%); stages end at steps {self.stage_ends}"
            )

    def _setup_model(self, cfg: DictConfig, state_dict: Dict[str, torch.Tensor], fresh: bool) -> nn.Module:
        """Meta-init, wrap, shard, then load ``state_dict``: the base model (``fresh``:
        APEX starts from new operators; on resume the saved shards are copied in after)."""
        with config_step("model", "Check model._component_ and its arguments."):
            with training.set_default_dtype(self._dtype), torch.device("meta"):
                model = config.instantiate(cfg.model)
        try:
            apply_apex(model, self.settings)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from e
        set_apex_trainable(model, self.settings)
        if self.options.compile:
            training.compile_model(model, verbose=self._is_rank_zero)
        if self.options.activation_checkpointing:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        shard_apex_model(model, self._device, self._dtype, self.world_size, self.options.reshard_after_forward)
        load_base_state(model, state_dict, self._device)
        if fresh:
            init_apex_(model, self._device, seed=self.seed)
        else:  # operators come from the state; the selection is set by _restore
            materialize_apex_buffers_(model, self._device)
        training.validate_no_params_on_meta_device(model)
        dist.barrier()
        return model

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

    def _initial_selection(self):
        """Stage 1's units: assessed on training examples (or drawn, the random ablation)."""
        if self.schedule.selection == "random":
            return choose_selection(self._model, self._ranker, "random", self.seed)
        start = time.perf_counter()
        selection, scores = assess(
            self._model, self._ranker, self._dataset, self._collate(), self._loss_mask, self._batch_size,
            self.schedule.assess_samples, self.seed, self._device, self.rank, self.world_size,
        )
        count = min(self.schedule.assess_samples, len(self._dataset))
        utils.log_rank_zero(
            log, f"assessment of {count} examples took {time.perf_counter() - start:.2f}s"
        )
        return selection, scores

    def _log_selection(self, selection, step: int, scores: dict) -> None:
        if self._is_rank_zero:
            log_selection(self._output_dir, self.stage + 1, step, selection, scores)

    def _finish_effective_ranks(self, wait: bool) -> None:
        """Once the worker has ranked the last boundary's stage (and recorded the ranks and
        made that boundary's resume state current), the mean ranks over layers into the
        metric log; ``wait``: wait for it (before any other save, and at the end)."""
        if not self._ranking.pending or not (wait or self._ranking.done()):
            return
        ranks = self._ranking.join()
        if self._is_rank_zero:
            self._metric_logger.log_dict(mean_effective_ranks(ranks), step=self.global_step)

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
                # Without targets the mean loss is 0/0 = NaN. One stand-in target (class 0) keeps
                # it finite; weighted by tokens = 0 below, its loss and gradient are exactly zero,
                # and every rank still runs backward for FSDP's collectives. A tensor op, so no
                # host sync per micro-batch (the count is read when the step is logged).
                labels[0, 0] = torch.where(tokens == 0, 0, labels[0, 0])
                with self._activations_ctx:
                    logits = self._model(**batch)
                if not isinstance(logits, list):
                    labels = labels.reshape(-1)
                    logits = logits.reshape(-1, logits.size(-1))
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
                self._finish_effective_ranks(wait=False)
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
        self._finish_effective_ranks(wait=True)
        if self._is_rank_zero:
            log_effective_ranks(self._output_dir)
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
        fault_point(f"gradients:{step}", self._model)
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

    def _stage_boundary(self) -> None:
        """Fuse in fp32, re-select from the stage's scores, reset operators, ranker and
        optimizer state (apex_tune.training.stages.end_stage, shared with the benchmarks),
        log the next selection and save. The stage's effective ranks are computed after
        the boundary, on a background thread while the next stage trains; that thread
        records them and only then makes this boundary's resume state current, so a
        resume always finds them (a crash before that resumes from the previous state)."""
        start = time.perf_counter()
        finished = self.stage
        last = finished == len(self.stage_ends) - 1
        try:
            ended = end_stage(
                self._model, self._optimizer, self._ranker, None if last else self.schedule.selection,
                seed=self.seed + finished + 1, probe=self._probe_logits, weight_changes=self._is_rank_zero,
            )
        except NonFiniteParameterError as e:  # never fold a non-finite operator into the weights
            raise TrainingFault(
                f"stage {finished + 1} ends at step {self.global_step} with non-finite values in "
                f"{e.name}; not fusing. The last good checkpoint in {self._output_dir} is kept"
            ) from e
        fuse_seconds = time.perf_counter() - start
        check_fusion(ended.difference, self.options.fusion_tolerance, f"stage {finished + 1} fusion at step {self.global_step}")
        self.stage += 1
        utils.log_rank_zero(
            log,
            f"stage {finished + 1} done at step {self.global_step}: fused in {fuse_seconds:.3f}s, "
            f"fused-vs-wrapped difference {ended.difference:.2e} on the probe batch",
        )

        def write_selection_log() -> None:  # after the model checkpoint, before the resume state
            if self._is_rank_zero:
                log_stage_end(self._output_dir, finished + 1, self.global_step, ended.selection, ended.scores)

        # The live model is fused now: its base weights are the plain model.
        changes = ended.weight_changes if any(ended.weight_changes or []) else None  # none over NF4
        commit = self.save_checkpoint(
            label=f"stage_{finished + 1}", fused=False, before_state=write_selection_log, defer_commit=changes is not None
        )
        if changes is not None:  # rank zero

            def record_and_commit(ranks) -> None:
                record_effective_ranks(self._output_dir, finished + 1, ranks)
                commit()

            self._ranking.submit(changes, then=record_and_commit)
        utils.log_rank_zero(
            log, f"stage {finished + 1} boundary took {time.perf_counter() - start:.3f}s (fusion, checks, checkpoint)"
        )

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, label: str, fused: bool, before_state: Optional[Callable[[], None]] = None, defer_commit: bool = False
    ) -> Optional[Callable[[], None]]:
        """Write the plain model (HF in -> HF out) as ``output_dir/label`` and the resume state.

        ``fused=False``: the live model was just merged, so its base weights are
        the plain model. ``fused=True``: fuse a CPU copy, leaving training as is;
        it must reproduce the wrapped model on the probe batch, or nothing is saved.
        ``before_state`` runs between the two: what must be on disk before a resume
        could start from this checkpoint (a stage boundary's selection log).
        ``defer_commit``: rank 0 returns the last step, making the resume state current,
        instead of taking it (see :func:`~apex_tune.training.checkpointing.write_recipe_state`).
        """
        self._finish_effective_ranks(wait=True)  # the previous boundary's state is current first
        fault_point(f"save:{label}")
        wrapped_sd = training.gather_cpu_state_dict(self._model, self._is_rank_zero)
        ranker_state = self._ranker.state_dict()  # a collective: summed over ranks, kept by rank 0
        selection = get_selection(self._model)
        failure = [None]
        if self._is_rank_zero:
            plain, failure[0] = plain_checkpoint_state(
                base_layout_state_dict(self._model, wrapped_sd),  # gathered in the live FFN layout
                fold=fused or self.settings.quantize_base,  # a quantized base is never merged in place
                build_model=self._build_model_in_run_dtype, settings=self.settings, selection=selection,
                probe_tokens=self._probe, dtype=self._dtype, tolerance=self.options.fusion_tolerance, label=label,
            )
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise CheckpointError(failure[0])
        if self._is_rank_zero:
            write_model_checkpoint(self._checkpointer, plain, self._output_dir, label, self.global_step)
            del plain
        del wrapped_sd
        if before_state is not None:
            before_state()
        fault_point(f"save_state:{label}")
        progress = Progress(self.epochs_run, self.global_step, self.steps_in_epoch, self.stage)
        commit = save_recipe_state(
            self._output_dir, label, model=self._model, optimizer=self._optimizer, dataloader=self._dataloader,
            ranker_state=ranker_state if self._is_rank_zero else None, selection=selection,
            data_counts=self._data_counts, progress=progress, seed=self.seed, total_steps=self.total_steps,
            epoch_done=self.steps_in_epoch >= self._steps_per_epoch, rank=self.rank, world_size=self.world_size,
            defer_commit=defer_commit,
        )
        dist.barrier()
        return commit

    def _build_model_in_run_dtype(self) -> nn.Module:
        with training.set_default_dtype(self._dtype):
            return config.instantiate(self._cfg.model)

    def _restore(self, resumed: Dict[str, Any]) -> None:
        restored = restore_recipe_state(
            resumed, self._output_dir, model=self._model, optimizer=self._optimizer, dataloader=self._dataloader,
            ranker=self._ranker, keep_ranker=self._is_rank_zero, seed=self.seed, total_steps=self.total_steps,
        )
        self._data_counts.update(restored.data_counts)
        self.epochs_run, self.global_step, self.steps_in_epoch, self.stage = restored.progress
        if self._is_rank_zero:
            remove_unfinished_checkpoints(self._output_dir, self.global_step, self.total_steps)
        utils.log_rank_zero(
            log, f"resumed from {restored.checkpoint} at step {self.global_step}, stage {self.stage + 1}"
        )

    def cleanup(self) -> None:
        if hasattr(self, "_ranking"):  # after a failure too: a boundary's state still becomes current
            self._ranking.close()
        if self._is_rank_zero and hasattr(self, "_metric_logger"):
            self._metric_logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    # torchtune prints on "rank zero" by asking torch.distributed, which is not initialised
    # yet here: every process would print the whole config. torchrun's RANK says who is.
    if int(os.environ.get("RANK", "0")) == 0:
        config.log_config(recipe_name="ApexFinetuneRecipe", cfg=cfg)
    recipe = ApexFinetuneRecipe(cfg=cfg)
    try:
        recipe.setup(cfg=cfg)
        recipe.train()
    finally:
        recipe.cleanup()


def main() -> None:
    try:  # --config takes a shipped name (llama2/7B_apex) as well as a path
        sys.argv = [sys.argv[0]] + resolve_config_argument(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"apex_finetune: {e}")
    try:
        recipe_main()
    except (ConfigError, TrainingFault, CheckpointError) as e:
        exit_with_one_line(e)


if __name__ == "__main__":
    main()
