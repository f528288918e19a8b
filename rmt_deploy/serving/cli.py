"""`rmt-deploy serve`: Triton Inference Server over one bundle, every task behind one model.

Writes a model repository for the bundle (serving.triton_repo) into a private workspace,
runs the tritonserver binary from the nvidia-pytriton wheel on it (serving.tritonserver),
and on SIGTERM or Ctrl-C lets Triton finish the requests in flight before exiting 0.
"""
from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

import click

from rmt_deploy.errors import InputError
from rmt_deploy.serving.triton_repo import ServingConfig
from rmt_deploy.serving.tritonserver import Ports, ServerError

# Triton's log line once no inference is in flight during shutdown (it then unloads the models)
DRAINED = "Found 0 model versions that have in-flight inferences"


def check_port_free(host: str, port: int, option: str) -> None:
    """InputError naming the option when `port` cannot be bound on `host`."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InputError(f"{option} {port} on {host} is not free ({exc.strerror}); pick another port") from None


def serve_bundle(bundle_path: Path, ports: Ports, config: ServingConfig, drain_timeout: int) -> None:
    """Serve until SIGTERM / SIGINT, then drain; ServerError if Triton fails or dies."""
    from rmt_deploy.bundle import Bundle
    from rmt_deploy.serving.triton_repo import write_engine_model
    from rmt_deploy.serving.tritonserver import TritonServer

    config.validate()
    bundle = Bundle.open(bundle_path)
    for option, port in (("--http-port", ports.http), ("--grpc-port", ports.grpc), ("--metrics-port", ports.metrics)):
        check_port_free(ports.host, port, option)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    workspace = Path(tempfile.mkdtemp(prefix="rmt-serve-"))
    try:
        repo = workspace / "models"
        write_engine_model(repo, bundle, config)
        server = TritonServer(repo, workspace, ports, workspace / "triton.log",
                              extra=[f"--exit-timeout-secs={drain_timeout}"])
        try:
            server.wait_ready()
            click.echo(f"serving {len(bundle.tasks)} tasks ({', '.join(bundle.tasks)}) as model "
                       f"'{config.model_name}': http {server.url}, grpc {ports.host}:{ports.grpc}, "
                       f"metrics :{ports.metrics}/metrics; Ctrl-C or SIGTERM to stop", err=True)
            while not stop.is_set() and server.process.poll() is None:
                stop.wait(0.5)
            if not stop.is_set():
                raise ServerError(f"tritonserver exited with status {server.process.returncode}:\n"
                                  f"{server.log_errors()}")
            click.echo("stopping: finishing the requests in flight", err=True)
        finally:
            status = server.stop(timeout=drain_timeout + 30)
        if status != 0 and DRAINED not in server.log.read_text(errors="replace"):
            raise ServerError(f"tritonserver did not drain within {drain_timeout} s (status {status}):\n"
                              f"{server.log_errors()}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(workspace, ignore_errors=True)


@click.command("serve")
@click.option("--bundle", "bundle_path", required=True, type=click.Path(path_type=Path),
              help="bundle directory (rmt-deploy export --mode shared or both).")
@click.option("--host", default="0.0.0.0", show_default=True, help="address to listen on.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--model-name", default="rmt", show_default=True, help="the Triton model clients call.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="labels and probabilities per answer (padded for tasks with fewer classes).")
@click.option("--cache-tasks", type=click.IntRange(min=1), default=2, show_default=True,
              help="tasks kept resident as dense weights (the engine's pool).")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="largest batch Triton's dynamic batcher forms (requests of any tasks).")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=1000, show_default=True,
              help="how long a request may wait for batch-mates.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime threads (default: all).")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="model instances, each its own process and Engine (memory x N); batches run in parallel.")
@click.option("--backend", default="auto", show_default=True, help="engine backend: auto, onnxruntime, tensorrt.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=ServingConfig.max_image_pixels,
              show_default=True, help="largest image (raw or decoded) a request may send.")
@click.option("--drain-timeout", type=click.IntRange(min=1), default=30, show_default=True,
              help="seconds to finish the requests in flight after SIGTERM / Ctrl-C.")
def serve(bundle_path: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, model_name: str,
          top_k: int, cache_tasks: int, max_batch: int, max_queue_delay_us: int, threads: int | None,
          instances: int, backend: str, max_image_pixels: int, drain_timeout: int) -> None:
    """Serve a bundle's tasks over KServe v2 HTTP/gRPC with Triton Inference Server."""
    config = ServingConfig(model_name=model_name, top_k=top_k, max_batch=max_batch,
                           max_queue_delay_us=max_queue_delay_us, cache_tasks=cache_tasks, threads=threads,
                           backend=backend, max_image_pixels=max_image_pixels, instances=instances)
    serve_bundle(bundle_path, Ports(http_port, grpc_port, metrics_port, host), config, drain_timeout)
