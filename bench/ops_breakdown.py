"""Where APEX operators-only training time goes, at ``bench/cost.py``'s shapes.

    python -m bench.ops_breakdown --dtype bf16 --rounds 7    # about 3 minutes here

One process builds the frozen floor and ``apex_ops`` exactly as ``bench/cost.py`` does
(Llama-3.2-1B layer shapes, 2 layers, activation-ranked units, rankers attached), then
times a training step of ``apex_ops`` with parts of the wrappers switched off in turn,
each against a floor step in the same round (CPU time, one thread; a ratio is the median
of the per-round ratios). Differences between consecutive variants attribute the
overhead to the ranking hooks, ``mix``/``mix_transposed`` (Monarch, scales and their
joins), the write-back of the tuned entries (``_replaced``: scattered units only, i.e. the
heads, or everything with ``contiguous_channels`` off) and the rest of the wrapper (the
gathers or slice matmuls, the stage loop; the last variant runs each wrapper as a plain
frozen linear). A switched-off part is replaced by one elementwise pass that keeps the
autograd graph, so each share is a slight underestimate. Timing only: the variants compute
something else. It patches the wrappers' internals (``mix``, ``mix_transposed``,
``_replaced``, ``_replaced_in_place``, ``forward`` of both wrapper classes) as they are
named in ``apex_tune/modules/expansion.py``.
"""

import argparse
import statistics
import time

import torch

import apex_tune.modules.expansion as expansion
from bench import cost

VARIANTS = [
    "apex_ops as is",
    "no ranking hooks",
    "no hooks, mix = identity",
    "no hooks, no mix, no write-back",
    "no hooks, wrappers = frozen linear",
]


def build(dtype):
    device = torch.device("cpu")
    batches = cost.random_batches(cost.ASSESS_BATCHES + 1, device)
    torch.manual_seed(0)
    base = cost.base_model(dtype, device)
    state = {k: v.detach() for k, v in base.state_dict().items()}
    floor = cost.Method(cost.frozen_floor(cost.base_model(dtype, device, state)))
    model, ranker = cost.apex_model(state, cost.APEX_OPS, dtype, device, batches[:-1])
    apex = cost.Method(model, ranker)
    for method in (floor, apex):
        cost.backward_through_every_layer(method.model)
        method.model.train()
    return floor, apex, batches[-1]


class Switches:
    """Sets the module-level functions and wrapper methods for one variant."""

    def __init__(self, ranker):
        self.ranker = ranker
        self.originals = dict(
            mix=expansion.mix, mix_transposed=expansion.mix_transposed, replaced=expansion._replaced,
            replaced_in_place=expansion._replaced_in_place,
            column=expansion.ApexColumnLinear.__dict__["forward"], row=expansion.ApexRowLinear.__dict__["forward"],
        )

    def set(self, variant: str) -> None:
        o = self.originals
        expansion.mix, expansion.mix_transposed, expansion._replaced = o["mix"], o["mix_transposed"], o["replaced"]
        expansion._replaced_in_place = o["replaced_in_place"]
        expansion.ApexColumnLinear.forward, expansion.ApexRowLinear.forward = o["column"], o["row"]
        if not self.ranker.attached:
            self.ranker.attach()
        if variant == "apex_ops as is":
            return
        self.ranker.detach()
        if variant in ("no hooks, mix = identity", "no hooks, no mix, no write-back"):
            expansion.mix = lambda t, ops, b=None, group=1: t * 1
            expansion.mix_transposed = lambda t, ops, group=1: t * 1
        if variant == "no hooks, no mix, no write-back":
            expansion._replaced = lambda t, positions, values: t + values.sum() * 0
            expansion._replaced_in_place = expansion._replaced
        if variant == "no hooks, wrappers = frozen linear":
            frozen = lambda self, x: torch.nn.functional.linear(x, self.weight, self.bias)
            expansion.ApexColumnLinear.forward = expansion.ApexRowLinear.forward = frozen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(cost.DTYPES), default="bf16")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    cost.cache_freed_memory()
    torch.set_num_threads(1)
    floor, apex, (tokens, labels) = build(cost.DTYPES[args.dtype])
    switches = Switches(apex.ranker)
    for variant in VARIANTS:  # warm-up
        switches.set(variant)
        apex.step(tokens, labels)
    floor.step(tokens, labels)
    ratios = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            switches.set(variant)
            start = time.process_time()
            floor.step(tokens, labels)
            floor_s = time.process_time() - start
            start = time.process_time()
            apex.step(tokens, labels)
            ratios[variant].append((time.process_time() - start) / floor_s)
    switches.set("apex_ops as is")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"{args.dtype}, {args.rounds} rounds, load average {' '.join(load)}: apex_ops step / frozen floor step")
    previous = None
    for variant in VARIANTS:
        value = statistics.median(ratios[variant])
        share = "" if previous is None else f"  (part switched off: {previous - value:+.3f})"
        print(f"  {variant:36s} {value:.3f}{share}")
        previous = value


if __name__ == "__main__":
    main()
