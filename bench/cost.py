"""Cost of APEX against LoRA and full fine-tuning, measured in one run on the same model
and batch: training step time, peak memory, the assessment hooks' overhead, fusion time
per stage, and the Monarch multiply against a dense n x n matmul.

    python -m bench.cost [--full]

Two models: ``bench`` (the quality benchmark's 1.3M-parameter base, where fixed
per-op overheads dominate) and ``wide`` (embed 512, where the matmuls dominate, as in
real models). Weights are random: timing does not depend on them. Every round times
each method in turn; a ratio is the median over rounds of the ratio within a round,
so load from other jobs on the machine hits the methods compared alike.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torchtune.models.llama3 import llama3

from apex_tune import MonarchMatrix, fold_apex_
from bench.common import (
    MODEL,
    RESULTS_DIR,
    ActivationRanker,
    ApexRun,
    Trainer,
    count_trainable,
    log,
    lora_model,
    lora_params_per_rank,
    setup_torch,
    write_json,
)
from bench.quality import APEX_DELTA, APEX_OPS, APEX_STAGES, DEFAULT

COST_MODELS = {
    "bench": dict(config=MODEL, batch=4, seq=256),
    "wide": dict(config=dict(MODEL, embed_dim=512, intermediate_dim=1536), batch=2, seq=256),
}
# (rounds, steps per round) of the interleaved timing, per mode.
ROUNDS = {"default": (8, 2), "full": (20, 3)}
MONARCH_SIZES = (256, 512, 1024, 2048, 4096)
MONARCH_ROWS = 1024
# Stage length the fusion time is compared to: a stage of the default quality runs.
STAGE_STEPS = DEFAULT.it_steps // APEX_STAGES


def fixed_batch(spec: dict, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, spec["config"]["vocab_size"], (spec["batch"], spec["seq"] + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def build(method: str, spec: dict, rank: int):
    """(model, per-step hook) for a method; the hook runs before each forward."""
    torch.manual_seed(0)
    base = llama3(**spec["config"])
    if method == "full":
        return base, None
    if method == "lora":
        return lora_model(base.state_dict(), rank, dora=False, seed=0, config=spec["config"]), None
    settings = APEX_OPS if method == "apex_ops" else APEX_DELTA
    model = ApexRun(settings).wrap(base)
    if method == "apex_delta_detached":
        return model, None
    ranker = ActivationRanker(model, settings).attach()  # attached all training, as in the recipe
    mask = torch.ones(spec["batch"], spec["seq"], dtype=torch.bool)
    return model, lambda: ranker.begin_microbatch(mask)


def matched_rank(spec: dict) -> int:
    """The LoRA rank whose trainable parameter count is closest to APEX + delta's."""
    budget = count_trainable(ApexRun(APEX_DELTA).wrap(llama3(**spec["config"])))
    return max(1, round(budget / lora_params_per_rank(spec["config"])))


def step_times(spec: dict, methods: List[str], rounds: int, steps: int):
    """Seconds per training step of each method, as ``{method: [[round 1 steps], ...]}``,
    with the models. Every round runs every method in turn (round 0 only warms up)."""
    rank = matched_rank(spec)
    tokens, labels = fixed_batch(spec)
    runs = {}
    for method in methods:
        model, hook = build(method, spec, rank)
        runs[method] = (model, hook, Trainer(model, 1e-4, 10**6))
    times = {method: [] for method in methods}
    for round_ in range(rounds + 1):
        for method, (model, hook, trainer) in runs.items():
            this_round = []
            for _ in range(steps):
                start = time.perf_counter()
                if hook:
                    hook()
                trainer.step(tokens, labels)
                this_round.append(time.perf_counter() - start)
            if round_:
                times[method].append(this_round)
    return times, {m: run[0] for m, run in runs.items()}, rank


def paired_ratio(times: Dict[str, list], a: str, b: str) -> float:
    """Median over rounds of (a's median step / b's median step) within the round: methods
    timed back to back share the machine's load at that moment."""
    return statistics.median(statistics.median(x) / statistics.median(y) for x, y in zip(times[a], times[b]))


