"""The YAML config of DESIGN.md, validated by pydantic.

A wrong or unknown field is an error that names it (`models[0].contex: unknown field`),
and nothing starts. The file is read once at start-up and passed in; there is no global.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.core.model_source import SourceError, normalize_sha256, parse_url, store_name_for

MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$")
KvType = Literal["f16", "q8_0", "q4_0"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GatewayConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the OpenAI-compatible endpoint binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the endpoint.")
    api_key: str | None = Field(
        None, description="Key clients must send (Bearer) from any address but loopback; env HOMEFLEET_API_KEY."
    )
    queue_per_replica: int = Field(
        8, ge=1, description="Requests waiting per replica before the gateway answers 503 with Retry-After."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body; a larger one is answered 413 before it is parsed."
    )
    admin_key: str | None = Field(
        None, description="Key (Bearer) for load, unload and reload from any address but loopback; "
        "env HOMEFLEET_ADMIN_KEY. Without one, those calls are refused off loopback.",
    )
    load_timeout_s: float = Field(
        300.0, gt=0, description="How long a request for a model that is not loaded waits for it to load."
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the endpoint (CORS), e.g. http://localhost:3000, or '*'; "
        "none by default.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Reverse proxies (addresses or networks, e.g. 127.0.0.1, 10.0.0.0/24) whose X-Forwarded-For "
        "names the client; from any other peer the header is ignored. The forwarded client is then what the "
        "API key's loopback exemption checks. None by default.",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, value: list[str]) -> list[str]:
        from orchestrator.gateway.client_address import parse_networks

        parse_networks(value)  # a ValueError names the entry
        return [entry.strip() for entry in value]


class ClusterConfig(_Strict):
    ray_port: int = Field(6379, ge=1, le=65535, description="Port of the Ray head (GCS) that workers join.")
    node_ip_address: str | None = Field(
        None, description="Address Ray binds to on the head; the LAN address for a multi-machine cluster."
    )
    node_name: str | None = Field(None, description="Name of the head's own worker node (hostname by default).")
    models_dir: str | None = Field(
        None, description="Directory where this node keeps GGUF files (default ~/.local/share/homefleet/models)."
    )
    store_port: int = Field(
        0, ge=0, le=65535, description="Port where this node serves its model files to peers (0: any free port)."
    )
    report_interval_s: float = Field(2.0, gt=0, description="How often node agents report live use.")
    wait_for_nodes: list[str] = Field(
        default_factory=list,
        description="Nodes to wait for before the first placement, so models land on the machines meant "
        "for them rather than on whichever joined first (later, `rebalance` moves them back when a machine returns).",
    )
    wait_for_nodes_s: float = Field(120.0, ge=0, description="How long to wait for them before placing anyway.")
    keep_free_disk_gib: float = Field(
        2.0, ge=0, description="Disk a model copy must leave free on a node's store; a node without that room is skipped."
    )
    copy_rate_limit_mib_s: float | None = Field(
        None, gt=0, description="Cap on each node-to-node copy or download, in MiB/s (None: as fast as the network)."
    )
    rebalance: bool = Field(
        True, description="Move a model back, make-before-break, when a machine (re)joins and the rules "
        "would place it better there (a small model gives the big card back)."
    )
    copy_attempts: int = Field(
        3, ge=1, le=20, description="Fetches of a file whose SHA-256 does not match before the model is failed."
    )
    rpc_port: int = Field(
        50052, ge=1, le=65535, description="First port of the llama.cpp RPC servers that helper nodes run for splits "
        "across machines (one port per split on a node, counting up); bound to the node's cluster address only."
    )
    rpc_split: bool = Field(
        True, description="Split a model that no GPU holds whole across the GPUs of RPC-capable nodes, where that "
        "is predicted faster than the best single node (false: never)."
    )
    wake_timeout_s: float = Field(
        120.0, gt=0, description="How long a request waits for a sleeping machine sent Wake-on-LAN (the only one "
        "that can hold its model) to come back; its load time counts after that."
    )


class ModelConfig(_Strict):
    name: str = Field(..., description="What clients send as `model`.")
    path: str | None = Field(
        None, description="GGUF file (absolute, or relative to each node's models dir); copied to the node placement picks."
    )
    url: str | None = Field(
        None, description="Where to download the file when no node holds it: http(s) or hf://OWNER/REPO/FILE.gguf[@REV]."
    )
    sha256: str | None = Field(None, description="Pin the file's SHA-256; a copy that does not match is never used.")
    catalog: str | None = Field(None, description="Catalog entry to plan with before the file exists.")
    context: int = Field(4096, ge=64, le=1_048_576, description="Context length (n_ctx) in tokens.")
    replicas: int = Field(1, ge=0, le=64, description="How many copies to run.")
    chat_format: str | None = Field(None, description="llama-cpp-python chat format when the GGUF has no template.")
    node: str | None = Field(None, description="Pin every replica to this node.")
    gpu_layers: int | None = Field(None, ge=-1, description="Layers on the GPU (-1 all, 0 CPU only); estimated when unset.")
    keep_free_vram_mib: int = Field(0, ge=0, description="VRAM to leave free on the chosen GPU.")
    n_threads: int | None = Field(None, ge=1, description="CPU threads for decoding; physical cores by default.")
    flash_attn: bool | None = Field(
        None, description="Flash attention: true on, false off; unset: llama.cpp decides (on where the backend has it)."
    )
    kv_type: KvType = Field("f16", description="KV cache type; q8_0/q4_0 need flash_attn.")
    embedding: bool = Field(False, description="Serve /v1/embeddings with this model.")
    parallel: int | None = Field(
        None, ge=1, le=64,
        description="Requests a replica serves at once (slots, each with the full context); "
        "by default as many, up to 4, as the node can hold.",
    )
    load: Literal["always", "on_demand"] = Field(
        "always", description="`always`: loaded at start and kept; `on_demand`: loaded by its first request."
    )
    keep_alive: str | int | float | None = Field(
        None, description="How long it stays loaded after its last request: seconds, or 30s/5m/1h; -1 for ever. "
        "Default: for ever for `load: always`, 30m for `on_demand`.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, value: str) -> str:
        if not MODEL_NAME_PATTERN.match(value):
            raise ValueError("must be letters, digits, '.', '_', ':' or '-' (no spaces or slashes)")
        return value

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive_is_duration(cls, value):
        if value is None:
            return None
        from orchestrator.core.keep_alive import KeepAliveError, parse_keep_alive

        try:
            parse_keep_alive(value)
        except KeepAliveError as exc:
            raise ValueError(str(exc)) from None
        return value

    @property
    def keep_alive_s(self) -> float | None:
        """Seconds it stays loaded after its last request; None: for ever."""
        from orchestrator.core.keep_alive import DEFAULT_ON_DEMAND_S, parse_keep_alive

        if self.keep_alive is None:
            return DEFAULT_ON_DEMAND_S if self.load == "on_demand" else None
        return parse_keep_alive(self.keep_alive)

    @field_validator("url")
    @classmethod
    def _url_is_fetchable(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_url(value)
            except SourceError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256_is_hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return normalize_sha256(value)
        except SourceError as exc:
            raise ValueError(str(exc)) from None

    @property
    def file_name(self) -> str | None:
        """The file's name in a node's store: the base name of `path`, else of the URL."""
        if self.path:
            return store_name_for(Path(self.path).name)
        if self.url:
            return parse_url(self.url).file_name
        return None

    @model_validator(mode="after")
    def _has_a_source(self) -> "ModelConfig":
        if not self.path and not self.catalog and not self.url:
            raise ValueError("needs `path` (a GGUF file), `url` (where to download it) or `catalog` (for planning)")
        if self.kv_type != "f16" and not self.flash_attn:
            raise ValueError(f"kv_type {self.kv_type} needs flash_attn: true")
        return self


class HomefleetConfig(_Strict):
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    models: list[ModelConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_unique(self) -> "HomefleetConfig":
        seen: set[str] = set()
        for index, model in enumerate(self.models):
            if model.name in seen:
                raise ValueError(f"models[{index}].name: duplicate model name {model.name!r}")
            seen.add(model.name)
        return self


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        message = message.removeprefix("Value error, ")
        lines.append(f"{_field_path(err['loc'])}: {message}")
    return "; ".join(lines)


def parse_config(data: object, source: str = "config") -> HomefleetConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return HomefleetConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None


def load_config(path: str | Path) -> HomefleetConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, source=str(path))
