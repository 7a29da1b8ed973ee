"""What a user sees: no torchao import noise, printed paths that exist, one-line
errors said once, and a benchmark that fails loudly without its data."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from apex_tune._torchao_log import SILENCED_PREFIX
from apex_tune.dev.tiny import make_tiny_assets

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_torchao_cpp_extensions_line_silenced():
    proc = subprocess.run(
        [sys.executable, "-c", "import apex_tune, torchtune, torchao"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert SILENCED_PREFIX not in proc.stdout + proc.stderr


def test_torchao_filter_lets_other_messages_through(caplog):
    logger = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING, logger="torchao"):
        logger.warning(SILENCED_PREFIX + " due to incompatible torch version 2.13.0+cpu for torchao version 0.15.0")
        logger.warning("Skipping something else")
        logger.warning("any other torchao warning")
    assert [r.getMessage() for r in caplog.records] == ["Skipping something else", "any other torchao warning"]


def test_tune_cli_does_not_print_torchao_line():
    """The `tune` CLI imports torchao before any apex_tune code runs; the start-up hook
    (apex_tune_quiet_torchao.pth in site-packages) silences the line there too."""
    assert (Path(sysconfig.get_paths()["purelib"]) / "apex_tune_quiet_torchao.pth").is_file()
    proc = subprocess.run([BIN / "tune", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Welcome to the torchtune CLI" in proc.stdout
    assert SILENCED_PREFIX not in proc.stdout + proc.stderr


def test_start_up_hook_keeps_other_torchao_messages_and_torch_unimported():
    """In a fresh interpreter that never imports apex_tune: the hook imports neither torch
    nor torchao at start, and after torchtune's import of torchao only the one line is gone."""
    code = (
        "import sys; early = [m for m in ('torch', 'torchao') if m in sys.modules]\n"
        "import torchtune, logging; logging.getLogger('torchao').warning('another torchao warning')\n"
        "print('imported at start:', early)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "imported at start: []" in proc.stdout
    assert "another torchao warning" in proc.stderr
    assert SILENCED_PREFIX not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["build_wheel", "build_editable", "build_sdist"])
def test_packages_install_the_start_up_hook(tmp_path, hook):
    """Both wheel kinds put the .pth at the root of site-packages, and the sdist carries it
    for the wheels built from it (built from a copy of the sources, so the checkout gets no
    build folders)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in"):
        shutil.copy(REPO / name, source / name)
    for folder in ("apex_tune", "recipes", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys; from setuptools import build_meta; print(build_meta.{hook}(sys.argv[1]))",
         str(tmp_path)],
        cwd=source, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = tmp_path / proc.stdout.split()[-1]
    if hook == "build_sdist":
        with tarfile.open(built) as sdist:
            assert f"{built.name[:-len('.tar.gz')]}/recipes/apex_tune_quiet_torchao.pth" in sdist.getnames()
        return
    wheel = built
    names = zipfile.ZipFile(wheel).namelist()
    assert "apex_tune_quiet_torchao.pth" in names
    pth = zipfile.ZipFile(wheel).read("apex_tune_quiet_torchao.pth").decode()
    assert pth == (REPO / "recipes" / "apex_tune_quiet_torchao.pth").read_text()
    if hook == "build_wheel":
        assert "apex_tune_quiet_torchao.py" in names


def test_bench_fails_loudly_without_data(tmp_path):
    """What `make bench` runs: every benchmark module imports, then it stops on the data."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_all"],
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


@pytest.fixture(scope="module")
def tiny_run(assets, tmp_path_factory):
    """One `tune run apex_finetune --config dev/tiny_apex` through the CLI, as a user runs it."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    proc = subprocess.run(
        [BIN / "tune", "run", "apex_finetune", "--config", "dev/tiny_apex", f"assets_dir={assets}", f"output_dir={out}"],
        cwd=out.parent, capture_output=True, text=True, timeout=600,
    )
    return out, proc


@pytest.mark.slow
def test_printed_paths_exist(tiny_run):
    out, proc = tiny_run
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert SILENCED_PREFIX not in text
    printed = set(re.findall(re.escape(str(out)) + r"[^\s'\",:)]*", text))
    assert {str(out / "stage_1"), str(out / "stage_2")} <= {p.rstrip("/.") for p in printed}
    missing = [p for p in printed if not Path(p.rstrip(".")).exists()]
    assert not missing, missing
    assert "epoch_" not in text and "Saving final epoch checkpoint" not in text


@pytest.mark.slow
def test_effective_rank_recorded_and_plotted(tiny_run, tmp_path):
    """Each stage's effective ranks land in apex_selection.json (per layer and projection)
    and the metric log (layer means), and `make demo`'s plot draws them."""
    out, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    selection_log = json.loads((out / "apex_selection.json").read_text())
    ranked = [entry for entry in selection_log if "effective_rank" in entry]
    assert [entry["stage"] for entry in ranked] == [1, 2]
    # dev/tiny_apex, operators only: the tuned slices (P and N units) are v_proj 16 x 64 (both
    # KV groups of head_dim 8), output_proj 64 x 64, w1/w3 88 x 64, w2 64 x 88; an effective
    # rank lies in [1, the slice's smaller side] (1 only for a rank-one change)
    smaller_side = {"v_proj": 16, "output_proj": 64, "w1": 64, "w3": 64, "w2": 64}
    for entry in ranked:
        for layer in entry["effective_rank"]:
            assert set(layer) == set(smaller_side)
            assert all(1.0 < value <= smaller_side[name] for name, value in layer.items()), layer
    logged = " ".join(p.read_text() for p in (out / "logs").glob("*.txt"))
    for name in ("v_proj", "output_proj", "w1", "w3", "w2"):
        assert len(re.findall(f"effective_rank_{name}:", logged)) == 2, name
    pytest.importorskip("matplotlib", reason="the demo's plot needs the dev extra's matplotlib")
    from apex_tune.dev.demo import plot, read_losses

    png = tmp_path / "apex_demo.png"
    plot(out, read_losses(out / "logs"), selection_log, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert (proc.stdout + proc.stderr).count("Running ApexFinetuneRecipe with resolved config") == 1
    # rank 0 exits first, so torchrun's report (which a worker cannot switch off, see README)
    # names it as the root cause and comes after the line
    report = proc.stderr[proc.stderr.index("apex_finetune: config error"):]
    root_cause = report[report.index("Root Cause"):]
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*\n\s*exitcode\s*: 1 ", root_cause), root_cause
