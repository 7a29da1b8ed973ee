"""QAPEX: APEX over an NF4 base (apex.quantize_base) and its deferred fusion.

The per-stage fused-vs-wrapped differences are printed (``pytest -s``) and
bounded; the design they are measured against, re-quantizing the folded
weights at every stage boundary, is run alongside to show what it would pile up.
"""

import copy
import json
import socket

import pytest
import torch
import torch.distributed as dist
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune.models.llama3 import llama3
from torchtune.models.qwen2 import qwen2

from apex_tune import (
    ApexSettings,
    apply_apex,
    unwrap_apex,
    get_selection,
    fold_apex_,
    reset_apex_parameters,
    set_apex_trainable,
    set_selection,
    trainable_parameter_report,
)
from apex_tune.training.checkpointing import unwrapped_state_dict
from apex_tune.training.memory_options import check_memory_options
from apex_tune.modules.expansion import _ApexLinear, unit_positions
from apex_tune.modules.model import bypass_unchanged_wrappers, param_kind
from apex_tune.modules.nf4 import (
    NF4_BLOCK_SIZE,
    NF4_SCALER_BLOCK_SIZE,
    ensure_history_,
    is_quantized,
    resume_state_dict,
    to_nf4,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97
# NF4 needs every projection to hold a multiple of 64 * 256 elements.
GEOMETRY = dict(vocab_size=VOCAB, num_layers=2, num_heads=8, embed_dim=256, intermediate_dim=512, max_seq_len=64)
# fp32 rounding of the wrapped forward against the fp32 fold, at any number of stages.
FUSION_TOLERANCE = 1e-5
# Two bf16 computations of the same function (the wrapped model and its fold, stored in
# bf16): each op's output is rounded to bf16 (unit roundoff u = 2^-9; matmuls accumulate
# in fp32). Along the path of one logit this 2-layer decoder rounds about 14 times per
# layer (norm, q/k/v, RoPE, attention, output_proj, residual, norm, w1, w3, SiLU*mul,
# w2, residual) plus embedding, final norm and head: n = 31, so each model is within
# n*u = 0.061 (worst-case linear growth) of the exact function and the two within
# 2*n*u = 0.12 of each other. Typical errors grow like sqrt(n) (~0.02 measured).
BF16_FORWARD_TOLERANCE = 2 * 31 * 2.0**-9


def build(kind: str = "llama3", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = llama3(num_kv_heads=2, **GEOMETRY) if kind == "llama3" else qwen2(num_kv_heads=4, **GEOMETRY)
    return model.eval()


def settings(delta: bool = False, quantize: bool = True) -> ApexSettings:
    extra = dict(tuned_ratio_heads=0.5, tuned_ratio_channels=0.75) if delta else {}
    return ApexSettings(ratio=0.25, delta=delta, quantize_base=quantize, **extra)


@torch.no_grad()
def train_like(model: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Move every live APEX parameter off its init, as training would (frozen stages untouched)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param_kind(name) not in ("operators", "vectors", "deltas"):
            continue
        noise = torch.randn(param.shape, generator=gen)
        leaf = name.rsplit(".", 1)[-1]
        param.copy_(noise * scale if leaf in ("L1", "L2") else 1 + noise * scale if leaf in ("a", "b") else noise * scale * 0.1)


def dequantized_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model whose weights are the NF4 model's, dequantized."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, NF4Tensor):
            module.weight = torch.nn.Parameter(weight.get_original_weight(), requires_grad=False)
    return plain


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def selection_for(model, stage: int):
    from apex_tune.modules.model import random_selection

    return random_selection(model, torch.Generator().manual_seed(100 + stage))


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))


# ----------------------------------------------------------------- structure
@pytest.mark.parametrize("delta", [False, True])
def test_quantize_base_stores_nf4_and_trains_only_apex(delta):
    model = apply_apex(build(), settings(delta))
    set_apex_trainable(model, settings(delta))
    layer = model.layers[0]
    projections = [layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.attn.output_proj,
                   layer.mlp.w1, layer.mlp.w3, layer.mlp.w2]
    assert all(isinstance(p.weight, NF4Tensor) and not p.weight.requires_grad for p in projections)
    # The wrappers are built over the NF4 weight, knowing where finished stages go (no class
    # swap): with the delta one merged correction each, without it the owner's frozen stages.
    for wrapper, owner in ((layer.attn.v_proj, layer.attn), (layer.mlp.w2, layer.mlp)):
        if delta:
            assert wrapper.apex_history.empty and not hasattr(owner, "apex_history")
        else:
            assert wrapper.apex_history is None and wrapper._history[0] is owner.apex_history
    assert not isinstance(model.tok_embeddings.weight, NF4Tensor) and not isinstance(model.output.weight, NF4Tensor)
    assert is_quantized(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(param_kind(n) in ("operators", "vectors", "deltas") for n in trainable)


def test_quantize_base_refuses_sizes_nf4_cannot_hold():
    small = llama3(vocab_size=VOCAB, num_layers=1, num_heads=8, num_kv_heads=2, embed_dim=64, intermediate_dim=176,
                   max_seq_len=64)
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.q_proj.*64 \* 256"):
        apply_apex(small, settings())


def test_meta_device_build_and_report():
    with torch.device("meta"):
        model = build()
    apply_apex(model, settings())
    set_apex_trainable(model, settings())
    report = trainable_parameter_report(model)
    assert report["by_kind"]["base"]["trainable"] == 0 and report["trainable_params"] > 0
    assert isinstance(model.layers[0].mlp.w2.weight, NF4Tensor) and model.layers[0].mlp.w2.weight.is_meta


# ------------------------------------------------------------------- function
@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
@pytest.mark.parametrize("delta", [False, True])
def test_wrapped_nf4_model_at_init_equals_nf4_base(kind, delta, tokens):
    """M = 0, a = b = 1, delta = 0: the wrapped model is the (dequantized) NF4 base."""
    model = apply_apex(build(kind), settings(delta))
    set_selection(model, selection_for(model, 0))
    reset_apex_parameters(model)
    plain = dequantized_copy(unwrap_apex(copy.deepcopy(model)))
    with torch.no_grad():
        got, expected = model(tokens), plain(tokens)
    assert rel(got, expected) <= 1e-6
    # and the NF4 base is the full-precision base up to 4-bit quantization error, no more
    with torch.no_grad():
        assert 0 < rel(expected, build(kind)(tokens)) < 0.5


@pytest.mark.parametrize("delta", [False, True])
def test_fresh_wrappers_bypassed_until_a_stage_is_kept(delta, tokens):
    """The assessment's bypass over an NF4 base: fresh wrappers run as the NF4 linear (the
    dequantized base); once a stage is folded, kept beside the base as a merged correction
    or as frozen operators, no wrapper carrying it is bypassed."""
    model = apply_apex(build(), settings(delta))
    plain = dequantized_copy(unwrap_apex(copy.deepcopy(model)))
    wrappers = [m for m in model.modules() if isinstance(m, _ApexLinear)]
    with torch.no_grad(), bypass_unchanged_wrappers(model) as count:
        assert count == len(wrappers)
        assert rel(model(tokens), plain(tokens)) <= 1e-6
    set_selection(model, selection_for(model, 0))
    fold_apex_(model)  # a stage of operators at their init: kept all the same
    with bypass_unchanged_wrappers(model) as count:
        assert count == 0


@pytest.mark.parametrize("kind, delta", [("llama3", False), ("llama3", True), ("qwen2", True)])
def test_qapex_equals_apex_on_the_dequantized_base(kind, delta, tokens):
    """Stage by stage (wrapped, merged, and the final fold), QAPEX computes what plain
    APEX computes on the dequantized base with the same operators; gradients too.
    (qwen2: q/k/v biases, GQA groups of 2.)"""
    quantized = apply_apex(build(kind), settings(delta))
    reference = dequantized_copy(build(kind))
    reference.load_state_dict(
        {k: (v.get_original_weight() if isinstance(v, NF4Tensor) else v) for k, v in quantized.state_dict().items()
         if k in reference.state_dict()}
    )
    apply_apex(reference, settings(delta, quantize=False))
    for stage in range(3):
        selection = selection_for(quantized, stage)
        for model in (quantized, reference):
            set_selection(model, selection)
            reset_apex_parameters(model, seed=stage)
            train_like(model, seed=stage)
        assert rel(quantized(tokens).detach(), reference(tokens).detach()) <= 1e-5
        # the row wrappers act on inputs over NF4: same gradients as the weight-column form
        for model in (quantized, reference):
            set_apex_trainable(model, settings(delta))
            model.zero_grad()
            model(tokens).square().mean().backward()
        grads_q = {n: p.grad for n, p in quantized.named_parameters() if p.grad is not None}
        grads_r = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        assert grads_q.keys() == grads_r.keys() and grads_q
        for name in grads_q:
            assert rel(grads_q[name], grads_r[name]) <= 1e-4, name
        fold_apex_(quantized, seed=stage)
        fold_apex_(reference, seed=stage)
    if delta:  # one merged correction over the channels any of the 3 stages tuned
        tuned = torch.cat([selection_for(quantized, stage)[0].channels.ordered() for stage in range(3)])
        assert torch.equal(quantized.layers[0].mlp.w2.apex_history.positions, torch.unique(tuned))
    else:
        assert len(quantized.layers[0].mlp.apex_history) == 3
    with torch.no_grad():
        fused_q, fused_r = unwrap_apex(copy.deepcopy(quantized)), unwrap_apex(copy.deepcopy(reference))
    for key, value in fused_r.state_dict().items():
        assert torch.allclose(fused_q.state_dict()[key], value, rtol=0, atol=1e-6), key


@pytest.mark.parametrize("delta", [False, True], ids=["frozen_stages", "merged_correction"])
def test_fusion_error_per_stage_is_bounded_and_does_not_pile_up(delta, tokens, capsys):
    """Per stage: the wrapped model against the model fused from it, on a probe batch.

    Deferred fusion (what QAPEX does: frozen operator stages without the delta, one
    merged correction with it) stays at fp32 rounding after every stage;
    re-quantizing the folded weights at each boundary (the design it avoids) is
    run alongside with the same operators: its per-stage error is 4-bit sized,
    and its drift from the exact fold grows stage after stage.
    """
    s = settings(delta)
    deferred = apply_apex(build(), s)
    requantizing = apply_apex(build(), s)
    ours, theirs, drift = [], [], []
    for stage in range(3):
        selection = selection_for(deferred, stage)
        for model in (deferred, requantizing):
            set_selection(model, selection)
            reset_apex_parameters(model, seed=stage)
            train_like(model, seed=stage)
        with torch.no_grad():
            wrapped, wrapped_requantizing = deferred(tokens), requantizing(tokens)
            exact = unwrap_apex(copy.deepcopy(deferred))(tokens)
            requantizing = apply_apex(unwrap_apex(requantizing), s)  # dequantize, fold, quantize again
            folded_requantized = requantizing(tokens)
        fold_apex_(deferred, seed=stage)
        with torch.no_grad():
            assert rel(deferred(tokens), wrapped) <= FUSION_TOLERANCE  # the live model after the boundary
        ours.append(rel(exact, wrapped))
        theirs.append(rel(folded_requantized, wrapped_requantizing))
        drift.append(rel(folded_requantized, exact))
    with capsys.disabled():
        print(f"\nfused-vs-wrapped, relative max |logit difference| on the probe batch, per stage (delta={delta}):")
        for t in range(3):
            print(f"  stage {t + 1}: deferred (QAPEX) {ours[t]:.2e} | re-quantizing each stage {theirs[t]:.2e}"
                  f" (drift from the exact fold {drift[t]:.2e})")
    assert all(e <= FUSION_TOLERANCE for e in ours)  # the same bound after 3 stages as after 1
    assert min(theirs) > 1e3 * max(ours)
    assert drift[2] > drift[0]  # what deferred fusion avoids: error piling up across stages


# ----------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_state_unwraps_to_a_plain_model(dtype, tokens):
    """A wrapped QAPEX state dict (dequantized weights, frozen stages) rebuilt on the meta
    device fuses to the plain model: same keys, shapes and dtype as the base, loadable
    into the plain architecture, and it computes the wrapped model."""
    s = settings(delta=True)
    base = build().to(dtype)
    model = apply_apex(copy.deepcopy(base), s)
    for stage in range(2):
        set_selection(model, selection_for(model, stage))
        reset_apex_parameters(model, seed=stage)
        train_like(model, seed=stage)
        if stage == 0:
            fold_apex_(model, seed=stage)
    wrapped_sd = {k: (v.get_original_weight() if isinstance(v, NF4Tensor) else v) for k, v in model.state_dict().items()}
    assert any(".apex_history." in k for k in wrapped_sd)  # the finished stage (merged: with the delta)

    def build_plain():
        return llama3(num_kv_heads=2, **GEOMETRY).to(dtype)

    plain_sd, difference = unwrapped_state_dict(build_plain, s, wrapped_sd, get_selection(model), tokens)
    tolerance = FUSION_TOLERANCE if dtype == torch.float32 else BF16_FORWARD_TOLERANCE
    assert difference <= tolerance
    assert plain_sd.keys() == base.state_dict().keys()
    assert all(type(v) is torch.Tensor and v.dtype == dtype and v.shape == base.state_dict()[k].shape
               for k, v in plain_sd.items())
    plain = build_plain()
    plain.load_state_dict(plain_sd, strict=True)
    with torch.no_grad():
        assert rel(plain.eval()(tokens).float(), model(tokens).float()) <= tolerance
        # The bound is far below what the stages change, so it would catch a wrong fold.
        assert rel(base(tokens).float(), model(tokens).float()) > 10 * tolerance


def test_resume_state_rebuilds_the_same_nf4_codes_and_stages():
    """Re-quantizing a dequantized NF4 weight does not give back its codes, so a resume
    takes the base weights from the base checkpoint: bit-identical NF4."""
    s = settings()
    base = build()
    model = apply_apex(copy.deepcopy(base), s)
    set_selection(model, selection_for(model, 0))
    train_like(model, seed=0)
    fold_apex_(model, seed=0)
    saved = {k: (v.get_original_weight() if isinstance(v, NF4Tensor) else v.clone()) for k, v in model.state_dict().items()}

    restored = resume_state_dict(saved, base.state_dict())
    rebuilt = apply_apex(build(seed=1), s)
    ensure_history_(rebuilt, restored)
    assert len(rebuilt.layers[1].attn.apex_history) == 1
    assert set(rebuilt.state_dict()) == set(saved)
    assert all(torch.equal(restored[k], saved[k]) for k in saved if param_kind(k) != "base")

    original = model.layers[0].mlp.w2.weight
    from_base = to_nf4(restored["layers.0.mlp.w2.weight"], NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)
    assert torch.equal(from_base.quantized_data, original.quantized_data)
    assert torch.equal(from_base.quantized_scalers, original.quantized_scalers)
    requantized = to_nf4(saved["layers.0.mlp.w2.weight"], NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)
    assert not torch.equal(requantized.get_original_weight(), original.get_original_weight())


# -------------------------------------------------------------- memory options
def _cfg(optimizer=None, enable_activation_offloading=False, enable_activation_checkpointing=False):
    """check_memory_options' arguments from the config fields they come from."""
    return dict(
        optimizer=(optimizer or {"_component_": "torch.optim.AdamW"})["_component_"],
        activation_offloading=enable_activation_offloading,
        activation_checkpointing=enable_activation_checkpointing,
    )


def test_memory_options_refuse_clearly_on_cpu():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="enable_activation_offloading=True needs a CUDA GPU"):
        check_memory_options(cpu, **_cfg(enable_activation_offloading=True, enable_activation_checkpointing=True))
    with pytest.raises(ValueError, match="CPUOffloadOptimizer needs a CUDA GPU"):
        check_memory_options(cpu, **_cfg(optimizer={"_component_": "torchao.optim.CPUOffloadOptimizer"}))
    with pytest.raises(ValueError, match="bitsandbytes.optim.PagedAdamW8bit needs a CUDA GPU"):
        check_memory_options(cpu, **_cfg(optimizer={"_component_": "bitsandbytes.optim.PagedAdamW8bit"}))
    with pytest.raises(ValueError, match="needs enable_activation_checkpointing=True"):
        check_memory_options(torch.device("cuda"), **_cfg(enable_activation_offloading=True))
    for ok in ("torchao.optim.AdamW8bit", "torchao.optim.AdamW4bit", "torch.optim.AdamW"):
        check_memory_options(cpu, **_cfg(optimizer={"_component_": ok}, enable_activation_checkpointing=True))
    check_memory_options(torch.device("cuda"),
                         **_cfg(enable_activation_offloading=True, enable_activation_checkpointing=True))


@pytest.fixture
def process_group():
    """A gloo group of one, as the recipe runs on CPU (FSDP2, DCP state dicts)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded_qapex(state: dict, s: ApexSettings, base_sd: dict):
    """The recipe's _setup_model in short: meta build, wrap, shard (NF4 outside FSDP), load."""
    from torchtune import modules, training

    from apex_tune import init_apex_
    from apex_tune.modules.nf4 import load_from_full_model_state_dict, shard_model

    with torch.device("meta"):
        model = build()
    apply_apex(model, s)
    set_apex_trainable(model, s)
    mesh = dist.device_mesh.init_device_mesh("cpu", (1,))
    shard_model(model, [lambda n, m: isinstance(m, modules.TransformerSelfAttentionLayer)],
                cpu_offload=False, dp_mesh=mesh)
    with torch.device("cpu"):
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    full = dict(state)
    ensure_history_(model, full)
    for name, value in model.state_dict().items():
        full.setdefault(name, torch.zeros(value.shape, dtype=value.dtype))
    load_from_full_model_state_dict(model, full, torch.device("cpu"), strict=True)
    if state is base_sd:
        init_apex_(model, torch.device("cpu"))
    else:
        from apex_tune.modules.model import materialize_apex_buffers_

        materialize_apex_buffers_(model, torch.device("cpu"))
    training.validate_no_params_on_meta_device(model)
    return model


@pytest.mark.slow
def test_fsdp_low_bit_optimizer_and_exact_resume(process_group, tokens):
    """FSDP2 with the NF4 base outside it, torchao's AdamW8bit, a frozen stage, then a
    resume from the recipe's sharded state (local shards, low-bit states by their parts):
    the resumed run continues bit for bit."""
    import safetensors.torch
    import torchao.optim

    from apex_tune.training.checkpointing import (
        load_local_model_state,
        load_local_optimizer_state,
        local_model_state,
        local_optimizer_state,
    )
    from apex_tune.modules.nf4 import HISTORY

    s = settings(delta=True)  # deltas are large enough for 8-bit states (>= 4096 elements)
    base_sd = build().state_dict()

    def loss_of(model):
        return model(tokens).float().logsumexp(-1).mean()

    model = _sharded_qapex(base_sd, s, base_sd)
    set_selection(model, selection_for(model, 0))
    optimizer = torchao.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss_of(model).backward()
        optimizer.step()
        optimizer.zero_grad()
    fold_apex_(model, seed=1)
    set_selection(model, selection_for(model, 1))
    optimizer.state.clear()
    loss_of(model).backward()
    optimizer.step()
    optimizer.zero_grad()
    states = [getattr(v, "_local_tensor", v) for st in optimizer.state.values() for v in st.values()]
    assert any(type(v).__name__ == "OptimState8bit" for v in states)

    # through bytes, as the recipe's state files (safetensors + JSON): nothing shared with the live run
    tensors = local_model_state(model)
    meta = json.dumps(local_optimizer_state(optimizer, tensors))
    tensors = safetensors.torch.load(safetensors.torch.save(tensors))
    selection = get_selection(model)
    history = {k[len("model."):]: v for k, v in tensors.items() if HISTORY in k}
    assert history, "the frozen stage is part of the state"
    resumed = _sharded_qapex({**base_sd, **history}, s, base_sd)
    load_local_model_state(resumed, tensors, "test state")
    set_selection(resumed, selection)
    resumed_optimizer = torchao.optim.AdamW8bit([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    load_local_optimizer_state(resumed_optimizer, json.loads(meta), tensors, "test state")
    for m, opt in ((model, optimizer), (resumed, resumed_optimizer)):
        loss_of(m).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert torch.equal(model(tokens), resumed(tokens))


def test_frozen_stage_positions_follow_their_units():
    """Each frozen stage keeps its tuned positions per wrapper (derived once, not per
    forward); loading a state into empty stages (resume) derives them again."""
    s = settings()
    model = apply_apex(build(), s)
    for stage_seed in (0, 1):
        set_selection(model, selection_for(model, stage_seed))
        train_like(model, seed=stage_seed)
        fold_apex_(model, seed=stage_seed)
    history = {k: v.clone() for k, v in model.state_dict().items() if param_kind(k) == "history"}
    rebuilt = apply_apex(build(seed=1), s)
    ensure_history_(rebuilt, history)
    rebuilt.load_state_dict(history, strict=False)
    for built in (model, rebuilt):
        for owner in (built.layers[0].attn, built.layers[1].mlp):
            assert len(owner.apex_history) == 2
            for stage in owner.apex_history:
                for part in stage.parts.values():
                    assert torch.equal(part.positions, unit_positions(stage.units, part.group, part.width))
    for name in ("attn.output_proj", "mlp.w2", "mlp.w1"):
        got = rebuilt.layers[0].get_submodule(name).frozen_stages()
        want = model.layers[0].get_submodule(name).frozen_stages()
        assert [torch.equal(g.positions, w.positions) for g, w in zip(got, want)] == [True, True]
