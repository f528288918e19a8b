"""The Ray ingress's HTTP side without a cluster: KServe v2 JSON and Triton's binary tensor
extension (read and written), RayServeConfig from `serve run` strings, and the serving modules
importing with torch unimportable."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rmt_deploy.errors import InputError
from rmt_deploy.serving.kserve_http import InferRequest, encode_infer_response, parse_infer_request
from rmt_deploy.serving.protocol import RequestError
from rmt_deploy.serving.ray_config import RayServeConfig


def _tritonclient_body(binary: bool, outputs: list[str] | None = None):
    """A request body exactly as tritonclient.http builds it."""
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.http._utils import _get_inference_request

    task = httpclient.InferInput("task", [2, 1], "BYTES")
    task.set_data_from_numpy(np.array([[b"alpha"], [b"beta"]], dtype=object), binary_data=binary)
    image = httpclient.InferInput("image", [2, 4, 5, 3], "UINT8")
    image.set_data_from_numpy(np.arange(120, dtype=np.uint8).reshape(2, 4, 5, 3), binary_data=binary)
    requested = None if outputs is None else [httpclient.InferRequestedOutput(n, binary_data=binary)
                                              for n in outputs]
    return _get_inference_request([task, image], "req-1", requested, 0, False, False, 0, None, None)


@pytest.mark.parametrize("binary", [True, False])
def test_reads_what_tritonclient_sends(binary):
    body, header_length = _tritonclient_body(binary, outputs=["labels"])
    parsed = parse_infer_request(body, None if header_length is None else str(header_length))
    assert (header_length is not None) == binary
    assert list(parsed.inputs["task"].reshape(-1)) == [b"alpha", b"beta"]
    assert parsed.inputs["image"].dtype == np.uint8
    assert np.array_equal(parsed.inputs["image"], np.arange(120, dtype=np.uint8).reshape(2, 4, 5, 3))
    assert parsed.request_id == "req-1" and parsed.outputs == {"labels": binary}


@pytest.mark.parametrize("outputs", [None, ["probs", "labels"]])
def test_binary_response_reads_back_in_tritonclient(outputs):
    httpclient = pytest.importorskip("tritonclient.http")
    body, header_length = _tritonclient_body(True, outputs)
    parsed = parse_infer_request(body, str(header_length))
    arrays = {"labels": np.array([[b"cat", b""], [b"dog", b"\xc3\xa9"]], dtype=object),
              "probs": np.array([[0.75, 0.0], [0.5, 0.25]], np.float32),
              "index": np.array([[0], [1]], np.int64)}
    payload, headers = encode_infer_response("rmt", arrays, parsed)
    result = httpclient.InferResult.from_response_body(payload, header_length=int(headers[
        "inference-header-content-length"]))
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == (["labels", "probs", "index"] if outputs is None else ["labels", "probs"])
    assert np.array_equal(result.as_numpy("probs"), arrays["probs"])
    assert list(result.as_numpy("labels").reshape(-1)) == list(arrays["labels"].reshape(-1))
    assert result.get_response()["id"] == "req-1"


def test_json_response_when_not_asked_for_binary():
    request = InferRequest({}, None, {"probs": False}, False)
    payload, headers = encode_infer_response("rmt", {"probs": np.array([[0.5]], np.float32)}, request)
    assert "inference-header-content-length" not in headers
    assert json.loads(payload)["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [1, 1],
                                               "data": [0.5]}]


def _binary(header: dict, data: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + data, str(len(head))


@pytest.mark.parametrize("header, data, message", [
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                  "parameters": {"binary_data_size": 11}}]}, bytes(11), "needs 12"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                  "parameters": {"binary_data_size": 12}}]}, bytes(8), "runs past"),
    ({"inputs": [{"name": "task", "datatype": "BYTES", "shape": [1, 1],
                  "parameters": {"binary_data_size": 6}}]}, b"\xff\x00\x00\x00ab", "says 255 bytes"),
    ({"inputs": [{"name": "task", "datatype": "BYTES", "shape": [1, 1],
                  "parameters": {"binary_data_size": 4}}]}, b"\x00\x00\x00\x00xx", "bytes of tensor data follow"),
    ({"inputs": [{"name": "task", "datatype": "BYTES", "shape": [1, 1],
                  "parameters": {"binary_data_size": -1}}]}, b"", "not a byte count"),
    ({"inputs": [{"name": "x", "datatype": "FP99", "shape": [1],
                  "parameters": {"binary_data_size": 0}}]}, b"", "datatype 'FP99'"),
])
def test_malformed_binary_requests_name_the_problem(header, data, message):
    body, length = _binary(header, data)
    with pytest.raises(RequestError) as info:
        parse_infer_request(body, length)
    assert message in str(info.value)


@pytest.mark.parametrize("length, message", [("abc", "not an integer"), ("0", "outside"), ("999999", "outside")])
def test_bad_header_length_is_refused(length, message):
    with pytest.raises(RequestError) as info:
        parse_infer_request(b'{"inputs": []}', length)
    assert message in str(info.value)


def test_config_reads_serve_run_strings():
    config = RayServeConfig.from_dict({"bundle": "/b", "replicas": "2", "cache_tasks": "3", "replica_cpus": "0.5",
                                       "threads": "none", "max_replicas": "4", "colour": "blue"})
    assert (config.replicas, config.cache_tasks, config.replica_cpus, config.threads) == (2, 3, 0.5, None)
    assert config.autoscaling == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2.0}
    assert config.extra == {"colour": "blue"}
    assert RayServeConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("args, message", [
    ({}, "no bundle given"),
    ({"bundle": "/b", "replicas": "two"}, "replicas='two' is not an integer"),
    ({"bundle": "/b", "cache_tasks": "0"}, "cache_tasks=0 must be an integer >= 1"),
    ({"bundle": "/b", "routing": "random"}, "routing='random' is not one of multiplexed, round_robin"),
    ({"bundle": "/b", "min_replicas": "2"}, "needs max_replicas"),
    ({"bundle": "/b", "min_replicas": "5", "max_replicas": "3"}, "min_replicas=5 must be an integer in [0, max"),
])
def test_config_errors_name_the_value(args, message):
    with pytest.raises(InputError) as info:
        RayServeConfig.from_dict(args)
    assert message in str(info.value)


def test_app_builder_passes_replicas_autoscaling_and_cache_size_to_serve():
    pytest.importorskip("ray.serve")
    from rmt_deploy.serving.ray import app

    built = app({"bundle": "/b", "max_replicas": "3", "target_ongoing_requests": "1.5", "replica_cpus": "0.5"})
    ingress = built._bound_deployment  # Serve's bound graph (private but stable since 2.7)
    replica = ingress.init_args[0]._bound_deployment
    scaling = replica._deployment_config.autoscaling_config
    assert (ingress.name, replica.name) == ("KServeIngress", "TaskReplica")
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 1.5)
    assert replica.ray_actor_options["num_cpus"] == 0.5 and ingress.ray_actor_options["num_cpus"] == 0
    assert replica.ray_actor_options["num_gpus"] == 0
    fixed = app({"bundle": "/b", "replicas": "2"})._bound_deployment.init_args[0]._bound_deployment
    assert fixed._deployment_config.num_replicas == 2 and fixed._deployment_config.autoscaling_config is None
    rr = app({"bundle": "/b", "replicas": "3", "routing": "round_robin"})._bound_deployment.init_args[0]
    assert [a._bound_deployment.name for a in rr] == ["TaskReplica0", "TaskReplica1", "TaskReplica2"]


SERVING_MODULES = ["rmt_deploy.serving.kserve_http", "rmt_deploy.serving.ray_config",
                   "rmt_deploy.serving.ray_ingress", "rmt_deploy.serving.ray_replica", "rmt_deploy.serving.ray"]


def test_ray_serving_modules_import_without_torch():
    pytest.importorskip("ray.serve")
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in ("torch", "torchvision", "open_clip"):
            sys.modules[name] = None
        for module in {SERVING_MODULES!r}:
            importlib.import_module(module)
        from rmt_deploy.serving.ray import RayServeConfig, build_app
        build_app(RayServeConfig(bundle="/nowhere", replicas=2))  # binds deployments, starts nothing
        print("torch" in sys.modules and sys.modules["torch"] is not None)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_kuberay_manifest_is_a_valid_serve_config_for_this_app():
    yaml = pytest.importorskip("yaml")
    schema = pytest.importorskip("ray.serve.schema")
    from pathlib import Path

    manifest = yaml.safe_load((Path(__file__).parents[2] / "examples" / "kuberay" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    serve_config = schema.ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (application,) = serve_config.applications
    assert application.import_path == "rmt_deploy.serving.ray:app"
    config = RayServeConfig.from_dict(application.args)
    assert config.extra == {} and config.autoscaling["max_replicas"] == 8
    ray_version = manifest["spec"]["rayClusterConfig"]["rayVersion"]
    assert ray_version.split(".")[0] == "2"
