"""Shared fixtures: tiny torchtune decoders (seeded, perturbed off their init) and
helpers to draw random APEX selections and to perturb every APEX parameter.

Tiny geometry (embed 64, 8 query heads, head_dim 8, 96 FFN channels, 2 layers):

- ``llama3_gqa``: Llama 3, 2 KV heads -> 2 head units (KV groups) of 4 query heads.
- ``llama3_gqa4``: Llama 3, 4 KV heads -> 4 head units of 2 query heads.
- ``llama2_mha``: Llama 2, MHA -> 8 head units of 1 head.
- ``qwen2_bias``: Qwen2 (q/k/v biases), 4 KV heads -> 4 head units of 2 heads.
"""

import itertools
from typing import Callable, List

import pytest
import torch
from torch import nn
from torchtune.models.llama2 import llama2
from torchtune.models.llama3 import llama3
from torchtune.models.qwen2 import qwen2

from apex_tune import ApexSettings, LayerSelection, UnitSelection, apply_apex, find_apex_layers, set_selection
from apex_tune.dev.tiny import make_tiny_assets
from apex_tune.modules.expansion import mix, mix_transposed

VOCAB = 97
SEQ = 16



def _build(kind: str) -> nn.Module:
    common = dict(vocab_size=VOCAB, num_layers=2, num_heads=8, embed_dim=64, max_seq_len=64, intermediate_dim=96)
    if kind == "llama3_gqa":
        return llama3(num_kv_heads=2, **common)
    if kind == "llama3_gqa4":
        return llama3(num_kv_heads=4, **common)
    if kind == "llama2_mha":
        return llama2(num_kv_heads=8, **common)
    if kind == "qwen2_bias":
        return qwen2(num_kv_heads=4, **common)
    raise ValueError(kind)


@torch.no_grad()
def build_tiny(kind: str, seed: int = 0) -> nn.Module:
    """A tiny fp32 decoder with fixed seed, every parameter moved off its init."""
    torch.manual_seed(seed)
    model = _build(kind)
    gen = torch.Generator().manual_seed(1000 + seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if param.dim() == 1 and name.endswith("scale"):  # RMSNorm scales (init 1)
            param.mul_(1 + 0.2 * noise)
        else:
            param.add_(0.3 * param.std() * noise if param.numel() > 1 else 0.1 * noise)
    model.eval()
    return model


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread, then restore the setting. The tiny models
    gain nothing from more, and spinning OpenMP threads slow down badly when other
    jobs share a small machine. Core test modules opt in with ``pytestmark``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_tiny() -> Callable[..., nn.Module]:
    return build_tiny


@pytest.fixture
def vocab_size() -> int:
    return VOCAB


@pytest.fixture
def tokens() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (2, SEQ), generator=gen)


def random_selection(model: nn.Module, settings: ApexSettings, seed: int = 0) -> List[LayerSelection]:
    """A random, valid P/N/E selection for every layer of ``model`` (sizes from ``settings``)."""
    gen = torch.Generator().manual_seed(seed)
    selection = []
    for layer in find_apex_layers(model):
        per_kind = {}
        for kind in ("heads", "channels"):
            n = layer.num_units(kind)
            k = settings.expanded_units(n, kind)
            e = settings.extra_units(n, kind)
            perm = torch.randperm(n, generator=gen)[: 2 * k + e]
            per_kind[kind] = UnitSelection.from_ordered(perm, k)
        selection.append(LayerSelection(**per_kind))
    return selection


