"""One image path: the same file gives the same probabilities through `predict`, Engine.predict (path,
bytes, PIL image), the Triton and Ray request decoding, and the trainer's loader gives the same tensor;
degenerate images and absurd values are one InputError, never a wrong or NaN answer."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from rmt_deploy.cli import main
from rmt_deploy.errors import ArtifactError, InputError
from rmt_deploy.runtime.engine import Engine
from rmt_deploy.runtime.preprocess import ImageTransform, to_batch
from rmt_deploy.serving import protocol

pytest.importorskip("onnxruntime")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _rgba() -> Image.Image:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (40, 52, 4), dtype=np.uint8)
    pixels[..., 3] = np.linspace(0, 255, 52, dtype=np.uint8)[None, :]  # alpha from clear to opaque
    return Image.fromarray(pixels, "RGBA")


def _grey16() -> Image.Image:
    ramp = np.linspace(0, 65535, 45 * 37).reshape(45, 37).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    return image


def _palette() -> Image.Image:
    rng = np.random.default_rng(4)
    smooth = np.kron(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), np.ones((9, 11, 1), np.uint8))
    return Image.fromarray(smooth).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)


FILES = {"rgba": _rgba, "grey16": _grey16, "palette": _palette}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def engine(onnx_bundle):
    with Engine.load(onnx_bundle, task="alpha", cache_tasks=1, threads=1) as engine:
        yield engine


@pytest.mark.parametrize("kind", list(FILES))
def test_one_file_gives_the_same_probabilities_on_every_path(engine, onnx_bundle, tmp_path, capsys, kind):
    """Old code: predict resized in the file's own mode, the server and the trainer in RGB (0.66 vs 0.84)."""
    data = _png(FILES[kind]())
    path = tmp_path / f"{kind}.png"
    path.write_bytes(data)
    with Image.open(path) as opened:
        pil = opened.copy()
    assert pil.mode == FILES[kind]().mode

    logits = {
        "engine path": engine.predict([path]).logits[0],
        "engine bytes": engine.predict([data]).logits[0],
        "engine PIL": engine.predict([pil]).logits[0],
    }
    request = {"task": np.array([[b"alpha"]], dtype=object), "image_bytes": np.array([[data]], dtype=object)}
    sample = protocol.decode_inputs(request, engine.tasks)[0]
    logits["triton (decoded PIL)"] = engine.predict([sample.image], task=sample.task).logits[0]
    logits["ray (decoded RGB array)"] = engine.predict([np.asarray(sample.image)], task=sample.task).logits[0]
    for where, got in logits.items():
        np.testing.assert_allclose(got, logits["engine path"], rtol=0, atol=1e-5, err_msg=where)

    try:
        main(["predict", "--bundle", str(onnx_bundle.root), "--task", "alpha", "--json", "--top-k", "50",
              "--threads", "1", str(path)])
    except SystemExit as exc:
        assert exc.code in (0, None)
    result = json.loads(capsys.readouterr().out)["results"][0]
    by_label = {entry["label"]: entry["prob"] for entry in result["top_k"]}
    expected = engine.predict([path])
    cli = np.array([by_label[name] for name in expected.class_names])
    np.testing.assert_allclose(cli, expected.probs[0], rtol=1e-5, atol=0, err_msg="cli predict --json")


@pytest.mark.parametrize("kind", list(FILES))
def test_the_trainers_loader_gives_the_served_tensor(onnx_bundle, tiny_base, tmp_path, kind):
    pytest.importorskip("torch")
    from rmt_deploy.basemodel.loading import preprocess_config
    from rmt_deploy.training.loading import ImageDataset, eval_transform

    path = tmp_path / f"{kind}.png"
    path.write_bytes(_png(FILES[kind]()))
    served = to_batch([path], ImageTransform.from_config(onnx_bundle.manifest.preprocess))[0]
    trained, label = ImageDataset([(path, 0)], eval_transform(preprocess_config(tiny_base.model)))[0]
    assert label == 0
    assert np.array_equal(trained.numpy(), served)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    """Pillow's own I;16 -> RGB conversion clips every value above 255 (a ramp turns white)."""
    from rmt_deploy.runtime.image_decode import to_rgb

    rgb = np.asarray(to_rgb(_grey16()))
    assert rgb.shape[2] == 3 and rgb.min() == 0 and rgb.max() == 255
    assert 100 < rgb.mean() < 155  # a ramp from 0 to 65535 averages half-grey


def test_a_zero_width_pil_image_is_one_input_error(engine):
    """Old code: ZeroDivisionError."""
    for size in [(0, 7), (7, 0)]:
        with pytest.raises(InputError, match=r"image 0: the PIL image is empty"):
            engine.predict([Image.new("RGB", size)])
        with pytest.raises(InputError, match="empty"):
            ImageTransform((32, 32), MEAN, STD)(Image.new("RGB", size))


def test_a_float_batch_of_huge_values_is_refused_not_answered_with_nan(engine):
    """Old code: 3e38 (finite) overflowed to NaN probabilities and a label."""
    with pytest.raises(InputError, match=r"values up to 3e\+38.*not a normalised image"):
        engine.predict(np.full((2, 3, 32, 32), 3e38, np.float32))
    assert np.isfinite(engine.predict(np.full((1, 3, 32, 32), 3.0, np.float32)).probs).all()


def test_non_finite_logits_are_never_returned(engine, monkeypatch):
    def nan_embeddings(batch, task):
        out = np.zeros((batch.shape[0], 8), np.float32)
        out[-1] = np.nan
        return out

    monkeypatch.setattr(engine, "_embed", nan_embeddings)
    monkeypatch.setattr(engine, "_head_math", lambda head: type("M", (), {"logits": staticmethod(lambda e: e)})())
    with pytest.raises(ArtifactError, match=r"task 'alpha': non-finite logits for image\(s\) 1"):
        engine.predict([np.zeros((4, 4, 3), np.uint8)] * 2)
    with pytest.raises(InputError, match=r"preprocessed batch gives non-finite logits for image\(s\) 0"):
        engine.predict(np.zeros((1, 3, 32, 32), np.float32))


def test_an_extreme_aspect_ratio_is_refused_in_one_line(engine, onnx_bundle, tmp_path, capsys):
    """Old code: a 1 x 1,000,000 PNG (1 kB) took predict to 2.5 GB and 8 s for a 32 px model."""
    path = tmp_path / "line.png"
    Image.new("L", (1_000_000, 1), 128).save(path)
    assert path.stat().st_size < 10_000
    with pytest.raises(InputError, match=r"line.png' is 1000000x1 pixels, more than the limit"):
        engine.predict([path])
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--bundle", str(onnx_bundle.root), "--threads", "1", str(path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "1000000x1 pixels" in err and "\n" not in err


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("shape", [(1, 3000), (3000, 1), (2, 700)])
def test_extreme_shapes_match_open_clip_within_one_level(mode, shape):
    """The kept window alone is resized (bounded cost); the pixels stay within one 8-bit level of the full
    resize that open_clip does."""
    open_clip = pytest.importorskip("open_clip")
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    reference = open_clip.image_transform((32, 32), is_train=False, mean=MEAN, std=STD, resize_mode=mode)
    ours = ImageTransform((32, 32), MEAN, STD, "bicubic", mode)(image)
    assert ours.shape == (3, 32, 32)
    try:
        expected = reference(image).numpy()
    except Exception:  # open_clip itself fails on some (its 'longest' resizes one side to 0 pixels)
        return
    assert np.abs(ours - expected).max() <= 1 / 255 / min(STD) + 1e-5
