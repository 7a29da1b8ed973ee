"""bench/precision.py reads the APEX parameters out of the recipe's resume state (it once
looked for a resume-state file the recipe no longer wrote, and nothing noticed)."""

import pytest

from bench.precision import KINDS, apex_params, initial_l1, movement, tune_run

pytestmark = pytest.mark.slow


def test_reads_every_apex_parameter_of_a_stopped_run(assets, tmp_path):
    """The run the benchmark stops after 4 optimizer steps: every kind of APEX parameter is
    read, L1 under the names and shapes the benchmark's own init draws, and every kind has
    moved from its init (the config's lr 1e-2 moves each entry by about 1e-2)."""
    out = tmp_path / "stopped"
    tune_run(assets, out, "save_every_n_steps=4", kill_at="step:5")
    params = apex_params(out)
    assert {name.rsplit(".", 1)[-1] for name in params} == set(KINDS)
    l1_init = initial_l1()
    l1 = {name: value for name, value in params.items() if name.endswith(".L1")}
    assert {name: value.shape for name, value in l1.items()} == {name: value.shape for name, value in l1_init.items()}
    for kind, moved in movement(params, l1_init, skip=set()).items():
        assert moved.numel() > 0 and moved.abs().max() > 0, kind
