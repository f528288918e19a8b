"""CoOp datasets, imagefolder, few-shot sampling and the bad-input messages."""
from __future__ import annotations

import json
import random

import pytest

from rmt_deploy.errors import InputError
from rmt_deploy.training.data import (
    COOP_DATASETS,
    build_dataset,
    clean_class_name,
    resolve_dataset,
    sample_few_shot,
)

from .conftest import CLASSES, write_coop_dataset, write_image


def test_split_json_reader_cleans_class_names_and_resolves_paths(coop_root):
    data = build_dataset("dtd", coop_root, shots=0, seed=1)
    assert data.class_names == ["banded stripes", "dotted", "grassy field"]
    assert data.template == "{} texture."
    assert (len(data.train), len(data.val), len(data.test)) == (18, 6, 12)
    path, label = data.test[0]
    assert path == coop_root / "dtd" / "images" / "banded_stripes" / "test_0.png" and label == 0


def test_few_shot_takes_k_per_class_and_min_k_4_from_val(coop_root):
    data = build_dataset("DescribableTextures", coop_root, shots=5, seed=1)
    for split, per_class in ((data.train, 5), (data.val, 2)):
        labels = [label for _, label in split]
        assert all(labels.count(c) == per_class for c in range(3))
    assert len(data.test) == 12
    small = build_dataset("dtd", coop_root, shots=1, seed=1)
    assert len(small.val) == 3 and len(small.train) == 3


def test_few_shot_follows_coop_semantics():
    train = [(f"t{i}", i % 3) for i in range(30)]
    val = [(f"v{i}", i % 3) for i in range(30)]
    rng = random.Random(7)
    expected_train, expected_val = [], []
    for label in (0, 1, 2):
        expected_train += rng.sample([s for s in train if s[1] == label], 4)
    for label in (0, 1, 2):
        expected_val += rng.sample([s for s in val if s[1] == label], 4)
    assert sample_few_shot(train, val, 4, 7) == (expected_train, expected_val)


def test_few_shot_is_seeded(coop_root):
    a = build_dataset("dtd", coop_root, shots=2, seed=1).train
    assert build_dataset("dtd", coop_root, shots=2, seed=1).train == a
    assert any(build_dataset("dtd", coop_root, shots=2, seed=s).train != a for s in (2, 3, 4))


def test_templates_follow_the_reference():
    expected = {
        "oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
        "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "dtd": "{} texture.",
        "eurosat": "a centered satellite photo of {}.", "food101": "a photo of {}, a type of food.",
        "ucf101": "a photo of a person doing {}.", "stanford_cars": "a photo of a {}.",
        "sun397": "a photo of a {}.", "caltech101": "a photo of a {}.", "imagenet": "a photo of a {}.",
    }
    assert {k: d.template for k, d in COOP_DATASETS.items()} == expected


def test_class_name_clean_up_and_aliases():
    assert clean_class_name("Apply_Eye_Makeup") == "apply eye makeup"
    assert clean_class_name("Highway") == "highway"
    assert resolve_dataset("EuroSAT") == "eurosat" and resolve_dataset("food-101") == "food101"
    assert resolve_dataset("ImageNet-A") == "imagenet_a" and resolve_dataset("imagenet-sketch") == "imagenet_sketch"


def test_eurosat_renaming_applies_to_eurosat_only(tmp_path):
    raw = ("AnnualCrop", "Highway", "Forest")
    write_coop_dataset(tmp_path, counts=(1, 1, 1), classes=raw, folder="eurosat", image_dir="2750",
                       split_file="split_zhou_EuroSAT.json")
    data = build_dataset("eurosat", tmp_path, shots=1, seed=1)
    assert data.template == "a centered satellite photo of {}." and len(data.test) == 3
    assert data.class_names == ["annual crop land", "highway or road", "forest"]
    for label, cname in enumerate(raw):
        write_image(tmp_path / "folder" / cname / "0.png", label, 0)
        write_image(tmp_path / "folder" / cname / "1.png", label, 1)
    assert build_dataset("imagefolder", tmp_path / "folder", 0, 1).class_names == ["annualcrop", "forest", "highway"]


