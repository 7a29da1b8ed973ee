"""Separate K for heads and channels (``ratio_heads``, ``ratio_channels``), heads
expansion switched off, and budgets near LoRA r8's on models with 2 and 3 KV groups.

Counts are checked on the meta device against the method's arithmetic written out by
hand; the LoRA r8 budget is counted from torchtune's own LoRA builders.
"""

import math

import pytest
import torch
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.models.qwen2._component_builders import lora_qwen2, qwen2
from torchtune.modules.peft import get_adapter_params

from apex_tune import (
    ActivationRanker,
    ApexSettings,
    apply_apex,
    unwrap_apex,
    get_selection,
    fold_apex_,
    parse_apex_config,
    set_apex_trainable,
    set_selection,
    trainable_parameter_report,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# SmolLM2-135M: 3 KV groups of 3 query heads. Qwen2.5-0.5B: 2 KV groups of 7.
SMOLLM2 = dict(vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576,
               intermediate_dim=1536, max_seq_len=2048)
QWEN25_05B = dict(vocab_size=151936, num_layers=24, num_heads=14, num_kv_heads=2, embed_dim=896,
                  intermediate_dim=4864, max_seq_len=2048)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "output_proj"]


def _base(geometry):
    with torch.device("meta"):
        if geometry is SMOLLM2:
            return llama3_2(**geometry, rope_base=100_000, scale_factor=1, tie_word_embeddings=True)
        return qwen2(**geometry, tie_word_embeddings=True)


def _lora_r8_params(geometry) -> int:
    """Trainable parameters of torchtune's LoRA rank 8 on every linear layer (attention and MLP)."""
    lora = dict(lora_attn_modules=ALL_LINEAR, apply_lora_to_mlp=True, lora_rank=8, lora_alpha=16)
    with torch.device("meta"):
        if geometry is SMOLLM2:
            model = lora_llama3_2(**lora, **geometry, rope_base=100_000, scale_factor=1)
        else:
            model = lora_qwen2(**lora, **geometry, tie_word_embeddings=True)
    return sum(p.numel() for p in get_adapter_params(model).values())


def _round_half_up(x):
    return int(math.floor(x + 0.5))


