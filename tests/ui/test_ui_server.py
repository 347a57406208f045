"""The page served for real: uvicorn on loopback, TLS and credentials beyond it, SSE, headers."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from node.errors import ExitCode
from node.provision import issue_cert, make_ca
from node.roundlog import encode_line
from node.ui.feed import MemoryFeed
from node.ui.server import UiConfig, UiConfigError, check_bind_policy, parse_bind
from tests.ui.uiharness import director_status, round_record, serving

PASSWORD = "correct horse battery"


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:9", ("::1", 9)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_bind_parses(bind: str, expected: tuple[str, int]) -> None:
    assert parse_bind(bind) == expected


@pytest.mark.parametrize("bind", ["127.0.0.1", "http://127.0.0.1:80", "::1:80", "127.0.0.1:99999"])
def test_bad_binds_are_refused(bind: str) -> None:
    with pytest.raises(UiConfigError, match=r"ui\.bind"):
        parse_bind(bind)


@pytest.mark.parametrize("bind", ["127.0.0.1:8080", "127.9.9.9:1", "[::1]:8080", "localhost:8080"])
def test_loopback_needs_nothing(bind: str) -> None:
    check_bind_policy(UiConfig(bind=bind))


@pytest.mark.parametrize(
    "bind", ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080", "director.example.org:443"]
)
def test_beyond_loopback_is_refused_without_tls_and_credentials(bind: str) -> None:
    for extra in ({}, {"tls_cert": "c", "tls_key": "k"}, {"username": "op", "password_file": "p"}):
        with pytest.raises(UiConfigError, match="beyond loopback") as info:
            check_bind_policy(UiConfig(bind=bind, **extra))
        assert info.value.exit_code == ExitCode.CONFIG
    check_bind_policy(
        UiConfig(bind=bind, tls_cert="c", tls_key="k", username="op", password_file="p")
    )


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"tls_cert": "c"}, "tls_cert and tls_key"),
        ({"password_file": "p"}, "username and password_file"),
    ],
)
def test_half_configured_protection_is_an_error(extra: dict, match: str) -> None:
    with pytest.raises(UiConfigError, match=match):
        check_bind_policy(UiConfig(bind="127.0.0.1:1", **extra))


def _feed() -> MemoryFeed:
    feed = MemoryFeed()
    feed.publish_status(director_status(1, "training", online={"envoy-1": True, "envoy-2": True}))
    return feed


def test_the_page_its_assets_and_the_snapshot_over_http() -> None:
    with serving(_feed()) as page, httpx.Client(base_url=f"http://127.0.0.1:{page.port}") as c:
        html = c.get("/")
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        assert '<script src="/static/app.js"' in html.text
        assert "default-src 'none'" in html.headers["content-security-policy"]
        assert html.headers["x-frame-options"] == "DENY"
        assert html.headers["cache-control"] == "no-store"
        assert c.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        snap = c.get("/api/snapshot").json()
        assert snap["federation"] == "pneumonia" and len(snap["envoys"]) == 2
        assert c.get("/nope").status_code == 404


def test_the_page_is_read_only() -> None:
    with serving(_feed()) as page, httpx.Client(base_url=f"http://127.0.0.1:{page.port}") as c:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            for path in ("/", "/api/snapshot", "/api/events"):
                assert c.request(method, path).status_code == 405, (method, path)


def test_a_foreign_host_header_is_refused() -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 gets no page."""
    with serving(_feed()) as page, httpx.Client(base_url=f"http://127.0.0.1:{page.port}") as c:
        refused = c.get("/api/snapshot", headers={"Host": f"evil.example:{page.port}"})
        assert refused.status_code == 400
        assert refused.headers["x-content-type-options"] == "nosniff"
        assert c.get("/", headers={"Host": f"localhost:{page.port}"}).status_code == 200


def _events(response: httpx.Response):
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "snapshot":
            yield json.loads(line[6:])


