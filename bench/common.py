"""Shared pieces of the benchmark: data, tokenizer, the pre-trained base model,
the method builders (full FT, LoRA, DoRA, APEX) and the training/eval loops.

Everything runs in-process on CPU. The base model and the tokenized data are
cached under bench/results/cache/ (keyed by their settings), so a rerun skips
tokenizer training and pre-training.
"""

import hashlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.generation import generate
from torchtune.models.llama3 import llama3, lora_llama3
from torchtune.modules.common_utils import local_kv_cache
from torchtune.modules.peft import DoRALinear, get_adapter_params, get_merged_lora_ckpt, set_trainable_params
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

from apex_tune import (
    ActivationRanker,
    ApexSchedule,
    ApexSettings,
    apply_apex,
    unwrap_apex,
    reset_apex_parameters,
    set_apex_trainable,
    set_selection,
)
from apex_tune.training.assessment import score_units
from apex_tune.training.stages import choose_selection, end_stage
from apex_tune.modules.effective_rank import effective_rank

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
CACHE_DIR = RESULTS_DIR / "cache"
DATA_ENV = "APEX_BENCH_DATA"
THREADS_ENV = "APEX_BENCH_THREADS"
DATA_FILES = ("gsm8k/train.jsonl", "kjv/kjv.txt", "tinyshakespeare/input.txt")

IGNORE = -100
PAD, BOS, EOS = 0, 1, 2  # sentencepiece: unk (never produced, byte fallback) doubles as pad

# The base model. 8 KV heads (GQA, 2 query heads each) so that every K in the
# ablation (6.25% .. 25% of units) selects at least one head unit: with 2 KV
# heads any ratio under 25% rounds to zero units and apex_tune refuses it.
MODEL = dict(
    vocab_size=2048,
    num_layers=4,
    num_heads=16,
    num_kv_heads=8,
    embed_dim=128,
    intermediate_dim=384,
    max_seq_len=512,  # RoPE table only: room for prompt + greedy answer at evaluation
)
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "output_proj"]

# Data splits (fixed, independent of the run seed).
SPLIT_SEED = 1234
GSM_VAL = 600  # held-out problems (validation)
GSM_PRETRAIN = 1500  # problems mixed into pre-training; disjoint from train and validation
KJV_HELDOUT = 0.03  # tail fraction of KJV lines never pre-trained on
SHAKES_HELDOUT = 0.10  # tail fraction of Tiny Shakespeare
MAX_LEN = 256  # tokens per instruction example (longer ones are truncated)
TOKENIZER = dict(vocab=MODEL["vocab_size"], split_seed=SPLIT_SEED, version=2)  # cache key

# Pre-training: random windows, 75% KJV, 25% GSM8K (pre-training slice).
PRETRAIN = dict(steps=800, batch=16, seq=128, lr=3e-3, gsm_fraction=0.25, seed=0)


def log(msg: str) -> None:
    print(msg, flush=True)


def setup_torch() -> int:
    """One intra-op thread unless $APEX_BENCH_THREADS says otherwise: these models are too
    small to gain much from two, and OpenMP threads that spin while another job holds a
    core slow every step several-fold on a shared 2-core machine."""
    threads = int(os.environ.get(THREADS_ENV, "1"))
    torch.set_num_threads(threads)
    return threads


# ------------------------------------------------------------------ data
def find_data() -> Optional[Path]:
    """$APEX_BENCH_DATA, else ../shared/data next to the repo; None if the files are missing."""
    root = Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data"))
    return root if all((root / f).is_file() for f in DATA_FILES) else None


