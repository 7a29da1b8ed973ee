"""Peak memory and step time of APEX, QAPEX (APEX over an NF4 base) and torchtune's
QLoRA, on the same model and batch, as ratios from one run.

    python -m bench.memory [--dtype bf16|fp32] [--steps 6] [--rounds 2]

Writes bench/results/memory.json and prints the ratios. CPU only here: the model is
Llama-3-shaped but scaled down (8 layers, embed 512, 8 heads / 4 KV heads,
intermediate 1536, vocab 8192; random weights: neither memory nor time depends on
them), since a Llama-3.2-1B run does not fit a quick CPU benchmark. Every NF4
projection holds a multiple of 64 * 256 elements, as NF4 requires.

Methods (all: frozen base, AdamW on what trains, the same batch and loss):
- ``apex``: APEX operators only (K = 18.75%), base in the run dtype;
- ``qapex``: the same over an NF4 base (``apex.quantize_base``);
- ``qlora``: torchtune's ``lora_llama3(quantize_base=True)`` with LoRA on q, k, v,
  output_proj and the MLP, its rank chosen so that it trains as many parameters as
  QAPEX (the matched trainable budget);
- ``qlora_r8``: the same at torchtune's usual rank 8 (a larger budget), for reference.

Each measurement runs in its own child process. Memory is the kernel's resident-set
high-water mark (VmHWM), reset just before training, minus the process's RSS after
imports: what the model, optimizer and training steps add; glibc is told to return
freed tensors to the kernel at once (``MALLOC_ENV``), so that RSS tracks live tensors
(deterministic to 0.1 MB across rounds). It is measured with torchtune's activation
checkpointing on (as the shipped QAPEX configs and torchtune's QLoRA configs run) and
off. APEX and QAPEX cross one stage boundary midway (QAPEX then carries a frozen
stage), so both stages count. Step time (checkpointing on, normal allocator) is the
median step (forward, backward, optimizer); its ratios are medians over rounds of the
ratio within a round, so load from other jobs hits the methods alike.
"""

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "memory.json"
MODEL = dict(
    vocab_size=8192, num_layers=8, num_heads=8, num_kv_heads=4, embed_dim=512, intermediate_dim=1536, max_seq_len=1024
)
BATCH, SEQ = 2, 256
RATIO = 0.1875
METHODS = ("apex", "qapex", "qlora", "qlora_r8")
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "output_proj"]
TARGET = 1.1  # QAPEX peak memory within 1.1x of QLoRA's
# glibc: a fixed mmap threshold (no dynamic growth) and no trimming delay, so that a
# freed tensor leaves the resident set at once and RSS tracks live tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _settings(quantize: bool):
    from apex_tune import ApexSettings

    return ApexSettings(ratio=RATIO, quantize_base=quantize)


def _lora(rank: int, device=None):
    from torchtune.models.llama3 import lora_llama3

    with torch.device(device or "cpu"):
        return lora_llama3(
            lora_attn_modules=LORA_MODULES, apply_lora_to_mlp=True, apply_lora_to_output=False,
            lora_rank=rank, lora_alpha=2 * rank, quantize_base=True, **MODEL,
        )


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_lora_rank() -> Dict[str, int]:
    """The LoRA rank whose trainable count is closest to QAPEX's (counted on the meta device)."""
    from torchtune.models.llama3 import llama3
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from apex_tune import apply_apex, set_apex_trainable

    with torch.device("meta"):
        model = llama3(**MODEL)
    apply_apex(model, _settings(True))
    set_apex_trainable(model, _settings(True))
    budget = _trainable(model)
    best = None
    for rank in range(1, 17):
        lora = _lora(rank, "meta")
        set_trainable_params(lora, get_adapter_params(lora))
        count = _trainable(lora)
        if best is None or abs(count - budget) < abs(best[1] - budget):
            best = (rank, count)
    return {"apex_trainable": budget, "rank": best[0], "lora_trainable": best[1]}


def build(method: str, dtype: torch.dtype, rank: int):
    """(model, hook before each forward, stage-boundary function of the optimizer or None)."""
    from torchtune.models.llama3 import llama3
    from torchtune.modules.peft import get_adapter_params, set_trainable_params
    from torchtune.training import set_default_dtype

    torch.manual_seed(0)
    if method.startswith("qlora"):
        with set_default_dtype(dtype):
            model = _lora(rank if method == "qlora" else 8)
        set_trainable_params(model, get_adapter_params(model))
        return model, None, None

    from apex_tune import ActivationRanker, apply_apex, set_apex_trainable, set_selection
    from apex_tune.training.stages import choose_selection, end_stage

    settings = _settings(method == "qapex")
    with set_default_dtype(dtype):
        model = llama3(**MODEL)
    apply_apex(model, settings)
    set_apex_trainable(model, settings)
    ranker = ActivationRanker(model, settings).attach()  # attached all training, as in the recipe
    set_selection(model, choose_selection(model, ranker, "random", seed=0)[0])
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)

    def boundary(optimizer):  # the recipe's stage boundary
        end_stage(model, optimizer, ranker, "random", seed=1)

    return model, lambda: ranker.begin_microbatch(mask), boundary


def _import_everything() -> None:
    """Load every library a method uses before the idle baseline, so that none counts."""
    import torchao.dtypes.nf4tensor  # noqa: F401
    import torchtune.models.llama3  # noqa: F401
    import torchtune.modules.peft  # noqa: F401

    import apex_tune  # noqa: F401
    import apex_tune.modules.nf4  # noqa: F401


