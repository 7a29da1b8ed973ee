"""ActivationRanker: it finds scaled-up / scaled-down units, ignores masked tokens,
counts one record per micro-batch, detaches cleanly, and selects disjoint sets."""

import copy

import pytest
import torch
from torch import nn

from apex_tune import ActivationRanker, ApexSettings, apply_apex, get_selection, select_units, set_selection
from apex_tune.modules.model import bypass_unchanged_wrappers, find_apex_layers
from apex_tune.training.assessment import score_units

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ApexSettings(ratio=0.25, tuned_ratio_heads=0.75, tuned_ratio_channels=0.75, delta=True)


def _batches(vocab, n=4, batch=2, seq=16, seed=0, masked=True):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = torch.rand(batch, seq, generator=gen) > 0.3 if masked else None
        if mask is not None:
            mask[:, 0] = True
        out.append((tokens, mask))
    return out


def _run(model, ranker, batches):
    with torch.no_grad():
        for tokens, mask in batches:
            ranker.begin_microbatch(mask)
            model(tokens)


def _pick(gen, n, k, exclude=()):
    pool = torch.tensor([u for u in range(n) if u not in set(exclude)])
    return sorted(pool[torch.randperm(len(pool), generator=gen)[:k]].tolist())


def _gate_inputs(model, layer, batches):
    """The counted inputs of ``layer.mlp.w1``, one (tokens, dim) tensor per micro-batch."""
    seen = []
    handle = layer.mlp.w1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        for tokens, mask in batches:
            model(tokens)
            seen[-1] = seen[-1][mask] if mask is not None else seen[-1].flatten(0, -2)
    handle.remove()
    return seen


def _plant_channels(model, layer, batches, gen, k, up=20.0, down=1e-3):
    """Scale k w1 rows by ``up`` and k others by ``down``; returns (hi, lo).

    silu(up * z) is large where z > 0 but ~0 where z < 0, so each boosted row is
    first oriented (sign-flipped) to have its larger half positive, and boosted
    rows are drawn among channels where that half is large in every micro-batch
    (so x20 surely beats every untouched channel, micro-batch by micro-batch)."""
    w1 = layer.mlp.w1.weight
    zs = [x @ w1.T for x in _gate_inputs(model, layer, batches)]
    pos = torch.stack([z.clamp(min=0).norm(dim=0) for z in zs])  # (microbatches, channels)
    neg = torch.stack([(-z).clamp(min=0).norm(dim=0) for z in zs])
    sign = torch.where(pos.sum(0) >= neg.sum(0), 1.0, -1.0)
    oriented = torch.where(sign > 0, pos, neg)
    loudest = torch.stack([nn.functional.silu(z).norm(dim=0).max() for z in zs])  # per micro-batch
    eligible = [c for c in range(w1.shape[0]) if bool((up * oriented[:, c] > 2 * loudest).all())]
    assert len(eligible) >= k, "test setup: too few channels to boost"
    hi = sorted(torch.tensor(eligible)[torch.randperm(len(eligible), generator=gen)[:k]].tolist())
    lo = _pick(gen, w1.shape[0], k, exclude=hi)
    w1[hi] *= (up * sign[hi])[:, None]
    w1[lo] *= down
    return hi, lo


@pytest.mark.parametrize("kind", ["llama2_mha", "qwen2_bias", "llama3_gqa4"])
def test_select_finds_scaled_units(kind, make_tiny, vocab_size):
    VOCAB = vocab_size

    model = apply_apex(make_tiny(kind), SETTINGS)  # placeholder selection: still the base model
    batches = _batches(VOCAB, n=3, batch=4)
    gen = torch.Generator().manual_seed(42)
    planted = []
    with torch.no_grad():
        for layer in find_apex_layers(model):  # in order: later layers see the earlier changes
            attn = layer.attn
            hd, units = attn.head_dim, layer.num_head_units
            kh = SETTINGS.expanded_units(units, "heads")
            h_hi = _pick(gen, units, kh)
            h_lo = _pick(gen, units, kh, exclude=h_hi)
            # A head unit's attention output is linear in its V rows (bias included).
            for us, factor in ((h_hi, 20.0), (h_lo, 0.01)):
                for u in us:
                    attn.v_proj.weight[u * hd : (u + 1) * hd] *= factor
                    if attn.v_proj.bias is not None:
                        attn.v_proj.bias[u * hd : (u + 1) * hd] *= factor
            kc = SETTINGS.expanded_units(layer.num_channel_units, "channels")
            c_hi, c_lo = _plant_channels(model, layer, batches, gen, kc)
            planted.append((h_hi, h_lo, c_hi, c_lo))

    ranker = ActivationRanker(model, SETTINGS).attach()
    _run(model, ranker, batches)
    assert ranker.num_microbatches == 3
    selection = ranker.select()
    assert len(selection) == len(planted) == 2
    for pos, (sel, (h_hi, h_lo, c_hi, c_lo)) in enumerate(zip(selection, planted)):
        assert sel.heads.advantageous.tolist() == h_hi
        assert sel.heads.disadvantageous.tolist() == h_lo
        assert sel.channels.advantageous.tolist() == c_hi
        assert sel.channels.disadvantageous.tolist() == c_lo
        # Consistently top / bottom in every micro-batch.
        assert (ranker.relative["heads"][pos][h_hi] == 3).all()
        assert (ranker.relative["heads"][pos][h_lo] == -3).all()
        assert (ranker.relative["channels"][pos][c_hi] == 3).all()
        assert (ranker.relative["channels"][pos][c_lo] == -3).all()
    # The selection plugs straight into the wrapped model.
    set_selection(model, selection)
    assert get_selection(model)[0].heads.advantageous.tolist() == planted[0][0]


