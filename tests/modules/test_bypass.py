"""bypass_unchanged_wrappers: fresh wrappers run as their base linears (the assessment
before stage 1), changed ones keep their own path, on every rank alike."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from apex_tune import ActivationRanker, ApexSettings, apply_apex
from apex_tune.modules.expansion import _ApexLinear
from apex_tune.modules.model import bypass_unchanged_wrappers, find_apex_layers
from apex_tune.training.assessment import score_units
from tests.conftest import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ApexSettings(ratio=0.25, tuned_ratio_heads=0.75, tuned_ratio_channels=0.75, delta=True)


def _wrappers(model):
    """Names of the model's APEX wrappers."""
    return {name for name, m in model.named_modules() if isinstance(m, _ApexLinear)}


def _bypassed(model):
    return {name for name, m in model.named_modules() if isinstance(m, _ApexLinear) and m._bypassed}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama3_gqa", "qwen2_bias"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["layout", "no_layout"])
def test_fresh_wrappers_run_as_their_base_linears(kind, dtype, contiguous, tokens, vocab_size):
    """Every fresh wrapper is bypassed; the model then computes what the unwrapped base
    computes, bit for bit (each wrapper calls F.linear on the base's own weight and bias,
    as nn.Linear does), and the assessment scores are the base model's. On exit every
    wrapper runs its own path again."""
    settings = ApexSettings(**{**SETTINGS.to_dict(), "contiguous_channels": contiguous})
    plain = build_tiny(kind).to(dtype)
    model = apply_apex(build_tiny(kind).to(dtype), settings)
    with torch.no_grad():
        want = plain(tokens)
        with bypass_unchanged_wrappers(model) as count:
            assert count == len(_wrappers(model)) > 0
            assert torch.equal(model(tokens), want)
    assert not _bypassed(model)

    rankers = [ActivationRanker(m, settings) for m in (model, plain)]
    for m, ranker in zip((model, plain), rankers):
        score_units(m, ranker, [({"tokens": tokens}, None)])
    for kind_ in settings.kinds:
        for got, want_ in zip(rankers[0].activation[kind_], rankers[1].activation[kind_]):
            assert torch.equal(got, want_)
    assert not _bypassed(model)


def _change(model, what: str) -> set:
    """Move one APEX parameter of layer 0's FFN off its init; the names of the wrappers
    whose function that changes."""
    layer = find_apex_layers(model)[0]
    mlp = layer.mlp
    ffn = {f"layers.0.mlp.{name}" for name in ("w1", "w2", "w3")}
    with torch.no_grad():
        if what == "delta":
            mlp.w3.delta[0, 0] = 1e-3
            return {"layers.0.mlp.w3"}
        if what == "b":
            mlp.w1.b[0] = 2.0
            return {"layers.0.mlp.w1"}
        if what == "a":  # shared by the FFN's three wrappers
            mlp.apex_expansion.a[0] = 0.5
            return ffn
        if what == "L2":  # M != 0 (L1 is nonzero from its init)
            mlp.apex_expansion.monarch.L2.normal_()
            return ffn
        if what == "L1_only":  # M = 0 still: L2 is zero
            mlp.apex_expansion.monarch.L1.normal_()
            return set()
    raise ValueError(what)


@pytest.mark.parametrize("what", ["delta", "b", "a", "L2", "L1_only"])
def test_changed_wrappers_keep_their_own_path(what, tokens):
    """A wrapper whose delta, b, a or M moved off its init is not bypassed (nor are the
    other wrappers sharing its a or M); the rest are. The model's function is unchanged by
    the bypass: the fresh wrappers compute their base linear either way, so the outputs
    agree to float rounding (the slice paths split some sums: a few fp32 ulps of the
    activations, well inside 1e-5 relative)."""
    model = apply_apex(build_tiny("llama3_gqa"), SETTINGS)
    changed = _change(model, what)
    everything = _wrappers(model)
    with torch.no_grad():
        want = model(tokens)
        with bypass_unchanged_wrappers(model) as count:
            assert _bypassed(model) == everything - changed
            assert count == len(everything - changed)
            got = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert not _bypassed(model)


def test_nested_bypass_keeps_the_outer_one():
    """Within an enclosing bypass nothing is checked again, and leaving the inner one
    leaves the outer's wrappers bypassed until it ends."""
    model = apply_apex(build_tiny("llama3_gqa"), SETTINGS)
    with bypass_unchanged_wrappers(model) as outer:
        with bypass_unchanged_wrappers(model) as inner:
            assert inner == 0
        assert len(_bypassed(model)) == outer == len(_wrappers(model))
    assert not _bypassed(model)


def _disagreeing_rank(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = apply_apex(build_tiny("llama3_gqa"), SETTINGS)
        # only rank 1's copy changed (as one rank's shard of a sharded delta would be)
        changed = _change(model, "delta") if rank == 1 else {"layers.0.mlp.w3"}
        everything = _wrappers(model)
        with bypass_unchanged_wrappers(model):
            assert _bypassed(model) == everything - changed
    finally:
        dist.destroy_process_group()


def test_a_wrapper_changed_on_one_rank_is_bypassed_on_none():
    """Each rank reads only its own shards: a wrapper is bypassed only where every rank
    finds it unchanged, so all ranks run the same computation (two gloo processes)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_disagreeing_rank, args=(os.path.join(tmp, "init"),), nprocs=2)
