"""APEX components inside torchtune's own recipes: the builder's plain state dict
(identity on a base load, fold on save), the selection file of ``apex-tune assess``,
and torchtune's ``full_finetune_single_device`` / ``full_finetune_distributed``
recipes training one APEX stage into a plain HF checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apex_tune import ApexSettings, get_selection
from apex_tune.modules.selection import read_selection_file, write_selection_file
from apex_tune.models.builders import apex_model
from apex_tune.modules.expansion import unit_positions
from apex_tune.dev.tiny import make_tiny_assets

from conftest import build_tiny, perturb_apex, random_selection, rel_diff

BIN = Path(sys.executable).parent
SETTINGS = dict(ratio=0.25, delta=True, tuned_ratio_heads=0.5, tuned_ratio_channels=0.6)
# fp32 logits of a 2-layer model: the fold reorders a few sums, so agreement is to
# a few ulps of the logits' scale (eps 1.2e-7); 1e-5 leaves a margin of ~100x.
FOLD_TOLERANCE = 1e-5


def _selection_file(tmp_path, model_kind="llama3_gqa"):
    """A selection file for the tiny model with a random (valid) selection."""
    settings = ApexSettings(**SETTINGS)
    probe = apex_model(build_tiny(model_kind), **SETTINGS, plain_state_dict=False)
    selection = random_selection(probe, settings, seed=3)
    path = tmp_path / "selection.json"
    write_selection_file(path, selection, settings, scores={}, num_samples=0)
    return path, selection


def test_plain_state_dict_loads_base_and_saves_folded(tmp_path, tokens):
    path, selection = _selection_file(tmp_path)
    base = build_tiny("llama3_gqa")
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    reference = base(tokens)

    model = apex_model(build_tiny("llama3_gqa", seed=5), **SETTINGS, selection_file=str(path))
    model.load_state_dict(base_sd)  # strict, as torchtune's single-device recipe loads
    assert [s.to_dict() for s in get_selection(model)] == [s.to_dict() for s in selection]
    # identity: operators at M = 0, a = b = 1, delta = 0 compute the base exactly
    assert rel_diff(model(tokens), reference) <= 1e-6

    perturb_apex(model, seed=1)
    wrapped = model(tokens)
    live = {k: v.clone() for k, v in model.named_parameters()}
    saved = model.state_dict()
    assert list(saved) == list(base_sd) and all(saved[k].shape == base_sd[k].shape for k in base_sd)
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in live.items())  # not merged in place

    plain = build_tiny("llama3_gqa", seed=7)
    plain.load_state_dict(saved)
    assert rel_diff(plain(tokens), wrapped) <= FOLD_TOLERANCE
    assert rel_diff(plain(tokens), reference) > 1e-3  # the fold did change the weights


def test_plain_state_dict_on_meta_with_assign(tmp_path, tokens):
    """torchtune's distributed recipes build on the meta device and load with assign."""
    path, selection = _selection_file(tmp_path)
    base = build_tiny("llama3_gqa")
    with torch.device("meta"):
        model = apex_model(build_tiny_on_meta(), **SETTINGS, selection_file=str(path))
    assert set(model.state_dict()) == set(base.state_dict())  # APEX keys hidden on meta too
    model.load_state_dict(base.state_dict(), strict=True, assign=True)
    for m in model.modules():  # as torchtune's recipes do: RoPE caches are not in the state dict
        if hasattr(m, "rope_init"):
            m.rope_init()
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert [s.to_dict() for s in get_selection(model)] == [s.to_dict() for s in selection]
    assert rel_diff(model(tokens), base(tokens)) <= 1e-6
    assert any(p.requires_grad and p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("L1"))


def build_tiny_on_meta():
    from conftest import _build

    return _build("llama3_gqa")