def test_the_event_stream_sends_a_snapshot_when_the_federation_changes() -> None:
    feed = _feed()
    with (
        serving(feed) as page,
        httpx.Client(base_url=f"http://127.0.0.1:{page.port}", timeout=httpx.Timeout(60.0)) as c,
        c.stream("GET", "/api/events") as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = _events(response)
        first = next(stream)
        assert first["round"] == 1 and first["rounds"] == []
        feed.publish_record(round_record(1, dropped=["envoy-3"]))
        feed.publish_status(director_status(2, "share_keys", online={"envoy-1": True}))
        second = next(stream)
        while second["round"] != 2 or not second["rounds"]:  # the two publishes may split
            second = next(stream)
        assert second["stage"] == "share_keys"
        assert second["rounds"][0]["dropped"] == ["envoy-3"]


def _certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A server certificate for 127.0.0.1 from a federation CA, as `fedbus provision` makes."""
    ca_key, ca_cert = make_ca("fed")
    key, cert = issue_cert(
        ca_key, ca_cert, common_name="director", server_names=["127.0.0.1"], client=False
    )
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    for path, data in zip(paths, (ca_cert, cert, key), strict=True):
        path.write_bytes(data)
    return paths


def test_beyond_loopback_it_serves_tls_and_asks_for_credentials(tmp_path: Path) -> None:
    ca, cert, key = _certificate(tmp_path)
    (tmp_path / "password").write_text(PASSWORD + "\n")
    cfg = UiConfig(
        bind="0.0.0.0:0",
        tls_cert=str(cert),
        tls_key=str(key),
        username="operator",
        password_file=str(tmp_path / "password"),
    )
    trust = ssl.create_default_context(cafile=str(ca))
    with serving(_feed(), cfg) as page:
        assert page.scheme == "https"
        base = f"https://127.0.0.1:{page.port}"
        with httpx.Client(base_url=base, verify=trust) as c:
            anonymous = c.get("/api/snapshot")
            assert anonymous.status_code == 401
            assert anonymous.headers["www-authenticate"].startswith("Basic ")
            assert c.get("/", auth=("operator", "wrong password!")).status_code == 401
            assert c.get("/", auth=("admin", PASSWORD)).status_code == 401
            ok = c.get("/api/snapshot", auth=("operator", PASSWORD))
            assert ok.status_code == 200 and ok.json()["federation"] == "pneumonia"
        with pytest.raises(httpx.RemoteProtocolError):  # no plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{page.port}/", timeout=10)


def test_a_short_password_is_refused(tmp_path: Path) -> None:
    _ca, cert, key = _certificate(tmp_path)
    (tmp_path / "password").write_text("short\n")
    cfg = UiConfig(
        bind="127.0.0.1:0",
        tls_cert=str(cert),
        tls_key=str(key),
        username="op",
        password_file=str(tmp_path / "password"),
    )
    with pytest.raises(UiConfigError, match=">= 12 characters"):
        serving(_feed(), cfg).__enter__()


def test_a_port_in_use_is_a_clear_error_not_an_exit() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (
            pytest.raises(UiConfigError, match="cannot listen there"),
            serving(_feed(), UiConfig(bind=f"127.0.0.1:{port}")),
        ):
            pass


def test_fedbus_ui_serves_a_state_folder_until_sigterm(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from tests.datafiles import REPO

    (tmp_path / "status.json").write_text(
        json.dumps(director_status(2, "unmask", online={"envoy-1": True}))
    )
    (tmp_path / "rounds.jsonl").write_bytes(encode_line(round_record(1)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "ui", str(tmp_path), "--bind", "127.0.0.1:0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("operator page: http://127.0.0.1:"), line + proc.stderr.read()  # type: ignore[union-attr]
        url = line.split(": ", 1)[1].strip()
        snap = httpx.get(url + "api/snapshot", timeout=30).json()
        assert snap["stage"] == "unmask" and [r["round"] for r in snap["rounds"]] == [1]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fedbus_ui_refuses_a_public_bind_without_protection(tmp_path: Path, capsys) -> None:
    from node.cli import main as fedbus

    assert fedbus(["ui", str(tmp_path), "--bind", "0.0.0.0:8080"]) == ExitCode.CONFIG
    assert "beyond loopback" in capsys.readouterr().err
