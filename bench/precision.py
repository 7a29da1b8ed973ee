"""How far each kind of APEX parameter moves in a bf16 run, and how a bf16 run tracks fp32.

    python -m bench.precision [--lr 1e-2 2e-5]

Runs ``tune run apex_finetune --config dev/tiny_apex`` (with the delta: tuned ratios
0.5) in fp32 and in bf16 at each learning rate, on assets from ``apex_tune.dev.tiny``:

- movement: the run saves its resume state every 4 steps and is stopped after step 5
  (``APEX_TUNE_KILL_AT=step:5``, before stage 1's fold), so the state holds the APEX
  parameters after 4 optimizer steps: max |a - 1|, |b - 1|, |L1 - L1 at init|, |L2|,
  |delta|, the share of entries that moved, and the relative difference of the
  movement from the fp32 run's, ||bf16 - fp32|| / ||fp32||, over the layers whose
  selection is the same in both runs (the assessment runs in the run's dtype, so
  near-tied scores can pick other units in bf16; their parameters act on other units);
- whole runs (10 steps, 2 stages): the largest per-step loss difference and the
  relative difference of the fused stage-2 weights, ||W_bf16 - W_fp32|| / ||W_fp32||,
  next to the fp32 update's size ||W_fp32 - W_base|| / ||W_fp32||.

Writes bench/results/precision.json.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from apex_tune.dev.tiny import make_tiny_assets
from apex_tune.training.checkpointing import load_rank_state, read_state_manifest
from bench.common import write_json

TUNE = str(Path(sys.executable).with_name("tune"))
OVERRIDES = ["apex.delta=True", "apex.tuned_ratio_heads=0.5", "apex.tuned_ratio_channels=0.5"]
KINDS = ("a", "b", "L1", "L2", "delta")


def tune_run(assets: Path, out: Path, *overrides: str, kill_at: str = "") -> None:
    cmd = [TUNE, "run", "apex_finetune", "--config", "dev/tiny_apex", f"assets_dir={assets}", f"output_dir={out}",
           *OVERRIDES, *overrides]
    env = {**os.environ, "APEX_TUNE_KILL_AT": kill_at} if kill_at else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 and not kill_at:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def apex_params(out: Path) -> dict:
    """The APEX parameters of the run's last resume state (one process: rank 0's shards are
    the whole tensors), by their names in the model."""
    manifest = read_state_manifest(out)
    assert manifest["global_step"] == 4, manifest
    tensors = load_rank_state(out, manifest, rank=0)["tensors"]
    prefix = "model."
    return {k[len(prefix):]: v.float() for k, v in tensors.items()
            if k.startswith(prefix) and k.rsplit(".", 1)[-1] in KINDS}


def initial_l1() -> dict:
    """L1 at the start of stage 1, drawn as the recipe draws it (init_apex_ with the run's seed;
    independent of the base weights)."""
    from omegaconf import OmegaConf
    from torchtune import config

    from apex_tune import apply_apex, init_apex_, parse_apex_config

    cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "configs" / "dev" / "tiny_apex.yaml")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(OVERRIDES))
    settings, _ = parse_apex_config(cfg.apex)
    model = config.instantiate(cfg.model)
    apply_apex(model, settings)
    init_apex_(model, torch.device("cpu"), seed=cfg.seed)
    return {k: v.detach().float() for k, v in model.state_dict().items() if k.endswith(".L1")}


def differing_selections(a: Path, b: Path) -> set:
    """(layer, "attn"/"mlp") whose stage-1 units differ between two runs."""
    first = [json.loads((out / "apex_selection.json").read_text())[0]["layers"] for out in (a, b)]
    return {(i, owner) for i, (la, lb) in enumerate(zip(*first))
            for owner, kind in (("attn", "heads"), ("mlp", "channels")) if la[kind] != lb[kind]}


def movement(params: dict, l1_init: dict, skip: set) -> dict:
    """Per kind, every entry's movement from its init, over the layers not in ``skip``."""
    start = {"a": 1.0, "b": 1.0, "L2": 0.0, "delta": 0.0}
    out = {}
    for kind in KINDS:
        names = sorted(k for k in params if k.rsplit(".", 1)[-1] == kind
                       and (int(k.split(".")[1]), k.split(".")[2]) not in skip)
        moved = torch.cat([(params[k] - (l1_init[k] if kind == "L1" else start[kind])).flatten() for k in names])
        out[kind] = moved
    return out


