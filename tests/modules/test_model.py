"""apply_apex / settings / parameter report: reference-scale sizes on the meta device,
and clear errors for bad settings, unsupported models and bad selections."""

import copy
import math

import pytest
import torch
from torch import nn
from torchtune.models.llama2 import llama2
from torchtune.models.llama3_1 import llama3_1

from apex_tune import (
    ApexSettings,
    LayerSelection,
    UnitSelection,
    apply_apex,
    find_apex_layers,
    unwrap_apex,
    get_selection,
    fold_apex_,
    set_apex_trainable,
    set_selection,
    trainable_parameter_report,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER = dict(ratio=0.1875, tuned_ratio_heads=0.5625, tuned_ratio_channels=0.465, delta=True, train_embeddings=True)


def _round_half_up(x):
    return int(math.floor(x + 0.5))


def expected_counts(*, vocab, layers, heads, kv_heads, dim, hidden, ratio, tuned_h, tuned_c):
    """Trainable parameters of APEX with delta + embeddings, from the method (by hand)."""
    hd, group = dim // heads, heads // kv_heads
    kh, kc = _round_half_up(ratio * kv_heads), _round_half_up(ratio * hidden)
    th, tc = _round_half_up(tuned_h * kv_heads), _round_half_up(tuned_c * hidden)
    nh, nc = kh * hd, kc
    ops = 0
    for n in (nh, nc):
        b = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
        ops += 2 * b * (n // b) ** 2
    vectors = 2 * nh + 3 * nc  # a + b(v) for heads; a + b(w1) + b(w3) for channels
    deltas = (
        th * group * hd * dim  # q rows of the tuned KV groups
        + 2 * th * hd * dim  # k, v rows
        + dim * th * group * hd  # output_proj columns
        + 3 * tc * dim  # w1, w3 rows; w2 columns
    )
    return {
        "heads_K": kh,
        "channels_K": kc,
        "operators": layers * ops,
        "vectors": layers * vectors,
        "deltas": layers * deltas,
        "embeddings": 2 * vocab * dim,
    }


def _meta_llama2_7b():
    with torch.device("meta"):
        return llama2(vocab_size=32000, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=4096,
                      max_seq_len=4096, intermediate_dim=11008)


def _meta_llama31_8b():
    with torch.device("meta"):
        return llama3_1(vocab_size=128256, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
                        max_seq_len=4096, intermediate_dim=14336)


def test_llama2_7b_reference_sizes():
    model = _meta_llama2_7b()
    base_total = sum(p.numel() for p in model.parameters())
    settings = ApexSettings(**PAPER)
    apply_apex(model, settings)
    set_apex_trainable(model, settings)
    report = trainable_parameter_report(model)
    assert report["base_params"] == base_total
    assert report["per_layer"] == {"heads_operator_params": 49_152, "channels_operator_params": 198_144}
    exp = expected_counts(vocab=32000, layers=32, heads=32, kv_heads=32, dim=4096, hidden=11008,
                          ratio=0.1875, tuned_h=0.5625, tuned_c=0.465)
    assert (exp["heads_K"], exp["channels_K"]) == (6, 2064)
    by_kind = report["by_kind"]
    for kind in ("operators", "vectors", "deltas", "embeddings"):
        assert by_kind[kind]["trainable"] == by_kind[kind]["total"] == exp[kind], kind
    assert by_kind["base"]["trainable"] == 0
    assert report["trainable_params"] == sum(exp[k] for k in ("operators", "vectors", "deltas", "embeddings"))
    assert 0.51 <= report["trainable_fraction"] <= 0.53
    operators_fraction = by_kind["operators"]["trainable"] / base_total
    assert 0.0011 <= operators_fraction <= 0.0013
    print(f"Llama-2-7B: trainable {report['trainable_fraction']:.4f}, operators {operators_fraction:.5f}")


def test_llama31_8b_reference_sizes():
    model = _meta_llama31_8b()
    base_total = sum(p.numel() for p in model.parameters())
    settings = ApexSettings(**PAPER)
    apply_apex(model, settings)
    set_apex_trainable(model, settings)
    report = trainable_parameter_report(model)
    # KV groups: K = round_half_up(0.1875 * 8) = 2 -> n = 256 -> 16 x 16 blocks;
    # channels: K = 2688 -> 48 blocks of 56.
    assert report["per_layer"] == {"heads_operator_params": 8_192, "channels_operator_params": 301_056}
    exp = expected_counts(vocab=128256, layers=32, heads=32, kv_heads=8, dim=4096, hidden=14336,
                          ratio=0.1875, tuned_h=0.5625, tuned_c=0.465)
    assert (exp["heads_K"], exp["channels_K"]) == (2, 2688)
    for kind in ("operators", "vectors", "deltas", "embeddings"):
        assert report["by_kind"][kind]["trainable"] == exp[kind], kind
    assert report["base_params"] == base_total
    fraction = report["trainable_fraction"]
    assert fraction == pytest.approx(sum(exp[k] for k in ("operators", "vectors", "deltas", "embeddings")) / base_total)
    ops_fraction = report["by_kind"]["operators"]["trainable"] / base_total
    print(f"Llama-3.1-8B: trainable {fraction:.4f}, operators {ops_fraction:.6f}")
    assert 0.55 <= fraction <= 0.57  # measured 0.5630 (larger vocabulary than Llama 2)


def test_report_without_delta_or_embeddings(make_tiny):
    model = make_tiny("llama2_mha")
    settings = ApexSettings(ratio=0.25)
    apply_apex(model, settings)
    set_apex_trainable(model, settings)
    report = trainable_parameter_report(model)
    assert report["by_kind"]["deltas"]["total"] == 0
    assert report["by_kind"]["embeddings"]["trainable"] == 0
    # heads n = 2 * 8 = 16 -> 4 x 4; channels n = 24 -> 4 x 6.
    assert report["per_layer"] == {"heads_operator_params": 2 * 4 * 16, "channels_operator_params": 2 * 4 * 36}
    assert report["trainable_params"] == 2 * (2 * 4 * 16 + 2 * 4 * 36 + 2 * 16 + 3 * 24)


# --------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 0.6, 1.0])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"apex\.ratio"):
        ApexSettings(ratio=ratio)


@pytest.mark.parametrize("field", ["tuned_ratio_heads", "tuned_ratio_channels"])
@pytest.mark.parametrize("value", [0.3, 1.5])
def test_bad_tuned_ratio(field, value):
    with pytest.raises(ValueError, match=field):
        ApexSettings(ratio=0.1875, **{field: value})
    ApexSettings(ratio=0.1875, **{field: 0.375})  # exactly 2 * ratio is fine


def test_ratio_too_small_for_layer(make_tiny):
    # 2 KV groups: round(0.1875 * 2) = 0 units selected.
    with pytest.raises(ValueError, match=r"apex\.ratio"):
        apply_apex(make_tiny("llama3_gqa"), ApexSettings(ratio=0.1875))


class _NoAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"mlp": nn.Linear(4, 4)}) for _ in range(2)])


