"""The cluster's own surface: `/api/cluster` (what the CLI and the dashboard read), the
dashboard page, and the `/healthz` and `/readyz` probes (`/metrics`: gateway/metrics.py)."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse

from orchestrator.cluster_view import ClusterView
from orchestrator.gateway.responses import Health, Readiness

if TYPE_CHECKING:
    from orchestrator.controller import Controller


def cluster_routes(controller: Controller) -> APIRouter:
    api = APIRouter()
    dashboard_html = resources.files("orchestrator.gateway").joinpath("dashboard.html")

    @api.get("/api/cluster", tags=["cluster"], responses={200: {"model": ClusterView}})
    async def cluster():
        """Nodes, models and placements, with reasons."""
        return JSONResponse(controller.view().model_dump(mode="json"))

    @api.get("/healthz", tags=["probes"], response_model=Health)
    async def healthz():
        """The gateway answers."""
        return {"status": "ok"}

    @api.get("/readyz", tags=["probes"], response_model=Readiness,
             responses={503: {"model": Readiness, "description": "Not every model is ready or failed yet."}})
    async def readyz():
        """Ready once every model is ready, failed or not loaded (it loads on its first
        request), and one at least is ready or loads on request."""
        states = {name: controller.model_state(name)[0] for name in controller.models}
        ready = bool(states) and all(s in ("ready", "failed", "not_loaded") for s in states.values()) and any(
            s in ("ready", "not_loaded") for s in states.values()
        )
        return JSONResponse({"ready": ready, "models": states}, status_code=200 if ready else 503)

    @api.get("/", tags=["dashboard"], response_class=HTMLResponse)
    async def dashboard():
        """The dashboard page."""
        return HTMLResponse(dashboard_html.read_text())

    return api
