"""Shared pytest settings."""

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """The gateway runs on asyncio (uvicorn), so its async tests do too, even where another
    backend (trio, which selenium brings) is installed and anyio would run them on it as well."""
    return "asyncio"
