"""The dense delta's partial back-propagation (``_SliceSwappedLinear``): the tuned slice
W_T + Delta is swapped into the frozen weight for one matmul and restored, and only the
slice's weight gradient is computed. Checked against the formula in float64, against the
two-matmul path it replaces, for bit-exact restores, and under activation checkpointing;
and the column wrappers' in-place write-back of their tuned outputs against a copy."""

import pytest
import torch
from torch import nn

from apex_tune import ApexColumnLinear, ApexExpansion, ApexRowLinear
from apex_tune.modules import expansion as expansion_module
from conftest import assert_checkpointing_recomputes_exactly, assert_grads_within, grads_and_reference, wrapper_grads

pytestmark = pytest.mark.usefixtures("one_thread")

EPS32 = torch.finfo(torch.float32).eps
# Sizes: 6 units of width 4 (K = 2, E = 1), 10 inputs (column) / 7 outputs (row), 3 x 5 tokens.
WIDTH, UNITS, K, E, D_IN, D_OUT, TOKENS = 4, 6, 2, 1, 10, 7, (3, 5)
SELECTION = [4, 1, 0, 5, 3]  # N, P, E


def _wrapper(kind: str, ops: bool, bias: bool, group: int = 1, seed: int = 0):
    """A wrapper with the delta, random operators (``ops``) or identity ones, random delta."""
    torch.manual_seed(seed)
    exp = ApexExpansion(K, E, WIDTH)
    if ops:
        with torch.no_grad():
            exp.monarch.L1.normal_()
            exp.monarch.L2.normal_()
            exp.a.uniform_(0.5, 1.5)
    if kind == "column":
        wrapper = ApexColumnLinear(nn.Linear(D_IN, UNITS * WIDTH, bias=bias), 2 * K + E, WIDTH, exp, delta=True)
        if ops:
            with torch.no_grad():
                wrapper.b.uniform_(0.5, 1.5)
    else:
        base = nn.Linear(UNITS * group * WIDTH, D_OUT, bias=bias)
        wrapper = ApexRowLinear(base, 2 * K + E, group, WIDTH, exp, delta=True)
    wrapper.set_units(torch.tensor(SELECTION))
    with torch.no_grad():
        wrapper.delta.normal_()
    return wrapper, exp


CASES = [
    pytest.param("column", ops, bias, 1, id=f"column-{'ops' if ops else 'identity'}-{'bias' if bias else 'nobias'}")
    for ops in (False, True) for bias in (False, True)
] + [
    pytest.param("row", ops, bias, group, id=f"row-g{group}-{'ops' if ops else 'identity'}-{'bias' if bias else 'nobias'}")
    for ops in (False, True) for bias in (False, True) for group in (1, 2)
]


@pytest.mark.parametrize("kind,ops,bias,group", CASES)
def test_gradients_equal_the_formula(kind, ops, bias, group):
    """y, dx, dDelta (and the operators' gradients) of the swapped-slice path equal the
    float64 autograd of the formula. Tolerance: each value is a chain of fp32 dot products
    (the matmul over at most d = max(in, out, tokens) terms, the Monarch over at most n
    terms, a few elementwise products), each rounding at most d * eps of the sum of its
    terms' magnitudes; 4 * d * eps relative to the largest magnitude is that bound with a
    margin of 4 for the chain (about 1.9e-5 here)."""
    wrapper, exp = _wrapper(kind, ops, bias, group)
    assert wrapper._partial_backprop()
    got, want, d = grads_and_reference(wrapper, exp, TOKENS)
    for name, value in want.items():
        scale = value.abs().max().item()
        assert scale > 0 or name == "L1", name  # L1 gets no gradient while L2 = 0 (M = 0)
        error = (got[name].double() - value).abs().max().item()
        assert error <= 4 * d * EPS32 * scale, f"{name}: {error:.3g} > {4 * d * EPS32 * scale:.3g}"
        assert got[name].dtype == torch.float32, name


