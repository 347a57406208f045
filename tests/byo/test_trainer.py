"""An envoy's trainer from its config: the team's own or the bundled one, on any data."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node.config import EnvoyConfig, parse_config
from node.entrypoints import EntryPointError
from node.errors import ExitCode
from node.localdata import DataMismatch, load_local_data
from node.modelcheck import fingerprint, model_summary
from node.models import initial_model_weights
from node.trainer import Predictions, TorchTrainer, make_trainer
from node.training.device import DeviceUnavailable
from protocol.messages import TrainPlan
from tests.byo.docexample import CLASSES, write_images, write_package
from tests.datafiles import PNEUMONIAMNIST
from tests.dicomfiles import synthetic_xray, write_dicom

MODEL = {
    "factory": "hospital_ml:net",
    "num_classes": 3,
    "in_channels": 3,
    "image_size": 32,
    "classes": list(CLASSES),
}
PLAN = TrainPlan(local_epochs=1, batch_size=16, lr=0.05)


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Path:
    """The documented package on sys.path, and images in its layout; the images' root."""
    root = tmp_path_factory.mktemp("team")
    sys.path.insert(0, str(write_package(root)))
    yield write_images(root / "xrays", per_class={"train": 8, "val": 4, "test": 2})
    sys.path.remove(str(root / "hospital-ml"))
    sys.modules.pop("hospital_ml", None)


def envoy(tmp_path: Path, *, data: dict, model: dict | None = None, **extra: Any) -> EnvoyConfig:
    raw = {
        "node_id": "envoy-1",
        "federation": "f",
        "bus_url": "zmq+tcp://127.0.0.1:1",
        "state_dir": "s",
        "data": data,
        "model": MODEL if model is None else model,
        "train": {"device": "cpu", **extra.pop("train", {})},
        **extra,
    }
    return parse_config(raw, EnvoyConfig, source="envoy.toml", base=tmp_path)


def team_data(team: Path, **partition: Any) -> dict:
    out: dict = {"loader": "hospital_ml:folders", "path": str(team)}
    if partition:
        out["partition"] = partition
    return out


def test_the_teams_trainer_trains_and_evaluates_its_model_on_its_data(team, tmp_path) -> None:
    cfg = envoy(tmp_path, data=team_data(team), train={"trainer": "hospital_ml:Trainer"})
    trainer, summary = make_trainer(cfg)
    assert type(trainer).__module__ == "hospital_ml" and type(trainer).__name__ == "Trainer"
    # The envoy's model is the director's: same factory, same arguments.
    director_weights = initial_model_weights(cfg.model)
    assert fingerprint(summary) == fingerprint(model_summary(cfg.model, director_weights))
    new, n, loss = trainer.train(director_weights, PLAN, seed=1)
    assert n == 3 * 8 and np.isfinite(loss) and new.keys() == director_weights.keys()
    assert any(not np.array_equal(new[k], director_weights[k]) for k in new)
    pred = trainer.evaluate(new)
    assert pred.probabilities.shape == (3 * 4, 3) and sorted(set(pred.labels)) == [0, 1, 2]


def test_the_bundled_trainer_streams_a_loaders_data(team, tmp_path) -> None:
    cfg = envoy(tmp_path, data=team_data(team))
    trainer, _ = make_trainer(cfg)
    assert isinstance(trainer, TorchTrainer)
    weights = initial_model_weights(cfg.model)
    new, n, loss = trainer.train(weights, PLAN, seed=0)
    assert n == 24 and np.isfinite(loss)
    pred = trainer.evaluate(new)
    assert isinstance(pred, Predictions) and pred.probabilities.shape == (12, 3)
    assert np.allclose(pred.probabilities.sum(axis=1), 1) and pred.loss_sum > 0


def test_the_manifest_loader_of_dicom_files_plugs_in_as_a_loader(tmp_path) -> None:
    rows = ["path,label,patient_id,split"]
    for i in range(12):
        write_dicom(tmp_path / f"{i}.dcm", synthetic_xray(48, seed=i), patient_id=f"P{i}")
        rows.append(f"{i}.dcm,{['NORMAL', 'PNEUMONIA'][i % 2]},P{i},{'val' if i < 4 else 'train'}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = envoy(
        tmp_path,
        data={
            "loader": "node.training.manifest:manifest_datasets",
            "path": "manifest.csv",
            "options": {"size": 28, "channels": 1},
        },
        model={"width": 4, "classes": ["NORMAL", "PNEUMONIA"]},
    )
    trainer, _ = make_trainer(cfg)
    new, n, _ = trainer.train(initial_model_weights(cfg.model), PLAN, seed=0)
    assert n == 8
    assert trainer.evaluate(new).labels.tolist() == [0, 1, 0, 1]


