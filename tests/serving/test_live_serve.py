"""`rmt-deploy serve` while its bundle changes: answers stay as loaded (or one request fails naming
the file), and a model worker that dies stops the server with status 1 instead of a server that
says ready while failing every request."""
from __future__ import annotations

import os
import shutil
import signal
import urllib.request
from pathlib import Path

import pytest

tritonclient_utils = pytest.importorskip("tritonclient.utils")
InferenceServerException = tritonclient_utils.InferenceServerException
STUB = "triton_python_backend_stub"
CHANGES = ["truncate", "same-size rewrite", "delete", "replace with another bundle's"]
# base weights first: the next requests then need new buffers (where a mapped base faulted with SIGBUS)
SHARED_FILES = ["base_weights.safetensors", "base.onnx", "manifest.json", "folded/beta.onnx"]


def _change(path: Path, how: str, other: Path, relative: str) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "live_files", Path(__file__).parent.parent / "runtime" / "test_live_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.change(path, how, other, relative)


def _stubs_under(pid: int) -> list[int]:
    """Python-backend stub processes descending from `pid`."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        parents[int(entry)] = (int(stat[stat.rindex(")") + 2:].split()[1]), STUB.encode() in command)
    found = []
    for child, (parent, is_stub) in parents.items():
        while is_stub and parent > 1:
            if parent == pid:
                found.append(child)
                break
            parent = parents.get(parent, (0, False))[0]
    return found


def _ready(served) -> bool:
    try:
        with urllib.request.urlopen(f"http://{served.http_url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_a_dead_model_worker_stops_the_server_with_status_1(serve_bundle, launch):
    served = launch(serve_bundle)
    stubs = _stubs_under(served.process.pid)
    assert len(stubs) == 1
    os.kill(stubs[0], signal.SIGKILL)
    assert served.process.wait(60) == 1
    last = served.log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: a model worker of tritonserver died (pid {stubs[0]}, 1 of 1); the server was "
                           "stopped so that its supervisor restarts it")
    assert not _ready(served) and _stubs_under(served.process.pid) == []


def _ask(clients, client, engine, task, image, live: Path, changed: str | None = None) -> str:
    """'same' when the served answer equals the engine's as loaded; 'error' when the request failed
    naming the changed file (any other failure or answer fails the test)."""
    module = clients.client_module("http")
    try:
        got = clients.infer("http", client, clients.request(module, task, image))
    except InferenceServerException as exc:
        assert changed is not None and str(live / changed) in exc.message(), (task, changed, exc.message())
        return "error"
    problem = clients.mismatch(got, clients.expected(engine, task, image, clients.TOP_K))
    assert problem is None, (task, changed, problem)
    return "same"


def test_served_answers_survive_every_bundle_file_changing(serve_bundle, other_bundle, engine, launch, clients,
                                                          images, tmp_path):
    live = tmp_path / "bundle"
    shutil.copytree(serve_bundle, live)
    served = launch(live, "--cache-tasks", "3")  # 3 buffers, 4 tasks: new buffers, then rewrites
    client = clients.make_client("http", served)
    try:
        # task files: each change on a task not read yet (alpha was read at load: it answers as loaded)
        for task, how in zip(["beta", "gamma", "delta", "alpha"], CHANGES):
            relative = f"tasks/{task}.rmtask"
            _change(live / relative, how, other_bundle, relative)
            outcome = _ask(clients, client, engine, task, images[0], live, relative)
            assert outcome == ("same" if task == "alpha" else "error"), (task, how)
            assert _ask(clients, client, engine, "alpha", images[1], live) == "same"
        for task in clients.TASKS:
            shutil.copyfile(serve_bundle / f"tasks/{task}.rmtask", live / f"tasks/{task}.rmtask")
        # every shared file x every change: all four tasks answer as loaded
        for relative in SHARED_FILES:
            for how in CHANGES:
                _change(live / relative, how, other_bundle, relative)
                for task in clients.TASKS:
                    assert _ask(clients, client, engine, task, images[2], live) == "same", (relative, how, task)
                shutil.copyfile(serve_bundle / relative, live / relative)
    finally:
        client.close()
    assert served.process.poll() is None and _ready(served)
    assert len(_stubs_under(served.process.pid)) == 1
