"""Re-reading the config file while the fleet runs: `POST /api/reload`, `homefleet reload`
and SIGHUP to `homefleet up` all come here.

The file is read and validated first; a config error (naming the field) changes nothing.
Then the controller applies the models: new ones added, removed ones unloaded once their
requests finish, changed ones reloaded. Settings read only at start (the gateway's address
and keys, Ray's ports, this node's name and store) are reported as needing a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from orchestrator.config import ConfigError, HomefleetConfig, load_config

# Read once by `homefleet up` (the gateway app, Ray, this node's agent): a reload cannot change them.
START_ONLY_FIELDS = {
    "gateway": ("host", "port", "api_key", "admin_key", "queue_per_replica", "max_body_bytes", "cors_origins"),
    "cluster": ("ray_port", "node_ip_address", "node_name", "models_dir", "store_port"),
}


class NoConfigFile(ConfigError):
    """`up` started without --config (the demo): there is no file to re-read."""


class ConfigReloader:
    """Reads the file `up` read (`controller.config_path`) with `reread` and hands the new
    config to `controller.reload_config`, one reload at a time."""

    def __init__(self, controller, reread: Callable[[str], HomefleetConfig] = load_config) -> None:
        self.controller = controller
        self.reread = reread
        self._lock = asyncio.Lock()

    async def reload(self) -> dict:
        """The controller's summary (added, removed, changed, unchanged) plus `restart_needed`;
        ConfigError (nothing changed) when the file cannot be used."""
        path = getattr(self.controller, "config_path", None)
        if not path:
            raise NoConfigFile("`homefleet up` runs the demo without a config file: there is no file to re-read "
                               "(start it with --config FILE)")
        async with self._lock:
            config = await asyncio.to_thread(self.reread, path)  # file I/O off the event loop
            before = self.controller.config
            summary = await self.controller.reload_config(config)
        return {**summary, "restart_needed": restart_needed(before, config)}


def restart_needed(before: HomefleetConfig, after: HomefleetConfig) -> list[str]:
    """The start-only settings that differ (`gateway.port`), which keep their old values until a restart."""
    out = []
    for section, names in START_ONLY_FIELDS.items():
        old, new = getattr(before, section), getattr(after, section)
        out += [f"{section}.{name}" for name in names if getattr(old, name) != getattr(new, name)]
    return out


def describe_reload(summary: dict) -> str:
    """'reloaded: added coder; removed old; changed chat' (or 'no model changed'), then what waits for a restart."""
    parts = [f"{word} {', '.join(summary[word])}" for word in ("added", "removed", "changed") if summary.get(word)]
    line = "reloaded: " + ("; ".join(parts) if parts else "no model changed")
    if summary.get("restart_needed"):
        line += f" ({', '.join(summary['restart_needed'])} take effect at the next `homefleet up`)"
    return line
