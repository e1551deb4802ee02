"""The gateway: one FastAPI app over the controller, built by `create_app(controller, config)`.

Its parts, one concept each: the router (which replica takes a request), the relay (its
answer back, its slot released on every path), the OpenAI surface, the cluster surface, the
file API; around them the request-body limit, the API key and CORS; errors in OpenAI's
shape; an OpenAPI document that says what the server does.

The controller offers the gateway: `models`, `ready_replicas(model)`, `model_state(model)`,
`retry_after_s(model)`, `nodes`, `view()`, `cluster.is_dead_actor_error(exc)`,
`replica_lost(replica, reason)` and `files` (tests/unit/test_gateway_fakes.py builds a fake one);
for the admin API `load_model(name, wait)`, `unload_model(name)`, `reload_config(config)`, `config`
and `config_path` (tests/unit/test_admin_api.py), `drain_node(name, timeout_s)` and
`undrain_node(name)` (tests/unit/test_drain.py).
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from orchestrator.config import HomefleetConfig
from orchestrator.config_reload import ConfigReloader
from orchestrator.gateway.admin_api import admin_routes
from orchestrator.gateway.api_key import ApiKeyOffLoopback
from orchestrator.gateway.client_address import local_names, parse_networks
from orchestrator.gateway.cluster_api import cluster_routes
from orchestrator.gateway.errors import install_error_handlers
from orchestrator.gateway.events_api import events_routes
from orchestrator.gateway.files_api import install_files_api
from orchestrator.gateway.metrics import GatewayMetrics, metrics_routes
from orchestrator.gateway.ollama_api import ollama_routes
from orchestrator.gateway.openai_api import openai_routes
from orchestrator.gateway.openapi import install_openapi
from orchestrator.gateway.plan_api import plan_routes
from orchestrator.gateway.relay import Relay
from orchestrator.gateway.request_body import RequestBody
from orchestrator.gateway.router import Router

if TYPE_CHECKING:
    from orchestrator.controller import Controller

# Headers a browser page may read from an answer (CORS).
EXPOSED_HEADERS = ["x-homefleet-node", "x-homefleet-replica", "retry-after"]


def create_app(controller: Controller, config: HomefleetConfig, api_key: str | None = None,
               admin_key: str | None = None, reloader: ConfigReloader | None = None) -> FastAPI:
    """`reloader` re-reads the config file for `POST /api/reload` (default: the file alone, no flags)."""
    gateway = config.gateway
    app = FastAPI(title="homefleet", version="0.1.0", docs_url="/docs", redoc_url=None,
                  description="One OpenAI-compatible endpoint for the models of a home lab's machines.")
    install_error_handlers(app)
    metrics = GatewayMetrics(controller.view)  # this app's own registry
    listeners = getattr(getattr(controller, "events", None), "listeners", None)
    if listeners is not None:
        listeners.append(metrics.on_event)  # load and copy durations
    router = Router(controller, gateway.queue_per_replica, gateway.load_timeout_s, metrics)
    relay = Relay(controller, router)  # one for both APIs: their streams share each replica's pump
    app.include_router(openai_routes(controller, router, relay, created=int(time.time())))
    app.include_router(ollama_routes(controller, router, relay, started_at=time.time()))
    app.include_router(cluster_routes(controller))
    app.include_router(events_routes(controller))
    app.include_router(metrics_routes(metrics))
    app.include_router(plan_routes(controller))
    install_files_api(app, controller)
    app.include_router(admin_routes(controller, reloader or ConfigReloader(controller)))
    install_openapi(app)
    # Outermost last: CORS (a browser reads even a 401), then the key, then the body.
    app.add_middleware(RequestBody, max_body_bytes=gateway.max_body_bytes)
    app.add_middleware(ApiKeyOffLoopback, api_key=api_key or gateway.api_key, admin_key=admin_key or gateway.admin_key,
                       trusted_proxies=parse_networks(gateway.trusted_proxies),
                       local_names=local_names(gateway.host, socket.gethostname()), cors_origins=gateway.cors_origins)
    if gateway.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=gateway.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=EXPOSED_HEADERS)
    return app