def test_a_partition_deals_a_loaders_data_out_between_envoys(team, tmp_path) -> None:
    shares = [
        load_local_data(envoy(tmp_path, data=team_data(team, scheme="iid", index=i, count=2)))
        for i in range(2)
    ]
    for split in ("train", "val"):
        held = [sorted(getattr(s, split).indices) for s in shares]
        assert not set(held[0]) & set(held[1])
        assert sorted(held[0] + held[1]) == list(range(24 if split == "train" else 12))
    assert shares[0].classes == CLASSES


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        (
            {"model": {**MODEL, "classes": ["normal", "bacteria", "virus"]}},
            DataMismatch,
            r"names the classes \['bacteria', 'normal', 'virus'\]",
        ),
        (
            {"model": {**MODEL, "in_channels": 1}},
            DataMismatch,
            r"3 channel\(s\) \(shape \[3, 32, 32\]\), \[model\] in_channels = 1",
        ),
        (
            {"model": {**MODEL, "num_classes": 4, "classes": None}},
            DataMismatch,
            r"the data has 3 classes",
        ),
        (
            {"train": {"trainer": "hospital_ml:net"}},
            EntryPointError,
            r"net\(context\) raised TypeError",
        ),
        (
            {"train": {"trainer": "hospital_ml:folders"}},
            EntryPointError,
            r"train\.trainer = 'hospital_ml:folders'",
        ),
        (
            {"train": {"options": {"lr": 1}}},
            EntryPointError,
            r"train\.options are for a custom train\.trainer",
        ),
        ({"train": {"device": "cuda:7"}}, DeviceUnavailable, r"cuda:7"),
        (
            {"data": {"loader": "hospital_ml:net", "path": "x"}},
            EntryPointError,
            r"data\.loader = 'hospital_ml:net' raised TypeError",
        ),
    ],
)
def test_what_cannot_work_stops_the_envoy_with_a_config_error(
    team, tmp_path, change, error, words
) -> None:
    if "cuda:7" in str(change) and _gpus() > 7:
        pytest.skip("this machine has a cuda:7")
    args = {"data": team_data(team), **change}
    with pytest.raises(error, match=words) as info:
        make_trainer(envoy(tmp_path, **args))
    assert info.value.exit_code == ExitCode.CONFIG


def test_grey_data_for_an_rgb_model_is_refused(tmp_path) -> None:
    cfg = envoy(
        tmp_path,
        data={"path": str(PNEUMONIAMNIST), "limit": 20},
        model={"width": 4, "in_channels": 3},
    )
    with pytest.raises(DataMismatch, match=r"1 channel\(s\) .* in_channels = 3"):
        make_trainer(cfg)


def test_labels_beyond_the_classes_are_refused(tmp_path, monkeypatch) -> None:
    (tmp_path / "few.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def load(n):\n"
        "    x = torch.rand(n, 1, 28, 28)\n"
        "    return TensorDataset(x, torch.arange(n) % 3), TensorDataset(x, torch.zeros(n).long())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = envoy(tmp_path, data={"loader": "few:load", "options": {"n": 6}}, model={"width": 4})
    with pytest.raises(DataMismatch, match=r"train split has label 2, outside the classes 0\.\.1"):
        make_trainer(cfg)


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_the_configured_device_trains_and_evaluates(team, tmp_path, device) -> None:
    """[train] device reaches the model and every batch (on a GPU where this machine has one)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"no CUDA GPU on this machine (torch {torch.__version__}): GPU path not run")
    for trainer_name in (None, "hospital_ml:Trainer"):
        train = {"device": device, **({"trainer": trainer_name} if trainer_name else {})}
        cfg = envoy(tmp_path, data=team_data(team), train=train)
        trainer, _ = make_trainer(cfg)
        want = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        assert next(trainer.model.parameters()).device == want
        new, n, loss = trainer.train(initial_model_weights(cfg.model), PLAN, seed=0)
        assert n == 24 and np.isfinite(loss) and all(v.dtype == np.float32 for v in new.values())
        assert trainer.evaluate(new).probabilities.shape == (12, 3)
