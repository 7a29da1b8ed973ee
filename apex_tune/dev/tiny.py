"""Tiny offline assets for the CPU configs, tests and demo.

Everything is generated here, with no download: a synthetic arithmetic
instruction set (question/answer JSON lines), a sentencepiece tokenizer trained
on it, and a small Llama-3-style (GQA) base model saved in Hugging Face format
so that torchtune's ``FullModelHFCheckpointer`` (and HF transformers) load it.

    python -m apex_tune.dev.tiny --output-dir /tmp/apex_tiny
"""

import argparse
import json
import random
from pathlib import Path
from typing import Dict, List, Optional

import torch

# Must match configs/dev/*tiny*.yaml.
TINY_MODEL = dict(
    vocab_size=512,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    embed_dim=64,
    intermediate_dim=176,
    max_seq_len=256,
)
# configs/dev/tiny_qapex.yaml: NF4 needs every projection's size to be a multiple
# of 64 * 256 elements, which 64-wide layers are not (k/v_proj: 16 x 64).
TINY_QAPEX_MODEL = dict(TINY_MODEL, embed_dim=256, intermediate_dim=512)


def arithmetic_examples(count: int, seed: int, kinds=(0, 1, 2)) -> List[Dict[str, str]]:
    """Word problems over small integers with a worked answer, GSM8K-style.

    ``kinds``: 0 addition, 1 subtraction, 2 multiplication.
    """
    rng = random.Random(seed)
    names = ["Ava", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana"]
    things = ["apples", "books", "coins", "marbles", "pens", "shells", "stamps", "cards"]
    out = []
    for _ in range(count):
        name, thing = rng.choice(names), rng.choice(things)
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        kind = rng.choice(kinds)
        if kind == 0:
            q = f"{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have?"
            r, work = a + b, f"{a} + {b} = {a + b}"
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            q = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
            r, work = a - b, f"{a} - {b} = {a - b}"
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 9)
            q = f"{name} buys {a} boxes with {b} {thing} each. How many {thing} in total?"
            r, work = a * b, f"{a} * {b} = {a * b}"
        out.append({"question": q, "answer": f"{name} computes {work}.\n#### {r}"})
    return out


def write_jsonl(rows: List[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_tokenizer(texts: List[str], model_prefix: Path, vocab_size: int) -> Path:
    """A sentencepiece BPE model (unk 0, bos 1, eos 2) as Llama 2's tokenizer expects."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        minloglevel=2,
    )
    return model_prefix.with_suffix(".model")


def save_hf_llama(model: torch.nn.Module, out_dir: Path, cfg: Dict[str, int]) -> None:
    """Write a torchtune Llama 3 model as an HF ``LlamaForCausalLM`` checkpoint."""
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf

    out_dir.mkdir(parents=True, exist_ok=True)
    head_dim = cfg["embed_dim"] // cfg["num_heads"]
    hf_sd = tune_to_hf(
        model.state_dict(),
        num_heads=cfg["num_heads"],
        num_kv_heads=cfg["num_kv_heads"],
        dim=cfg["embed_dim"],
        head_dim=head_dim,
    )
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, out_dir / "model.safetensors", metadata={"format": "pt"})
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg["embed_dim"],
        "intermediate_size": cfg["intermediate_dim"],
        "num_attention_heads": cfg["num_heads"],
        "num_key_value_heads": cfg["num_kv_heads"],
        "num_hidden_layers": cfg["num_layers"],
        "head_dim": head_dim,
        "vocab_size": cfg["vocab_size"],
        "max_position_embeddings": cfg["max_seq_len"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))


def tiny_llama3(**overrides) -> torch.nn.Module:
    """The tiny model (``TINY_MODEL``); pass ``**TINY_QAPEX_MODEL`` for the QAPEX one."""
    from torchtune.models.llama3 import llama3

    return llama3(**{**TINY_MODEL, **overrides})


@torch.no_grad()
def _batches(ids: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])


def pretrain(model: torch.nn.Module, token_ids: List[int], steps: int, seed: int = 0, lr: float = 3e-3) -> List[float]:
    """Plain next-token pre-training on a token stream; returns the loss per step."""
    from tqdm import tqdm

    ids = torch.tensor(token_ids)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    history = []
    for _ in tqdm(range(steps), desc="pre-training the tiny base", dynamic_ncols=True):
        batch = _batches(ids, 64, 16, gen)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
    return history


def make_tiny_assets(
    output_dir: Path,
    num_train: int = 2000,
    num_val: int = 200,
    seed: int = 0,
    pretrain_steps: int = 0,
    model: Optional[Dict[str, int]] = None,
) -> Dict[str, Path]:
    """Data, tokenizer and a tiny base model under ``output_dir``.

    The base is random (``pretrain_steps=0``, for tests) or pre-trained on
    addition and subtraction only, so that fine-tuning on all three operations
    (multiplication is new) has something to learn. ``model``: its geometry
    (default ``TINY_MODEL``; ``TINY_QAPEX_MODEL`` for ``dev/tiny_qapex``).
    """
    model_cfg = dict(model or TINY_MODEL)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = arithmetic_examples(num_train + num_val, seed)
    write_jsonl(rows[:num_train], output_dir / "train.jsonl")
    write_jsonl(rows[num_train:], output_dir / "val.jsonl")
    pretrain_rows = arithmetic_examples(4 * num_train, seed + 1, kinds=(0, 1))
    texts = [r["question"] + "\n" + r["answer"] for r in rows + pretrain_rows]
    (output_dir / "corpus.txt").write_text("\n".join(texts[len(rows):]) + "\n")
    tokenizer = train_tokenizer(texts, output_dir / "tokenizer", model_cfg["vocab_size"])
    torch.manual_seed(seed)
    model = tiny_llama3(**model_cfg)
    if pretrain_steps:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        stream = [t for text in texts[len(rows):] for t in [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]]
        pretrain(model, stream, pretrain_steps, seed=seed)
    save_hf_llama(model, output_dir / "base", model_cfg)
    return {
        "tokenizer": tokenizer,
        "train": output_dir / "train.jsonl",
        "val": output_dir / "val.jsonl",
        "corpus": output_dir / "corpus.txt",
        "base": output_dir / "base",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=0, help="0: random base")
    parser.add_argument(
        "--model", choices=("apex", "qapex"), default="apex",
        help="base geometry: dev/tiny_apex (default) or dev/tiny_qapex (NF4-compatible sizes)",
    )
    args = parser.parse_args()
    assets = make_tiny_assets(
        args.output_dir, args.num_train, seed=args.seed, pretrain_steps=args.pretrain_steps,
        model=TINY_QAPEX_MODEL if args.model == "qapex" else TINY_MODEL,
    )
    for name, path in assets.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
