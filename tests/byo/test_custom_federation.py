"""docs/bring-your-own.md followed as a new team would, in a clean virtual environment.

A fresh venv gets fedbus (built from this checkout's files, not this test process's
imports) and the page's package `hospital-ml` (written from the page's own code blocks)
installed with pip; then the page's `fedbus demo` command runs, from an empty folder and
without PYTHONPATH, as real processes: broker, director and two envoys that import the
team's factory, loader and trainer from the venv. The result is checked the way the page
describes it (report.json, per-class validation, the test split scored), and the model is
exported to ONNX through the same factory and run in onnxruntime.

Nothing can be downloaded here, so the venv takes its third-party packages (torch,
torchvision, ...) from the project's environment through a .pth file and pip installs
with --no-deps --no-index; fedbus and the team's package are installed for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.byo.docexample import CLASSES, demo_args, set_value, write_images, write_package

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run(args: list[str], **kw) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def checkout_copy(dest: Path) -> Path:
    """The files of this checkout (tracked and new), as a source tree to pip install."""
    listed = run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO
    ).stdout
    for name in filter(None, listed.split("\0")):
        src = REPO / name
        if src.is_symlink() or src.is_file():  # links as links (node/configs -> ../configs)
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)
    return dest


def _setuptools_version(folder: str) -> tuple[int, ...]:
    from importlib.metadata import distributions

    for dist in distributions(path=[folder]):
        if dist.metadata["Name"] == "setuptools":
            return tuple(int(p) for p in dist.version.split(".")[:3] if p.isdigit())
    return ()


def dependency_dirs() -> list[str]:
    """This environment's package folders, the one with the newest setuptools first: it is
    the build backend, and only setuptools >= 70.1 builds wheels without `wheel`."""
    dirs = [p for p in dict.fromkeys(sys.path) if p.endswith("site-packages") and Path(p).is_dir()]
    return sorted(dirs, key=_setuptools_version, reverse=True)


def clean_venv(where: Path) -> Path:
    run([sys.executable, "-m", "venv", str(where)])
    python = where / "bin" / "python"
    # The venv's own setuptools (whatever `venv` bundles) must not shadow the build backend.
    run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"])
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    pth = Path(site.stdout.strip()) / "zz_project_dependencies.pth"
    pth.write_text("".join(d + "\n" for d in dependency_dirs()))
    return python


def test_the_documented_example_from_a_clean_environment(tmp_path) -> None:
    python = clean_venv(tmp_path / "venv")
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    run([*pip, "--no-index", str(checkout_copy(tmp_path / "fedbus-src"))])
    run([*pip, "--no-index", str(write_package(tmp_path / "team"))])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEDBUS_DATA")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    where = run(
        [str(python), "-c", "import node, hospital_ml; print(node.__file__, hospital_ml.__file__)"],
        env=env,
        cwd=tmp_path,
    ).stdout.split()
    assert all(path.startswith(str(tmp_path / "venv")) for path in where), where

    work = tmp_path / "work"
    write_images(work / "xrays", per_class={"train": 30, "val": 10, "test": 10})
    args = demo_args()
    args = set_value(args, "ui.bind", "127.0.0.1:0")  # 8080 may be taken on a shared machine
    args += ["--quiet"]
    fedbus = str(tmp_path / "venv" / "bin" / "fedbus")
    demo = subprocess.run(
        [fedbus, *args], cwd=work, env=env, capture_output=True, text=True, timeout=1200
    )
    out = work / "runs" / "hospital"
    logs = {p.name: p.read_text() for p in (out / "logs").glob("*.log")} if out.exists() else {}
    assert demo.returncode == 0, demo.stderr[-4000:] + "\n".join(logs.values())[-4000:]
    assert "operator page http://127.0.0.1:" in demo.stderr

    # Each envoy trained with the team's trainer, on the team's model and data.
    for name in ("envoy-1", "envoy-2"):
        ready = next(
            json.loads(line)
            for line in logs[f"{name}.log"].splitlines()
            if '"trainer_ready"' in line
        )
        assert ready["trainer"] == "hospital_ml.Trainer"
        assert (ready["model"], ready["loader"]) == ("hospital_ml:net", "hospital_ml:folders")

    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(r["secure"] and len(r["survivors"]) == 2 for r in report["rounds"])
    val = report["rounds"][-1]["metrics"]["val"]
    assert val["classes"] == list(CLASSES) and val["num_samples"] == 3 * 10
    assert [c["class"] for c in val["per_class"]] == list(CLASSES)
    test = report["final"]["test"]
    assert test["num_samples"] == 3 * 10 and test["num_classes"] == 3
    assert test["auc"] > 0.9 and val["auc"] > 0.9, (val, test)

    # Export through the same factory, from the venv; onnxruntime agrees with torch.
    state = out / "director"
    run([fedbus, "export", str(state), "--best", "--format", "onnx"], env=env, cwd=work)
    card = json.loads((state / "export" / "model-card.json").read_text())
    assert card["classes"] == list(CLASSES) and card["decision_rule"] == "argmax of probabilities"
    assert card["model"]["factory"] == "hospital_ml:net" and card["defence"]["name"] == "none"
    check = (
        "import numpy as np, onnxruntime as ort, torch\n"
        "from node.checkpoint import load_checkpoint\n"
        "from node.export import read_model_spec\n"
        "from node.models import build_configured_model\n"
        "from node.training.weights import set_weights\n"
        f"state = {str(state)!r}\n"
        "model = build_configured_model(read_model_spec(state)).eval()\n"
        "set_weights(model, load_checkpoint(state).best_weights_numpy())\n"
        "x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))\n"
        "got = ort.InferenceSession(state + '/export/model.onnx').run(None, {'image': x.numpy()})\n"
        "with torch.no_grad():\n"
        "    want = model(x)\n"
        "print(float(np.abs(got[0] - want.numpy()).max()), float(np.abs(got[1] - want.softmax(1).numpy()).max()))\n"
    )
    worst = [float(v) for v in run([str(python), "-c", check], env=env, cwd=work).stdout.split()]
    assert max(worst) < 1e-4 and np.isfinite(worst).all()
