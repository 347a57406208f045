"""The `fedbus` entry point: dispatch, no torch for the broker, version, log levels, exit
statuses (and the README tables of exit codes and environment variables), status output."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.client.bus import BusError
from broker.faults.plan import FaultPlanError
from broker.keys import KeyFileError
from broker.server.daemon import ListenError
from node.cli import COMMANDS, _take_log_level, exit_code_for, main
from node.director import DirectorError
from node.errors import ExitCode
from node.logs import LEVELS, LOG_LEVEL_ENV, resolve_level
from node.roundlog import encode_line
from node.status import format_status, read_status
from node.training.data import DataUnavailable
from protocol.configfile import ConfigError

REPO = Path(__file__).resolve().parents[2]


def run_py(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=REPO
    )


def test_broker_subcommand_never_imports_torch():
    code = (
        "import sys\n"
        "from node.cli import main\n"
        "try:\n"
        "    main(['broker', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'matplotlib'))\n"
        "print('HEAVY', heavy)\n"
    )
    res = run_py(code)
    assert "HEAVY []" in res.stdout, res.stdout + res.stderr
    assert "--config" in res.stdout  # the broker daemon's own help


def test_usage_and_unknown_command(capsys):
    # Bare `fedbus` is a request for help: usage on stdout, status 0.
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fedbus") and all(c in out for c in COMMANDS)
    assert main(["--help"]) == 0
    assert "director" in capsys.readouterr().out
    assert main(["nope"]) == ExitCode.USAGE == 2
    assert "unknown command" in capsys.readouterr().err


def test_version_is_the_installed_distributions(capsys):
    import node

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fedbus {version('fedbus')}"
    assert node.__version__ == version("fedbus")
    res = subprocess.run(
        [sys.executable, "-m", "node.cli", "--version"], capture_output=True, text=True
    )
    assert res.returncode == 0 and res.stdout.strip() == f"fedbus {version('fedbus')}"


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--log-level", "loud", "status", "x"], {}, "--log-level 'loud'"),
        (["status", "x", "--log-level=LOUD"], {}, "--log-level 'LOUD'"),
        (["status", "x", "--log-level"], {}, "--log-level needs a value"),
        (["status", "x"], {LOG_LEVEL_ENV: "chatty"}, f"${LOG_LEVEL_ENV} 'chatty'"),
    ],
)
def test_a_bad_log_level_is_a_usage_error(monkeypatch, capsys, argv, env, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == ExitCode.USAGE
    assert expected in capsys.readouterr().err


def test_log_level_precedence():
    assert resolve_level(None, {}) == "info"
    assert resolve_level(None, {LOG_LEVEL_ENV: "WARNING"}) == "warning"
    assert resolve_level("debug", {LOG_LEVEL_ENV: "error"}) == "debug"
    with pytest.raises(ValueError, match=LOG_LEVEL_ENV):
        resolve_level(None, {LOG_LEVEL_ENV: "verbose"})


_TOKENS = st.lists(
    st.text(alphabet="abcdefgh-=./", min_size=1, max_size=8).filter(
        lambda t: t != "--" and not t.startswith("--log-level")
    ),
    max_size=8,
)


@given(args=_TOKENS, at=st.integers(0, 8), level=st.sampled_from(LEVELS), joined=st.booleans())
def test_log_level_is_taken_from_anywhere_before_double_dash(args, at, level, joined):
    at = min(at, len(args))
    flag = [f"--log-level={level}"] if joined else ["--log-level", level]
    tail = ["--", "--log-level", "x"]
    got_level, rest = _take_log_level([*args[:at], *flag, *args[at:], *tail])
    assert got_level == level
    assert rest == [*args, *tail]  # order kept; after `--` nothing is taken


def _broker_events(*args: str, env: dict[str, str]) -> list[dict]:
    """Start `fedbus broker --insecure-no-auth` on a free port, stop it, its JSON events."""
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "node.cli", "broker", "--insecure-no-auth",
                "--bind", "tcp://127.0.0.1:0", "--ready-file", str(ready), *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )  # fmt: skip
        try:
            while not ready.exists():
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate()
    assert proc.returncode == 0, err
    return [json.loads(line) for line in err.splitlines()]  # every line is JSON


@pytest.mark.parametrize(
    ("args", "env", "levels"),
    [
        ((), {LOG_LEVEL_ENV: ""}, {"info", "warning"}),
        (("--log-level", "warning"), {}, {"warning"}),
        ((), {LOG_LEVEL_ENV: "warning"}, {"warning"}),
        (("--log-level", "error"), {LOG_LEVEL_ENV: "debug"}, set()),
    ],
)
def test_the_broker_logs_json_at_the_level_asked(args, env, levels):
    events = _broker_events(*args, env=env)
    assert {e["level"] for e in events} == levels
    assert all(e["node"] == "broker" and "round" in e and "stage" in e for e in events)


def test_a_taken_address_is_bus_unreachable():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "node.cli", "broker", "--insecure-no-auth",
             "--bind", f"tcp://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
        )  # fmt: skip
    assert res.returncode == ExitCode.BUS_UNREACHABLE == 4, res.stderr
    assert "fedbus broker:" in res.stderr and "Address already in use" in res.stderr


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfigError("f.toml: bad"), ExitCode.CONFIG),
        (FaultPlanError("plan.toml: bad"), ExitCode.CONFIG),
        (KeyFileError("key: bad"), ExitCode.CONFIG),
        (DataUnavailable("no data"), ExitCode.CONFIG),
        (BusError("refused"), ExitCode.BUS_UNREACHABLE),
        (ListenError("taken"), ExitCode.BUS_UNREACHABLE),
        (DirectorError("locked"), ExitCode.STATE),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED),
        (ValueError("a bug"), None),
        (RuntimeError("a bug"), None),
    ],
)
def test_errors_map_to_the_documented_exit_codes(exc, code):
    assert exit_code_for(exc) == code


def test_readme_exit_code_table_is_exit_code():
    text = (REPO / "README.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `?(\d+)`? \| `(\w+)` \|", section, flags=re.M)
    assert [(int(n), name) for n, name in rows] == [(int(c), c.name) for c in ExitCode]


def test_every_environment_variable_is_documented():
    text = (REPO / "README.md").read_text()
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(FEDBUS_\w+)` \|", section, flags=re.M))
    used = set()
    for package in ("node", "broker", "protocol", "crypto", "gradient_leakage"):
        for path in (REPO / package).rglob("*.py"):
            used |= set(re.findall(r"\bFEDBUS_[A-Z_]+\b", path.read_text()))
    assert used and used <= documented, used - documented


def test_director_with_a_bad_config_names_file_and_field(tmp_path, capsys):
    cfg = tmp_path / "director.toml"
    cfg.write_text(
        'federation = "f"\nbus_url = "zmq+tcp://127.0.0.1:1"\nstate_dir = "s"\nrounds = "x"\n'
    )
    assert main(["director", "--config", str(cfg)]) == ExitCode.CONFIG == 3
    err = capsys.readouterr().err
    assert str(cfg) in err and "rounds" in err


def test_demo_without_data_says_how_to_get_it(tmp_path):
    res = run_py(
        f"import sys; from node.cli import main; sys.exit(main(['demo', '--out', '{tmp_path / 'run'}']))",
        FEDBUS_DATA="",
        HOME=str(tmp_path),
    )
    assert res.returncode == ExitCode.CONFIG == 3
    assert "--data" in res.stderr and "FEDBUS_DATA" in res.stderr
    assert "pneumoniamnist" in res.stderr.lower()
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_status_reads_a_state_dir(tmp_path, capsys):
    status = {
        "federation": "demo",
        "round": 3,
        "stage": "masked_input",
        "rounds_total": 20,
        "secure": True,
        "updated": time.time(),
        "envoys": {
            "envoy-1": {"online": True, "last_seen_s": 0.4, "stage": "training"},
            "envoy-2": {"online": False, "last_seen_s": 31.0, "stage": ""},
        },
    }
    (tmp_path / "status.json").write_text(json.dumps(status))
    rec = {
        "round": 1,
        "survivors": ["envoy-1"],
        "dropped": ["envoy-2"],
        "seconds": 4.2,
        "metrics": {"val": {"accuracy": 0.9, "auc": 0.95}},
    }
    # The last line is being written: it must be skipped, not crash the reader.
    (tmp_path / "rounds.jsonl").write_bytes(encode_line(rec) + b'{"record": {"round": 2, "surv')
    st, records = read_status(tmp_path)
    assert [r["round"] for r in records] == [1]
    text = format_status(st, records)
    assert "round 3/20" in text and "OFFLINE" in text and "envoy-2" in text
    assert main(["status", str(tmp_path)]) == 0
    assert "masked_input" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        read_status(tmp_path / "missing")
    assert main(["status", str(tmp_path / "missing")]) == ExitCode.STATE == 7
