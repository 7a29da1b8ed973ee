"""Run the whole benchmark (cost, then quality) and write bench/results/RESULTS.md.

    python -m bench.run_all             # default mode (`make bench`), under 30 minutes on 2 cores
    python -m bench.run_all --full      # more seeds, steps and evaluation data (longer)
    python -m bench.run_all --report-only   # redraw the plots and rewrite RESULTS.md from the JSON
"""

import argparse
import json
import os
import statistics
import time

import torch

from bench.common import RESULTS_DIR, cached_base_exists, log, require_data, write_json
from bench.cost import cost_markdown, print_summary, run_cost
from bench.quality import (
    DEFAULT,
    FULL,
    LABELS,
    SWEEP_FILE,
    ablation_reference,
    label,
    print_verdicts,
    run_quality,
    verdict_line,
    verdicts,
)
from bench.quality import plot as quality_plot

RUN_FILE = "run_all.json"


def _pm(stat: dict, digits: int = 3) -> str:
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _pct(stat: dict) -> str:
    if stat["n"] == 1:
        return f"{100 * stat['mean']:.1f}%"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}%"


def _apex_kinds(runs: list) -> dict:
    return {r["name"]: r["trainable_by_kind"] for r in runs if r["group"] == "main" and r["method"].startswith("apex")}