@pytest.mark.parametrize("kind,ops,bias,group", CASES)
def test_swapped_slice_equals_the_two_matmul_path(kind, ops, bias, group, monkeypatch):
    """The same outputs and gradients as the path it replaces (frozen matmul + slice matmul),
    which still runs over NF4 bases; same bound as above (both are fp32 roundings of it)."""
    wrapper, exp = _wrapper(kind, ops, bias, group)
    x = torch.randn(*TOKENS, wrapper.in_features)
    g = torch.randn(*TOKENS, wrapper.out_features)
    got = wrapper_grads(wrapper, exp, wrapper, x, g)
    monkeypatch.setattr(type(wrapper), "_partial_backprop", lambda self: False)
    want = wrapper_grads(wrapper, exp, wrapper, x, g)
    d = max(wrapper.in_features, wrapper.out_features, TOKENS[0] * TOKENS[1])
    assert_grads_within(got, want, 2 * 4 * d * EPS32)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_frozen_weight_is_bit_identical_after_forward_and_backward(kind):
    """The swap restores a copy of the saved slice: the weight's bits and its version
    counter are unchanged (nothing that autograd saved elsewhere is invalidated), also
    after an exception inside the matmul."""
    wrapper, exp = _wrapper(kind, True, True)
    before, version = wrapper.weight.detach().clone(), wrapper.weight._version
    x = torch.randn(*TOKENS, wrapper.in_features, requires_grad=True)
    wrapper(x).square().sum().backward()
    with torch.no_grad():
        wrapper(x)
    assert torch.equal(wrapper.weight, before)
    assert wrapper.weight._version == version
    assert wrapper.delta.grad is not None and wrapper.weight.grad is None
    with pytest.raises(RuntimeError):
        wrapper(torch.randn(2, wrapper.in_features + 1))  # the matmul fails mid-swap
    assert torch.equal(wrapper.weight, before)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_activation_checkpointing_recomputes_the_same_gradients(kind):
    """Under (non-reentrant) activation checkpointing the forward, swap and restore
    included, runs again in backward: the gradients are bit-identical to the plain run's
    (the same fp32 operations in the same order) and the weight is restored."""
    wrapper, exp = _wrapper(kind, True, True)
    before = wrapper.weight.detach().clone()
    assert_checkpointing_recomputes_exactly(wrapper, exp, TOKENS)
    assert torch.equal(wrapper.weight, before)


@pytest.mark.parametrize("delta", [False, True])
def test_in_place_write_back_equals_the_copy(delta, monkeypatch):
    """The column wrappers write their mixed tuned outputs into the matmul's output in
    place; outputs and gradients are bit-identical to writing into a copy (the same
    values reach the same operations), with and without the swapped-slice delta."""
    wrapper, exp = _wrapper("column", True, True)
    if not delta:
        wrapper.delta = None
    x = torch.randn(*TOKENS, wrapper.in_features)
    g = torch.randn(*TOKENS, wrapper.out_features)
    in_place = wrapper_grads(wrapper, exp, wrapper, x, g)
    monkeypatch.setattr(expansion_module, "_replaced_in_place", expansion_module._replaced)
    copied = wrapper_grads(wrapper, exp, wrapper, x, g)
    for name, value in copied.items():
        assert torch.equal(in_place[name], value), name


def test_bf16_forward_uses_the_rounded_sum_and_keeps_delta_exact():
    """bf16 base: the forward uses round_bf16(W_T + Delta) (one rounding of the fp32 sum),
    so a delta below half a bf16 ulp of W leaves the output unchanged, while its fp32
    gradient is still dy_T^T x, computed from the bf16 tensors: exactly what the bf16
    matmul of the same operands gives, cast to fp32."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, UNITS * WIDTH, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.copy_(torch.full_like(base.weight, 1.0))  # bf16 ulp at 1.0: 2^-7
    wrapper = ApexColumnLinear(base, 2 * K + E, WIDTH, None, delta=True)
    wrapper.set_units(torch.tensor(SELECTION))
    x = torch.randn(*TOKENS, D_IN, dtype=torch.bfloat16)
    with torch.no_grad():
        at_init = wrapper(x)
        wrapper.delta.fill_(2.0**-10)  # below half an ulp (2^-8): rounded away in the forward
    y = wrapper(x)
    assert torch.equal(y.detach(), at_init)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert wrapper.delta.grad.dtype == torch.float32
    pos = wrapper.positions
    expected = g.reshape(-1, g.shape[-1]).index_select(1, pos).T.matmul(x.reshape(-1, D_IN)).float()
    assert torch.equal(wrapper.delta.grad, expected)
    with torch.no_grad():
        wrapper.delta.fill_(2.0**-6)  # two ulps: seen
    assert not torch.equal(wrapper(x), at_init)
