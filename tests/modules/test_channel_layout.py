"""The contiguous FFN channel layout (``apex.contiguous_channels``): a selection moves
the selected channels first, which changes neither the model's function nor anything
seen outside the live model (selections, scores, saved weights, resume states).

Every test compares a model with the layout on against its twin with the layout off
(the base layout, scattered units), built from the same weights and selections."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from torchtune.models.llama3 import llama3

from apex_tune import ActivationRanker, ApexSettings, apply_apex, fold_apex_, get_selection, set_selection, unwrap_apex
from apex_tune.models.builders import apex_model
from apex_tune.modules.layout import LAYOUT_STATE_PREFIX, base_layout_state_dict, layout_order
from apex_tune.modules.model import CHANNELS, HEADS, find_apex_layers
from apex_tune.modules.selection import read_selection_file, write_selection_file
from apex_tune.training.checkpointing import (
    CheckpointError,
    load_local_model_state,
    local_model_state,
    plain_checkpoint_state,
    unwrapped_state_dict,
)

from conftest import VOCAB, build_tiny, perturb_apex, random_selection, rel_diff

ON = ApexSettings(ratio=0.25, delta=True, tuned_ratio_heads=0.5, tuned_ratio_channels=0.6)
OFF = replace(ON, contiguous_channels=False)
INTERMEDIATE_DIM = 96  # the tiny models' FFN channels (tests/conftest.py)
# Permuting the channels changes only the order in which w2 sums its 96 inputs (every
# other operation sees the same values): fp32 rounding of a reordered sum of n terms
# grows like sqrt(n) ulps of the output's scale, and the two layers pass it on to the
# logits. Relative to the largest logit: eps * sqrt(n) is 1.2e-6; 8x that for the
# layers and the margin.
REORDERED_SUM_TOLERANCE = 8 * torch.finfo(torch.float32).eps * INTERMEDIATE_DIM**0.5


def _twins(kind: str = "llama3_gqa", seed: int = 0):
    """The same tiny model wrapped with the layout on and off."""
    base = build_tiny(kind)
    return base, apply_apex(copy.deepcopy(base), ON), apply_apex(copy.deepcopy(base), OFF)


def _select_and_perturb(models, selection, seed):
    for model in models:
        set_selection(model, selection)
        perturb_apex(model, seed=seed)


def _channel_wrappers(model):
    for layer in find_apex_layers(model):
        yield layer, layer.expansion(CHANNELS), layer.named_wrappers(CHANNELS)


@pytest.mark.parametrize("kind", ["llama3_gqa", "llama2_mha", "qwen2_bias"])
def test_selected_channels_come_first_and_logits_do_not_change(kind, tokens):
    base, on, off = _twins(kind)
    selection = random_selection(base, ON, seed=1)
    _select_and_perturb((on, off), selection, seed=2)
    with torch.no_grad():
        got, want = on(tokens), off(tokens)
    assert rel_diff(got, want) <= REORDERED_SUM_TOLERANCE
    assert rel_diff(want, base(tokens)) > 1e-2, "the perturbed operators must change the outputs"

    assert [s.to_dict() for s in get_selection(on)] == [s.to_dict() for s in selection]  # base ids
    base_layers = find_apex_layers(base)
    for (layer, expansion, wrappers), layer_sel in zip(_channel_wrappers(on), selection):
        units = layer_sel.channels.ordered()
        assert torch.equal(expansion.units, units)
        order = layout_order(units, INTERMEDIATE_DIM)
        assert torch.equal(expansion.slots[order], torch.arange(INTERMEDIATE_DIM))
        plain_mlp = base_layers[layer.index].mlp
        for name, wrapper in wrappers:
            assert torch.equal(wrapper.positions, torch.arange(len(units)))  # the prefix: N, P, E
            expected = getattr(plain_mlp, name).weight.index_select(wrapper.dim, order)
            assert torch.equal(wrapper.weight, expected), name  # a permutation, no arithmetic
    for layer in find_apex_layers(on):  # heads keep the base layout
        assert torch.equal(layer.attn.v_proj.positions, find_apex_layers(off)[layer.index].attn.v_proj.positions)


def test_layout_off_and_quantized_base_keep_the_base_layout():
    base = build_tiny("llama3_gqa")
    off = apply_apex(copy.deepcopy(base), OFF, random_selection(base, OFF, seed=1))
    for layer, expansion, wrappers in _channel_wrappers(off):
        assert torch.equal(expansion.slots, torch.arange(INTERMEDIATE_DIM))
        for name, wrapper in wrappers:
            assert torch.equal(wrapper.weight, getattr(base.layers[layer.index].mlp, name).weight)
    quantized = replace(ON, delta=False, tuned_ratio_heads=None, tuned_ratio_channels=None, quantize_base=True)
    nf4_base = llama3(vocab_size=VOCAB, num_layers=1, num_heads=8, num_kv_heads=2, embed_dim=256,
                      intermediate_dim=512, max_seq_len=64)  # NF4 needs multiples of 64 * 256 elements
    model = apply_apex(nf4_base, quantized)
    set_selection(model, random_selection(model, quantized, seed=1))
    for layer, expansion, wrappers in _channel_wrappers(model):
        assert not expansion.contiguous and torch.equal(expansion.slots, torch.arange(512))
        for _, wrapper in wrappers:
            assert torch.equal(wrapper.positions, expansion.units)


@torch.no_grad()
def _with_ffn_biases(model: nn.Module) -> nn.Module:
    """``model`` with w1, w3 and w2 given random biases (torchtune's builders make none)."""
    gen = torch.Generator().manual_seed(9)
    for layer in model.layers:
        for name in ("w1", "w3", "w2"):
            plain = getattr(layer.mlp, name)
            biased = nn.Linear(plain.in_features, plain.out_features, bias=True)
            biased.weight.copy_(plain.weight)
            biased.bias.copy_(0.1 * torch.randn(plain.out_features, generator=gen))
            setattr(layer.mlp, name, biased)
    return model


def test_ffn_biases_move_with_their_channels(tokens):
    base = _with_ffn_biases(build_tiny("llama3_gqa"))
    on, off = apply_apex(copy.deepcopy(base), ON), apply_apex(copy.deepcopy(base), OFF)
    _select_and_perturb((on, off), random_selection(base, ON, seed=1), seed=2)
    with torch.no_grad():
        assert rel_diff(on(tokens), off(tokens)) <= REORDERED_SUM_TOLERANCE
    in_base_layout = base_layout_state_dict(on, on.state_dict())
    for key, value in off.state_dict().items():
        assert torch.equal(in_base_layout[key], value), key
    plain_on, plain_off = unwrap_apex(on).state_dict(), unwrap_apex(off).state_dict()
    assert any(key.endswith("mlp.w1.bias") for key in plain_off)
    for key, value in plain_off.items():
        assert torch.equal(plain_on[key], value), key


def test_setting_is_validated():
    with pytest.raises(ValueError, match="apex.contiguous_channels='yes' must be true or false"):
        ApexSettings(contiguous_channels="yes")


def test_selection_then_stage_then_unwrap_gives_the_base_layout(tokens):
    """Select A, train, fold (a stage boundary), select B (the channels move again),
    train, unwrap: the plain model is the layout-off twin's, bit for bit (the folds see
    the same values in the same tuned order; the layout only adds gathers)."""
    base, on, off = _twins()
    _select_and_perturb((on, off), random_selection(base, ON, seed=1), seed=2)
    for model in (on, off):
        fold_apex_(model, seed=3)
    _select_and_perturb((on, off), random_selection(base, ON, seed=4), seed=5)
    with torch.no_grad():
        wrapped = off(tokens)
    plain_on, plain_off = unwrap_apex(on).state_dict(), unwrap_apex(off).state_dict()
    assert plain_on.keys() == plain_off.keys() == base.state_dict().keys()
    for key, value in plain_off.items():
        assert torch.equal(plain_on[key], value), key
    with torch.no_grad():
        assert rel_diff(on(tokens), wrapped) <= 1e-5  # fold tolerance of tests/modules/test_expansion.py


def test_ranker_scores_are_in_base_channel_order(vocab_size):
    base, on, off = _twins("llama3_gqa4")
    _select_and_perturb((on, off), random_selection(base, ON, seed=1), seed=2)
    gen = torch.Generator().manual_seed(3)
    rankers = [ActivationRanker(model, ON).attach() for model in (on, off)]
    with torch.no_grad():
        for _ in range(3):
            tokens = torch.randint(0, vocab_size, (2, 16), generator=gen)
            mask = torch.rand(2, 16, generator=gen) > 0.3
            for model, ranker in zip((on, off), rankers):
                ranker.begin_microbatch(mask)
                model(tokens)
    for kind in (HEADS, CHANNELS):
        for got, want in zip(rankers[0].relative[kind], rankers[1].relative[kind]):
            assert torch.equal(got, want), kind
        for got, want in zip(rankers[0].activation[kind], rankers[1].activation[kind]):
            # The gate activation of each channel is the same dot product in both layouts;
            # the heads' norms read attention outputs after a reordered w2 sum of the layer
            # before: the logits' tolerance covers both.
            torch.testing.assert_close(got, want, rtol=REORDERED_SUM_TOLERANCE, atol=0)
    assert [s.to_dict() for s in rankers[0].select()] == [s.to_dict() for s in rankers[1].select()]


def test_plain_state_dict_hooks_save_and_load_the_base_layout(tmp_path, tokens):
    base = build_tiny("llama3_gqa")
    selection = random_selection(base, ON, seed=3)
    path = tmp_path / "selection.json"
    write_selection_file(path, selection, OFF, scores={}, num_samples=0)  # the layout does not matter here
    assert [s.to_dict() for s in read_selection_file(path, ON)] == [s.to_dict() for s in selection]
    arguments = dict(ratio=0.25, delta=True, tuned_ratio_heads=0.5, tuned_ratio_channels=0.6, selection_file=str(path))
    on = apex_model(copy.deepcopy(base), **arguments)
    off = apex_model(copy.deepcopy(base), **arguments, contiguous_channels=False)
    for model in (on, off):
        perturb_apex(model, seed=1)
    saved_on, saved_off = on.state_dict(), off.state_dict()
    assert saved_on.keys() == saved_off.keys() == base.state_dict().keys()
    for key, value in saved_off.items():
        assert torch.equal(saved_on[key], value), key  # the same folds, gathered back

    # A base state dict loaded into the permuted model: the base computed again, and the
    # selection laid out again (the channels were moved back before the load).
    on.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert rel_diff(on(tokens), base(tokens)) <= REORDERED_SUM_TOLERANCE
    for layer, expansion, wrappers in _channel_wrappers(on):
        for _, wrapper in wrappers:
            assert torch.equal(wrapper.positions, torch.arange(len(expansion.units)))


def test_resume_shards_load_into_the_saved_layout(tokens):
    """The recipe's resume: local shards saved in the live layout, with the layout, loaded
    into a fresh model; setting the saved selection then moves nothing. Resumed with the
    layout off, the same selection moves the channels back to the base layout."""
    base, on, off = _twins()
    selection = random_selection(base, ON, seed=1)
    _select_and_perturb((on, off), selection, seed=2)
    saved = local_model_state(on)
    assert any(key.startswith(LAYOUT_STATE_PREFIX) for key in saved)
    fresh = apply_apex(copy.deepcopy(base), ON)
    load_local_model_state(fresh, saved, "test state")
    weights = {k: v.clone() for k, v in fresh.state_dict().items()}
    set_selection(fresh, selection)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in weights.items())  # nothing moved
    with torch.no_grad():
        assert torch.equal(fresh(tokens), on(tokens))

    resumed_off = apply_apex(copy.deepcopy(base), OFF)
    load_local_model_state(resumed_off, saved, "test state")
    set_selection(resumed_off, selection)
    for key, value in off.state_dict().items():
        assert torch.equal(resumed_off.state_dict()[key], value), key


