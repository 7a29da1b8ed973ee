"""What APEX costs next to the methods it competes with, at real shapes, in one run.

    python -m bench.cost            # quick: about 9-10 minutes on a busy 2-core CPU (load 4-8)
    python -m bench.cost --full     # more timing rounds, bf16 layer micro-benchmarks, 4x Monarch rows
    python -m bench.cost --device cuda
    python -m bench.cost --methods floor,full,apex_52 --dtypes bf16   # a subset, in a few minutes
    python -m bench.cost --layers-only --dtypes fp32,bf16             # per-layer micro-benchmarks only

A subset (``--methods``, ``--dtypes``, ``--layers-only``) writes ``cost_subset.json`` unless
``--output`` says otherwise, so it never replaces the whole run's ``cost.json``; the
methods that ratios are taken against (``floor``, ``full``, ``lora_r8``) are built when
asked for, and a target is reported only where its methods ran.

The model has Llama-3.2-1B's layer shapes (dim 2048, FFN 8192, 32 query / 8 KV heads of
64, RoPE base 500k, tied embeddings) but only ``LAYERS`` layers, so that every method fits
this machine at once, and a 2,048-token vocabulary: the embedding and output head are not
what the methods differ in (none of the methods below trains them except full
fine-tuning), and a 128k vocabulary would make the step mostly the output head. Weights
are torchtune's random init; timing does not depend on their values, and APEX's units are
chosen by the library's own activation ranking over ``ASSESS_BATCHES`` batches, then
``set_selection`` (scattered units, as in a real run).

Methods, fp32 and bf16 (APEX's own parameters are fp32 in both, as the library stores them):
``floor`` the frozen base's forward + backward (input gradients only: what any method
that trains inside every layer must at least pay), ``full`` fine-tuning, torchtune
LoRA r8 / r16 on every linear layer (``lora_llama3_2``, as users run it), LoRA at the
rank whose trainable count matches ``apex_52``, DoRA r8, ``apex_ops`` (operators only,
K = 18.75%), ``apex_r8_budget`` (APEX + delta at LoRA r8's trainable count: with 8 KV
groups a delta on even one head unit is larger than LoRA r8's whole budget, so heads
are off and channels carry it, K channels expanded, the delta on those 2K), ``apex_52``
(the paper's ~52% setting: K = 18.75%, the delta on 50% of units). The rankers stay
attached during training, as in the recipe.

Every round times each method once, in turn; a ratio is the median over rounds of the
ratio within a round, so load from other jobs on the machine hits the methods alike. On
CPU the clock is the process's CPU time (one intra-op thread: the work itself, not the
time other jobs hold the cores); on CUDA, wall time after a synchronize. Every method
back-propagates through every layer (see ``backward_through_every_layer``).

Training memory (CPU): parameters + gradients + optimizer state + the tensors autograd
saves for backward, counted by a ``saved_tensors_hooks`` pack hook (unique storages, those
of parameters excluded as already counted). It is the memory the step must hold at the
end of the forward, not an allocator's high-water mark: transient buffers are not in it.
On CUDA the allocator's peak during the step is reported as well.

glibc returns freed blocks above 128 KiB to the OS, so on CPU every large temporary is
page-faulted in again on its next use; GPU allocators cache blocks instead. The timing
runs with ``mallopt`` raising glibc's trim and mmap thresholds (a cache, for every method
alike); the Monarch comparison is reported with and without it.
"""

import argparse
import contextlib
import ctypes
import os
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules.peft import LoRALinear, get_adapter_params
from torchtune.training import set_default_dtype

from apex_tune import ActivationRanker, ApexSettings, MonarchMatrix, apply_apex, random_selection, set_apex_trainable, set_selection
from apex_tune.modules.expansion import _ApexLinear
from apex_tune.modules.model import bypass_unchanged_wrappers
from apex_tune.training.assessment import score_units
from bench.common import count_trainable, load_base_into_adapter_model, log, setup_torch, token_loss, write_json

