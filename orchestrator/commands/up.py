"""`homefleet up`: start the Ray head, the orchestrator (gateway + controller) and this
machine's worker; foreground until Ctrl-C, then stop everything it started. SIGHUP re-reads
the config file (as `homefleet reload` does).

The Ray token is kept in a 0600 file and never printed to the log: the banner names the file
(`homefleet join ... --token-file FILE`), and shows the token itself only on a terminal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.cluster_token import DEFAULT_TOKEN_FILE, TokenError, head_token
from orchestrator.config import ConfigError, HomefleetConfig, load_config
from orchestrator.demo import DemoUnavailable, demo_model

log = logging.getLogger("homefleet")
LOG_DIR = Path("~/.cache/homefleet/logs")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "up",
        help="start the head: Ray, the OpenAI-compatible gateway and this machine's worker",
        description="Start the cluster head on this machine and serve the configured models "
        "(the bundled demo model when none are configured). Ctrl-C stops everything it started.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML config (models, gateway, cluster)")
    p.add_argument("--host", help="address the gateway binds to (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gateway port (default 8000)")
    p.add_argument("--ray-port", type=int, help="port workers join on (default 6379)")
    p.add_argument("--node-ip-address", help="address Ray uses: this machine's LAN address, which other machines "
                   "join (default: the address of the default route)")
    p.add_argument("--ray-address", help="use a running Ray cluster at this address instead of starting a head")
    p.add_argument("--name", help="name of this machine's node (default: hostname)")
    p.add_argument("--hardware", metavar="FILE", help="report this hardware file instead of probing")
    p.add_argument("--models-dir", metavar="DIR", help="where this machine keeps GGUF files")
    p.add_argument("--token-file", metavar="FILE", type=Path, default=DEFAULT_TOKEN_FILE,
                   help="where the cluster's Ray token is kept (0600; made on first start unless "
                   f"$HOMEFLEET_TOKEN or $RAY_AUTH_TOKEN gives it; default {DEFAULT_TOKEN_FILE})")
    p.add_argument("--log-level", default=os.environ.get("HOMEFLEET_LOG_LEVEL", "info"))
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace) -> HomefleetConfig:
    return apply_flags(load_config(args.config) if args.config else HomefleetConfig(), args)


def apply_flags(config: HomefleetConfig, args: argparse.Namespace) -> HomefleetConfig:
    """Flags and the environment over the file (HOMEFLEET_API_KEY, HOMEFLEET_ADMIN_KEY win over
    gateway.api_key, gateway.admin_key); the demo model when none is configured. Applied at start
    and again on every reload of the file."""
    if args.host:
        config.gateway.host = args.host
    if args.port:
        config.gateway.port = args.port
    if args.ray_port:
        config.cluster.ray_port = args.ray_port
    if args.node_ip_address:
        config.cluster.node_ip_address = args.node_ip_address
    if args.name:
        config.cluster.node_name = args.name
    if args.models_dir:
        config.cluster.models_dir = args.models_dir
    if os.environ.get("HOMEFLEET_API_KEY"):
        config.gateway.api_key = os.environ["HOMEFLEET_API_KEY"]
    if os.environ.get("HOMEFLEET_ADMIN_KEY"):
        config.gateway.admin_key = os.environ["HOMEFLEET_ADMIN_KEY"]
    if not config.models:
        config.models.append(demo_model())
    return config


def reread_config(args: argparse.Namespace, path: str) -> HomefleetConfig:
    """The config file read again for a reload, with the same flags and environment as at start."""
    try:
        return apply_flags(load_config(path), args)
    except DemoUnavailable as exc:  # the file lost its last model
        raise ConfigError(f"{path}: models: none configured, and {exc}") from None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = resolve_config(args)
        hardware = _read_hardware(args.hardware)
        token, token_warning = head_token(args.token_file, os.environ)
    except (ConfigError, DemoUnavailable, TokenError, ValueError) as exc:  # ValueError: a bad flag or hardware file
        print(f"homefleet up: {exc}", file=sys.stderr)
        return 2
    if token_warning:
        print(f"homefleet up: warning: {token_warning}", file=sys.stderr, flush=True)
    from orchestrator import ray_cluster

    # Before Ray is imported: Ray reads RAY_AUTH_MODE once, when it loads.
    os.environ.update(ray_cluster.auth_environment(token))
    from worker.agent import node_environment

    head = None
    if args.ray_address:
        address = args.ray_address
    else:
        node_ip = config.cluster.node_ip_address or ray_cluster.lan_address()
        log_dir = LOG_DIR.expanduser()
        log_dir.mkdir(parents=True, exist_ok=True)
        node_env = node_environment(config.cluster.node_name, hardware, config.cluster.models_dir,
                                    config.cluster.store_port)
        print(f"homefleet: starting Ray head on {node_ip}:{config.cluster.ray_port} ...", flush=True)
        try:
            head = ray_cluster.start_head(
                node_ip, config.cluster.ray_port, token, node_env, config.cluster.node_name,
                log_path=log_dir / "ray-head.log",
            )
        except (RuntimeError, TimeoutError) as exc:
            print(f"homefleet up: {exc} (log: {log_dir / 'ray-head.log'})", file=sys.stderr)
            return 1
        address = head.address
    # systemd stops with SIGTERM: clean up as on Ctrl-C (uvicorn re-raises the signal it caught).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        ray_cluster.connect(address, token)
        print(banner(config, address, args.token_file, token if _on_terminal() else None), flush=True)
        asyncio.run(_serve(config, args, head, address))
    except KeyboardInterrupt:
        pass
    finally:
        print("homefleet: stopping ...", flush=True)
        import ray

        ray.shutdown()
        if head is not None:
            head.stop()
    print("homefleet: stopped", flush=True)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _read_hardware(path: str | None):
    if not path:
        return None
    from orchestrator.machines import load_hardware_file

    return load_hardware_file(path)


async def _serve(config: HomefleetConfig, args: argparse.Namespace, head=None, address: str | None = None) -> None:
    """Serve until Ctrl-C/SIGTERM; a watchdog thread ends the process (exit 1) if Ray is lost."""
    import uvicorn

    from orchestrator.config_reload import ConfigReloader
    from orchestrator.controller import Controller
    from orchestrator.gateway.app import create_app
    from orchestrator.ray_actors import RayCluster

    controller = Controller(config, RayCluster())
    controller.config_path = args.config
    reloader = ConfigReloader(controller, lambda path: reread_config(args, path))
    app = create_app(controller, config, reloader=reloader)
    server = uvicorn.Server(server_config(app, config))
    controller.start()
    stop_hangup = _reload_on_hangup(reloader)
    threading.Thread(target=_watch_ray, args=(controller, head, address), name="ray-watchdog", daemon=True).start()
    try:
        await server.serve()
    finally:
        stop_hangup()
        await controller.stop()


RAY_LOST_TICKS = 5  # controller ticks in a row that could not reach Ray
GCS_LOST_CHECKS = 5  # seconds in a row the head's GCS port refused connections


def _watch_ray(controller, head, address: str | None) -> None:
    """A thread: when the Ray head's process exits, its GCS stops listening, or the controller
    cannot reach Ray, stop the head's processes and exit 1 so that systemd starts `up` again.
    A thread, not a task: a Ray call that hangs on a dead GCS can block the event loop, and
    Ray's own client would end the process a minute later without cleaning up."""
    import psutil

    refused = 0
    ours: list = []
    while True:
        time.sleep(1.0)
        refused = 0 if address is None or _listening(address) else refused + 1
        if head is not None and head.popen.poll() is not None:
            why = f"the Ray head exited (code {head.popen.returncode})"
        elif refused >= GCS_LOST_CHECKS:
            why = f"the Ray head's GCS at {address} has refused connections for {refused} s"
        elif controller.failed_ticks >= RAY_LOST_TICKS:
            why = f"Ray has not answered for {controller.failed_ticks} controller ticks"
        else:
            if not refused:  # Ray's processes while all is well: once the head dies, its agents are orphaned
                try:
                    ours = psutil.Process().children(recursive=True)
                except psutil.Error:
                    pass
            continue
        print(f"homefleet up: {why}; exiting so that systemd starts it again", file=sys.stderr, flush=True)
        if head is not None:
            head.stop()
        for proc in ours:  # what the head's process group did not take with it (Ray's agents)
            try:
                proc.kill()
            except psutil.Error:
                pass
        os._exit(1)


