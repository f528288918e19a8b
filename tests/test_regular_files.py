"""Every file rmt-deploy reads is a regular file of bounded size, checked before reading: a FIFO, a
device, /dev/zero or a directory is one line naming the path and what it is (never a hang, never a
read until memory runs out). Commands that could hang on old code run in a subprocess with a timeout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmt_deploy.artifacts.task_file import TaskPack
from rmt_deploy.errors import ArtifactError, InputError

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
TIMEOUT = 60  # seconds: the fixed code answers in about one; the old one hung or read until killed


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rmt_deploy.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd)


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.strip()
    assert result.returncode == 1, (result.returncode, err[-2000:])
    assert "\n" not in err and "Traceback" not in err, err[-2000:]
    return err


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.rmtask"
    os.mkfifo(path)
    return path


@pytest.fixture
def bundle_copy(onnx_bundle, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(onnx_bundle.root, root)
    return root


# ---------------------------------------------------------------- the helper

@pytest.mark.parametrize("target, kind", [("dir", "a directory"), ("/dev/zero", "a character device")])
def test_the_helper_names_what_a_path_is(tmp_path, target, kind):
    from rmt_deploy.artifacts.integrity import check_regular_file, read_regular_file

    path = tmp_path if target == "dir" else Path(target)
    if not path.exists():
        pytest.skip(f"{target} does not exist here")
    with pytest.raises(InputError, match=f"{path}: is {kind}, not a regular file; pass a task file"):
        check_regular_file(path, 100, "task", InputError)
    with pytest.raises(ArtifactError, match=f"is {kind}"):
        read_regular_file(path, 100, None)


def test_the_helper_bounds_the_size(tmp_path):
    from rmt_deploy.artifacts.integrity import check_regular_file, read_regular_file

    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 101)
    with pytest.raises(ArtifactError, match="101 bytes is more than the 100 a task file may hold"):
        read_regular_file(path, 100, "task")
    assert read_regular_file(path, 101, "task") == b"x" * 101
    with pytest.raises(ArtifactError, match="no such file"):
        check_regular_file(tmp_path / "missing", 1, None)


@needs_fifo
def test_the_helper_does_not_open_a_fifo_for_reading(fifo):
    from rmt_deploy.artifacts.integrity import read_regular_file

    with pytest.raises(ArtifactError, match="is a FIFO"):
        read_regular_file(fifo, 100, "task")  # would block forever in open() if it tried


# ---------------------------------------------------------------- task files

def test_bundle_add_dev_zero_is_one_line_and_immediate(bundle_copy, tmp_path):
    """Old code: read /dev/zero until memory ran out (13.5 GB after 40 s), holding the edit lock."""
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    err = _one_line_error(_cli("bundle", "add", str(bundle_copy), "/dev/zero", cwd=tmp_path))
    assert err == "error: /dev/zero: is a character device, not a regular file", err


@needs_fifo
def test_bundle_add_fifo_does_not_hang(bundle_copy, fifo, tmp_path):
    """Old code: blocked forever opening the FIFO (the subprocess timeout fails the test)."""
    err = _one_line_error(_cli("bundle", "add", str(bundle_copy), str(fifo), cwd=tmp_path))
    assert f"{fifo}: is a FIFO (named pipe), not a regular file" in err


def test_task_file_that_is_a_directory_says_so(tmp_path):
    folder = tmp_path / "alpha.rmtask"
    folder.mkdir()
    with pytest.raises(ArtifactError, match=r"alpha.rmtask: is a directory, not a regular file; pass a task"):
        TaskPack.load(folder)


@needs_fifo
def test_inspect_of_a_fifo_does_not_hang(fifo, tmp_path):
    err = _one_line_error(_cli("inspect", str(fifo), cwd=tmp_path))
    assert "is a FIFO" in err


# ---------------------------------------------------------------- images

def test_a_directory_given_as_an_image_says_it_is_a_directory(onnx_bundle, tmp_path):
    """Old code: "image file '...' does not exist"."""
    from rmt_deploy.runtime.engine import Engine

    folder = tmp_path / "photo.png"
    folder.mkdir()
    with Engine.load(onnx_bundle, threads=1) as engine:
        with pytest.raises(InputError, match=r"photo.png: is a directory, not a regular file; pass an image"):
            engine.predict([folder])
        with pytest.raises(InputError, match="does not exist"):
            engine.predict([tmp_path / "missing.png"])


@needs_fifo
def test_a_fifo_given_as_an_image_does_not_hang(tmp_path):
    pipe = tmp_path / "photo.png"
    os.mkfifo(pipe)
    code = ("from rmt_deploy.runtime.preprocess import load_image\n"
            "from rmt_deploy.errors import InputError\n"
            f"try:\n    load_image({str(pipe)!r})\nexcept InputError as exc:\n    print(exc)\n")
    result = _python(code, tmp_path)
    assert result.returncode == 0 and "is a FIFO (named pipe)" in result.stdout, result.stderr[-2000:]


def test_an_image_file_over_the_size_limit_is_refused_before_reading(tmp_path):
    from rmt_deploy.runtime.image_decode import DecodeLimits, load_image

    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(InputError, match="bytes is more than the 10 an image file may hold"):
        load_image(path, DecodeLimits(max_file_bytes=10))


# ---------------------------------------------------------------- checkpoints and dataset files

@pytest.mark.parametrize("kind", ["dir", "fifo", "/dev/zero"])
def test_a_checkpoint_that_is_not_a_regular_file_says_what_it_is(tmp_path, kind):
    pytest.importorskip("open_clip")
    from rmt_deploy.basemodel.loading import resolve_weights

    if kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs")
        path = tmp_path / "weights.pt"
        os.mkfifo(path)
        what = "a FIFO"
    elif kind == "dir":
        path = tmp_path / "weights.pt"
        path.mkdir()
        what = "a directory"
    else:
        path, what = Path("/dev/zero"), "a character device"
        if not path.exists():
            pytest.skip("no /dev/zero")
    with pytest.raises(InputError, match=f"{path}: is {what}.*, not a regular file; pass a checkpoint"):
        resolve_weights("rmt-tiny-vit", str(path))


def _imagefolder(root: Path, classes=("cat", "dog"), per_class: int = 4) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_a_directory_named_like_an_image_in_a_dataset_says_so(tmp_path):
    from rmt_deploy.training.data import build_dataset

    root = _imagefolder(tmp_path / "pets")
    (root / "cat" / "odd.png").mkdir()
    with pytest.raises(InputError, match=r"odd.png: is a directory, not a regular file; pass an image"):
        build_dataset("imagefolder", root, shots=0, seed=1)


@needs_fifo
def test_a_split_file_that_is_a_fifo_does_not_hang(tmp_path):
    """Old code: read_text() on the FIFO blocked forever."""
    folder = tmp_path / "data" / "dtd"
    (folder / "images").mkdir(parents=True)
    os.mkfifo(folder / "split_zhou_DescribableTextures.json")
    code = ("from rmt_deploy.training.data import build_dataset\n"
            "from rmt_deploy.errors import InputError\n"
            f"try:\n    build_dataset('dtd', {str(tmp_path / 'data')!r}, 1, 1)\n"
            "except InputError as exc:\n    print(exc)\n")
    result = _python(code, tmp_path)
    assert result.returncode == 0 and "split_zhou_DescribableTextures.json: is a FIFO" in result.stdout, \
        result.stderr[-2000:]


def test_a_split_file_that_is_a_directory_or_not_text_says_so(tmp_path):
    from rmt_deploy.training.data import build_dataset

    folder = tmp_path / "dtd"
    (folder / "images").mkdir(parents=True)
    split = folder / "split_zhou_DescribableTextures.json"
    split.mkdir()
    with pytest.raises(InputError, match="split_zhou_DescribableTextures.json: is a directory"):
        build_dataset("dtd", tmp_path, 1, 1)
    split.rmdir()
    split.write_bytes(b"\xff\xfe" + json.dumps({}).encode())
    with pytest.raises(InputError, match="is not UTF-8 text"):
        build_dataset("dtd", tmp_path, 1, 1)
