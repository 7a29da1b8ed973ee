"""The assessment pass: score units on training examples (no grad) and select P/N/E.

Shared by the ``apex_finetune`` recipe (before stage 1), ``apex-tune assess``
(which writes the selection file that :func:`apex_tune.models.apex_model`
reads in torchtune's own recipes) and the benchmarks (:func:`score_units`).
"""

from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm
from torchtune import utils

from apex_tune.modules.model import bypass_unchanged_wrappers
from apex_tune.modules.ranking import ActivationRanker
from apex_tune.modules.selection import LayerSelection, write_selection_file
from apex_tune.training.stages import choose_selection
from apex_tune.training.testing import fault_point


@torch.no_grad()
def score_units(
    model: nn.Module, ranker: ActivationRanker, batches: Iterable[Tuple[Dict[str, torch.Tensor], torch.Tensor]]
) -> None:
    """Add the scores of ``batches`` (model inputs, mask of the tokens that count) to
    ``ranker``: forward passes in eval mode, no grad; the ranker is left attached and the
    model in the mode it was in.

    The scores read only the layers' output_proj inputs and gate activations, so each
    forward skips what follows the last hooked layer (:meth:`ActivationRanker.stop_after_last_hook`):
    the final norm and the output head, about a fifth of Llama-3.2-1B's forward at its
    128k vocabulary. Wrappers that still compute their base linear exactly (all of them
    before stage 1) run as that linear alone (:func:`bypass_unchanged_wrappers`)."""
    ranker.attach()
    was_training = model.training
    model.eval()
    try:
        with bypass_unchanged_wrappers(model):
            for inputs, mask in batches:
                ranker.begin_microbatch(mask)
                with ranker.stop_after_last_hook():
                    model(**inputs)
    finally:
        model.train(was_training)


def assess(
    model: nn.Module,
    ranker: ActivationRanker,
    dataset: Dataset,
    collate_fn: Callable,
    token_mask: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    num_samples: int,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> Tuple[List[LayerSelection], Dict[str, Any]]:
    """Score ``num_samples`` examples (a seeded random subset, split over ranks) and select.

    ``token_mask(labels)`` marks the positions whose next token is trained; only
    those count. Scores are summed over ranks. Returns the selection and the
    scores behind it; the ranker is left attached and reset.
    """
    count = min(num_samples, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    subset = Subset(dataset, order[:count].tolist())
    sampler = DistributedSampler(subset, num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(subset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)

    def batches():
        for i, batch in enumerate(tqdm(loader, desc="APEX assessment", disable=rank != 0, dynamic_ncols=True)):
            fault_point(f"assess:{i}")
            utils.batch_to_device(batch, device)
            labels = batch.pop("labels")
            yield batch, token_mask(labels)

    score_units(model, ranker, batches())
    selection, scores = choose_selection(model, ranker, "activation", seed)
    ranker.reset()
    return selection, scores


def next_token_mask(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Positions whose next token is trained (the logits at i are scored on token i + 1)."""
    shifted = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], ignore_index)], dim=-1)
    return shifted != ignore_index


def assess_config(cfg, output: Optional[Path] = None, num_samples: Optional[int] = None) -> Path:
    """``apex-tune assess``: the assessment pass of a config alone, written as a selection file.

    ``cfg`` is an ``apex_finetune`` config (settings from its ``apex`` section) or
    a torchtune recipe config whose ``model`` is :func:`apex_tune.models.apex_model`
    (settings from its arguments; by default the file goes to its ``selection_file``).
    Uses the config's checkpointer, tokenizer, dataset, batch_size, seed, device and dtype.
    """
    from omegaconf import OmegaConf
    from torchtune import config, training
    from torchtune.config._utils import _get_component_from_path

    from apex_tune.models.builders import builder_settings, uses_apex_model
    from apex_tune.modules.model import apply_apex
    from apex_tune.modules.config import ApexSchedule, parse_apex_config
    from apex_tune.training.run_options import build_dataset, build_tokenizer

    if uses_apex_model(cfg.model):
        base_cfg, settings, selection_file = builder_settings(OmegaConf.to_container(cfg.model, resolve=True))
        base_cfg = OmegaConf.create(base_cfg)
        output = output or (Path(selection_file) if selection_file else None)
        schedule = ApexSchedule()
    else:
        settings, schedule = parse_apex_config(cfg.get("apex"))
        base_cfg = cfg.model
    if output is None:
        raise ValueError("--output: where to write the selection (or set model.selection_file in the config)")
    num_samples = num_samples or schedule.assess_samples
    device = utils.get_device(cfg.get("device", "cpu"))
    dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=device)
    checkpointer = config.instantiate(cfg.checkpointer, resume_from_checkpoint=False, should_load_recipe_state=False)
    state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(base_cfg)
    model.load_state_dict(state)
    apply_apex(model, settings)
    tokenizer = build_tokenizer(cfg.tokenizer)
    dataset = build_dataset(cfg.dataset, tokenizer)
    ignore_index = cfg.get("loss", {}).get("ignore_index", -100)
    collate = _get_component_from_path(cfg.get("collate_fn", "torchtune.data.padded_collate_sft"))
    selection, scores = assess(
        model,
        ActivationRanker(model, settings),
        dataset,
        partial(collate, padding_idx=tokenizer.pad_id, ignore_idx=ignore_index),
        partial(next_token_mask, ignore_index=ignore_index),
        cfg.batch_size,
        num_samples,
        cfg.get("seed") or 0,
        device,
    )
    write_selection_file(output, selection, settings, scores, min(num_samples, len(dataset)))
    return Path(output)