LAYERS = 2
LLAMA_1B_SHAPES = dict(
    vocab_size=2048, num_layers=LAYERS, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192,
    max_seq_len=2048, rope_base=500_000, scale_factor=32, tie_word_embeddings=True,
)
BATCH, SEQ = 2, 256
OUTPUT_NAME = None  # set by --output
ASSESS_BATCHES = 4
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "output_proj"]
APEX_OPS = ApexSettings(ratio=0.1875)
APEX_52 = ApexSettings(ratio=0.1875, delta=True, tuned_ratio_heads=0.5, tuned_ratio_channels=0.5)
# (rounds, steps per method per round); every method takes one warm-up step first
ROUNDS = {"quick": (3, 1), "full": (10, 2)}
MICRO_ROUNDS = {"quick": 5, "full": 15}
MONARCH_SIZES = (256, 512, 1024, 2048, 4096)
MONARCH_ROWS = 1024
SMALL_ROWS = 64  # a decode-sized batch: per-op overhead, not arithmetic
# The reference run's proportions: 12,288 examples scored before stage 1, against one
# epoch of the Tulu v2 SFT mixture (326,154 examples; the reference trains 2 epochs).
ASSESS_EXAMPLES, TULU_V2_EXAMPLES, REFERENCE_EPOCHS = 12_288, 326_154, 2
METHODS = ["floor", "full", "lora_r8", "lora_r16", "lora_matched", "dora_r8", "apex_ops", "apex_r8_budget", "apex_52"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
T0 = time.perf_counter()


def cache_freed_memory() -> bool:
    """Keep freed heap blocks in the process (see the module docstring); False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30)) and bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock_for(device: torch.device) -> Callable[[], float]:
    """CUDA: wall time (after a synchronize). CPU: this process's CPU time, which on one
    intra-op thread is the work itself, without the time other jobs hold the cores."""
    return time.perf_counter if device.type == "cuda" else time.process_time


CLOCK = time.process_time


# ------------------------------------------------------------------ methods
class TimedRanker(ActivationRanker):
    """The library's ranker, with the seconds spent inside its hooks added up (on CPU the
    hooks run synchronously, so this is their whole cost; on CUDA it is launch time only)."""

    seconds = 0.0

    def _timed(self, hook):
        def timed(*args):
            start = CLOCK()
            out = hook(*args)
            self.seconds += CLOCK() - start
            return out

        return timed

    def _head_hook(self, pos, layer):
        return self._timed(super()._head_hook(pos, layer))

    def _channel_hook(self, pos, layer):
        return self._timed(super()._channel_hook(pos, layer))


def base_model(dtype, device, state=None) -> nn.Module:
    with set_default_dtype(dtype), torch.device(device):
        model = llama3_2(**LLAMA_1B_SHAPES)
    if state is not None:
        model.load_state_dict(state, assign=True)  # frozen base weights shared between the methods' models
    return model


def lora_model(state, rank: int, dora: bool, dtype, device) -> nn.Module:
    with set_default_dtype(dtype), torch.device(device):
        model = lora_llama3_2(
            LORA_MODULES, apply_lora_to_mlp=True, lora_rank=rank, lora_alpha=2 * rank, use_dora=dora,
            **LLAMA_1B_SHAPES,
        )
    return load_base_into_adapter_model(model, state, assign=True)


def apex_model(state, settings: ApexSettings, dtype, device, batches) -> tuple:
    """Wrapped model with its units chosen by activation ranking; the ranker stays attached."""
    model = base_model(dtype, device, state)
    apply_apex(model, settings)
    set_apex_trainable(model, settings)
    ranker = TimedRanker(model, settings)
    score_units(model, ranker, [({"tokens": tokens}, None) for tokens, _ in batches])
    set_selection(model, ranker.select())
    ranker.reset()
    return model, ranker


def assessed_model(state, settings: ApexSettings, dtype, device) -> tuple:
    """The model the recipe's assessment runs on, its ranker, and the bypass held open on it
    (an ExitStack: keep it, the bypass ends when it is closed or freed). The model is wrapped
    as apply_apex leaves it, before stage 1, sharing the frozen base weights; every wrapper
    still computes its base linear, so ``score_units`` runs each as that linear alone. The
    check that finds this (one read of the APEX parameters) is made once per assessment pass
    in the recipe, so it is made here once, outside the timed batches: within the open bypass,
    ``score_units`` checks nothing again."""
    model = base_model(dtype, device, state)
    apply_apex(model, settings)
    bypass = contextlib.ExitStack()
    bypassed = bypass.enter_context(bypass_unchanged_wrappers(model))
    assert bypassed == sum(isinstance(m, _ApexLinear) for m in model.modules()), "a fresh wrapper changed the base"
    return model, TimedRanker(model, settings), bypass


def budget_settings(lora_r8_trainable: int) -> ApexSettings:
    """APEX + delta with the trainable count closest to LoRA r8's: heads off, K channels
    expanded and the delta on those 2K (N and P)."""
    def settings(k):
        units = LLAMA_1B_SHAPES["intermediate_dim"]
        return ApexSettings(ratio_heads=0, ratio_channels=k / units, delta=True, tuned_ratio_channels=2 * k / units)

    # trainable(k) is close to linear in k (a delta row of w1, w3 and a column of w2 per unit,
    # plus operators): estimate from two points, then check the neighbours
    t1, t9 = trainable_on_meta(settings(1)), trainable_on_meta(settings(9))
    guess = max(1, round(1 + (lora_r8_trainable - t1) * 8 / (t9 - t1)))
    best = min(range(max(1, guess - 2), guess + 3), key=lambda k: abs(trainable_on_meta(settings(k)) - lora_r8_trainable))
    return settings(best)


_META_COUNTS: Dict[ApexSettings, int] = {}


def trainable_on_meta(settings: ApexSettings) -> int:
    if settings not in _META_COUNTS:
        with torch.device("meta"):
            model = llama3_2(**LLAMA_1B_SHAPES)
        apply_apex(model, settings)
        set_apex_trainable(model, settings)
        _META_COUNTS[settings] = count_trainable(model)
    return _META_COUNTS[settings]


def lora_trainable_per_rank() -> int:
    with torch.device("meta"):
        model = lora_llama3_2(LORA_MODULES, apply_lora_to_mlp=True, lora_rank=1, lora_alpha=2, **LLAMA_1B_SHAPES)
    return sum(p.numel() for p in get_adapter_params(model).values())


@dataclass
class Method:
    model: nn.Module
    ranker: Optional[TimedRanker] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    assessed: Optional[tuple] = None  # (model, ranker, open bypass) of the assessment pass, see assessed_model

    def __post_init__(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if params:
            self.optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
            self.params = params

    def step(self, tokens, labels) -> None:
        """One training step as the recipe takes it (clip, AdamW)."""
        if self.ranker is not None:
            self.ranker.begin_microbatch(None)
        token_loss(self.model, tokens, labels).backward()
        if self.optimizer is not None:
            nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def assess(self, tokens) -> None:
        """One batch of the assessment pass, as the recipe runs it before stage 1
        (``score_units`` on the freshly wrapped model: a no-grad forward through the base
        linears that stops once the last hook has recorded)."""
        model, ranker, _ = self.assessed
        score_units(model, ranker, [({"tokens": tokens}, None)])


def frozen_floor(model: nn.Module) -> nn.Module:
    """The base with every weight frozen: backward computes input gradients only."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def backward_through_every_layer(model: nn.Module) -> None:
    """Make the embedding output require grad. Autograd stops below the lowest trainable
    parameter; with 2 layers, a method with nothing trainable in layer 0's attention (APEX
    with heads off) would skip about 8% of the model's backward, a saving that in a
    16-layer model is about 1%. With this, every method back-propagates through every
    layer, as it does in a deep model, at the cost of one (tokens x dim) gradient for all."""
    model.tok_embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_())


