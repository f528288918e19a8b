"""serving.protocol without a server: request validation, grouping, outputs, KServe v2 JSON."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from rmt_deploy.errors import RmtError, UnknownTaskError
from rmt_deploy.serving import protocol
from rmt_deploy.serving.protocol import ImageLimits, RequestError, Sample

TASKS = ("dtd", "eurosat")


def _task(*names: str) -> np.ndarray:
    return np.array([[n.encode()] for n in names], dtype=object)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_raw_images_decode_to_samples_in_order():
    images = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    samples = protocol.decode_inputs({"task": _task("eurosat", "dtd"), "image": images}, TASKS)
    assert [s.task for s in samples] == ["eurosat", "dtd"]
    np.testing.assert_array_equal(samples[1].image, images[1])


def test_image_bytes_decode_to_rgb_images():
    samples = protocol.decode_inputs({"task": _task("dtd"), "image_bytes": np.array([[_png(7, 3)]], dtype=object)},
                                     TASKS)
    assert samples[0].image.size == (7, 3) and samples[0].image.mode == "RGB"


@pytest.mark.parametrize("inputs, message", [
    ({"image": np.zeros((1, 2, 2, 3), np.uint8)}, "missing input 'task' (BYTES [1]: the task name; available: dtd, eurosat)"),
    ({"task": _task("dtdd"), "image": np.zeros((1, 2, 2, 3), np.uint8)}, "task 'dtdd' not served (available: dtd, eurosat)"),
    ({"task": _task("dtd")}, "neither of 'image' and 'image_bytes' given"),
    ({"task": _task("dtd"), "image": np.zeros((1, 2, 2, 3), np.float32)}, "input 'image' has datatype FP32, expected UINT8"),
    ({"task": _task("dtd"), "image": np.zeros((2, 2, 3), np.uint8)}, "input 'image' has shape [2, 2, 3], expected [H, W, 3]"),
    ({"task": _task("dtd"), "image": np.zeros((1, 0, 2, 3), np.uint8)}, "input 'image' is empty (0x2 pixels)"),
    ({"task": _task("dtd"), "image": np.zeros((2, 2, 2, 3), np.uint8)}, "input 'image' has 2 samples but 'task' has 1"),
    ({"task": _task("dtd"), "image": np.zeros((1, 2, 2, 3), np.uint8), "mask": np.zeros(1)}, "unexpected input 'mask'"),
    ({"task": np.array([[1]], np.int64), "image": np.zeros((1, 2, 2, 3), np.uint8)}, "input 'task' has datatype INT64, expected BYTES"),
    ({"task": _task("dtd"), "image_bytes": np.array([[b""]], dtype=object)}, "input 'image_bytes' is empty"),
    ({"task": _task("dtd"), "image_bytes": np.array([[b"not an image"]], dtype=object)}, "is not a JPEG, PNG, WEBP, BMP file"),
])
def test_bad_requests_raise_an_rmt_error_naming_the_problem(inputs, message):
    with pytest.raises(RmtError) as caught:
        protocol.decode_inputs(inputs, TASKS)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_task_is_an_unknown_task_error():
    with pytest.raises(UnknownTaskError):
        protocol.decode_inputs({"task": _task("x"), "image": np.zeros((1, 2, 2, 3), np.uint8)}, TASKS)


def test_oversized_images_are_refused_before_decoding():
    limits = ImageLimits(max_pixels=100)
    with pytest.raises(RequestError, match="11x10 pixels, more than the server's limit of 100"):
        protocol.decode_inputs({"task": _task("dtd"), "image": np.zeros((1, 11, 10, 3), np.uint8)}, TASKS, limits)
    with pytest.raises(RequestError, match="10x11 pixels"):
        protocol.decode_image(_png(11, 10), limits)
    with pytest.raises(RequestError, match="bytes, more than the server's limit of 10"):
        protocol.decode_image(_png(2, 2), ImageLimits(max_encoded_bytes=10))


def test_a_request_holds_a_bounded_number_of_decoded_pixels():
    """64 images of 4096 x 4096 would hold 4.3 GB decoded at once; a request is bounded as a whole."""
    limits = ImageLimits(max_pixels=100, max_request_pixels=250)
    files = np.array([[_png(10, 10)]] * 3, dtype=object)
    tasks = np.array([[b"dtd"]] * 3, dtype=object)
    assert len(protocol.decode_inputs({"task": tasks[:2], "image_bytes": files[:2]}, TASKS, limits)) == 2
    with pytest.raises(RequestError, match="more than the server's limit of 250 pixels per request"):
        protocol.decode_inputs({"task": tasks, "image_bytes": files}, TASKS, limits)


def test_truncated_png_is_a_request_error():
    with pytest.raises(RequestError, match="cannot be decoded"):
        protocol.decode_image(_png(64, 64)[:60])


def test_group_by_task_keeps_first_appearance_and_positions_in_order():
    samples = [Sample(t, np.zeros((1, 1, 3), np.uint8)) for t in ["b", "a", "b", "c", "a"]]
    assert protocol.group_by_task(samples) == {"b": [0, 2], "a": [1, 4], "c": [3]}


class _Prediction:
    def __init__(self, probs, class_names):
        self.probs = np.asarray(probs, np.float32)
        self.indices = self.probs.argmax(axis=1)
        self.class_names = class_names


def test_outputs_are_top_k_padded_for_tasks_with_fewer_classes():
    prediction = _Prediction([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], ("a", "b", "c"))
    out = protocol.encode_outputs(prediction, 5, np.ones((2, 4), np.float32))
    assert out["labels"].tolist() == [[b"b", b"c", b"a", b"", b""], [b"a", b"c", b"b", b"", b""]]
    np.testing.assert_array_equal(out["probs"], np.array([[0.5, 0.3, 0.2, 0, 0], [0.6, 0.3, 0.1, 0, 0]], np.float32))
    assert out["index"].tolist() == [[1], [0]] and out["index"].dtype == np.int64
    assert out["embedding"].shape == (2, 4) and out["probs"].dtype == np.float32


def test_json_tensors_round_trip():
    body = {"inputs": [{"name": "task", "datatype": "BYTES", "shape": [1, 1], "data": ["dtd"]},
                       {"name": "image", "datatype": "UINT8", "shape": [1, 2, 1, 3], "data": [[1, 2, 3], [4, 5, 6]]}]}
    inputs = protocol.inputs_from_json(body)
    assert inputs["task"].tolist() == [[b"dtd"]]
    assert inputs["image"].dtype == np.uint8 and inputs["image"].reshape(-1).tolist() == [1, 2, 3, 4, 5, 6]
    samples = protocol.decode_inputs(inputs, TASKS)
    out = protocol.encode_outputs(_Prediction([[0.25, 0.75]], ("x", "y")), 2)
    response = protocol.response_to_json("rmt", out, request_id="7", requested=["labels", "probs"])
    assert response == {"model_name": "rmt", "id": "7", "outputs": [
        {"name": "labels", "datatype": "BYTES", "shape": [1, 2], "data": ["y", "x"]},
        {"name": "probs", "datatype": "FP32", "shape": [1, 2], "data": [0.75, 0.25]}]}
    assert samples[0].task == "dtd"


@pytest.mark.parametrize("spec, message", [
    ({"name": "image", "datatype": "UINT8", "shape": [1, 2], "data": [1]}, "data has 1 elements, its shape says 2"),
    ({"name": "image", "datatype": "UINT8", "shape": [1], "data": [256]}, "UINT8 values must lie in [0, 255]"),
    ({"name": "image", "datatype": "UINT8", "shape": [1], "data": [1.5]}, "UINT8 data must be integers"),
    ({"name": "image", "datatype": "UINT9", "shape": [1], "data": [1]}, "datatype 'UINT9' is not one of"),
    ({"name": "image", "datatype": "UINT8", "shape": [-1], "data": [1]}, "is not a list of at most 8 non-negative"),
    ({"name": "image", "datatype": "UINT8", "shape": [1 << 20, 1 << 20], "data": []}, "more than the server's limit"),
    ({"name": "task", "datatype": "BYTES", "shape": [1], "data": [3]}, "BYTES data must be strings"),
    ({"name": "", "datatype": "BYTES", "shape": [1], "data": ["a"]}, "is not a non-empty string"),
])
def test_bad_json_tensors_are_refused_before_allocating(spec, message):
    with pytest.raises(RequestError) as caught:
        protocol.tensor_from_json(spec)
    assert message in str(caught.value)


def test_json_request_without_inputs_is_refused():
    with pytest.raises(RequestError, match="'inputs' list"):
        protocol.inputs_from_json({"input": []})


def test_served_tasks_say_when_a_task_was_added_or_removed_after_the_server_loaded_the_bundle(
        bundle_dir, copy_bundle, make_taskpack, tmp_path):
    """What both servers (Triton's model, the Ray ingress and replicas) answer: the bundle on disk is
    consulted for an unknown task or a served task that failed, never for a good request."""
    from rmt_deploy.errors import ArtifactError
    from rmt_deploy.tools.bundle_edit import add_tasks, remove_tasks

    root = copy_bundle(bundle_dir, tmp_path)
    served = protocol.ServedTasks(["alpha", "beta"], root)
    image = np.zeros((1, 8, 8, 3), np.uint8)

    def decode(task: str) -> list[Sample]:
        return protocol.decode_inputs({"task": _task(task), "image": image}, served)

    with pytest.raises(UnknownTaskError, match=r"^task 'late' not served \(available: alpha, beta\)$"):
        decode("late")
    add_tasks(root, [make_taskpack("late", seed=5).save(tmp_path / "late.rmtask")])
    with pytest.raises(UnknownTaskError, match=rf"^task 'late' not served: it was added to bundle {re.escape(str(root))} after the "
                                               r"server loaded it; restart the server to serve it \(served: alpha, "
                                               r"beta\)$"):
        decode("late")
    remove_tasks(root, ["beta"])
    removed = served.explain("beta", UnknownTaskError("the engine's message"))
    assert isinstance(removed, UnknownTaskError) and str(removed) == (
        f"task 'beta' was removed from bundle {root} after the server loaded it; restart the server to serve the "
        "bundle as it is now (tasks now: alpha, late)")
    other = ArtifactError("a task file changed")
    assert served.explain("alpha", other) is other  # still listed: the engine's error stands
    (root / "manifest.json").unlink()  # a good request never reads the bundle
    assert [s.task for s in decode("alpha")] == ["alpha"]
    with pytest.raises(UnknownTaskError, match=r"^task 'late' not served \(available: alpha, beta\)$"):
        decode("late")
