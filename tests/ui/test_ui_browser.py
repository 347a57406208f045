"""The operator page in a real headless Chromium (Debian's), driven by Playwright.

The page is served for real (uvicorn on a free loopback port) from a feed that changes as
a federation would; the assertions are on what a person sees: text in the cards and
tables, the curves drawn, the connection state. The slow test at the end watches a real
`fedbus demo` federation through its director's state folder and keeps a screenshot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.ui.feed import MemoryFeed
from node.ui.server import UiConfig
from tests.ui.uiharness import director_status, round_record, serving

CHROMIUM = "/usr/bin/chromium"
# Waits, not timing assertions: generous, because the machine is shared and slow at times.
WAIT_MS = 60_000

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"no {CHROMIUM}: `make system-deps` installs Debian's chromium",
)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-default-apps",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield page
    context.close()
    assert not errors, errors  # no script errors, no CSP violations


def test_a_person_watches_the_federation_change_live(page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    feed = MemoryFeed()
    online = {"envoy-1": True, "envoy-2": True, "envoy-3": True}
    status = director_status(1, "training", online=online, deadline=time.time() + 120)
    status["signing_key"] = "SECRET-in-status"
    feed.publish_status(status)
    with serving(feed, UiConfig(bind="127.0.0.1:0", poll_s=0.1)) as server:
        page.goto(f"http://127.0.0.1:{server.port}/")
        expect(page.locator("#connection")).to_have_text("live")
        expect(page.locator("#federation")).to_have_text("pneumonia")
        expect(page.locator("#round")).to_have_text("1 / 5")
        expect(page.locator("#stage")).to_have_text("local training")
        expect(page.locator("#deadline")).to_have_text(re.compile(r"^deadline in \d+ s$"))
        expect(page.locator("#secure")).to_have_text("secure")
        expect(page.locator("#online")).to_have_text("3 / 3")
        rows = page.locator("#envoys tbody tr")
        expect(rows).to_have_count(3)
        expect(rows.nth(0)).to_contain_text("envoy-1")
        expect(rows.nth(0)).to_contain_text("online")
        expect(rows.nth(0)).to_contain_text(re.compile(r"\d+ s ago"))
        expect(page.locator("#rounds tbody tr")).to_have_count(0)
        expect(page.locator("#roc-caption")).to_have_text("no evaluated round yet")

        # Round 1 completes; round 2 is in SecAgg's masked-input stage and envoy-3 is gone.
        first = round_record(1, separation=30.0)
        feed.publish_record(first)
        online["envoy-3"] = False
        feed.publish_status(
            director_status(2, "masked_input", online=online, deadline=time.time() + 45)
        )
        expect(page.locator("#round")).to_have_text("2 / 5")
        expect(page.locator("#stage")).to_have_text("SecAgg: masked input")
        expect(page.locator("#online")).to_have_text("2 / 3")
        expect(page.locator("#envoys tr[data-envoy='envoy-3']")).to_contain_text("offline")
        row = page.locator("#rounds tbody tr[data-round='1']")
        expect(row).to_contain_text("3 of 3")
        expect(row).to_contain_text(f"{first['metrics']['val']['auc']:.3f}")
        expect(row).to_contain_text(f"{first['metrics']['val']['accuracy']:.3f}")
        expect(page.locator("#roc-caption")).to_have_text(
            f"round 1: AUC {first['metrics']['val']['auc']:.3f}"
        )
        roc = page.locator("#roc path.roc")
        expect(roc).to_have_count(1)
        assert roc.get_attribute("d").count("L") == 100  # 101 ROC points from the histograms

        # Round 2 completes without envoy-3: a dropout; round 3 starts.
        second = round_record(2, dropped=["envoy-3"], separation=45.0)
        feed.publish_record(second)
        feed.publish_status(director_status(3, "share_keys", online=online))
        expect(page.locator("#round")).to_have_text("3 / 5")
        expect(page.locator("#stage")).to_have_text("SecAgg: share keys")
        expect(page.locator("#deadline")).to_have_text("")
        row = page.locator("#rounds tbody tr[data-round='2']")
        expect(row).to_contain_text("2 of 3")
        expect(row).to_contain_text("envoy-3")
        expect(page.locator("#dropouts rect[data-round='2']")).to_have_attribute(
            "data-dropped", "1"
        )
        expect(page.locator("#dropouts rect[data-round='1']")).to_have_attribute(
            "data-dropped", "0"
        )
        expect(page.locator("#curves circle[data-series='auc']")).to_have_count(2)
        expect(page.locator("#curves path[data-series='accuracy']")).to_have_count(1)
        expect(page.locator("#best")).to_have_text("best model: round 2")
        assert "SECRET" not in page.content()
        page.screenshot(path=str(tmp_path / "operator-page.png"), full_page=True)

        server.stop()  # the director goes away: the page says so
        expect(page.locator("#connection")).to_have_text("reconnecting")
        page.goto("about:blank")  # its reconnection attempts would log refused connections
    assert (tmp_path / "operator-page.png").stat().st_size > 10_000


def test_a_finished_federation_ends_the_stream_without_reconnecting(page) -> None:
    """Once the director says "finished" the page stops listening: the director going away
    afterwards is no error (the page fixture fails on any refused connection it logs)."""
    from playwright.sync_api import expect

    feed = MemoryFeed()
    online = {"envoy-1": True, "envoy-2": True}
    feed.publish_status(director_status(5, "evaluate", online=online))
    with serving(feed, UiConfig(bind="127.0.0.1:0", poll_s=0.1)) as server:
        page.goto(f"http://127.0.0.1:{server.port}/")
        expect(page.locator("#connection")).to_have_text("live")
        feed.publish_status(director_status(5, "finished", online=online))
        expect(page.locator("#connection")).to_have_text("ended")
        expect(page.locator("#stage")).to_have_text("finished")
        server.stop()
        page.wait_for_timeout(3_000)  # long enough for EventSource's retry, had it one
        expect(page.locator("#connection")).to_have_text("ended")


def test_a_plain_federation_is_flagged(page) -> None:
    from playwright.sync_api import expect

    feed = MemoryFeed()
    status = director_status(1, "training", online={"envoy-1": True})
    status["secure"] = False
    feed.publish_status(status)
    with serving(feed) as server:
        page.goto(f"http://127.0.0.1:{server.port}/")
        expect(page.locator("#secure")).to_have_text("PLAIN (insecure)")
        expect(page.locator("#secure")).to_have_class(re.compile(r"\bplain\b"))


def _page_of(out: Path, proc) -> str:
    """The address of the page the demo's director serves (status.json's ui_url)."""
    from tests.integration.fedprocs import read_json, wait_for

    return wait_for(
        lambda: (read_json(out / "director" / "status.json") or {}).get("ui_url"),
        what="the director's operator page",
        proc=proc,
        poll=0.2,
    )


def _photograph_until_finished(page, shot: Path, kind: str, rounds: int) -> None:
    """Screenshot (kept where $FEDBUS_KEEP_SCREENSHOT{kind} says), then wait for the
    director's last word before its page closes: the federation finished, every round in."""
    from playwright.sync_api import expect

    page.screenshot(path=str(shot), full_page=True)
    keep = os.environ.get(f"FEDBUS_KEEP_SCREENSHOT{kind}")
    if keep:
        shutil.copyfile(shot, keep)
    expect(page.locator("#stage")).to_have_text("finished", timeout=300_000)
    expect(page.locator("#rounds tbody tr")).to_have_count(rounds)
    page.goto("about:blank")  # the page is gone with the director: no reconnection logs