def build_methods(dtype, device, batches, budgets: dict, names: List[str] = METHODS) -> Dict[str, Method]:
    """The methods in ``names`` (all by default), in ``METHODS``' order."""
    torch.manual_seed(0)
    base = base_model(dtype, device)
    state = {k: v.detach() for k, v in base.state_dict().items()}
    methods = {}
    if "floor" in names:
        methods["floor"] = Method(frozen_floor(base_model(dtype, device, state)))
    if "full" in names:
        full = base_model(dtype, device)
        full.load_state_dict(state)  # a copy: full fine-tuning updates the base weights
        methods["full"] = Method(full)
    for name, rank, dora in [("lora_r8", 8, False), ("lora_r16", 16, False),
                             ("lora_matched", budgets["lora_matched_rank"], False), ("dora_r8", 8, True)]:
        if name in names:
            methods[name] = Method(lora_model(state, rank, dora, dtype, device))
    for name, settings in [("apex_ops", APEX_OPS), ("apex_r8_budget", budgets["apex_r8_budget"]), ("apex_52", APEX_52)]:
        if name in names:
            model, ranker = apex_model(state, settings, dtype, device, batches)
            methods[name] = Method(model, ranker, assessed=assessed_model(state, settings, dtype, device))
    for method in methods.values():
        backward_through_every_layer(method.model)
        method.model.train()
    return methods


# ------------------------------------------------------------------ measures
def training_memory(method: Method, tokens, labels, device) -> dict:
    """Bytes the step holds at the end of the forward (see the module docstring)."""
    param_storages = {}
    for p in method.model.parameters():
        param_storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    trainable = [p for p in method.model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = 0
    if method.optimizer is not None:
        for state in method.optimizer.state.values():
            optimizer += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim())
    saved: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if method.ranker is not None:
        method.ranker.begin_microbatch(None)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = token_loss(method.model, tokens, labels)
    loss.backward()
    out = dict(params=sum(param_storages.values()), grads=grads, optimizer=optimizer, saved=sum(saved.values()))
    if device.type == "cuda":
        sync(device)
        out["cuda_step_peak_above_resident"] = torch.cuda.max_memory_allocated() - before
    for p in trainable:
        p.grad = None
    out["total"] = out["params"] + out["grads"] + out["optimizer"] + out["saved"]
    return out


