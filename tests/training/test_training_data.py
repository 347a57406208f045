"""Data sources on the real files: PneumoniaMNIST npz, its downloader, a Kermany folder."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from node.training.data import (
    DATA_ENV,
    PNEUMONIAMNIST_MD5,
    DataUnavailable,
    download_pneumoniamnist,
    load_image_folder,
    load_image_folder_dataset,
    load_pneumoniamnist,
    md5_of,
    stratified_holdout,
)
from tests.datafiles import KERMANY_SAMPLE, PNEUMONIAMNIST

NPZ = PNEUMONIAMNIST
KERMANY = KERMANY_SAMPLE


def test_pneumoniamnist_splits_shapes_and_labels() -> None:
    ds = load_pneumoniamnist(NPZ)
    for split, n, n_pos in ((ds.train, 4708, 3494), (ds.val, 524, 389), (ds.test, 624, 390)):
        assert split.images.shape == (n, 28, 28)
        assert split.images.dtype == np.uint8
        assert split.labels.dtype == np.int64
        assert split.labels.shape == (n,)
        assert int(split.labels.sum()) == n_pos
        assert set(np.unique(split.labels)) == {0, 1}


def test_folder_path_and_env_variable_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(load_pneumoniamnist(NPZ.parent).val) == 524
    monkeypatch.setenv(DATA_ENV, str(NPZ))
    assert len(load_pneumoniamnist().test) == 624


def test_missing_file_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataUnavailable) as err:
        load_pneumoniamnist(tmp_path / "nope.npz")
    text = str(err.value)
    assert "nope.npz" in text
    assert DATA_ENV in text
    assert "download_pneumoniamnist" in text
    assert PNEUMONIAMNIST_MD5 in text


def test_corrupted_file_fails_md5(tmp_path: Path) -> None:
    bad = tmp_path / "pneumoniamnist.npz"
    data = bytearray(NPZ.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(DataUnavailable, match="MD5"):
        load_pneumoniamnist(bad)


class _Server:
    """A real HTTP server on loopback serving one folder; never the internet."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[_Server, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(NPZ, root / "pneumoniamnist.npz")
    (root / "wrong.npz").write_bytes(b"not the data set" * 1000)
    srv = _Server(root)
    yield srv, root
    srv.close()


def test_download_verifies_and_writes(server: tuple[_Server, Path], tmp_path: Path) -> None:
    srv, _ = server
    dest_dir = tmp_path / "data"
    dest_dir.mkdir()
    path = download_pneumoniamnist(dest_dir, url=srv.url("pneumoniamnist.npz"))
    assert path == dest_dir / "pneumoniamnist.npz"
    assert md5_of(path) == PNEUMONIAMNIST_MD5
    assert len(load_pneumoniamnist(path).train) == 4708
    assert sorted(p.name for p in dest_dir.iterdir()) == ["pneumoniamnist.npz"]


def test_download_with_wrong_md5_leaves_nothing(
    server: tuple[_Server, Path], tmp_path: Path
) -> None:
    srv, _ = server
    dest = tmp_path / "out" / "pneumoniamnist.npz"
    with pytest.raises(DataUnavailable, match="MD5"):
        download_pneumoniamnist(dest, url=srv.url("wrong.npz"))
    assert list(dest.parent.iterdir()) == []


def test_download_http_error_is_data_unavailable(
    server: tuple[_Server, Path], tmp_path: Path
) -> None:
    srv, _ = server
    dest = tmp_path / "pneumoniamnist.npz"
    with pytest.raises(DataUnavailable, match="404"):
        download_pneumoniamnist(dest, url=srv.url("missing.npz"))
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]


def test_download_keeps_a_verified_file_without_fetching(tmp_path: Path) -> None:
    dest = tmp_path / "pneumoniamnist.npz"
    shutil.copy(NPZ, dest)
    # An unroutable URL: any fetch attempt would fail, so success proves none was made.
    assert download_pneumoniamnist(dest, url="http://127.0.0.1:9/none") == dest


def test_download_replaces_a_bad_existing_file(
    server: tuple[_Server, Path], tmp_path: Path
) -> None:
    srv, _ = server
    dest = tmp_path / "pneumoniamnist.npz"
    dest.write_bytes(b"stale")
    download_pneumoniamnist(dest, url=srv.url("pneumoniamnist.npz"))
    assert md5_of(dest) == PNEUMONIAMNIST_MD5


def test_kermany_sample_folder_loads_real_jpegs() -> None:
    split = load_image_folder(KERMANY, 28)
    n_normal = len(list((KERMANY / "NORMAL").glob("*.jpeg")))
    n_pneu = len(list((KERMANY / "PNEUMONIA").glob("*.jpeg")))
    assert split.images.shape == (n_normal + n_pneu, 28, 28)
    assert split.images.dtype == np.uint8
    assert split.labels.tolist() == [0] * n_normal + [1] * n_pneu
    # Real X-rays, not blank frames: a spread of grey levels in every image.
    assert (split.images.reshape(len(split), -1).std(axis=1) > 10).all()
    big = load_image_folder(KERMANY, 64)
    assert big.images.shape[1:] == (64, 64)
    again = load_image_folder(KERMANY, 28)
    assert np.array_equal(split.images, again.images)


def test_kermany_layout_with_split_folders(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            target = tmp_path / "chest_xray" / split / cls
            target.mkdir(parents=True)
            for f in sorted((KERMANY / cls).glob("*.jpeg"))[:3]:
                shutil.copy(f, target / f.name)
    train = load_image_folder(tmp_path, 32, split="train")
    assert train.images.shape == (6, 32, 32)
    ds = load_image_folder_dataset(tmp_path, 32, val_fraction=0.34, seed=1)
    assert len(ds.test) == 6
    assert len(ds.train) + len(ds.val) == 6
    assert set(ds.val.labels.tolist()) == {0, 1}


def test_image_folder_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailable, match="does not exist"):
        load_image_folder(tmp_path / "absent", 28)
    (tmp_path / "cats").mkdir()
    with pytest.raises(DataUnavailable, match="NORMAL"):
        load_image_folder(tmp_path, 28)
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "NORMAL" / "broken.jpeg").write_bytes(b"no jpeg")
    with pytest.raises(DataUnavailable, match=r"broken\.jpeg"):
        load_image_folder(tmp_path, 28)


def test_stratified_holdout_is_disjoint_and_keeps_both_classes() -> None:
    ds = load_pneumoniamnist(NPZ)
    keep, hold = stratified_holdout(ds.val, 0.2, seed=3)
    assert len(keep) + len(hold) == len(ds.val)
    assert abs(hold.labels.mean() - ds.val.labels.mean()) < 0.02
    assert set(hold.labels.tolist()) == {0, 1}