@pytest.mark.slow
def test_the_directors_own_page_follows_a_real_demo_federation(page, tmp_path: Path) -> None:
    """`fedbus demo` in real processes; the director serves the page (`[ui] bind`)."""
    from playwright.sync_api import expect

    from tests.integration.fedprocs import SMALL, start_demo

    plan = tmp_path / "plan.toml"
    plan.write_text('seed = 1\n[[crash]]\nenvoy = "envoy-3"\nround = 2\nstage = "share_keys"\n')
    out = tmp_path / "run"
    # Four envoys: a round survives one dropout only when the survivors still meet every
    # envoy's policy (n = 3 needs all three: t = 3 against one colluding envoy).
    proc = start_demo(
        out,
        "--envoys",
        "4",
        "--rounds",
        "3",
        "--faults",
        str(plan),
        *SMALL,
        "--set",
        "ui.bind=127.0.0.1:0",
        "--set",
        "ui.poll_s=0.2",
    )
    try:
        page.goto(_page_of(out, proc))
        expect(page.locator("#connection")).to_have_text("live")
        expect(page.locator("#federation")).to_have_text("demo")
        expect(page.locator("#envoys tbody tr")).to_have_count(4, timeout=300_000)
        expect(page.locator("#rounds tbody tr[data-round='1']")).to_contain_text(
            "4 of 4", timeout=300_000
        )
        expect(page.locator("#roc path.roc")).to_have_count(1)
        expect(page.locator("#rounds tbody tr[data-round='2']")).to_contain_text(
            "envoy-3", timeout=300_000
        )
        expect(page.locator("#dropouts rect[data-round='2']")).to_have_attribute(
            "data-dropped", "1"
        )
        expect(page.locator("#envoys tr[data-envoy='envoy-3']")).to_contain_text("offline")
        expect(page.locator("#secure")).to_have_text("secure")
        # Still connected, or the federation already finished and the page stopped listening.
        expect(page.locator("#connection")).to_have_text(re.compile("^(live|ended)$"))
        _photograph_until_finished(page, tmp_path / "operator-page-demo.png", "", rounds=3)
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()


