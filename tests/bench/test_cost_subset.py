"""bench/cost.py's subset switches: the method/dtype filters parse and keep the benchmark's
order, and the targets of a subset are only those whose methods ran."""

import argparse

import pytest

from bench.cost import METHODS, _names, targets


def test_method_filter_keeps_the_benchmark_order_and_rejects_unknown_names():
    parse = _names(METHODS)
    assert parse("apex_52, full,floor") == ["floor", "full", "apex_52"]
    with pytest.raises(argparse.ArgumentTypeError, match="lora_r4"):
        parse("full,lora_r4")
    with pytest.raises(argparse.ArgumentTypeError):
        parse(",")


def test_targets_of_a_subset_are_those_whose_methods_ran():
    entry = {"methods": {
        "floor": {"step_over": {"floor": 1.0, "full": 0.5}, "memory_over": {"floor": 1.0, "full": 0.3}},
        "full": {"step_over": {"floor": 2.0, "full": 1.0}, "memory_over": {"floor": 3.3, "full": 1.0}},
        "apex_52": {"step_over": {"floor": 1.6, "full": 0.8}, "memory_over": {"floor": 2.6, "full": 0.78},
                    "hooks_fraction_of_step": 0.002, "assessment_fraction_of_epoch": 0.016},
    }}
    results = {"models": {"fp32": entry}, "layers": {"fp32": {"column delta q_proj": {"over_frozen": 1.3}}}}
    got = {t["target"]: t for t in targets(results)}
    assert set(got) == {
        "APEX ~52%: step / full FT", "APEX ~52%: memory / full FT",
        "ranking hooks: fraction of step (worst APEX setting)",
        "assessment pass: fraction of a Tulu-v2 epoch (APEX ~52%)",
    }
    assert got["APEX ~52%: step / full FT"]["value"] == 0.8 and got["APEX ~52%: step / full FT"]["met"]
    assert not got["assessment pass: fraction of a Tulu-v2 epoch (APEX ~52%)"]["met"]
