"""Few-shot image classification data: the 11 CoOp datasets and any folder of class folders.

CoOp layout and templates follow docs/method.md. Few-shot sampling follows
CoOp: with one `random.Random(seed)`, K images per class from train, then
min(K, 4) per class from val (all of a class when it has fewer, as Dassl
does), classes in order of first appearance; the test split is used in full.
Base-to-new (CoCoOp) then keeps the first ceil(C/2) labels ("base") or the
rest ("new"), relabelled from 0. ImageNet's test-only variants (V2, Sketch, A,
R) are read by rmt_deploy.training.variants.
"""
from __future__ import annotations

import json
import math
import random
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from rmt_deploy.artifacts.integrity import check_regular_file
from rmt_deploy.errors import InputError
from rmt_deploy.training.datasets import (
    COOP_DATASETS,
    IMAGE_SUFFIXES,
    CoopDataset,
    FewShotData,
    Sample,
    class_folders,
    clean_class_name,
    distinct_class_names,
    images_in,
    read_classnames,
    read_list_file,
)
from rmt_deploy.training.variants import read_variant

IMAGEFOLDER = "imagefolder"
IMAGEFOLDER_TEMPLATE = "a photo of a {}."
SPLIT_SEED = 0  # the seeded train/val/test split of an imagefolder is fixed; --seed picks the shots
SPLIT_FRACTIONS = (0.5, 0.2)  # train, val; the rest is test (as Dassl's read_and_split_data)


IMAGENET_VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")  # test only (variants.py)
DATASET_NAMES = (*COOP_DATASETS, *IMAGENET_VARIANTS, IMAGEFOLDER)
SUBSAMPLES = ("all", "base", "new")
_ALIASES = {d.coop_name.lower(): d.key for d in COOP_DATASETS.values()} | {
    d.folder.lower(): d.key for d in COOP_DATASETS.values()
} | {"flowers102": "oxford_flowers", "pets": "oxford_pets", "cars": "stanford_cars", "aircraft": "fgvc_aircraft",
     "imagenet-v2": "imagenetv2", "imagenet-sketch": "imagenet_sketch", "imagenet-a": "imagenet_a",
     "imagenet-r": "imagenet_r", "imagenet-adversarial": "imagenet_a", "imagenet-rendition": "imagenet_r"}
# EuroSAT folder names, as CoOp renames them, in case a split file carries the raw ones (EuroSAT only)
_EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "SeaLake": "Sea or Lake",
}

def resolve_dataset(name: str) -> str:
    """A dataset key from a key, a CoOp class name or a folder name (case-insensitive)."""
    key = name.strip().lower()
    if key in DATASET_NAMES:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    raise InputError(f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}")


