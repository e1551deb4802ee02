"""Fixtures of the gateway's tests over a fake cluster (tests/unit/test_gateway_fakes.py): one
model with one replica whose calls are recorded, the real app, an in-process client. A module
that needs another setup defines its own fixture of the same name."""

from __future__ import annotations

import pytest

from tests.unit.test_gateway_fakes import MODEL, FakeController, FakeReplicaHandle, app_for, asgi_client


@pytest.fixture
def handle() -> FakeReplicaHandle:
    return FakeReplicaHandle()


@pytest.fixture
def controller(handle) -> FakeController:
    controller = FakeController(MODEL, "other-model")
    controller.add_replica(MODEL, handle)
    return controller


@pytest.fixture
async def client(controller):
    async with asgi_client(app_for(controller)) as client:
        yield client
