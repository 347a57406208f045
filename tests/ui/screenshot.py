"""The screenshots in docs/: a real `fedbus demo` whose director serves the operator page,
photographed in Debian's headless Chromium when a given round is under way.

    python -m tests.ui.screenshot OUT.png --round 7 -- --envoys 4 --rounds 8 --limit 2000 ...

Everything after `--` goes to `fedbus demo` (which gets `--set ui.bind=127.0.0.1:0` and an
output folder here); PYTHONPATH and the data come from the environment, as for the demo.
Not a test: the browser tests assert what the page shows; this only keeps a picture.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.integration.fedprocs import read_json, wait_for

CHROMIUM = "/usr/bin/chromium"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("png", type=Path)
    p.add_argument("--round", type=int, required=True, help="photograph once this round runs")
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    demo = argv[cut + 1 :]
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "demo",
                "--quiet",
                "--out",
                str(out),
                *demo,
                "--set",
                "ui.bind=127.0.0.1:0",
                "--set",
                "ui.poll_s=0.2",
            ],
            env=env,
            start_new_session=True,
        )
        try:
            url = wait_for(
                lambda: (read_json(out / "director" / "status.json") or {}).get("ui_url"),
                what="the operator page",
                proc=proc,
                poll=0.2,
            )
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
                )
                page = browser.new_page(viewport={"width": 1280, "height": 1100})
                page.goto(url)
                expect(page.locator("#connection")).to_have_text("live")
                while not page.locator("#round").inner_text().startswith(f"{args.round} /"):
                    if proc.poll() is not None:
                        raise SystemExit(f"the demo ended before round {args.round} was seen")
                    page.wait_for_timeout(100)
                page.screenshot(path=str(args.png), full_page=True)
                browser.close()
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
