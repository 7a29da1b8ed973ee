"""``make demo``: APEX end to end on a tiny model, offline, on CPU, in a few minutes.

1. Generates an arithmetic word-problem set, trains a sentencepiece tokenizer and
   pre-trains a tiny Llama-3-style (GQA) base on addition and subtraction only.
2. Runs ``tune run apex_finetune --config dev/tiny_apex`` on all three operations
   (multiplication is new to the base) for several stages.
3. Prints held-out answer loss before and after, the selection per stage, and
   where the fused HF checkpoint and the plot are; writes ``apex_demo.png``.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import torch

from apex_tune.dev.tiny import make_tiny_assets, tiny_llama3

CONFIG = "dev/tiny_apex"


def answer_loss(checkpoint_dir: Path, assets: Path) -> float:
    """Mean cross-entropy on the answer tokens of the held-out set."""
    from torchtune import training
    from torchtune.data import padded_collate_sft
    from torchtune.datasets import instruct_dataset
    from torchtune.models.llama2 import llama2_tokenizer

    files = sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))
    ckpt = training.FullModelHFCheckpointer(
        checkpoint_dir=str(checkpoint_dir),
        checkpoint_files=files,
        model_type="LLAMA3",
        output_dir=str(checkpoint_dir.parent / f".eval_{checkpoint_dir.name}"),
    )
    model = tiny_llama3()
    model.load_state_dict(ckpt.load_checkpoint()[training.MODEL_KEY])
    model.eval()
    tokenizer = llama2_tokenizer(str(assets / "tokenizer.model"), max_seq_len=256)
    data = instruct_dataset(
        tokenizer,
        source="json",
        data_files=str(assets / "val.jsonl"),
        column_map={"input": "question", "output": "answer"},
        train_on_input=False,
        split="train",
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), 32):
            batch = padded_collate_sft([data[i] for i in range(start, min(start + 32, len(data)))])
            logits = model(batch["tokens"])[:, :-1]
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            total += loss.item()
            count += int((labels != -100).sum())
    return total / count


def read_losses(log_dir: Path) -> List[float]:
    steps = {}
    for log_file in log_dir.glob("log_*.txt"):
        for line in log_file.read_text().splitlines():
            m = re.match(r"Step (\d+) \| .*loss:([-\d.e+]+)", line)
            if m:
                steps[int(m.group(1))] = float(m.group(2))
    return [steps[k] for k in sorted(steps)]


def plot(run_dir: Path, losses: List[float], selection_log: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = selection_log[0]
    layers = len(first["layers"])
    fig, axes = plt.subplots(layers + 2, 2, figsize=(12, 3 * (layers + 2)))
    for i in range(layers):
        for j, kind in enumerate(("heads", "channels")):
            ax = axes[i][j]
            norms = first["scores"][kind][i]["mean_norm"]
            sel = first["layers"][i][kind]
            colors = ["#bbbbbb"] * len(norms)
            for u in sel["E"]:
                colors[u] = "#f2c14e"
            for u in sel["P"]:
                colors[u] = "#2a9d8f"
            for u in sel["N"]:
                colors[u] = "#e76f51"
            ax.bar(range(len(norms)), norms, color=colors, width=0.9)
            if len(norms) <= 16:
                ax.set_xticks(range(len(norms)))
            unit = "KV group" if kind == "heads" else "channel"
            ax.set_title(f"layer {i} {kind}: mean activation norm per {unit} (assessment)")
            ax.set_xlabel(f"{unit} (green P = advantageous, red N = disadvantageous)")
    ax = axes[layers][0]
    ax.plot(range(1, len(losses) + 1), losses, color="#264653")
    for entry in selection_log[1:]:
        ax.axvline(entry["step"] + 0.5, color="#e76f51", linestyle="--")
    ax.set_title("training loss (dashed: stage boundaries = fuse + re-select)")
    ax.set_xlabel("optimizer step")
    ax = axes[layers][1]
    changed = []
    for prev, cur in zip(selection_log, selection_log[1:]):
        same = sum(
            len(set(p[k]["P"]) & set(c[k]["P"])) for p, c in zip(prev["layers"], cur["layers"]) for k in ("heads", "channels")
        )
        total = sum(len(c[k]["P"]) for c in cur["layers"] for k in ("heads", "channels"))
        changed.append(1 - same / total)
    ax.bar([f"{e['stage'] - 1}->{e['stage']}" for e in selection_log[1:]], changed, color="#2a9d8f")
    ax.set_ylim(0, 1)
    ax.set_title("share of P units that changed at each boundary")
    ranked = [e for e in selection_log if "effective_rank" in e]
    for j, (kind, names) in enumerate((("heads", ("v_proj", "output_proj", "q_proj", "k_proj")), ("channels", ("w1", "w3", "w2")))):
        ax = axes[layers + 1][j]
        for name in names:
            values = [
                sum(layer[name] for layer in e["effective_rank"] if name in layer) / len(e["effective_rank"])
                for e in ranked
                if any(name in layer for layer in e["effective_rank"])
            ]
            if values:
                ax.plot([e["stage"] for e in ranked][: len(values)], values, marker="o", label=name)
        ax.set_xlabel("stage")
        ax.set_xticks([e["stage"] for e in ranked])
        ax.set_title(f"{kind}: effective rank of the stage's W' - W (layer mean)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"))
    parser.add_argument("--pretrain-steps", type=int, default=250)
    parser.add_argument("--stages", type=int, default=3)
    args = parser.parse_args()
    start = time.time()
    out = args.output_dir.resolve()
    assets, run_dir = out / "assets", out / "run"
    if not (assets / "base" / "config.json").exists():
        make_tiny_assets(assets, num_train=2000, num_val=200, pretrain_steps=args.pretrain_steps)
    tune = str(Path(sys.executable).with_name("tune"))
    cmd = [
        tune, "run", "apex_finetune", "--config", CONFIG,
        f"assets_dir={assets}", f"output_dir={run_dir}",
        f"epochs={args.stages}", f"apex.num_stages={args.stages}", "max_steps_per_epoch=40",
        "apex.assess_samples=256", "optimizer.lr=5e-3",
    ]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)

    final = run_dir / f"stage_{args.stages}"
    before, after = answer_loss(assets / "base", assets), answer_loss(final, assets)
    selection_log = json.loads((run_dir / "apex_selection.json").read_text())
    losses = read_losses(run_dir / "logs")
    png = out / "apex_demo.png"
    plot(run_dir, losses, selection_log, png)

    print("\n=== APEX demo summary ===")
    print(f"held-out answer loss: before {before:.4f}  after {after:.4f}  ({100 * (after - before) / before:+.1f}%)")
    for entry in selection_log:
        ranks = entry.get("effective_rank")
        if ranks:
            mean = {name: sum(layer[name] for layer in ranks) / len(ranks) for name in ranks[0]}
            print(f"stage {entry['stage']} effective rank of W' - W (mean over layers): "
                  + ", ".join(f"{name} {value:.1f}" for name, value in mean.items()))
        layer0 = entry["layers"][0]
        print(
            f"stage {entry['stage']} (from step {entry['step']}): layer 0 heads P={layer0['heads']['P']} "
            f"N={layer0['heads']['N']}; channels P={layer0['channels']['P'][:6]}... "
            f"N={layer0['channels']['N'][:6]}..."
        )
    print(f"selections per stage and layer: {run_dir / 'apex_selection.json'}")
    print(f"fused HF-format checkpoint:      {final}")
    print(f"plot (scores with P/N, loss):     {png}")
    print(f"took {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
