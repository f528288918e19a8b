"""Issue #22: the tools work for every tower family unchanged (the bundle format carries tensor names and
shapes): `inspect --verify`, `bundle add/remove` and the task store behind Engine.predict, the base
fingerprint refusing another family's task, and a Tip-Adapter cache head, each on a copy of the
family's bundle (tests/families.py). Serving them: tests/serving/test_family_serving.py (Triton) and
test_ray_serve.py (Ray Serve)."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import rmt_test_families as families  # tests/families.py (loaded by tests/conftest.py): Family, FAMILIES

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

from rmt_deploy.artifacts.bundle import Bundle  # noqa: E402
from rmt_deploy.artifacts.heads import TIP_ADAPTER, Cache  # noqa: E402
from rmt_deploy.cli import main  # noqa: E402
from rmt_deploy.errors import UnknownTaskError  # noqa: E402
from rmt_deploy.runtime.engine import Engine  # noqa: E402

MODELS = list(families.FAMILIES)  # timm ViT, FastViT (MobileCLIP2), ConvNeXt, ModifiedResNet
# a tensor each family's tasks mask that no other family has (docs/families.md)
MARKERS = {
    "rmt-tiny-timm-vit": "visual.trunk.attn_pool.",          # SigLIP's MAP head
    "rmt-tiny-mobileclip2": ".token_mixer.qkv.weight",        # FastViT's last-stage attention
    "rmt-tiny-convnext": ".conv_dw.weight",                   # ConvNeXt's 7x7 depthwise conv
    "rmt-tiny-rn": "visual.attnpool.",                        # ModifiedResNet's attention pool
}


def rel_l2(test: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(test, np.float64) - reference) / np.linalg.norm(reference))


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def root(family, copy_bundle, tmp_path, request):
    """A copy of the family's bundle (tasks a and b, shared + folded) that the test may change."""
    return copy_bundle(family(request.node.callspec.params["model"]).bundle, tmp_path)