def fusion_seconds(model, repeats: int = 5) -> float:
    """Median time of fold_apex_ (the stage-boundary fusion) on a wrapped model."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fold_apex_(model, seed=i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_probe(method: str, model_name: str) -> dict:
    """Run in a child process: RSS before training, and peak RSS over 3 training steps.

    The peak is the kernel's VmHWM (high-water mark of this address space), reset to
    the current RSS just before training so that building the models does not count.
    Not ``getrusage().ru_maxrss``: it cannot be reset, and Linux keeps it across fork
    and exec, so a child would report the parent's peak whenever that is larger."""
    setup_torch()
    spec = COST_MODELS[model_name]
    model, hook = build(method, spec, matched_rank(spec))
    tokens, labels = fixed_batch(spec)
    trainer = Trainer(model, 1e-4, 100)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _proc_status_mb("VmRSS")
    for _ in range(3):
        if hook:
            hook()
        trainer.step(tokens, labels)
    return dict(rss_before_mb=before, peak_mb=_proc_status_mb("VmHWM"))


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory(model_name: str, methods: List[str]) -> Dict[str, dict]:
    out = {}
    for method in methods:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.cost", "--memory-probe", method, model_name],
            capture_output=True, text=True, check=True, cwd=RESULTS_DIR.parent.parent,
        )
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
        probe["training_mb"] = probe["peak_mb"] - probe["rss_before_mb"]
        out[method] = probe
    return out


def _median_time(fn: Callable, min_seconds: float = 0.2) -> float:
    fn()
    times, total = [], 0.0
    while total < min_seconds or len(times) < 3:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        total += times[-1]
    return statistics.median(times)


@torch.no_grad()
def monarch_vs_dense(rows: int) -> List[dict]:
    """MonarchMatrix forward vs a dense n x n matmul (F.linear) on the same (rows, n) input."""
    out = []
    for n in MONARCH_SIZES:
        x = torch.randn(rows, n)
        monarch = MonarchMatrix(n)
        torch.nn.init.normal_(monarch.L2)  # timing only; zero or not costs the same
        dense = torch.randn(n, n)
        t_m = _median_time(lambda: monarch(x))
        t_d = _median_time(lambda: F.linear(x, dense))
        out.append(
            dict(
                n=n, nblocks=monarch.nblocks, block_size=monarch.block_size, rows=rows,
                monarch_s=t_m, dense_s=t_d, speedup=t_d / t_m,
                flop_ratio=n / (2 * monarch.block_size),  # dense n^2 vs Monarch 2 n p per row
            )
        )
    return out


def run_cost(full: bool = False) -> dict:
    threads = setup_torch()
    rounds, steps = ROUNDS["full" if full else "default"]
    methods = ["full", "lora", "apex_delta", "apex_delta_detached", "apex_ops"]
    results = dict(threads=threads, rounds=rounds, steps_per_round=steps, stage_steps=STAGE_STEPS, models={})
    for name, spec in COST_MODELS.items():
        log(f"cost: step times on the {name} model (batch {spec['batch']}x{spec['seq']})")
        times, models, rank = step_times(spec, methods, rounds, steps)
        step = {}
        for method in methods:
            flat = [t for round_ in times[method] for t in round_]
            q1, _, q3 = statistics.quantiles(flat, n=4)
            step[method] = dict(
                median_s=statistics.median(flat), q1_s=q1, q3_s=q3, trainable=count_trainable(models[method])
            )
        fuse = fusion_seconds(models["apex_delta"])
        entry = dict(
            config=spec["config"],
            batch=[spec["batch"], spec["seq"]],
            params=sum(p.numel() for p in models["full"].parameters()),
            lora_rank=rank,
            step=step,
            apex_over_lora=paired_ratio(times, "apex_delta", "lora"),
            apex_over_full=paired_ratio(times, "apex_delta", "full"),
            lora_over_full=paired_ratio(times, "lora", "full"),
            assessment_overhead=paired_ratio(times, "apex_delta", "apex_delta_detached") - 1,
            fusion_s=fuse,
            fusion_fraction_of_stage=fuse / (STAGE_STEPS * step["apex_delta"]["median_s"]),
        )
        if name == "wide":
            log("cost: peak memory (one child process per method)")
            entry["memory"] = memory(name, ["full", "lora", "apex_delta"])
            mem = {m: v["training_mb"] for m, v in entry["memory"].items()}
            peak = {m: v["peak_mb"] for m, v in entry["memory"].items()}
            entry.update(
                memory_apex_over_lora=mem["apex_delta"] / mem["lora"],
                memory_apex_over_full=mem["apex_delta"] / mem["full"],
                peak_apex_over_lora=peak["apex_delta"] / peak["lora"],
                peak_apex_over_full=peak["apex_delta"] / peak["full"],
            )
        results["models"][name] = entry
        del models
    log("cost: Monarch multiply vs dense matmul")
    results["monarch"] = monarch_vs_dense(MONARCH_ROWS * (4 if full else 1))
    results["targets"] = targets(results)
    write_json("cost.json", results)
    results["plots"] = [plot(results)]
    return results


