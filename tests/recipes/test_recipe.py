"""End-to-end runs of ``tune run apex_finetune`` on the tiny CPU config."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchtune import training

from apex_tune import LayerSelection, apply_apex, set_selection
from apex_tune.training.checkpointing import load_rank_state, read_state_manifest
from apex_tune.modules.layout import load_channel_layout_
from apex_tune.modules.model import materialize_apex_buffers_
from apex_tune.modules.config import ApexSettings
from apex_tune.dev.tiny import tiny_llama3
from recipe_runs import CONFIG, TUNE, hf_weights, load_plain, losses, tune_run

pytestmark = pytest.mark.slow


def test_run_stages_and_outputs(assets, tmp_path):
    out = tmp_path / "run"
    tune_run(assets, out)
    for stage in ("stage_1", "stage_2"):
        assert (out / stage / "config.json").is_file()
        weights = hf_weights(out / stage)
        base = hf_weights(assets / "base")
        assert weights.keys() == base.keys()
        assert all(weights[k].shape == base[k].shape for k in base)
    # the fused model changed the weights APEX touches, and only those kinds
    final, base = hf_weights(out / "stage_2"), hf_weights(assets / "base")
    changed = {k for k in base if not torch.equal(final[k], base[k])}
    assert changed and all(re.search(r"(v_proj|o_proj|gate_proj|up_proj|down_proj)", k) for k in changed)

    log = json.loads((out / "apex_selection.json").read_text())
    assert [e["stage"] for e in log] == [1, 2]
    first, second = log[0]["layers"], log[1]["layers"]
    assert first != second, "the stage boundary re-selected nothing"
    for entry in log:
        for layer in entry["layers"]:
            for kind in ("heads", "channels"):
                sets = [set(layer[kind][s]) for s in ("P", "N", "E")]
                assert not (sets[0] & sets[1]) and len(sets[0]) == len(sets[1]) > 0
    assert len(losses(out)) == 10


def test_reloaded_checkpoint_matches_wrapped_model(assets, tmp_path):
    """A mid-stage fused save equals the wrapped model it came from."""
    out = tmp_path / "run"
    proc = tune_run(
        assets, out, "save_every_n_steps=3", env={"APEX_TUNE_KILL_AT": "step:4"}, check=False
    )
    assert proc.returncode != 0
    state = load_rank_state(out, read_state_manifest(out), rank=0)  # one process: whole tensors
    assert state["meta"]["progress"]["global_step"] == 3

    settings = ApexSettings(ratio=0.25)
    with torch.device("meta"):
        wrapped = tiny_llama3()
    apply_apex(wrapped, settings)
    model_sd = {k[len("model."):]: v for k, v in state["tensors"].items() if k.startswith("model.")}
    wrapped.load_state_dict(model_sd, strict=True, assign=True)
    materialize_apex_buffers_(wrapped, torch.device("cpu"))
    load_channel_layout_(wrapped, state["tensors"])  # the FFN weights were saved in the live layout
    for m in wrapped.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
    set_selection(wrapped, [LayerSelection.from_dict(d) for d in state["meta"]["selection"]])
    assert any(p.abs().max() > 0 for n, p in wrapped.named_parameters() if n.endswith("L2"))

    plain = load_plain(out / "step_3")
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = wrapped.eval()(tokens), plain(tokens)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.distributed
@pytest.mark.parametrize("delta", [False, True])
def test_two_processes_match_one(assets, tmp_path, delta):
    """Same global batch (1 x 8 vs 2 x 4): same loss curve.

    Random selection keeps the comparison about training: activation scores are
    counted per micro-batch, and the two runs split micro-batches differently.
    With the delta, FSDP2's all-gathered weights take the tuned slice in place for
    each matmul (partial back-propagation) and must come back unchanged.
    """
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["apex.selection=random", "max_steps_per_epoch=4", f"apex.delta={delta}"]
    tune_run(assets, one, "batch_size=8", *common)
    tune_run(assets, two, "batch_size=4", *common, nproc=2)
    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 8
    # fp32 on CPU; padding lengths differ per rank, so allow summation-order noise
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= 1e-4
    a, b = hf_weights(one / "stage_2"), hf_weights(two / "stage_2")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


@pytest.mark.distributed
def test_two_processes_activation_selection(assets, tmp_path):
    out = tmp_path / "two"
    tune_run(assets, out, "batch_size=4", "max_steps_per_epoch=3", nproc=2)
    log = json.loads((out / "apex_selection.json").read_text())
    assert [e["stage"] for e in log] == [1, 2]
    assert (out / "stage_2" / "model-00001-of-00001.safetensors").is_file()


def test_config_by_path(assets, tmp_path):
    path = tmp_path / "my_config.yaml"
    subprocess.run([str(Path(TUNE).with_name("apex-tune")), "cp", CONFIG, str(path)], check=True)
    out = tmp_path / "run"
    tune_run(assets, out, "max_steps_per_epoch=2", config=str(path))
    assert (out / "stage_2").is_dir()


def test_unknown_config_name(assets, tmp_path):
    proc = tune_run(assets, tmp_path / "run", config="llama9/404B_apex", check=False)
    assert proc.returncode != 0
    assert "llama9/404B_apex" in proc.stderr and "llama2/7B_apex" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("delta", [False, True])
def test_activation_checkpointing_changes_nothing(assets, tmp_path, delta):
    """Recomputed forwards must not be scored twice nor change the result (with the delta:
    nor the weight its tuned slice is swapped into and out of, twice per step)."""
    plain, checkpointed = tmp_path / "plain", tmp_path / "ac"
    tune_run(assets, plain, "max_steps_per_epoch=3", f"apex.delta={delta}")
    tune_run(assets, checkpointed, "max_steps_per_epoch=3", "enable_activation_checkpointing=True", f"apex.delta={delta}")
    assert losses(plain) == pytest.approx(losses(checkpointed), abs=1e-5)
    sel = [json.loads((d / "apex_selection.json").read_text()) for d in (plain, checkpointed)]
    assert [e["layers"] for e in sel[0]] == [e["layers"] for e in sel[1]]
    assert [e["scores"] for e in sel[0]] == [e["scores"] for e in sel[1]]


def test_gradient_accumulation_matches_large_batch(assets, tmp_path):
    big, accumulated = tmp_path / "big", tmp_path / "accum"
    common = ["apex.selection=random", "max_steps_per_epoch=3"]
    tune_run(assets, big, "batch_size=8", *common)
    tune_run(assets, accumulated, "batch_size=4", "gradient_accumulation_steps=2", *common)
    assert losses(big) == pytest.approx(losses(accumulated), abs=1e-4)
