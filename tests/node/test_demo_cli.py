"""`fedbus demo`'s own pieces: shipped fault plans by name, and what it says when an envoy exits."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.faults import FaultPlan
from node.demo.cli import _exit_line
from node.demo.launcher import Federation, Options, Proc, fault_plan_file, shipped_fault_plans
from protocol.configfile import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_shipped_fault_plans_are_the_repositorys_and_load_by_name(tmp_path, monkeypatch):
    names = shipped_fault_plans()
    assert names == sorted(p.stem for p in (REPO / "configs" / "faults").glob("*.toml"))
    assert "chaos" in names
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the package's copy is found
    for name in names:
        path = fault_plan_file(name)
        assert path.read_bytes() == (REPO / "configs" / "faults" / f"{name}.toml").read_bytes()
        FaultPlan.load(path)
    # A file of that name in the working folder wins over the shipped plan.
    (tmp_path / "chaos").write_text("seed = 1\n")
    assert fault_plan_file("chaos") == Path("chaos")
    # Anything else stays a path, and loading it names it.
    assert fault_plan_file("nope") == Path("nope")
    with pytest.raises(ConfigError, match="nope"):
        FaultPlan.load(fault_plan_file("nope"))


def test_a_normal_leave_says_nothing_and_a_crash_says_whether_it_was_planned(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text('seed = 1\n[[crash]]\nenvoy = "envoy-2"\nround = 1\nstage = "share_keys"\n')
    fed = Federation(Options(envoys=3, out=str(tmp_path / "run"), faults=str(plan)))
    fed.plan = FaultPlan.load(plan)
    for name in fed.names:
        fed.procs[name] = Proc(name, None, tmp_path / f"{name}.log")  # type: ignore[arg-type]
    assert _exit_line(fed, "envoy-1", 0) is None  # left after the director's Shutdown
    planned = _exit_line(fed, "envoy-2", 137)
    assert planned is not None and "as the fault plan says" in planned
    unplanned = _exit_line(fed, "envoy-3", -9)
    assert unplanned is not None and "UNPLANNED" in unplanned and "envoy-3.log" in unplanned
