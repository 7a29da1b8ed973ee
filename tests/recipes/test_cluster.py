"""Beyond one node: multi-node launch, elastic restarts and the cluster recipes.

The launches are torchrun runs of ``dev/tiny_apex`` on this machine (gloo on CPU),
2 processes each, all with the same global batch (2 ranks x 4) and
``save_every_n_steps=3``, compared with one uninterrupted 1 node x 2 processes run.
Every rank runs one intra-op thread (``OMP_NUM_THREADS=1``; torchrun sets it only
with ``--nproc_per_node`` > 1), so all runs do the same arithmetic: the same ranks
see the same micro-batches, and every cross-rank reduction adds the same two
values (a + b == b + a exactly in IEEE arithmetic). Losses, selections and final
weights are therefore compared exactly, not within a tolerance.
"""

import os
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from torch.distributed.run import get_args_parser as torchrun_args_parser

from apex_tune.cli.config_names import load_config, resolve_config
from apex_tune.training.checkpointing import RECIPE_STATE_DIR
from apex_tune.training.distributed import check_elastic_launch
from apex_tune.training.reports import parameter_report
from recipe_runs import CONFIG, TUNE, hf_weights, losses, tune_run

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "examples" / "cluster"
COMMON = ["batch_size=4", "save_every_n_steps=3"]
SAME_ARITHMETIC = {"OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(commands, cwd, env, timeout=600):
    """Start every command at once (one per "node"), wait for all; return their results."""
    procs = [
        subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for cmd in commands
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, out, err))
    return results


def selections(output_dir):
    return (output_dir / "apex_selection.json").read_text()


def assert_same_weights(a_dir, b_dir):
    a, b = hf_weights(a_dir / "stage_2"), hf_weights(b_dir / "stage_2")
    assert a.keys() == b.keys()
    differing = [k for k in a if not (a[k] == b[k]).all()]
    assert not differing, f"weights differ: {differing[:3]}"


