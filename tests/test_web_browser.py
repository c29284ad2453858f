"""The page in a real browser: Debian's chromium driven by Playwright's Python package
(never a browser download), 360 px wide, against a live server on real Redis.

It opens ``/``, publishes a tracked job and TRACK SETs of 10 %, 50 % and 90 %, and
sees the job's bar reach each value without a reload, then success; then the job's
own page and its timeline. Screenshots go to the test's tmp dir; with
``TRACKER_WEB_SCREENSHOT=path.png`` the list page is also saved there (the README's).
"""

from __future__ import annotations

import os
import shutil

import test_web as web
from helpers import missing

from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.query import Tracker

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the test extra brings it; without it the test is `missing`
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
JID = "report-2026-12-01-7f3a"


def _browser(pw):
    if not os.path.exists(CHROMIUM):
        missing(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    return pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)


def _scenery(d) -> None:
    """A few other jobs, so the page shows every state."""
    pub, t = Publisher(d), Tracker(d)
    for jid, state, pct, desc in (("invoice-batch-0932", "working", 62, "Rendering PDFs 62/100"),
                                  ("thumbs-a81c", "enqueued", None, None),
                                  ("import-users-77", "failed", 35, "CSV row 3512"),
                                  ("nightly-backup", "success", 100, "Uploaded")):
        pub.enqueued(jid, custom={"track": 1}, queue="default", jobtype="Job")
        if state != "enqueued":
            pub.working(jid, reserve_for=600)
        if pct is not None:
            t.set(jid, percent=pct, desc=desc)
        if state == "failed":
            pub.failed(jid, errtype="CSVError", message="bad quoting")
        elif state == "success":
            pub.success(jid)


def test_page_shows_live_progress_without_reload(real_deployment, tmp_path):
    if sync_playwright is None:
        missing("playwright is not installed (pip install -e '.[test]')")
    d = real_deployment
    requests: list[str] = []
    with web.LiveServer(web.make_app(d, "real", token=web.TOKEN)) as srv, web.projecting(d), \
            sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page(viewport={"width": 360, "height": 780})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(srv.url + "/")
            page.wait_for_selector('#live[data-state="live"]')
            page.evaluate("window.__sameDocument = true")
            _scenery(d)

            pub = Publisher(d)
            pub.enqueued(JID, custom={"track": 1}, queue="reports", jobtype="ReportJob")
            pub.working(JID, reserve_for=600)
            row = f'li.row[data-jid="{JID}"]'
            page.wait_for_selector(f"#working {row}")
            for pct, desc in ((10, "Loading orders"), (50, "Aggregating 5 of 10"),
                              (90, "Writing report.xlsx")):
                Tracker(d).set(JID, percent=pct, desc=desc)
                page.wait_for_selector(f'#working {row}[data-percent="{pct}"]')
                bar = page.locator(f"{row} .bar")
                assert bar.get_attribute("aria-valuenow") == str(pct)
                assert page.locator(f"{row} .bar > span").evaluate("e => e.style.width") == f"{pct}%"
                assert page.locator(f"{row} .pct").inner_text() == f"{pct}%"
                assert page.locator(f"{row} .desc").inner_text() == desc
            page.wait_for_selector('#failed li.row[data-jid="import-users-77"]')
            page.wait_for_selector('#success li.row[data-jid="nightly-backup"]')
            page.wait_for_timeout(300)  # let the bars' width transition finish for the picture
            shot = tmp_path / "page-90.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("TRACKER_WEB_SCREENSHOT"):
                shutil.copy(shot, os.environ["TRACKER_WEB_SCREENSHOT"])

            pub.success(JID)
            page.wait_for_selector(f"#success {row}")
            assert page.locator(f"#working {row}").count() == 0
            assert page.evaluate("window.__sameDocument") is True  # no reload happened
            assert page.evaluate("document.documentElement.scrollWidth") <= 360  # fits 360 px
            page.screenshot(path=str(tmp_path / "page-success.png"), full_page=True)

            page.click(f"{row} a.jid")
            page.wait_for_selector('.card[data-state="success"]')
            page.wait_for_function("document.querySelectorAll('.timeline li').length >= 6")
            events = page.locator(".timeline li").evaluate_all("ls => ls.map(l => l.dataset.event)")
            assert events == ["enqueued", "working", "trackset", "trackset", "trackset", "success"]
            assert page.evaluate("document.documentElement.scrollWidth") <= 360
            page.screenshot(path=str(tmp_path / "job.png"), full_page=True)
        finally:
            browser.close()
    Projector(d).drain()
    assert Tracker(d).get(JID)["state"] == "success"
    assert requests and all(u.startswith(srv.url) for u in requests), requests  # nothing external
