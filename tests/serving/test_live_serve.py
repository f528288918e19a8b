"""`rmt-deploy serve` while its bundle changes: answers stay as loaded (or one request fails naming
the file), a task added or removed by `bundle add/remove` under the server says so and to restart
it, and a model worker that dies stops the server with status 1 instead of a server that says
ready while failing every request."""
from __future__ import annotations

import os
import re
import shutil
import signal
import urllib.request
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture(scope="module")
def live_served(serve_bundle, make_taskpack, serve_process, tmp_path_factory):
    """One `rmt-deploy serve` (--cache-tasks 3: 3 buffers for 5 tasks) on a live copy of the four-task
    bundle plus a task 'spare' that only the add/remove test asks for; `pristine` is the copy as served,
    from which each test puts back what it changed."""
    from rmt_deploy.tools.bundle_edit import add_tasks

    folder = tmp_path_factory.mktemp("live_serve")
    live = Path(shutil.copytree(serve_bundle, folder / "bundle"))
    add_tasks(live, [make_taskpack("spare", seed=31, zeros=0.1).save(folder / "spare.rmtask")])
    pristine = Path(shutil.copytree(live, folder / "pristine"))
    served = serve_process.start(live, folder / "serve.log", "--cache-tasks", "3")
    try:
        yield SimpleNamespace(root=live, pristine=pristine, served=served)
    finally:
        serve_process.stop(served)


def test_a_model_worker_dead_before_serve_first_looks_stops_the_server_too(serve_bundle, serve_process, tmp_path):
    """The worker killed the moment ready first answers (polled every 10 ms; serve polls every 0.2 s, then
    notes its workers): most of the time before serve has noted it. It used to be missed (a zombie has
    no command line), and the server said ready while every request failed."""
    served = serve_process.start(serve_bundle, tmp_path / "serve.log", interval=0.01)
    try:
        stubs = _stubs_under(served.process.pid)
        assert len(stubs) == 1
        os.kill(stubs[0], signal.SIGKILL)
        assert served.process.wait(30) == 1
    finally:
        serve_process.stop(served)
    last = served.log.read_text().strip().splitlines()[-1]
    assert re.match(r"error: a model worker of tritonserver died \((pid \d+, )?1 of 1\); the server was stopped so "
                    r"that its supervisor restarts it", last), last


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


def test_served_answers_survive_every_bundle_file_changing(live_served, other_bundle, engine, clients, images):
    live, pristine, served = live_served.root, live_served.pristine, live_served.served
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
            shutil.copyfile(pristine / f"tasks/{task}.rmtask", live / f"tasks/{task}.rmtask")
        # every shared file x every change: all four tasks answer as loaded
        for relative in SHARED_FILES:
            for how in CHANGES:
                _change(live / relative, how, other_bundle, relative)
                for task in clients.TASKS:
                    assert _ask(clients, client, engine, task, images[2], live) == "same", (relative, how, task)
                shutil.copyfile(pristine / relative, live / relative)
    finally:
        client.close()
    assert served.process.poll() is None and _ready(served)
    assert len(_stubs_under(served.process.pid)) == 1


def test_a_task_added_or_removed_under_serve_says_so_and_to_restart_the_server(live_served, engine, clients, images,
                                                                             make_taskpack, tmp_path):
    """`bundle add` beside the server: a request for the new task says it was added after the server loaded
    the bundle, not just "not served"; `bundle remove` of a served task not read yet: says it was removed.
    The manifest on disk is read on these failure paths only; the other tasks answer as loaded. Runs
    before or after the live-file test on the same server: it reads no task of theirs and puts the
    bundle back as served."""
    from rmt_deploy.cli import main

    live, served = live_served.root, live_served.served
    root = re.escape(str(live))
    listed = ", ".join(sorted([*clients.TASKS, "spare"]))
    module = clients.client_module("http")
    client = clients.make_client("http", served)

    def refused(task: str) -> str:
        with pytest.raises(InferenceServerException) as caught:
            clients.infer("http", client, clients.request(module, task, images[0]))
        return caught.value.message()

    try:
        assert re.search(rf"task 'late' not served \(available: {listed}\)$", refused("late"))
        main(["bundle", "add", str(live), str(make_taskpack("late", seed=32).save(tmp_path / "late.rmtask"))])
        message = refused("late")
        assert re.search(rf"task 'late' not served: it was added to bundle {root} after the server loaded it; "
                         rf"restart the server to serve it \(served: {listed}\)$", message), message
        assert re.search(rf"task 'nope' not served \(available: {listed}\)$", refused("nope"))
        main(["bundle", "remove", str(live), "spare"])
        message = refused("spare")
        now = ", ".join([*clients.TASKS, "late"])
        assert re.search(rf"task 'spare' was removed from bundle {root} after the server loaded it; restart the "
                         rf"server to serve the bundle as it is now \(tasks now: {now}\)$", message), message
        # alpha only: it was read at load; the live-file test needs the other tasks unread
        assert _ask(clients, client, engine, "alpha", images[1], live) == "same"
    finally:
        client.close()
        (live / "tasks" / "late.rmtask").unlink(missing_ok=True)
        for relative in ("manifest.json", "tasks/spare.rmtask"):
            shutil.copyfile(live_served.pristine / relative, live / relative)
    assert served.process.poll() is None and _ready(served)
