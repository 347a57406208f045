"""node.ledger: an envoy trains each model once, whatever order a director asks in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.ledger import LEDGER_FILE, LedgerError, RoundLedger

# A director's requests: (round step forward 0..2, which of 4 models).
requests = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), min_size=1, max_size=30)


def play(ledger: RoundLedger, steps: list[tuple[int, int]]) -> list[tuple[int, str]]:
    """Every training the ledger allowed, as (round, model), the way the envoy asks it."""
    trained: list[tuple[int, str]] = []
    round = 1
    for step, m in steps:
        round += step
        model = f"model-{m}"
        if ledger.refuse_round(round, model, kept=False):
            continue
        ledger.begin(round, model)
        if (round, model) not in trained:
            ledger.trained(round)
            trained.append((round, model))
    return trained


@settings(max_examples=300, deadline=None)
@given(requests)
def test_no_model_is_trained_twice_and_rounds_only_move_forward(steps) -> None:
    trained = play(RoundLedger(), steps)
    models = [m for _, m in trained]
    rounds = [r for r, _ in trained]
    assert len(set(models)) == len(models), trained
    assert rounds == sorted(set(rounds)), trained


@settings(max_examples=100, deadline=None)
@given(requests, requests)
def test_a_restarted_envoy_remembers_what_it_trained(tmp_path_factory, before, after) -> None:
    state = tmp_path_factory.mktemp("envoy")
    first = play(RoundLedger.load(state), before)
    again = play(RoundLedger.load(state), [(max(step, 1), m) for step, m in after])
    models = [m for _, m in first + again]
    assert len(set(models)) == len(models), (first, again)


def test_an_honest_federation_is_never_refused() -> None:
    """A new model every round, attempts repeating the round: every round trains once."""
    ledger = RoundLedger()
    for round in range(1, 30):
        for attempt in range(3):
            reason = ledger.refuse_round(round, f"model-{round}", kept=attempt > 0)
            assert reason == "", (round, attempt, reason)
            ledger.begin(round, f"model-{round}")
            ledger.trained(round)


def test_a_ledger_from_before_the_model_list_still_loads(tmp_path: Path) -> None:
    old = {
        "training": {"round": 3, "weights": "w3", "trained": True, "signed": ""},
        "evaluation": {"round": 2, "model": "w3"},
    }
    (tmp_path / LEDGER_FILE).write_text(json.dumps(old))
    ledger = RoundLedger.load(tmp_path)
    assert "already trained" in ledger.refuse_round(4, "w3", kept=False)
    assert ledger.refuse_round(4, "w4", kept=False) == ""


def test_a_damaged_model_list_is_refused(tmp_path: Path) -> None:
    damaged = {
        "training": {"round": 3, "weights": "w3", "trained": True, "signed": ""},
        "evaluation": {"round": 2, "model": "w3"},
        "trained_models": [1, 2],
    }
    (tmp_path / LEDGER_FILE).write_text(json.dumps(damaged))
    with pytest.raises(LedgerError, match="trained_models"):
        RoundLedger.load(tmp_path)
