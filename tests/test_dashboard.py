"""The dashboard in a real browser (Debian's chromium through Playwright) against a running node.

A study sent by C-STORE appears on the overview without a reload; its job shows the
key-image preview and the volumes the worker measured; its deliveries to a
destination that is down fail, the retry buttons re-queue them, and they turn
delivered once the destination is up. With a token the dashboard asks for it and
shows no patient data before; the rule tester explains a file's routing; the
model cards are rendered. Pages are checked at 1280x800 (no horizontal scroll)
and their screenshots kept under ``$TEST_ARTIFACTS_DIR``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from pacs_node.app.service import Node
from pacs_node.config import Settings
from pacs_node.deliver.scu import send_files
from pacs_node.web.auth import SESSION_COOKIE
from storage.models import Delivery, DeliveryState, Job, JobState
from tests.conftest import FAST_DISPATCH, Env, Made, RecordingSCP, dimse, free_port, wait_for
from tests.http_support import http_node
from tests.viewer_support import (
    artifacts,  # noqa: F401  (fixture)
    browser,  # noqa: F401  (fixture)
    new_page,  # noqa: F401  (fixture)
)

TOKEN = "dashboard-test-token-7f3a"
PATIENT = "Synthetic"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite: the dashboard's queries run on both databases in benchmarks/dashboard.py."""
    return f"sqlite:///{tmp_path / 'db.sqlite'}"