def test_head_score_is_read_before_output_proj(make_tiny, vocab_size):
    """Scaling output_proj columns of a unit changes nothing in that layer's head scores."""
    VOCAB = vocab_size

    model = apply_apex(make_tiny("llama2_mha"), SETTINGS)
    batches = _batches(VOCAB, n=2, seed=3)
    r1 = ActivationRanker(model, SETTINGS).attach()
    _run(model, r1, batches)
    r1.detach()
    hd = model.layers[0].attn.head_dim
    with torch.no_grad():
        model.layers[0].attn.output_proj.weight[:, 0 : 2 * hd] *= 50.0
    r2 = ActivationRanker(model, SETTINGS).attach()
    _run(model, r2, batches)
    assert torch.equal(r1.relative["heads"][0], r2.relative["heads"][0])
    assert torch.allclose(r1.activation["heads"][0], r2.activation["heads"][0], rtol=1e-6)
    # ...but the next layer does see it (the hook is live, not a stale copy).
    assert not torch.allclose(r1.activation["heads"][1], r2.activation["heads"][1], rtol=1e-3)


def _manual_norms(model, tokens, mask):
    """Per-layer unit norms from plain hooks of our own, over tokens where mask is true."""
    layers = find_apex_layers(model)
    got = {"heads": [], "channels": []}
    handles = []
    for layer in layers:
        def pre(module, args, layer=layer):
            h = args[0][mask]  # (tokens, heads*hd): unit u = q heads of KV group u, contiguous
            got["heads"].append(h.double().view(h.shape[0], layer.num_head_units, -1).norm(dim=(0, 2)))

        def post(module, args, out, layer=layer):
            g = nn.functional.silu(out[mask]).double()
            got["channels"].append(g.norm(dim=0))

        handles.append(layer.attn.output_proj.register_forward_pre_hook(pre))
        handles.append(layer.mlp.w1.register_forward_hook(post))
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    return got


@pytest.mark.parametrize("kind", ["llama3_gqa", "qwen2_bias"])
def test_masked_tokens_do_not_count(kind, make_tiny, vocab_size):
    VOCAB = vocab_size

    model = make_tiny(kind)
    apply_apex(model, SETTINGS)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=gen)
    mask = torch.rand(2, 16, generator=gen) > 0.5
    mask[:, 0] = True

    # 1) Against a hand-computed reference on an arbitrary (holey) mask.
    ranker = ActivationRanker(model, SETTINGS).attach()
    ranker.begin_microbatch(mask)
    with torch.no_grad():
        model(tokens)
    ref = _manual_norms(model, tokens, mask)
    for kind_name in ("heads", "channels"):
        for pos in range(2):
            assert torch.allclose(ranker.activation[kind_name][pos].cpu(), ref[kind_name][pos], rtol=1e-5)
    ranker.detach()

    # 2) Masking trailing positions (padding) == not having them at all, since
    #    attention is causal. The tail holds a token id used nowhere else.
    lengths = [9, 5, 12]
    gen = torch.Generator().manual_seed(6)
    full = [torch.randint(0, VOCAB - 1, (2, 16), generator=gen) for _ in lengths]
    for t, n in zip(full, lengths):
        t[:, n:] = VOCAB - 1

    def score(cut: bool, use_mask: bool) -> ActivationRanker:
        ranker = ActivationRanker(model, SETTINGS).attach()
        with torch.no_grad():
            for t, n in zip(full, lengths):
                mask = torch.zeros(2, 16, dtype=torch.bool)
                mask[:, :n] = True
                ranker.begin_microbatch(mask if use_mask else None)
                model(t[:, :n] if cut else t)
        ranker.detach()
        return ranker

    masked, prefix, unmasked = score(False, True), score(True, False), score(False, False)
    for kind_name in ("heads", "channels"):
        for pos in range(2):
            assert torch.equal(masked.relative[kind_name][pos], prefix.relative[kind_name][pos])
            assert torch.allclose(masked.activation[kind_name][pos], prefix.activation[kind_name][pos], rtol=1e-5)
            # Control: counting the tail would have changed the scores.
            assert not torch.allclose(masked.activation[kind_name][pos], unmasked.activation[kind_name][pos], rtol=1e-2)