def test_selection_file_errors(tmp_path):
    with pytest.raises(ValueError, match="selection_file: .* does not exist; write it with `apex-tune assess"):
        read_selection_file(tmp_path / "none.json", ApexSettings(**SETTINGS))
    path, _ = _selection_file(tmp_path)
    with pytest.raises(ValueError, match="assessed with other settings"):
        read_selection_file(path, ApexSettings(ratio=0.125))


# ------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_assets_tt")
    make_tiny_assets(root, num_train=400, num_val=50, seed=0)
    return root


def _assess_and_config(assets, run_dir):
    config = run_dir.parent / f"{run_dir.name}.yaml"
    subprocess.run([BIN / "apex-tune", "cp", "dev/tiny_full_finetune_apex", str(config)], check=True, capture_output=True)
    overrides = [f"assets_dir={assets}", f"output_dir={run_dir}"]
    proc = subprocess.run(
        [BIN / "apex-tune", "assess", "--config", str(config), "--samples", "64", *overrides],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    selection_file = run_dir / "apex_selection_assessed.json"
    assert f"wrote the APEX selection to {selection_file}" in proc.stdout
    return config, overrides, json.loads(selection_file.read_text())


def _check_plain_checkpoint(assets, folder, selection):
    """Same keys and shapes as the base; only the selected units' rows/columns changed."""
    base = load_file(assets / "base" / "model.safetensors")
    (shard,) = folder.glob("*.safetensors")
    out = load_file(shard)
    assert set(out) == set(base) and all(out[k].shape == base[k].shape for k in base)
    changed = 0
    for i, layer in enumerate(selection["layers"]):
        heads = torch.tensor(sorted(layer["heads"]["N"] + layer["heads"]["P"] + layer["heads"]["E"]))
        channels = torch.tensor(sorted(layer["channels"]["N"] + layer["channels"]["P"] + layer["channels"]["E"]))
        # tiny config: 8 heads over 2 KV groups of head_dim 8
        tuned = {
            "self_attn.v_proj": (0, unit_positions(heads, 1, 8)),
            "self_attn.o_proj": (1, unit_positions(heads, 4, 8)),
            "mlp.gate_proj": (0, channels),
            "mlp.up_proj": (0, channels),
            "mlp.down_proj": (1, channels),
        }
        for name, (dim, positions) in tuned.items():
            key = f"model.layers.{i}.{name}.weight"
            diff = (out[key] - base[key]).abs()
            untouched = torch.ones(diff.shape[dim], dtype=torch.bool)
            untouched[positions] = False
            assert diff.index_select(dim, untouched.nonzero().flatten()).sum() == 0, key
            changed += int(diff.max() > 0)
    assert changed == 5 * len(selection["layers"])
    others = [k for k in base if not any(p in k for p in ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))]
    assert all(torch.equal(out[k], base[k]) for k in others)


@pytest.mark.slow
def test_full_finetune_single_device_trains_one_stage(assets, tmp_path):
    run_dir = tmp_path / "run"
    config, overrides, selection = _assess_and_config(assets, run_dir)
    proc = subprocess.run(
        [BIN / "tune", "run", "full_finetune_single_device", "--config", str(config), *overrides],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Skipping import of cpp extensions" not in proc.stdout + proc.stderr  # apex_tune_quiet_torchao.pth
    _check_plain_checkpoint(assets, run_dir / "epoch_0", selection)


@pytest.mark.slow
@pytest.mark.distributed
def test_full_finetune_distributed_trains_one_stage(assets, tmp_path):
    """torchtune's distributed recipe on 2 CPU processes, through a launcher that
    no-ops its two CUDA-only calls (see tests/torchtune_distributed_on_cpu.py)."""
    run_dir = tmp_path / "run"
    config, overrides, selection = _assess_and_config(assets, run_dir)
    launcher = Path(__file__).resolve().parents[1] / "torchtune_distributed_on_cpu.py"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(launcher), "--config", str(config), *overrides],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_plain_checkpoint(assets, run_dir / "epoch_0", selection)
