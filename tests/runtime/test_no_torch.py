"""The runtime path (preprocess, engine, CLI, ONNX Runtime and TensorRT backends) never imports torch."""
from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HEAVY = ["torch", "torchvision", "open_clip"]
MODULES = ["rmt_deploy.runtime.preprocess", "rmt_deploy.runtime.engine", "rmt_deploy.cli.predict",
           "rmt_deploy.runtime.buffer_pool", "rmt_deploy.runtime.task_reader", "rmt_deploy.runtime.baseweights",
           "rmt_deploy.runtime.backends", "rmt_deploy.runtime.backends.onnxruntime",
           "rmt_deploy.runtime.backends.tensorrt", "rmt_deploy.artifacts.tensorrt_files", "rmt_deploy.artifacts.bundle",
           "rmt_deploy.artifacts.manifest", "rmt_deploy.artifacts.integrity", "rmt_deploy.artifacts.safetensors_header", "rmt_deploy.artifacts.task_file",
           "rmt_deploy.artifacts.masks", "rmt_deploy.tools.task_summary", "rmt_deploy.runtime.task_tiers", "rmt_deploy.tools.bundle_edit",
           "rmt_deploy.cli.bundle", "rmt_deploy.tools.bundle_summary", "rmt_deploy.artifacts.heads"]


def _run(code: str, block_heavy: bool = True) -> subprocess.CompletedProcess:
    prelude = "import sys\n"
    if block_heavy:  # make `import torch` (etc.) raise ImportError
        prelude += "for _n in %r:\n    sys.modules[_n] = None\n" % (HEAVY,)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_engine_loads_and_predicts_with_torch_unimportable(onnx_bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(image)
    result = _run(f"""
        import importlib, json
        for module in {MODULES!r}:
            importlib.import_module(module)
        from rmt_deploy import Engine
        with Engine.load({str(onnx_bundle.root)!r}, task="beta") as engine:
            first = engine.predict([{str(image)!r}])
            engine.switch("alpha")
            second = engine.predict([{str(image)!r}], task="beta")
            print(json.dumps([engine.backend, first.labels, bool((first.logits == second.logits).all())]))
        from rmt_deploy.cli import main
        try:
            main(["predict", "--bundle", {str(onnx_bundle.root)!r}, "--task", "gamma", "--json",
                  "--top-k", "2", {str(image)!r}])
        except SystemExit as exc:
            assert not exc.code, exc.code
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    backend, labels, same = json.loads(lines[0])
    assert backend == "onnxruntime-cpu" and len(labels) == 1 and same
    cli = json.loads("\n".join(lines[1:]))
    assert cli["task"] == "gamma" and len(cli["results"][0]["top_k"]) == 2


def test_torch_backend_without_torch_names_the_extra(onnx_bundle):
    result = _run(f"""
        from rmt_deploy import Engine
        from rmt_deploy.errors import MissingDependencyError
        try:
            Engine.load({str(onnx_bundle.root)!r}, backend="torch")
        except MissingDependencyError as exc:
            print(exc)
    """)
    assert "rmt-deploy[train]" in result.stdout, result.stderr


def test_serving_with_torch_installed_never_loads_it(onnx_bundle):
    """Nothing blocked this time: torch is importable, and serving must still not import it."""
    pytest.importorskip("onnxruntime")
    result = _run(f"""
        import importlib
        import numpy as np
        for module in {MODULES!r}:
            importlib.import_module(module)
        from rmt_deploy import Engine
        with Engine.load({str(onnx_bundle.root)!r}, task="beta") as engine:
            engine.predict(np.zeros((40, 30, 3), np.uint8))
            engine.switch("alpha")
        print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r} or m.startswith("rmt_deploy.export")))
    """, block_heavy=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_runtime_modules_never_import_export():
    """The runtime reads bundles; export writes them. Shared code lives in neutral modules."""
    import rmt_deploy.runtime

    pattern = re.compile(r"^\s*(from|import)\s+rmt_deploy\.export\b", re.MULTILINE)
    sources = [*Path(rmt_deploy.runtime.__file__).parent.rglob("*.py")]
    sources += [Path(importlib.import_module(m).__file__) for m in ("rmt_deploy.runtime.preprocess", "rmt_deploy.artifacts.bundle",
                                                                        "rmt_deploy.artifacts.manifest", "rmt_deploy.artifacts.integrity",
                                                                        "rmt_deploy.artifacts.safetensors_header")]
    offenders = [str(p) for p in sources if pattern.search(p.read_text())]
    assert not offenders