@pytest.fixture(scope="module")
def one_node_two_processes(assets, tmp_path_factory):  # noqa: F811
    """The reference: ``tune run --nproc_per_node 2``, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    tune_run(assets, out, *COMMON, nproc=2, env=SAME_ARITHMETIC)
    return out


# ------------------------------------------------------------- multi-node launch
@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_match_one_node(assets, one_node_two_processes, tmp_path):  # noqa: F811
    """2 nodes x 1 process (two launchers, c10d rendezvous on 127.0.0.1) == 1 node x 2."""
    out = tmp_path / "run"
    port = free_port()
    launcher = [
        TUNE, "run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"two_nodes_{port}",
        "apex_finetune", "--config", CONFIG, f"assets_dir={assets}", f"output_dir={out}", *COMMON,
    ]
    for rc, _, err in run_together([launcher, launcher], tmp_path, SAME_ARITHMETIC):
        assert rc == 0, err[-4000:]
    reference = one_node_two_processes
    assert len(losses(out)) == 10
    assert losses(out) == losses(reference)
    assert selections(out) == selections(reference)  # activation scores summed over the same ranks
    assert_same_weights(out, reference)


# ------------------------------------------------------------- elastic restart
@pytest.mark.slow
@pytest.mark.distributed
def test_elastic_restart_resumes(assets, one_node_two_processes, tmp_path):  # noqa: F811
    """Rank 1 is SIGKILLed once at step 7; torchrun (--max-restarts 1) restarts both
    ranks, which resume from the step-6 state and end where the reference ends."""
    out = tmp_path / "run"
    marker = tmp_path / "killed_once"
    proc = subprocess.run(
        [TUNE, "run", "--nproc_per_node", "2", "--max-restarts", "1", "apex_finetune", "--config", CONFIG,
         f"assets_dir={assets}", f"output_dir={out}", *COMMON, "resume_from_checkpoint=True"],
        cwd=tmp_path,
        env={**os.environ, **SAME_ARITHMETIC, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
             "APEX_TUNE_KILL_AT": "rank1:step:7", "APEX_TUNE_KILL_ONCE": str(marker)},
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert marker.exists(), "the fault never fired"
    assert "exitcode: -9" in proc.stderr  # torchrun saw the killed rank
    assert "starting fresh" in proc.stderr  # the first attempt found no state
    assert "resumed from step_6 at step 6" in proc.stderr
    assert_same_weights(out, one_node_two_processes)


@pytest.mark.slow
@pytest.mark.distributed
def test_nodes_must_share_output_dir(assets, one_node_two_processes, tmp_path):  # noqa: F811
    """Two nodes whose output_dir are not the same folder (one has a resume state, the
    other none) stop with one line before training, instead of diverging."""
    port = free_port()
    commands = []
    for node in (0, 1):
        out = tmp_path / f"node{node}" / "run"
        out.mkdir(parents=True)
        if node == 0:
            state = one_node_two_processes / RECIPE_STATE_DIR
            shutil.copytree(state, out / RECIPE_STATE_DIR)
        commands.append([
            TUNE, "run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"unshared_{port}",
            "apex_finetune", "--config", CONFIG, f"assets_dir={assets}", f"output_dir={out}", *COMMON,
            "resume_from_checkpoint=True",
        ])
    results = run_together(commands, tmp_path, SAME_ARITHMETIC)
    assert all(rc != 0 for rc, _, _ in results)
    # Every rank meets the error; rank 0 (either node: c10d assigns ranks) says it once.
    said = [err for _, _, err in results
            if "apex_finetune: config error: output_dir: the ranks found different resume states" in err]
    assert len(said) == 1, [err[-3000:] for _, _, err in results]
    assert "rank 0: step 10" in said[0] or "rank 1: step 10" in said[0]
    assert sorted(p.name for p in (tmp_path / "node1" / "run").iterdir()) == []


# ---------------------------------------------------------------------- SLURM
def slurm_launch(node_id, nnodes, output_dir, port, env=None):
    """launch.sh as srun runs it on one node: SLURM's variables, no scontrol."""
    env = {
        **os.environ, **SAME_ARITHMETIC,
        "PATH": f"{Path(TUNE).parent}:{os.environ['PATH']}",  # this checkout's `tune` first
        "SLURM_NNODES": str(nnodes), "SLURM_NODEID": str(node_id), "SLURM_JOB_ID": f"4242{port}",
        "SLURM_JOB_NODELIST": "localhost", "NPROC_PER_NODE": "1", "RDZV_PORT": str(port),
        "APEX_OUTPUT_DIR": str(output_dir), "APEX_CONFIG": CONFIG, **(env or {}),
    }
    return ["env", *[f"{k}={v}" for k, v in env.items()], "bash", str(CLUSTER / "slurm" / "launch.sh")]


@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_launch_two_nodes_and_requeue(assets, one_node_two_processes, tmp_path):  # noqa: F811
    """launch.sh on 2 "nodes": the job dies at step 7 (no torchrun restarts left), the
    requeued job (same command) resumes from step 6 and ends where the reference ends."""
    out = tmp_path / "run"
    args = [f"assets_dir={assets}", *COMMON]
    port = free_port()
    killed = {"APEX_TUNE_KILL_AT": "step:7", "MAX_RESTARTS": "0"}
    first = run_together([slurm_launch(n, 2, out, port, killed) + args for n in (0, 1)], tmp_path, {})
    assert all(rc != 0 for rc, _, _ in first)
    assert any("starting fresh" in err for _, _, err in first)  # resume on, no state yet

    port = free_port()
    requeued = run_together([slurm_launch(n, 2, out, port) + args for n in (0, 1)], tmp_path, {})
    for rc, _, err in requeued:
        assert rc == 0, err[-4000:]
    assert any("resumed from step_6 at step 6" in err for _, _, err in requeued)
    assert_same_weights(out, one_node_two_processes)


@pytest.mark.skipif(shutil.which("scontrol") is not None, reason="scontrol expands the list here")
def test_slurm_compressed_nodelist_needs_scontrol(tmp_path):
    cmd = slurm_launch(0, 2, tmp_path / "run", 1, {"SLURM_JOB_NODELIST": "gpu[001-002]"})
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "needs scontrol" in proc.stderr