def interleaved_step_times(methods: Dict[str, Method], tokens, labels, rounds: int, steps: int, device):
    """{name: [per-round median seconds]}, plus hook seconds and assessment seconds per round."""
    times = {name: [] for name in methods}
    hook_fraction = {name: [] for name, m in methods.items() if m.ranker is not None}
    assess = {name: [] for name in hook_fraction}
    for round_ in range(rounds):
        for name, method in methods.items():
            this_round, hooks = [], 0.0
            for _ in range(steps):
                if method.ranker is not None:
                    method.ranker.seconds = 0.0
                sync(device)
                start = CLOCK()
                method.step(tokens, labels)
                sync(device)
                this_round.append(CLOCK() - start)
                if method.ranker is not None:
                    hooks += method.ranker.seconds
            if method.ranker is not None:
                sync(device)
                start = CLOCK()
                method.assess(tokens)
                sync(device)
                assess[name].append(CLOCK() - start)
                hook_fraction[name].append(hooks / sum(this_round))
            times[name].append(statistics.median(this_round))
        log(f"  round {round_ + 1}/{rounds} done ({time.perf_counter() - T0:.0f} s)")
    return times, hook_fraction, assess


def paired(times: Dict[str, list], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


# ------------------------------------------------------------------ layers
def layer_micro(dtype, device, rounds: int) -> dict:
    """Forward + backward (input gradient and the method's own weight gradients) of each
    APEX wrapper kind of a Llama-1B-shaped layer, against a frozen linear and a torchtune
    LoRALinear r8 of the same shape, on BATCH x SEQ tokens. Units: a random selection of
    the settings' sizes, set as the library sets it: FFN channels in the contiguous layout
    (``apex.contiguous_channels``), heads scattered over the weight. The FFN wrappers are
    also timed with the layout off (``(scattered)``), and the delta wrappers on the path
    an NF4 base takes (``(two matmuls)``: the frozen matmul plus one of the tuned slice)."""
    tokens = BATCH * SEQ
    cases = {}
    for label, settings in [("ops", APEX_OPS), ("delta", APEX_52)]:
        for contiguous in (True, False):
            torch.manual_seed(0)
            with set_default_dtype(dtype), torch.device(device):
                model = llama3_2(**dict(LLAMA_1B_SHAPES, num_layers=1))
            layout_settings = replace(settings, contiguous_channels=contiguous)
            apply_apex(model, layout_settings)
            set_apex_trainable(model, layout_settings)
            set_selection(model, random_selection(model, torch.Generator().manual_seed(0)))
            layer = model.layers[0]
            wrappers = {"column": [("v_proj", layer.attn.v_proj), ("w1", layer.mlp.w1)],
                        "row": [("output_proj", layer.attn.output_proj), ("w2", layer.mlp.w2)]}
            if settings.delta:
                wrappers["column"].insert(0, ("q_proj", layer.attn.q_proj))
            for kind, named in wrappers.items():
                for proj, module in named:
                    if contiguous:
                        cases[f"{kind} {label} {proj}"] = module
                        if settings.delta:
                            cases[f"{kind} {label} {proj} (two matmuls)"] = TwoMatmulDelta(module)
                    elif proj in ("w1", "w2"):  # heads are laid out alike either way
                        cases[f"{kind} {label} {proj} (scattered)"] = module
    baselines = {}
    for in_dim, out_dim in {_dims(m) for m in cases.values()}:
        with set_default_dtype(dtype), torch.device(device):
            frozen = nn.Linear(in_dim, out_dim, bias=False).requires_grad_(False)
            lora = LoRALinear(in_dim, out_dim, rank=8, alpha=16)
        lora.weight.requires_grad_(False)
        baselines[(in_dim, out_dim)] = dict(frozen=frozen, lora_r8=lora)
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = {}
    for dims in baselines:
        x = torch.randn(tokens, dims[0], generator=gen, device=device, dtype=dtype).requires_grad_()
        g = torch.randn(tokens, dims[1], generator=gen, device=device, dtype=dtype)
        inputs[dims] = (x, g)

    def fwd_bwd(module, dims):
        x, g = inputs[dims]
        module(x).backward(g)
        x.grad = None
        for p in module.parameters():
            p.grad = None

    runs = {}
    for name, module in cases.items():
        runs[name] = (module, _dims(module))
    for dims, base in baselines.items():
        for bname, module in base.items():
            runs[f"{bname} {dims[0]}x{dims[1]}"] = (module, dims)
    times = {name: [] for name in runs}
    for round_ in range(rounds + 1):
        for name, (module, dims) in runs.items():
            sync(device)
            start = CLOCK()
            fwd_bwd(module, dims)
            sync(device)
            if round_:
                times[name].append(CLOCK() - start)
    out = {}
    for name, (module, dims) in runs.items():
        if name.startswith(("frozen", "lora_r8")):
            continue
        ref = f"{dims[0]}x{dims[1]}"
        out[name] = dict(
            shape=ref, seconds=statistics.median(times[name]),
            over_frozen=statistics.median(a / b for a, b in zip(times[name], times[f"frozen {ref}"])),
            over_lora_r8=statistics.median(a / b for a, b in zip(times[name], times[f"lora_r8 {ref}"])),
        )
    for dims in baselines:
        ref = f"{dims[0]}x{dims[1]}"
        out[f"lora_r8 {ref}"] = dict(
            shape=ref, seconds=statistics.median(times[f"lora_r8 {ref}"]),
            over_frozen=statistics.median(a / b for a, b in zip(times[f"lora_r8 {ref}"], times[f"frozen {ref}"])),
        )
    return out


class TwoMatmulDelta(nn.Module):
    """A delta wrapper computing as over an NF4 base: the frozen matmul plus a matmul of the
    tuned slice, both back-propagated (the path before partial back-propagation), timed
    beside the slice paths on the same wrapper."""

    def __init__(self, wrapper: nn.Module):
        super().__init__()
        self.wrapper = wrapper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # instance attributes shadow the methods for this call
        self.wrapper._partial_backprop = self.wrapper._prefix_path = lambda: False
        try:
            return self.wrapper(x)
        finally:
            del self.wrapper._partial_backprop, self.wrapper._prefix_path


def _dims(module) -> tuple:
    """(in, out) of an APEX wrapper, whatever its internals: from the base linear's weight."""
    weights = [p for n, p in module.named_parameters() if n.endswith("weight") and p.dim() == 2]
    weights += [b for n, b in module.named_buffers() if n.endswith("weight") and b.dim() == 2]
    out_dim, in_dim = max(weights, key=lambda w: w.numel()).shape
    return in_dim, out_dim


# ------------------------------------------------------------------ Monarch
def _interleaved(fns: Dict[str, Callable], repeats: int, device) -> Dict[str, List[float]]:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            start = CLOCK()
            fn()
            sync(device)
            times[k].append(CLOCK() - start)
    return times


def monarch_vs_dense(rows: int, device) -> List[dict]:
    """MonarchMatrix vs a dense n x n matrix (F.linear) on the same (rows, n) input, timed
    alternately; a ratio is the median of the per-pair ratios (dense time / Monarch time).
    ``speedup``: fp32 forward (the issue's target at n = 1024). Also fp32 forward + backward
    (input gradient and the factors' / the dense matrix's gradient, as in training), the
    same two in bf16, and both directions at ``SMALL_ROWS`` rows (launch-bound on a GPU)."""
    out = []
    for n in MONARCH_SIZES:
        entry = {}
        for dtype_name, dtype in DTYPES.items():
            for label, count in (("", rows), ("small_rows_", SMALL_ROWS)):
                entry.update(_monarch_case(n, count, dtype, device, prefix=f"{label}{dtype_name}_"))
        monarch = MonarchMatrix(n, device="meta")
        out.append(dict(
            n=n, nblocks=monarch.nblocks, block_size=monarch.block_size, rows=rows, small_rows=SMALL_ROWS,
            monarch_s=entry.pop("fp32_monarch_s"), dense_s=entry.pop("fp32_dense_s"),
            speedup=entry.pop("fp32_speedup"), flop_ratio=n / (2 * monarch.block_size), **entry,
        ))
    return out


def _monarch_case(n: int, rows: int, dtype, device, prefix: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(n)
    x = torch.randn(rows, n, generator=gen, device=device, dtype=dtype)
    grad = torch.randn(rows, n, generator=gen, device=device, dtype=dtype)
    monarch = MonarchMatrix(n, device=device, dtype=dtype)
    torch.nn.init.normal_(monarch.L2)  # timing only; zero or not costs the same
    dense = torch.randn(n, n, generator=gen, device=device, dtype=dtype).requires_grad_()
    repeats = max(5, min(30, int(2e9 / (rows * n * n))))
    with torch.no_grad():
        fwd = _interleaved(dict(monarch=lambda: monarch(x), dense=lambda: F.linear(x, dense)), repeats, device)
    x.requires_grad_()

    def trained(fn, params):
        def step():
            fn().backward(grad)
            for p in params:
                p.grad = None
        return step

    both = _interleaved(dict(monarch=trained(lambda: monarch(x), [x, *monarch.parameters()]),
                             dense=trained(lambda: F.linear(x, dense), [x, dense])), max(3, repeats // 3), device)
    ratio = lambda t: statistics.median(d / m for d, m in zip(t["dense"], t["monarch"]))
    return {f"{prefix}monarch_s": statistics.median(fwd["monarch"]), f"{prefix}dense_s": statistics.median(fwd["dense"]),
            f"{prefix}speedup": ratio(fwd), f"{prefix}speedup_fwd_bwd": ratio(both)}


# ------------------------------------------------------------------ run
def random_batches(count: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        t = torch.randint(3, LLAMA_1B_SHAPES["vocab_size"], (BATCH, SEQ + 1), generator=gen).to(device)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def run_cost(full: bool, device: torch.device, methods: List[str] = METHODS, dtypes: Optional[List[str]] = None,
             layers_only: bool = False) -> dict:
    """The whole benchmark, or a subset: ``methods`` (step time and memory), ``dtypes``
    (models and layers; default fp32 and bf16 for the models, the layers in bf16 too only
    with ``full``), ``layers_only`` (the per-layer micro-benchmarks alone)."""
    global CLOCK
    CLOCK = clock_for(device)
    threads = setup_torch() if device.type == "cpu" else None
    mode = "full" if full else "quick"
    rounds, steps = ROUNDS[mode]
    results = dict(device=str(device), clock=CLOCK.__name__, threads=threads, mode=mode, rounds=rounds, steps_per_round=steps,
                   shapes=LLAMA_1B_SHAPES, batch=[BATCH, SEQ])
    subset = layers_only or dtypes is not None or list(methods) != METHODS
    model_dtypes = dtypes or list(DTYPES)
    layer_dtypes = dtypes or (["fp32", "bf16"] if full else ["fp32"])
    results.update(subset=subset, methods_run=[] if layers_only else list(methods))
    if device.type == "cpu":
        if not subset:
            log("cost: Monarch vs dense, glibc's default allocator")
            results["monarch_default_malloc"] = monarch_vs_dense(MONARCH_ROWS * (4 if full else 1), device)
        results["freed_memory_cached"] = cache_freed_memory()
    if not subset:
        log("cost: Monarch vs dense")
        results["monarch"] = monarch_vs_dense(MONARCH_ROWS * (4 if full else 1), device)
    results["models"] = {}
    if not layers_only:
        run_models(results, device, methods, model_dtypes, rounds, steps)
    log("cost: per-layer micro-benchmarks")
    results["layers"] = {d: layer_micro(DTYPES[d], device, MICRO_ROUNDS[mode]) for d in layer_dtypes}
    results["targets"] = targets(results)
    results["wall_s"] = time.perf_counter() - T0
    results["load_average_1min_at_end"] = os.getloadavg()[0]
    default_name = "cost_subset.json" if subset else "cost.json" if device.type == "cpu" else f"cost_{device.type}.json"
    write_json(OUTPUT_NAME or default_name, results)
    return results


def budget_matched() -> dict:
    """The budget-matched settings: LoRA's rank at APEX ~52%'s trainable count, and APEX at
    LoRA r8's (``build_methods``' ``budgets``)."""
    lora_per_rank = lora_trainable_per_rank()
    return dict(lora_matched_rank=max(1, round(trainable_on_meta(APEX_52) / lora_per_rank)),
                apex_r8_budget=budget_settings(8 * lora_per_rank))


def run_models(results: dict, device, names: List[str], dtypes: List[str], rounds: int, steps: int) -> None:
    """Step time and training memory of the methods ``names`` in each of ``dtypes``, into ``results``."""
    budgets = budget_matched()
    results["settings"] = dict(apex_ops=APEX_OPS.to_dict(), apex_r8_budget=budgets["apex_r8_budget"].to_dict(),
                               apex_52=APEX_52.to_dict(), lora_matched_rank=budgets["lora_matched_rank"])
    assess_batches = random_batches(ASSESS_BATCHES, device, seed=1)
    tokens, labels = random_batches(1, device)[0]
    for dname in dtypes:
        dtype = DTYPES[dname]
        log(f"cost: {dname}: building {len(names)} methods (APEX units from activation ranking)")
        methods = build_methods(dtype, device, assess_batches, budgets, names)
        total = sum(p.numel() for p in base_model(dtype, "meta").parameters())
        log(f"cost: {dname}: one warm-up step per method (it also creates the optimizer state), then training memory")
        for m in methods.values():
            m.step(tokens, labels)
        memory = {name: training_memory(m, tokens, labels, device) for name, m in methods.items()}
        log(f"cost: {dname}: step times, {rounds} rounds of {steps} step(s) per method")
        times, hooks, assess = interleaved_step_times(methods, tokens, labels, rounds, steps, device)
        entry = dict(params=total, methods={})
        for name, m in methods.items():
            entry["methods"][name] = dict(
                trainable=count_trainable(m.model), trainable_pct=100 * count_trainable(m.model) / total,
                step_s=statistics.median(times[name]), memory=memory[name],
                step_over={ref: paired(times, name, ref) for ref in ("floor", "full", "lora_r8") if ref in methods},
                memory_over={ref: memory[name]["total"] / memory[ref]["total"]
                             for ref in ("floor", "full", "lora_r8") if ref in methods},
            )
            if name in hooks:
                ratio = statistics.median(a / t for a, t in zip(assess[name], times[name]))
                entry["methods"][name].update(
                    hooks_fraction_of_step=statistics.median(hooks[name]),
                    assess_batch_over_step=ratio,
                    assessment_fraction_of_epoch=ratio * ASSESS_EXAMPLES / TULU_V2_EXAMPLES,
                    assessment_fraction_of_reference_run=ratio * ASSESS_EXAMPLES / (REFERENCE_EPOCHS * TULU_V2_EXAMPLES),
                )
        results["models"][dname] = entry
        del methods


def targets(results: dict) -> List[dict]:
    """The issue's targets, each on every dtype measured."""
    out = []
    for dname, entry in results["models"].items():
        m = entry["methods"]

        def ratio(method, kind, ref):
            return m[method][kind].get(ref) if method in m else None

        hooks = [v["hooks_fraction_of_step"] for v in m.values() if "hooks_fraction_of_step" in v]
        for name, value, limit in [
            ("APEX ~52%: step / full FT", ratio("apex_52", "step_over", "full"), 0.85),
            ("APEX ~52%: memory / full FT", ratio("apex_52", "memory_over", "full"), 1.0),
            ("APEX at LoRA r8's budget: step / LoRA r8", ratio("apex_r8_budget", "step_over", "lora_r8"), 1.0),
            ("APEX at LoRA r8's budget: memory / LoRA r8", ratio("apex_r8_budget", "memory_over", "lora_r8"), 1.05),
            ("APEX operators only: step / frozen fwd+bwd", ratio("apex_ops", "step_over", "floor"), 1.05),
            ("ranking hooks: fraction of step (worst APEX setting)", max(hooks) if hooks else None, 0.01),
            ("assessment pass: fraction of a Tulu-v2 epoch (APEX ~52%)",
             m["apex_52"]["assessment_fraction_of_epoch"] if "apex_52" in m else None, 0.01),
        ]:
            if value is not None:  # its methods ran (a subset may leave some out)
                out.append(dict(target=name, dtype=dname, value=value, limit=limit, met=value <= limit))
    for dname, layers in results.get("layers", {}).items():
        for name, v in layers.items():
            if " ops " in name:
                out.append(dict(target=f"layer {name}: fwd+bwd / frozen", dtype=dname, value=v["over_frozen"],
                                limit=1.05, met=v["over_frozen"] <= 1.05))
    m1024 = next((m for m in results.get("monarch", []) if m["n"] == 1024), None)
    if m1024 is not None:
            out.append(dict(target="Monarch n=1024: dense time / Monarch time", dtype="fp32", value=m1024["speedup"],
                        limit=8.0, met=m1024["speedup"] >= 8.0, higher_is_better=True))
    return out


def print_summary(results: dict) -> None:
    for dname, entry in results["models"].items():
        log(f"{dname}: {entry['params'] / 1e6:.0f}M params, batch {BATCH}x{SEQ}")
        log(f"  {'method':16s} {'trainable':>10s} {'step s':>7s} {'/floor':>7s} {'/full':>6s} {'/LoRA8':>7s} {'mem GB':>7s} {'/full':>6s} {'/LoRA8':>7s}")
        for name, m in entry["methods"].items():
            step, mem = _ratios(m["step_over"], 7), _ratios(m["memory_over"], 7)
            log(f"  {name:16s} {m['trainable_pct']:9.2f}% {m['step_s']:7.2f} {step[0]} {step[1][1:]} {step[2]} "
                f"{m['memory']['total'] / 1e9:7.2f} {mem[1][1:]} {mem[2]}")
    for dname, layers in results.get("layers", {}).items():
        log(f"layers ({dname}, {BATCH * SEQ} tokens, fwd+bwd): " + "; ".join(
            f"{n} {v['over_frozen']:.2f}x frozen" for n, v in layers.items()))
    for dname, entry in results["models"].items():
        for name, m in entry["methods"].items():
            if "hooks_fraction_of_step" in m:
                log(f"{name} [{dname}]: ranking hooks {100 * m['hooks_fraction_of_step']:.2f}% of the step; an "
                    f"assessment batch costs {m['assess_batch_over_step']:.2f} steps, so scoring {ASSESS_EXAMPLES} "
                    f"examples is {100 * m['assessment_fraction_of_epoch']:.2f}% of a {TULU_V2_EXAMPLES}-example epoch "
                    f"({100 * m['assessment_fraction_of_reference_run']:.2f}% of the reference's {REFERENCE_EPOCHS} epochs)")
    if "monarch" in results:
        log("Monarch vs dense: " + ", ".join(f"n={m['n']} {m['speedup']:.1f}x" for m in results["monarch"]))
    if "monarch_default_malloc" in results:
        log("  (glibc default allocator: " + ", ".join(f"n={m['n']} {m['speedup']:.1f}x" for m in results["monarch_default_malloc"]) + ")")
    for t in results["targets"]:
        sign = ">=" if t.get("higher_is_better") else "<="
        log(f"  target {t['target']} [{t['dtype']}]: {t['value']:.4g} ({sign} {t['limit']:g}) -> {'met' if t['met'] else 'NOT met'}")


def _ratios(over: dict, width: int) -> List[str]:
    """Against floor, full, LoRA r8, formatted; '-' where that method did not run."""
    return [f"{over[ref]:{width}.2f}" if ref in over else f"{'-':>{width}s}" for ref in ("floor", "full", "lora_r8")]


def cost_markdown(results: dict) -> List[str]:
    """The results as markdown tables (RESULTS.md and the README's cost section)."""
    lines = [
        f"Device {results['device']}, {results.get('threads') or '-'} intra-op thread(s), {results['mode']} mode: "
        f"{results['rounds']} interleaved rounds of {results['steps_per_round']} step(s) per method (forward, "
        "backward, clip, AdamW); ratios are medians over rounds of within-round ratios. Memory: parameters + "
        "gradients + optimizer state + tensors saved for backward.",
        "",
        "| method | dtype | trainable | step s | / floor | / full FT | / LoRA r8 | memory GB | / full FT | / LoRA r8 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dname, entry in results["models"].items():
        for name, m in entry["methods"].items():
            step, mem = (_ratios(m[k], 0) for k in ("step_over", "memory_over"))
            lines.append(
                f"| {name} | {dname} | {m['trainable_pct']:.2f}% | {m['step_s']:.2f} | {step[0]} | {step[1]} | {step[2]} | "
                f"{m['memory']['total'] / 1e9:.2f} | {mem[1]} | {mem[2]} |"
            )
    for dname, layers in results.get("layers", {}).items():
        lines += ["", f"Per layer ({dname}, {results['batch'][0] * results['batch'][1]} tokens, forward + backward):", "",
                  "| wrapper | shape (in x out) | / frozen linear | / LoRA r8 linear |", "|---|---|---:|---:|"]
        for name, v in layers.items():
            lora = f"{v['over_lora_r8']:.2f}" if "over_lora_r8" in v else "-"
            lines.append(f"| {name} | {v['shape']} | {v['over_frozen']:.2f} | {lora} |")
    lines += ["", "| target | dtype | measured | limit | met |", "|---|---|---:|---:|---|"]
    for t in results["targets"]:
        sign = ">=" if t.get("higher_is_better") else "<="
        lines.append(f"| {t['target']} | {t['dtype']} | {t['value']:.3g} | {sign} {t['limit']:g} | {'yes' if t['met'] else 'no'} |")
    if "monarch" in results:
        lines += ["", "Monarch multiply vs dense n x n (F.linear), " + f"{results['monarch'][0]['rows']} rows: "
                  + ", ".join(f"n={m['n']} {m['speedup']:.1f}x" for m in results["monarch"])]
    if "monarch_default_malloc" in results:
        lines[-1] += "; with glibc's default allocator: " + ", ".join(
            f"n={m['n']} {m['speedup']:.1f}x" for m in results["monarch_default_malloc"])
    return lines + [""]


def main() -> None:
    global BATCH, SEQ, OUTPUT_NAME
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="more timing rounds, bf16 layer micro-benchmarks, 4x Monarch rows")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"sequences per step (default {BATCH})")
    parser.add_argument("--seq", type=int, default=SEQ, help=f"tokens per sequence (default {SEQ}; a GPU wants more)")
    parser.add_argument("--output", default=None,
                        help="file name under bench/results/ (default cost.json, cost_cuda.json on CUDA, cost_subset.json for a subset)")
    parser.add_argument("--methods", type=_names(METHODS), default=METHODS,
                        help=f"comma-separated subset of {','.join(METHODS)} (default all); add floor/full/lora_r8 for ratios against them")
    parser.add_argument("--dtypes", type=_names(list(DTYPES)), default=None,
                        help="comma-separated subset of fp32,bf16 for the models and the layers (default: models in both, layers in fp32, in bf16 too with --full)")
    parser.add_argument("--layers-only", action="store_true", help="only the per-layer micro-benchmarks (no models, no Monarch)")
    args = parser.parse_args()
    BATCH, SEQ, OUTPUT_NAME = args.batch, args.seq, args.output
    print_summary(run_cost(args.full, torch.device(args.device), args.methods, args.dtypes, args.layers_only))


def _names(allowed: List[str]) -> Callable[[str], List[str]]:
    """An argparse type: a comma-separated subset of ``allowed``, kept in ``allowed``'s order."""
    def parse(text: str) -> List[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or 'empty list'}; choose from {','.join(allowed)}")
        return [n for n in allowed if n in names]

    return parse


if __name__ == "__main__":
    main()
