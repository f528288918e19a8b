"""preprocess.py reproduces open_clip's eval transform on real images, and validates input."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rmt_deploy.errors import InputError
from rmt_deploy.runtime.preprocess import ImageTransform, load_image, to_batch

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _real_images():
    data = pytest.importorskip("skimage.data")
    cat = data.chelsea()
    return {
        "cat": Image.fromarray(cat),                                  # 300x451 RGB
        "coffee": Image.fromarray(data.coffee()),                     # 400x600 RGB
        "camera": Image.fromarray(data.camera()),                     # 512x512 grayscale
        "logo": Image.fromarray(data.logo()),                         # RGBA
        "small": Image.fromarray(np.ascontiguousarray(cat[40:61, 100:131])),  # upsampled
        "palette": Image.fromarray(data.astronaut()).convert("P"),    # palette mode
    }


@pytest.mark.parametrize("size, mode, interp", [
    ((224, 224), "shortest", "bicubic"),
    ((32, 32), "shortest", "bicubic"),
    ((160, 224), "shortest", "bicubic"),
    ((160, 224), "shortest", "bilinear"),  # open_clip resizes a non-square "shortest" bicubic regardless
    ((224, 160), "shortest", "bilinear"),
    ((224, 224), "longest", "bicubic"),
    ((96, 128), "squash", "bilinear"),
])
def test_matches_open_clip_eval_transform_on_real_images(size, mode, interp):
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD,
                                          resize_mode=mode, interpolation=interp)
    ours = ImageTransform(size, MEAN, STD, interp, mode)
    for name, image in _real_images().items():
        expected = reference(image.convert("RGB")).numpy()  # RGB first, on every path (image_decode)
        got = ours(image)
        assert got.shape == expected.shape, name
        assert np.abs(got - expected).max() <= 1e-5, name


def test_to_batch_accepts_paths_pil_and_uint8_arrays(tmp_path):
    transform = ImageTransform((32, 32), MEAN, STD)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    batch = to_batch([str(path), Image.fromarray(pixels), pixels], transform)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == np.float32
    assert np.array_equal(batch[0], batch[1]) and np.array_equal(batch[1], batch[2])
    assert np.array_equal(to_batch(np.stack([pixels, pixels]), transform)[1], batch[0])
    assert np.array_equal(to_batch(batch, transform), batch)


@pytest.mark.parametrize("images, message", [
    ([], "empty batch"),
    (np.zeros((0, 3, 32, 32), np.float32), "empty batch"),
    (np.zeros((3, 32, 32), np.float32), "expected (N, 3, 32, 32)"),
    (np.zeros((1, 3, 16, 16), np.float32), "expected (N, 3, 32, 32)"),
    (np.zeros((1, 3, 32, 32), np.float64), "dtype is float64"),
    (np.full((1, 3, 32, 32), np.nan, np.float32), "NaN or Inf"),
    (np.array([[[np.inf]]], np.float32).repeat(32, 1).repeat(32, 2)[None].repeat(3, 1), "NaN or Inf"),
    ([np.zeros((8, 8, 5), np.uint8)], "is not HxW"),
    ([np.zeros((8, 8, 3), np.int16)], "not uint8"),
    ([3.0], "is a float"),
    (12, "cannot read images from int"),
])
def test_bad_input_is_one_clear_error(images, message):
    transform = ImageTransform((32, 32), MEAN, STD)
    with pytest.raises(InputError, match=None) as info:
        to_batch(images, transform)
    assert message in str(info.value)


def test_unreadable_or_missing_image_file_names_the_file(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InputError, match="broken.jpg"):
        load_image(broken)
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("field, value", [("interpolation", v) for v in ("bicubic", "bilinear", "random", "nearest")]
                         + [("resize_mode", v) for v in ("shortest", "longest", "squash", "crop")])
def test_the_manifest_accepts_exactly_the_settings_the_runtime_applies(field, value):
    """A bundle whose preprocessing the manifest accepts must load; one it refuses, the runtime refuses too."""
    from rmt_deploy.artifacts.manifest import Preprocess, record
    from rmt_deploy.errors import ArtifactError

    data = {"image_size": [32, 32], "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
            "resize_mode": "shortest", field: value}
    try:
        record(Preprocess, "preprocess", data)
        manifest_ok = True
    except ArtifactError:
        manifest_ok = False
    try:
        ImageTransform((32, 32), MEAN, STD, **{field: value})
        runtime_ok = True
    except InputError:
        runtime_ok = False
    assert manifest_ok == runtime_ok, f"{field}={value!r}: manifest {manifest_ok}, runtime {runtime_ok}"
    assert manifest_ok == (value not in ("nearest", "crop"))