@pytest.mark.parametrize("model_fn", [lambda: nn.Sequential(nn.Linear(4, 4)), _NoAttn])
def test_unsupported_model(model_fn):
    with pytest.raises(ValueError, match=r"no layers APEX supports.*attn"):
        apply_apex(model_fn(), ApexSettings())


def test_mismatched_heads(make_tiny):
    model = make_tiny("llama3_gqa")
    model.layers[1].attn.num_kv_heads = 3
    with pytest.raises(ValueError, match=r"layer 1.*num_kv_heads"):
        apply_apex(model, ApexSettings(ratio=0.25))
    model = make_tiny("llama3_gqa4")
    model.layers[0].attn.num_heads = 6  # v_proj still matches 4 KV heads; 6 % 4 != 0
    with pytest.raises(ValueError, match=r"layer 0.*num_heads=6.*not a multiple.*num_kv_heads"):
        apply_apex(model, ApexSettings(ratio=0.25))
    model = make_tiny("llama2_mha")
    model.layers[0].attn.num_kv_heads = 4  # divides 8 but v_proj has 8 heads
    with pytest.raises(ValueError, match=r"layer 0.*v_proj"):
        apply_apex(model, ApexSettings(ratio=0.25))


def test_apply_twice_raises(make_tiny):
    model = apply_apex(make_tiny("llama2_mha"), ApexSettings(ratio=0.25))
    with pytest.raises(ValueError, match="already wrapped"):
        apply_apex(model, ApexSettings(ratio=0.25))


