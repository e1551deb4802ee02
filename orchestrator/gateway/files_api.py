"""The model-file API: `POST /api/pull`, `GET /api/transfers[/{id}]`, `POST /api/models/prune`.

`homefleet pull --url` and `homefleet models prune` speak it; `/api/cluster` shows each
node's store and transfers.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.core.model_source import SourceError, normalize_sha256
from orchestrator.file_keeper import PullError
from orchestrator.gateway.openapi import error_responses
from worker.errors import RequestError


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., description="http(s) URL, hf://OWNER/REPO/FILE.gguf[@REV], or a file name a node holds.")
    node: str | None = Field(None, description="The node whose store gets the file (default: the head).")
    sha256: str | None = Field(None, description="Expected SHA-256; the file is not kept if it does not match.")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        try:
            return None if value is None else normalize_sha256(value)
        except SourceError as exc:
            raise ValueError(str(exc)) from None


class PruneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(False, description="List what would be removed, remove nothing.")


def install_files_api(app: FastAPI, controller) -> None:
    @app.post("/api/pull", status_code=202, tags=["files"], responses=error_responses(404, 409, 502))
    async def pull(body: PullRequest):
        try:
            return await controller.files.pull(body.source, body.node, body.sha256)
        except PullError as exc:
            raise RequestError(str(exc), status=exc.status, param="source" if exc.status == 400 else None,
                               code="pull_failed") from None

    @app.get("/api/transfers", tags=["files"])
    async def transfers():
        out = []
        for node in controller.nodes.values():
            if node.alive and node.name:
                out += [{**t.model_dump(mode="json"), "node": node.name} for t in node.transfers.values()]
        return {"transfers": out}

    @app.get("/api/transfers/{transfer_id}", tags=["files"], responses=error_responses(404))
    async def transfer(transfer_id: str):
        progress = await controller.files.transfer(transfer_id)
        if progress is None:
            raise RequestError(f"no transfer {transfer_id!r}", status=404, code="transfer_not_found")
        return progress

    @app.post("/api/models/prune", tags=["files"])
    async def prune(body: PruneRequest | None = None):
        dry_run = body.dry_run if body is not None else False
        return {"dry_run": dry_run, "files": await controller.files.prune(dry_run)}
