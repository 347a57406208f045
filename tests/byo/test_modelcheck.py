"""Model fingerprints: equal exactly when the models are; a mismatch is refused and named."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.config import ModelConfig
from node.errors import ExitCode
from node.modelcheck import (
    RETELL_S,
    ModelGate,
    ModelMismatchError,
    differences,
    fingerprint,
    mismatch_error,
    model_summary,
)
from protocol.messages import ModelMismatch, ModelSummary
from tests.node.nodeharness import initial, make_fed

LAYERS = {"conv.weight": (8, 3, 3, 3), "fc.weight": (3, 32), "fc.bias": (3,)}
CUSTOM = ModelConfig(
    factory="team.nets:net",
    options={"width": 8},
    num_classes=3,
    in_channels=3,
    image_size=32,
    classes=["a", "b", "c"],
)


def fp(m: ModelConfig, layers=LAYERS) -> str:
    return fingerprint(model_summary(m, layers))


def test_the_same_config_and_weights_give_the_same_fingerprint() -> None:
    assert fp(CUSTOM) == fp(msgspec.structs.replace(CUSTOM))
    arrays = {k: np.zeros(v, np.float32) for k, v in LAYERS.items()}
    assert fingerprint(model_summary(CUSTOM, arrays)) == fp(CUSTOM)  # shapes or arrays alike
    # The initial seed is the director's business: envoys start from its weights.
    assert fp(msgspec.structs.replace(CUSTOM, init_seed=9)) == fp(CUSTOM)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"num_classes": 4, "classes": None}, "model.num_classes: there 3, here 4"),
        ({"classes": ["b", "a", "c"]}, 'model.classes: there ["a","b","c"], here ["b","a","c"]'),
        ({"options": {"width": 16}}, "model.options.width: there 8, here 16"),
        ({"options": {}}, "model.options.width: there 8, here unset"),
        (
            {"factory": "team.nets:other"},
            'model.factory: there "team.nets:net", here "team.nets:other"',
        ),
        ({"in_channels": 1}, "model.in_channels: there 3, here 1"),
        ({"image_size": 64}, "model.image_size: there 32, here 64"),
    ],
)
def test_every_setting_that_shapes_the_model_changes_it_and_is_named(change, named) -> None:
    other = msgspec.structs.replace(CUSTOM, **change)
    assert fp(other) != fp(CUSTOM)
    found = differences(model_summary(other, LAYERS), model_summary(CUSTOM, LAYERS))
    assert named in found, found


def test_weight_differences_are_named() -> None:
    mine = {**LAYERS, "fc.weight": (2, 32), "extra.bias": (5,)}
    del mine["conv.weight"]
    found = differences(model_summary(CUSTOM, mine), model_summary(CUSTOM, LAYERS))
    assert "weights only there: conv.weight" in found
    assert "weights only here: extra.bias" in found
    assert "weight shapes (there vs here): fc.weight [3, 32] vs [2, 32]" in found
    reordered = dict(reversed(list(LAYERS.items())))
    assert fp(CUSTOM, reordered) != fp(CUSTOM)
    assert differences(model_summary(CUSTOM, reordered), model_summary(CUSTOM, LAYERS)) == [
        "the same weights in another order"
    ]


def test_a_bundled_model_is_described_by_its_bundled_fields() -> None:
    a = ModelConfig(width=8)
    assert fp(a) != fp(msgspec.structs.replace(a, norm="group"))
    assert fp(a) == fp(msgspec.structs.replace(a, norm="batch"))  # unset means BatchNorm
    assert fp(a) != fp(msgspec.structs.replace(a, dropout=0.1))
    assert model_summary(a, LAYERS).settings["factory"] == '"node.training.model:build_model"'


_NAME = st.from_regex(r"[a-z]{1,6}(\.[a-z0-9]{1,4}){0,2}", fullmatch=True)
_LAYERS = st.dictionaries(_NAME, st.lists(st.integers(1, 9), max_size=4).map(tuple), max_size=6)
_OPTIONS = st.dictionaries(
    st.from_regex(r"[a-z_]{1,6}", fullmatch=True),
    st.one_of(st.integers(-5, 5), st.booleans(), st.text(max_size=4)),
    max_size=3,
)


@given(_OPTIONS, _LAYERS, _OPTIONS, _LAYERS)
def test_fingerprints_agree_exactly_when_nothing_differs(opt_a, lay_a, opt_b, lay_b) -> None:
    a = model_summary(msgspec.structs.replace(CUSTOM, options=opt_a), lay_a)
    b = model_summary(msgspec.structs.replace(CUSTOM, options=opt_b), lay_b)
    assert (fingerprint(a) == fingerprint(b)) == (a == b)
    assert (differences(a, b) == []) == (a == b)
    # What the director sends survives the wire.
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(a), type=ModelSummary)
    assert fingerprint(wire) == fingerprint(a)


def test_the_gate_refuses_tells_at_most_every_retell_period_and_forgives_a_fix() -> None:
    now = [0.0]
    gate = ModelGate(model_summary(CUSTOM, LAYERS), clock=lambda: now[0])
    assert gate.check("envoy-1", gate.fingerprint) is None
    assert gate.check("envoy-2", "") is None  # undeclared: not checked
    told = gate.check("envoy-3", "0" * 32)
    assert isinstance(told, ModelMismatch) and told.fingerprint == gate.fingerprint
    assert told.model == gate.summary
    assert gate.check("envoy-3", "0" * 32) is None  # heartbeats do not repeat it
    now[0] += RETELL_S
    assert gate.check("envoy-3", "0" * 32) is not None
    assert gate.admitted(["envoy-1", "envoy-2", "envoy-3"]) == ["envoy-1", "envoy-2"]
    assert gate.check("envoy-3", gate.fingerprint) is None  # restarted with the right config
    assert gate.admitted(["envoy-3"]) == ["envoy-3"]


def test_the_envoys_error_names_the_differences_and_is_a_config_error() -> None:
    mine = model_summary(msgspec.structs.replace(CUSTOM, num_classes=2, classes=None), LAYERS)
    err = mismatch_error(mine, model_summary(CUSTOM, LAYERS), source="/etc/fedbus/envoy.toml")
    assert isinstance(err, ModelMismatchError) and err.exit_code == ExitCode.CONFIG
    assert "[model] (/etc/fedbus/envoy.toml) does not build the federation's model" in str(err)
    assert "model.num_classes: the director 3, this envoy 2" in str(err)


async def test_a_mismatching_envoy_is_refused_told_why_and_the_rounds_go_on(tmp_path) -> None:
    fed = make_fed(tmp_path, 3, secure=True, rounds=1, min_envoys=2)
    director_model = fed.director_cfg.model
    layers = initial()
    right = model_summary(director_model, layers)
    wrong = model_summary(msgspec.structs.replace(director_model, num_classes=3), layers)
    envoys = {
        name: fed.start_envoy(name, model=wrong if name == "envoy-3" else right)
        for name in fed.envoy_cfgs
    }
    rc = await asyncio.wait_for(fed.director().run(), 120)
    refused = fed.tasks["envoy-3"]
    with pytest.raises(ModelMismatchError) as info:
        await asyncio.wait_for(refused, 30)
    await fed.stop()
    assert rc == 0
    assert "model.num_classes: the director 2, this envoy 3" in str(info.value)
    assert envoys["envoy-3"].rounds_trained == 0
    (record,) = fed.records()
    assert record["participants"] == ["envoy-1", "envoy-2"] and record["secure"]
    status = json.loads((tmp_path / "director" / "status.json").read_text())
    assert status["envoys"]["envoy-3"]["refused"] == "model mismatch"
    assert "refused" not in status["envoys"]["envoy-1"]
    from node.status import format_status

    shown = format_status(status, fed.records()).splitlines()
    assert any("envoy-3" in line and "REFUSED: model mismatch" in line for line in shown)
    assert not any("envoy-1" in line and "REFUSED" in line for line in shown)


def test_the_shipped_director_and_envoy_templates_describe_the_same_model() -> None:
    from node.config import load_director_config, load_envoy_config
    from tests.node.test_config import REPO

    director = load_director_config(REPO / "configs" / "director.toml").model
    envoy = load_envoy_config(REPO / "configs" / "envoy.toml").model
    assert fp(director) == fp(envoy), differences(
        model_summary(envoy, LAYERS), model_summary(director, LAYERS)
    )


async def test_an_envoy_that_ignores_the_refusal_is_never_counted(tmp_path) -> None:
    """A refused envoy that keeps running (an older fedbus, say) neither takes part nor has
    its validation scores summed: they would be read through another model's classes."""
    fed = make_fed(tmp_path, 3, secure=False, rounds=1, min_envoys=2)
    layers = initial()
    right = model_summary(fed.director_cfg.model, layers)
    wrong = model_summary(msgspec.structs.replace(fed.director_cfg.model, width=64), layers)
    for name in fed.envoy_cfgs:
        envoy = fed.start_envoy(name, model=wrong if name == "envoy-3" else right)
        if name == "envoy-3":
            envoy._model_refused = lambda body: None  # deaf to ModelMismatch
        else:  # the admitted envoys answer last, so the refused one's answer comes first
            slow = fed.trainers[name].evaluate
            fed.trainers[name].evaluate = lambda w, slow=slow: (time.sleep(0.5), slow(w))[1]
    rc = await asyncio.wait_for(fed.director().run(), 120)
    await fed.stop()
    assert rc == 0
    (record,) = fed.records()
    assert record["participants"] == ["envoy-1", "envoy-2"]
    assert record["metrics"]["evaluated_by"] == ["envoy-1", "envoy-2"]
    assert record["metrics"]["val"]["num_samples"] == 2 * 40
    assert fed.envoys["envoy-3"].evaluations == 1  # it did answer; the director did not count it
