"""Shipped configs, the apex-tune CLI and the YAML builder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config

from apex_tune import ApexColumnLinear, trainable_parameter_report
from apex_tune.cli import main as apex_cli
from apex_tune.cli.config_names import list_configs, resolve_config

BIN = Path(sys.executable).parent
SHIPPED = list_configs()


def test_shipped_configs_listed():
    assert {"llama2/7B_apex", "llama3_1/8B_apex", "qwen2_5/7B_apex", "llama3_2/1B_apex_cpt", "dev/tiny_apex",
            "smollm2/135M_apex", "smollm2/135M_apex_cpt"} <= set(SHIPPED)
    out = subprocess.run([BIN / "apex-tune", "ls"], capture_output=True, text=True, check=True).stdout
    assert out.split() == SHIPPED


def test_tune_validate_cli():
    validate = subprocess.run([BIN / "tune", "validate", str(resolve_config("dev/tiny_apex"))], capture_output=True, text=True)
    assert "Config is well-formed" in validate.stdout, validate.stdout + validate.stderr


@pytest.mark.parametrize("name", SHIPPED)
def test_config_validates_and_reports(name, capsys):
    # in-process: what `tune validate` and `apex-tune params --json` run
    config.validate(OmegaConf.load(resolve_config(name)))
    assert apex_cli.main(["params", "--config", name, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["trainable_params"] < report["base_params"]
    assert report["by_kind"]["base"]["trainable"] == 0


def test_params_reference_settings_llama2_7b():
    report = json.loads(
        subprocess.run(
            [BIN / "apex-tune", "params", "--config", "llama2/7B_apex", "--json"],
            capture_output=True, text=True, check=True,
        ).stdout
    )
    assert 0.51 < report["trainable_fraction"] < 0.53  # the paper's "about 52%"
    assert report["per_layer"] == {"heads_operator_params": 49152, "channels_operator_params": 198144}
    ops_only = json.loads(
        subprocess.run(
            [BIN / "apex-tune", "params", "--config", "llama2/7B_apex", "--json",
             "apex.delta=False", "apex.train_embeddings=False"],
            capture_output=True, text=True, check=True,
        ).stdout
    )
    assert 0.0011 < ops_only["trainable_fraction"] < 0.0013  # "about 0.12%"


def test_params_bad_override_is_clear():
    proc = subprocess.run(
        [BIN / "apex-tune", "params", "--config", "dev/tiny_apex", "apex.ratio=0.7"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "apex.ratio=0.7" in proc.stderr and "Traceback" not in proc.stderr


def test_cp_and_unknown_name(tmp_path):
    dest = tmp_path / "mine.yaml"
    subprocess.run([BIN / "apex-tune", "cp", "llama2/7B_apex", dest], check=True, capture_output=True)
    assert OmegaConf.load(dest).apex.ratio == 0.1875
    proc = subprocess.run([BIN / "apex-tune", "cp", "nope/none", tmp_path / "x.yaml"], capture_output=True, text=True)
    assert proc.returncode == 2 and "llama2/7B_apex" in proc.stderr


def test_builder_from_yaml():
    cfg = OmegaConf.create(
        """
        model:
          _component_: apex_tune.models.apex_model
          base:
            _component_: torchtune.models.llama2.llama2_7b
          ratio: 0.1875
          tuned_ratio_heads: 0.5625
          tuned_ratio_channels: 0.465
          delta: True
          train_embeddings: True
        """
    )
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    assert isinstance(model.layers[0].attn.v_proj, ApexColumnLinear)
    assert 0.51 < trainable_parameter_report(model)["trainable_fraction"] < 0.53
