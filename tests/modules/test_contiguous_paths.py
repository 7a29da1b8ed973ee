"""The wrappers' paths for tuned units that are the first of the weight, in [N, P, E] order
(the contiguous layout): matmuls over row/column slices of the frozen weight instead of
gathers, weight swaps and write-backs. Checked against the float64 formula, against the
scattered-units path (the same selection, the weight's units permuted back), under
activation checkpointing, and in bf16 against the rounded sum."""

import pytest
import torch
from torch import nn

from apex_tune import ApexColumnLinear, ApexExpansion, ApexRowLinear
from apex_tune.modules import expansion as expansion_module
from apex_tune.modules.expansion import _rounded_sum
from conftest import assert_checkpointing_recomputes_exactly, assert_grads_within, grads_and_reference, wrapper_grads

pytestmark = pytest.mark.usefixtures("one_thread")

EPS32 = torch.finfo(torch.float32).eps
# 6 units of width 4 (column) or 1 x 4 (row), K = 2; E = 1 with the delta, 0 without.
WIDTH, UNITS, K, D_IN, D_OUT, TOKENS = 4, 6, 2, 10, 7, (3, 5)
SCATTERED = [4, 1, 0, 5, 3]  # N, P, E in the base layout


def _wrapper(kind: str, delta: bool, bias: bool, extra: int, seed: int = 0):
    """A wrapper over the first 2K + extra units (random operators and delta) and the same
    one over a weight whose units sit at SCATTERED instead (the base layout)."""
    torch.manual_seed(seed)
    tuned = 2 * K + extra
    exp = ApexExpansion(K, extra, WIDTH)
    exp.contiguous = True  # as apex_tune.modules.layout marks a laid-out FFN expansion
    with torch.no_grad():
        exp.monarch.L1.normal_()
        exp.monarch.L2.normal_()
        exp.a.uniform_(0.5, 1.5)
    if kind == "column":
        base = nn.Linear(D_IN, UNITS * WIDTH, bias=bias)
        wrapper = ApexColumnLinear(base, tuned, WIDTH, exp, delta=delta)
        with torch.no_grad():
            wrapper.b.uniform_(0.5, 1.5)
    else:
        base = nn.Linear(UNITS * WIDTH, D_OUT, bias=bias)
        wrapper = ApexRowLinear(base, tuned, 1, WIDTH, exp, delta=delta)
    wrapper.set_units(torch.arange(tuned))
    if delta:
        with torch.no_grad():
            wrapper.delta.normal_()
    # The same function with the units scattered: unit SCATTERED[i] holds prefix unit i.
    order = SCATTERED[:tuned] + [u for u in range(UNITS) if u not in SCATTERED[:tuned]]
    rows = torch.tensor(order).repeat_interleave(WIDTH) * WIDTH + torch.arange(WIDTH).repeat(UNITS)
    inverse = torch.empty_like(rows)
    inverse[rows] = torch.arange(len(rows))
    scattered_base = nn.Linear(base.in_features, base.out_features, bias=bias)
    with torch.no_grad():
        dim = wrapper.dim
        scattered_base.weight.copy_(wrapper.weight.index_select(dim, inverse))
        if bias:
            scattered_base.bias.copy_(wrapper.bias.index_select(0, inverse) if dim == 0 else wrapper.bias)
    cls = ApexColumnLinear if kind == "column" else ApexRowLinear
    args = (WIDTH, exp) if kind == "column" else (1, WIDTH, exp)
    scattered = cls(scattered_base, tuned, *args, delta=delta)
    scattered.set_units(torch.tensor(SCATTERED[:tuned]))
    for name in ("delta", "b"):
        if getattr(wrapper, name, None) is not None:
            getattr(scattered, name).data.copy_(getattr(wrapper, name))
    return wrapper, scattered, exp, (rows, inverse)


CASES = [
    pytest.param(kind, delta, bias, extra, id=f"{kind}-{'delta' if delta else 'nodelta'}-E{extra}-{'bias' if bias else 'nobias'}")
    for kind in ("column", "row")
    for delta in (True, False)
    for extra in ((0, 1) if delta else (0,))
    for bias in (False, True)
]