def require_data() -> Path:
    """The data folder, or a clear message and a failing exit (1) when it is absent:
    `make bench` without its data must not look like a benchmark that ran."""
    root = find_data()
    if root is None:
        looked = os.environ.get(DATA_ENV, REPO.parent / "shared" / "data")
        print(
            f"bench: error: benchmark data not found in {looked} (needs {', '.join(DATA_FILES)}); "
            f"set {DATA_ENV} to the folder that holds them",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
    return root


def clean_answer(answer: str) -> str:
    """GSM8K answers without the <<a*b=c>> calculator annotations (shorter, same content)."""
    return re.sub(r"<<[^>]*>>", "", answer)


def prompt_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def final_number(text: str) -> Optional[str]:
    """The number after '####', normalised (commas and trailing '.0' dropped)."""
    match = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    if not match:
        return None
    value = match.group(1).replace(",", "")
    return value[:-2] if value.endswith(".0") else value


@dataclass
class Corpus:
    gsm_train: List[dict]
    gsm_val: List[dict]
    gsm_pretrain: List[dict]
    kjv_train: List[str]
    kjv_heldout: List[str]
    shakes_train: str
    shakes_heldout: str


def load_corpus(root: Path) -> Corpus:
    rows = [json.loads(line) for line in (root / "gsm8k/train.jsonl").read_text().splitlines() if line.strip()]
    random.Random(SPLIT_SEED).shuffle(rows)
    val, pretrain, train = rows[:GSM_VAL], rows[GSM_VAL : GSM_VAL + GSM_PRETRAIN], rows[GSM_VAL + GSM_PRETRAIN :]
    kjv = [line for line in (root / "kjv/kjv.txt").read_text().splitlines() if line.strip()]
    cut = int(len(kjv) * (1 - KJV_HELDOUT))
    shakes = (root / "tinyshakespeare/input.txt").read_text()
    scut = shakes.index("\n\n", int(len(shakes) * (1 - SHAKES_HELDOUT)))  # split at a speech boundary
    return Corpus(train, val, pretrain, kjv[:cut], kjv[cut:], shakes[:scut], shakes[scut + 2 :])


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def load_tokenizer(corpus: Corpus):
    """A 2048-piece sentencepiece BPE (digits split, newlines kept) trained on all three
    sources' training parts, like a general-purpose tokenizer; cached. One thread and no
    shuffling: with more, tied merges can come out differently from run to run."""
    import sentencepiece as spm

    path = CACHE_DIR / f"tokenizer_{_key(TOKENIZER)}.model"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        texts = corpus.kjv_train + corpus.shakes_train.split("\n\n")
        texts += [prompt_text(r["question"]) + clean_answer(r["answer"]) for r in corpus.gsm_train]
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=str(path.with_suffix("")),
            vocab_size=MODEL["vocab_size"],
            model_type="bpe",
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            user_defined_symbols=["\n"],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    return spm.SentencePieceProcessor(model_file=str(path))


def encode_lines(sp, lines: Sequence[str]) -> torch.Tensor:
    """One token stream: the lines joined by newline tokens."""
    newline = sp.piece_to_id("\n")
    out: List[int] = []
    for ids in sp.encode(list(lines)):
        out.extend(ids)
        out.append(newline)
    return torch.tensor(out, dtype=torch.int32)


def encode_example(sp, row: dict) -> Tuple[List[int], int]:
    """BOS + prompt + answer + EOS, and where the answer starts."""
    prompt = [BOS] + sp.encode(prompt_text(row["question"]))
    answer = sp.encode(clean_answer(row["answer"])) + [EOS]
    return (prompt + answer)[:MAX_LEN], len(prompt)


@dataclass
class Data:
    """Tokenized splits, shared by every task."""

    sp: object
    corpus: Corpus
    it_train: List[Tuple[List[int], int]]
    it_val: List[Tuple[List[int], int]]
    gsm_stream: torch.Tensor  # GSM8K pre-training slice, EOS-separated documents
    kjv_train: torch.Tensor
    kjv_heldout: torch.Tensor
    shakes_train: torch.Tensor
    shakes_heldout: torch.Tensor


def load_data() -> Data:
    corpus = load_corpus(require_data())
    sp = load_tokenizer(corpus)
    path = CACHE_DIR / f"tokens_{_key(dict(tokenizer=TOKENIZER, max_len=MAX_LEN))}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)  # tensors and plain containers only
    else:
        gsm: List[int] = []
        for row in corpus.gsm_pretrain:
            gsm.extend(encode_example(sp, row)[0])
        cached = dict(
            it_train=[encode_example(sp, r) for r in corpus.gsm_train],
            it_val=[encode_example(sp, r) for r in corpus.gsm_val],
            gsm_stream=torch.tensor(gsm, dtype=torch.int32),
            kjv_train=encode_lines(sp, corpus.kjv_train),
            kjv_heldout=encode_lines(sp, corpus.kjv_heldout),
            shakes_train=encode_lines(sp, corpus.shakes_train.splitlines()),
            shakes_heldout=encode_lines(sp, corpus.shakes_heldout.splitlines()),
        )
        torch.save(cached, path)
    return Data(sp=sp, corpus=corpus, **cached)


# --------------------------------------------------------------- batches
Batch = Tuple[torch.Tensor, torch.Tensor]  # tokens (B, L), labels (B, L): labels[t] = next token or IGNORE


def window_batches(stream: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> List[Batch]:
    """``steps`` batches of random ``seq``-token windows (next-token labels everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq - 1, (steps, batch), generator=gen)
    idx = starts.unsqueeze(-1) + torch.arange(seq + 1)
    windows = stream.long()[idx]
    return [(w[:, :-1], w[:, 1:]) for w in windows]


def eval_windows(stream: torch.Tensor, count: int, seq: int) -> List[Batch]:
    """Up to ``count`` consecutive non-overlapping windows from the start of a held-out stream."""
    count = min(count, (len(stream) - 1) // seq)
    idx = torch.arange(count).unsqueeze(-1) * seq + torch.arange(seq + 1)
    windows = stream.long()[idx]
    return [(windows[i : i + 16, :-1], windows[i : i + 16, 1:]) for i in range(0, count, 16)]


def sft_batch(examples: Sequence[Tuple[List[int], int]]) -> Batch:
    """Right-padded batch; labels only on answer tokens (the prompt and padding are ignored)."""
    length = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), length), PAD, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for i, (ids, start) in enumerate(examples):
        ids_t = torch.tensor(ids)
        tokens[i, : len(ids)] = ids_t
        labels[i, start - 1 : len(ids) - 1] = ids_t[start:]
    return tokens, labels


def sft_batches(examples, steps: int, batch: int, seed: int) -> List[Batch]:
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    need = steps * batch
    order = (order * (need // len(order) + 1))[:need]
    return [sft_batch([examples[j] for j in order[i : i + batch]]) for i in range(0, need, batch)]


def pretrain_batches(data: Data, steps: int, batch: int, seq: int, gsm_fraction: float, seed: int) -> List[Batch]:
    """Each batch mixes KJV windows and GSM8K-slice windows in a fixed proportion."""
    n_gsm = round(batch * gsm_fraction)
    kjv = window_batches(data.kjv_train, steps, batch - n_gsm, seq, seed)
    gsm = window_batches(data.gsm_stream, steps, n_gsm, seq, seed + 1)
    return [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(kjv, gsm)]


# ----------------------------------------------------------------- model
def _base_path() -> Path:
    return CACHE_DIR / f"base_{_key(dict(model=MODEL, pretrain=PRETRAIN, tokenizer=TOKENIZER))}.pt"


def cached_base_exists() -> bool:
    return _base_path().exists()


def base_state(data: Data) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The pre-trained base model's state dict and facts about its pre-training
    (trained once, then loaded from the cache)."""
    path = _base_path()
    if path.exists():
        cached = torch.load(path, weights_only=True)  # tensors and plain containers only
        return cached["state"], cached["meta"]
    p = PRETRAIN
    log(f"pre-training the base model ({p['steps']} steps of {p['batch']}x{p['seq']} tokens; cached afterwards)")
    torch.manual_seed(p["seed"])
    model = llama3(**MODEL)
    batches = pretrain_batches(data, p["steps"], p["batch"], p["seq"], p["gsm_fraction"], p["seed"])
    losses, seconds = timed(train, model, batches, lr=p["lr"], weight_decay=0.1, log_every=100)
    state = model.state_dict()
    meta = dict(seconds=seconds, params=sum(t.numel() for t in model.parameters()), final_loss=losses[-1])
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state=state, meta=meta), path)
    log(f"pre-trained in {seconds:.0f}s")
    return state, meta