def _monarch_params(n):
    # Balanced sizes only (the divisor closest to sqrt(n) is at least sqrt(n) / 2, no padding).
    b = min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - math.sqrt(n)), d))
    assert 2 * b >= math.isqrt(n), f"pick a balanced n, {n} is not"
    return 2 * b * (n // b) ** 2


def _expected_trainable(geometry, ratio_heads, ratio_channels, delta, tuned_heads=None, tuned_channels=None):
    """The method's per-layer count by hand: operators, vectors and deltas; a ratio of 0 adds nothing."""
    dim, heads, kv = geometry["embed_dim"], geometry["num_heads"], geometry["num_kv_heads"]
    hd, group, hidden = dim // heads, heads // kv, geometry["intermediate_dim"]
    per_layer = 0
    if ratio_heads:
        k = _round_half_up(ratio_heads * kv)
        tuned = max(_round_half_up(tuned_heads * kv), 2 * k) if tuned_heads else 2 * k
        per_layer += _monarch_params(k * hd) + 2 * k * hd  # M; a and b(v)
        if delta:  # q rows, k and v rows, output_proj columns of the tuned KV groups
            per_layer += tuned * group * hd * dim + 2 * tuned * hd * dim + dim * tuned * group * hd
    if ratio_channels:
        k = _round_half_up(ratio_channels * hidden)
        tuned = max(_round_half_up(tuned_channels * hidden), 2 * k) if tuned_channels else 2 * k
        per_layer += _monarch_params(k) + 3 * k  # M; a, b(w1), b(w3)
        if delta:  # w1, w3 rows and w2 columns
            per_layer += 3 * tuned * dim
    return geometry["num_layers"] * per_layer


def _report(geometry, settings):
    model = _base(geometry)
    apply_apex(model, settings)
    set_apex_trainable(model, settings)
    return trainable_parameter_report(model)


def test_ratio_is_shorthand_for_both():
    settings = ApexSettings(ratio=0.25, ratio_channels=0.125)
    assert (settings.unit_ratio("heads"), settings.unit_ratio("channels")) == (0.25, 0.125)
    assert settings.expanded_units(8, "heads") == 2 and settings.expanded_units(96, "channels") == 12
    settings, _ = parse_apex_config({"ratio": 0.1875, "ratio_heads": 0})
    assert settings.kinds == ("channels",) and settings.expanded_units(3, "heads") == 0


@pytest.mark.parametrize("geometry", [SMOLLM2, QWEN25_05B], ids=["3_kv_groups", "2_kv_groups"])
@pytest.mark.parametrize(
    "ratios",
    [
        # Heads at their own K (1 KV group), channels at the paper's (the shorthand).
        dict(ratio=0.1875, ratio_heads=0.25),
        dict(ratio_heads=0.3, ratio_channels=0.0625),
        dict(ratio_heads=0, ratio_channels=0.1875),
    ],
    ids=["heads_own_ratio", "both_own_ratios", "heads_off"],
)
@pytest.mark.parametrize("delta", [False, True], ids=["operators", "delta"])
def test_counts_per_kind_on_meta(geometry, ratios, delta):
    settings = ApexSettings(delta=delta, **ratios)
    report = _report(geometry, settings)
    expected = _expected_trainable(
        geometry, settings.unit_ratio("heads"), settings.unit_ratio("channels"), delta
    )
    assert report["trainable_params"] == expected
    assert report["base_params"] == sum(p.numel() for p in _base(geometry).parameters())
    assert ("heads_operator_params" in report["per_layer"]) == (settings.unit_ratio("heads") > 0)
    if settings.unit_ratio("heads") == 0:
        assert report["by_kind"]["deltas"]["total"] == (expected - _expected_trainable(
            geometry, 0, settings.unit_ratio("channels"), False
        ))


@pytest.mark.parametrize(
    "geometry, settings",
    [
        # SmolLM2: LoRA r8 trains 30 * 81,408 = 2,442,240. Heads off; channels K = 22
        # (Monarch 2 blocks of 11), the delta on 44 of 1,536 channels: 30 * 76,582.
        (SMOLLM2, dict(ratio_heads=0, ratio_channels=22 / 1536, tuned_ratio_channels=44 / 1536)),
        # Qwen2.5-0.5B geometry: LoRA r8 trains 24 * 183,296. Channels K = 32, 64 tuned.
        (QWEN25_05B, dict(ratio_heads=0, ratio_channels=32 / 4864, tuned_ratio_channels=64 / 4864)),
    ],
    ids=["3_kv_groups", "2_kv_groups"],
)
def test_budget_near_lora_r8(geometry, settings):
    lora = _lora_r8_params(geometry)
    settings = ApexSettings(delta=True, **settings)
    report = _report(geometry, settings)
    expected = _expected_trainable(geometry, 0, settings.ratio_channels, True,
                                   tuned_channels=settings.tuned_ratio_channels)
    assert report["trainable_params"] == expected
    assert abs(expected / lora - 1) <= 0.10, (expected, lora)
    # The old single ratio cannot: the smallest K for heads with the delta tunes
    # 2 of 3 (or all 2) KV groups of q, k, v and output_proj, many times LoRA's budget.
    smallest = _report(geometry, ApexSettings(ratio=0.5 / geometry["num_kv_heads"] + 1e-9, delta=True))
    assert smallest["trainable_params"] > 5 * lora


def test_too_small_ratio_names_the_real_minimum():
    settings = ApexSettings(ratio=0.2)
    with pytest.raises(ValueError, match=r"apex\.ratio .*at least 0\.25\b"):
        settings.expanded_units(2, "heads")
    assert ApexSettings(ratio=0.25).expanded_units(2, "heads") == 1
    # The printed minimum is rounded up, so it works as printed.
    with pytest.raises(ValueError, match=r"apex\.ratio_channels=0.0003 .*at least 0\.0003256"):
        ApexSettings(ratio_channels=0.0003).expanded_units(1536, "channels")
    assert ApexSettings(ratio_channels=0.0003256).expanded_units(1536, "channels") == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(ratio=0), "apex.ratio"),
        (dict(ratio_heads=0, ratio_channels=0), "apex.ratio"),
        (dict(ratio_heads=0.6), "apex.ratio_heads"),
        (dict(ratio_channels=-0.1), "apex.ratio_channels"),
        (dict(ratio_heads=True), "apex.ratio_heads"),
        (dict(ratio_heads=0, delta=True, tuned_ratio_heads=0.5), "apex.tuned_ratio_heads"),
        (dict(ratio_channels=0.25, tuned_ratio_channels=0.4), "apex.tuned_ratio_channels"),
    ],
)
def test_bad_unit_ratios(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ApexSettings(**kwargs)


def test_heads_off_trains_unwraps_and_ranks(make_tiny, tokens):
    """With heads off the attention stays plain; selection, ranking, merge and fusion work."""
    model = make_tiny("llama3_gqa")  # 2 KV groups
    reference = make_tiny("llama3_gqa")
    settings = ApexSettings(ratio_heads=0, ratio_channels=0.125, delta=True, tuned_ratio_channels=0.5)
    apply_apex(model, settings)
    for layer in model.layers:
        assert type(layer.attn.q_proj) is torch.nn.Linear and type(layer.attn.output_proj) is torch.nn.Linear
        assert not hasattr(layer.attn, "apex_expansion")
    ranker = ActivationRanker(model, settings).attach()
    with torch.no_grad():
        ranker.begin_microbatch()
        model(tokens)
    ranker.detach()
    selection = ranker.select()
    assert all(s.heads.ordered().numel() == 0 and s.channels.ordered().numel() == 48 for s in selection)
    set_selection(model, selection)
    assert [s.to_dict() for s in get_selection(model)] == [s.to_dict() for s in selection]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("monarch.L2", "delta")):
                param.normal_(0, 0.05)
        wrapped_logits = model(tokens)
        fold_apex_(model)
        merged_logits = model(tokens)
        unwrap_apex(model)
        fused_logits = model(tokens)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert not torch.equal(wrapped_logits, reference(tokens))
    # fp32 refolding of O(1) logits through 2 layers: 1e-4 is ~1000 ulp of margin.
    torch.testing.assert_close(merged_logits, wrapped_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(fused_logits, wrapped_logits, rtol=0, atol=1e-4)


def test_heads_off_over_a_quantized_base(tokens):
    """QAPEX with heads off: attention weights are frozen NF4 without stages; a stage
    boundary and fusion give back the wrapped model's function."""
    from torchtune.models.llama3 import llama3

    from apex_tune.modules.nf4 import is_quantized

    torch.manual_seed(0)
    # NF4 needs every projection to hold a multiple of 64 * 256 elements.
    model = llama3(vocab_size=97, num_layers=2, num_heads=8, num_kv_heads=2, embed_dim=256,
                   intermediate_dim=512, max_seq_len=64).eval()
    settings = ApexSettings(ratio_heads=0, ratio_channels=0.25, quantize_base=True)
    apply_apex(model, settings)
    assert is_quantized(model) and not hasattr(model.layers[0].attn, "apex_history")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("monarch.L1", "monarch.L2")):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
        fold_apex_(model)  # the first stage is frozen into the FFN's history
        for name, param in model.named_parameters():
            if name.endswith("monarch.L2") and param.requires_grad:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
        wrapped_logits = model(tokens)
        unwrap_apex(model)
        fused_logits = model(tokens)
    assert not is_quantized(model)
    # fp32 rounding of the wrapped forward against the fp32 fold (as test_quantization).
    torch.testing.assert_close(fused_logits, wrapped_logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_recipe_with_heads_off(tmp_path):
    """`tune run apex_finetune` with apex.ratio_heads=0: attention weights come back untouched."""
    import json

    from recipe_runs import hf_weights, tune_run
    from apex_tune.dev.tiny import make_tiny_assets

    assets = tmp_path / "assets"
    make_tiny_assets(assets, num_train=200, num_val=20, seed=0)
    out = tmp_path / "run"
    tune_run(assets, out, "apex.ratio_heads=0", "apex.delta=True", "apex.tuned_ratio_channels=0.5",
             "max_steps_per_epoch=3")
    final, base = hf_weights(out / "stage_2"), hf_weights(assets / "base")
    changed = {k for k in base if not torch.equal(final[k], base[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("gate_proj", "up_proj", "down_proj") for k in changed), changed
    for entry in json.loads((out / "apex_selection.json").read_text()):
        for layer in entry["layers"]:
            assert layer["heads"] == {"P": [], "N": [], "E": []}
            assert len(layer["channels"]["P"]) == len(layer["channels"]["N"]) > 0
