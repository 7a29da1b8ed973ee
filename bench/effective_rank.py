"""Effective rank of the weight change: APEX against LoRA and full fine-tuning, and
what recording it adds to a stage boundary (``python -m bench.effective_rank``).

Comparison: the instruction-tuning task of bench/quality.py, seed 0, each main
method trained as there; per projection the mean over layers of the effective
rank of the whole run's change against the base (LoRA merged, APEX fused), and
APEX's per-stage ranks as the recipe records them.

Cost: times ``fold_apex_`` (the fusion at a stage boundary) with and without
``effective_ranks=True`` on the tiny model (dev/tiny_apex) and the benchmark's
base model (APEX + delta, as in bench/quality.py), interleaved, median of many
repeats, and a training step of the same model, so the extra time can be read
against the fusion alone and against a stage. Writes
bench/results/effective_rank.json (both parts).
"""

import statistics
import time

import torch

from apex_tune import ApexSettings, apply_apex, fold_apex_, set_apex_trainable, set_selection
from apex_tune.dev.tiny import tiny_llama3
from bench.common import MODEL, log, setup_torch, write_json
from torchtune.models.llama3 import llama3

REPEATS = 41
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
    with_ranks, without = [], []
    for i in range(REPEATS):
        with torch.no_grad():  # operators off identity, as after a stage
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn(p.shape))
        for flag, times in ((True, with_ranks), (False, without)) if i % 2 else ((False, without), (True, with_ranks)):
            start = time.perf_counter()
            fold_apex_(model, seed=i, effective_ranks=flag)
            times.append(time.perf_counter() - start)
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
        "effective_rank_extra_ms": 1e3 * extra,
        "extra_vs_merge_percent": 100 * extra / merge,
        "train_step_ms (batch 4 x 128)": 1e3 * step,
        "extra_vs_one_train_step_percent": 100 * extra / step,
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
    setup_torch()
    cost = {name: measure(build, settings) for name, (build, settings) in CASES.items()}
    for name, r in cost.items():
        log(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    log(f"wrote {write_json('effective_rank.json', dict(cost=cost, comparison=compare()))}")


if __name__ == "__main__":
    main()
