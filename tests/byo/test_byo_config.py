"""The bring-your-own config entries: accepted as documented, refused with field and file."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from node.config import (
    BUNDLED_FACTORY,
    ModelConfig,
    load_director_config,
    load_envoy_config,
    model_kwargs,
)
from node.demo.cli import config_has, route_settings
from node.demo.launcher import DemoError, flatten_keys, nested
from protocol.configfile import ConfigError, dump_toml

DIRECTOR: dict[str, Any] = {
    "federation": "fed1",
    "bus_url": "zmq+tcp://127.0.0.1:5555",
    "state_dir": "state",
    "rounds": 3,
    "model": {
        "factory": "hospital_ml.models:net",
        "options": {"width": 16, "blocks": [2, 2], "path": "not/a/config/path"},
        "num_classes": 3,
        "in_channels": 3,
        "image_size": 64,
        "classes": ["bacteria", "normal", "virus"],
    },
    "tracking": {"tensorboard": "tb"},
    "ui": {"bind": "127.0.0.1:8080"},
}
ENVOY: dict[str, Any] = {
    "node_id": "envoy-1",
    "federation": "fed1",
    "bus_url": "zmq+tcp://127.0.0.1:5555",
    "state_dir": "state",
    "data": {"loader": "hospital_ml.data:folders", "path": "xrays", "options": {"size": 64}},
    "train": {"trainer": "hospital_ml:Trainer", "device": "cuda:1", "options": {"lr": 3}},
    "model": DIRECTOR["model"],
}


def write(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(dump_toml(data))
    return path


def test_the_documented_entries_load(tmp_path) -> None:
    d = load_director_config(write(tmp_path, "director.toml", DIRECTOR))
    e = load_envoy_config(write(tmp_path, "envoy.toml", ENVOY))
    assert d.model.factory == "hospital_ml.models:net" and d.model.factory_name == d.model.factory
    assert d.model == e.model
    # Options are the team's: passed as written, never taken for config paths.
    assert d.model.options["path"] == "not/a/config/path"
    assert d.tracking.tensorboard == str(tmp_path / "tb")
    assert d.ui is not None and d.ui.bind == "127.0.0.1:8080"
    assert e.data.path == str(tmp_path / "xrays")  # config paths are relative to the file
    assert e.train.device == "cuda:1" and e.train.options == {"lr": 3}
    assert model_kwargs(d.model) == {
        "width": 16,
        "blocks": [2, 2],
        "path": "not/a/config/path",
        "num_classes": 3,
        "in_channels": 3,
        "image_size": 64,
    }


def test_the_bundled_model_is_the_default_factory() -> None:
    m = ModelConfig(width=8, in_channels=3)
    assert m.factory_name == BUNDLED_FACTORY
    assert model_kwargs(m)["in_channels"] == 3 and model_kwargs(m)["width"] == 8
    assert "in_channels" not in model_kwargs(ModelConfig())  # grey: build_model's default


@pytest.mark.parametrize(
    ("kind", "mutate", "words"),
    [
        ("director", lambda d: d["model"].update(width=8), r"model\.width configures"),
        (
            "director",
            lambda d: d["model"].update(arch="resnet18", norm="group"),
            r"model\.arch, model\.norm configure",
        ),
        ("director", lambda d: d["model"].pop("factory"), r"model\.options are the keyword"),
        ("director", lambda d: d["model"].update(classes=["a", "b"]), r"names 2 classes"),
        ("director", lambda d: d["model"].update(classes=["a", "a", "b"]), "a name twice"),
        ("director", lambda d: d["model"].update(factory="hospital_ml"), r"model\.factory"),
        ("director", lambda d: d["model"]["options"].update({"bad-key": 1}), "options"),
        ("director", lambda d: d["ui"].update(bind="8080"), r"ui\.bind"),
        ("envoy", lambda e: e["data"].update(source="image_folder"), r"data\.source configures"),
        ("envoy", lambda e: e["data"].pop("loader"), r"data\.options are the keyword"),
        ("envoy", lambda e: e["train"].update(device="gpu"), r"train\.device"),
        ("envoy", lambda e: e["train"].update(trainer="x:"), r"train\.trainer"),
        ("envoy", lambda e: e["train"].update(workers=-1), r"train\.workers"),
    ],
)
def test_wrong_entries_name_the_field_and_the_file(tmp_path, kind, mutate, words) -> None:
    data = copy.deepcopy(DIRECTOR if kind == "director" else ENVOY)
    mutate(data)
    path = write(tmp_path, f"{kind}.toml", data)
    load = load_director_config if kind == "director" else load_envoy_config
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(path) in str(info.value)
    assert re.search(words, str(info.value)), str(info.value)


def test_a_bundled_source_still_needs_its_path(tmp_path) -> None:
    data = copy.deepcopy(ENVOY)
    data["data"] = {"source": "pneumoniamnist"}
    with pytest.raises(ConfigError, match=r"data\.path is required for source 'pneumoniamnist'"):
        load_envoy_config(write(tmp_path, "envoy.toml", data))


def test_a_loader_needs_no_path(tmp_path) -> None:
    data = copy.deepcopy(ENVOY)
    data["data"] = {"loader": "hospital_ml:synthetic", "options": {"n": 10}}
    assert load_envoy_config(write(tmp_path, "envoy.toml", data)).data.path is None


@pytest.mark.parametrize(
    ("key", "side"),
    [
        ("model.factory", "director"),
        ("model.options.width", "director"),
        ("train.local_epochs", "director"),
        ("ui.bind", "director"),
        ("tracking.tensorboard", "director"),
        ("data.loader", "envoy"),
        ("data.options.size", "envoy"),
        ("data.partition.alpha", "envoy"),
        ("train.device", "envoy"),
        ("train.trainer", "envoy"),
        ("train.options.anything", "envoy"),
    ],
)
def test_demo_settings_go_to_the_config_that_has_them(key, side) -> None:
    director, envoy = route_settings({key: "/x"})
    assert (director if side == "director" else envoy) == {key: "/x"}
    assert (envoy if side == "director" else director) == {}


def test_a_demo_setting_nobody_has_is_an_error() -> None:
    from node.config import DirectorConfig

    assert not config_has(DirectorConfig, "model.factory.x")
    with pytest.raises(DemoError, match=r"--set train\.devise: neither"):
        route_settings({"train.devise": "cpu"})


def test_demo_paths_on_the_command_line_are_from_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    director, envoy = route_settings({"data.path": "xrays", "tracking.tensorboard": "tb"})
    assert envoy == {"data.path": str(tmp_path / "xrays")}
    assert director == {"tracking.tensorboard": str(tmp_path / "tb")}


def test_flatten_and_nest_are_inverse() -> None:
    table = {"data": {"path": None, "partition": {"index": 1}}, "model": {"options": {}}}
    assert nested(flatten_keys(table)) == table