def test_resume_state_layout_is_checked_and_defaults_to_the_base_layout():
    base, on, off = _twins()
    selection = random_selection(base, ON, seed=1)
    set_selection(off, selection)
    older = {k: v for k, v in local_model_state(off).items() if not k.startswith(LAYOUT_STATE_PREFIX)}
    fresh = apply_apex(copy.deepcopy(base), ON)
    set_selection(fresh, random_selection(base, ON, seed=2))  # some other layout before the load
    load_local_model_state(fresh, older, "old state")  # saved before layouts existed: the base layout
    set_selection(fresh, selection)  # moves the channels from the base layout
    assert not torch.equal(fresh.layers[0].mlp.w1.weight, off.layers[0].mlp.w1.weight)
    in_base_layout = base_layout_state_dict(fresh, fresh.state_dict())
    for key, value in off.state_dict().items():
        assert torch.equal(in_base_layout[key], value), key

    set_selection(on, selection)
    saved = local_model_state(on)
    key = next(k for k in saved if k.startswith(LAYOUT_STATE_PREFIX))
    for damaged, message in (
        ({**saved, key: torch.zeros_like(saved[key])}, "is not an order of the layer's 96 FFN channels"),
        ({**saved, LAYOUT_STATE_PREFIX + "layers.7.slots": saved[key]}, "is not a layer of this model"),
    ):
        with pytest.raises(CheckpointError, match=f"damaged state: .*{message}"):
            load_local_model_state(apply_apex(copy.deepcopy(base), ON), damaged, "damaged state")


