"""The bf16 delta wrappers' rounded sum, round_bf16(W_T + Delta), blocked against one-shot.

    python -m bench.rounded_sum        # a few seconds

``_rounded_sum`` (apex_tune/modules/expansion.py) forms the fp32 sum in row blocks whose
temporary stays in cache; the one-shot form converts the whole slice to fp32 (a slice-sized
temporary), adds and converts back. Both are checked bit-identical; CPU time, one thread,
median of 15 (after one warm-up call), for tuned slices of a w1/w3 (4096 x 2048) and a w2
(2048 x 4096) at Llama-3.2-1B's shapes and the ~52% setting, with glibc's default
allocator and with bench/cost.py's ``mallopt``. The one-shot form's time depends on whether
the freed temporary is reused or handed back to the OS and page-faulted in again, which
varies from call to call and run to run; the blocked form's does not.
"""

import statistics
import time

import torch

from apex_tune.modules.expansion import _rounded_sum
from bench import cost


def _median_ms(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    for label in ("glibc's default allocator", "bench/cost.py's mallopt"):
        if label.startswith("bench"):
            cost.cache_freed_memory()
        print(label)
        _compare(gen)


def _compare(gen: torch.Generator) -> None:
    for rows, cols in [(4096, 2048), (2048, 4096), (4096, 2048)]:
        weight = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
        delta = 1e-3 * torch.randn(rows, cols, generator=gen)

        def blocked():
            return _rounded_sum(weight, delta)

        def one_shot():
            return weight.to(torch.float32, copy=True).add_(delta).to(torch.bfloat16)

        assert torch.equal(blocked(), one_shot())
        b, o = _median_ms(blocked), _median_ms(one_shot)
        print(f"  {rows} x {cols}: blocked {b:.1f} ms, one-shot {o:.1f} ms, {o / b:.1f}x (bit-identical)")


if __name__ == "__main__":
    main()