def base_model(state: Dict[str, torch.Tensor]) -> nn.Module:
    model = llama3(**MODEL)
    model.load_state_dict(state)
    return model


def lora_model(state: Dict[str, torch.Tensor], rank: int, dora: bool, seed: int, config: dict = MODEL) -> nn.Module:
    """torchtune LoRA/DoRA (alpha = 2 * rank) on q, k, v, output_proj and the MLP; only the adapters train."""
    torch.manual_seed(seed)
    model = lora_llama3(
        LORA_MODULES, apply_lora_to_mlp=True, lora_rank=rank, lora_alpha=2 * rank, use_dora=dora, **config
    )
    return load_base_into_adapter_model(model, state)


def load_base_into_adapter_model(model: nn.Module, state: Dict[str, torch.Tensor], assign: bool = False) -> nn.Module:
    """Base weights into a torchtune LoRA/DoRA model (only adapter keys may be missing), DoRA
    magnitudes initialised after the base is in (as torchtune's recipes do), only the adapters
    trainable."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    assert not unexpected and all("lora" in k or "magnitude" in k for k in missing), (missing, unexpected)
    for module in model.modules():
        if isinstance(module, DoRALinear):
            module.initialize_dora_magnitude()
    set_trainable_params(model, get_adapter_params(model))
    return model


def merged_lora(model: nn.Module, rank: int) -> nn.Module:
    """The plain base architecture with the LoRA/DoRA update folded in (torchtune's merge)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return base_model(get_merged_lora_ckpt(state, rank, 2 * rank))


def lora_params_per_rank(config: dict = MODEL) -> int:
    """Trainable LoRA parameters per unit of rank, for budget matching."""
    probe = lora_llama3(LORA_MODULES, apply_lora_to_mlp=True, lora_rank=1, lora_alpha=1, **{**config, "vocab_size": 8})
    return sum(p.numel() for p in get_adapter_params(probe).values())


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------- loops
def token_loss(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction=reduction)


class Trainer:
    """AdamW (betas 0.9/0.95, as in the APEX reference) with cosine decay after a 3% warmup,
    gradient clipping at 1.0; steps the trainable parameters of ``model``."""

    def __init__(self, model: nn.Module, lr: float, total_steps: int, weight_decay: float = 0.0):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
        warmup = max(1, round(0.03 * total_steps))
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, total_steps)

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        loss = token_loss(self.model, tokens, labels)
        loss.backward()
        nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.item()


