"""SmolLM2 builder and the ChatML tokenizer: prompt masks as torchtune's own ChatML
tokenizer (Qwen2.5) makes them, on a tiny BPE written at test time."""

import pytest
import torch
from tiny_bpe import write_qwen_files, write_tokenizer_json
from torchtune import config
from torchtune.data import Message
from torchtune.datasets import instruct_dataset
from torchtune.models.qwen2_5._tokenizer import Qwen2_5Tokenizer
from omegaconf import OmegaConf

from apex_tune.models.smollm2 import ChatMLTokenizer, smollm2_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATIONS = [
    [Message("user", "is the answer 12?", masked=True), Message("assistant", "the answer is 42")],
    [
        Message("system", "we answer", masked=True),
        Message("user", "the answer?", masked=True),
        Message("assistant", "is 7"),
        Message("user", "answer us", masked=True),
        Message("assistant", "the answer is 3"),
    ],
    [Message("user", "the answer", masked=False), Message("assistant", "is 9")],  # train_on_input
]


@pytest.fixture
def tokenizers(tmp_path):
    ours = ChatMLTokenizer(str(write_tokenizer_json(tmp_path / "hf")))
    vocab, merges = write_qwen_files(tmp_path / "qwen")
    theirs = Qwen2_5Tokenizer(str(vocab), str(merges))
    return ours, theirs


def _as_strings(tokenizer, ids):
    if isinstance(tokenizer, ChatMLTokenizer):
        return [tokenizer.base.tokenizer.id_to_token(i) for i in ids]
    inverse = {i: t for t, i in {**tokenizer.encoder, **tokenizer.special_tokens}.items()}
    return [inverse[i] for i in ids]


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_masks_match_torchtune_chatml(tokenizers, conversation):
    ours, theirs = tokenizers
    messages = CONVERSATIONS[conversation]
    for add_eos in (True, False):
        our_ids, our_mask = ours.tokenize_messages(messages, add_eos=add_eos)
        their_ids, their_mask = theirs.tokenize_messages(messages, add_eos=add_eos)
        assert _as_strings(ours, our_ids) == _as_strings(theirs, their_ids)
        assert our_mask == their_mask
    # the prompt is masked, the answer and its closing EOS are trained
    text = ours.decode(our_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>") and "<|im_start|>assistant\n" in text


def test_truncation_and_eos(tokenizers, tmp_path):
    ours, theirs = tokenizers
    messages = CONVERSATIONS[0]
    full_ids, full_mask = ours.tokenize_messages(messages)
    assert full_ids[-1] == ours.eos_id and full_mask[-1] is False
    for max_seq_len in (len(full_ids) - 3, len(full_ids)):
        short = ChatMLTokenizer(str(tmp_path / "hf" / "tokenizer.json"), max_seq_len=max_seq_len)
        theirs.max_seq_len = max_seq_len
        ids, mask = short.tokenize_messages(messages)
        their_ids, their_mask = theirs.tokenize_messages(messages)
        assert len(ids) == max_seq_len and ids[-1] == short.eos_id
        assert _as_strings(short, ids) == _as_strings(theirs, their_ids)
        if max_seq_len < len(full_ids):  # cut: a masked EOS in place of the last token, as torchtune
            assert mask == their_mask and mask[-1] is True
        else:  # fits: torchtune masks the EOS too (it truncates every sequence); ours trains it
            assert mask[:-1] == their_mask[:-1] and (mask[-1], their_mask[-1]) == (False, True)


def test_system_prompt_encode_and_dataset(tmp_path):
    path = str(write_tokenizer_json(tmp_path / "hf"))
    tokenizer = smollm2_tokenizer(path, system_prompt="we answer", max_seq_len=64)
    with_system, mask = tokenizer.tokenize_messages(CONVERSATIONS[0])
    explicit, explicit_mask = ChatMLTokenizer(path).tokenize_messages(
        [Message("system", "we answer", masked=True)] + CONVERSATIONS[0]
    )
    assert (with_system, mask) == (explicit, explicit_mask)
    # Plain text: no BOS (add_bos_token is false, as SmolLM2's), EOS on request; digits one by one.
    assert tokenizer.encode("12", add_bos=True, add_eos=True) == tokenizer.encode("1", add_eos=False) + tokenizer.encode("2")
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 2)
    # A GSM8K-format JSON file through torchtune's instruct dataset: labels only on the answer.
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "is the answer 12?", "answer": "the answer is 12\\n#### 12"}\n')
    dataset = instruct_dataset(tokenizer, source="json", data_files=str(data), split="train",
                               column_map={"input": "question", "output": "answer"})
    sample = dataset[0]
    trained = [t for t, label in zip(sample["tokens"], sample["labels"]) if label != -100]
    assert tokenizer.decode(trained, skip_special_tokens=False) == "<|im_start|>assistant\nthe answer is 12\n#### 12<|im_end|>"


def test_builders_from_config(tmp_path):
    path = str(write_tokenizer_json(tmp_path / "hf"))
    cfg = OmegaConf.create({
        "model": {"_component_": "apex_tune.models.smollm2_135m"},
        "tokenizer": {"_component_": "apex_tune.models.smollm2_tokenizer", "path": path, "max_seq_len": 32},
    })
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings
    assert (model.layers[0].attn.num_heads, model.layers[0].attn.num_kv_heads, model.layers[0].attn.head_dim) == (9, 3, 64)
    tokenizer = config.instantiate(cfg.tokenizer)
    assert isinstance(tokenizer, ChatMLTokenizer) and tokenizer.max_seq_len == 32
