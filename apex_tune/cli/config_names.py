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
