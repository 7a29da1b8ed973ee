"""A tiny byte-level BPE vocabulary (GPT-2 byte alphabet, a few merges, ChatML specials)
for tokenizer and importer tests, written in the formats each consumer reads."""

import json
from pathlib import Path
from typing import Dict, List, Tuple

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Enough merges that words become multi-byte tokens; each result joins the vocabulary.
MERGES: List[Tuple[str, str]] = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "s"), ("Ġ", "is"), ("Ġ", "a"), ("n", "s"),
    ("w", "e"), ("r", "e"), ("u", "s"), ("e", "r"), ("Ġa", "ns"), ("Ġans", "we"), ("Ġanswe", "r"),
]


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def plain_tokens() -> List[str]:
    """The vocabulary without specials: the 256 byte characters, then each merge's result."""
    tokens = [bytes_to_unicode()[b] for b in range(256)]
    return tokens + [a + b for a, b in MERGES]


def gguf_tokens() -> Tuple[List[str], List[int]]:
    """(tokens, llama.cpp token types) with the specials first, as SmolLM2's GGUF has them."""
    tokens = SPECIALS + plain_tokens()
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def write_tokenizer_json(folder: Path) -> Path:
    """tokenizer.json + tokenizer_config.json of a SmolLM2-style tokenizer (digits split one by one)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, _ = gguf_tokens()
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, list(MERGES)))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


def write_qwen_files(folder: Path) -> Tuple[Path, Path]:
    """vocab.json and merges.txt of the same BPE (no specials), as torchtune's Qwen2.5 tokenizer reads."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(plain_tokens())}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
    return folder / "vocab.json", folder / "merges.txt"
