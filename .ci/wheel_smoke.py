"""The wheel works on its own: install it into a fresh virtual environment and use it from an
empty folder outside the checkout, with no PYTHONPATH.

    python .ci/wheel_smoke.py dist/fedbus-X-py3-none-any.whl --data pneumoniamnist.npz

`fedbus --version` prints the wheel's version; `fedbus provision` writes kits from the
shipped director template (package data, not the checkout's configs/); `fedbus demo --envoys
2 --rounds 1` runs to the end (its broker, director and envoys are child processes that find
fedbus in the venv) and leaves a report, plots and JSON logs (.ci/check_demo.py).

torch is not downloaded again: the fresh venv sees the site-packages of the interpreter that
runs this script through a .pth file, as a view without fedbus's own install, and pip
installs the wheel with `[ml]`, taking from that view what is already there. Standard
library only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import site
import subprocess
import sys
import tempfile
import tomllib
import venv
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DISTRIBUTION = "fedbus"


def _site_dirs() -> list[Path]:
    """This interpreter's site-packages folders (a venv's, and those its .pth files add)."""
    dirs = [Path(p) for p in site.getsitepackages()]
    dirs += [Path(p) for p in sys.path if p.endswith("site-packages") and Path(p) not in dirs]
    return [d for d in dirs if d.is_dir()]


def _is_fedbus_install(name: str) -> bool:
    lower = name.lower()
    return lower.startswith(f"{DISTRIBUTION}-") or (
        lower.startswith("__editable__") and DISTRIBUTION in lower
    )


def make_base_view(into: Path) -> None:
    """Symlinks to every installed package here except fedbus itself (and .pth files)."""
    into.mkdir()
    for folder in _site_dirs():
        for entry in folder.iterdir():
            target = into / entry.name
            if entry.suffix == ".pth" or _is_fedbus_install(entry.name) or target.exists():
                continue
            target.symlink_to(entry)


def wheel_version(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        for line in zf.read(meta).decode().splitlines():
            if line.startswith("Version: "):
                return line.split(": ", 1)[1].strip()
    raise SystemExit(f"{wheel}: no Version in its METADATA")


def require(condition: bool, problem: str) -> None:
    if not condition:
        raise SystemExit(f"wheel smoke: {problem}")


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"wheel smoke: {' '.join(cmd[:3])} ... exited {res.returncode}")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", type=Path)
    p.add_argument("--data", type=Path, required=True, help="pneumoniamnist.npz")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)
    wheel, data = args.wheel.resolve(), args.data.resolve()
    work = Path(tempfile.mkdtemp(prefix="fedbus-wheel-smoke-"))
    try:
        make_base_view(work / "base")
        venv.EnvBuilder(with_pip=True).create(work / "venv")
        py = work / "venv" / "bin" / "python"
        purelib = subprocess.check_output(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
        (Path(purelib) / "fedbus_smoke_base.pth").write_text(f"{work / 'base'}\n")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.pop("FEDBUS_DATA", None)
        empty = work / "elsewhere"
        empty.mkdir()
        run([str(py), "-m", "pip", "install", "-q", f"{wheel}[ml]"], empty, env)

        fedbus = str(work / "venv" / "bin" / "fedbus")
        where = run([str(py), "-c", "import node; print(node.__file__)"], empty, env).stdout
        require(where.startswith(purelib), f"node imported from {where}, not the venv")
        version = run([fedbus, "--version"], empty, env).stdout.strip()
        require(version == f"fedbus {wheel_version(wheel)}", f"--version says {version!r}")

        # Each hospital makes its own keys on its own host; provisioning gets the public halves.
        for hospital in ("hospital-a", "hospital-b"):
            run([fedbus, "envoy", "init", "--node-id", hospital, "--out", f"hosts/{hospital}"],
                empty, env)  # fmt: skip
        run(
            [fedbus, "provision", "--federation", "smoke", "--envoys", "hospital-a,hospital-b",
             "--public-keys", "hosts/hospital-a", "hosts/hospital-b",
             "--out", "kits", "--data", "/srv/xray/chest_xray"],
            empty, env,
        )  # fmt: skip
        for hospital in ("hospital-a", "hospital-b"):
            kit = {p.name for p in (empty / "kits" / hospital).iterdir()}
            require("signing.key" not in kit, f"{hospital}'s kit holds its secret key: {kit}")
        template = tomllib.loads((REPO / "configs" / "director.toml").read_text())
        director = tomllib.loads((empty / "kits" / "director" / "director.toml").read_text())
        for table in ("train", "model", "secagg"):
            require(director[table] == template[table], f"kit [{table}] is not the template's")
        envoy = tomllib.loads((empty / "kits" / "hospital-a" / "envoy.toml").read_text())
        require(
            envoy["data"] == {"source": "image_folder", "path": "/srv/xray/chest_xray"},
            f"an image-folder kit's [data] is {envoy['data']}",
        )

        run(
            [fedbus, "demo", "--envoys", "2", "--rounds", "1", "--data", str(data), "--out", "run"],
            empty, {**env, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        run(
            [sys.executable, str(HERE / "check_demo.py"), str(empty / "run"), "--rounds", "1",
             "--envoys", "2"],
            empty, env,
        )  # fmt: skip
        print(f"wheel smoke: {wheel.name} works from {empty}")
        return 0
    finally:
        if args.keep:
            print(f"wheel smoke: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