def quality_section(q: dict) -> list:
    params = q["model"]["params"]
    m, pre = q["model"], q["pretraining"]
    mode = q["mode"]
    lines = [
        "## Quality",
        "",
        f"Base model: torchtune `llama3` builder, vocab {m['vocab_size']} (sentencepiece BPE), embed {m['embed_dim']}, "
        f"{m['num_layers']} layers, {m['num_heads']} heads / {m['num_kv_heads']} KV heads, FFN {m['intermediate_dim']}: "
        f"{params / 1e6:.2f}M parameters. Pre-trained for {pre['steps']} steps of {pre['batch']}x{pre['seq']} tokens "
        f"({100 * (1 - pre['gsm_fraction']):.0f}% KJV, {100 * pre['gsm_fraction']:.0f}% a held-apart slice of GSM8K) in "
        f"{pre['seconds']:.0f}s (cached under bench/results/cache/).",
        "",
        f"Instruction tuning: {mode['it_steps']} steps of {mode['it_batch']} GSM8K problems, loss on answer tokens only; "
        f"validation answer loss on {mode['val_problems']} of the 600 held-out problems, exact match of the number "
        f"after '####' by greedy decoding on {mode['em_problems']}. Continued pre-training: {mode['cpt_steps']} steps of "
        f"{mode['cpt_batch']}x{mode['cpt_seq']} Tiny Shakespeare tokens; perplexity on up to {mode['eval_windows']} "
        "held-out 128-token windows of Shakespeare (new) and KJV (old: forgetting). Same batches, in the same order, for "
        f"every method of a seed. Seeds: {mode['seeds']} for the main methods (mean ± sample std), "
        f"{mode['ablation_seeds']} for ablations. LoRA/DoRA are merged and APEX fused before evaluation, so every "
        "method is evaluated as the plain base architecture.",
        "",
        f"APEX: K = {100 * q['apex']['ops']['ratio']:g}% of units, T = {q['apex']['stages']} stages, activation "
        "selection from an assessment pass of "
        f"{mode['assess_examples']} training examples, then each stage's own scores. APEX + delta tunes "
        f"{100 * q['apex']['delta']['tuned_ratio_heads']:g}% of head and channel units densely; LoRA and DoRA "
        f"(rank {q['lora_rank']}, alpha = 2 x rank, q/k/v/output_proj + MLP) are matched to its trainable budget. "
        "Trainable APEX parameters by kind: "
        + "; ".join(
            f"{LABELS[name]}: " + ", ".join(f"{k} {v:,}" for k, v in by_kind.items())
            for name, by_kind in _apex_kinds(q["runs"]).items()
        )
        + ".",
        "",
        f"Learning rates, {q['lr_source']}: "
        + "; ".join(
            f"{task.replace('_', ' ')}: " + ", ".join(f"{k} {v:g}" for k, v in lrs.items())
            for task, lrs in q["learning_rates"].items()
        )
        + ". AdamW (0.9, 0.95), no weight decay, cosine with 3% warmup, clip 1.0.",
        "",
    ]
    rows = q["summary"]
    base = q["base"]

    lines += [
        "### Instruction tuning (GSM8K)",
        "",
        "| method | trainable | % of base | val answer loss | exact match | train s/run |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {LABELS['base']} | 0 | 0 | {base['instruction_tuning']['val_loss']:.3f} | "
        f"{100 * base['instruction_tuning']['exact_match']:.1f}% | - |",
    ]
    for r in rows:
        if r["task"] == "instruction_tuning" and r["group"] == "main":
            lines.append(
                f"| {label(r['name'])} | {r['trainable']:,} | {100 * r['trainable'] / params:.2f} | {_pm(r['val_loss'])} | "
                f"{_pct(r['exact_match'])} | {r['train_seconds']:.1f} |"
            )
    lines += [
        "",
        "### Continued pre-training (KJV base -> Tiny Shakespeare)",
        "",
        "| method | trainable | tokens | Shakespeare ppl (new) | KJV ppl (old) | train s/run |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {LABELS['base']} | 0 | 0 | {base['continued_pretraining']['ppl_new']:.2f} | "
        f"{base['continued_pretraining']['ppl_old']:.2f} | - |",
    ]
    for group in ("main", "data_efficiency"):
        for r in rows:
            if r["task"] == "continued_pretraining" and r["group"] == group:
                lines.append(
                    f"| {label(r['name'])} | {r['trainable']:,} | {r['tokens']:,} | {_pm(r['ppl_new'], 2)} | "
                    f"{_pm(r['ppl_old'], 2)} | {r['train_seconds']:.1f} |"
                )
    ref = ablation_reference(q)
    lines += [
        "",
        "### APEX + delta ablations (instruction tuning)",
        "",
        "One setting changed at a time from T = 2, K = 18.75%, activation selection.",
        "",
        "| variant | trainable | val answer loss | exact match |",
        "|---|---:|---:|---:|",
        f"| reference (main run{'s' if ref['val_loss']['n'] > 1 else ''}, same seed{'s' if ref['val_loss']['n'] > 1 else ''}) | "
        f"{ref['trainable']:,} | {_pm(ref['val_loss'])} | "
        f"{_pct(ref['exact_match'])} |",
    ]
    for r in rows:
        if r["group"] == "ablation":
            lines.append(f"| {r['name']} | {r['trainable']:,} | {_pm(r['val_loss'])} | {_pct(r['exact_match'])} |")
    spread = next(r for r in rows if r["group"] == "main" and r["name"] == "apex_delta" and r["task"] == "instruction_tuning")
    lines += [
        "",
        f"For scale: the seed-to-seed standard deviation of the main APEX + delta runs is "
        f"{spread['val_loss']['std']:.4f} ({spread['val_loss']['n']} seeds).",
    ]

    lines += ["", "### Verdicts", ""]
    lines += [f"- {verdict_line(v)}." for v in verdicts(rows)]
    apex_runs = [r for r in q["runs"] if r["group"] == "main" and r["method"].startswith("apex")]
    assess = [r["assess_seconds"] / r["train_seconds"] for r in apex_runs]
    fuse = [m / s for r in apex_runs for m, s in zip(r["merge_seconds"], r["stage_seconds"])]
    trained = mode["it_steps"] * mode["it_batch"]
    lines += [
        "",
        f"Measured inside the main APEX runs: the no-grad assessment pass before stage 1 took "
        f"{100 * statistics.mean(assess):.2f}% of the run's training time (mean over runs; it scores "
        f"{mode['assess_examples']} examples against {trained} trained on in instruction tuning, "
        f"{100 * mode['assess_examples'] / trained:.0f}%, where the reference scores 12,288 against 2 epochs of "
        "Tulu v2, about 2%), and each stage-boundary fold_apex_ "
        f"{100 * statistics.mean(fuse):.3f}% of its stage's time.",
        "",
        "![instruction tuning](instruction_tuning.png)",
        "![continued pre-training](continued_pretraining.png)",
        "",
    ]
    return lines


