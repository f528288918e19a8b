"""Shared fixtures: a tiny open_clip base saved as a local checkpoint, task packs on it, bundles holding them
(exported once per configuration per session by make_bundle), and the torch reference; and the tower
families (tests/families.py: `family(model)` trains and exports each family once per session)."""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker for torch and BLAS (see XDIST_GROUPS below)
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY_MODEL = "rmt-tiny-vit"


def _load_families():
    """tests/families.py as the module `rmt_test_families`, once (test modules import it by that name)."""
    name = "rmt_test_families"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("families.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


FAMILY_HELPERS = _load_families()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A seeded random rmt-tiny-vit saved as .safetensors, loaded as a user's checkpoint would be."""
    torch = pytest.importorskip("torch")
    from rmt_deploy.basemodel.loading import load_base, save_checkpoint

    torch.manual_seed(0)
    base = load_base(TINY_MODEL, None)
    return save_checkpoint(base.model, tmp_path_factory.mktemp("base") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_base(tiny_checkpoint):
    """The tiny base loaded back from its checkpoint file (do not modify in place)."""
    from rmt_deploy.basemodel.loading import load_base

    return load_base(TINY_MODEL, str(tiny_checkpoint))


@pytest.fixture(scope="session")
def make_taskpack(tiny_base):
    """Factory: a TaskPack on the tiny base with random masks (p zeros) and a random head."""
    from rmt_deploy.artifacts.task_file import TaskPack
    from rmt_deploy.basemodel.loading import fingerprint, maskable_tensors

    tensors = maskable_tensors(tiny_base.model)
    base_fp = fingerprint(TINY_MODEL, tensors)
    embed_dim = tiny_base.model.visual.output_dim

    def make(name: str, seed: int = 0, zeros: float = 0.05, classes: int = 3) -> TaskPack:
        rng = np.random.default_rng(seed)
        masks = {n: rng.random(tuple(t.shape)) >= zeros for n, t in tensors.items()}
        head = rng.standard_normal((classes, embed_dim)).astype(np.float32)
        head /= np.linalg.norm(head, axis=1, keepdims=True)
        return TaskPack(
            name=name,
            class_names=[f"class {i}" for i in range(classes)],
            head=head,
            masks=masks,
            base_fingerprint=base_fp,
            model_name=TINY_MODEL,
            logit_scale=100.0,
            template="a photo of a {}.",
        )

    return make


# Task sets as make_taskpack specs (name, seed, zeros, classes): the same spec gives the same pack.
TASK_SPECS = SimpleNamespace(
    three=(("alpha", 1, 0.1, 3), ("beta", 2, 0.1, 4), ("gamma", 3, 0.1, 5)),   # packs, onnx_bundle
    two=(("alpha", 1, 0.05, 3), ("beta", 2, 0.20, 4)),                          # task_files, bundle_dir
)


@pytest.fixture(scope="session")
def task_specs() -> SimpleNamespace:
    """The shared task sets as (name, seed, zeros, classes) specs: three (packs), two (task_files)."""
    return TASK_SPECS


@pytest.fixture(scope="session")
def packs(make_taskpack):
    """Three tasks on the tiny base, 10% zeros, different class counts."""
    return {spec[0]: make_taskpack(*spec) for spec in TASK_SPECS.three}


@pytest.fixture(scope="session")
def task_files(make_taskpack, tmp_path_factory) -> list[Path]:
    """alpha and beta: 5% and 20% zeros, 3 and 4 classes, saved as .rmtask files."""
    folder = tmp_path_factory.mktemp("tasks")
    return [make_taskpack(*spec).save(folder / f"{spec[0]}.rmtask") for spec in TASK_SPECS.two]


@pytest.fixture(scope="session")
def images():
    """A float32 NCHW batch of 5 preprocessed random images for the tiny base (32x32)."""
    return np.random.default_rng(7).standard_normal((5, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="session")
def reference(tiny_base):
    """reference(pack, batch) -> logits from the torch model with the pack's masks applied."""
    torch = pytest.importorskip("torch")

    def logits(pack, batch):
        model = copy.deepcopy(tiny_base.model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, keep in pack.masks.items():
                params[name].mul_(torch.from_numpy(keep))
            emb = model.encode_image(torch.from_numpy(batch), normalize=True).numpy()
        return pack.logit_scale * emb @ pack.head.T

    return logits


@pytest.fixture(scope="session")
def torch_bundle(tmp_path_factory, tiny_base, tiny_checkpoint, packs):
    """A bundle with a manifest and tasks but no ONNX: enough for the torch backend."""
    from rmt_deploy.artifacts.bundle import Bundle, Manifest, MaskedTensor, Preprocess, record_files
    from rmt_deploy.basemodel.loading import fingerprint, maskable_tensors, preprocess_config

    root = tmp_path_factory.mktemp("torch_bundle")
    (root / "tasks").mkdir()
    tensors = maskable_tensors(tiny_base.model)
    manifest = Manifest(
        model_name=TINY_MODEL, pretrained=str(tiny_checkpoint),
        fingerprint=fingerprint(TINY_MODEL, tensors),
        preprocess=Preprocess(**preprocess_config(tiny_base.model)),
        masked_tensors=[MaskedTensor(n, list(t.shape), "float32", n.replace(".", "_")) for n, t in tensors.items()],
        embed_dim=tiny_base.model.visual.output_dim, tasks=list(packs), files={}, max_batch=4,
    )
    for name, pack in packs.items():
        pack.save(root / "tasks" / f"{name}.rmtask")
    manifest.checksums = record_files(root)
    (root / "manifest.json").write_text(manifest.to_json())
    return Bundle.open(root)


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory, tiny_checkpoint, make_taskpack):
    """make_bundle(tasks, mode=..., masked_inputs=..., fp16=..., max_batch=..., target=...) -> the path of a
    verified bundle on the tiny base, exported once per session for each distinct set of arguments.

    tasks: (name, seed, zeros, classes) specs built with make_taskpack, or .rmtask files. The bundle is
    shared: read it, never change it (copy_bundle gives a copy to change). make_bundle.report(path) is the
    ExportReport of the export that wrote it.
    """
    pytest.importorskip("onnxruntime")
    bundles: dict[tuple, Path] = {}
    reports: dict[Path, object] = {}

    def make(tasks, mode: str = "shared", masked_inputs: str = "required", fp16: bool = False,
             max_batch: int = 32, target: str = "onnx") -> Path:
        tasks = [t if isinstance(t, tuple) else Path(t).resolve() for t in tasks]
        key = (tuple(tasks), mode, masked_inputs, fp16, max_batch, target)
        if key not in bundles:
            from rmt_deploy.export import ExportConfig, export_bundle

            folder = tmp_path_factory.mktemp("bundle")
            (folder / "packs").mkdir()
            paths = [t if isinstance(t, Path) else make_taskpack(*t).save(folder / "packs" / f"{t[0]}.rmtask")
                     for t in tasks]
            out = folder / "bundle"
            config = ExportConfig(TINY_MODEL, str(tiny_checkpoint), paths, out, target=target, mode=mode,
                                  fp16=fp16, max_batch=max_batch, masked_inputs=masked_inputs)
            reports[out] = export_bundle(config, progress=False)
            bundles[key] = out
        return bundles[key]

    make.report = lambda path: reports[Path(path)]
    return make


@pytest.fixture(scope="session")
def copy_bundle():
    """copy_bundle(path, folder) -> folder/"bundle", a copy of the bundle at path that a test may change."""
    def copy_to(path: Path, folder: Path) -> Path:
        return Path(shutil.copytree(path, Path(folder) / "bundle"))

    return copy_to


@pytest.fixture(scope="session")
def onnx_bundle(make_bundle):
    """A bundle exported by rmt_deploy.export (shared + folded ONNX) holding the three tasks."""
    from rmt_deploy.artifacts.bundle import Bundle

    return Bundle.open(make_bundle(TASK_SPECS.three, mode="both", max_batch=4))


@pytest.fixture(scope="session")
def bundle_dir(make_bundle) -> Path:
    """A verified fp32 bundle with base.onnx and folded models for alpha and beta (task_files' packs)."""
    return make_bundle(TASK_SPECS.two, mode="both")


@pytest.fixture(scope="session")
def other_bundle(tmp_path_factory) -> Path:
    """Another bundle (shared + folded) on a different random tiny base, with tasks of the same names as
    the test bundles (alpha, beta, gamma, delta): its files replace theirs in the live-file tests."""
    torch = pytest.importorskip("torch")
    export = pytest.importorskip("rmt_deploy.export")
    from rmt_deploy.artifacts.task_file import TaskPack
    from rmt_deploy.basemodel.loading import fingerprint, load_base, maskable_tensors, save_checkpoint

    folder = tmp_path_factory.mktemp("other_base")
    torch.manual_seed(1)
    base = load_base(TINY_MODEL, None)
    checkpoint = save_checkpoint(base.model, folder / "other.safetensors")
    tensors = maskable_tensors(base.model)
    paths = []
    for seed, name in enumerate(("alpha", "beta", "gamma", "delta")):
        rng = np.random.default_rng(100 + seed)
        head = rng.standard_normal((3, base.model.visual.output_dim)).astype(np.float32)
        pack = TaskPack(name=name, class_names=["x", "y", "z"], head=head / np.linalg.norm(head, axis=1, keepdims=True),
                        masks={n: rng.random(tuple(t.shape)) >= 0.2 for n, t in tensors.items()},
                        base_fingerprint=fingerprint(TINY_MODEL, tensors), model_name=TINY_MODEL, logit_scale=100.0,
                        template="a photo of a {}.")
        paths.append(pack.save(folder / f"{name}.rmtask"))
    out = folder / "bundle"
    export.export_bundle(export.ExportConfig(TINY_MODEL, str(checkpoint), task_paths=paths, out=out, target="onnx",
                                             mode="both", max_batch=4), progress=False)
    return out


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory) -> Path:
    """An image-folder dataset: 3 classes x 8 images (the loader splits it into train/val/test)."""
    return FAMILY_HELPERS.write_dataset(tmp_path_factory.mktemp("families_data") / "patterns")


@pytest.fixture(scope="session")
def family(folder_root, tmp_path_factory):
    """family(model) -> the tests/families.py Family of a tiny tower (FAMILIES: timm ViT, MobileCLIP2,
    ConvNeXt, ModifiedResNet): its checkpoint, tasks a and b trained through the CLI, a shared + folded
    bundle of them (read it, never change it: copy_bundle gives a copy), built at first use per session."""
    pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    built: dict = {}

    def get(model: str):
        if model not in built:
            built[model] = FAMILY_HELPERS.Family(model, folder_root, tmp_path_factory.mktemp(model))
        return built[model]
    return get


# `make test` runs the suite on every core (pytest-xdist, --dist loadgroup) and each module in one worker, so
# module fixtures (a server, a trained demo) are made once. Some modules share a group: every Ray module
# uses the machine's one local Ray cluster at a time, and the family tests share the session's trained tiny
# towers (built once, not once per worker). A worker runs torch and BLAS on one thread: two processes each
# spinning two OpenMP threads on two cores slowed training fixtures 15x.
XDIST_GROUPS = {"test_ray_": "ray", "test_edge_families": "families", "test_family_": "families"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        group = next((g for prefix, g in XDIST_GROUPS.items() if item.path.name.startswith(prefix)), None)
        item.add_marker(pytest.mark.xdist_group(group or str(item.path)))