def child(method: str, dtype_name: str, steps: int, rank: int, checkpointing: bool) -> dict:
    torch.set_num_threads(1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    _import_everything()
    _release()
    idle = _status_mb("VmRSS")
    model, hook, boundary = build(method, dtype, rank)
    if checkpointing:
        from torchtune import modules, training

        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(3, MODEL["vocab_size"], (BATCH, SEQ + 1), generator=gen)
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def step() -> float:
        start = time.perf_counter()
        if hook:
            hook()
        logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up: optimizer states exist from here on
    _release()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS; building does not count
    before = _status_mb("VmRSS")
    first, second = [], []
    for i in range(steps):
        if boundary is not None and i == steps // 2:
            boundary(optimizer)
        (second if boundary is not None and i >= steps // 2 else first).append(step())
    return {
        "idle_rss_mb": idle,
        "resident_mb": before - idle,  # model + optimizer state after one step
        "peak_mb": _status_mb("VmHWM") - idle,
        "step_s": statistics.median(first + second),
        "step_s_stage1": statistics.median(first),
        "step_s_stage2": statistics.median(second) if second else None,
        "trainable_params": _trainable(model),
    }


def _child(method: str, dtype: str, steps: int, rank: int, checkpointing: bool, memory: bool) -> dict:
    """One method in a fresh process: with ``memory``, glibc returns freed memory at once
    (accurate peaks, slower steps); without, steps run at their normal speed."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--child", method, "--dtype", dtype, "--steps", str(steps),
         "--rank", str(rank), "--checkpointing", "on" if checkpointing else "off"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **(MALLOC_ENV if memory else {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(dtype: str, steps: int, rounds: int) -> dict:
    lora = matched_lora_rank()
    print(f"matched budget: QAPEX trains {lora['apex_trainable']:,} parameters, "
          f"QLoRA rank {lora['rank']} trains {lora['lora_trainable']:,}", flush=True)
    memory: Dict[str, Dict[str, dict]] = {}
    for setting in ("on", "off"):  # activation checkpointing; the shipped QAPEX/QLoRA configs: on
        memory[setting] = {}
        for method in METHODS:
            m = _child(method, dtype, 2, lora["rank"], setting == "on", memory=True)
            memory[setting][method] = m
            print(f"memory, checkpointing {setting:>3}, {method:>9}: peak +{m['peak_mb']:.1f} MB, "
                  f"resident +{m['resident_mb']:.1f} MB, trains {m['trainable_params']:,}", flush=True)
    timing = []
    for r in range(rounds):
        results = {}
        for method in METHODS:
            results[method] = _child(method, dtype, steps, lora["rank"], True, memory=False)
            print(f"time, round {r + 1}, {method:>9}: step {1000 * results[method]['step_s']:.0f} ms", flush=True)
        timing.append(results)

    def peak(setting: str, a: str, b: str) -> float:
        return memory[setting][a]["peak_mb"] / memory[setting][b]["peak_mb"]

    def time_ratio(a: str, b: str) -> float:
        return statistics.median(rnd[a]["step_s"] / rnd[b]["step_s"] for rnd in timing)

    ratios = {
        f"peak_memory_checkpointing_{setting}": {
            "qapex_over_qlora": peak(setting, "qapex", "qlora"),
            "qapex_over_apex": peak(setting, "qapex", "apex"),
            "apex_over_qlora": peak(setting, "apex", "qlora"),
            "qapex_over_qlora_r8": peak(setting, "qapex", "qlora_r8"),
        }
        for setting in ("on", "off")
    }
    ratios["resident_memory"] = {
        "qapex_over_qlora": memory["on"]["qapex"]["resident_mb"] / memory["on"]["qlora"]["resident_mb"],
        "qapex_over_apex": memory["on"]["qapex"]["resident_mb"] / memory["on"]["apex"]["resident_mb"],
    }
    ratios["step_time_checkpointing_on"] = {
        "qapex_over_qlora": time_ratio("qapex", "qlora"),
        "qapex_over_apex": time_ratio("qapex", "apex"),
        "apex_over_qlora": time_ratio("apex", "qlora"),
        "qapex_stage2_over_stage1": statistics.median(  # what the frozen stage costs
            rnd["qapex"]["step_s_stage2"] / rnd["qapex"]["step_s_stage1"] for rnd in timing
        ),
    }
    met = ratios["peak_memory_checkpointing_on"]["qapex_over_qlora"] <= TARGET
    summary = {
        "setup": {
            "model": MODEL, "batch": BATCH, "seq": SEQ, "dtype": dtype, "timed_steps": steps, "rounds": rounds,
            "apex_ratio": RATIO, "lora_modules": LORA_MODULES + ["mlp"], "matched": lora,
            "device": "cpu, 1 thread per child", "torch": torch.__version__,
            "memory": "VmHWM reset before training, minus RSS after imports; 2 steps, one per stage",
        },
        "memory_mb": memory,
        "timing_rounds": timing,
        "ratios": ratios,
        "target": {"qapex_over_qlora_peak_at_most": TARGET, "with_activation_checkpointing": True, "met": met},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2))
    print("\nratios (time: median over rounds):")
    for group, values in ratios.items():
        print("  " + group + ": " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    print(f"target QAPEX/QLoRA peak memory <= {TARGET} (activation checkpointing on): "
          f"{'met' if met else 'NOT met'} ({ratios['peak_memory_checkpointing_on']['qapex_over_qlora']:.3f}); "
          f"wrote {RESULTS.relative_to(REPO)}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.steps, args.rank, args.checkpointing == "on")))
    else:
        run(args.dtype, args.steps, args.rounds)


if __name__ == "__main__":
    main()