def _listening(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # slow or unroutable is not "gone": the ticks and the head process say more


def server_config(app, config: HomefleetConfig):
    import uvicorn

    return uvicorn.Config(
        app,
        host=config.gateway.host,
        port=config.gateway.port,
        log_level="warning",
        # X-Forwarded-For counts only from gateway.trusted_proxies, in the key check (api_key.py);
        # uvicorn's own handling would take it from any process on loopback.
        proxy_headers=False,
        access_log=False,
        timeout_graceful_shutdown=5,  # do not wait out a long generation on Ctrl-C
    )


def _reload_on_hangup(reloader) -> Callable[[], None]:
    """SIGHUP re-reads the config file (as `homefleet reload` does); returns what undoes it."""
    if not hasattr(signal, "SIGHUP"):  # Windows
        return lambda: None
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task] = set()

    def on_hangup() -> None:
        task = loop.create_task(_reload(reloader))
        running.add(task)
        task.add_done_callback(running.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


async def _reload(reloader) -> None:
    from orchestrator.config_reload import describe_reload

    try:
        summary = await reloader.reload()
    except ConfigError as exc:
        log.error("SIGHUP: config not reloaded, nothing changed: %s", exc)
    except Exception:
        log.exception("SIGHUP: config reload failed")
    else:
        log.info("SIGHUP: %s", describe_reload(summary))


def _on_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def banner(config: HomefleetConfig, address: str, token_file: Path, token: str | None = None) -> str:
    """What `up` prints once it serves. It names the token file, never the token: stdout of a
    service is a log. `token` (given only when stdout is a terminal) is shown on a line of its own."""
    base = f"http://{config.gateway.host}:{config.gateway.port}"
    names = ", ".join(m.name for m in config.models)
    from worker.store import default_models_dir

    models_dir = config.cluster.models_dir or default_models_dir()
    token_path = token_file.expanduser()
    lines = [
        f"homefleet: serving {names}",
        f"  this node's models dir: {models_dir} (files travel to the node placement picks)",
        f"  OpenAI endpoint:  {base}/v1",
        f"  dashboard:        {base}/",
        f"  status:           homefleet status --url {base}",
        f"  add a machine:    homefleet join {address} --token-file {token_path} --name NAME",
        f"                    (copy {token_path} there with mode 0600; `homefleet token` prints the token)",
    ]
    if token is not None:
        lines.append(f"  cluster token:    {token}   (shown on this terminal only)")
    lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)
