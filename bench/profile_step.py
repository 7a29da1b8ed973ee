"""Where one training step's time goes, by operator, for a method of ``bench/cost.py``.

    python -m bench.profile_step --method apex_52 --dtype bf16    # under a minute

Builds the method exactly as ``bench/cost.py`` does (Llama-3.2-1B layer shapes, 2 layers,
activation-ranked units, rankers attached), takes two warm-up steps, then profiles one step
with ``torch.profiler`` (CPU, one thread) and prints the operators by their own CPU time.
Profiling adds its own overhead; read the shares, not the absolute times.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench import cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=cost.METHODS, default="apex_52")
    parser.add_argument("--dtype", choices=sorted(cost.DTYPES), default="bf16")
    parser.add_argument("--rows", type=int, default=25, help="operators to print")
    args = parser.parse_args()
    cost.cache_freed_memory()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    batches = cost.random_batches(cost.ASSESS_BATCHES + 1, device)
    method = cost.build_methods(cost.DTYPES[args.dtype], device, batches[:-1], cost.budget_matched(), [args.method])[args.method]
    tokens, labels = batches[-1]
    for _ in range(2):
        method.step(tokens, labels)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        method.step(tokens, labels)
    print(f"{args.method}, {args.dtype}: one training step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