def test_unwrapped_model_errors(make_tiny):
    model = make_tiny("llama2_mha")
    for fn in (get_selection, fold_apex_, unwrap_apex):
        with pytest.raises(ValueError, match="apply_apex"):
            fn(model)


def test_find_apex_layers_geometry(make_tiny):
    layers = find_apex_layers(make_tiny("llama3_gqa"))
    assert [l.index for l in layers] == [0, 1]
    assert (layers[0].num_head_units, layers[0].heads_per_unit, layers[0].num_channel_units) == (2, 4, 96)


# --------------------------------------------------------------------------- bad selections


def _wrapped(make_tiny):
    settings = ApexSettings(ratio=0.25, tuned_ratio_heads=0.75, tuned_ratio_channels=0.75, delta=True)
    return apply_apex(make_tiny("llama2_mha"), settings)  # heads K=2 E=2; channels K=24 E=24


def _with(sel, layer, kind, **sets):
    sel = copy.deepcopy(sel)
    current = getattr(sel[layer], kind)
    fields = {"advantageous": current.advantageous, "disadvantageous": current.disadvantageous, "extra": current.extra}
    fields.update({k: torch.tensor(v) for k, v in sets.items()})
    setattr(sel[layer], kind, UnitSelection(**fields))
    return sel


def test_set_selection_validation(make_tiny):
    model = _wrapped(make_tiny)
    good = get_selection(model)
    set_selection(model, good)
    before = [s.heads.ordered().clone() for s in get_selection(model)]
    bad = [
        _with(good, 0, "heads", advantageous=[2, 3, 7]),  # |P| != K
        _with(good, 1, "heads", disadvantageous=[0]),  # |N| != K
        _with(good, 0, "heads", extra=[4, 5, 6]),  # |E| wrong
        _with(good, 0, "heads", advantageous=[0, 3], disadvantageous=[0, 1]),  # P and N overlap
        _with(good, 0, "heads", extra=[3, 4]),  # E overlaps P (P = [2, 3])
        _with(good, 1, "channels", extra=list(range(48, 71)) + [96]),  # out of range
        _with(good, 0, "heads", extra=[-1, 4]),  # negative id
        good[:1],  # wrong number of layers
    ]
    for selection in bad:
        with pytest.raises(ValueError):
            set_selection(model, selection)
    # Failed calls leave the previous selection of layer 0 in place.
    assert torch.equal(get_selection(model)[0].heads.ordered(), before[0])


def test_layer_selection_dict_round_trip():
    sel = LayerSelection(
        heads=UnitSelection(torch.tensor([1]), torch.tensor([0]), torch.tensor([3])),
        channels=UnitSelection(torch.tensor([5, 6]), torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)),
    )
    d = sel.to_dict()
    assert d == {"heads": {"P": [1], "N": [0], "E": [3]}, "channels": {"P": [5, 6], "N": [1, 2], "E": []}}


def test_param_kind_counts_only_apex_owned_parameters(make_tiny):
    """Every parameter APEX adds is classified by where it lives; a user's parameter that
    merely shares a leaf name (``a``, ``b``, ``L1``, ``delta``) elsewhere is base."""
    from apex_tune.modules.geometry import param_kind

    settings = ApexSettings(ratio=0.25, delta=True, tuned_ratio_heads=0.75, tuned_ratio_channels=0.75)
    model = apply_apex(make_tiny("qwen2_bias"), settings)
    kinds = {name: param_kind(name) for name, _ in model.named_parameters()}
    expected = {"L1": "operators", "L2": "operators", "a": "vectors", "b": "vectors", "delta": "deltas"}
    for name, kind in kinds.items():
        if name not in ("tok_embeddings.weight", "output.weight"):
            assert kind == expected.get(name.rsplit(".", 1)[-1], "base"), name
    assert {"operators", "vectors", "deltas", "embeddings", "base"} <= set(kinds.values())
    for name in ("layers.0.mlp.scale.a", "layers.0.attn.b", "adapter.b", "layers.0.attn.monarch.L1",
                 "layers.0.attn.pos_embeddings.delta", "a"):
        assert param_kind(name) == "base", name
