"""Shipped config names (``llama2/7B_apex``) and their YAML files."""

import importlib.resources
from pathlib import Path
from typing import List


def _config_root() -> Path:
    return Path(str(importlib.resources.files("apex_tune._configs")))


def list_configs() -> List[str]:
    """Names of the shipped configs, e.g. ``llama3_2/1B_apex_cpt``."""
    root = _config_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_config(name_or_path: str) -> Path:
    """A shipped config name or a YAML path -> the YAML file.

    An existing file wins; otherwise the name must be a shipped config.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = _config_root() / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = "\n  ".join(list_configs())
    raise ValueError(
        f"config {name_or_path!r} is neither a file nor a shipped config name. "
        f"Shipped configs:\n  {names}\n(copy one with `apex-tune cp NAME my.yaml`)"
    )


def resolve_config_argument(argv: List[str]) -> List[str]:
    """``argv`` with the value of ``--config`` resolved: a shipped name (``llama2/7B_apex``)
    as well as a path (``tune run`` wants a path)."""
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config") + 1
        if i < len(argv):
            argv[i] = str(resolve_config(argv[i]))
    return argv


def load_config(name: str, overrides: List[str]):
    """A config with torchtune-style overrides: ``key=value`` sets, ``~key`` removes."""
    from omegaconf import OmegaConf

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