@pytest.mark.slow
def test_a_three_class_federation_shows_each_classs_roc(page, tmp_path: Path) -> None:
    """docs/bring-your-own.md's package and command in real processes, watched live."""
    from playwright.sync_api import expect

    from tests.byo.docexample import CLASSES, demo_args, set_value, write_images, write_package
    from tests.integration.fedprocs import env as demo_env

    package = write_package(tmp_path / "team")
    # A weak signal: the classes overlap, so the per-class curves differ from each other.
    write_images(tmp_path / "xrays", per_class={"train": 30, "val": 20, "test": 4}, signal=30)
    args = set_value(demo_args(), "ui.bind", "127.0.0.1:0")
    args = set_value(args, "data.path", str(tmp_path / "xrays"))
    out = tmp_path / "runs" / "hospital"
    env = demo_env()
    env["PYTHONPATH"] = os.pathsep.join([str(package), env["PYTHONPATH"]])
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", *args, "--quiet", "--set", "ui.poll_s=0.2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        page.goto(_page_of(out, proc))
        expect(page.locator("#connection")).to_have_text("live")
        expect(page.locator("#rounds tbody tr[data-round='2']")).to_have_count(1, timeout=300_000)
        curves = page.locator("#roc path.roc-class")
        expect(curves).to_have_count(3)
        assert [curves.nth(i).get_attribute("data-class") for i in range(3)] == list(CLASSES)
        expect(page.locator("#roc text.roc-key")).to_have_count(3)
        expect(page.locator("#roc-caption")).to_contain_text("macro AUC")
        expect(page.locator("#roc-caption")).to_contain_text("one-vs-rest, 3 classes")
        _photograph_until_finished(page, tmp_path / "page-3.png", "_MULTICLASS", rounds=3)
        assert proc.wait(timeout=600) == 0, proc.stdout.read().decode(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