def build_dataset(name: str, root: str | Path, shots: int, seed: int, subsample: str = "all") -> FewShotData:
    """Read a dataset under `root`, sample its few-shot train/val splits (shots <= 0: all), keep `subsample`."""
    key = resolve_dataset(name)
    if subsample not in SUBSAMPLES:
        raise InputError(f"--subsample {subsample!r} is not one of {', '.join(SUBSAMPLES)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"data root {str(root)!r} does not exist or is not a folder: pass --data-root DIR")
    if key in IMAGENET_VARIANTS:

        data = read_variant(key, root)
    elif key == IMAGEFOLDER:
        data = _read_imagefolder(root)
    else:
        spec = COOP_DATASETS[key]
        folder = root / spec.folder
        if not folder.is_dir():
            raise InputError(
                f"dataset folder {str(folder)!r} not found: {key} expects {spec.folder}/{spec.image_dir or '.'} "
                f"and {spec.folder}/{spec.split_file} under the data root (CoOp layout)"
            )
        reader = {"imagenet": _read_imagenet, "fgvc_aircraft": _read_aircraft}.get(key, _read_split_json)
        data = reader(spec, folder)
        _warn_repeated_names(data)
    train, val = sample_few_shot(data.train, data.val, shots, seed, data)
    data.train, data.val = train, val
    data = subsample_classes(data, subsample)
    _check_files(data)
    return data


def check_training_classes(data: FewShotData) -> None:
    """Before training: every class has training images (InputError naming one that has none)."""
    empty = sorted(set(range(len(data.class_names))) - {label for _, label in data.train})
    if empty:
        raise InputError(f"{len(empty)} class(es) of {data.name} have no training images, e.g. "
                         f"{data.class_names[empty[0]]!r} (label {empty[0]}): add images for it to the train split, "
                         "or drop the class")


def _warn_repeated_names(data: FewShotData) -> None:
    """A CoOp dataset's own class list may repeat a name (ImageNet's WordNet names: 'crane' the bird and the
    machine): a warning, not an error, so a published split runs as is."""
    first: dict[str, int] = {}
    for label, name in enumerate(data.class_names):
        if name in first:
            warnings.warn(f"{data.name}: labels {first[name]} and {label} share the class name {name!r}; their "
                          "prompts are the same (as the dataset's class list says)", stacklevel=3)
        first.setdefault(name, label)


def subsample_classes(data: FewShotData, which: str) -> FewShotData:
    """CoCoOp's base-to-new split: labels [0, ceil(C/2)) are "base", the rest "new", each relabelled from 0."""
    if which == "all":
        return data
    count = len(data.class_names)
    half = math.ceil(count / 2)
    keep = list(range(half)) if which == "base" else list(range(half, count))
    if not keep:
        raise InputError(f"{data.name} has {count} class(es): too few for a base/new split")
    relabel = {old: new for new, old in enumerate(keep)}

    def select(samples: list[Sample]) -> list[Sample]:
        return [(path, relabel[label]) for path, label in samples if label in relabel]

    parent = data.parent_classes or data.class_names
    index = [data.parent_index[i] for i in keep] if data.parent_index else keep
    return FewShotData(data.name, [data.class_names[i] for i in keep], data.template, select(data.train),
                       select(data.val), select(data.test), parent, index)


def sample_few_shot(
    train: list[Sample], val: list[Sample], shots: int, seed: int, data: FewShotData | None = None
) -> tuple[list[Sample], list[Sample]]:
    """K per class from train, then min(K, 4) per class from val, one seeded RNG (CoOp).

    A class with fewer than K images contributes all of them, as Dassl does (with a warning).
    """
    if shots <= 0:
        return list(train), list(val)
    rng = random.Random(seed)
    out = []
    for split, k in ((train, shots), (val, min(shots, 4))):
        chosen = []
        for items in _by_label(split).values():
            chosen.extend(rng.sample(items, k) if len(items) >= k else items)
        out.append(chosen)
    short = [label for label, items in _by_label(train).items() if len(items) < shots]
    if short:
        first = data.class_names[short[0]] if data else short[0]
        warnings.warn(f"{len(short)} class(es) have fewer than {shots} training images (e.g. {first!r}): "
                      "all of their images are used", stacklevel=2)
    return out[0], out[1]


def _by_label(samples: Sequence[Sample]) -> dict[int, list[Sample]]:
    groups: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample[1]].append(sample)
    return groups


def _check_files(data: FewShotData) -> None:
    used = data.train + data.val + data.test
    missing = [str(p) for p, _ in used if not p.exists()]
    if missing:
        raise InputError(
            f"{len(missing)} image(s) listed in the {data.name} split are missing, e.g. {missing[0]!r}: "
            "check --data-root and that the dataset is fully extracted"
        )
    for path, _ in used:
        if not path.is_file():  # a directory or a FIFO named like an image: one line naming it
            check_regular_file(path, None, "image", InputError)
    if not data.test:
        raise InputError(f"dataset {data.name} has no test images")


def _load_json(path: Path) -> Any:
    if not path.exists():
        raise InputError(f"split file {str(path)!r} not found: download it with the dataset (CoOp layout)")
    try:
        return json.loads(read_list_file(path, "split (JSON)"))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"split file {str(path)!r} is not valid JSON ({exc})") from None


def _read_split_json(spec: CoopDataset, folder: Path) -> FewShotData:
    """A split_zhou_*.json: {"train"|"val"|"test": [[relative_path, label, classname], ...]}."""
    path = folder / spec.split_file
    split = _load_json(path)
    image_dir = folder / spec.image_dir if spec.image_dir else folder
    renames = _EUROSAT_NAMES if spec.key == "eurosat" else None
    names: dict[int, str] = {}
    parts = {}
    for part in ("train", "val", "test"):
        entries = split.get(part) if isinstance(split, dict) else None
        if not isinstance(entries, list):
            raise InputError(f"split file {str(path)!r} has no {part!r} list: expected CoOp's split format")
        samples = []
        for entry in entries:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[1], int)):
                raise InputError(
                    f"split file {str(path)!r}: entry {entry!r} in {part!r} is not [relative_path, label, classname]"
                )
            rel, label, cname = entry
            names.setdefault(label, clean_class_name(str(cname), renames))
            samples.append((image_dir / str(rel), label))
        parts[part] = samples
    class_names = _contiguous(names, path)
    return FewShotData(spec.key, class_names, spec.template, parts["train"], parts["val"], parts["test"])


def _contiguous(names: dict[int, str], source: Path) -> list[str]:
    if sorted(names) != list(range(len(names))):
        raise InputError(f"{str(source)!r}: labels are not 0..{len(names) - 1}; the split file is damaged")
    return [names[i] for i in range(len(names))]