def train(model: nn.Module, batches: Sequence[Batch], lr: float, weight_decay: float = 0.0, log_every: int = 0) -> List[float]:
    """Plain training of whatever in ``model`` requires grad (full FT, LoRA, DoRA)."""
    model.train()
    trainer = Trainer(model, lr, len(batches), weight_decay)
    losses = []
    for i, (tokens, labels) in enumerate(batches, 1):
        losses.append(trainer.step(tokens, labels))
        if log_every and i % log_every == 0:
            log(f"  step {i}/{len(batches)} loss {sum(losses[-log_every:]) / log_every:.3f}")
    return losses


@dataclass
class ApexRun:
    """One APEX training run as recipes/apex_finetune.py runs it, with the recipe's own
    stage protocol: score units before stage 1 (apex_tune.training.assessment.score_units)
    and select (stages.choose_selection); per stage train, then end the stage
    (apex_tune.training.stages.end_stage: re-select, fold, reset operators, ranker and
    optimizer state); the LR schedule runs over all stages; fuse at the end."""

    settings: ApexSettings
    stages: int = 2
    selection: str = "activation"  # or "random" (ablation)
    seed: int = 0
    assess_seconds: float = field(default=0.0, init=False)
    merge_seconds: List[float] = field(default_factory=list, init=False)
    # per stage boundary: per layer {projection: effective rank of the stage's W' - W}
    stage_effective_ranks: List[list] = field(default_factory=list, init=False)
    stage_seconds: List[float] = field(default_factory=list, init=False)

    def wrap(self, model: nn.Module) -> nn.Module:
        apply_apex(model, self.settings)
        reset_apex_parameters(model, self.seed)
        set_apex_trainable(model, self.settings)
        return model

    def train(self, model: nn.Module, batches: Sequence[Batch], lr: float, assess_batches: Sequence[Batch]) -> List[float]:
        """``model`` must already be wrapped (:meth:`wrap`); it comes back fused (plain)."""
        ranker = ActivationRanker(model, self.settings)
        if self.selection == "activation":
            inputs = [({"tokens": tokens}, labels != IGNORE) for tokens, labels in assess_batches]
            _, self.assess_seconds = timed(score_units, model, ranker, inputs)
        set_selection(model, choose_selection(model, ranker, self.selection, seed=self.seed)[0])
        ranker.reset()
        ends = ApexSchedule(num_stages=self.stages).stage_ends(len(batches))
        trainer = Trainer(model, lr, len(batches))
        losses, stage, stage_start = [], 0, time.perf_counter()
        for step, (tokens, labels) in enumerate(batches, 1):
            ranker.begin_microbatch(labels != IGNORE)
            losses.append(trainer.step(tokens, labels))
            if step == ends[stage] and step < len(batches):
                start = time.perf_counter()
                ended = end_stage(  # as the recipe
                    model, trainer.optimizer, ranker, self.selection, seed=self.seed + stage + 1, effective_ranks=True
                )
                self.stage_effective_ranks.append(ended.effective_ranks)
                self.merge_seconds.append(time.perf_counter() - start)
                self.stage_seconds.append(start - stage_start)
                stage, stage_start = stage + 1, time.perf_counter()
        ranker.detach()
        unwrap_apex(model)
        return losses


