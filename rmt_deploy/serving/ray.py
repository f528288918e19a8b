"""The rmt-deploy service on a Ray Serve cluster: tasks routed to the replicas that hold them.

    serve run rmt_deploy.serving.ray:app bundle=PATH replicas=2 cache_tasks=2
    rmt-deploy serve --engine ray --bundle PATH --replicas 2

One application: a KServe v2 HTTP ingress (ray_ingress) in front of a deployment of
TaskReplicas (ray_replica), one Engine each, the task as the multiplexed model id.
Options are RayServeConfig's fields (`serve run` passes them as key=value strings).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

from rmt_deploy.errors import InputError, require
from rmt_deploy.serving.ray_config import RayServeConfig

__all__ = ["RayServeConfig", "app", "build_app", "run", "serve_from_cli"]

log = logging.getLogger(__name__)

REPLICA = "TaskReplica"
INGRESS = "KServeIngress"


def build_app(config: RayServeConfig) -> Any:
    """The Ray Serve Application (ingress bound to its replica deployment or deployments)."""
    serve = require("ray.serve", "ray")
    from rmt_deploy.serving.ray_ingress import KServeIngress
    from rmt_deploy.serving.ray_replica import TaskReplica

    for key in config.extra:
        log.warning("rmt-deploy ray: unknown option %r ignored (options: %s)", key,
                    ", ".join(sorted(RayServeConfig.__dataclass_fields__.keys() - {"extra"})))
    settings = config.to_dict()
    replica = serve.deployment(TaskReplica, name=REPLICA).options(
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        max_ongoing_requests=config.max_ongoing_requests,
        health_check_period_s=5, graceful_shutdown_timeout_s=10,
    )
    if config.routing == "round_robin":
        if config.autoscaling is not None:
            raise InputError("routing=round_robin runs a fixed number of replicas: drop max_replicas")
        # one single-replica deployment per replica, so the ingress can pick the replica itself
        replicas: Any = [replica.options(name=f"{REPLICA}{i}", num_replicas=1).bind(settings)
                         for i in range(config.replicas)]
    elif config.autoscaling is not None:
        replicas = replica.options(autoscaling_config=config.autoscaling).bind(settings)
    else:
        replicas = replica.options(num_replicas=config.replicas).bind(settings)
    ingress = serve.deployment(KServeIngress, name=INGRESS).options(
        ray_actor_options={"num_cpus": config.ingress_cpus}, max_ongoing_requests=256)
    return ingress.bind(replicas, settings)


def app(args: dict[str, str]) -> Any:
    """Application builder for `serve run rmt_deploy.serving.ray:app bundle=PATH [replicas=N ...]`."""
    return build_app(RayServeConfig.from_dict(args))


def run(config: RayServeConfig, host: str = "0.0.0.0", port: int = 8000, address: str | None = None,
        stop: threading.Event | None = None, ready: Callable[[str], None] | None = None) -> None:
    """Start a local Ray cluster, or join the one at `address` (or RAY_ADDRESS); serve the app on
    host:port until SIGTERM/Ctrl-C or `stop`; then delete the application (replicas finish what they
    hold), and shut Serve and Ray down only when this call started them."""
    ray = require("ray", "ray")
    serve = require("ray.serve", "ray")
    from rmt_deploy.artifacts.bundle import Bundle

    Bundle.open(config.bundle)  # a bad path or manifest fails here, before a cluster starts
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # "local": a cluster of our own, never whichever one `ray start` left on this machine (maybe dead)
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    stop = stop or threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
                if threading.current_thread() is threading.main_thread()}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
        if ready is not None:
            ready(f"http://{host}:{port}")
        stop.wait()
    finally:
        try:
            serve.delete(config.app_name)
            if not address:  # a cluster of our own; on a shared one other applications keep running
                serve.shutdown()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve_from_cli(bundle: Path, host: str, port: int, **options: Any) -> None:
    """`rmt-deploy serve --engine ray`: the options the Triton server shares, on Ray Serve."""
    import click

    config = RayServeConfig(bundle=str(bundle), **options)

    def announce(url: str) -> None:
        click.echo(f"serving {config.bundle} on Ray Serve ({config.replicas} replicas, cache_tasks "
                   f"{config.cache_tasks}) as model '{config.model_name}': http {url}; Ctrl-C or SIGTERM to stop",
                   err=True)

    run(config, host, port, ready=announce)
    click.echo("stopped", err=True)