def _read_aircraft(spec: CoopDataset, folder: Path) -> FewShotData:
    """FGVC-Aircraft's own lists: variants.txt and images_variant_{train,val,test}.txt."""
    variants_file = folder / spec.split_file
    if not variants_file.exists():
        raise InputError(f"split file {str(variants_file)!r} not found: download FGVC-Aircraft's data folder")
    variants = [line.strip() for line in read_list_file(variants_file, "variant list (.txt)").splitlines()
                if line.strip()]
    index = {v: i for i, v in enumerate(variants)}
    parts = {}
    for part in ("train", "val", "test"):
        path = folder / f"images_variant_{part}.txt"
        if not path.exists():
            raise InputError(f"split file {str(path)!r} not found: download FGVC-Aircraft's data folder")
        samples = []
        for line in read_list_file(path, "split list (.txt)").splitlines():
            if not line.strip():
                continue
            image, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise InputError(f"{str(path)!r}: variant {variant!r} is not in variants.txt")
            samples.append((folder / spec.image_dir / f"{image}.jpg", index[variant]))
        parts[part] = samples
    names = [clean_class_name(v) for v in variants]
    return FewShotData(spec.key, names, spec.template, parts["train"], parts["val"], parts["test"])


def _read_imagenet(spec: CoopDataset, folder: Path) -> FewShotData:
    """imagenet/images/{train,val}/<wnid>/ + classnames.txt ('<wnid> <name>'); val is the test split."""
    names_file = folder / spec.split_file
    wnid_names = read_classnames(names_file)
    parts, wnids = {}, None
    for part, sub in (("train", "train"), ("test", "val")):
        split_dir = folder / spec.image_dir / sub
        if not split_dir.is_dir():
            raise InputError(f"ImageNet folder {str(split_dir)!r} not found (expected images/train and images/val)")
        found = [p.name for p in class_folders(split_dir)]
        wnids = wnids or found
        unknown = [w for w in found if w not in wnid_names or w not in wnids]
        if unknown:
            raise InputError(f"ImageNet class folder {str(split_dir / unknown[0])!r} is not a class of "
                             f"{str(names_file)!r} and images/train")
        label = {w: i for i, w in enumerate(wnids)}
        parts[part] = [(img, label[w]) for w in found for img in images_in(split_dir / w)]
    class_names = [clean_class_name(wnid_names[w]) for w in wnids]
    return FewShotData(spec.key, class_names, spec.template, parts["train"], list(parts["test"]), parts["test"])


def _read_imagefolder(root: Path) -> FewShotData:
    """Class folders under root, or train/ [val/] test/ folders of class folders."""
    name = task_name_from(root.name)
    if (root / "train").is_dir() and (root / "test").is_dir():
        folders = class_folders(root / "train")
        classes = [p.name for p in folders]
        parts = {}
        for part in ("train", "val", "test"):
            split_dir = root / part
            if not split_dir.is_dir():
                parts[part] = []
                continue
            extra = sorted({p.name for p in class_folders(split_dir)} - set(classes))
            if extra:
                raise InputError(f"class folder {str(split_dir / extra[0])!r} has no counterpart in train/")
            parts[part] = [
                (img, label) for label, c in enumerate(classes) if (split_dir / c).is_dir()
                for img in images_in(split_dir / c)
            ]
        train, val, test = parts["train"], parts["val"], parts["test"]
        empty = sorted(set(range(len(classes))) - {label for _, label in train})
        if empty:
            raise InputError(f"class folder {str(folders[empty[0]])!r} has no images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))}): every class needs training images "
                             f"({len(empty)} class(es) have none)")
    else:
        folders = class_folders(root)
        classes = [p.name for p in folders]
        if len(classes) < 2:
            raise InputError(f"{str(root)!r} has {len(classes)} class folder(s): imagefolder needs at least 2")
        train, val, test = [], [], []
        rng = random.Random(SPLIT_SEED)
        for label, c in enumerate(classes):
            images = images_in(root / c)
            if len(images) < 2:
                raise InputError(
                    f"class folder {str(root / c)!r} has {len(images)} image(s): a seeded split needs at least 2 "
                    "(or provide train/ and test/ folders)"
                )
            n_train, n_val = (round(len(images) * f) for f in SPLIT_FRACTIONS)
            n_val = max(0, min(n_val, len(images) - n_train - 1))
            n_train = max(1, min(n_train, len(images) - n_val - 1))
            rng.shuffle(images)
            train += [(p, label) for p in images[:n_train]]
            val += [(p, label) for p in images[n_train:n_train + n_val]]
            test += [(p, label) for p in images[n_train + n_val:]]
    if len(classes) < 2:
        raise InputError(f"{str(root)!r} has {len(classes)} class folder(s): imagefolder needs at least 2")
    return FewShotData(name, distinct_class_names(folders), IMAGEFOLDER_TEMPLATE, train, val, test)


def task_name_from(text: str) -> str:
    """A valid task name from a dataset or folder name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-._") or "task"
    return name[:128]