@pytest.mark.parametrize("kind,delta,bias,extra", CASES)
def test_prefix_path_equals_the_formula(kind, delta, bias, extra):
    """y, dx and every trained gradient equal the float64 autograd of the formula. Tolerance:
    each value is a chain of fp32 dot products (at most d = max(in, out, tokens) terms, the
    Monarch at most n) and a few elementwise products, each rounding at most d * eps of the
    sum of its terms' magnitudes; 4 * d * eps of the largest magnitude is that with a margin
    of 4 for the chain (about 1.9e-5 here), as for the scattered path."""
    wrapper, _, exp, _ = _wrapper(kind, delta, bias, extra)
    assert wrapper._prefix_path()
    got, want, d = grads_and_reference(wrapper, exp, TOKENS)
    assert set(got) == set(want)
    assert_grads_within(got, want, 4 * d * EPS32)
    assert all(value.dtype == torch.float32 for value in got.values())


@pytest.mark.parametrize("kind,delta,bias,extra", CASES)
def test_prefix_path_equals_the_scattered_path(kind, delta, bias, extra):
    """The same selection with its units scattered over the weight (the base layout, the
    index path) computes the same outputs and gradients, up to the outputs' permutation;
    twice the bound above (both are fp32 roundings of the formula)."""
    wrapper, scattered, exp, (rows, inverse) = _wrapper(kind, delta, bias, extra)
    assert not scattered._prefix_path()
    x = torch.randn(*TOKENS, wrapper.in_features)
    g = torch.randn(*TOKENS, wrapper.out_features)
    got = wrapper_grads(wrapper, exp, wrapper, x, g)
    # prefix position p is position rows[p] of the scattered layout (and q is inverse[q])
    if kind == "column":
        want = wrapper_grads(scattered, exp, lambda t: scattered(t).index_select(-1, rows), x, g)
    else:
        want = wrapper_grads(scattered, exp, lambda t: scattered(t.index_select(-1, inverse)), x, g)
    d = max(wrapper.in_features, wrapper.out_features, TOKENS[0] * TOKENS[1])
    assert_grads_within(got, want, 2 * 4 * d * EPS32)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_prefix_path_under_activation_checkpointing(kind):
    """Recomputed in backward, the same fp32 operations in the same order: bit-identical
    gradients; the frozen weight is never written (bits and version counter)."""
    wrapper, _, exp, _ = _wrapper(kind, True, True, 1)
    before, version = wrapper.weight.detach().clone(), wrapper.weight._version
    assert_checkpointing_recomputes_exactly(wrapper, exp, TOKENS)
    assert torch.equal(wrapper.weight, before) and wrapper.weight._version == version


def test_rounded_sum_in_blocks_is_the_one_rounding(monkeypatch):
    """The blocked rounded sum equals converting the whole fp32 sum at once, bit for bit,
    over several blocks and a strided (column-slice) weight."""
    monkeypatch.setattr(expansion_module, "_ROUNDED_SUM_BLOCK", 64)
    torch.manual_seed(0)
    weight = torch.randn(37, 40, dtype=torch.bfloat16)[:, 3:30]
    delta = torch.randn(37, 27) * 1e-2
    out = _rounded_sum(weight, delta)
    assert torch.equal(out, (weight.float() + delta).to(torch.bfloat16))


@pytest.mark.parametrize("kind", ["column", "row"])
def test_bf16_prefix_path_uses_the_rounded_sum(kind):
    """bf16 base: the forward uses round_bf16(W_T + Delta), so a delta below half a bf16 ulp
    of W is not seen by the output, one of two ulps is; Delta's gradient stays fp32."""
    wrapper, _, exp, _ = _wrapper(kind, True, False, 1)
    wrapper.to(torch.bfloat16)  # the base; APEX's own parameters go back to fp32 below
    for p in [wrapper.delta, *exp.parameters()] + ([wrapper.b] if kind == "column" else []):
        p.data = p.data.float()
    with torch.no_grad():
        wrapper.weight.fill_(1.0)  # bf16 ulp at 1.0: 2^-7
        wrapper.delta.zero_()
    x = torch.randn(*TOKENS, wrapper.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        at_init = wrapper(x)
        wrapper.delta.fill_(2.0**-10)  # below half an ulp: rounded away
        assert torch.equal(wrapper(x), at_init)
        wrapper.delta.fill_(2.0**-6)  # two ulps: seen
        assert not torch.equal(wrapper(x), at_init)
    y = wrapper(x)
    y.float().square().sum().backward()
    assert wrapper.delta.grad.dtype == torch.float32 and wrapper.delta.grad.abs().sum() > 0