def sweep_section() -> list:
    path = RESULTS_DIR / SWEEP_FILE
    if not path.exists():
        return []
    sweep = json.loads(path.read_text())
    lines = [
        "### Learning-rate sweep (seed 0; the chosen LR in bold)",
        "",
        "| task | method | metric | LR: score |",
        "|---|---|---|---|",
    ]
    for task, methods in sweep["tasks"].items():
        for method, v in methods.items():
            points = ", ".join(
                (f"**{float(lr):g}: {score:.4g}**" if float(lr) == v["best"] else f"{float(lr):g}: {score:.4g}")
                for lr, score in v["scores"].items()
            )
            lines.append(f"| {task.replace('_', ' ')} | {LABELS[method]} | {v['metric']} | {points} |")
    return lines + [""]


def cost_section(c: dict) -> list:
    return ["## Cost", "", *cost_markdown(c)]


def write_report() -> str:
    quality = json.loads((RESULTS_DIR / "quality.json").read_text())
    cost = json.loads((RESULTS_DIR / "cost.json").read_text())
    run = json.loads((RESULTS_DIR / RUN_FILE).read_text())
    header = [
        "# APEX benchmark",
        "",
        f"Generated by `python -m bench.run_all{' --full' if run['full'] else ''}` on CPU ({run['cpu_count']} cores) in "
        f"{run['wall_seconds'] / 60:.1f} minutes: cost {run['cost_seconds'] / 60:.1f}, quality "
        f"{run['quality_seconds'] / 60:.1f} ("
        + (
            f"including {quality['pretraining']['seconds'] / 60:.1f} of pre-training"
            if run["pretrained"]
            else "base model from the cache"
        )
        + f"), on {run['workers']} single-threaded worker processes. Small models and short runs: the numbers "
        "compare methods under one budget; they are not the paper's results at 7B scale.",
        "",
    ]
    text = "\n".join(header + quality_section(quality) + sweep_section() + cost_section(cost))
    path = RESULTS_DIR / "RESULTS.md"
    path.write_text(text)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="more seeds, steps and evaluation data (longer)")
    parser.add_argument("--report-only", action="store_true", help="redraw the plots and rewrite RESULTS.md from the JSON")
    args = parser.parse_args()
    if args.report_only:
        cost = json.loads((RESULTS_DIR / "cost.json").read_text())
        quality = json.loads((RESULTS_DIR / "quality.json").read_text())
        for path in [*quality_plot(quality), write_report()]:
            log(f"wrote {path}")
        return
    require_data()
    pretrained = not cached_base_exists()
    start = time.perf_counter()
    cost = run_cost(args.full, torch.device("cpu"))
    cost_seconds = time.perf_counter() - start
    quality = run_quality(FULL if args.full else DEFAULT)
    wall = time.perf_counter() - start
    write_json(
        RUN_FILE,
        dict(
            full=args.full, cpu_count=os.cpu_count(), workers=quality["workers"], pretrained=pretrained,
            wall_seconds=wall, cost_seconds=cost_seconds, quality_seconds=wall - cost_seconds,
        ),
    )
    path = write_report()
    log(f"\nbench finished in {wall / 60:.1f} minutes; wrote {path}")
    print_summary(cost)
    print_verdicts(quality)


if __name__ == "__main__":
    main()
