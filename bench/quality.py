"""Quality: instruction tuning on GSM8K and continued pre-training KJV -> Tiny Shakespeare,
all from one pre-trained base, for full fine-tuning, LoRA, DoRA and APEX (operators only,
and with the dense delta at LoRA's trainable budget), plus APEX ablations (random
selection, T stages, K) and data efficiency (APEX on a third of the tokens).

    python -m bench.quality            # default mode (what `make bench` runs)
    python -m bench.quality --full     # more seeds, steps and evaluation data (an hour or more)
    python -m bench.quality --sweep    # learning-rate sweep -> results/lr_sweep.json (add --full for that mode)

Every method of a task sees the same batches in the same order for a given seed.
"""

import argparse
import json
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from typing import Dict, List, Optional, Sequence

import torch

from apex_tune import trainable_parameter_report
from bench.common import (
    IGNORE,
    MODEL,
    PRETRAIN,
    RESULTS_DIR,
    ApexRun,
    ApexSettings,
    Data,
    base_model,
    base_state,
    change_effective_ranks,
    count_trainable,
    eval_windows,
    exact_match,
    load_data,
    log,
    lora_model,
    lora_params_per_rank,
    mean_loss,
    merged_lora,
    perplexity,
    setup_torch,
    sft_batch,
    sft_batches,
    timed,
    train,
    window_batches,
    write_json,
)

METHODS = ("full", "lora", "dora", "apex", "apex_delta")
LABELS = {
    "base": "base model (no tuning)",
    "full": "full fine-tuning",
    "lora": "LoRA",
    "dora": "DoRA",
    "apex": "APEX, operators only",
    "apex_delta": "APEX + delta",
}
# K = 18.75% (the paper's best for instruction tuning), T = 2 (the reference).
APEX_OPS = ApexSettings(ratio=0.1875)
# Delta on N, P and E = half of each layer's units; LoRA's rank is matched to this budget.
APEX_DELTA = ApexSettings(ratio=0.1875, delta=True, tuned_ratio_heads=0.5, tuned_ratio_channels=0.5)
APEX_STAGES = 2
# Used when results/lr_sweep.json is absent; the committed sweep overrides them.
DEFAULT_LR = {"full": 3e-4, "lora": 3e-3, "dora": 3e-3, "apex": 1e-2, "apex_delta": 1e-3}
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)
SWEEP_EXTEND = 2  # extra points past an edge best
SWEEP_FILE = "lr_sweep.json"
WORKERS_ENV = "APEX_BENCH_WORKERS"


@dataclass(frozen=True)
class Mode:
    seeds: int  # main methods
    ablation_seeds: int
    it_steps: int
    it_batch: int  # problems per step
    cpt_steps: int
    cpt_batch: int  # windows per step
    cpt_seq: int
    val_problems: int  # validation answer loss (of the 600 held out)
    em_problems: int  # greedy exact match (slow: generation)
    eval_windows: int  # 128-token windows per held-out perplexity
    assess_examples: int  # scored before APEX stage 1


DEFAULT = Mode(
    seeds=3, ablation_seeds=1, it_steps=75, it_batch=4, cpt_steps=75, cpt_batch=8, cpt_seq=128,
    val_problems=160, em_problems=24, eval_windows=64, assess_examples=64,
)
FULL = Mode(
    seeds=5, ablation_seeds=3, it_steps=200, it_batch=8, cpt_steps=200, cpt_batch=16, cpt_seq=128,
    val_problems=600, em_problems=100, eval_windows=10_000, assess_examples=256,
)


