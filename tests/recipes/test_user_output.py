"""What a user sees: no torchao import noise, printed paths that exist, one-line
errors said once, and a benchmark that fails loudly without its data."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from apex_tune._torchao_log import SILENCED_PREFIX, SkipCppExtensionsFilter
from apex_tune.dev.tiny import make_tiny_assets

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_torchao_cpp_extensions_line_silenced():
    proc = subprocess.run(
        [sys.executable, "-c", "import apex_tune, torchtune, torchao"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert SILENCED_PREFIX not in proc.stdout + proc.stderr


def test_torchao_filter_lets_other_messages_through():
    def record(message):
        return logging.LogRecord("torchao", logging.WARNING, __file__, 1, message, None, None)

    keep = SkipCppExtensionsFilter()
    assert not keep.filter(record(SILENCED_PREFIX + " due to incompatible torch version"))
    assert keep.filter(record("Skipping something else"))
    assert keep.filter(record("any other torchao warning"))
    assert any(isinstance(f, SkipCppExtensionsFilter) for f in logging.getLogger("torchao").filters)


def test_bench_fails_loudly_without_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from bench.common import require_data; require_data()"],
        cwd=REPO, env={**os.environ, "APEX_BENCH_DATA": str(tmp_path)}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert f"bench: error: benchmark data not found in {tmp_path}" in proc.stderr
    assert "APEX_BENCH_DATA" in proc.stderr


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_assets_output")
    make_tiny_assets(root, num_train=400, num_val=50, seed=0)
    return root


@pytest.mark.slow
def test_printed_paths_exist(assets, tmp_path):
    """Run the recipe module as `tune run` does in one process (runpy), without the
    `tune` CLI itself, which imports torchao before any apex_tune code can filter it."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "apex_finetune", "--config", "dev/tiny_apex", f"assets_dir={assets}", f"output_dir={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert SILENCED_PREFIX not in text
    printed = set(re.findall(re.escape(str(out)) + r"[^\s'\",:)]*", text))
    assert {str(out / "stage_1"), str(out / "stage_2")} <= {p.rstrip("/.") for p in printed}
    missing = [p for p in printed if not Path(p.rstrip(".")).exists()]
    assert not missing, missing
    assert "epoch_" not in text and "Saving final epoch checkpoint" not in text


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_config_error_said_once(assets, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [BIN / "tune", "run", "--nproc_per_node", "2", "apex_finetune", "--config", "dev/tiny_apex",
         f"assets_dir={assets}", f"output_dir={out}", "apex.ratio=0.9"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("apex_finetune: config error: apex.ratio") == 1, proc.stderr[-3000:]
