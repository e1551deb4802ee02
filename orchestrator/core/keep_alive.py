"""keep_alive: how long a model stays loaded after its last request.

The forms Ollama accepts: a number of seconds (`300`, `-1` for ever, `0` unload at once), or
a duration string (`30s`, `5m`, `1h`, `1h30m`, `-1`, `-1m`). Negative means for ever, and so
does anything past Ollama's longest duration (about 292 years).
"""

from __future__ import annotations

import re

DEFAULT_ON_DEMAND_S = 30 * 60.0
FOR_EVER_S = (2**63 - 1) / 1e9  # Ollama's longest duration (Go's, in ns: ~292 years); longer is for ever
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class KeepAliveError(ValueError):
    pass


def parse_keep_alive(value: object) -> float | None:
    """Seconds, or None for ever (any negative value)."""
    if isinstance(value, bool):
        raise KeepAliveError(f"keep_alive must be seconds or a duration like 5m, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _duration(text, value)
    else:
        raise KeepAliveError(f"keep_alive must be seconds or a duration like 5m, not {value!r}")
    if seconds != seconds:  # NaN
        raise KeepAliveError("keep_alive must be a number of seconds")
    return None if seconds < 0 or seconds >= FOR_EVER_S else seconds


def _duration(text: str, original: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise KeepAliveError(f"keep_alive {original!r} is not a duration: use seconds, or 30s, 5m, 1h, -1")
    return sign * sum(float(n) * _UNIT_S[u] for n, u in parts)


def describe_keep_alive(seconds: float | None) -> str:
    if seconds is None:
        return "for ever"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"
