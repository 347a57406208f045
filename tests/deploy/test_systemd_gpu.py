"""The GPU drop-in for envoys: systemd reads it, it opens the NVIDIA nodes and nothing else."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.test_systemd import REPO, _stubbed, settings

ENVOY_UNIT = REPO / "configs" / "systemd" / "fedbus-envoy@.service"
DROP_IN = REPO / "configs" / "systemd" / "fedbus-envoy@.service.d" / "gpu.conf"


def _unit_with_drop_in(tmp_path: Path, drop_in_text: str) -> Path:
    """The stubbed envoy instance beside its template's drop-in folder, as under /etc/systemd."""
    unit = _stubbed(ENVOY_UNIT, tmp_path)
    folder = tmp_path / "fedbus-envoy@.service.d"
    folder.mkdir()
    (folder / "gpu.conf").write_text(drop_in_text)
    return unit


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True
    )


def _exposure(unit: Path) -> tuple[float, str]:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True
    ).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    return float(match.group(1)), out


def test_the_drop_in_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _unit_with_drop_in(tmp_path, DROP_IN.read_text())
    result = _verify(unit)
    assert result.returncode == 0, result.stderr
    assert "gpu.conf" not in result.stderr and unit.name not in result.stderr, result.stderr


def test_verify_really_reads_the_drop_in(tmp_path: Path) -> None:
    """A misspelt key in the drop-in is reported: the check above is not vacuous."""
    unit = _unit_with_drop_in(tmp_path, DROP_IN.read_text() + "DeviceAlow=/dev/nvidia0 rw\n")
    assert "Unknown key 'DeviceAlow'" in _verify(unit).stderr


def test_the_drop_in_opens_the_gpu_nodes_and_keeps_the_device_cgroup_closed() -> None:
    found = settings(DROP_IN)
    assert found["PrivateDevices"] == ["no"]  # a private /dev has no /dev/nvidia*
    assert found["DevicePolicy"] == ["closed"]
    assert found["DeviceAllow"] == ["char-nvidia* rw"]  # no 'm': no mknod
    assert found["ProcSubset"] == ["all"]  # /proc/driver/nvidia
    # It loosens nothing else of the envoy's sandbox.
    assert set(found) == {"PrivateDevices", "DevicePolicy", "DeviceAllow", "ProcSubset"}


def test_the_gpu_envoy_stays_well_sandboxed(tmp_path: Path) -> None:
    for name in ("plain", "gpu"):
        (tmp_path / name).mkdir()
    base, _ = _exposure(_stubbed(ENVOY_UNIT, tmp_path / "plain"))
    gpu, report = _exposure(_unit_with_drop_in(tmp_path / "gpu", DROP_IN.read_text()))
    assert "Service potentially has access to hardware devices" in report  # drop-in applied
    assert base < gpu <= 2.0, report


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA driver on this host")
def test_the_allowed_device_groups_exist_on_this_gpu_host() -> None:
    groups = Path("/proc/devices").read_text()
    assert re.search(r"^\s*\d+ nvidia", groups, re.M), groups
