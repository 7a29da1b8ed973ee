"""QAPEX cost against the number of stages (``python -m bench.qapex_stages``).

Over an NF4 base (``apex.quantize_base``) the base is never rewritten, so the
stages already finished are kept in high precision: as frozen operator stages
without the delta, as one merged correction per wrapper with it (see
apex_tune/modules/nf4.py). This trains stage T = 1..4 of a Llama-3-shaped model
(random weights, fp32, batch 2 x 256) after T - 1 finished stages and reports,
per T: the median forward + backward time (interleaved with the T = 1 model,
as a ratio to it), the bytes of the finished-stage state, and the bytes autograd
saves for backward in one step. Writes bench/results/qapex_stages.json.
"""

import statistics
import time

import torch
from torchtune.models.llama3 import llama3

from apex_tune import ApexSettings, apply_apex, fold_apex_, random_selection, set_apex_trainable, set_selection
from apex_tune.modules.geometry import param_kind
from apex_tune.training.memory_plan import saved_bytes_of_forward
from bench.common import log, setup_torch, write_json

# NF4 needs every projection to hold a multiple of 64 * 256 elements.
MODEL = dict(vocab_size=1024, num_layers=2, num_heads=16, num_kv_heads=4, embed_dim=1024,
             intermediate_dim=2816, max_seq_len=256)
TOKENS = (2, 256)
STAGES = (1, 2, 3, 4)
REPEATS = 7
CASES = {
    "operators only": ApexSettings(ratio=0.1875, quantize_base=True),
    "delta": ApexSettings(ratio=0.1875, delta=True, tuned_ratio_heads=0.5, tuned_ratio_channels=0.5,
                          quantize_base=True),
}


@torch.no_grad()
def _train_like(model: torch.nn.Module, seed: int) -> None:
    """Move the live APEX parameters off their init, as a stage of training would."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.requires_grad:
            noise = torch.randn(param.shape, generator=gen) * 0.05
            param.add_(noise)


def _model_at_stage(settings: ApexSettings, stage: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = apply_apex(llama3(**MODEL), settings)
    set_apex_trainable(model, settings)
    for finished in range(stage - 1):
        set_selection(model, random_selection(model, torch.Generator().manual_seed(finished)))
        _train_like(model, finished)
        fold_apex_(model, seed=finished)
    set_selection(model, random_selection(model, torch.Generator().manual_seed(stage)))
    _train_like(model, stage)
    return model


def _step(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    model(tokens).logsumexp(-1).mean().backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    setup_torch()
    tokens = torch.randint(0, MODEL["vocab_size"], TOKENS, generator=torch.Generator().manual_seed(0))
    results = {}
    for case, settings in CASES.items():
        first = _model_at_stage(settings, 1)
        rows = {}
        for stage in STAGES:
            model = _model_at_stage(settings, stage)
            _step(first, tokens), _step(model, tokens)  # warm-up
            pairs = [(_step(first, tokens), _step(model, tokens)) for _ in range(REPEATS)]
            history = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                          if param_kind(n) == "history")
            rows[stage] = {
                "step_ms": 1e3 * statistics.median(t for _, t in pairs),
                "step_vs_stage_1": statistics.median(t / f for f, t in pairs),
                "finished_stage_bytes": history,
                "saved_activation_bytes": saved_bytes_of_forward(model, tokens),
            }
            log(f"{case:15s} T={stage}: step {rows[stage]['step_vs_stage_1']:.2f}x stage 1 "
                f"({rows[stage]['step_ms']:.0f} ms), finished stages {history / 2**20:.1f} MiB, "
                f"saved activations {rows[stage]['saved_activation_bytes'] / 2**20:.1f} MiB")
        results[case] = rows
    path = write_json("qapex_stages.json", {"model": MODEL, "tokens": TOKENS, "dtype": "float32",
                                             "threads": torch.get_num_threads(), "results": results})
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