def _write(series: list[Any], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(series):
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return paths


def _reads_well(page: Any, out: Path, name: str) -> None:
    """At 1280x800 the page has no horizontal scroll, its navigation is visible, and nothing spills out."""
    page.screenshot(path=str(out / f"dashboard-{name}.png"))
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 1280, f"{name}: the page is {width} px wide at a 1280 px window"
    assert page.locator("header.top nav a.active").is_visible(), f"{name}: no navigation"
    spill = page.evaluate(
        """() => Array.from(document.querySelectorAll('main *')).filter(e => {
             const r = e.getBoundingClientRect(); return r.width > 0 && (r.right > window.innerWidth + 1);
           }).map(e => e.tagName + '.' + e.className).slice(0, 5)"""
    )
    assert not spill, f"{name}: elements run past the window's right edge: {spill}"


def _image_loaded(locator: Any) -> bool:
    return bool(locator.evaluate("img => img.complete && img.naturalWidth > 0"))


def test_dashboard_follows_a_study_from_c_store_to_delivered(
    make_settings: Callable[..., Settings],
    run_node: Callable[[Settings], Node],
    sphere_package: Path,
    made: Made,
    recording_scp: Callable[..., RecordingSCP],
    new_page: Callable[..., Any],  # noqa: F811
    artifacts: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    pacs = recording_scp("PACS")  # not started yet: the destination is down
    settings = make_settings(
        {
            "http": {"port": free_port(), "dashboard_refresh_s": 0.5},
            "pipelines": {"spheres": {"model": str(sphere_package), "device": "cpu"}},
            "destinations": {"pacs": dimse(pacs)},
            "routes": [
                {"name": "spheres-mr", "pipeline": "spheres", "destinations": ["pacs"], "match": {"Modality": "MR"}}
            ],
            "worker": {"processes": 1},
            "dispatch": FAST_DISPATCH,
        }
    )
    node = run_node(settings)
    assert node.http is not None
    base = node.http.url
    page = new_page()
    page.goto(base + "/ui/")
    assert page.get_by_text("No jobs yet").is_visible()
    page.evaluate("window.__notReloaded = true")

    statuses = send_files(
        "127.0.0.1", node.scp.port, _write(made.series, tmp_path / "in"), calling_ae="MODALITY", called_ae="PACSNODE"
    )
    assert set(statuses.values()) == {0}

    # The overview refreshes itself: the job appears, runs and is done, with no reload.
    done_row = page.locator("tr[id^='job-'][data-state='DONE']")
    wait_for(lambda: done_row.count() == 1, timeout=180, interval=0.25, what="the job to show as done on the overview")
    assert page.evaluate("window.__notReloaded === true"), "the page reloaded instead of refreshing in place"
    assert _image_loaded(done_row.locator("img")), "the job's key-image preview did not load"
    with node.db.session() as s:
        job = s.scalars(select(Job)).one()
        assert job.state is JobState.DONE
        metrics, study_uid = job.metrics or {}, job.study.study_uid
    volumes = {e["name"]: e["volume_ml"] for e in metrics["segments"].values()}
    row_text = done_row.inner_text()
    for name, ml in volumes.items():
        assert f"{name} {ml:.2f} mL" in row_text, f"{name} {ml:.2f} mL not in {row_text!r}"

    # The deliveries fail (the destination is down) and say so.
    failed = page.locator("ul.failed li[data-state='failed']")
    wait_for(lambda: failed.count() == 3, timeout=60, interval=0.25, what="three failed deliveries on the overview")
    _reads_well(page, artifacts, "overview")

    # The study list has the study; its page has the job's card: preview, volumes, stage timings, deliveries.
    page.goto(base + "/ui/studies")
    row = page.locator(f"tr[data-study='{study_uid}']")
    assert row.count() == 1 and PATIENT in row.inner_text()
    _reads_well(page, artifacts, "studies")
    row.get_by_role("link").first.click()
    page.wait_for_url(f"**/ui/studies/{study_uid}")
    card = page.locator("article.job").first
    assert _image_loaded(card.locator(".preview img"))
    table = card.locator("table.mini").first.inner_text()
    for name, ml in volumes.items():
        assert name in table and f"{ml:.2f} mL" in table, table
    legend = card.locator(".stagelegend").inner_text()
    assert "predict" in legend and "load model" in legend, legend
    assert card.locator("tr[data-state='failed']").count() == 3
    _reads_well(page, artifacts, "study")

    # Retry with the destination back: each delivery is re-queued and turns delivered.
    pacs.start()
    page.evaluate("window.__notReloaded = true")
    for _ in range(3):
        before = page.locator("button:text-is('Retry')").count()
        page.locator("button:text-is('Retry')").first.click()
        wait_for(
            lambda before=before: page.locator("button:text-is('Retry')").count() < before,
            timeout=20,
            what="the retried delivery to leave the failed state",
        )
    delivered = page.locator("article.job tr[data-state='delivered']")
    wait_for(lambda: delivered.count() == 3, timeout=60, interval=0.25, what="three deliveries shown as delivered")
    assert page.evaluate("window.__notReloaded === true")
    with node.db.session() as s:
        assert {d.state for d in s.scalars(select(Delivery))} == {DeliveryState.DELIVERED}
    assert len(pacs.uids) == 3
    _reads_well(page, artifacts, "study-delivered")

    for path, name in (
        ("/ui/jobs", "jobs"),
        ("/ui/deliveries", "deliveries"),
        ("/ui/rules", "rules"),
        ("/ui/models", "models"),
    ):
        page.goto(base + path)
        _reads_well(page, artifacts, name)
    assert not page.errors, page.errors


def test_dashboard_asks_for_the_token_and_shows_no_patient_data_before(
    queued: Callable[..., Env],
    recording_scp: Callable[..., RecordingSCP],
    new_page: Callable[..., Any],  # noqa: F811
    artifacts: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = queued({"pacs": dimse(recording_scp("PACS"))}, http={"token_file": str(token_file)})
    with http_node(env.settings) as node:
        base = node.url
        # Without the token: pages redirect to the login form, data answers 401, nothing names the patient.
        for path in ("/", "/ui/", "/ui/studies", "/ui/jobs/1", "/viewer?StudyInstanceUIDs=1.2.3"):
            r = httpx.get(base + path)
            assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next="), (path, r.status_code)
        for path in ("/ui/outputs/1/preview.png", "/api/studies", "/dicom-web/studies"):
            r = httpx.get(base + path, headers={"Accept": "image/png"})
            assert r.status_code in (303, 401), (path, r.status_code)
        login = httpx.get(base + "/ui/login?next=/ui/studies")
        assert login.status_code == 200 and PATIENT not in login.text and "SYN0001" not in login.text
        assert httpx.get(base + "/ui/static/dashboard.css").status_code == 200

        page = new_page()
        page.goto(base + "/ui/studies")
        assert "/ui/login" in page.url
        page.fill("input[name=token]", "not-the-token")
        page.click("button[type=submit]")
        assert page.get_by_text("That is not the node's token").is_visible()
        assert PATIENT not in page.content()
        _reads_well_login(page, artifacts)
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url("**/ui/studies")
        assert PATIENT in page.locator("table.studies").inner_text()
        cookie = next(c for c in page.context.cookies() if c["name"] == SESSION_COOKIE)
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]

        # Actions go through the JSON API with the session: cancel a pending delivery, then retry it.
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(base + "/ui/deliveries?state=pending")
        first = page.locator("table.deliveries tbody tr").first
        delivery_id = int(first.get_attribute("id").removeprefix("delivery-"))
        first.get_by_role("button", name="Cancel").click()
        wait_for(
            lambda: _state(env, delivery_id) is DeliveryState.CANCELLED, timeout=20, what="the delivery to be cancelled"
        )
        page.goto(base + "/ui/deliveries?state=cancelled")
        page.locator(f"#delivery-{delivery_id}").get_by_role("button", name="Retry").click()
        wait_for(lambda: _state(env, delivery_id) is DeliveryState.PENDING, timeout=20, what="the delivery re-queued")

        # The session cannot be used by another site, nor replace the token for scripts' origin-less posts.
        session = {SESSION_COOKIE: cookie["value"]}
        for headers in ({"Origin": "http://evil.example"}, {}):
            r = httpx.post(f"{base}/api/deliveries/{delivery_id}/cancel", cookies=session, headers=headers)
            assert r.status_code == 403, (headers, r.status_code)
        assert httpx.get(base + "/api/studies", cookies=session).status_code == 200
        assert httpx.get(base + "/api/studies", cookies={SESSION_COOKIE: "0" * 64}).status_code == 401

        page.click("text=Log out")
        page.wait_for_url("**/ui/login")
        page.goto(base + "/ui/studies")
        assert "/ui/login" in page.url and PATIENT not in page.content()
        # Logging out ended the session on the server: a copy of its cookie, replayed, opens nothing.
        r = httpx.get(base + "/api/studies", cookies=session)
        assert r.status_code == 401 and PATIENT not in r.text
        assert httpx.get(base + "/ui/studies", cookies=session).status_code == 303


def _reads_well_login(page: Any, out: Path) -> None:
    page.screenshot(path=str(out / "dashboard-login.png"))
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280


def _state(env: Env, delivery_id: int) -> DeliveryState:
    with env.db.session() as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        return row.state


def test_rule_tester_and_model_cards(
    make_settings: Callable[..., Settings],
    sphere_package: Path,
    made: Made,
    new_page: Callable[..., Any],  # noqa: F811
    artifacts: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = make_settings(
        {
            "http": {"port": free_port()},
            "pipelines": {"spheres": {"model": str(sphere_package)}},
            "routes": [
                {"name": "ct-only", "pipeline": "spheres", "match": {"Modality": "CT"}},
                {"name": "spheres-mr", "pipeline": "spheres", "match": {"Modality": "MR"}},
            ],
        }
    )
    [mr_file] = _write(made.series[:1], tmp_path / "mr")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with http_node(settings) as node:
        page = new_page()
        page.goto(node.url + "/ui/rules")
        page.set_input_files("#rule-tester input[type=file]", [mr_file, str(text_file)])
        page.click("#rule-tester button[type=submit]")
        results = page.locator("#rule-results article.result")
        wait_for(lambda: results.count() == 2, timeout=20, what="two rule tester results")
        first, second = results.nth(0).inner_text(), results.nth(1).inner_text()
        assert "Routed by spheres-mr to pipeline spheres" in first, first
        assert "ct-only" in first and "Modality" in first and "'MR'" in first, first
        assert "not a DICOM file" in second, second
        _reads_well(page, artifacts, "rules-tested")

        page.goto(node.url + "/ui/models")
        card = page.locator("#model-spheres")
        assert "test-spheres 1.0.0" in card.inner_text()
        assert card.locator(".md h1").inner_text() == "test-spheres"
        assert "Trained by pacs_lab/model_packages.py" in card.locator(".md").inner_text()
        assert card.locator(".badge.s-demo").is_visible()
        _reads_well(page, artifacts, "models-spheres")
        assert not page.errors, page.errors