# ------------------------------------------------------------------ eval
PROJECTIONS = {"attn": ("q_proj", "k_proj", "v_proj", "output_proj"), "mlp": ("w1", "w3", "w2")}


@torch.no_grad()
def change_effective_ranks(model: nn.Module, base: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Per projection, the mean over layers of the effective rank of the whole run's
    weight change (plain model: LoRA merged, APEX fused) against the base."""
    weights = model.state_dict()
    ranks = {}
    for owner, names in PROJECTIONS.items():
        for name in names:
            keys = [k for k in base if k.endswith(f".{owner}.{name}.weight")]
            ranks[name] = sum(effective_rank(weights[k].float() - base[k].float()) for k in keys) / len(keys)
    return ranks


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Token-weighted mean cross-entropy over the labelled positions."""
    model.eval()
    total, count = 0.0, 0
    for tokens, labels in batches:
        total += token_loss(model, tokens, labels, reduction="sum").item()
        count += int((labels != IGNORE).sum())
    model.train()
    return total / count


def perplexity(model: nn.Module, batches: Sequence[Batch]) -> float:
    return math.exp(mean_loss(model, batches))


@torch.no_grad()
def exact_match(model: nn.Module, sp, rows: Sequence[dict], max_new: int) -> float:
    """Greedy decoding (KV cache, left-padded batch); share of final numbers after '####' that match."""
    prompts = [[BOS] + sp.encode(prompt_text(r["question"])) for r in rows]
    width = max(len(p) for p in prompts)
    batch = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    model.eval()
    with local_kv_cache(
        model, batch_size=len(rows), device=torch.device("cpu"), dtype=torch.float32, decoder_max_seq_len=width + max_new
    ):
        out, _ = generate(model, batch, max_generated_tokens=max_new, pad_id=PAD, top_k=1, stop_tokens=[EOS])
    hits = 0
    for row, ids in zip(rows, out[:, width:].tolist()):
        ids = ids[: ids.index(EOS)] if EOS in ids else ids
        hits += final_number(sp.decode(ids)) == final_number(row["answer"])
    model.train()
    return hits / len(rows)


# --------------------------------------------------------------- helpers
def timed(fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def write_json(name: str, obj) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps(obj, indent=1))
    return path
