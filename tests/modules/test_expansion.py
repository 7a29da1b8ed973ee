"""Expansion wrappers: exact identity at init, the column/row formulas against a
hand-built dense reference, fold/unwrap equivalence, gradients, adapter params."""

import copy

import pytest
import torch
from torch import nn
from torchtune.modules.peft import get_adapter_params

from apex_tune import (
    ApexColumnLinear,
    ApexExpansion,
    ApexRowLinear,
    ApexSettings,
    apply_apex,
    unwrap_apex,
    get_selection,
    fold_apex_,
    set_apex_trainable,
    set_selection,
)
from apex_tune.modules.expansion import unit_positions

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["llama3_gqa", "llama2_mha", "qwen2_bias", "llama3_gqa4"]
PROJECTIONS = [("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "output_proj"),
               ("mlp", "w1"), ("mlp", "w2"), ("mlp", "w3")]


def settings_for(delta: bool) -> ApexSettings:
    # ratio 0.25 gives K >= 1 for the 2-KV-group model; tuned 0.75 gives E > 0 where possible.
    return ApexSettings(ratio=0.25, tuned_ratio_heads=0.75, tuned_ratio_channels=0.75, delta=delta)


def apex_param_names(model):
    return {n for n in dict(model.named_parameters()) if n.rsplit(".", 1)[-1] in ("L1", "L2", "a", "b", "delta")}


# --------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init(kind, delta, make_tiny, tokens, random_selection_fn):
    base = make_tiny(kind)
    with torch.no_grad():
        ref = base(tokens)
    settings = settings_for(delta)
    wrapped = apply_apex(copy.deepcopy(base), settings)  # placeholder selection
    with torch.no_grad():
        assert (wrapped(tokens) - ref).abs().max().item() <= 1e-6
    set_selection(wrapped, random_selection_fn(wrapped, settings, seed=3))
    with torch.no_grad():
        assert (wrapped(tokens) - ref).abs().max().item() <= 1e-6
    # The wrappers really are in place.
    for owner, name in PROJECTIONS:
        module = getattr(getattr(wrapped.layers[0], owner), name)
        if name in ("q_proj", "k_proj") and not delta:
            assert type(module) is nn.Linear
        else:
            assert isinstance(module, (ApexColumnLinear, ApexRowLinear))


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_fold_and_unwrap_keep_outputs(kind, delta, make_tiny, tokens, random_selection_fn, perturb_apex_fn, rel_diff_fn):
    base = make_tiny(kind)
    base_state = {k: v.shape for k, v in base.state_dict().items()}
    with torch.no_grad():
        base_out = base(tokens)
    settings = settings_for(delta)
    model = apply_apex(copy.deepcopy(base), settings, random_selection_fn(base, settings, seed=1))
    assert perturb_apex_fn(model, seed=2) > 0
    with torch.no_grad():
        wrapped_out = model(tokens)
    assert rel_diff_fn(wrapped_out, base_out) > 1e-2, "perturbing the APEX parameters must change the outputs"

    # Stage boundary: fold in place, reset operators, same function.
    fold_apex_(model, seed=5)
    with torch.no_grad():
        merged_out = model(tokens)
    assert rel_diff_fn(merged_out, wrapped_out) <= 1e-5
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("L2", "delta"):
            assert torch.count_nonzero(param) == 0, name
        elif leaf in ("a", "b"):
            assert torch.equal(param, torch.ones_like(param)), name
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert changed, "fold_apex_ must write W' into the base weights"

    # Train a bit more (perturb again), then unwrap into the plain model.
    perturb_apex_fn(model, seed=6)
    with torch.no_grad():
        wrapped_out = model(tokens)
    fused = unwrap_apex(model)
    for module in fused.modules():
        assert not isinstance(module, (ApexColumnLinear, ApexRowLinear, ApexExpansion))
    for layer in fused.layers:
        assert not hasattr(layer.attn, "apex_expansion") and not hasattr(layer.mlp, "apex_expansion")
        for owner, name in PROJECTIONS:
            assert type(getattr(getattr(layer, owner), name)) is nn.Linear, name
    assert {k: v.shape for k, v in fused.state_dict().items()} == base_state
    assert not apex_param_names(fused)
    with torch.no_grad():
        fused_out = fused(tokens)
    assert rel_diff_fn(fused_out, wrapped_out) <= 1e-5
    # The fused state dict loads into a fresh plain model and reproduces it.
    plain = make_tiny(kind, seed=11)
    plain.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_diff_fn(plain(tokens), fused_out) <= 1e-6


@pytest.mark.parametrize("kind", ["llama2_mha", "qwen2_bias"])
def test_base_checkpoint_names_unchanged_by_wrapping(kind, make_tiny):
    base = make_tiny(kind)
    model = apply_apex(copy.deepcopy(base), settings_for(True))
    sd = model.state_dict()
    for key, value in base.state_dict().items():
        assert key in sd and sd[key].shape == value.shape
    # Loading a base checkpoint into the wrapped model works (APEX keys left at init).
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    assert all(k.rsplit(".", 1)[-1] in ("L1", "L2", "a", "b", "delta", "units", "positions") for k in missing)


@pytest.mark.parametrize("kind", ["llama3_gqa", "qwen2_bias"])
def test_gradients_flow_only_to_apex_params(kind, make_tiny, tokens, random_selection_fn):
    settings = ApexSettings(ratio=0.25, tuned_ratio_heads=0.75, tuned_ratio_channels=0.75, delta=True)
    model = make_tiny(kind)
    apply_apex(model, settings, random_selection_fn(model, settings, seed=4))
    # apply_apex alone already freezes every wrapped base weight.
    for layer in model.layers:
        for owner, name in PROJECTIONS:
            module = getattr(getattr(layer, owner), name)
            assert not module.weight.requires_grad
    set_apex_trainable(model, settings)
    model.train()
    model(tokens).logsumexp(-1).mean().backward()
    apex = apex_param_names(model)
    assert apex == set(get_adapter_params(model))
    for name, param in model.named_parameters():
        if name in apex:
            assert param.requires_grad and param.grad is not None, name
            if not name.endswith("L1"):  # dL/dL1 is exactly 0 while L2 == 0
                assert param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_train_embeddings_flag(make_tiny, tokens):
    settings = ApexSettings(ratio=0.25, train_embeddings=True)
    model = apply_apex(make_tiny("llama2_mha"), settings)
    set_apex_trainable(model, settings)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == apex_param_names(model) | {"tok_embeddings.weight", "output.weight"}


@pytest.mark.parametrize("delta", [False, True])
def test_adapter_params(delta, make_tiny):
    settings = settings_for(delta)
    model = apply_apex(make_tiny("qwen2_bias"), settings)
    found = get_adapter_params(model)
    expected = set()
    for i in range(len(model.layers)):
        for owner in ("attn", "mlp"):
            expected |= {f"layers.{i}.{owner}.apex_expansion.{n}" for n in ("monarch.L1", "monarch.L2", "a")}
        expected |= {f"layers.{i}.attn.v_proj.b", f"layers.{i}.mlp.w1.b", f"layers.{i}.mlp.w3.b"}
        if delta:
            expected |= {f"layers.{i}.{o}.{n}.delta" for o, n in PROJECTIONS}
    assert set(found) == expected
    named = dict(model.named_parameters())
    assert all(found[k] is named[k] for k in found)
    for module in model.modules():
        if isinstance(module, (ApexColumnLinear, ApexRowLinear, ApexExpansion)):
            assert callable(module.adapter_params)
            names = dict(module.named_parameters())
            assert all(n in names for n in module.adapter_params())
            assert "weight" not in module.adapter_params() and "bias" not in module.adapter_params()


@pytest.mark.parametrize("kind", ["llama2_mha", "llama3_gqa4"])
def test_set_selection_keeps_shapes(kind, make_tiny, tokens, random_selection_fn):
    settings = settings_for(True)
    base = make_tiny(kind)
    with torch.no_grad():
        ref = base(tokens)
    model = apply_apex(copy.deepcopy(base), settings)
    def shapes_of(m):
        return {k: v.shape for k, v in [*m.named_parameters(), *m.named_buffers()]}

    shapes = shapes_of(model)
    before = {k: v.clone() for k, v in model.named_buffers() if k.endswith(("units", "positions"))}
    assert before
    for seed in (1, 2):
        sel = random_selection_fn(model, settings, seed=seed)
        set_selection(model, sel)
        assert shapes_of(model) == shapes
        got = get_selection(model)
        for want_layer, got_layer in zip(sel, got):
            for kind_name in ("heads", "channels"):
                want, have = getattr(want_layer, kind_name), getattr(got_layer, kind_name)
                assert torch.equal(want.ordered(), have.ordered())
        with torch.no_grad():
            assert (model(tokens) - ref).abs().max().item() <= 1e-6
    after = dict(model.named_buffers())
    assert any(not torch.equal(before[k], after[k]) for k in before), "selection buffers did not change"


# --------------------------------------------------------------------------- single linears


def _expected_positions(units, group, width):
    """Hand-written layout: for each group slice j, for each unit (in order), its width entries."""
    return torch.tensor(
        [u * group * width + j * width + o for j in range(group) for u in units.tolist() for o in range(width)]
    )


def test_unit_positions_layout():
    units = torch.tensor([3, 0, 2])
    assert torch.equal(unit_positions(units, 1, 4), _expected_positions(units, 1, 4))
    assert torch.equal(unit_positions(units, 2, 3), _expected_positions(units, 2, 3))
    assert unit_positions(units, 2, 3)[:6].tolist() == [18, 19, 20, 0, 1, 2]


def _make_expansion(k, e, width, seed):
    torch.manual_seed(seed)
    exp = ApexExpansion(k, e, width)
    with torch.no_grad():
        exp.monarch.L1.normal_()
        exp.monarch.L2.normal_()
        exp.a.uniform_(0.5, 1.5)
    return exp


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_column_formula(delta, bias):
    # 6 units of width 4 (think: 6 V heads of head_dim 4), K = 2, E = 1.
    width, num_units, k, e, d_in = 4, 6, 2, 1, 10
    torch.manual_seed(0)
    lin = nn.Linear(d_in, num_units * width, bias=bias)
    W = lin.weight.detach().clone().double()
    B = lin.bias.detach().clone().double() if bias else None
    exp = _make_expansion(k, e, width, seed=1)
    wrapper = ApexColumnLinear(lin, 2 * k + e, width, exp, delta=delta)
    N, P, E = [4, 1], [0, 5], [3]
    wrapper.set_units(torch.tensor(N + P + E))
    with torch.no_grad():
        wrapper.b.uniform_(0.5, 1.5)
        if delta:
            wrapper.delta.normal_()

    def rows(units):
        return [u * width + o for u in units for o in range(width)]

    M = exp.monarch.to_dense().detach().double()
    a, b = exp.a.detach().double(), wrapper.b.detach().double()
    Wt = W.clone()
    if delta:
        Wt[rows(N + P + E)] += wrapper.delta.detach().double()
    expected = W.clone()
    expected[rows(E)] = Wt[rows(E)]
    expected[rows(N)] = torch.diag(a) @ Wt[rows(N)] + M @ Wt[rows(P)]
    expected[rows(P)] = torch.diag(b) @ Wt[rows(P)]
    untouched = rows([2])
    assert torch.equal(expected[untouched], W[untouched])
    if bias:
        expected_bias = B.clone()
        expected_bias[rows(N)] = a * B[rows(N)] + M @ B[rows(P)]
        expected_bias[rows(P)] = b * B[rows(P)]

    x = torch.randn(3, 5, d_in)
    ref = x.double() @ expected.T + (expected_bias if bias else 0)
    assert torch.allclose(wrapper(x).double(), ref, atol=1e-5, rtol=1e-5)

    wrapper.fold_()
    assert torch.allclose(wrapper.weight.double(), expected, atol=1e-5, rtol=1e-5)
    if bias:
        assert torch.allclose(wrapper.bias.double(), expected_bias, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_row_formula(group, delta):
    # Like output_proj: 5 KV-group units, each `group` query heads of head_dim 3.
    width, num_units, k, e, d_out = 3, 5, 1, 2, 7
    torch.manual_seed(group)
    lin = nn.Linear(num_units * group * width, d_out, bias=False)
    W = lin.weight.detach().clone().double()
    exp = _make_expansion(k, e, width, seed=group + 10)
    wrapper = ApexRowLinear(lin, 2 * k + e, group, width, exp, delta=delta)
    N, P, E = [3], [0], [4, 1]
    units = torch.tensor(N + P + E)
    wrapper.set_units(units)
    assert torch.equal(wrapper.positions, _expected_positions(units, group, width))
    if delta:
        with torch.no_grad():
            wrapper.delta.normal_()

    def cols(units_, j):
        """Columns of slice j (query head j of the group) of each unit, unit-major."""
        return [u * group * width + j * width + o for u in units_ for o in range(width)]

    M = exp.monarch.to_dense().detach().double()
    a = exp.a.detach().double()
    Wt = W.clone()
    if delta:
        Wt[:, _expected_positions(units, group, width)] += wrapper.delta.detach().double()
    expected = Wt.clone()
    for j in range(group):
        expected[:, cols(N, j)] = Wt[:, cols(N, j)] @ torch.diag(a) + Wt[:, cols(P, j)] @ M.T
    untouched = cols([2], 0)
    assert torch.equal(expected[:, untouched], W[:, untouched])

    x = torch.randn(2, 4, num_units * group * width)
    ref = x.double() @ expected.T
    assert torch.allclose(wrapper(x).double(), ref, atol=1e-5, rtol=1e-5)

    wrapper.fold_()
    assert torch.allclose(wrapper.weight.double(), expected, atol=1e-5, rtol=1e-5)


def test_pair_expands_head_outputs_consistently():
    # In an MHA-like pair (V column wrapper, O row wrapper sharing M and a) with
    # identity attention, O'(V' x) restricted to the N/P units follows the formulas.
    hd, units, k = 2, 4, 1
    torch.manual_seed(3)
    v, o = nn.Linear(6, units * hd, bias=False), nn.Linear(units * hd, 5, bias=False)
    exp = _make_expansion(k, 0, hd, seed=4)
    vw = ApexColumnLinear(v, 2 * k, hd, exp)
    ow = ApexRowLinear(o, 2 * k, 1, hd, exp)
    for w in (vw, ow):
        w.set_units(torch.tensor([2, 1]))
    assert vw.expansion is exp and ow.expansion is exp
    # The shared expansion is held by the owner, not registered under each wrapper.
    assert not any(n.startswith("_expansion") for n, _ in vw.named_parameters())
    x = torch.randn(3, 6)
    M, a = exp.monarch.to_dense().detach(), exp.a.detach()
    Vd = v.weight.detach().clone()
    Vd[4:6] = a[:, None] * v.weight[4:6].detach() + M @ v.weight[2:4].detach()
    Vd[2:4] = vw.b.detach()[:, None] * v.weight[2:4].detach()
    Od = o.weight.detach().clone()
    Od[:, 4:6] = o.weight[:, 4:6].detach() * a + o.weight[:, 2:4].detach() @ M.T
    assert torch.allclose(ow(vw(x)), x @ Vd.T @ Od.T, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("group, extra, scale_p", [(1, 0, True), (1, 3, False), (3, 2, True)])
def test_mix_values_and_gradients_match_dense_reference(transposed, group, extra, scale_p):
    """mix / mix_transposed (values, and the gradients of t, a, b and M's factors) against
    the same formula with the dense M in float64; n = 16 (4 x 4 blocks, the square Monarch
    path), 6 rows. Every entry is a sum of products, accumulated in fp32 over at most
    depth = 2 * block_size + 2 terms (two block products and the add), plus the rows for a
    gradient of a, b or a factor (a sum over rows); fp32 computes it within gamma_depth
    (= depth u / (1 - depth u), u = 2^-24) times the same computation on absolute values,
    which the test evaluates. Margin 2."""
    from apex_tune.modules.expansion import Operators, mix, mix_transposed
    from tests.modules.test_monarch import reference_apply

    k, width, rows = 4, 4, 6
    n = k * width
    exp = _make_expansion(k, 0, width, seed=group + extra)
    gen = torch.Generator().manual_seed(7)
    t = torch.randn(rows, group * (2 * n + extra), generator=gen, requires_grad=True)
    g = torch.randn(rows, group * (2 * n + extra), generator=gen)
    b = (torch.rand(n, generator=gen) + 0.5).requires_grad_() if scale_p and not transposed else None
    ops = Operators(n, exp.a, exp.monarch.L1, exp.monarch.L2)
    out = mix_transposed(t, ops, group) if transposed else mix(t, ops, b, group)
    out.backward(g)

    def dense_formula(t_, a_, L1_, L2_, b_=None):
        M = reference_apply(L1_, L2_, n, torch.eye(n, dtype=torch.float64)).T
        parts = t_.reshape(rows, group, -1)
        N, P, E = parts[..., :n], parts[..., n : 2 * n], parts[..., 2 * n :]
        if transposed:
            new = [N * a_, P + N @ M, E]
        else:
            new = [N * a_ + P @ M.T, P * b_ if b_ is not None else P, E]
        return torch.cat(new, -1).reshape(rows, -1)

    leaves = [t, exp.a, exp.monarch.L1, exp.monarch.L2] + ([b] if b is not None else [])
    exact = [x.detach().double().requires_grad_() for x in leaves]
    absolute = [x.detach().double().abs().requires_grad_() for x in leaves]
    ref = dense_formula(*exact)
    ref.backward(g.double())
    bound = dense_formula(*absolute)
    bound.backward(g.double().abs())
    depth = 2 * exp.monarch.block_size + 2 + rows
    gamma = depth * 2.0**-24 / (1 - depth * 2.0**-24)
    assert torch.all((out.detach().double() - ref.detach()).abs() <= 2 * gamma * bound.detach())
    for got, want, limit in zip(leaves, exact, absolute):
        assert torch.all((got.grad.double() - want.grad).abs() <= 2 * gamma * limit.grad), got.shape