@pytest.mark.parametrize("fold", [False, True])
def test_recipe_checkpoint_is_saved_in_the_base_layout(fold, tokens):
    """save_checkpoint's two paths on a gathered state dict (after a stage boundary, the
    channels laid out for the next selection): the live base weights (``fold=False``,
    the model was just folded) or a CPU copy folded (``fold=True``)."""
    base, on, off = _twins()
    _select_and_perturb((on, off), random_selection(base, ON, seed=1), seed=2)
    for model in (on, off):
        fold_apex_(model, seed=3)
        set_selection(model, random_selection(base, ON, seed=4))
    if fold:
        for model in (on, off):
            perturb_apex(model, seed=5)
    plain = {}
    for name, model, settings in (("on", on, ON), ("off", off, OFF)):
        plain[name], failure = plain_checkpoint_state(
            base_layout_state_dict(model, model.state_dict()), fold=fold,
            build_model=lambda: build_tiny("llama3_gqa"), settings=settings, selection=get_selection(model),
            probe_tokens=tokens, dtype=torch.float32, tolerance=1e-5, label="test",
        )
        assert failure is None
    assert plain["on"].keys() == plain["off"].keys() == base.state_dict().keys()
    for key, value in plain["off"].items():
        assert torch.equal(plain["on"][key], value), key


