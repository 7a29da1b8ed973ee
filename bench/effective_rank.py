"""Effective rank of the weight change: APEX against LoRA and full fine-tuning, and
what recording it adds to a stage boundary (``python -m bench.effective_rank``).

Comparison: the instruction-tuning task of bench/quality.py, seed 0, each main
method trained as there; per projection the mean over layers of the effective
rank of the whole run's change against the base (LoRA merged, APEX fused), and
APEX's per-stage ranks as the recipe records them.

Cost, at the tiny model's size (dev/tiny_apex, operators only) and the benchmark
base's (APEX + delta, as in bench/quality.py):

- ``boundary``: the recipe itself (``recipes/apex_finetune.py``, in-process, one
  rank, fp32 on CPU, random base weights) runs ``BOUNDARY_STAGES`` short stages;
  "a stage boundary" is the recipe's whole ``_stage_boundary``: re-selection from
  the stage's activation scores, ``end_stage`` (finiteness check, the probe batch
  before and after the fold, the fold handing back the changes, operator, ranker and
  optimizer reset), logging, and the checkpoint the recipe saves at every
  boundary (the plain model through torchtune's HF checkpointer plus the resume
  state). The effective ranks are computed on a background thread after the
  boundary, while the next stage trains, and that thread then makes the boundary's
  resume state current (``apex_tune/training/effective_ranks.py``); the bench records
  them at half the boundaries (interleaved with, without, without, with, ...) and
  reports, per adjacent pair, the boundary's extra wall time with them as a share of
  the one without (median and max over pairs; a boundary is charged any wait for its
  ranks, wherever it fell, and not a wait for an earlier one's), the same for the training of the
  stage after the boundary (``STEPS_PER_STAGE`` steps: where the work went), the
  worker's wall and CPU time, how long the recipe ever waited for the worker (at the
  next save), and the CPU time of the recipe's own thread per boundary.
- ``fusion``: ``fold_apex_`` alone plain, with ``effective_ranks=True`` (the
  synchronous path) and with ``weight_changes=True`` (what the recipe does),
  interleaved, median of many repeats, against a training step of the same model.

Writes bench/results/effective_rank.json; ``--cost-only`` reruns the cost part and
keeps the comparison already there.
"""

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from apex_tune import ApexSettings, apply_apex, fold_apex_, set_apex_trainable, set_selection
from apex_tune.dev.tiny import TINY_MODEL, make_tiny_assets, save_hf_llama, tiny_llama3
from bench.common import MODEL, REPO, RESULTS_DIR, log, setup_torch, write_json
from torchtune.models.llama3 import llama3

REPEATS = 41
BOUNDARY_STAGES = 41  # 20 interleaved pairs; the last boundary (no re-selection) is left out
STEPS_PER_STAGE = 2
CASES = {
    "tiny (dev/tiny_apex, operators only)": (tiny_llama3, ApexSettings(ratio=0.25)),
    "benchmark base (APEX + delta)": (
        lambda: llama3(**MODEL),
        ApexSettings(ratio=0.1875, delta=True, tuned_ratio_heads=0.5, tuned_ratio_channels=0.5),
    ),
}


def _selection(model, settings, seed):
    from apex_tune import random_selection

    return random_selection(model, torch.Generator().manual_seed(seed))


