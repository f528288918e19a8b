"""`rmt-deploy serve`: a bundle's tasks behind Triton Inference Server (serving.launch) or Ray Serve (serving.ray)."""
from __future__ import annotations

from pathlib import Path

import click

from rmt_deploy.serving.launch import check_port_free, serve_bundle
from rmt_deploy.serving.triton_repo import ServingConfig
from rmt_deploy.serving.tritonserver import Ports


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
@click.option("--engine", type=click.Choice(["triton", "ray"]), default="triton", show_default=True,
              help="ray: a Ray Serve app (KServe v2 HTTP only; RAY_ADDRESS joins a cluster), tasks routed "
                   "to the replicas that hold them.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="--engine ray: Engine replicas behind the one endpoint.")
def serve(bundle_path: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, model_name: str,
          top_k: int, cache_tasks: int, max_batch: int, max_queue_delay_us: int, threads: int | None,
          instances: int, backend: str, max_image_pixels: int, drain_timeout: int, engine: str,
          replicas: int) -> None:
    """Serve a bundle's tasks over KServe v2 HTTP/gRPC with Triton Inference Server (or Ray Serve)."""
    if engine == "ray":
        check_port_free(host, http_port, "--http-port")
        from rmt_deploy.serving.ray import serve_from_cli

        serve_from_cli(bundle_path, host, http_port, replicas=replicas, cache_tasks=cache_tasks, top_k=top_k,
                       model_name=model_name, threads=threads, backend=backend, max_image_pixels=max_image_pixels)
        return
    config = ServingConfig(model_name=model_name, top_k=top_k, max_batch=max_batch,
                           max_queue_delay_us=max_queue_delay_us, cache_tasks=cache_tasks, threads=threads,
                           backend=backend, max_image_pixels=max_image_pixels, instances=instances)
    serve_bundle(bundle_path, Ports(http_port, grpc_port, metrics_port, host), config, drain_timeout,
                 say=lambda text: click.echo(text, err=True))