@pytest.mark.parametrize("model", MODELS)
def test_inspect_verify_lists_the_tasks_and_shows_the_family_s_masked_tensors(family, root, capsys, model):
    fam = family(model)
    names = list(fam.packs["a"].masks)
    assert any(MARKERS[model] in n for n in names), names
    main(["inspect", str(root), "--verify"])
    out = capsys.readouterr().out
    assert re.search(r"^tasks +2: a, b$", out, re.M), out
    weights = sum(m.size for m in fam.packs["a"].masks.values())
    assert re.search(rf"^masks +{len(names)} tensors, {weights:,} weights$", out, re.M), out
    assert re.search(r"^verify +\d+ files, 2 tasks: all ok$", out, re.M), out
    main(["inspect", str(root), "--verify", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == model and summary["verification"]["ok"]
    assert {t["name"]: round(t["sparsity"], 6) for t in summary["tasks"]} == {
        t: round(p.sparsity, 6) for t, p in fam.packs.items()}
    # the bundle's tensor names are the family's, and inspect of its task file lists each with its shape
    assert [t.name for t in Bundle.open(root).manifest.masked_tensors] == names
    main(["inspect", str(root / "tasks" / "a.rmtask")])
    out = capsys.readouterr().out
    for name, keep in fam.packs["a"].masks.items():
        assert re.search(rf"^{re.escape(name)} +{'x'.join(map(str, keep.shape))} ", out, re.M), (name, out)


@pytest.mark.parametrize("model", MODELS)
def test_bundle_remove_then_add_a_trained_task_is_served_as_the_folded_and_torch_models(family, root, capsys,
                                                                                       model):
    """b removed (task file and folded model go), then added back from the file `train` wrote: the
    task store serves it through the shared graph as the export's folded b and the masked torch tower do."""
    import onnxruntime as ort

    fam = family(model)
    images = fam.images()
    folded_b = ort.InferenceSession(str(fam.bundle / "folded" / "b.onnx"), providers=["CPUExecutionProvider"])
    with Engine.load(fam.bundle, threads=1) as original:
        want_a = original.predict(images, task="a").logits
    main(["bundle", "remove", str(root), "b"])
    assert "removed 1 task(s)" in capsys.readouterr().out
    assert Bundle.open(root).tasks == ["a"]
    assert not (root / "tasks" / "b.rmtask").exists() and not (root / "folded" / "b.onnx").exists()
    main(["bundle", "add", str(root), str(fam.task_file("b"))])
    assert "added 1 task(s)" in capsys.readouterr().out
    bundle = Bundle.open(root)
    assert bundle.tasks == ["a", "b"] and [e for _, e in bundle.verify() if e] == []
    with Engine.load(root, threads=1) as engine:
        got_b = engine.predict(images, task="b").logits
        assert rel_l2(got_b, folded_b.run(None, {"image": images})[0]) <= 1e-5
        assert rel_l2(got_b, fam.masked_logits("b", images)) <= 1e-5
        got_a = engine.predict(images, task="a").logits
        np.testing.assert_array_equal(got_a, want_a)
        assert not np.allclose(got_a, got_b)
    main(["bundle", "remove", str(root), "b"])
    assert Bundle.open(root).tasks == ["a"] and not (root / "tasks" / "b.rmtask").exists()
    with Engine.load(root, threads=1) as engine:
        with pytest.raises(UnknownTaskError, match="available: a"):
            engine.predict(images, task="b")


@pytest.mark.parametrize("model", MODELS)
def test_bundle_add_refuses_a_task_of_another_family_in_one_line(family, root, capsys, model):
    other = family(MODELS[(MODELS.index(model) + 1) % len(MODELS)])
    before = _snapshot(root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["bundle", "add", str(root), str(other.task_file("a"))])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    assert re.match(rf"error: task 'a' \(.*a\.rmtask\) was trained on base \S+ \({other.model}\), not on this "
                    r"bundle's base", err), err
    assert _snapshot(root) == before


@pytest.mark.parametrize("model", MODELS)
def test_a_tip_adapter_head_is_served_with_its_cache(family, root, capsys, model):
    """Task b's masks with a Tip-Adapter head whose cache keys are the masked tower's features of one
    image per class (built as tests/artifacts/test_heads.py builds one), added with `bundle add`."""
    fam = family(model)
    b = fam.packs["b"]
    paths = fam.paths()
    keyed = [next(p for p in paths if p.parent.name == c) for c in b.class_names]  # one image per class
    keys = fam.masked_embeddings("b", _preprocess(fam, keyed))
    cache = Cache.build(keys, np.arange(len(keyed)), alpha=3.0, beta=5.0, classes=len(b.class_names),
                        embed_dim=b.head.shape[1])
    tip = dataclasses.replace(b, name="tip", head_kind=TIP_ADAPTER, cache=cache)
    main(["bundle", "add", str(root), str(tip.save(root.parent / "tip.rmtask"))])
    main(["inspect", str(root / "tasks" / "tip.rmtask")])
    assert re.search(r"^head +tip-adapter: .* \+ cache 3 keys float16", capsys.readouterr().out, re.M)
    images = fam.images(6)
    f = fam.masked_embeddings("b", images).astype(np.float64)
    stored = Bundle.open(root).read_task("tip")
    assert stored.head_kind == TIP_ADAPTER
    k = cache.keys.astype(np.float64)
    want = b.logit_scale * f @ b.head.T + cache.alpha * np.exp(-cache.beta * (1 - f @ k.T)) @ np.eye(3)[cache.labels]
    with Engine.load(root, threads=1) as engine:
        got = engine.predict(images, task="tip").logits
        zeroshot = engine.predict(images, task="b").logits
    assert rel_l2(got, want) <= 1e-5
    assert np.abs(got - zeroshot).max() > 0.1  # the cache adds its votes to the same masked features


def _preprocess(fam, paths) -> np.ndarray:
    import torch
    from PIL import Image

    return torch.stack([fam.base.preprocess(Image.open(p)) for p in paths]).numpy()
