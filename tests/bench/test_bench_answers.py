"""The answer extraction the real-model benchmark scores GSM8K exact match with."""

import pytest

from bench.common import final_number
from bench.real_model import last_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,260", "1260"),  # thousands separators dropped
        ("#### 5.0", "5"),  # a trailing .0 is the same number
        ("It costs -3 dollars.\n#### -3", "-3"),
        ("#### 7 and later 9", "7"),  # the '####' number wins over later numbers
        ("The answer is 12 + 7 = 19.", "19"),  # no '####': the last number written
        ("So the total is $1,234.", "1234"),  # sentence-final period is not a decimal point
        ("It is 0.25 of the cake.", "0.25"),
        ("I cannot tell.", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_last_number_agrees_with_final_number_when_tagged():
    text = "3 apples, then 4 more.\n#### 7"
    assert last_number(text) == final_number(text) == "7"


def test_greedy_batched_matches_one_prompt_at_a_time():
    """The benchmark's batched KV-cache decoding (left padding, finished rows leaving the
    batch) gives each prompt the tokens that plain full-sequence argmax decoding gives."""
    import torch
    from torchtune.models.llama3_2._component_builders import llama3_2

    from bench.real_model import IM_END, greedy

    torch.manual_seed(0)
    model = llama3_2(vocab_size=16, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                     max_seq_len=64, intermediate_dim=64, tie_word_embeddings=True)
    with torch.no_grad():
        # A random model repeats one token forever; a longer <|im_end|> embedding (tied to
        # its output row) makes two of the prompts stop at once while the rest go on.
        model.tok_embeddings.weight[IM_END] *= 4
    gen = torch.Generator().manual_seed(1)
    # Tokens 3.. only: 0 pads, 2 (<|im_end|>) stops.
    prompts = [torch.randint(3, 16, (n,), generator=gen).tolist() for n in (3, 7, 5, 9, 4, 6)]
    max_new = 12
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            seq = list(prompt)
            for _ in range(max_new):
                token = int(model(torch.tensor([seq]))[0, -1].argmax())
                if token == IM_END:
                    break
                seq.append(token)
            expected.append(seq[len(prompt):])
    got = greedy(model, prompts, max_new=max_new, batch=4)
    assert got == expected
    # Rows finished at different steps (some at once, some never), so rows left the batch.
    assert min(map(len, expected)) == 0 and max(map(len, expected)) == max_new