def test_records_once_per_microbatch(make_tiny, vocab_size):
    VOCAB = vocab_size

    model = apply_apex(make_tiny("llama2_mha"), SETTINGS)
    (tokens, mask), = _batches(VOCAB, n=1, seed=8)
    once = ActivationRanker(model, SETTINGS).attach()
    once.begin_microbatch(mask)
    with torch.no_grad():
        model(tokens)
    once.detach()

    twice = ActivationRanker(model, SETTINGS).attach()
    twice.begin_microbatch(mask)
    with torch.no_grad():
        model(tokens)
        model(tokens)  # what activation checkpointing's recompute looks like to the hooks
    assert twice.num_microbatches == 1
    for kind in ("heads", "channels"):
        for pos in range(2):
            assert torch.equal(twice.relative[kind][pos], once.relative[kind][pos])
            assert torch.equal(twice.activation[kind][pos], once.activation[kind][pos])
            k = SETTINGS.expanded_units(len(once.relative[kind][pos]), kind)
            assert (once.relative[kind][pos] == 1).sum() == k and (once.relative[kind][pos] == -1).sum() == k

    # The next micro-batch is recorded again.
    twice.begin_microbatch(mask)
    with torch.no_grad():
        model(tokens)
    assert torch.allclose(twice.activation["heads"][0], 2 * once.activation["heads"][0])


def test_real_activation_checkpointing_counts_once(make_tiny, vocab_size):
    VOCAB = vocab_size
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.training import set_activation_checkpointing

    from apex_tune import set_apex_trainable

    base = apply_apex(make_tiny("llama2_mha"), SETTINGS)
    (tokens, mask), = _batches(VOCAB, n=1, seed=9)
    ref = ActivationRanker(base, SETTINGS).attach()
    ref.begin_microbatch(mask)
    with torch.no_grad():
        base(tokens)

    model = copy.deepcopy(base)
    set_apex_trainable(model, SETTINGS)
    set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    model.train()
    ranker = ActivationRanker(model, SETTINGS).attach()
    calls = []
    model.layers[0].mlp.w1.register_forward_hook(lambda *a: calls.append(1))
    ranker.begin_microbatch(mask)
    model(tokens).logsumexp(-1).mean().backward()
    assert len(calls) == 2, "expected a recomputed forward under activation checkpointing"
    for kind in ("heads", "channels"):
        for pos in range(2):
            assert torch.equal(ranker.relative[kind][pos], ref.relative[kind][pos])
            assert torch.allclose(ranker.activation[kind][pos], ref.activation[kind][pos], rtol=1e-5)


def _hook_count(model):
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks)
        total += len(getattr(m, "_forward_hooks_with_kwargs", {})) + len(getattr(m, "_forward_pre_hooks_with_kwargs", {}))
    return total


def test_detach_removes_all_hooks(make_tiny, vocab_size):
    VOCAB = vocab_size

    model = apply_apex(make_tiny("llama3_gqa"), SETTINGS)
    assert _hook_count(model) == 0
    ranker = ActivationRanker(model, SETTINGS).attach()
    assert ranker.attached
    hooks = 2 * len(model.layers) + 1  # two per layer, and where a scoring-only forward stops
    assert _hook_count(model) == hooks
    ranker.attach()  # idempotent
    assert _hook_count(model) == hooks
    _run(model, ranker, _batches(VOCAB, n=1))
    ranker.detach()
    assert not ranker.attached
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, m
    before = [t.clone() for t in ranker.activation["heads"]]
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(before, ranker.activation["heads"]))


