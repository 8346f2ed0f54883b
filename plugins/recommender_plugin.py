"""The "Recommender" page in the Airflow 3 UI: a FastAPI app mounted at /recommender plus a nav entry.

Everything sits behind Airflow's own authentication and authorisation: reading needs read access
to the `recsys_retrain` DAG, triggering a retrain or a rollback needs permission to create runs of
that DAG. The actions queue ordinary Airflow runs (recorded with the user who asked), so they show
up, are logged and can be retried in Airflow like any other run. The queries live in
`recmodel.dashboard`; this file only adds HTTP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from recmodel.stages import RETRAIN_DAG_ID

URL_PREFIX = "/recommender"
PAGE = Path(__file__).resolve().parent / "recommender_ui" / "index.html"
ROLLBACK_DAG = "recsys_rollback"
ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#0ea5e9" stroke-width="2" '
        'stroke-linecap="round" stroke-linejoin="round"><path d="M3 3v18h18"/><path d="m7 14 4-4 4 4 5-6"/></svg>')


def _requires(method: str, dag_id: str, entity: str | None = None):
    """Airflow's own DAG permission check (imported lazily: it needs a configured Airflow)."""

    def check(request: Request, user: Annotated[Any, Depends(_user)]) -> Any:
        from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
        from airflow.api_fastapi.core_api.security import requires_access_dag

        access_entity = DagAccessEntity[entity] if entity else None
        requires_access_dag(method, access_entity, dag_id)(request, user)
        return user

    return check


async def _user(request: Request) -> Any:
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    return await get_user(request, None, await bearer_scheme(request))


CanRead = Annotated[Any, Depends(_requires("GET", RETRAIN_DAG_ID))]
CanRetrain = Annotated[Any, Depends(_requires("POST", RETRAIN_DAG_ID, "RUN"))]
CanRollback = Annotated[Any, Depends(_requires("POST", ROLLBACK_DAG, "RUN"))]


class RollbackBody(BaseModel):
    version: str


def _url() -> str:
    """The recsys database, found as the DAG tasks find it (`recsys_db` connection first), so the page
    shows and acts on the database the tasks write to."""
    from recmodel import taskenv

    return taskenv.database_url()


def _home() -> Path:
    from recmodel.config import settings

    return settings().home


def _json(payload: Any, status_code: int = 200) -> JSONResponse:
    return JSONResponse(jsonable_encoder(payload), status_code=status_code)


app = FastAPI(title="Recommender", description="recsys-retrain: registry, data quality, serving, actions")


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    """The page answers an anonymous browser with a login link; the API answers with JSON."""
    if exc.status_code in (401, 403) and not request.url.path.startswith(f"{URL_PREFIX}/api"):
        body = (f"<!doctype html><title>Recommender</title><p>{exc.status_code}: {exc.detail}. "
                f"<a href='/auth/login?next={URL_PREFIX}/'>Log in to Airflow</a> to see this page.</p>")
        return HTMLResponse(body, status_code=exc.status_code)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(LookupError)
async def _not_found(request: Request, exc: LookupError):
    return JSONResponse({"detail": str(exc)}, status_code=404)


@app.get("/icon.svg", include_in_schema=False)
def icon() -> Response:
    """The nav icon (public: the nav renders it before anyone opens the page)."""
    return Response(ICON, media_type="image/svg+xml")


@app.get("/", response_class=HTMLResponse)
def page(user: CanRead) -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@app.get("/api/registry")
def registry(user: CanRead, limit: int = Query(50, ge=1, le=500)) -> JSONResponse:
    from recmodel import dashboard

    return _json({"models": dashboard.registry(_url(), limit)})


@app.get("/api/runs")
def runs(user: CanRead, limit: int = Query(30, ge=1, le=500)) -> JSONResponse:
    from recmodel import dashboard

    return _json({"runs": dashboard.runs(_url(), limit)})


@app.get("/api/alerts")
def alerts(user: CanRead, limit: int = Query(10, ge=1, le=500)) -> JSONResponse:
    from recmodel import dashboard

    return _json({"alerts": dashboard.alerts(_url(), limit)})


@app.get("/api/outcomes")
def outcomes(user: CanRead, limit: int = Query(20, ge=1, le=500)) -> JSONResponse:
    from recmodel import dashboard

    return _json(dashboard.outcomes(_url(), limit))


@app.get("/api/quality")
def quality(user: CanRead, runs_back: int = Query(20, ge=1, le=500)) -> JSONResponse:
    from recmodel import dashboard

    return _json(dashboard.data_quality(_url(), _home(), runs_back))


@app.get("/api/serving")
def serving(user: CanRead) -> JSONResponse:
    from recmodel import dashboard

    return _json(dashboard.serving(_url()))


@app.get("/api/users/{user_id}")
def user_lookup(user: CanRead, user_id: int = PathParam(ge=0, le=2**63 - 1), history: int = Query(20, ge=1, le=500)) -> JSONResponse:
    from recmodel import dashboard

    return _json(dashboard.user(_url(), user_id, history))


@app.get("/datadocs/{path:path}")
def data_docs(path: str, user: CanRead) -> FileResponse:
    from recmodel import dashboard

    return FileResponse(dashboard.data_docs_file(_home(), path))


@app.post("/api/actions/retrain", status_code=201)
def trigger_retrain(user: CanRetrain) -> JSONResponse:
    from recmodel.registry import as_of_now

    return _json(_trigger(RETRAIN_DAG_ID, {"as_of": as_of_now().isoformat()}, user), 201)


@app.post("/api/actions/rollback", status_code=201)
def trigger_rollback(body: RollbackBody, user: CanRollback) -> JSONResponse:
    from recmodel import dashboard

    try:
        dashboard.rollback_target(_url(), body.version)
    except dashboard.Conflict as exc:
        raise HTTPException(409, str(exc)) from None
    return _json(_trigger(ROLLBACK_DAG, {"version": body.version}, user), 201)


def _trigger(dag_id: str, conf: dict[str, Any], user: Any) -> dict[str, Any]:
    """Queue a manual run of `dag_id` as `user`, the way the Airflow UI's trigger button does."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.exceptions import DagNotFound
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunTriggeredByType

    with create_session() as session:
        model = session.get(DagModel, dag_id)
        if model is None or model.is_stale:
            raise HTTPException(404, f"DAG {dag_id} is not known to Airflow yet: is the dag-processor running?")
        if model.is_paused:
            raise HTTPException(409, f"DAG {dag_id} is paused: unpause it in Airflow (or `airflow dags unpause "
                                     f"{dag_id}`) so the run can start")
    try:
        run = trigger_dag(dag_id, triggered_by=DagRunTriggeredByType.UI, triggering_user_name=user.get_name(),
                          conf=conf, note=f"from the Recommender page by {user.get_name()}")
    except DagNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    return {"dag_id": dag_id, "dag_run_id": run.run_id, "conf": conf, "state": str(run.state),
            "url": f"/dags/{dag_id}/runs/{run.run_id}"}


class RecommenderPlugin(AirflowPlugin):
    name = "recommender"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [{"app": app, "url_prefix": URL_PREFIX, "name": "Recommender"}]
    external_views: ClassVar[list[dict[str, Any]]] = [{
        "name": "Recommender",
        "href": f"{URL_PREFIX}/",
        "destination": "nav",
        "url_route": "recommender",
        "icon": f"{URL_PREFIX}/icon.svg",
    }]
