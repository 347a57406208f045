"""The `fedbus` entry point: dispatch, no torch for the broker, clear errors, status output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.cli import main
from node.roundlog import encode_line
from node.status import format_status, read_status

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
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "director" in capsys.readouterr().out
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_director_with_a_bad_config_names_file_and_field(tmp_path, capsys):
    cfg = tmp_path / "director.toml"
    cfg.write_text(
        'federation = "f"\nbus_url = "zmq+tcp://127.0.0.1:1"\nstate_dir = "s"\nrounds = "x"\n'
    )
    assert main(["director", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "rounds" in err


def test_demo_without_data_says_how_to_get_it(tmp_path):
    res = run_py(
        f"import sys; from node.cli import main; sys.exit(main(['demo', '--out', '{tmp_path / 'run'}']))",
        FEDBUS_DATA="",
        HOME=str(tmp_path),
    )
    assert res.returncode == 2
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
    assert main(["status", str(tmp_path / "missing")]) == 1