@pytest.mark.parametrize(
    "settings, kind",
    [
        (ApexSettings(ratio=0.25, tuned_ratio_heads=0.75, tuned_ratio_channels=0.75, delta=True), "llama2_mha"),
        (ApexSettings(ratio=0.1875, tuned_ratio_heads=0.5625, tuned_ratio_channels=0.465, delta=True), "llama2_mha"),
        (ApexSettings(ratio=0.25, tuned_ratio_heads=0.75, tuned_ratio_channels=0.5, delta=True), "qwen2_bias"),
        (ApexSettings(ratio=0.5, delta=False), "llama3_gqa"),
    ],
)
def test_selection_sizes_and_disjoint(settings, kind, make_tiny, vocab_size):
    VOCAB = vocab_size

    model = make_tiny(kind)
    apply_apex(model, settings)
    ranker = ActivationRanker(model, settings).attach()
    _run(model, ranker, _batches(VOCAB, n=2, seed=4))
    selection = ranker.select()
    for layer, sel in zip(find_apex_layers(model), selection):
        for kind_name in ("heads", "channels"):
            n = layer.num_units(kind_name)
            k = settings.expanded_units(n, kind_name)
            e = settings.extra_units(n, kind_name)
            s = getattr(sel, kind_name)
            P, N, E = (set(t.tolist()) for t in (s.advantageous, s.disadvantageous, s.extra))
            assert len(P) == len(N) == k and len(E) == e
            assert len(s.advantageous) == k and len(s.extra) == e
            assert not (P & N) and not (P & E) and not (N & E)
            assert all(0 <= u < n for u in P | N | E)
            rel = ranker.relative[kind_name][layer.index]
            assert min(rel[list(P)]) >= max(rel[list(N | E)])  # P on top, N and E below
    set_selection(model, selection)  # sizes match what apply_apex built
    # Overriding the ratios at select() time gives the matching sizes too.
    other = ranker.select(ratio=0.5, tuned_ratio_heads=1.0, tuned_ratio_channels=1.0)
    assert len(other[0].channels.advantageous) == 48


def test_select_units_tiebreak_and_errors():
    rel = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])
    act = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0])
    s = select_units(rel, 1, 2, tiebreak=act)
    assert s.advantageous.tolist() == [0] and s.disadvantageous.tolist() == [1] and s.extra.tolist() == [2, 3]
    # The integer relative score dominates the activation tiebreak.
    s = select_units(torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0]), 1, 0, tiebreak=torch.tensor([0.0, 9.0, 1.0, 2.0, 3.0]))
    assert s.advantageous.tolist() == [0] and s.disadvantageous.tolist() == [1]
    with pytest.raises(ValueError):
        select_units(rel, 2, 2)


def test_select_without_microbatches_and_reset(make_tiny, vocab_size):
    VOCAB = vocab_size

    model = apply_apex(make_tiny("llama2_mha"), SETTINGS)
    ranker = ActivationRanker(model, SETTINGS)
    with pytest.raises(RuntimeError):
        ranker.select()
    ranker.attach()
    _run(model, ranker, _batches(VOCAB, n=1))
    assert any(t.abs().sum() > 0 for t in ranker.relative["channels"])
    ranker.reset()
    assert ranker.num_microbatches == 0
    assert all(t.abs().sum() == 0 for t in ranker.relative["channels"] + ranker.activation["heads"])