# ------------------------------------------------------------------ tasks
class InstructionTuning:
    """GSM8K: loss on answer tokens only; validation answer loss and '####' exact match."""

    name = "instruction_tuning"

    def __init__(self, data: Data, mode: Mode):
        self.data, self.mode = data, mode
        val = data.it_val[: mode.val_problems]
        self.val_batches = [sft_batch(val[i : i + 16]) for i in range(0, len(val), 16)]
        self.em_rows = data.corpus.gsm_val[: mode.em_problems]
        self.steps = mode.it_steps

    def batches(self, seed: int):
        return sft_batches(self.data.it_train, self.steps, self.mode.it_batch, seed)

    def assess_batches(self, seed: int):
        b = self.mode.it_batch
        return sft_batches(self.data.it_train, self.mode.assess_examples // b, b, seed + 10_000)

    def evaluate(self, model) -> Dict[str, float]:
        return {
            "val_loss": mean_loss(model, self.val_batches),
            "exact_match": exact_match(model, self.data.sp, self.em_rows, max_new=192),
        }


class ContinuedPretraining:
    """Base (KJV) continued on Tiny Shakespeare: held-out perplexity on both."""

    name = "continued_pretraining"

    def __init__(self, data: Data, mode: Mode):
        self.data, self.mode = data, mode
        self.new = eval_windows(data.shakes_heldout, mode.eval_windows, 128)
        self.old = eval_windows(data.kjv_heldout, mode.eval_windows, 128)
        self.steps = mode.cpt_steps

    def batches(self, seed: int):
        m = self.mode
        return window_batches(self.data.shakes_train, self.steps, m.cpt_batch, m.cpt_seq, seed)

    def assess_batches(self, seed: int):
        m = self.mode
        return window_batches(self.data.shakes_train, m.assess_examples // m.cpt_batch, m.cpt_batch, m.cpt_seq, seed + 10_000)

    def evaluate(self, model) -> Dict[str, float]:
        return {"ppl_new": perplexity(model, self.new), "ppl_old": perplexity(model, self.old)}


# ------------------------------------------------------------------- runs
class Bench:
    def __init__(self, data: Data, mode: Mode, lrs: Dict[str, Dict[str, float]]):
        self.data, self.mode, self.lrs = data, mode, lrs
        self.state, self.base_meta = base_state(data)
        self.tasks = {t.name: t for t in (InstructionTuning(data, mode), ContinuedPretraining(data, mode))}
        apex_budget = count_trainable(ApexRun(APEX_DELTA).wrap(base_model(self.state)))
        self.lora_rank = max(1, round(apex_budget / lora_params_per_rank()))

    def run(
        self,
        task_name: str,
        method: str,
        seed: int,
        group: str = "main",
        name: Optional[str] = None,
        apex: Optional[ApexRun] = None,
        steps: Optional[int] = None,
        lr: Optional[float] = None,
    ) -> dict:
        """Train one method on one task, evaluate it, return the record."""
        task = self.tasks[task_name]
        lr = lr if lr is not None else self.lrs[task_name][method]
        batches = task.batches(seed)[:steps]
        if method == "full":
            model = base_model(self.state)
        elif method in ("lora", "dora"):
            model = lora_model(self.state, self.lora_rank, dora=method == "dora", seed=seed)
        else:
            apex = apex or ApexRun(APEX_DELTA if method == "apex_delta" else APEX_OPS, APEX_STAGES, seed=seed)
            model = apex.wrap(base_model(self.state))
        trainable = count_trainable(model)
        by_kind = trainable_parameter_report(model)["by_kind"] if apex is not None else None
        torch.manual_seed(seed)
        if apex is not None:
            losses, seconds = timed(apex.train, model, batches, lr, task.assess_batches(seed))
        else:
            losses, seconds = timed(train, model, batches, lr)
        if method in ("lora", "dora"):
            model = merged_lora(model, self.lora_rank)
        # Every method is evaluated as the plain base architecture (APEX comes back fused).
        metrics, eval_seconds = timed(task.evaluate, model)
        effective_ranks = change_effective_ranks(model, self.state)
        record = dict(
            task=task_name,
            group=group,
            name=name or method,
            method=method,
            seed=seed,
            lr=lr,
            steps=len(batches),
            tokens=sum(int((labels != IGNORE).sum()) for _, labels in batches),
            trainable=trainable,
            train_seconds=seconds,
            eval_seconds=eval_seconds,
            final_train_loss=statistics.mean(losses[-10:]),
            effective_rank=effective_ranks,
            **metrics,
        )
        if apex is not None:
            record.update(
                stages=apex.stages,
                selection=apex.selection,
                ratio=apex.settings.ratio,
                trainable_by_kind={k: v["trainable"] for k, v in by_kind.items() if v["trainable"]},
                assess_seconds=apex.assess_seconds,
                merge_seconds=apex.merge_seconds,
                stage_seconds=apex.stage_seconds,
                stage_effective_rank=apex.stage_effective_ranks,
            )
        if seed == 0 and group == "main":
            record["loss_curve"] = [round(statistics.mean(losses[i : i + 5]), 4) for i in range(0, len(losses), 5)]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log(f"  {task_name:<22} {record['name']:<24} seed {seed}  lr {lr:.2g}  {seconds:5.1f}s + eval {eval_seconds:4.1f}s  {shown}")
        return record

    def base_metrics(self) -> Dict[str, Dict[str, float]]:
        return {name: task.evaluate(base_model(self.state)) for name, task in self.tasks.items()}


def plan(mode: Mode) -> List[dict]:
    """Every run of the benchmark, as keyword arguments of :meth:`Bench.run`.

    Main methods on both tasks; ablations on instruction tuning, each one change to
    APEX + delta (T = 2, K = 18.75%, activation selection), whose reference point is
    the main run of the same seed; data efficiency on continued pre-training, APEX +
    delta and full FT on the first third of the same token stream.
    """
    jobs = [
        dict(task_name=task, method=method, seed=seed)
        for task in ("instruction_tuning", "continued_pretraining")
        for seed in range(mode.seeds)
        for method in METHODS
    ]
    variants = [("selection=random", dict(selection="random"))]
    variants += [(f"T={t}", dict(stages=t)) for t in (1, 3, 4)]
    variants += [(f"K={100 * k:g}%", dict(settings=replace(APEX_DELTA, ratio=k))) for k in (0.0625, 0.125, 0.25)]
    for seed in range(mode.ablation_seeds):
        for variant, change in variants:
            apex = replace(ApexRun(APEX_DELTA, APEX_STAGES, seed=seed), **change)
            jobs.append(
                dict(task_name="instruction_tuning", method="apex_delta", seed=seed, group="ablation", name=variant, apex=apex)
            )
    for seed in range(mode.seeds):
        for method in ("apex_delta", "full"):
            jobs.append(
                dict(
                    task_name="continued_pretraining", method=method, seed=seed, group="data_efficiency",
                    name=f"{LABELS[method]}, 1/3 of the tokens", steps=mode.cpt_steps // 3,
                )
            )
    return jobs


_WORKER: Optional[Bench] = None


def _init_worker(mode: Mode, lrs: dict) -> None:
    global _WORKER
    setup_torch()
    _WORKER = Bench(load_data(), mode, lrs)


def _run_job(job: dict) -> dict:
    return _WORKER.run(**job)


def num_workers() -> int:
    return int(os.environ.get(WORKERS_ENV, os.cpu_count() or 1))


def execute(jobs: List[dict], mode: Mode, lrs: dict) -> List[dict]:
    """Run the jobs on $APEX_BENCH_WORKERS single-threaded processes (default: one per
    core), in order of submission; records come back in the same order."""
    workers = min(num_workers(), len(jobs))
    if workers <= 1:
        _init_worker(mode, lrs)
        return [_run_job(job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(mode, lrs)) as pool:
        return list(pool.map(_run_job, jobs))


# ---------------------------------------------------------------- summary
def mean_std(values: Sequence[float]) -> Dict[str, float]:
    values = list(values)
    return dict(
        mean=statistics.mean(values),
        std=statistics.stdev(values) if len(values) > 1 else 0.0,
        n=len(values),
    )


METRICS = {"instruction_tuning": ("val_loss", "exact_match"), "continued_pretraining": ("ppl_new", "ppl_old")}
PRIMARY = {"instruction_tuning": "val_loss", "continued_pretraining": "ppl_new"}  # lower is better


def summarize(runs: List[dict]) -> List[dict]:
    """Mean and sample standard deviation over seeds, per (task, group, name)."""
    keys = []
    for r in runs:
        key = (r["task"], r["group"], r["name"])
        if key not in keys:
            keys.append(key)
    rows = []
    for task, group, name in keys:
        chosen = [r for r in runs if (r["task"], r["group"], r["name"]) == (task, group, name)]
        row = dict(
            task=task,
            group=group,
            name=name,
            method=chosen[0]["method"],
            lr=chosen[0]["lr"],
            trainable=chosen[0]["trainable"],
            tokens=chosen[0]["tokens"],
            train_seconds=statistics.mean(r["train_seconds"] for r in chosen),
        )
        for metric in METRICS[task]:
            row[metric] = mean_std([r[metric] for r in chosen])
        rows.append(row)
    return rows


COMPARISONS = (
    # (what, task, metric, (group, name) of A, (group, name) of B); lower is better everywhere.
    ("instruction tuning, matched budget", "instruction_tuning", "val_loss", ("main", "apex_delta"), ("main", "lora")),
    ("continued pre-training, matched budget", "continued_pretraining", "ppl_new", ("main", "apex_delta"), ("main", "lora")),
    ("forgetting, matched budget", "continued_pretraining", "ppl_old", ("main", "apex_delta"), ("main", "lora")),
    (
        "data efficiency: APEX + delta on 1/3 of the tokens vs full FT on all",
        "continued_pretraining", "ppl_new",
        ("data_efficiency", f"{LABELS['apex_delta']}, 1/3 of the tokens"), ("main", "full"),
    ),
)


def verdicts(summary: List[dict]) -> List[dict]:
    """The comparisons the benchmark is for: APEX + delta vs LoRA at the matched budget on
    each task (and on forgetting), and APEX's data efficiency against full fine-tuning."""
    rows = {(r["task"], r["group"], r["name"]): r for r in summary}
    out = []
    for what, task, metric, a_key, b_key in COMPARISONS:
        a, b = rows[(task, *a_key)], rows[(task, *b_key)]
        out.append(
            dict(
                what=what,
                metric=metric,
                a=label(a["name"]),
                a_mean=a[metric]["mean"],
                b=label(b["name"]),
                b_mean=b[metric]["mean"],
                a_better=a[metric]["mean"] < b[metric]["mean"],
                # A difference inside one seed standard deviation of either is not a clear win.
                clear=abs(a[metric]["mean"] - b[metric]["mean"]) > max(a[metric]["std"], b[metric]["std"]),
            )
        )
    return out


def label(name: str) -> str:
    return LABELS.get(name, name)


def verdict_line(v: dict) -> str:
    winner = v["a"] if v["a_better"] else v["b"]
    note = "" if v["clear"] else " (within one seed standard deviation)"
    return f"{v['what']}: {v['metric']} {v['a']} {v['a_mean']:.4g} vs {v['b']} {v['b_mean']:.4g}: {winner} is better{note}"


def ablation_reference(results: dict) -> dict:
    """The main APEX + delta instruction-tuning runs with the ablations' seeds: the point
    every ablation changes one setting of."""
    seeds = range(results["mode"]["ablation_seeds"])
    runs = [
        r for r in results["runs"]
        if r["group"] == "main" and r["task"] == "instruction_tuning" and r["name"] == "apex_delta" and r["seed"] in seeds
    ]
    return dict(
        trainable=runs[0]["trainable"],
        **{metric: mean_std([r[metric] for r in runs]) for metric in METRICS["instruction_tuning"]},
    )


def print_verdicts(results: dict) -> None:
    for v in verdicts(results["summary"]):
        log(verdict_line(v))


# ------------------------------------------------------------------ plots
def plot(results: dict) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    written = []

    def rows(task, group):
        return [r for r in summary if r["task"] == task and r["group"] == group]

    def bars(ax, items, metric, title, reference=None):
        names = [label(r["name"]) for r in items]
        means = [r[metric]["mean"] for r in items]
        stds = [r[metric]["std"] for r in items]
        ax.bar(range(len(items)), means, yerr=stds, capsize=3, color="tab:blue")
        if reference is not None:
            ax.axhline(reference[0], color="tab:red", ls="--", lw=1, label=reference[1])
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(items)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        extra = [reference[0]] if reference is not None else []
        lo = min([m - s for m, s in zip(means, stds)] + extra)
        hi = max([m + s for m, s in zip(means, stds)] + extra)
        ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))

    # Instruction tuning: methods, ablations, training curves.
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    main = rows("instruction_tuning", "main")
    bars(axes[0], main, "val_loss", "GSM8K validation answer loss (mean ± std over seeds)")
    ref = ablation_reference(results)["val_loss"]["mean"]
    bars(
        axes[1],
        rows("instruction_tuning", "ablation"),
        "val_loss",
        "APEX + delta ablations (val answer loss)",
        reference=(ref, "APEX + delta (T=2, K=18.75%, activation), same seeds"),
    )
    for r in results["runs"]:
        if r["task"] == "instruction_tuning" and "loss_curve" in r:
            axes[2].plot([5 * i for i in range(len(r["loss_curve"]))], r["loss_curve"], label=LABELS[r["name"]])
    axes[2].set_title("training loss (seed 0, 5-step means)", fontsize=9)
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS_DIR / "instruction_tuning.png"
    fig.savefig(path, dpi=110)
    written.append(str(path))

    # Continued pre-training: new vs old perplexity, and data efficiency.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows("continued_pretraining", "main") + rows("continued_pretraining", "data_efficiency"):
        axes[0].errorbar(
            r["ppl_new"]["mean"], r["ppl_old"]["mean"], xerr=r["ppl_new"]["std"], yerr=r["ppl_old"]["std"],
            fmt="o", capsize=3, label=label(r["name"]),
        )
    base = results["base"]["continued_pretraining"]
    axes[0].set_title(f"held-out perplexity (base: Shakespeare {base['ppl_new']:.1f}, KJV {base['ppl_old']:.1f})", fontsize=9)
    axes[0].set_xlabel("Shakespeare (new) perplexity")
    axes[0].set_ylabel("KJV (old) perplexity: forgetting")
    axes[0].legend(fontsize=7, loc="lower left")
    cpt_main = {r["name"]: r for r in rows("continued_pretraining", "main")}
    eff = [cpt_main["full"], cpt_main["apex_delta"]] + rows("continued_pretraining", "data_efficiency")
    bars(axes[1], eff, "ppl_new", "data efficiency: Shakespeare perplexity")
    fig.tight_layout()
    path = RESULTS_DIR / "continued_pretraining.png"
    fig.savefig(path, dpi=110)
    written.append(str(path))
    plt.close("all")
    return written


# ------------------------------------------------------------------- main
def learning_rates(mode: Mode) -> tuple:
    """Per task and method: the sweep's best if results/lr_sweep.json exists, else the defaults."""
    path = RESULTS_DIR / SWEEP_FILE
    if not path.exists():
        return {task: dict(DEFAULT_LR) for task in METRICS}, "built-in defaults (no results/lr_sweep.json)"
    sweep = json.loads(path.read_text())
    tasks = sweep["tasks"]
    edge = [f"{task} {m}" for task, methods in tasks.items() for m, v in methods.items() if v["at_edge"]]
    source = (
        f"the best of a seed-0 sweep per task and method (results/{SWEEP_FILE}, `python -m bench.quality --sweep`: "
        "the default x 1/3, 1, 3, extended by x3 past a best at either end; judged by validation answer loss and "
        "Shakespeare perplexity)"
    )
    if edge:
        source += f"; still at the edge of the swept range: {', '.join(edge)}"
    if sweep["mode"] != asdict(mode):
        source += "; swept with other steps/batch settings than this run's"
    return {task: {m: v["best"] for m, v in methods.items()} for task, methods in tasks.items()}, source


def _round_lr(lr: float) -> float:
    return float(f"{lr:.2g}")


def sweep(mode: Mode) -> dict:
    """Seed-0 runs of every method at DEFAULT_LR x {1/3, 1, 3}, extended by factors of 3
    (up to SWEEP_EXTEND times) past whichever end of the range is best; the best by the
    task's primary metric."""
    base_state(load_data())  # pre-train once, before the workers start
    lrs = {task: dict(DEFAULT_LR) for task in METRICS}
    scores = {(task, m): {} for task in METRICS for m in METHODS}
    todo = {key: [_round_lr(DEFAULT_LR[key[1]] * f) for f in SWEEP_FACTORS] for key in scores}
    for _ in range(1 + SWEEP_EXTEND):
        jobs = [dict(task_name=t, method=m, seed=0, group="sweep", lr=lr) for (t, m), lrs_ in todo.items() for lr in lrs_]
        for record in execute(jobs, mode, lrs):
            scores[(record["task"], record["method"])][record["lr"]] = record[PRIMARY[record["task"]]]
        todo = {}
        for key, tried in scores.items():
            best = min(tried, key=tried.get)
            if best == max(tried):
                todo[key] = [_round_lr(best * 3)]
            elif best == min(tried):
                todo[key] = [_round_lr(best / 3)]
        if not todo:
            break
    out = {"mode": asdict(mode), "tasks": {task: {} for task in METRICS}}
    for (task, method), tried in scores.items():
        best = min(tried, key=tried.get)
        out["tasks"][task][method] = dict(
            metric=PRIMARY[task], scores=dict(sorted(tried.items())), best=best, at_edge=best in (min(tried), max(tried))
        )
    write_json(SWEEP_FILE, out)
    return out


def run_quality(mode: Mode = DEFAULT) -> dict:
    threads = setup_torch()
    data = load_data()
    lrs, lr_source = learning_rates(mode)
    bench = Bench(data, mode, lrs)  # pre-trains the base model if it is not cached
    log(f"quality: LoRA/DoRA rank {bench.lora_rank} (matched to APEX + delta); learning rates: {lr_source}")
    base = bench.base_metrics()
    runs = execute(plan(mode), mode, lrs)
    summary = summarize(runs)
    results = dict(
        mode=asdict(mode),
        threads=threads,
        workers=num_workers(),
        model=dict(MODEL, params=bench.base_meta["params"]),
        pretraining=dict(PRETRAIN, **bench.base_meta),
        apex=dict(ops=APEX_OPS.to_dict(), delta=APEX_DELTA.to_dict(), stages=APEX_STAGES),
        lora_rank=bench.lora_rank,
        learning_rates=lrs,
        lr_source=lr_source,
        base=base,
        summary=summary,
        verdicts=verdicts(summary),
        runs=runs,
    )
    write_json("quality.json", results)
    results["plots"] = plot(results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="more seeds, steps and evaluation data")
    parser.add_argument("--sweep", action="store_true", help="run the learning-rate sweep instead")
    args = parser.parse_args()
    mode = FULL if args.full else DEFAULT
    if args.sweep:
        setup_torch()
        for task, methods in sweep(mode)["tasks"].items():
            log(f"{task}: " + ", ".join(f"{m} {v['best']:g}" for m, v in methods.items()))
        return
    print_verdicts(run_quality(mode))


if __name__ == "__main__":
    main()