def targets(results: dict) -> Dict[str, dict]:
    """The issue's targets, judged on the wide model (matmul-bound, like real models)."""
    wide = results["models"]["wide"]
    from_1024 = [m for m in results["monarch"] if m["n"] >= 1024]
    return {
        "apex_step_within_1.10x_lora": dict(value=wide["apex_over_lora"], met=wide["apex_over_lora"] <= 1.10),
        "assessment_overhead_under_2pct": dict(
            value=wide["assessment_overhead"], met=wide["assessment_overhead"] < 0.02
        ),
        "fusion_under_1pct_of_stage": dict(
            value=wide["fusion_fraction_of_stage"], met=wide["fusion_fraction_of_stage"] < 0.01
        ),
        "monarch_faster_than_dense_from_1024": dict(
            value=min(m["speedup"] for m in from_1024), met=all(m["speedup"] > 1 for m in from_1024)
        ),
    }


def plot(results: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results["models"])
    methods = ["full", "lora", "apex_delta", "apex_delta_detached", "apex_ops"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        step = results["models"][name]["step"]
        rel = [step[m]["median_s"] / step["lora"]["median_s"] for m in methods]
        axes[0].bar([j + i * width for j in range(len(methods))], rel, width, label=f"{name} model")
    axes[0].axhline(1.10, color="tab:red", ls="--", lw=1, label="1.10x LoRA")
    axes[0].set_xticks([j + width / 2 for j in range(len(methods))], methods, rotation=20, fontsize=8)
    axes[0].set_ylabel("median step time / LoRA's")
    axes[0].set_title("training step time (median, interleaved)", fontsize=9)
    axes[0].legend(fontsize=7)
    mon = results["monarch"]
    axes[1].loglog([m["n"] for m in mon], [m["dense_s"] * 1e3 for m in mon], "o-", label="dense n x n matmul")
    axes[1].loglog([m["n"] for m in mon], [m["monarch_s"] * 1e3 for m in mon], "o-", label="Monarch forward")
    axes[1].set_xticks([m["n"] for m in mon], [str(m["n"]) for m in mon])
    axes[1].minorticks_off()
    axes[1].set_xlabel("n")
    axes[1].set_ylabel(f"ms for {mon[0]['rows']} rows")
    axes[1].set_title("Monarch vs dense multiply", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS_DIR / "cost.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def print_summary(results: dict) -> None:
    for name, m in results["models"].items():
        log(
            f"{name} model ({m['params'] / 1e6:.1f}M params, batch {m['batch'][0]}x{m['batch'][1]}): "
            f"APEX/LoRA step {m['apex_over_lora']:.2f}x, APEX/full {m['apex_over_full']:.2f}x, "
            f"assessment hooks {100 * m['assessment_overhead']:+.1f}% of step, "
            f"fusion {1e3 * m['fusion_s']:.1f} ms = {100 * m['fusion_fraction_of_stage']:.2f}% of a "
            f"{results['stage_steps']}-step stage"
        )
        if "memory" in m:
            log(
                f"  memory above the pre-training RSS: APEX/LoRA {m['memory_apex_over_lora']:.2f}x, "
                f"APEX/full {m['memory_apex_over_full']:.2f}x (peak RSS: {m['peak_apex_over_lora']:.2f}x, "
                f"{m['peak_apex_over_full']:.2f}x)"
            )
    log("Monarch vs dense: " + ", ".join(f"n={m['n']} {m['speedup']:.1f}x" for m in results["monarch"]))
    for name, t in results["targets"].items():
        log(f"  target {name}: {t['value']:.4g} -> {'met' if t['met'] else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="more timing rounds, 4x the Monarch rows")
    parser.add_argument("--memory-probe", nargs=2, metavar=("METHOD", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe)))
        return
    print_summary(run_cost(args.full))


if __name__ == "__main__":
    main()