def losses(out: Path) -> list:
    (log_file,) = (out / "logs").glob("log_*.txt")
    return [float(m.group(1)) for line in log_file.read_text().splitlines()
            if (m := re.match(r"Step \d+ \| .*loss:([-\d.e+naninf]+)", line))]


def weights(folder: Path) -> dict:
    return {k: v.float() for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


def norm(tensors) -> float:
    return math.sqrt(sum(t.float().pow(2).sum().item() for t in tensors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", nargs="+", type=float, default=[1e-2, 2e-5])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tiny_assets(root / "assets", num_train=400, num_val=50, seed=0)
        base = weights(root / "assets" / "base")
        l1_init = initial_l1()
        for lr in args.lr:
            stopped, finals = {}, {}
            for dtype in ("fp32", "bf16"):
                stopped[dtype] = root / f"stopped_{dtype}_{lr}"
                tune_run(root / "assets", stopped[dtype], f"dtype={dtype}", f"optimizer.lr={lr}",
                         "save_every_n_steps=4", kill_at="step:5")
                finals[dtype] = root / f"whole_{dtype}_{lr}"
                tune_run(root / "assets", finals[dtype], f"dtype={dtype}", f"optimizer.lr={lr}")
            skip = differing_selections(stopped["fp32"], stopped["bf16"])
            moved = {dtype: movement(apex_params(out), l1_init, skip) for dtype, out in stopped.items()}
            row = {"stage_1_selection_differs": sorted(f"layers.{i}.{owner}" for i, owner in skip),
                   "movement_after_4_steps": {}}
            for kind in KINDS:
                bf16, fp32 = moved["bf16"][kind], moved["fp32"][kind]
                row["movement_after_4_steps"][kind] = {
                    "bf16_max_abs": bf16.abs().max().item(),
                    "fp32_max_abs": fp32.abs().max().item(),
                    "bf16_share_moved": (bf16 != 0).float().mean().item(),
                    "bf16_vs_fp32_relative": ((bf16 - fp32).norm() / fp32.norm()).item(),
                }
            loss32, loss16 = losses(finals["fp32"]), losses(finals["bf16"])
            w32, w16 = weights(finals["fp32"] / "stage_2"), weights(finals["bf16"] / "stage_2")
            row["whole_run"] = {
                "final_loss_fp32": loss32[-1],
                "final_loss_bf16": loss16[-1],
                "max_step_loss_difference": max(abs(a - b) for a, b in zip(loss32, loss16)),
                "fused_weights_relative_difference": norm(w16[k] - w32[k] for k in w32) / norm(w32.values()),
                "fp32_update_relative": norm(w32[k] - base[k] for k in w32) / norm(w32.values()),
                "bf16_rounding_unit": 2.0**-9,
            }
            results[f"lr={lr:g}"] = row
            print(f"lr {lr:g}: movement after 4 optimizer steps (bf16 run; share of entries moved; "
                  "||bf16 - fp32|| / ||fp32|| of the movement), without "
                  f"{row['stage_1_selection_differs'] or 'nothing'} (bf16 assessment selected other units)")
            for kind, m in row["movement_after_4_steps"].items():
                print(f"  {kind:<6} max |moved| {m['bf16_max_abs']:.3e} (fp32 {m['fp32_max_abs']:.3e})  "
                      f"moved {100 * m['bf16_share_moved']:.1f}%  vs fp32 {m['bf16_vs_fp32_relative']:.3f}")
            w = row["whole_run"]
            print(f"  whole run: final loss fp32 {w['final_loss_fp32']:.4f} bf16 {w['final_loss_bf16']:.4f}, "
                  f"largest per-step difference {w['max_step_loss_difference']:.1e}; fused weights differ by "
                  f"{w['fused_weights_relative_difference']:.2e} relative (the fp32 update is "
                  f"{w['fp32_update_relative']:.2e}, bf16 rounding 2^-9 = {2.0**-9:.2e})")
    path = write_json("precision.json", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
