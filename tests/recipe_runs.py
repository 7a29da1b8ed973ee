"""Helpers shared by the tests that run ``tune run apex_finetune`` in subprocesses."""

import os
import re
import subprocess
import sys
from pathlib import Path

from torchtune import training

from apex_tune.dev.tiny import tiny_llama3

TUNE = str(Path(sys.executable).with_name("tune"))
CONFIG = "dev/tiny_apex"


def tune_run(assets, output_dir, *overrides, nproc=1, env=None, config=CONFIG, check=True):
    """Run the recipe from a directory that is not the repo (as a user would)."""
    launcher = [TUNE, "run"] + (["--nproc_per_node", str(nproc)] if nproc > 1 else [])
    cmd = launcher + ["apex_finetune", "--config", config, f"assets_dir={assets}", f"output_dir={output_dir}"]
    cmd += list(overrides)
    proc = subprocess.run(
        cmd,
        cwd=output_dir.parent,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def losses(output_dir):
    """Per-step losses from torchtune's DiskLogger file."""
    (log_file,) = (output_dir / "logs").glob("log_*.txt")
    found = {}
    for line in log_file.read_text().splitlines():
        m = re.match(r"Step (\d+) \| .*loss:([-\d.e+naninf]+)", line)
        if m:
            found[int(m.group(1))] = float(m.group(2))
    return [found[k] for k in sorted(found)]


def hf_weights(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def load_plain(folder):
    """The saved folder through torchtune's HF checkpointer into the plain tiny model."""
    ckpt = training.FullModelHFCheckpointer(
        checkpoint_dir=str(folder),
        checkpoint_files=["model-00001-of-00001.safetensors"],
        model_type="LLAMA3",
        output_dir=str(Path(folder).parent / "reload_out"),
    )
    model = tiny_llama3()
    model.load_state_dict(ckpt.load_checkpoint()[training.MODEL_KEY], strict=True)
    return model.eval()
