"""keep_alive in Ollama's forms (orchestrator/core/keep_alive.py)."""

from __future__ import annotations

import pytest

from orchestrator.core.keep_alive import FOR_EVER_S, KeepAliveError, describe_keep_alive, parse_keep_alive


@pytest.mark.parametrize("value, seconds", [
    (300, 300.0), ("300", 300.0), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25), (0, 0.0),
    (-1, None), ("-1", None), ("-1m", None),
    (FOR_EVER_S, None), (1e300, None), (float("inf"), None), ("99999999999999h", None),  # past Ollama's longest
])
def test_keep_alive_forms(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", [True, "soon", "5 minutes", "", [], float("nan")])
def test_a_keep_alive_that_is_no_duration_is_an_error(value):
    with pytest.raises(KeepAliveError):
        parse_keep_alive(value)


def test_keep_alive_reads_back_as_written():
    assert [describe_keep_alive(s) for s in (None, 7200.0, 300.0, 45.0)] == ["for ever", "2h", "5m", "45s"]