def measure(build, settings: ApexSettings) -> dict:
    torch.manual_seed(0)
    model = build()
    apply_apex(model, settings)
    set_apex_trainable(model, settings)
    set_selection(model, _selection(model, settings, 0))
    arms = {"ranks": dict(effective_ranks=True), "changes": dict(weight_changes=True), "plain": {}}
    times = {arm: [] for arm in arms}
    for i in range(REPEATS):
        with torch.no_grad():  # operators off identity, as after a stage
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn(p.shape))
        order = list(arms) if i % 2 else list(reversed(arms))
        for arm in order:
            start = time.perf_counter()
            fold_apex_(model, seed=i, **arms[arm])
            times[arm].append(time.perf_counter() - start)
    with_ranks, without, with_changes = times["ranks"], times["plain"], times["changes"]
    tokens = torch.randint(0, model.tok_embeddings.num_embeddings, (4, 128))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    steps = []
    for _ in range(7):
        start = time.perf_counter()
        model(tokens).float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append(time.perf_counter() - start)
    merge, merge_ranked, step = statistics.median(without), statistics.median(with_ranks), statistics.median(steps)
    extra = merge_ranked - merge
    return {
        "merge_ms": 1e3 * merge,
        "merge_with_effective_rank_ms": 1e3 * merge_ranked,
        "merge_handing_back_changes_ms": 1e3 * statistics.median(with_changes),
        "effective_rank_extra_ms": 1e3 * extra,
        "extra_vs_merge_percent": 100 * extra / merge,
        "train_step_ms (batch 4 x 128)": 1e3 * step,
        "extra_vs_one_train_step_percent": 100 * extra / step,
    }


def _recipe_config(assets: Path, output_dir: Path, model: dict, settings: ApexSettings):
    cfg = OmegaConf.load(REPO / "configs" / "dev" / "tiny_apex.yaml")
    cfg.assets_dir, cfg.output_dir = str(assets), str(output_dir)
    cfg.model.update(model)
    cfg.apex.update(
        ratio=settings.ratio,
        delta=settings.delta,
        tuned_ratio_heads=settings.tuned_ratio_heads,
        tuned_ratio_channels=settings.tuned_ratio_channels,
        num_stages=BOUNDARY_STAGES,
    )
    cfg.epochs, cfg.max_steps_per_epoch = 1, BOUNDARY_STAGES * STEPS_PER_STAGE
    return cfg


def median_interval(values, confidence: float = 0.95):
    """Distribution-free interval for the median: the k-th smallest and k-th largest of
    ``values``, k the largest with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2."""
    ordered, n = sorted(values), len(values)
    k, tail = 0, 0.0
    while True:
        tail += math.comb(n, k) / 2**n
        if tail > (1 - confidence) / 2:
            break
        k += 1
    return [ordered[k - 1], ordered[n - k]] if k > 0 else [ordered[0], ordered[-1]]


