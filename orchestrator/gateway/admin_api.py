"""The admin surface: `POST /api/models/{name}/load`, `POST /api/models/{name}/unload`,
`POST /api/reload` (re-read the config file) and `POST /api/nodes/{name}/drain` / `undrain`.
`homefleet load`, `unload`, `reload`, `drain` and `undrain` speak it.

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


class DrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(60.0, ge=0, le=3600, description="How long the node's requests may take to finish "
                             "(and its models to start elsewhere); then what is left there stops.")


class MovedReplica(BaseModel):
    replica: str
    model: str
    to: str = Field(..., description="The node it runs on now.")
    kind: str = Field(..., description="gpu, split or cpu there.")


class StoppedReplica(BaseModel):
    replica: str
    model: str
    reason: str = Field(..., description="Why it was not moved (no other node has room, ...).")


class DrainAnswer(BaseModel):
    node: str
    state: str = Field(..., description="drained; left (the node went away meanwhile); undrained (undrain "
                       "came first).")
    moved: list[MovedReplica] = Field(default_factory=list)
    stopped: list[StoppedReplica] = Field(default_factory=list)
    cut_requests: int = Field(0, description="Requests still running at the timeout, cut.")
    timed_out: bool = False
    seconds: float


class UndrainAnswer(BaseModel):
    node: str
    draining: bool
    was_draining: bool


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

    @api.post("/api/nodes/{name}/drain", responses={200: {"model": DrainAnswer}, **error_responses(404, 409)})
    async def drain(name: str, body: DrainOptions | None = None):
        """No new work for the node; its models start elsewhere first where they fit (make-before-break),
        its requests finish (up to `timeout_s`), then what is left there stops. Answers when done."""
        return await controller.drain_node(name, body.timeout_s if body is not None else 60.0)

    @api.post("/api/nodes/{name}/undrain", responses={200: {"model": UndrainAnswer}, **error_responses(404)})
    async def undrain(name: str):
        """Let placement use a drained node again."""
        return await controller.undrain_node(name)

    @api.post("/api/reload", responses={200: {"model": ReloadAnswer}, **error_responses(400)})
    async def reload():
        """Re-read the config file `homefleet up` read (as SIGHUP does); an error names the field and
        changes nothing."""
        try:
            return await reloader.reload()
        except ConfigError as exc:
            raise RequestError(str(exc), status=400, code="invalid_config") from None

    return api
