"""The admin surface: `POST /api/models/{name}/load`, `POST /api/models/{name}/unload` and
`POST /api/reload` (re-read the config file). `homefleet load`, `unload` and `reload` speak it.

Off loopback these need the admin key (gateway/api_key.py, which also documents their 401
and 403 in the OpenAPI document); errors are OpenAI-shaped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.config import ConfigError
from orchestrator.config_reload import ConfigReloader
from orchestrator.gateway.openapi import error_responses
from worker.errors import RequestError

if TYPE_CHECKING:
    from orchestrator.controller import Controller


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wait: bool = Field(True, description="Answer once the model is ready (or failed); false: as soon as it is started.")


class LoadAnswer(BaseModel):
    model: str
    state: str = Field(..., description="not_loaded, copying, loading, ready, pending or failed.")
    node: str | None = None


class UnloadAnswer(BaseModel):
    model: str
    unloaded: list[str] = Field(..., description="The replicas stopped (after their requests finished).")


class ReloadAnswer(BaseModel):
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]
    restart_needed: list[str] = Field(
        default_factory=list, description="Start-only settings that changed in the file (`gateway.port`): "
        "they keep their old values until the next `homefleet up`.")


def admin_routes(controller: Controller, reloader: ConfigReloader) -> APIRouter:
    api = APIRouter(tags=["admin"])

    @api.post("/api/models/{name}/load", responses={200: {"model": LoadAnswer}, **error_responses(404, 503)})
    async def load(name: str, body: LoadRequest | None = None):
        """Load a configured model now (placed, copied to its node if needed, loaded)."""
        return await controller.load_model(name, wait=body.wait if body is not None else True)

    @api.post("/api/models/{name}/unload", responses={200: {"model": UnloadAnswer}, **error_responses(404)})
    async def unload(name: str):
        """Unload a model's replicas once their requests finish; it loads again on demand or by `load`."""
        return await controller.unload_model(name)

    @api.post("/api/reload", responses={200: {"model": ReloadAnswer}, **error_responses(400)})
    async def reload():
        """Re-read the config file `homefleet up` read (as SIGHUP does); an error names the field and
        changes nothing."""
        try:
            return await reloader.reload()
        except ConfigError as exc:
            raise RequestError(str(exc), status=400, code="invalid_config") from None

    return api
