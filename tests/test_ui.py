"""The Recommender page and its API inside real Airflow, on data from real runs; alerts by real e-mail.

One module-scoped "world" runs `recsys_retrain` three times through Airflow (published, published
again, rejected by the gate, with a few bad rows quarantined on the way) against a real Postgres,
with an SMTP server catching alert e-mails. The API tests call Airflow's own FastAPI app (plugins
mounted, SimpleAuthManager issuing tokens); the browser test starts `airflow api-server` and
`airflow scheduler`, logs in with headless Chromium and rolls back through the page.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, UTC
from pathlib import Path
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from conftest import SMALL_MODEL, seed_small
from recmodel import db

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
PASSWORDS = {"admin": "admin-secret", "viewer": "viewer-secret"}
ALERT_TO = "ops@example.com"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class World:
    url: str
    home: Path
    versions: list[str]  # first published, second published (serving), third rejected
    env: dict[str, str]
    mail: list  # aiosmtpd envelopes


def version_of(when: datetime) -> str:
    return "v" + when.strftime("%Y%m%d%H%M%S")


@pytest.fixture(scope="module")
def smtp_inbox() -> Iterator[list]:
    """A real SMTP server on loopback that keeps every message it receives."""
    from aiosmtpd.controller import Controller

    from recmodel.runner import free_port

    class Inbox:
        def __init__(self) -> None:
            self.messages: list = []

        async def handle_DATA(self, server, session, envelope):
            self.messages.append(envelope)
            return "250 OK"

    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    inbox.port = controller.port
    yield inbox
    controller.stop()


@pytest.fixture(scope="module")
def world(airflow_ready: dict[str, str], pg_server_url: str, tmp_path_factory: pytest.TempPathFactory,
          smtp_inbox) -> Iterator[World]:
    from recmodel.runner import database_environment, run_dag

    name = f"ui_{uuid.uuid4().hex[:10]}"
    db.ensure_database(pg_server_url, name)
    url = db.with_database(pg_server_url, name)
    db.migrate(url)
    home = tmp_path_factory.mktemp("ui-home")
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    env = {
        **database_environment(url), "RECSYS_HOME": str(home), "RECSYS_ALERT_EMAIL": ALERT_TO,
        "AIRFLOW_CONN_SMTP_DEFAULT": f"smtp://127.0.0.1:{smtp_inbox.port}?disable_ssl=true&disable_tls=true",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex * 2,
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        times = [NOW, NOW + timedelta(days=1), NOW + timedelta(days=2)]
        seed_small(url, times[0])
        assert run_dag("recsys_retrain", conf={**SMALL_MODEL, "as_of": times[0].isoformat()},
                       logical_date=times[0]).succeeded
        seed_small(url, times[1], events=1500, seed=2)
        with db.transaction(url) as conn:  # bad rows: quarantined with their reasons, not trained on
            conn.execute("INSERT INTO interactions (user_id, item_id, event_type, occurred_at, ingested_at) "
                         "SELECT 7, 990000 + g, 'view', %(at)s, %(at)s FROM generate_series(1, 3) g",
                         {"at": times[1] - timedelta(hours=1)})
            conn.execute("INSERT INTO interactions (user_id, item_id, event_type, occurred_at, ingested_at) "
                         "VALUES (7, 1, 'teleport', %(at)s, %(at)s), (8, 2, 'teleport', %(at)s, %(at)s)",
                         {"at": times[1] - timedelta(hours=1)})
        assert run_dag("recsys_retrain", conf={**SMALL_MODEL, "gate_champion_tolerance": 1.0,
                                               "as_of": times[1].isoformat()}, logical_date=times[1]).succeeded
        seed_small(url, times[2], events=1500, seed=3)
        assert run_dag("recsys_retrain", conf={**SMALL_MODEL, "gate_min_metric": 0.99,
                                               "as_of": times[2].isoformat()}, logical_date=times[2]).succeeded
        versions = [version_of(t) for t in times]
        simulate_served_days(url, versions[:2])
        assert run_dag("recsys_outcomes", conf={}, logical_date=times[2]).succeeded
        yield World(url=url, home=home, versions=versions, env=env, mail=smtp_inbox.messages)
    with psycopg.connect(db.libpq_url(pg_server_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def simulate_served_days(url: str, versions: list[str]) -> None:
    """As if the first version had served from 3 days ago to 1.5 days ago and the second since, with users
    touching new items meanwhile: a third of them an item of the list served to them, a third the top
    popular item, a third an item neither list holds."""
    now = datetime.now(UTC)
    periods = [(now - timedelta(days=3), now - timedelta(days=1.5)), (now - timedelta(days=1.5), None)]
    events = []
    with db.transaction(url) as conn:
        conn.execute("DELETE FROM recsys.serving_periods")
        for version, (start, end) in zip(versions, periods):
            conn.execute("INSERT INTO recsys.serving_periods (version, started_at, ended_at) VALUES (%s, %s, %s)",
                         (version, start, end))
            tables, = conn.execute("SELECT tables FROM recsys.published_versions WHERE version = %s",
                                   (version,)).fetchone()
            lists = conn.execute(sql.SQL("SELECT user_id, item_id FROM recsys.{} WHERE rank = 2 ORDER BY user_id")
                                 .format(sql.Identifier(tables["user_recommendations"]))).fetchall()
            top, = conn.execute(sql.SQL("SELECT item_id FROM recsys.{} WHERE rank = 1")
                                .format(sql.Identifier(tables["popular_items"]))).fetchone()
            for i, (user, listed) in enumerate(lists[:60]):
                when = start + timedelta(hours=2 + 8 * (i % 4))
                events.append((user, (listed, top, 880_000 + i)[i % 3], when))
        with conn.cursor().copy("COPY interactions (user_id, item_id, event_type, occurred_at) FROM STDIN") as copy:
            for user, item, when in events:
                copy.write_row((user, item, "view", when))


@pytest.fixture(scope="module")
def client(world: World):
    """Airflow's API app (core API, auth, plugins) in-process, with the world's environment."""
    from fastapi.testclient import TestClient

    from airflow.api_fastapi.app import create_app

    with pytest.MonkeyPatch.context() as patch:
        for key, value in world.env.items():
            patch.setenv(key, value)
        with TestClient(create_app()) as test_client:
            yield test_client


def login(client, user: str = "admin") -> dict[str, str]:
    response = client.post("/auth/token", json={"username": user, "password": PASSWORDS[user]})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


READ_ENDPOINTS = ["/recommender/", "/recommender/api/registry", "/recommender/api/runs", "/recommender/api/alerts",
                  "/recommender/api/quality", "/recommender/api/serving", "/recommender/api/users/1",
                  "/recommender/api/outcomes",
                  "/recommender/datadocs/index.html"]
ACTIONS = [("/recommender/api/actions/retrain", {}), ("/recommender/api/actions/rollback", {"version": "v20261101120000"})]


def test_every_endpoint_refuses_anonymous_and_forged_requests(client) -> None:
    forged = {"Authorization": "Bearer not-a-real-token"}
    for path in READ_ENDPOINTS:
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=forged).status_code in (401, 403), path
    for path, body in ACTIONS:
        assert client.post(path, json=body).status_code == 401, path
    page = client.get("/recommender/")
    assert "Log in to Airflow" in page.text  # a browser gets a way forward, not a bare error


def test_the_plugin_is_registered_as_a_nav_view(client) -> None:
    plugins = client.get("/api/v2/plugins", headers=login(client)).json()["plugins"]
    ours = next(p for p in plugins if p["name"] == "recommender")
    assert ours["fastapi_apps"][0]["url_prefix"] == "/recommender"
    view = ours["external_views"][0]
    assert (view["name"], view["destination"], view["href"], view["url_route"]) == \
        ("Recommender", "nav", "/recommender/", "recommender")
    assert client.get(view["icon"]).headers["content-type"].startswith("image/svg+xml")


def test_registry_shows_lineage_metrics_with_intervals_and_decisions(client, world: World) -> None:
    first, second, third = world.versions
    models = {m["version"]: m for m in client.get("/recommender/api/registry", headers=login(client)).json()["models"]}
    assert set(models) == {first, second, third}
    assert [models[v]["status"] for v in (first, second, third)] == ["retired", "champion", "rejected"]
    assert [models[v]["serving"] for v in (first, second, third)] == [False, True, False]
    assert (models[second]["parent_version"], models[third]["parent_version"]) == (first, second)
    assert models[third]["decision"] == "rejected" and "below the floor" in models[third]["reasons"][0]
    holdout = models[second]["holdout"]  # what the gate judged on, as planned before training
    assert holdout["kind"] in ("time_window", "last_per_user") and holdout["users"] >= holdout["min_users"] == 100
    assert models[second]["kind"] == "model" and models[second]["lineage"]["refit"]["train_rows"] > \
        models[second]["lineage"]["gated"]["train_rows"]
    candidate = models[second]["metrics"]["candidate"]
    low, high = candidate["ndcg@10_ci"]
    assert low <= candidate["ndcg@10"] <= high
    slices = {f"{name}_{metric}" for name in ("cold_item", "rare_item", "warm_item", "cold_user")
              for metric in ("ndcg@10", "hr@10", "users")}
    assert {"coverage@10", "new_item_share@10"} | slices <= set(candidate)
    assert models[second]["ratios"]["vs_champion"]["metric"] == "ndcg@10"
    assert models[first]["ratios"]["vs_champion"] is None  # there was no champion to compare with
    with db.connect(world.url) as conn:
        dataset_rows = conn.execute("SELECT dataset_rows FROM recsys.extract_watermarks WHERE run_key = %s",
                                    (models[second]["run_key"],)).fetchone()[0]
    assert models[second]["data_window"]["dataset_rows"] == dataset_rows
    assert models[second]["data_window"]["ingested_until"].startswith("2026-11-02T12:00:00")


def test_runs_carry_the_gate_rejection_alert_and_the_email_arrived(client, world: World) -> None:
    runs = client.get("/recommender/api/runs", headers=login(client)).json()["runs"]
    by_version = {r["model_version"]: r for r in runs if r["kind"] == "retrain"}
    rejected = by_version[world.versions[2]]
    assert rejected["status"] == "rejected"
    [alert] = rejected["alerts"]
    assert alert["kind"] == "gate_rejected" and world.versions[2] in alert["message"]
    assert alert["channels"] == ["log", f"email:{ALERT_TO}", "pipeline_runs"]
    assert by_version[world.versions[1]]["alerts"] == []
    [mail] = [m for m in world.mail if world.versions[2] in m.content.decode(errors="replace")]
    assert mail.rcpt_tos == [ALERT_TO]
    assert "rejected by the gate" in mail.content.decode(errors="replace")


def test_the_page_and_status_list_the_same_recent_alerts_and_runs(client, world: World) -> None:
    import subprocess
    import sys

    from conftest import REPO_ROOT

    alerts = client.get("/recommender/api/alerts", headers=login(client)).json()["alerts"]
    [rejection] = [a for a in alerts if a["kind"] == "gate_rejected"]
    assert world.versions[2] in rejection["message"] and rejection["run_kind"] == "retrain"
    assert "champion keeps serving" not in rejection["message"]  # it names what serves: the second version
    assert f"{world.versions[1]} keeps serving" in rejection["message"]
    from recmodel import dashboard, registry

    assert ([r["run_key"] for r in dashboard.runs(world.url)]
            == [r["run_key"] for r in registry.overview(world.url, limit=30)["runs"]])  # one list, one order
    status = subprocess.run([sys.executable, "-m", "recmodel", "status"], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT, env={**os.environ, **world.env, "PYTHONPATH": str(REPO_ROOT)}, check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "recent alerts" in status.stdout and "gate_rejected" in status.stdout
    assert "by slice" in status.stdout and "cold users (1-2)" in status.stdout  # the gate's slices per version


def test_quality_reports_each_expectation_quarantine_by_reason_and_data_docs(client, world: World) -> None:
    headers = login(client)
    quality = client.get("/recommender/api/quality", headers=headers).json()
    latest = quality["latest_validation"]
    assert latest["run_key"] == world.versions[2][1:9] + "T" + world.versions[2][9:] + "Z"
    outcomes = {(e["expectation"], e["reason"]): e for e in latest["expectations"]}
    assert outcomes[("expect_column_values_to_be_in_set", "unknown_item")]["success"] is True
    assert len(latest["expectations"]) >= 10
    counts = {(q["run_key"], q["reason"]): q["rows"] for q in quality["quarantine_by_reason"]}
    second_key = world.versions[1][1:9] + "T" + world.versions[1][9:] + "Z"
    assert counts[(second_key, "unknown_item")] == 3 and counts[(second_key, "bad_event_type")] == 2
    assert latest["docs"], "Data Docs pages of the latest run"
    page = client.get("/recommender/datadocs/" + latest["docs"][0], headers=headers)
    assert page.status_code == 200 and "<html" in page.text.lower()
    escape = client.get("/recommender/datadocs/" + "..%2F" * 5 + "passwords.json", headers=headers)
    assert escape.status_code == 404 and "admin-secret" not in escape.text


def test_serving_lists_versions_with_users_covered_and_freshness(client, world: World,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    headers = login(client)
    state = client.get("/recommender/api/serving", headers=headers).json()
    versions = {v["version"]: v for v in state["versions"]}
    first, second, _third = world.versions
    assert set(versions) == {first, second}  # the rejected candidate was never published
    assert versions[second]["serving"] and not versions[second]["can_roll_back"]
    assert versions[first]["can_roll_back"]
    with db.connect(world.url) as conn:
        users, rows = conn.execute("SELECT count(DISTINCT user_id), count(*) FROM recsys.user_recommendations").fetchone()
    assert versions[second]["users_covered"] == users
    assert versions[second]["row_counts"]["user_recommendations"] == rows
    freshness = state["freshness"]
    assert freshness["version"] == second and not freshness["stale"] and freshness["age_hours"] >= 0
    monkeypatch.setenv("RECSYS_MAX_SERVING_AGE_HOURS", "0.00001")
    stale = client.get("/recommender/api/serving", headers=headers).json()["freshness"]
    assert stale["stale"] and "STALE" in stale["message"]


def test_outcomes_list_each_served_version_beside_its_gate_figure_and_long_tail(client, world: World) -> None:
    from recmodel import outcomes

    found = client.get("/recommender/api/outcomes", headers=login(client)).json()
    first, second, _ = world.versions
    assert [v["version"] for v in found["versions"]] == [second, first]  # the rejected third never served
    for version in found["versions"]:
        assert version["realized"]["users"] > 0 and version["gate"]["hr@10"] is not None
        assert {"coverage", "tail_share", "novelty"} <= set(version["long_tail"])
    days = outcomes.daily(world.url)
    assert [(d["version"], d["day"], d["users"]) for d in found["daily"]] == [
        (d.version, d.day.isoformat(), d.users) for d in days]
    assert {d.version for d in days} == {first, second}


def test_user_lookup_returns_history_and_recommendations_with_titles(client, world: World) -> None:
    headers = login(client)
    with db.connect(world.url) as conn:
        user_id, = conn.execute("SELECT user_id FROM recsys.user_recommendations ORDER BY user_id LIMIT 1").fetchone()
        expected = conn.execute("SELECT r.item_id, i.title FROM recsys.user_recommendations r JOIN items i USING (item_id) "
                                "WHERE user_id = %s ORDER BY rank", (user_id,)).fetchall()
        last_item, = conn.execute("SELECT item_id FROM interactions WHERE user_id = %s "
                                  "ORDER BY occurred_at DESC, event_id DESC LIMIT 1", (user_id,)).fetchone()
    found = client.get(f"/recommender/api/users/{user_id}", headers=headers).json()
    assert found["source"] == "user_recommendations" and found["known"]
    assert [(r["item_id"], r["title"]) for r in found["recommendations"]] == [tuple(e) for e in expected]
    with db.connect(world.url) as conn:
        history = {i for (i,) in conn.execute("SELECT item_id FROM interactions WHERE user_id = %s", (user_id,))}
    assert all(r["because_item_id"] in history and r["because_title"] for r in found["recommendations"])
    assert found["history"][0]["item_id"] == last_item and all(h["title"] for h in found["history"])
    stranger = client.get("/recommender/api/users/987654321", headers=headers).json()
    assert (stranger["known"], stranger["source"]) == (False, "popular_items") and stranger["recommendations"]
    for bad in ("not-a-number", "-1", str(2**64)):
        assert client.get(f"/recommender/api/users/{bad}", headers=headers).status_code == 422, bad


def test_actions_queue_airflow_runs_as_the_user_and_refuse_what_cannot_be_done(client, world: World) -> None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    from recmodel.runner import set_paused

    admin, viewer = login(client), login(client, "viewer")
    first, second, third = world.versions
    rollback = "/recommender/api/actions/rollback"
    assert client.post(rollback, json={"version": first}, headers=viewer).status_code == 403
    assert client.post("/recommender/api/actions/retrain", headers=viewer).status_code == 403
    set_paused(("recsys_retrain", "recsys_rollback"), True)
    paused = client.post(rollback, json={"version": first}, headers=admin)
    assert paused.status_code == 409 and "paused" in paused.json()["detail"]
    set_paused(("recsys_retrain", "recsys_rollback"), False)
    queued = []
    try:
        refusals = {"'; DROP TABLE items; --": 404, "v20991231000000": 404, third: 404, second: 409}
        for version, status in refusals.items():
            response = client.post(rollback, json={"version": version}, headers=admin)
            assert response.status_code == status, (version, response.text)
        for path, body in ((rollback, {"version": first}), ("/recommender/api/actions/retrain", {})):
            response = client.post(path, json=body, headers=admin)
            assert response.status_code == 201, response.text
            queued.append(response.json())
        with create_session() as session:
            rolled, retrain = (session.query(DagRun).filter_by(dag_id=q["dag_id"], run_id=q["dag_run_id"]).one()
                               for q in queued)
            assert (rolled.conf, rolled.triggering_user_name, rolled.state) == ({"version": first}, "admin", "queued")
            as_of = datetime.fromisoformat(retrain.conf["as_of"])
            assert abs((as_of - datetime.now(UTC)).total_seconds()) < 60
    finally:
        with create_session() as session:  # queued only: the browser test's scheduler must not run them
            for q in queued:
                session.query(DagRun).filter_by(dag_id=q["dag_id"], run_id=q["dag_run_id"]).delete()
        set_paused(("recsys_retrain", "recsys_rollback"), True)
    with db.connect(world.url) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone()[0] > 0


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_logs_in_reads_the_page_looks_up_a_user_and_rolls_back(world: World, airflow_ready: dict[str, str],
                                                                       tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from recmodel.runner import free_port, set_paused, start_stack

    first, second, _ = world.versions
    set_paused(("recsys_rollback",), False)
    stack = start_stack({**airflow_ready, **world.env}, free_port(), tmp_path / "airflow-logs",
                        components=("api-server", "scheduler"))
    screenshots = Path(os.environ.get("RECSYS_UI_SCREENSHOTS") or tmp_path)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(f"{stack.base_url}/plugin/recommender")
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password").fill(PASSWORDS["admin"])
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url("**/plugin/recommender", timeout=60_000)
            nav = page.get_by_role("link", name="Recommender")
            expect(nav.first).to_be_visible()

            ui = page.frame_locator("iframe")
            expect(ui.locator("body[data-loaded=true]")).to_be_attached(timeout=60_000)
            expect(ui.locator("#registry-table tbody tr")).to_have_count(3)
            expect(ui.locator(f"#registry-table tr[data-version={second}]")).to_contain_text("serving")
            expect(ui.locator("#slices-table tbody tr")).to_have_count(3)  # each version on the gate's slices
            expect(ui.locator("#slices-table tbody tr").first).to_contain_text("users")
            # vs the champion: the second version only (the first had none); vs popularity and own NDCG: both
            expect(ui.locator("#metrics-chart circle.point")).to_have_count(1 + 2 + 2)
            expect(ui.locator("#metrics-chart path.point.rejected")).to_have_count(3)
            expect(ui.locator("#alerts-list")).to_contain_text("gate rejected")
            with db.connect(world.url) as conn:
                user_id, title = conn.execute(
                    "SELECT r.user_id, i.title FROM recsys.user_recommendations r JOIN items i USING (item_id) "
                    "WHERE r.rank = 1 ORDER BY r.user_id LIMIT 1").fetchone()
            ui.locator("#lookup-user").fill(str(user_id))
            ui.get_by_role("button", name="Look up").click()
            expect(ui.locator("#recommendations-table tbody tr").first).to_contain_text(title)
            expect(ui.locator("#recommendations-table td.because").first).not_to_be_empty()
            # realized hit rate: a point per version and day, popularity's beside it, each version's gate line
            from recmodel import outcomes

            days = outcomes.daily(world.url)
            expect(ui.locator("#outcomes-chart circle.point.realized")).to_have_count(len(days))
            expect(ui.locator("#outcomes-chart circle.point.popular")).to_have_count(len(days))
            expect(ui.locator("#outcomes-chart line.gate")).to_have_count(2)
            expect(ui.locator("#outcomes-table tbody tr")).to_have_count(2)

            ui.locator("#published-table").get_by_role("button", name="Roll back").click()
            ui.locator("#confirm-action").click()
            expect(ui.locator("#action-result")).to_contain_text("queued Airflow run", timeout=30_000)
            deadline = datetime.now() + timedelta(seconds=180)
            while serving_version(world.url) != first and datetime.now() < deadline:
                page.wait_for_timeout(2000)
            assert serving_version(world.url) == first, f"rollback did not run; logs in {stack.log_dir}"
            ui.get_by_role("button", name="Refresh").click()
            expect(ui.locator("#serving-badge")).to_have_text(f"serving {first}", timeout=30_000)
            expect(ui.locator("#runs-table")).to_contain_text(f"{first} now serves (was {second})")

            for width in (1280, 1920):  # inside Airflow's frame and on its own: nothing cut off
                page.set_viewport_size({"width": width, "height": 1000})
                page.reload()
                frame = page.frame_locator("iframe")
                expect(frame.locator("body[data-loaded=true]")).to_be_attached(timeout=60_000)
                [inner] = [f for f in page.frames if f != page.main_frame]
                assert inner.evaluate(CLIPPED) == [], f"clipped in Airflow at {width} px"
                page.screenshot(path=str(screenshots / f"ui-recommender-in-airflow-{width}.png"))
                full = browser.new_page(viewport={"width": width, "height": 900})
                full.context.add_cookies(page.context.cookies())
                full.goto(f"{stack.base_url}/recommender/")
                expect(full.locator("body[data-loaded=true]")).to_be_attached(timeout=30_000)
                full.locator("#lookup-user").fill(str(user_id))
                full.get_by_role("button", name="Look up").click()
                expect(full.locator("#recommendations-table tbody tr").first).to_be_visible()
                assert full.evaluate(CLIPPED) == [], f"clipped at {width} px"
                full.screenshot(path=str(screenshots / f"ui-recommender-page-{width}.png"), full_page=True)
                if width == 1280:
                    full.locator("#outcomes-chart").screenshot(path=str(screenshots / "ui-outcomes-chart.png"))
                full.close()
            browser.close()
    finally:
        stack.stop()
        set_paused(("recsys_rollback",), True)


# Every element that hides part of its content behind a scroll bar or a clip (the page itself included),
# except the cells that cut long text with an ellipsis on purpose and show it whole on hover.
CLIPPED = """() => {
  const clipped = [];
  if (document.documentElement.scrollWidth > window.innerWidth + 1) clipped.push("the page scrolls sideways");
  for (const node of document.querySelectorAll("body *")) {
    if (node.matches(".observed")) continue;
    const overflow = getComputedStyle(node).overflowX;
    if (["auto", "scroll", "hidden"].includes(overflow) && node.scrollWidth > node.clientWidth + 1) {
      clipped.push(`${node.tagName.toLowerCase()}#${node.id}.${node.className}: ${node.scrollWidth} > ${node.clientWidth}`);
    }
  }
  return clipped;
}"""


def serving_version(url: str) -> str | None:
    with db.connect(url) as conn:
        row = conn.execute("SELECT version FROM recsys.published_versions WHERE serving").fetchone()
    return row[0] if row else None