def test_fused_copy_needs_the_base_layout(tokens):
    """What the recipe's conversion is for: fused from the gathered live state dict as
    it is (FFN rows of w1/w3 and columns of w2 permuted, operators not), the copy is a
    different model, and the fusion check cannot see it (it compares the copy with
    itself, folded and not)."""
    base, on, _ = _twins()
    _select_and_perturb((on,), random_selection(base, ON, seed=1), seed=2)
    with torch.no_grad():
        wrapped = on(tokens)
    live = on.state_dict()
    for state, matches in ((base_layout_state_dict(on, live), True), (live, False)):
        plain_sd, difference = unwrapped_state_dict(
            lambda: build_tiny("llama3_gqa"), ON, state, get_selection(on), tokens
        )
        assert difference <= 1e-5  # the copy folds to itself either way
        plain = build_tiny("llama3_gqa")
        plain.load_state_dict(plain_sd)
        with torch.no_grad():
            error = rel_diff(plain(tokens), wrapped)
        assert (error <= 1e-5) if matches else (error > 1e-2), error


def test_moving_channels_does_not_recompile(vocab_size, dynamo_graphs):
    """``compile: True``: a new selection moves the FFN weights (new storage, same shapes)
    between steps, as a stage boundary does; the compiled layers must not compile again.
    Graphs are counted by the ``dynamo_graphs`` fixture."""
    from torchtune import training

    graphs = dynamo_graphs
    base, model, _ = _twins("llama3_gqa4")
    model.train()
    ranker = ActivationRanker(model, ON).attach()
    training.compile_model(model, verbose=False)
    gen = torch.Generator().manual_seed(5)
    counts = []
    try:
        for seed in (1, 2, 3):  # each selection moves the channels
            set_selection(model, random_selection(base, ON, seed=seed))
            for _ in range(2):
                tokens = torch.randint(0, vocab_size, (2, 16), generator=gen)
                ranker.begin_microbatch(torch.rand(2, 16, generator=gen) > 0.3)
                model(tokens).square().mean().backward()
                counts.append(len(graphs))
    finally:
        torch._dynamo.reset()
    assert counts[0] > 0, "nothing was compiled: the test does not exercise torch.compile"
    assert counts == [counts[0]] * len(counts), f"graphs compiled after each step: {counts}"
