"""Run options in-process: each config mistake is one ConfigError naming the field (the
same texts `tune run` prints, see tests/recipes/test_reliability.py), and the testing
seam is inert unless asked."""

import pytest
import torch
from omegaconf import OmegaConf

from apex_tune.training.run_options import ConfigError, config_step, read_run_options
from apex_tune.training.testing import NAN_GRAD_ENV, fault_point

BASE = dict(device="cpu", dtype="fp32", output_dir="out", batch_size=2, gradient_accumulation_steps=1, epochs=1,
            optimizer={"_component_": "torch.optim.AdamW"}, apex={"ratio": 0.1875})


def options(**fields):
    return read_run_options(OmegaConf.create({**BASE, **fields}))


@pytest.mark.parametrize("fields,message", [
    (dict(dtype="fp16"), "dtype=fp16 is not supported; use bf16 or fp32"),
    (dict(apex={"ratio": 0.7}), "apex.ratio=0.7 is out of range"),
    (dict(apex={"unknown_knob": 1}), "unknown_knob"),
    (dict(save_every_n_steps=0), "save_every_n_steps=0 must be a positive integer or null"),
    (dict(batch_size=0), "batch_size=0 must be a positive integer"),
    (dict(epochs="2"), "epochs='2' must be a positive integer"),
    (dict(on_nonfinite="ignore"), "on_nonfinite='ignore' must be 'stop' or 'skip'"),
    (dict(enable_activation_offloading=True, enable_activation_checkpointing=True),
     "enable_activation_offloading=True needs a CUDA GPU"),
    (dict(optimizer={"_component_": "bitsandbytes.optim.PagedAdamW8bit"}), "needs a CUDA GPU"),
])
def test_config_mistakes_are_one_config_error(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        options(**fields)


def test_options_and_their_defaults():
    got = options(fusion_check_tolerance=None, save_every_n_steps=3)
    assert (got.batch_size, got.save_every_n_steps, got.on_nonfinite, got.resume) == (2, 3, "stop", False)
    assert got.fusion_tolerance == 1e-3  # fp32 default
    assert options(dtype="bf16").fusion_tolerance == 5e-2
    assert options(fusion_check_tolerance=0.2).fusion_tolerance == 0.2


def test_config_step_names_the_field():
    with pytest.raises(ConfigError, match=r"^model: KeyError: 'x'\. Check model\.$"):
        with config_step("model", "Check model."):
            raise KeyError("x")
    with pytest.raises(ConfigError, match="^as it was$"):  # already named: passed on as it is
        with config_step("model", "Check model."):
            raise ConfigError("as it was")


def test_nan_gradient_seam_poisons_only_the_named_step(monkeypatch):
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    fault_point("gradients:3", model)  # variable unset: inert
    assert torch.isfinite(model.weight.grad).all()
    monkeypatch.setenv(NAN_GRAD_ENV, "3")
    fault_point("gradients:2", model)
    assert torch.isfinite(model.weight.grad).all()
    fault_point("gradients:3", model)
    assert torch.isnan(model.weight.grad).all() and torch.isnan(model.bias.grad).all()