def test_compiled_layers_with_hooks_do_not_recompile(make_tiny, vocab_size, dynamo_graphs):
    """``compile: True`` with the ranker attached: the layers compile once, not per
    micro-batch, and the scores are those of the eager model.

    The recipe's own ``training.compile_model`` is used, with a registered backend that
    counts the graphs dynamo hands it and runs them as they are (inductor's code
    generation is not what is tested here and costs minutes on CPU). A recompile is a
    new graph, so the count must not grow after the first training step."""
    from torchtune import training

    graphs = dynamo_graphs
    compiled = apply_apex(make_tiny("llama3_gqa4"), SETTINGS)
    compiled.train()
    eager = copy.deepcopy(compiled)
    rankers = [ActivationRanker(m, SETTINGS).attach() for m in (compiled, eager)]
    training.compile_model(compiled, verbose=False)
    counts = []
    try:
        # the assessment first, as in the recipe: its forwards stop inside the compiled layers
        for model, ranker in zip((compiled, eager), rankers):
            score_units(model, ranker, [({"tokens": t}, m) for t, m in _batches(vocab_size, n=2, seed=6)])
        for tokens, mask in _batches(vocab_size, n=4, batch=2, seed=5):
            for model, ranker in zip((compiled, eager), rankers):
                ranker.begin_microbatch(mask)
                model(tokens).square().mean().backward()
            counts.append(len(graphs))
    finally:
        torch._dynamo.reset()
    assert counts[0] > 0, "nothing was compiled: the test does not exercise torch.compile"
    assert counts == [counts[0]] * 4, f"graphs compiled after each step: {counts}"
    for kind in ("heads", "channels"):
        for got, want in zip(rankers[0].relative[kind], rankers[1].relative[kind]):
            assert torch.equal(got, want)
        for got, want in zip(rankers[0].activation[kind], rankers[1].activation[kind]):
            # the same fp32 ops, possibly regrouped by dynamo: a few fp32 ulps (1.2e-7) per
            # reduction, with a 10x margin
            assert torch.allclose(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_unit_norms_match_the_fp64_formula(dtype, masked, make_tiny):
    """The hooks' norms: sqrt of the sum over counted tokens of each unit's squares,
    computed here in fp64 from the same (fp32 or bf16) activation values."""
    batch, seq, units, width = 2, 48, 6, 16
    gen = torch.Generator().manual_seed(11)
    h = (torch.randn(batch, seq, units * width, generator=gen) * 3).to(dtype)
    mask = torch.rand(batch, seq, generator=gen) > 0.4 if masked else None
    ranker = ActivationRanker(apply_apex(make_tiny("llama3_gqa"), SETTINGS), SETTINGS)  # only its arithmetic is used
    ranker.begin_microbatch(mask)
    got = ranker._unit_norms(h, units)
    counted = h.double().flatten(0, 1)[mask.flatten()] if masked else h.double().flatten(0, 1)
    want = counted.square().sum(0).view(units, width).sum(-1).sqrt()
    assert got.dtype == torch.float32
    # A bf16 value converts to fp32 exactly, so both dtypes carry only fp32 rounding: the
    # squares (u = 2^-24 each) summed over T tokens and then the unit's width, all terms
    # positive, so the relative error of the sum is at most (T + width + 1) u, and sqrt
    # halves it; bounded here by (T + width + 2) u, a 2x margin. Not the bf16 eps (2^-7):
    # converting before squaring is what keeps the old fp32 formula's precision.
    tokens = batch * seq
    torch.testing.assert_close(got.double(), want, rtol=(tokens + width + 2) * 2.0**-24, atol=0)


@pytest.mark.parametrize("settings", [SETTINGS, ApexSettings(ratio_heads=0.25, ratio_channels=0)], ids=["both", "heads"])
def test_assessment_stops_after_the_last_hook(settings, make_tiny, vocab_size):
    """score_units records what a whole forward records, while what follows the last hooked
    layer (the final norm and the output head) sees no positions; it leaves the model's
    mode, hooks and later forwards as they were. (The whole forward runs with the fresh
    wrappers bypassed too, as score_units runs them, so that only the stop differs.)"""
    model = apply_apex(make_tiny("llama3_gqa"), settings)
    model.train()
    batches = _batches(vocab_size, n=3, seed=9)
    whole = ActivationRanker(model, settings).attach()
    with bypass_unchanged_wrappers(model):
        _run(model, whole, batches)
    whole.detach()
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    ranker = ActivationRanker(model, settings)
    positions = []
    probe = model.output.register_forward_pre_hook(lambda module, args: positions.append(args[0].shape[1]))
    score_units(model, ranker, [({"tokens": t}, m) for t, m in batches])
    assert positions == [0] * len(batches), "the output head ran on the whole sequence"
    probe.remove()
    for kind in settings.kinds:
        for got, want in zip(ranker.relative[kind], whole.relative[kind]):
            assert torch.equal(got, want)
        for got, want in zip(ranker.activation[kind], whole.activation[kind]):
            assert torch.equal(got, want)
    assert model.training and ranker.attached
    ranker.detach()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    # an error inside the pass (here a bad input) leaves the mode as it was, and the
    # forwards after it run to the end with the ranker recording
    with pytest.raises(TypeError):
        score_units(model, ranker, [({"not_tokens": batches[0][0]}, None)])
    assert model.training
    kind = settings.kinds[0]
    recorded = ranker.activation[kind][-1].clone()
    ranker.begin_microbatch(None)
    with torch.no_grad():
        logits = model(batches[0][0])
    assert logits.shape == (*batches[0][0].shape, vocab_size)
    assert not torch.equal(ranker.activation[kind][-1], recorded)