def boundary(model: dict, settings: ApexSettings, assets: Path) -> dict:
    """Run the recipe with the effective ranks recorded at some boundaries and not at
    others (interleaved, ABBA: with, without, without, with, ...), timing each boundary,
    the training of the stage after it (where the ranks are now computed), the worker's
    time in the ranks, and any wait for them (at the next save)."""
    import apex_finetune
    import apex_tune.training.effective_ranks as background

    stage_end, rank = apex_finetune.end_stage, background.effective_ranks
    submit, join = background.BackgroundEffectiveRanks.submit, background.BackgroundEffectiveRanks.join
    record = []  # per boundary: whether the ranks are recorded
    worker_wall, worker_cpu, waited = {}, {}, {}
    # The boundary whose ranks are pending, and the boundary running now (None between them):
    # a wait for boundary i's ranks inside boundary j is charged to i, not j.
    submitted, in_boundary, moved = [], [None], {}

    def end_stage(*args, weight_changes, **kwargs):
        return stage_end(*args, weight_changes=weight_changes and record[-1], **kwargs)

    def timed_rank(changes):
        start, cpu = time.perf_counter(), time.thread_time()
        value = rank(changes)
        worker_wall[len(record) - 1], worker_cpu[len(record) - 1] = time.perf_counter() - start, time.thread_time() - cpu
        return value

    def indexed_submit(self, changes, then=None):
        submitted.append(len(record) - 1)
        return submit(self, changes, then)

    def timed_join(self):
        ranked_at = submitted.pop(0)
        start = time.perf_counter()
        value = join(self)
        waited[ranked_at] = time.perf_counter() - start
        if in_boundary[0] is not None and in_boundary[0] != ranked_at:
            moved[in_boundary[0]] = moved.get(in_boundary[0], 0.0) + waited[ranked_at]
        return value

    boundary_seconds, main_cpu_seconds = [], []  # wall, and CPU of the recipe's own thread
    boundary_ends = []  # when each boundary returned: the next stage's training starts there
    launch_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with tempfile.TemporaryDirectory() as output_dir:
        torch.manual_seed(0)
        save_hf_llama(tiny_llama3(**model), assets / "base", model)
        cfg = _recipe_config(assets, Path(output_dir), model, settings)
        recipe = apex_finetune.ApexFinetuneRecipe(cfg=cfg)
        stage_boundary = recipe._stage_boundary

        def timed_boundary():
            record.append(len(record) % 4 in (0, 3))
            in_boundary[0] = len(record) - 1
            start, cpu = time.perf_counter(), time.thread_time()
            stage_boundary()
            in_boundary[0] = None
            boundary_ends.append(time.perf_counter())
            boundary_seconds.append(boundary_ends[-1] - start)
            main_cpu_seconds.append(time.thread_time() - cpu)

        recipe._stage_boundary = timed_boundary
        apex_finetune.end_stage, background.effective_ranks = end_stage, timed_rank
        background.BackgroundEffectiveRanks.submit = indexed_submit
        background.BackgroundEffectiveRanks.join = timed_join
        try:
            recipe.setup(cfg=cfg)
            recipe.train()
        finally:
            apex_finetune.end_stage, background.effective_ranks = stage_end, rank
            background.BackgroundEffectiveRanks.submit, background.BackgroundEffectiveRanks.join = submit, join
            recipe.cleanup()
            for key, value in launch_env.items():  # the recipe set a one-rank rendezvous; the next run picks its own
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    # Each boundary as charged: less any wait inside it for an earlier boundary's ranks, plus
    # any wait for its own ranks (at a later save or the end of the run, wherever it fell).
    charged = [b - moved.get(i, 0.0) + waited.get(i, 0.0) for i, b in enumerate(boundary_seconds)]
    # The training after boundary i: from its end to the start of boundary i + 1.
    next_stage_seconds = [
        (boundary_ends[i + 1] - boundary_seconds[i + 1]) - boundary_ends[i] for i in range(len(boundary_ends) - 1)
    ]
    # Boundaries in pairs (one with, one without, adjacent): the last one has no re-selection
    # nor a stage after it and is left out, as is an unpaired one.
    pairs = [(2 * i, 2 * i + 1) for i in range((len(boundary_seconds) - 1) // 2)]

    def median_of(seconds, ranked: bool):
        return statistics.median(1e3 * seconds[i] for a, b in pairs for i in (a, b) if record[i] == ranked)

    def compared(name: str, seconds) -> dict:
        """Per adjacent pair, the extra time with the ranks as a share of the time without."""
        shares = []
        for a, b in pairs:
            with_ranks, without = (a, b) if record[a] else (b, a)
            shares.append(100 * (seconds[with_ranks] - seconds[without]) / seconds[without])
        return {
            f"{name}_ms": [round(1e3 * t, 2) for t in seconds],
            f"median_{name}_with_ranks_ms": median_of(seconds, True),
            f"median_{name}_without_ranks_ms": median_of(seconds, False),
            f"{name}_pair_share_percent": [round(x, 2) for x in shares],
            f"median_share_of_{name}_percent": statistics.median(shares),
            f"median_share_of_{name}_ci95_percent": median_interval(shares),
            f"max_share_of_{name}_percent": max(shares),
        }

    ranked = [i for i, r in enumerate(record) if r]
    return {
        "boundaries": len(boundary_seconds),
        "steps_per_stage": STEPS_PER_STAGE,
        "records_ranks": record,
        "uncharged_boundary_ms": [round(1e3 * b, 2) for b in boundary_seconds],
        **compared("boundary", charged),
        **compared("next_stage", next_stage_seconds),
        "main_thread_cpu_ms": [round(1e3 * c, 2) for c in main_cpu_seconds],
        "median_main_thread_cpu_with_ranks_ms": median_of(main_cpu_seconds, True),
        "median_main_thread_cpu_without_ranks_ms": median_of(main_cpu_seconds, False),
        "worker_ms": [round(1e3 * worker_wall[i], 3) for i in ranked],
        "worker_cpu_ms": [round(1e3 * worker_cpu[i], 3) for i in ranked],
        "waited_at_join_ms": [round(1e3 * waited[i], 3) for i in ranked if i in waited],
        "median_worker_ms": 1e3 * statistics.median(worker_wall[i] for i in ranked),
        "median_worker_cpu_ms": 1e3 * statistics.median(worker_cpu[i] for i in ranked),
        "median_waited_at_join_ms": 1e3 * statistics.median(waited[i] for i in ranked if i in waited),
        "max_waited_at_join_ms": 1e3 * max(waited[i] for i in ranked if i in waited),
    }


def compare() -> dict:
    from bench.common import load_data
    from bench.quality import DEFAULT, LABELS, Bench, learning_rates

    lrs, _ = learning_rates(DEFAULT)
    bench = Bench(load_data(), DEFAULT, lrs)
    results = {}
    for method in ("full", "lora", "apex", "apex_delta"):
        record = bench.run("instruction_tuning", method, seed=0)
        name = LABELS[method] + (f" (rank {bench.lora_rank})" if method == "lora" else "")
        results[name] = {
            "trainable": record["trainable"],
            "val_loss": record["val_loss"],
            "whole_run_vs_base": record["effective_rank"],
            "per_stage": record.get("stage_effective_rank"),
        }
        log(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in record["effective_rank"].items()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost-only", action="store_true", help="keep the comparison in the existing JSON")
    args = parser.parse_args()
    threads = setup_torch()
    cost = {"torch_threads": threads}
    with tempfile.TemporaryDirectory() as assets:
        # batches of 8 (dev/tiny_apex): enough rows for every stage in one epoch
        make_tiny_assets(Path(assets), num_train=8 * BOUNDARY_STAGES * STEPS_PER_STAGE, num_val=20)
        for (name, (build, settings)), geometry in zip(CASES.items(), (TINY_MODEL, MODEL)):
            cost[name] = {"boundary": boundary(geometry, settings, Path(assets)), "fusion": measure(build, settings)}
            b = cost[name]["boundary"]
            log(
                f"{name}: stage boundary {b['median_boundary_without_ranks_ms']:.1f} ms without the effective "
                f"ranks, {b['median_boundary_with_ranks_ms']:.1f} ms with; paired share "
                f"{b['median_share_of_boundary_percent']:.2f}% median (95% interval "
                f"{b['median_share_of_boundary_ci95_percent'][0]:.2f} to {b['median_share_of_boundary_ci95_percent'][1]:.2f}%), "
                f"{b['max_share_of_boundary_percent']:.2f}% max; "
                f"the next stage's training ({STEPS_PER_STAGE} steps) {b['median_next_stage_without_ranks_ms']:.1f} ms "
                f"without, {b['median_next_stage_with_ranks_ms']:.1f} ms with (paired share "
                f"{b['median_share_of_next_stage_percent']:.2f}% median, 95% interval "
                f"{b['median_share_of_next_stage_ci95_percent'][0]:.2f} to {b['median_share_of_next_stage_ci95_percent'][1]:.2f}%); "
                f"worker {b['median_worker_ms']:.2f} ms ({b['median_worker_cpu_ms']:.2f} ms CPU), waited for it "
                f"{b['median_waited_at_join_ms']:.2f} ms median, {b['max_waited_at_join_ms']:.2f} ms max; "
                f"recipe thread's CPU {b['median_main_thread_cpu_without_ranks_ms']:.1f} ms without, "
                f"{b['median_main_thread_cpu_with_ranks_ms']:.1f} ms with"
            )
    if args.cost_only:
        comparison = json.loads((RESULTS_DIR / "effective_rank.json").read_text())["comparison"]
    else:
        comparison = compare()
    log(f"wrote {write_json('effective_rank.json', dict(cost=cost, comparison=comparison))}")


if __name__ == "__main__":
    main()
