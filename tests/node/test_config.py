"""Config validation: every wrong or missing field is an error naming the field and the file."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.config import (
    _PATH_FIELDS,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    EnvoyConfig,
    EvalConfig,
    load_director_config,
    load_envoy_config,
    model_kwargs,
    parse_config,
)
from node.director import train_plan_for_round, validation_metrics
from node.strategy import StrategyConfig
from node.training.histograms import histogram_vector
from protocol.configfile import ConfigError, dump_toml

REPO = Path(__file__).resolve().parents[2]

DIRECTOR: dict[str, Any] = {
    "federation": "fed1",
    "bus_url": "zmq+tcp://127.0.0.1:5555",
    "state_dir": "state",
    "rounds": 3,
    "min_envoys": 2,
    "target_envoys": 5,
    "participation": 0.8,
    "deadlines": {"training": 10.0, "share_keys": 5.0},
    "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1, "prox_mu": 0.01},
    "lr_schedule": {"kind": "cosine", "min_lr": 0.001},
    "model": {"arch": "cnn", "defense": "cvb", "width": 16},
    "secagg": {"clip": 0.5},
    "eval": {"bins": 50},
    "strategy": {"name": "fedavgm", "server_lr": 0.8, "momentum": 0.5},
}
ENVOY: dict[str, Any] = {
    "node_id": "envoy-1",
    "federation": "fed1",
    "bus_url": "zmq+tcp://127.0.0.1:5555",
    "state_dir": "state",
    "heartbeat_s": 1.0,
    "data": {
        "source": "pneumoniamnist",
        "path": "data/pneumoniamnist.npz",
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "index": 1, "count": 3, "seed": 0},
    },
    "model": {"arch": "cnn", "defense": "cvb"},
    "policy": {"max_local_epochs": 5, "max_prox_mu": 0.1},
}


def write(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(dump_toml(data))
    return path


def test_templates_in_configs_load():
    d = load_director_config(REPO / "configs" / "director.toml")
    e = load_envoy_config(REPO / "configs" / "envoy.toml")
    # Secure aggregation is the default; the model defaults to the CVB defence.
    assert d.insecure_plain_aggregation is False
    assert d.model.defense == "cvb"
    assert d.secagg.malicious is True
    # The shipped recipe picks its threshold by the binormal ROC (benchmarks/accuracy);
    # a config without [eval] keeps Youden's rule.
    assert d.eval.operating_point == "binormal"
    assert EvalConfig().operating_point == "youden"
    assert model_kwargs(e.model)["arch"] == d.model.arch
    # Plain FedAvg without a proximal term: what every federation ran before [strategy].
    assert d.strategy == StrategyConfig() and d.train.prox_mu == 0.0
    assert e.policy.max_prox_mu == 1.0
    # Paths are resolved against the config file's folder.
    assert Path(d.state_dir).is_absolute()
    assert (
        Path(e.data.path) == (REPO / "configs" / "../../shared/data/pneumoniamnist.npz").resolve()
    )


def test_valid_configs_roundtrip(tmp_path):
    d = load_director_config(write(tmp_path, "d.toml", DIRECTOR))
    assert d.rounds == 3 and d.deadlines.training == 10.0 and d.deadlines.unmask == 30.0
    assert d.state_dir == str(tmp_path / "state")
    assert d.strategy == StrategyConfig(name="fedavgm", server_lr=0.8, momentum=0.5)
    assert train_plan_for_round(d, 1).prox_mu == 0.01
    e = load_envoy_config(write(tmp_path, "e.toml", ENVOY))
    assert e.policy.max_prox_mu == 0.1
    assert e.data.partition.index == 1 and e.data.path == str(tmp_path / "data/pneumoniamnist.npz")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("rounds"), "rounds"),
        (lambda d: d.update(rounds="three"), "rounds"),
        (lambda d: d.update(rounds=0), "rounds"),
        (lambda d: d.update(bus_url="http://x"), "bus_url"),
        (lambda d: d["deadlines"].update(share_keys=-1.0), "deadlines.share_keys"),
        (lambda d: d["train"].update(lr="fast"), "train.lr"),
        (lambda d: d["train"].update(prox_mu=-0.1), "train.prox_mu"),
        (lambda d: d["strategy"].update(name="fedsgd"), "strategy.name"),
        (lambda d: d["strategy"].update(momentum=1.0), "strategy.momentum"),
        (lambda d: d["strategy"].update(server_lr=0), "strategy.server_lr"),
        (lambda d: d["strategy"].update(beta_2=0.9), "beta_2"),
        (lambda d: d["model"].update(defense="vae"), "model.defense"),
        (lambda d: d.update(eval={"operating_point": "argmax"}), "eval.operating_point"),
        (lambda d: d.update(eval={"target_sensitivity": 1.5}), "eval.target_sensitivity"),
        (lambda d: d["secagg"].update(clipp=1.0), "clipp"),
        (lambda d: d.update(participation=1.5), "participation"),
        (lambda d: d.update(federation="bad/fed"), "federation"),
        (lambda d: d.update(insecure_plain_aggregation="yes"), "insecure_plain_aggregation"),
    ],
)
def test_director_errors_name_field_and_file(tmp_path, mutate, field):
    data = copy.deepcopy(DIRECTOR)
    mutate(data)
    path = write(tmp_path, "director.toml", data)
    with pytest.raises(ConfigError) as info:
        load_director_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert field in msg


def test_cross_field_check_names_file(tmp_path):
    data = copy.deepcopy(DIRECTOR)
    data.update(min_envoys=6, target_envoys=3)
    path = write(tmp_path, "director.toml", data)
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*target_envoys"):
        load_director_config(path)


@pytest.mark.parametrize("bound", [-0.5, 101.0, float("nan")])
def test_an_envoy_prox_mu_bound_outside_its_range_names_the_field(tmp_path, bound):
    data = copy.deepcopy(ENVOY)
    data["policy"]["max_prox_mu"] = bound
    path = write(tmp_path, "envoy.toml", data)
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*policy.max_prox_mu"):
        load_envoy_config(path)


def test_envoy_cannot_take_the_broadcast_name(tmp_path):
    data = copy.deepcopy(ENVOY)
    data["node_id"] = "broadcast"
    path = write(tmp_path, "envoy.toml", data)
    with pytest.raises(ConfigError, match="node_id"):
        load_envoy_config(path)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_envoy_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [\n")
    with pytest.raises(ConfigError, match=re.escape(str(bad)) + ".*TOML"):
        load_director_config(bad)


def _leaves(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("envoy_signing_keys", "peer_signing_keys"):
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def _get_parent(d: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[k]
    return d, keys[-1]


# Values no field of either config accepts (every field is a number, bool, id, url or path
# of a constrained kind, and none is a list or table of this shape).
WRONG = st.sampled_from([[1, 2], {"x": {"y": 1}}, -(10**9), "☃" * 70])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.sampled_from(["director", "envoy"]),
    data=st.data(),
    value=WRONG,
    delete=st.booleans(),
)
def test_any_wrong_leaf_is_reported_with_its_path(tmp_path, which, data, value, delete):
    base = DIRECTOR if which == "director" else ENVOY
    cfg = copy.deepcopy(base)
    leaf = data.draw(st.sampled_from(_leaves(cfg)))
    parent, key = _get_parent(cfg, leaf)
    required = {
        "director": {"federation", "bus_url", "state_dir", "rounds"},
        "envoy": {"node_id", "federation", "bus_url", "state_dir", "data", "data.path"},
    }[which]
    if delete:
        if leaf not in required:
            return  # optional fields may be left out
        del parent[key]
    else:
        if isinstance(value, str) and key in _PATH_FIELDS:
            return  # any non-empty string is a valid path
        parent[key] = value
    path = write(tmp_path, f"{which}.toml", cfg)
    loader = load_director_config if which == "director" else load_envoy_config
    with pytest.raises(ConfigError) as info:
        loader(path)
    msg = str(info.value)
    assert str(path) in msg
    assert key in msg


@pytest.mark.parametrize(
    ("data", "field"),
    [
        # "folder" is a hospital's own folder: meaningless for the one shared npz.
        ({"source": "pneumoniamnist", "partition": {"scheme": "folder"}}, 'scheme "folder"'),
        ({"partition": {"scheme": "dirichlet", "index": 3, "count": 3}}, "index 3"),
        ({"partition": {"scheme": "iid", "count": 1}}, "count >= 2"),
        ({"image_size": 300}, "image_size"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_data_sections_that_make_no_sense_are_refused(tmp_path, data, field):
    bad = {**ENVOY, "data": {"path": "x.npz", **data}}
    with pytest.raises(ConfigError) as info:
        load_envoy_config(write(tmp_path, "e.toml", bad))
    assert field in str(info.value) and "e.toml" in str(info.value)


def test_an_image_folder_may_be_split_for_a_simulation_or_kept_whole(tmp_path):
    folder = {"source": "image_folder", "path": "xr"}
    whole = load_envoy_config(write(tmp_path, "a.toml", {**ENVOY, "data": folder}))
    assert whole.data.partition is None
    split = {**folder, "partition": {"scheme": "iid", "index": 1, "count": 2}}
    assert load_envoy_config(write(tmp_path, "b.toml", {**ENVOY, "data": split})).data.partition


@settings(max_examples=12, deadline=None)
@given(size=st.integers(MIN_IMAGE_SIZE - 20, MAX_IMAGE_SIZE + 20))
def test_one_set_of_image_size_bounds(size):
    """A size the config accepts builds a model; a size it refuses, build_model refuses."""
    from node.training.model import build_model

    table = {**ENVOY, "model": {"image_size": size}, "data": {"path": "x", "image_size": size}}
    try:
        cfg = parse_config(table, EnvoyConfig, source="e.toml", base=Path("."))
    except ConfigError:
        accepted = False
    else:
        accepted = True
        assert cfg.model.image_size == size
    assert accepted == (MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE)
    if accepted:
        build_model("cnn", "none", size, width=2)
    else:
        with pytest.raises(ValueError, match="image_size"):
            build_model("cnn", "none", size, width=2)


def test_director_round_metrics_sit_at_the_configured_operating_point(tmp_path):
    data = copy.deepcopy(DIRECTOR)
    data["eval"] = {"operating_point": "sensitivity", "target_sensitivity": 0.9}
    cfg = load_director_config(write(tmp_path, "director.toml", data))
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], [60, 140])
    p1 = 1 / (1 + np.exp(-rng.normal(np.where(labels == 1, 1.5, -1.5), 1.5)))
    vector = histogram_vector(np.stack([1 - p1, p1], axis=1), labels, cfg.eval.bins)
    m = validation_metrics(cfg, vector)
    assert m["operating_point"] == "sensitivity"
    assert m["operating_point_params"] == {"target": 0.9}
    assert 0.9 <= m["sensitivity"] <= m["sensitivity_ci"][1]
    # The same validation under Youden's rule is a different, less sensitive point here.
    youden = validation_metrics(msgspec.structs.replace(cfg, eval=EvalConfig()), vector)
    assert youden["operating_point"] == "youden" and youden["auc"] == m["auc"]
    assert youden["threshold"] >= m["threshold"]
