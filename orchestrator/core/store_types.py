"""What a node's model store holds and how a transfer into it is going: plain values that
agents report and the controller, the views and the CLI read."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, computed_field

TransferState = Literal["queued", "copying", "downloading", "verifying", "done", "failed", "cancelled"]
ACTIVE_TRANSFER_STATES = ("queued", "copying", "downloading", "verifying")


class StoredFile(BaseModel):
    name: str = Field(..., description="File name in the store (or the base name of a configured path).")
    path: str = Field(..., description="Absolute path on its node.")
    size_bytes: int
    mtime_ns: int = 0
    sha256: str | None = Field(None, description="None while the node is still hashing it.")
    copied_by_homefleet: bool = Field(
        False, description="Written by a homefleet transfer (so `homefleet models prune` may remove it)."
    )
    in_store: bool = Field(True, description="False for a configured path outside the node's models dir.")


class StoreReport(BaseModel):
    models_dir: str
    disk_free_bytes: int | None = Field(None, description="Free bytes on the store's volume (declared or measured).")
    disk_total_bytes: int | None = None
    files: list[StoredFile] = Field(default_factory=list)
    server_url: str | None = Field(None, description="Where peers fetch this store's files (authenticated).")

    def by_name(self) -> dict[str, StoredFile]:
        return {f.name: f for f in self.files}


class TransferProgress(BaseModel):
    transfer_id: str
    name: str = Field(..., description="File name in the target store.")
    state: TransferState
    kind: Literal["copy", "download"] = Field("copy", description="copy: from a peer node; download: from a URL.")
    source: str | None = Field(None, description="The node or URL bytes are coming from now.")
    bytes_done: int = 0
    total_bytes: int | None = None
    rate_bytes_per_s: float | None = None
    eta_s: float | None = None
    attempt: int = 1
    error: str | None = None
    sha256: str | None = Field(None, description="Of the finished file.")
    path: str | None = Field(None, description="Of the finished file.")

    @computed_field  # in the JSON too: the dashboard and the CLI need not repeat the rule
    @property
    def percent(self) -> float | None:
        if not self.total_bytes:
            return None
        return min(100.0, 100.0 * self.bytes_done / self.total_bytes)

    @computed_field
    @property
    def active(self) -> bool:
        return self.state in ACTIVE_TRANSFER_STATES
