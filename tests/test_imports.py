"""The edge footprint: runtime-path modules import with torch, torchvision and open_clip absent."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

RUNTIME_PATH_MODULES = [
    "rmt_deploy",
    "rmt_deploy.errors",
    "rmt_deploy.artifacts.masks",
    "rmt_deploy.artifacts.fingerprint",
    "rmt_deploy.artifacts.task_file",
    "rmt_deploy.artifacts.bundle",
    "rmt_deploy.tools.task_summary",
    "rmt_deploy.cli",
    "rmt_deploy.runtime.preprocess",
    "rmt_deploy.runtime.engine",
    "rmt_deploy.cli.predict",
    "rmt_deploy.runtime.backends.onnxruntime",
    "rmt_deploy.runtime.backends.tensorrt",
    "rmt_deploy.cli.bench",
    "rmt_deploy.bench.memory",
    "rmt_deploy.artifacts.tensorrt_files",
    "rmt_deploy.serving",
    "rmt_deploy.serving.protocol",
    "rmt_deploy.serving.metrics",
    "rmt_deploy.serving.triton_model",
    "rmt_deploy.serving.triton_repo",
    "rmt_deploy.serving.tritonserver",
    "rmt_deploy.cli.serve",
    "rmt_deploy.serving.kserve_http",
    "rmt_deploy.serving.ray_config",
    "rmt_deploy.serving.ray_ingress",
    "rmt_deploy.serving.ray_replica",
    "rmt_deploy.serving.ray",
    # need torch to run, but listing or importing them must stay cheap
    "rmt_deploy.cli.export",
    "rmt_deploy.export.tensorrt",
    "rmt_deploy.cli.train",
    "rmt_deploy.cli.demo",
]
HEAVY = ["torch", "torchvision", "open_clip"]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("module", RUNTIME_PATH_MODULES)
def test_runtime_module_imports_without_torch(module):
    result = _run(f"""
        import sys
        for name in {HEAVY!r}:
            sys.modules[name] = None  # makes `import name` raise ImportError
        import importlib
        importlib.import_module({module!r})
    """)
    assert result.returncode == 0, result.stderr


def test_importing_the_package_stays_cheap():
    result = _run(f"""
        import sys
        import rmt_deploy, rmt_deploy.cli
        heavy = [m for m in {HEAVY + ["onnx", "onnxruntime", "safetensors"]!r} if m in sys.modules]
        print(",".join(heavy))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_missing_optional_package_names_the_extra():
    result = _run("""
        import sys
        sys.modules["open_clip"] = None
        from rmt_deploy.errors import MissingDependencyError
        from rmt_deploy.basemodel.loading import load_base
        try:
            load_base("rmt-tiny-vit")
        except MissingDependencyError as exc:
            print(exc)
    """)
    assert "pip install 'rmt-deploy[train]'" in result.stdout, result.stderr


def test_the_triton_model_serves_without_torch():
    """What the Python-backend stub imports to serve: rmt_deploy's serving and runtime path, no torch."""
    result = _run(f"""
        import sys
        for name in {HEAVY!r}:
            sys.modules[name] = None
        import rmt_deploy.serving.triton_model, rmt_deploy.serving.metrics
        import rmt_deploy.runtime.engine, rmt_deploy.runtime.backends.onnxruntime
        print(",".join(m for m in ("onnx", "tritonclient", "pytriton") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
