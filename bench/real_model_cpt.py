"""Continued pre-training on a real model: SmolLM2-135M-Instruct on Tiny Shakespeare, on CPU.

    python -m bench.real_model_cpt --checkpoint-dir ../smollm2_hf

The pre-trained model plays the part the KJV-pre-trained model plays in
``bench/quality.py``: each method continues pre-training it on Tiny Shakespeare (the new
corpus) and is scored by perplexity on held-out Tiny Shakespeare (learning) and on
held-out KJV (the old corpus: how much of what the model already modelled it forgets).
SmolLM2 was not pre-trained on KJV by us; it is English text of another register that the
base model already predicts, which is what forgetting is measured on. The splits are
``bench.common.load_corpus``'s (the tails of both files are held out).

Every method trains on the same random windows in the same order; APEX is the
LoRA-r8-budget setting of ``bench.real_model``. Learning rates are not swept here (no
compute for it): each method takes the rate that ``bench.real_model``'s GSM8K validation
slice chose for it when ``real_model.json`` has one, else the listed default. Results are
written to ``bench/results/real_model_cpt.json`` (and a table ``.md``) after each method.
"""

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List

import torch
from torch import nn

from bench.common import RESULTS_DIR, log, load_corpus, mean_loss, require_data, timed, window_batches, write_json
from bench.real_model import (
    CHECKPOINT_ENV,
    DEFAULT_CHECKPOINT,
    JSON_NAME as GSM8K_JSON,
    ChatML,
    base_model,
    load_base_state,
    train_method,
)

JSON_NAME = "real_model_cpt.json"
METHODS = {  # name -> (label, default learning rate)
    "base": ("base model (no training)", None),
    "lora": ("LoRA r8, all linear layers", 1e-3),
    "apex_matched": ("APEX + delta at LoRA r8's budget", 3e-4),
    "full": ("full fine-tuning", 5e-5),
}


@dataclass(frozen=True)
class Plan:
    steps: int = 16  # sized to what a 2-core CPU shared by five jobs finished (README)
    batch: int = 4  # windows per step
    seq: int = 256
    eval_windows: int = 12  # per held-out corpus, consecutive, non-overlapping
    eval_batch: int = 4
    assess_windows: int = 32  # scored before APEX stage 1
    seed: int = 0


def heldout_batches(stream: torch.Tensor, plan: Plan) -> list:
    """The first ``plan.eval_windows`` non-overlapping ``plan.seq``-token windows of ``stream``."""
    count = min(plan.eval_windows, (len(stream) - 1) // plan.seq)
    idx = torch.arange(count).unsqueeze(-1) * plan.seq + torch.arange(plan.seq + 1)
    windows = stream[idx]
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(plan.eval_batch)]


def perplexities(model: nn.Module, new: list, old: list) -> dict:
    (new_loss, old_loss), seconds = timed(lambda: (mean_loss(model, new), mean_loss(model, old)))
    return dict(ppl_new=math.exp(new_loss), ppl_old=math.exp(old_loss), eval_seconds=seconds)


def chosen_rate(method: str) -> tuple:
    path = RESULTS_DIR / GSM8K_JSON
    if path.exists():
        gsm8k = json.loads(path.read_text()).get("methods", {}).get(method, {})
        if "lr" in gsm8k and len(gsm8k.get("val_losses", {})) > 1:
            return gsm8k["lr"], "chosen on the GSM8K validation slice"
    return METHODS[method][1], "default (not swept)"


def table(results: dict) -> str:
    plan = results["plan"]
    lines = [
        "| method | trainable | lr | Tiny Shakespeare ppl (new) | KJV ppl (old) | train s | CPU s, all |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results["methods"].values():
        lr = f"{r['lr']:g} ({r['lr_source']})" if r.get("lr") else "-"
        lines.append(
            f"| {r['label']} | {r['trainable']:,} | {lr} | {r['ppl_new']:.2f} | {r['ppl_old']:.2f} | "
            f"{r.get('train_seconds', 0):.0f} | {r['cpu_seconds']:.0f} |"
        )
    cpu = sum(r["cpu_seconds"] for r in results["methods"].values())
    lines += [
        "",
        f"Training: {plan['steps']} steps x {plan['batch']} random windows of {plan['seq']} tokens of Tiny "
        f"Shakespeare's training part ({plan['steps'] * plan['batch'] * plan['seq']:,} tokens, the same windows "
        f"for every method); perplexity on the first {results['eval_tokens']['new']:,} tokens of held-out Tiny "
        f"Shakespeare and {results['eval_tokens']['old']:,} of held-out KJV. CPU time of the methods above: "
        f"{cpu / 60:.0f} min (one torch thread).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", type=Path, default=Path(os.environ.get(CHECKPOINT_ENV, DEFAULT_CHECKPOINT)))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, in order")
    parser.add_argument("--steps", type=int, default=Plan.steps)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("APEX_BENCH_THREADS", "1")))
    plan = Plan(steps=args.steps)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"bench.real_model_cpt: unknown --methods {unknown}; choose from {list(METHODS)}")

    corpus = load_corpus(require_data())
    chat = ChatML(args.checkpoint_dir)
    encode = lambda text: torch.tensor(chat.encode(text), dtype=torch.long)  # noqa: E731
    # Only as much held-out text as the evaluation reads (KJV's tail is ~900 lines).
    need_chars = plan.eval_windows * plan.seq * 8
    new_stream = encode(corpus.shakes_heldout[:need_chars])
    old_stream = encode("\n".join(corpus.kjv_heldout)[:need_chars])
    train_stream = encode(corpus.shakes_train)
    new, old = heldout_batches(new_stream, plan), heldout_batches(old_stream, plan)
    batches = window_batches(train_stream, plan.steps, plan.batch, plan.seq, plan.seed)
    assess = window_batches(train_stream, plan.assess_windows // plan.batch, plan.batch, plan.seq, plan.seed + 10_000)
    state = load_base_state(args.checkpoint_dir)

    path = RESULTS_DIR / JSON_NAME
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("plan") != asdict(plan):
        results = dict(methods={})
    results.update(
        plan=asdict(plan), torch_threads=torch.get_num_threads(),
        eval_tokens=dict(new=sum(b[1].numel() for b in new), old=sum(b[1].numel() for b in old)),
        train_tokens_available=len(train_stream),
    )
    for method in methods:
        if method in results["methods"]:
            log(f"{method}: already in {JSON_NAME}, skipped")
            continue
        start, cpu_start = time.perf_counter(), time.process_time()
        label = METHODS[method][0]
        if method == "base":
            model, record = base_model(state), dict(label=label, trainable=0)
        else:
            lr, source = chosen_rate(method)
            model, info = train_method(method, lr, state, batches, assess, plan.seed)
            record = dict(label=label, lr_source=source, **info)
        record.update(perplexities(model, new, old))
        record.update(wall_seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start)
        log(f"{method}: ppl new {record['ppl_new']:.3f}, old {record['ppl_old']:.3f}, wall {record['wall_seconds']:.0f}s")
        results["methods"][method] = record
        write_json(JSON_NAME, results)
        path.with_suffix(".md").write_text(table(results))
        del model


if __name__ == "__main__":
    main()