def test_sbatch_script_requeues_and_runs_launch_per_node():
    script = (CLUSTER / "slurm" / "apex_finetune.sbatch").read_text()
    directives = [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "--requeue" in directives and "--ntasks-per-node=1" in directives
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    words = shlex.split(srun)
    assert "--ntasks-per-node=1" in words and words[-2].endswith("/examples/cluster/slurm/launch.sh")
    launch = (CLUSTER / "slurm" / "launch.sh").read_text()
    assert "resume_from_checkpoint=True" in launch and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in launch


# ----------------------------------------------------------------- Kubernetes
def _check_launch(container_command, nnodes, nproc, endpoint):
    """A ``bash -c 'exec tune run ...'`` command, its variables set as the operator sets
    them: torchrun accepts its arguments, and the recipe's overrides fit the config."""
    assert container_command[:2] == ["bash", "-c"], container_command
    words = shlex.split(container_command[2])
    assert words[:3] == ["exec", "tune", "run"], words[:3]
    words = [os.path.expandvars(w) for w in words[3:]]
    recipe_at = words.index("apex_finetune")
    torchrun_words, recipe_words = words[:recipe_at], words[recipe_at + 1:]
    args = torchrun_args_parser().parse_args(torchrun_words + ["apex_finetune"])
    assert (args.nnodes, args.nproc_per_node) == (str(nnodes), str(nproc))
    # `tune run` runs standalone (one node) unless it is given a rendezvous endpoint
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint == endpoint
    assert args.max_restarts >= 1
    assert recipe_words[0] == "--config"
    name, overrides = recipe_words[1], recipe_words[2:]
    assert "resume_from_checkpoint=True" in overrides
    shipped = OmegaConf.load(resolve_config(name))
    for override in overrides:
        key = override.split("=", 1)[0]
        assert OmegaConf.select(shipped, key) is not None, f"{name} has no field {key}"
    cfg = load_config(name, overrides)
    assert parameter_report(cfg)["trainable_params"] > 0


def test_kubeflow_trainjob_manifest(monkeypatch):
    job = yaml.safe_load((CLUSTER / "kubernetes" / "trainjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    trainer = job["spec"]["trainer"]
    assert trainer["image"]
    nnodes, nproc = trainer["numNodes"], trainer["numProcPerNode"]
    assert nnodes >= 2 and trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == nproc
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    # what the Trainer's torch plugin sets in every node's container
    for name, value in {"PET_NNODES": nnodes, "PET_NPROC_PER_NODE": nproc, "PET_NODE_RANK": 1,
                        "PET_MASTER_ADDR": "apex-llama2-7b-node-0-0.apex-llama2-7b",
                        "PET_MASTER_PORT": 29400}.items():
        monkeypatch.setenv(name, str(value))
    _check_launch(trainer["command"], nnodes, nproc, "apex-llama2-7b-node-0-0.apex-llama2-7b:29400")


def test_kubeflow_pytorchjob_manifest(monkeypatch):
    job = yaml.safe_load((CLUSTER / "kubernetes" / "pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    nnodes = sum(r["replicas"] for r in replicas.values())
    nproc = int(job["spec"]["nprocPerNode"])
    # what the operator sets in every pod: the Master pod's service
    monkeypatch.setenv("MASTER_ADDR", "apex-llama2-7b-master-0")
    monkeypatch.setenv("MASTER_PORT", "23456")
    for role, spec in replicas.items():
        assert spec["restartPolicy"] == "OnFailure", role
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch" and container["image"]  # the operator looks for "pytorch"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == nproc
        assert "shared" in {m["name"] for m in container["volumeMounts"]}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
        _check_launch(container["command"], nnodes, nproc, "apex-llama2-7b-master-0:23456")


# ------------------------------------------------------------- launch warnings
@pytest.mark.parametrize("resume,shared_store,expected", [
    (False, "True", ["resume_from_checkpoint=True", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"]),
    (True, "False", []),
])
def test_elastic_launch_warnings(monkeypatch, caplog, resume, shared_store, expected):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared_store)
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level("WARNING"):
        check_elastic_launch(resume)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == len(expected)
    assert all(fix in warning for fix, warning in zip(expected, warnings))
