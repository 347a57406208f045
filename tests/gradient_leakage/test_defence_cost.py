"""The paired-seed accuracy cost of a defence (benchmarks/leakage/defence_cost.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location(
        "defence_cost", REPO / "benchmarks" / "leakage" / "defence_cost.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["defence_cost"] = module
    spec.loader.exec_module(module)
    return module


defence_cost = _load()

metric = st.floats(min_value=0.4, max_value=1.0, allow_nan=False)
seed_metrics = st.fixed_dictionaries(
    {d: st.fixed_dictionaries({"auc": metric, "accuracy": metric}) for d in ("none", "cvb")}
)


def _write_federations(folder: Path, seeds: list[dict]) -> list[Path]:
    """One federation.py-style file per seed and defence, in a shuffled order."""
    files = []
    for s, runs in enumerate(seeds):
        for d, test in runs.items():
            f = folder / f"{d}-s{s}.json"
            f.write_text(json.dumps({"seed": s, "model": {"defense": d}, "test": test}))
            files.append(f)
    return files[::-1]


@settings(max_examples=40, deadline=None)
@given(seeds=st.lists(seed_metrics, min_size=2, max_size=6))
def test_cost_is_the_mean_paired_difference_with_a_t_interval(tmp_path_factory, seeds):
    folder = tmp_path_factory.mktemp("fed")
    doc = defence_cost.summarise(_write_federations(folder, seeds), "cvb", "none")
    assert len(doc["seeds"]) == len(seeds)
    for m in ("auc", "accuracy"):
        diffs = [s["none"][m] - s["cvb"][m] for s in seeds]
        c = doc["cost"][m]
        assert c["n"] == len(seeds)
        assert c["mean"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-12)
        # the interval contains the mean, symmetric about it
        assert c["low"] <= c["mean"] <= c["high"]
        assert c["mean"] - c["low"] == pytest.approx(c["high"] - c["mean"], abs=1e-12)
        assert doc["meets_target"][m] == (c["mean"] <= 0.01)


def test_two_pairs_use_the_t_quantile_with_one_degree_of_freedom():
    c = defence_cost.paired_interval([0.01, 0.03])
    sd = math.sqrt(2) * 0.01  # sample SD of {0.01, 0.03}
    assert c["sd"] == pytest.approx(sd)
    assert c["high"] - c["mean"] == pytest.approx(12.7062047 * sd / math.sqrt(2), rel=1e-6)


def test_a_seed_without_its_partner_is_refused(tmp_path):
    files = _write_federations(tmp_path, [{"none": {"auc": 0.9, "accuracy": 0.8}}])
    with pytest.raises(SystemExit, match="seed 0: needs runs of both none and cvb"):
        defence_cost.summarise(files, "cvb", "none")


def test_a_second_run_of_the_same_seed_and_defence_is_refused(tmp_path):
    files = _write_federations(
        tmp_path, [{"none": {"auc": 0.9, "accuracy": 0.8}, "cvb": {"auc": 0.9, "accuracy": 0.8}}]
    )
    twin = tmp_path / "again.json"
    twin.write_text(files[0].read_text())
    with pytest.raises(SystemExit, match="a second"):
        defence_cost.summarise([*files, twin], "cvb", "none")
