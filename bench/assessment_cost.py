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
then three no-grad forwards of one batch with the hooks recording, on the model as the
recipe assesses it (``cost.assessed_model``: freshly wrapped, before stage 1):

- the assessment batch through :func:`apex_tune.training.assessment.score_units` (the
  recipe's and ``apex-tune assess``'s path: the wrappers run as their base linears,
  :func:`~apex_tune.modules.model.bypass_unchanged_wrappers`, and the forward stops
  once the last hook has recorded);
- ``stop_only``: the same without the bypass (the wrappers' own paths), as it ran before;
- ``whole``: without the bypass and without the stop;

and the check that finds the unchanged wrappers (one read of the APEX parameters), which
``score_units`` makes once per assessment pass, not per batch: it is timed apart
(``check_over_step``) and left out of the per-batch times.

Ratios are medians over rounds of the ratio within a round.
The fraction of a Tulu-v2 epoch is the assessment batch / step ratio times 12,288 / 326,154
(the reference's proportions; an assessment batch and a training batch hold as many examples).
Writes bench/results/assessment_cost.json.
"""

import argparse
import contextlib
import os
import statistics
import time

import torch

from apex_tune import ActivationRanker, apply_apex
from apex_tune.modules.model import bypass_unchanged_wrappers
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
def forward_without_bypass(model, ranker, tokens, stop: bool, mask=None) -> None:
    """An assessment batch as it ran before :func:`bypass_unchanged_wrappers`: every wrapper
    runs its own path; with ``stop`` the forward ends once the last hook has recorded,
    without it runs whole (before ``stop_after_last_hook`` too). ``mask``: the tokens counted."""
    model.eval()
    ranker.begin_microbatch(mask)
    with ranker.stop_after_last_hook() if stop else contextlib.nullcontext():
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
    method = cost.Method(model, ranker, assessed=cost.assessed_model(state, settings, dtype, "cpu"))
    fresh = cost.base_model(dtype, "cpu", state)  # as the assessed model, without the bypass
    apply_apex(fresh, settings)
    fresh_ranker = ActivationRanker(fresh, settings).attach()
    tokens, labels = cost.random_batches(1, "cpu")[0]
    method.step(tokens, labels)  # warm-up (creates the optimizer state)
    times = {key: [] for key in ("step", "hooks", "assess", "stop_only", "whole", "check")}

    def check():  # what score_units adds once per assessment pass: finding the unchanged wrappers
        with bypass_unchanged_wrappers(fresh):
            pass

    for _ in range(rounds):
        ranker.seconds = 0.0
        start = cost.CLOCK()
        method.step(tokens, labels)
        times["step"].append(cost.CLOCK() - start)
        times["hooks"].append(ranker.seconds / times["step"][-1])
        for key, run in (("assess", lambda: method.assess(tokens)),
                         ("stop_only", lambda: forward_without_bypass(fresh, fresh_ranker, tokens, stop=True)),
                         ("whole", lambda: forward_without_bypass(fresh, fresh_ranker, tokens, stop=False)),
                         ("check", check)):
            start = cost.CLOCK()
            run()
            times[key].append(cost.CLOCK() - start)

    def over_step(key):
        return statistics.median(t / s for t, s in zip(times[key], times["step"]))

    ratio = over_step("assess")
    return dict(
        step_s=statistics.median(times["step"]),
        hooks_fraction_of_step=statistics.median(times["hooks"]),
        assess_batch_over_step=ratio,
        stop_only_over_step=over_step("stop_only"),
        whole_forward_over_step=over_step("whole"),
        check_over_step=over_step("check"),
        assess_s=statistics.median(times["assess"]),
        stop_only_s=statistics.median(times["stop_only"]),
        whole_forward_s=statistics.median(times["whole"]),
        assessment_fraction_of_epoch=ratio * cost.ASSESS_EXAMPLES / cost.TULU_V2_EXAMPLES,
    )


def at_real_depth(two: dict, four: dict, layers_two: int, layers_four: int) -> dict:
    """The ratios of a ``REAL_LAYERS``-layer model from two depths: each time (the step, an
    assessment batch, the forwards without the bypass) is a + b * layers, a line through
    the two depths (the embedding, and the final norm, output head and loss where they
    run, cost the same at every depth; the layers cost the same each)."""

    def line(key):
        per_layer = (four[key] - two[key]) / (layers_four - layers_two)
        return two[key] + per_layer * (REAL_LAYERS - layers_two)

    step, assess = line("step_s"), line("assess_s")
    return dict(
        layers=REAL_LAYERS,
        assess_batch_over_step=assess / step,
        stop_only_over_step=line("stop_only_s") / step,
        whole_forward_over_step=line("whole_forward_s") / step,
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
                f"{row['assess_batch_over_step']:.3f} steps (without the bypass {row['stop_only_over_step']:.3f}, "
                f"whole forward {row['whole_forward_over_step']:.3f}); "
                f"{100 * row['assessment_fraction_of_epoch']:.2f}% of a Tulu-v2 epoch")
        if {"vocab", "vocab_4_layers"} <= set(results[dname]):
            two, four = results[dname]["vocab"], results[dname]["vocab_4_layers"]
            real = at_real_depth(two, four, two["num_layers"], four["num_layers"])
            results[dname]["real_depth"] = real
            log(f"{dname} at {REAL_LAYERS} layers, real vocabulary: assessment batch "
                f"{real['assess_batch_over_step']:.3f} steps (without the bypass {real['stop_only_over_step']:.3f}, "
                f"whole forward {real['whole_forward_over_step']:.3f}); "
                f"{100 * real['assessment_fraction_of_epoch']:.2f}% of a Tulu-v2 epoch")
    path = write_json(args.output, dict(
        shapes=SHAPES, batch=[cost.BATCH, cost.SEQ], settings={k: v.to_dict() for k, v in SETTINGS.items()},
        threads=threads, clock="process_time", freed_memory_cached=cached, rounds=args.rounds,
        load_average_1min_at_end=os.getloadavg()[0], results=results,
    ))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
