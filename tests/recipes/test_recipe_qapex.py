"""End-to-end QAPEX runs (``dev/tiny_qapex``: NF4 base, 3 stages) and the memory switches."""

import re
from pathlib import Path

import pytest
import torch
from torchtune import training

from apex_tune.dev.tiny import TINY_QAPEX_MODEL, make_tiny_assets, tiny_llama3
from recipe_runs import hf_weights, tune_run

pytestmark = pytest.mark.slow

CONFIG = "dev/tiny_qapex"
KILL_AT = "APEX_TUNE_KILL_AT"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_qapex_assets")
    make_tiny_assets(root, num_train=400, num_val=50, seed=0, model=TINY_QAPEX_MODEL)
    return root


def qapex_run(assets, output_dir, *overrides, **kwargs):
    return tune_run(assets, output_dir, *overrides, config=CONFIG, **kwargs)


def step_metrics(log_file: Path) -> dict:
    """step -> {metric: value} from one torchtune DiskLogger file."""
    found = {}
    for line in log_file.read_text().splitlines():
        m = re.match(r"Step (\d+) \| (.*)", line)
        if m:
            found[int(m.group(1))] = {k: v for k, v in re.findall(r"(\w+):(\S+)", m.group(2))}
    return found


def fusion_differences(text: str, where: str) -> dict:
    pattern = {
        "checkpoint": r"checkpoint stage_(\d+): fused-vs-wrapped difference ([-\d.e+naninf]+)",
        "boundary": r"stage (\d+) done at step \d+: .*fused-vs-wrapped difference ([-\d.e+naninf]+)",
    }[where]
    return {int(stage): float(value) for stage, value in re.findall(pattern, text)}


def test_qapex_stages_fusion_error_exact_resume_and_plain_checkpoint(assets, tmp_path, capsys):
    """Three stages over an NF4 base, killed mid-stage 2 (one frozen stage) and resumed.

    Reported per stage: the saved (fused, fp32) model against the wrapped model on
    the recipe's probe batch, bounded by the same tolerance at every stage. The
    resumed run retakes step 4 with the same loss and gradient norm, and the
    saved checkpoints load into the plain architecture.
    """
    out = tmp_path / "run"
    common = ["epochs=2", "max_steps_per_epoch=3", "save_every_n_steps=3"]  # stages end at steps 2, 4, 6
    first = qapex_run(assets, out, *common, env={KILL_AT: "step:4"}, check=False)
    assert first.returncode != 0, first.stderr[-2000:]
    assert (out / "stage_1").is_dir() and (out / "step_3").is_dir() and not (out / "stage_2").exists()
    second = qapex_run(assets, out, *common, "resume_from_checkpoint=True")
    text = first.stderr + first.stdout + second.stderr + second.stdout

    saved = fusion_differences(text, "checkpoint")
    live = fusion_differences(text, "boundary")
    with capsys.disabled():
        print("\nQAPEX recipe, fused-vs-wrapped on the probe batch per stage:",
              {f"stage_{k}": f"{v:.2e}" for k, v in sorted(saved.items())},
              "| live model across the boundary:", {k: f"{v:.2e}" for k, v in sorted(live.items())})
    assert sorted(saved) == [1, 2, 3] and sorted(live) == [1, 2, 3]
    assert all(0 <= d <= 1e-5 for d in saved.values())  # same bound after 3 stages as after 1
    assert all(d <= 1e-6 for d in live.values())

    first_log, second_log = sorted((out / "logs").glob("log_*.txt"), key=lambda p: p.stat().st_mtime)
    before, after = step_metrics(first_log), step_metrics(second_log)
    assert sorted(before) == [1, 2, 3, 4] and sorted(after) == [4, 5, 6]
    assert before[4]["loss"] == after[4]["loss"] and before[4]["grad_norm"] == after[4]["grad_norm"]

    base = hf_weights(assets / "base")
    stages = {k: hf_weights(out / f"stage_{k}") for k in (1, 2, 3)}
    for weights in stages.values():
        assert weights.keys() == base.keys()
        assert all(v.dtype == torch.float32 and v.shape == base[k].shape and torch.isfinite(v).all()
                   for k, v in weights.items())
    # APEX changes v/o/gate/up/down; q and k stay the dequantized NF4 base at every stage
    q_key = next(k for k in base if "q_proj" in k)
    assert torch.equal(stages[1][q_key], stages[3][q_key]) and not torch.equal(stages[1][q_key], base[q_key])
    assert any(not torch.equal(stages[1][k], stages[3][k]) for k in base if "down_proj" in k)

    checkpointer = training.FullModelHFCheckpointer(
        checkpoint_dir=str(out / "stage_3"),
        checkpoint_files=["model-00001-of-00001.safetensors"],
        model_type="LLAMA3",
        output_dir=str(tmp_path / "reload"),
    )
    plain = tiny_llama3(**TINY_QAPEX_MODEL)
    plain.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY], strict=True)
    with torch.no_grad():
        assert torch.isfinite(plain.eval()(torch.randint(0, 512, (1, 16)))).all()


@pytest.mark.distributed
def test_qapex_two_processes_stages_and_exact_resume(assets, tmp_path):
    """QAPEX with 2 processes (NF4 base replicated, operators sharded): all three stages,
    and rank 1 killed mid-stage 2 resumes to the same weights as the uninterrupted run."""
    whole, out = tmp_path / "whole", tmp_path / "run"
    common = ["batch_size=4", "epochs=2", "max_steps_per_epoch=3", "save_every_n_steps=3"]  # stages end at 2, 4, 6
    qapex_run(assets, whole, *common, nproc=2)
    assert all((whole / f"stage_{k}").is_dir() for k in (1, 2, 3))
    first = qapex_run(assets, out, *common, nproc=2, env={KILL_AT: "rank1:step:4"}, check=False)
    assert first.returncode != 0 and (out / "step_3").is_dir() and not (out / "stage_2").exists()
    qapex_run(assets, out, *common, "resume_from_checkpoint=True", nproc=2)
    a, b = hf_weights(whole / "stage_3"), hf_weights(out / "stage_3")
    # fp32, same ranks and reduction order; NF4 codes re-quantized from the same base
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_memory_options_start_on_cpu(assets, tmp_path):
    """torchao's 8-bit AdamW (its states are quantized for the deltas) with activation
    checkpointing, over the NF4 base: runs through both stages and saves."""
    out = tmp_path / "run"
    qapex_run(
        assets, out,
        "optimizer._component_=torchao.optim.AdamW8bit", "enable_activation_checkpointing=True",
        "apex.delta=True", "epochs=1", "max_steps_per_epoch=2", "apex.num_stages=2",
    )
    assert (out / "stage_2" / "model-00001-of-00001.safetensors").is_file()
    (log_file,) = (out / "logs").glob("log_*.txt")
    metrics = step_metrics(log_file)
    assert sorted(metrics) == [1, 2] and all(float(m["loss"]) < 100 for m in metrics.values())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["enable_activation_offloading=True", "enable_activation_checkpointing=True"],
         "enable_activation_offloading=True needs a CUDA GPU"),
        (["optimizer._component_=torchao.optim.CPUOffloadOptimizer"],
         "CPUOffloadOptimizer needs a CUDA GPU"),
    ],
)
def test_gpu_only_memory_options_refused_on_cpu(assets, tmp_path, overrides, message):
    out = tmp_path / "run"
    proc = qapex_run(assets, out, *overrides, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()
