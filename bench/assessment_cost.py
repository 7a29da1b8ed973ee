"""What activation ranking costs: the hooks during training and the assessment pass.

    python -m bench.assessment_cost                    # fp32 and bf16, all cases (~10 min on a busy 2-core CPU)
    python -m bench.assessment_cost --dtypes bf16 --cases bench

The APEX ~52% setting of ``bench.cost`` (same Llama-3.2-1B layer shapes, batch, units chosen
by the library's ranking, the ranker attached while training, the same CPU-time clock and
allocator cache), in three cases:

- ``bench``: ``bench.cost``'s model (2 layers, 2,048-token vocabulary); ``bench_apex_ops``
  the same with APEX operators only (the cheapest step, so the hooks' largest share);
- ``vocab``: the same with Llama-3.2-1B's real vocabulary (128,256 tokens, tied embeddings);
- ``vocab_4_layers``: that with 4 layers, so that a line through the two real-vocabulary
  cases gives the 16-layer model's ratios (the layers cost the same each; the embedding,
  final norm, output head and loss once; see ``at_real_depth``).

Per round, in turn: one training step (the seconds inside the ranking hooks added up),
one assessment batch through :func:`apex_tune.training.assessment.score_units` (the
recipe's and ``apex-tune assess``'s path: it stops once the last hook has recorded), and
one whole no-grad forward with the hooks recording (what an assessment batch cost before
that stop, for comparison). Ratios are medians over rounds of the ratio within a round.
The fraction of a Tulu-v2 epoch is the assessment batch / step ratio times 12,288 / 326,154
(the reference's proportions; an assessment batch and a training batch hold as many examples).
Writes bench/results/assessment_cost.json.
"""

import argparse
import os
import statistics
import time

import torch

from apex_tune.training.assessment import score_units
from bench import cost
from bench.common import log, setup_torch, write_json

CASES = {
    "bench": dict(vocab_size=cost.LLAMA_1B_SHAPES["vocab_size"], num_layers=cost.LAYERS),
    "bench_apex_ops": dict(vocab_size=cost.LLAMA_1B_SHAPES["vocab_size"], num_layers=cost.LAYERS, settings="apex_ops"),
    "vocab": dict(vocab_size=128_256, num_layers=cost.LAYERS),
    "vocab_4_layers": dict(vocab_size=128_256, num_layers=4),
}
SETTINGS = {"apex_52": cost.APEX_52, "apex_ops": cost.APEX_OPS}
REAL_LAYERS = 16  # Llama-3.2-1B
SHAPES = dict(cost.LLAMA_1B_SHAPES)


@torch.no_grad()
def whole_forward(model, ranker, tokens) -> None:
    """An assessment batch as it was before score_units stopped early: the whole forward."""
    model.eval()
    ranker.begin_microbatch(None)
    model(tokens)
    model.train()


def measure(dtype: torch.dtype, case: dict, rounds: int) -> dict:
    shapes = {k: v for k, v in case.items() if k != "settings"}
    cost.LLAMA_1B_SHAPES = {**SHAPES, **shapes}  # read by cost.base_model and random_batches
    torch.manual_seed(0)
    base = cost.base_model(dtype, "cpu")
    state = {k: v.detach() for k, v in base.state_dict().items()}
    del base
    settings = SETTINGS[case.get("settings", "apex_52")]
    model, ranker = cost.apex_model(state, settings, dtype, "cpu", cost.random_batches(2, "cpu", seed=1))
    cost.backward_through_every_layer(model)
    model.train()
    method = cost.Method(model, ranker)
    tokens, labels = cost.random_batches(1, "cpu")[0]
    method.step(tokens, labels)  # warm-up (creates the optimizer state)
    steps, hooks, assess, whole = [], [], [], []
    for _ in range(rounds):
        ranker.seconds = 0.0
        start = cost.CLOCK()
        method.step(tokens, labels)
        steps.append(cost.CLOCK() - start)
        hooks.append(ranker.seconds / steps[-1])
        start = cost.CLOCK()
        score_units(model, ranker, [({"tokens": tokens}, None)])
        assess.append(cost.CLOCK() - start)
        start = cost.CLOCK()
        whole_forward(model, ranker, tokens)
        whole.append(cost.CLOCK() - start)
    ratio = statistics.median(a / s for a, s in zip(assess, steps))
    return dict(
        step_s=statistics.median(steps),
        hooks_fraction_of_step=statistics.median(hooks),
        assess_batch_over_step=ratio,
        whole_forward_over_step=statistics.median(w / s for w, s in zip(whole, steps)),
        assess_s=statistics.median(assess),
        whole_forward_s=statistics.median(whole),
        assessment_fraction_of_epoch=ratio * cost.ASSESS_EXAMPLES / cost.TULU_V2_EXAMPLES,
    )


def at_real_depth(two: dict, four: dict, layers_two: int, layers_four: int) -> dict:
    """The ratios of a ``REAL_LAYERS``-layer model from two depths: the step and the whole
    forward are a + b * layers; the assessment batch is the whole forward less what it skips
    (the final norm and the output head: the same at every depth, so its mean over the two)."""

    def line(key):
        per_layer = (four[key] - two[key]) / (layers_four - layers_two)
        return two[key] + per_layer * (REAL_LAYERS - layers_two)

    step, whole = line("step_s"), line("whole_forward_s")
    skipped = statistics.mean(d["whole_forward_s"] - d["assess_s"] for d in (two, four))
    assess = whole - skipped
    return dict(
        layers=REAL_LAYERS,
        assess_batch_over_step=assess / step,
        whole_forward_over_step=whole / step,
        assessment_fraction_of_epoch=assess / step * cost.ASSESS_EXAMPLES / cost.TULU_V2_EXAMPLES,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=list(cost.DTYPES), choices=list(cost.DTYPES))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default="assessment_cost.json", help="file name under bench/results/")
    args = parser.parse_args()
    threads = setup_torch()
    cost.CLOCK = time.process_time
    cached = cost.cache_freed_memory()
    results = {}
    for dname in args.dtypes:
        results[dname] = {}
        for case in args.cases:
            row = measure(cost.DTYPES[dname], CASES[case], args.rounds)
            results[dname][case] = {**CASES[case], **row}
            log(f"{dname} {case}: hooks {100 * row['hooks_fraction_of_step']:.2f}% of a step; assessment batch "
                f"{row['assess_batch_over_step']:.3f} steps (whole forward {row['whole_forward_over_step']:.3f}); "
                f"{100 * row['assessment_fraction_of_epoch']:.2f}% of a Tulu-v2 epoch")
        if {"vocab", "vocab_4_layers"} <= set(results[dname]):
            two, four = results[dname]["vocab"], results[dname]["vocab_4_layers"]
            real = at_real_depth(two, four, two["num_layers"], four["num_layers"])
            results[dname]["real_depth"] = real
            log(f"{dname} at {REAL_LAYERS} layers, real vocabulary: assessment batch "
                f"{real['assess_batch_over_step']:.3f} steps (whole forward {real['whole_forward_over_step']:.3f}); "
                f"{100 * real['assessment_fraction_of_epoch']:.2f}% of a Tulu-v2 epoch")
    path = write_json(args.output, dict(
        shapes=SHAPES, batch=[cost.BATCH, cost.SEQ], settings={k: v.to_dict() for k, v in SETTINGS.items()},
        threads=threads, clock="process_time", freed_memory_cached=cached, rounds=args.rounds,
        load_average_1min_at_end=os.getloadavg()[0], results=results,
    ))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
