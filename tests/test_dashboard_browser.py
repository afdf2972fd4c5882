"""The dashboard in a real browser: `dataengine dashboard` serves it, Playwright drives
Debian's Chromium (`make browser` installs it; a test tool's own browser download cannot
work offline). Signs in, reviews an item, checks the verdict in the catalog, and saves a
screenshot of every page (to $DATAENGINE_SCREENSHOTS, else the test's tmp folder)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dataengine.accounts import add_user
from dataengine.catalog import Catalog

from test_review import seed_failures

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-quic", "--no-first-run"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: run `make browser`")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(ws, tmp_path):
    cat = Catalog(ws)
    add_user(cat, "ana", "correct horse 1", "curator")
    seed_failures(ws, 40)
    port = _free_port()
    log = open(tmp_path / "dashboard.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "dashboard", "-w", str(ws.root), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"dashboard did not start: {(tmp_path / 'dashboard.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, cat
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def test_sign_in_review_an_item_and_see_every_page(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, cat = served
    shots = Path(os.environ.get("DATAENGINE_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.set_default_timeout(30_000)
        page.goto(url)
        expect(page.get_by_role("button", name="Sign in")).to_be_visible()
        page.wait_for_timeout(1000)
        assert "items match" not in page.content()  # an anonymous visitor sees the sign-in form only
        page.screenshot(path=shots / "sign-in.png")
        page.get_by_role("textbox", name="Username").fill("ana")
        page.get_by_role("textbox", name="Password").fill("correct horse 1")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_text("40 items match")).to_be_visible()
        page.wait_for_timeout(1500)  # the table draws after the page settles
        page.screenshot(path=shots / "queue.png", full_page=True)

        page.get_by_role("button", name="Claim for review").click()
        expect(page.get_by_role("button", name="Submit verdict")).to_be_visible()
        page.get_by_text("reject", exact=True).click()
        page.get_by_role("textbox", name="Note").fill("a blank image, not a model fault")
        page.screenshot(path=shots / "review.png", full_page=True)
        page.get_by_role("button", name="Submit verdict").click()
        expect(page.get_by_text("verdict recorded")).to_be_visible()
        rows = cat.query("SELECT verdict, curator, note FROM review_state").to_pylist()
        assert rows == [{"verdict": "reject", "curator": "ana", "note": "a blank image, not a model fault"}]

        for name in ("Overview", "Enhancer pairs", "Admin"):
            page.get_by_text(name, exact=True).click()
            expect(page.get_by_text(name.split()[0], exact=False).first).to_be_visible()
            page.wait_for_timeout(1500)  # charts draw after the page settles
            page.screenshot(path=shots / f"{name.lower().replace(' ', '-')}.png", full_page=True)
        browser.close()
    assert {p.name for p in shots.glob("*.png")} == {"sign-in.png", "queue.png", "review.png", "overview.png",
                                                     "enhancer-pairs.png", "admin.png"}