def test_fgvc_aircraft_lists(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4"]
    folder.mkdir()
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    for part in ("train", "val", "test"):
        lines = []
        for label, variant in enumerate(variants):
            for i in range(2):
                image = f"{part}{label}{i}"
                write_image(folder / "images" / f"{image}.jpg", label, i)
                lines.append(f"{image} {variant}")
        (folder / f"images_variant_{part}.txt").write_text("\n".join(lines))
    data = build_dataset("fgvc_aircraft", tmp_path, shots=2, seed=1)
    assert data.class_names == ["707-320", "a300b4"]
    assert sorted(label for _, label in data.train) == [0, 0, 1, 1]


def test_imagenet_folders(tmp_path):
    folder = tmp_path / "imagenet"
    folder.mkdir()
    (folder / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    for sub in ("train", "val"):
        for label, wnid in enumerate(("n01", "n02")):
            for i in range(2):
                write_image(folder / "images" / sub / wnid / f"{i}.JPEG", label, i)
    data = build_dataset("imagenet", tmp_path, shots=1, seed=1)
    assert data.class_names == ["tench", "goldfish"] and len(data.test) == 4 and len(data.train) == 2


def test_imagefolder_with_split_folders(tmp_path):
    for part, count in (("train", 3), ("test", 2)):
        for label, cname in enumerate(("cat", "Sea_Lake")):
            for i in range(count):
                write_image(tmp_path / "pets" / part / cname / f"{i}.png", label, i)
    data = build_dataset("imagefolder", tmp_path / "pets", shots=2, seed=1)
    assert data.name == "pets" and data.class_names == ["sea lake", "cat"]  # folder order, as ImageFolder
    assert data.template == "a photo of a {}." and len(data.train) == 4 and data.val == [] and len(data.test) == 4


def test_imagefolder_seeded_split_is_fixed_and_disjoint(tmp_path):
    for label, cname in enumerate(("a", "b")):
        for i in range(10):
            write_image(tmp_path / cname / f"{i}.png", label, i)
    first = build_dataset("imagefolder", tmp_path, shots=0, seed=1)
    second = build_dataset("imagefolder", tmp_path, shots=0, seed=2)
    assert first.test == second.test and (len(first.train), len(first.val), len(first.test)) == (10, 4, 6)
    assert not set(first.train) & set(first.test)


# ---- bad input: one clear InputError naming the bad value --------------------------------------


def test_unknown_dataset(coop_root):
    with pytest.raises(InputError, match=r"unknown dataset 'dtdd'.*imagefolder"):
        build_dataset("dtdd", coop_root, 1, 1)


def test_missing_data_root(tmp_path):
    with pytest.raises(InputError, match=r"data root .*nowhere.* does not exist"):
        build_dataset("dtd", tmp_path / "nowhere", 1, 1)


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(InputError, match=r"dataset folder .*dtd.* not found"):
        build_dataset("dtd", tmp_path, 1, 1)


def test_missing_split_file(tmp_path):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(InputError, match=r"split file .*split_zhou_DescribableTextures.json.* not found"):
        build_dataset("dtd", tmp_path, 1, 1)


def test_malformed_split_file(tmp_path):
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps({"train": [["a.png"]]}))
    with pytest.raises(InputError, match="split file"):
        build_dataset("dtd", tmp_path, 1, 1)


def test_missing_image_in_split(tmp_path):
    write_coop_dataset(tmp_path, counts=(2, 1, 1))
    (tmp_path / "dtd" / "images" / CLASSES[1] / "test_0.png").unlink()
    with pytest.raises(InputError, match=r"1 image\(s\) listed in the dtd split are missing.*test_0.png"):
        build_dataset("dtd", tmp_path, 1, 1)


def test_a_class_with_fewer_images_than_shots_contributes_all_of_them(coop_root):
    with pytest.warns(UserWarning, match=r"3 class\(es\) have fewer than 16 training images.*all of their images"):
        data = build_dataset("dtd", coop_root, 16, 1)
    assert len(data.train) == 3 * 6 and len(data.val) == 3 * 2  # everything, as Dassl does


def test_base_to_new_halves_relabel_and_keep_the_parent_classes(tmp_path):
    classes = ("a_1", "b_2", "c_3", "d_4", "e_5")
    write_coop_dataset(tmp_path, counts=(2, 1, 1), classes=classes)
    full = build_dataset("dtd", tmp_path, 1, 1)
    base = build_dataset("dtd", tmp_path, 1, 1, subsample="base")
    new = build_dataset("dtd", tmp_path, 1, 1, subsample="new")
    assert base.class_names == ["a 1", "b 2", "c 3"] and new.class_names == ["d 4", "e 5"]  # ceil(5 / 2) base
    assert (base.parent_classes, base.parent_index, new.parent_index) == (full.class_names, [0, 1, 2], [3, 4])
    assert sorted({label for _, label in new.test}) == [0, 1] and len(new.test) == 2
    assert [path for path, _ in base.train] == [path for path, label in full.train if label < 3]  # sampled first
    with pytest.raises(InputError, match="--subsample 'third' is not one of all, base, new"):
        build_dataset("dtd", tmp_path, 1, 1, subsample="third")


def _write_imagenet_family(root):
    """imagenet (4 classes) and its variants in CoOp's layout: V2 by label folder, A by wnid (2 classes)."""
    wnids = {"n03": "tench", "n01": "goldfish", "n04": "great white shark", "n02": "tiger_shark"}
    names = "".join(f"{w} {n}\n" for w, n in sorted(wnids.items()))
    for folder in ("imagenet", "imagenetv2", "imagenet-adversarial"):
        (root / folder).mkdir(parents=True)
        (root / folder / "classnames.txt").write_text(names)
    for label, wnid in enumerate(sorted(wnids)):
        for sub in ("train", "val"):
            write_image(root / "imagenet" / "images" / sub / wnid / "0.JPEG", label, 0)
        write_image(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(label) / "a.jpeg", label, 1)
    for wnid in ("n04", "n02"):
        label = sorted(wnids).index(wnid)
        write_image(root / "imagenet-adversarial" / "imagenet-a" / wnid / "x.jpg", label, 2)
        write_image(root / "imagenet-adversarial" / "imagenet-a" / wnid / "y.jpg", label, 3)
    (root / "imagenet-adversarial" / "imagenet-a" / "README.txt").write_text("ignored: not a folder")


def test_imagenet_variants_are_test_only_class_subsets_of_imagenet(tmp_path):
    _write_imagenet_family(tmp_path)
    imagenet = build_dataset("imagenet", tmp_path, 1, 1)
    v2 = build_dataset("imagenetv2", tmp_path, 0, 1)
    assert v2.class_names == imagenet.class_names and v2.parent_index == [0, 1, 2, 3]
    assert [(p.parent.name, label) for p, label in v2.test] == [("0", 0), ("1", 1), ("2", 2), ("3", 3)]
    adversarial = build_dataset("imagenet-a", tmp_path, 0, 1)
    assert adversarial.class_names == ["tiger shark", "great white shark"] and adversarial.parent_index == [1, 3]
    assert adversarial.parent_classes == imagenet.class_names and not adversarial.train
    assert sorted(label for _, label in adversarial.test) == [0, 0, 1, 1]
    with pytest.raises(InputError, match=r"imagenet_r folder .*imagenet-rendition/imagenet-r' not found"):
        build_dataset("imagenet_r", tmp_path, 0, 1)


def test_imagefolder_too_few_classes_or_images(tmp_path):
    for i in range(3):
        write_image(tmp_path / "only" / f"{i}.png", 0, i)
    with pytest.raises(InputError, match="1 class folder.*needs at least 2"):
        build_dataset("imagefolder", tmp_path, 1, 1)
    write_image(tmp_path / "lonely" / "0.png", 1, 0)
    with pytest.raises(InputError, match="lonely.* has 1 image.*needs at least 2"):
        build_dataset("imagefolder", tmp_path, 1, 1)


def test_unreadable_image(tmp_path):
    from rmt_deploy.training.loading import load_image

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image .*bad.png"):
        load_image(bad)


def test_image_dataset_and_train_transform(coop_root):
    torch = pytest.importorskip("torch")
    from rmt_deploy.training.loading import ImageDataset, train_transform

    data = build_dataset("dtd", coop_root, shots=1, seed=1)
    cfg = {"image_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    image, label = ImageDataset(data.train, train_transform(cfg))[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == data.train[0][1]
