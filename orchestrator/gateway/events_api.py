"""`GET /api/events?since=ID&limit=N`: what the fleet did and why (orchestrator/event_log.py),
oldest first, with `last_id`, the `since` that asks for the next ones (`homefleet events
--follow` polls with it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.cluster_view import EventView
from orchestrator.event_log import EVENTS_KEPT
from orchestrator.gateway.openapi import error_responses

if TYPE_CHECKING:
    from orchestrator.controller import Controller

DEFAULT_LIMIT = 100


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt parameter is a 400, never ignored

    since: int | None = Field(None, ge=0, description="Only events with a greater id (the `last_id` of the "
                              "previous answer); without it, the latest `limit`.")
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=EVENTS_KEPT, description="At most this many events.")


class EventsPage(BaseModel):
    events: list[EventView] = Field(..., description="Oldest first.")
    last_id: int = Field(..., description="Pass as `since` to get only newer events.")


def events_routes(controller: Controller) -> APIRouter:
    api = APIRouter(tags=["cluster"])

    @api.get("/api/events", response_model=EventsPage, responses=error_responses(400))
    async def events(query: Annotated[EventsQuery, Query()]):
        """Placed, copied, loaded, evicted, unloaded idle, node gone and back, crashed, moved,
        wake sent..., each with its reason."""
        log = controller.events
        returned = log.since(query.since, query.limit)
        return EventsPage(events=[EventView(**e) for e in returned], last_id=log.next_since(returned))

    return api