@torch.no_grad()
def perturb_apex(model: nn.Module, seed: int = 0, scale: float = 0.2) -> int:
    """Set every APEX parameter (L1, L2, a, b, delta) to random values; returns how many tensors."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(param.shape, generator=gen)
        if leaf in ("L1", "L2"):
            param.copy_(noise * scale)
        elif leaf in ("a", "b"):
            param.copy_(1 + noise * scale)
        elif leaf == "delta":
            param.copy_(noise * scale * 0.1)
        else:
            continue
        count += 1
    return count


@pytest.fixture
def random_selection_fn():
    return random_selection


@pytest.fixture
def perturb_apex_fn():
    return perturb_apex


def trained_tiny_apex() -> nn.Module:
    """The tiny GQA Llama with APEX + delta on a random selection and every APEX parameter
    off identity: a stage's end, ready to fold (the same model on every call)."""
    model = build_tiny("llama3_gqa")
    settings = ApexSettings(ratio=0.25, delta=True, tuned_ratio_heads=0.5, tuned_ratio_channels=0.6)
    apply_apex(model, settings)
    set_selection(model, random_selection(model, settings, seed=0))
    perturb_apex(model, seed=1)
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def rel_diff_fn():
    return rel_diff


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tiny offline assets (tokenizer, base weights, data) shared by the recipe runs."""
    root = tmp_path_factory.mktemp("tiny_assets")
    make_tiny_assets(root, num_train=400, num_val=50, seed=0)
    return root


def wrapper_reference(wrapper, exp, x: torch.Tensor) -> torch.Tensor:
    """An APEX wrapper's function in float64 from its definition: W~ = W with the tuned
    slice W_T + Delta (when the delta is on); column: the tuned outputs of x W~^T + bias
    mixed (when it mixes); row: W~ (R x) + bias."""
    dim, pos = wrapper.dim, wrapper.positions
    weight = wrapper.weight.detach().double()
    if wrapper.delta is not None:
        weight = weight.index_add(dim, pos, wrapper.delta.double())
    bias = wrapper.bias.detach().double() if wrapper.bias is not None else None
    ops = exp.operators()._replace(a=exp.a.double(), L1=exp.monarch.L1.double(), L2=exp.monarch.L2.double())
    x = x.double()
    if dim == 0:
        y = nn.functional.linear(x, weight, bias)
        if wrapper.expansion is None:
            return y
        tuned = mix(y.index_select(-1, pos), ops, wrapper.b.double())
        return y.index_copy(-1, pos, tuned)
    tuned = mix_transposed(x.index_select(-1, pos), ops, wrapper.group)
    return nn.functional.linear(x.index_copy(-1, pos, tuned), weight, bias)


def wrapper_grads(wrapper, exp, forward, x: torch.Tensor, g: torch.Tensor) -> dict:
    """Output and gradients (x and every APEX parameter the wrapper has) of ``forward``
    (the wrapper, or a reference of it) on ``x`` against the output gradient ``g``."""
    x = x.detach().clone().requires_grad_()
    params = {"L1": exp.monarch.L1, "L2": exp.monarch.L2, "a": exp.a}
    for name in ("delta", "b"):
        if getattr(wrapper, name, None) is not None:
            params[name] = getattr(wrapper, name)
    for p in params.values():
        p.grad = None
    y = forward(x)
    (y * g.to(y.dtype)).sum().backward()
    out = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    out["x"], out["y"] = x.grad, y.detach()
    return out


def grads_and_reference(wrapper, exp, tokens: tuple) -> tuple:
    """``(got, want, d)``: the wrapper's outputs and gradients on random inputs, those of
    its float64 formula (:func:`wrapper_reference`), and the longest dot product involved,
    max(in, out, tokens), which fp32 rounding bounds scale with."""
    x = torch.randn(*tokens, wrapper.in_features)
    g = torch.randn(*tokens, wrapper.out_features)
    got = wrapper_grads(wrapper, exp, wrapper, x, g)
    want = wrapper_grads(wrapper, exp, lambda t: wrapper_reference(wrapper, exp, t), x, g)
    return got, want, max(wrapper.in_features, wrapper.out_features, x.numel() // x.shape[-1])


def assert_grads_within(got: dict, want: dict, relative: float) -> None:
    """Every output/gradient in ``got`` within ``relative`` of the largest magnitude of its
    counterpart in ``want``."""
    for name, value in want.items():
        error = (got[name].double() - value.double()).abs().max().item()
        bound = relative * value.abs().max().item()
        assert error <= bound, f"{name}: {error:.3g} > {bound:.3g}"


def assert_checkpointing_recomputes_exactly(wrapper, exp, tokens: tuple) -> None:
    """Under (non-reentrant) activation checkpointing the wrapper's forward runs again in
    backward: the same fp32 operations in the same order, so bit-identical gradients."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(*tokens, wrapper.in_features)
    g = torch.randn(*tokens, wrapper.out_features)
    plain = wrapper_grads(wrapper, exp, wrapper, x, g)
    checkpointed = wrapper_grads(wrapper, exp, lambda t: checkpoint(wrapper, t, use_reentrant=False), x, g)
    for name, value in plain.items():
        assert torch.equal(checkpointed[name], value), name


_BACKEND_IDS = itertools.count()


@pytest.fixture
def dynamo_graphs(monkeypatch) -> list:
    """The graphs dynamo compiles from here on (``compile: True``), counted by a backend
    that runs them as dynamo hands them over (inductor's code generation is not what the
    tests check and costs minutes on CPU): a recompile is a new graph."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    name = f"apex_test_count_graphs_{next(_BACKEND_IDS)}"
    torch._dynamo.reset()
    torch._dynamo.register_backend(compiler_fn=counting_backend, name=name)
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", name)
    return graphs
