"""Bad input, crashes and faults: the run explains itself and loses nothing."""

import json
import shutil
import time

import pytest
import torch

from apex_tune import ApexSettings, apply_apex, get_selection
from apex_tune.training.checkpointing import (
    RECIPE_STATE_DIR,
    CheckpointError,
    check_fusion,
    unwrapped_state_dict,
    load_rank_state,
    read_state_manifest,
)
from apex_tune.dev.tiny import tiny_llama3
from recipe_runs import hf_weights, losses, tune_run

pytestmark = pytest.mark.slow


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def whole_run(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("whole") / "run"
    tune_run(assets, out, "save_every_n_steps=3")
    return out


# ---------------------------------------------------------------- bad configs
def _empty_data(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path


BAD_CONFIGS = [
    (["apex.ratio=0.7"], "apex.ratio"),
    (["apex.tuned_ratio_heads=0.1"], "apex.tuned_ratio_heads"),
    (["apex.num_stages=50", "max_steps_per_epoch=2"], "apex.num_stages"),
    (["save_every_n_steps=0"], "save_every_n_steps"),
    (["apex.unknown_knob=1"], "unknown_knob"),
    (["model._component_=torchtune.models.llama9.llama9"], "model"),
    (["model._component_=torch.nn.Embedding", "~model.vocab_size", "~model.num_layers", "~model.num_heads",
      "~model.num_kv_heads", "~model.embed_dim", "~model.intermediate_dim", "~model.max_seq_len",
      "model.num_embeddings=512", "model.embedding_dim=64"], "no layers APEX supports"),
    (["checkpointer.model_type=LLAMA9"], "checkpointer"),
    (["model.intermediate_dim=128"], "shape"),
    (["dataset.data_files=/nonexistent/train.jsonl"], "dataset.data_files"),
    (["dataset.data_files={empty}"], "dataset"),
]


@pytest.mark.parametrize("overrides,named", BAD_CONFIGS, ids=[c[1] + str(i) for i, c in enumerate(BAD_CONFIGS)])
def test_bad_config_is_one_clear_error(assets, tmp_path, overrides, named):  # noqa: F811
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    overrides = [o.format(empty=_empty_data(tmp_path)) for o in overrides]
    proc = tune_run(assets, out, *overrides, check=False)
    assert proc.returncode != 0
    assert "apex_finetune: config error:" in proc.stderr, proc.stderr[-2000:]
    assert named in proc.stderr.split("apex_finetune: config error:")[1]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# ------------------------------------------------------------ crash + resume
@pytest.mark.parametrize(
    # during assessment, while writing the stage-1 model, between writing and renaming the
    # resume state, and mid-stage 2 (resumes from the step-6 state)
    "kill_at", ["assess:2", "save_state:stage_1", "state_renaming:stage_1", "step:7"]
)
def test_killed_run_resumes_exactly(assets, whole_run, tmp_path, kill_at):  # noqa: F811
    out = tmp_path / "run"
    proc = tune_run(assets, out, "save_every_n_steps=3", env={"APEX_TUNE_KILL_AT": kill_at}, check=False)
    assert proc.returncode != 0
    manifest = read_state_manifest(out)  # whatever is there is whole (or absent)
    if manifest is not None:
        load_rank_state(out, manifest, rank=0)
    if kill_at == "state_renaming:stage_1":
        # killed after writing the step-5 state but before pointing latest.json at it: step 3's stands
        assert manifest["global_step"] == 3
    tune_run(assets, out, "save_every_n_steps=3", "resume_from_checkpoint=True")
    assert max_diff(hf_weights(whole_run / "stage_2"), hf_weights(out / "stage_2")) <= 1e-6
    assert not list(out.glob("epoch_*")), "a staging folder was left behind"


def test_killed_run_with_the_delta_resumes_exactly(assets, tmp_path):  # noqa: F811
    """With the delta the tuned slice is swapped into the frozen weights for every matmul
    (partial back-propagation): a run killed mid-stage 2 and resumed still ends with the
    weights of the run that was never killed (the swap restores them exactly)."""
    whole, out = tmp_path / "whole", tmp_path / "run"
    common = ["save_every_n_steps=3", "apex.delta=True"]
    tune_run(assets, whole, *common)
    proc = tune_run(assets, out, *common, env={"APEX_TUNE_KILL_AT": "step:7"}, check=False)
    assert proc.returncode != 0
    tune_run(assets, out, *common, "resume_from_checkpoint=True")
    assert max_diff(hf_weights(whole / "stage_2"), hf_weights(out / "stage_2")) <= 1e-6


def test_unreadable_state_is_an_error_not_a_fresh_start(assets, whole_run, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(whole_run / RECIPE_STATE_DIR, out / RECIPE_STATE_DIR)
    (shard,) = (out / RECIPE_STATE_DIR).glob("*/rank_0.safetensors")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = tune_run(assets, out, "resume_from_checkpoint=True", check=False)
    assert proc.returncode != 0
    assert "unreadable" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "stage_1").exists()


# ------------------------------------------------------------- non-finite
def test_nan_gradient_stops_with_step_and_stage(assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    proc = tune_run(assets, out, env={"APEX_TUNE_NAN_GRAD_AT": "3"}, check=False)
    assert proc.returncode != 0
    assert "non-finite gradient at step 3 (stage 1" in proc.stderr
    assert not (out / "stage_1").exists()


def test_nan_gradient_skipped_when_configured(assets, tmp_path, whole_run):  # noqa: F811
    out = tmp_path / "run"
    tune_run(assets, out, "on_nonfinite=skip", env={"APEX_TUNE_NAN_GRAD_AT": "3"})
    weights = hf_weights(out / "stage_2")
    assert all(torch.isfinite(v).all() for v in weights.values())
    log = (next((out / "logs").glob("log_*.txt"))).read_text()
    assert "skipped_steps:1" in log.replace(" ", "")
    assert len(losses(out)) == 10


def test_fusion_guard_refuses_bad_fusion():
    torch.manual_seed(0)
    settings = ApexSettings(ratio=0.25)
    model = tiny_llama3()
    apply_apex(model, settings)
    wrapped_sd = model.state_dict()
    selection = get_selection(model)
    probe = torch.randint(0, 512, (1, 16))
    _, difference = unwrapped_state_dict(tiny_llama3, settings, wrapped_sd, selection, probe)
    check_fusion(difference, 1e-5, "healthy")
    poisoned = dict(wrapped_sd)
    key = next(k for k in poisoned if k.endswith("monarch.L2"))
    poisoned[key] = torch.full_like(poisoned[key], float("nan"))
    _, difference = unwrapped_state_dict(tiny_llama3, settings, poisoned, selection, probe)
    with pytest.raises(CheckpointError, match="differs from the wrapped model"):
        check_fusion(difference, 1e-5, "poisoned")


# ------------------------------------------------------------ distributed
@pytest.mark.distributed
def test_dead_rank_takes_the_run_down(assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    start = time.monotonic()
    proc = tune_run(
        assets, out, "batch_size=4", nproc=2, env={"APEX_TUNE_KILL_AT": "rank1:step:2"}, check=False
    )
    assert proc.returncode != 0
    assert time.monotonic() - start < 300
    assert "Signals.SIGKILL" in proc.stderr or "exitcode" in proc.stderr


@pytest.mark.distributed
def test_two_processes_killed_rank_resumes_exactly(assets, tmp_path):  # noqa: F811
    """Rank 1 SIGKILLed mid-stage 2; both restarted from the sharded state (one shard
    per rank): the same weights as an uninterrupted 2-process run. A different world
    size is refused in one line."""
    whole, out = tmp_path / "whole", tmp_path / "run"
    common = ["batch_size=4", "save_every_n_steps=3"]
    tune_run(assets, whole, *common, nproc=2)
    proc = tune_run(assets, out, *common, nproc=2, env={"APEX_TUNE_KILL_AT": "rank1:step:7"}, check=False)
    assert proc.returncode != 0
    manifest = read_state_manifest(out)
    assert manifest["global_step"] == 6 and manifest["world_size"] == 2
    shards = sorted(p.name for p in (out / RECIPE_STATE_DIR / manifest["state"]).iterdir())
    assert shards == ["rank_0.json", "rank_0.safetensors", "rank_1.json", "rank_1.safetensors"]

    refused = tune_run(assets, out, *common, "resume_from_checkpoint=True", check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "the saved run used 2 processes, this one 1: resume with the same --nproc_per_node" in refused.stderr

    tune_run(assets, out, *common, "resume_from_checkpoint=True", nproc=2)
    # fp32 on CPU, same ranks, same reduction order: the resumed run repeats the arithmetic
    assert max_diff(hf_weights(whole / "stage_2"), hf_weights(out / "stage_2")) <= 1e-6


# ------------------------------------------------------------- input data
def test_awkward_samples_are_handled_and_counted(assets, tmp_path):  # noqa: F811
    rows = [json.loads(line) for line in (assets / "train.jsonl").read_text().splitlines()][:64]
    awkward = (
        # longer than max_seq_len: truncation (as in torchtune) cuts the whole answer,
        # so the first batch has nothing to learn
        [{"question": "many " * 400, "answer": "#### 1"}] * 8
        + [{"question": "", "answer": ""}] * 4  # empty
        + [{"question": "How many?", "answer": ""}] * 4  # prompt only
    )
    data = tmp_path / "awkward.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in awkward + rows))
    out = tmp_path / "run"
    tune_run(
        assets, out, f"dataset.data_files={data}", "shuffle=False", "apex.assess_samples=16",
        "max_steps_per_epoch=4", "apex.num_stages=2",
    )
    log = (next((out / "logs").glob("log_*.txt"))).read_text()
    # the last training step's line (stage boundaries add lines of effective ranks)
    last = [line for line in log.splitlines() if line.startswith("Step") and " loss:" in line][-1]
    fields = dict(item.split(":", 1) for item in last.split("|", 1)[1].split())
    assert float(fields["rows_without_targets"]) >= 8
    assert float(fields["rows_at_max_seq_len"]) >= 4
    assert float(fields["skipped_steps"]) >= 1
    weights = hf_weights(out / "stage_2")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_run_killed_after_a_stage_end_resumes_exactly(assets, whole_run, tmp_path):  # noqa: F811
    """The last state is stage 1's end, with the optimizer state just reset (saved as
    hyperparameters only): the resumed stage 2 starts from a fresh optimizer, as the
    uninterrupted run does, and ends with the same weights."""
    out = tmp_path / "run"
    proc = tune_run(assets, out, env={"APEX_TUNE_KILL_AT": "step:7"}, check=False)
    assert proc.returncode != 0
    state = load_rank_state(out, read_state_manifest(out), rank=0)
    assert state["meta"]["progress"]["global_step"] == 5 and state["meta"]["optimizer"]["state"] == {}
    tune_run(assets, out, "resume_from_checkpoint=True")
    assert max_diff(hf_weights(whole_run / "stage_2"), hf_weights(out / "stage_2")) <= 1e-6
