"""An envoy's share of the data, computed locally from its config alone."""

from __future__ import annotations

import numpy as np
import pytest

from node.config import EnvoyConfig, parse_config
from node.localdata import load_local_data
from tests.datafiles import KERMANY_SAMPLE, PNEUMONIAMNIST

NPZ = PNEUMONIAMNIST


def cfg(tmp_path, data: dict) -> EnvoyConfig:
    raw = {
        "node_id": "envoy-1",
        "federation": "f",
        "bus_url": "zmq+tcp://127.0.0.1:1",
        "state_dir": "s",
        "data": data,
    }
    return parse_config(raw, EnvoyConfig, source="test", base=tmp_path)


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_envoys_partition_pneumoniamnist_disjointly_and_completely(tmp_path, scheme):
    n = 4
    parts = [
        load_local_data(
            cfg(
                tmp_path,
                {
                    "path": str(NPZ),
                    "partition": {
                        "scheme": scheme,
                        "alpha": 0.5,
                        "index": i,
                        "count": n,
                        "seed": 3,
                    },
                },
            )
        )
        for i in range(n)
    ]
    from node.training.data import load_pneumoniamnist

    ds = load_pneumoniamnist(NPZ)
    for split, full in (("train", ds.train), ("val", ds.val)):
        sizes = [len(getattr(p, split).labels) for p in parts]
        assert sum(sizes) == len(full.labels) and min(sizes) > 0
        # Same multiset of images: every image is held by exactly one envoy.
        ours = np.concatenate([getattr(p, split).images for p in parts]).reshape(sum(sizes), -1)
        keys = sorted(map(bytes, ours))
        assert keys == sorted(map(bytes, full.images.reshape(len(full.labels), -1)))
    # Deterministic: a second load gives the same share.
    again = load_local_data(
        cfg(
            tmp_path,
            {"path": str(NPZ), "partition": {"scheme": scheme, "index": 2, "count": n, "seed": 3}},
        )
    )
    assert np.array_equal(again.train.labels, parts[2].train.labels)


def test_limit_takes_a_subset(tmp_path):
    d = load_local_data(cfg(tmp_path, {"path": str(NPZ), "limit": 100}))
    assert len(d.train.labels) == 100 and len(d.val.labels) == 100


def test_image_folder_is_one_hospitals_data(tmp_path):
    d = load_local_data(
        cfg(
            tmp_path,
            {
                "source": "image_folder",
                "path": str(KERMANY_SAMPLE),
                "image_size": 28,
                "val_fraction": 0.25,
                "partition": {"scheme": "folder"},
            },
        )
    )
    assert d.train.images.shape[1:] == (28, 28) and d.train.images.dtype == np.uint8
    assert len(d.train.labels) + len(d.val.labels) == 16
    assert set(d.val.labels.tolist()) == {0, 1}  # stratified hold-out


def test_an_image_folder_without_a_partition_is_trained_whole(tmp_path):
    # What `fedbus provision --data FOLDER` writes into a hospital's kit: no [data.partition].
    c = cfg(tmp_path, {"source": "image_folder", "path": str(KERMANY_SAMPLE), "val_fraction": 0.25})
    assert c.data.partition is None
    d = load_local_data(c)
    assert len(d.train.labels) + len(d.val.labels) == 16


def test_pneumoniamnist_without_a_partition_is_the_whole_file(tmp_path):
    d = load_local_data(cfg(tmp_path, {"path": str(NPZ)}))
    assert (len(d.train.labels), len(d.val.labels)) == (4708, 524)
