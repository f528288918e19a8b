"""The tower families of the end-to-end tests (tests/export/test_edge_families.py, test_family_tools.py,
the family serving tests): per family a random tiny checkpoint, two tasks trained through the CLI on a
small image-folder dataset, and a shared + folded bundle of them (Family), with references independent
of the export code.

Loaded once by tests/conftest.py as module `rmt_test_families` (the test folders are not packages);
its `folder_root` and `family` fixtures build each family once per session. No torch at import.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from rmt_deploy.artifacts.task_file import TaskPack

# model -> the mask groups its tasks train (None: the default, attn)
FAMILIES = {
    "rmt-tiny-timm-vit": None,               # SigLIP-style timm ViT, MAP head
    "rmt-tiny-mobileclip2": "attn,mlp",      # FastViT-MCi: attention in the last stage only (17% of the tower)
    "rmt-tiny-convnext": "mlp,conv",         # no attention at all
    "rmt-tiny-rn": None,                     # ModifiedResNet: attention pool
}
CLASSES = ("stripes", "dots", "checks")


def write_image(path: Path, label: int, index: int, size: int = 40) -> None:
    from PIL import Image

    rng = np.random.default_rng(1000 * label + index)
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.zeros((size, size, 3), np.float32)
    pixels[..., label] = 170.0
    pixels += 60.0 * [np.sin(xx / 2.0), np.sin((xx + yy) / 3.0), np.cos(yy / 1.5)][label][..., None]
    pixels += rng.normal(0, 20, (size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def write_dataset(root: Path) -> Path:
    """An image-folder dataset at root: 3 classes x 8 images (the loader splits it into train/val/test)."""
    for label, name in enumerate(CLASSES):
        for i in range(8):
            write_image(root / name / f"{i}.png", label, i)
    return root


def train_args(checkpoint: Path, model: str, root: Path, out: Path, task: str, seed: int, groups: str | None,
               *extra: str) -> list[str]:
    """`rmt-deploy train` arguments for a tiny task of `model` on the dataset at root (2 epochs, CPU)."""
    args = ["train", "--model", model, "--pretrained", str(checkpoint), "--dataset", "imagefolder",
            "--data-root", str(root), "--out", str(out), "--task", task, "--shots", "4", "--epochs", "2",
            "--batch-size", "4", "--lr", "2e-3", "--seed", str(seed), "--workers", "0", "--device", "cpu",
            "--no-progress", "--no-gdr", *extra]
    return args + (["--mask-groups", groups] if groups else [])


class Family:
    """One family's checkpoint, two trained tasks and a shared + folded bundle, built once per session."""

    def __init__(self, model: str, root: Path, folder: Path) -> None:
        import torch

        from rmt_deploy.basemodel.loading import load_base, save_checkpoint
        from rmt_deploy.cli import main
        from rmt_deploy.export import ExportConfig, export_bundle

        self.model = model
        torch.manual_seed(0)
        random = load_base(model, None).model
        with torch.no_grad():  # timm inits layer scales at 1e-5 / 1e-6: random blocks would do nothing
            for name, param in random.visual.named_parameters():
                if "gamma" in name or name.endswith("layer_scale"):
                    param.fill_(0.5)
        self.checkpoint = save_checkpoint(random, folder / f"{model}.safetensors")
        self.packs = {}
        for task, seed in (("a", 1), ("b", 2)):
            main(train_args(self.checkpoint, model, root, folder / task, task, seed, FAMILIES[model]))
            self.packs[task] = TaskPack.load(folder / task / f"{task}.rmtask")
        self.bundle = folder / "bundle"
        self.report = export_bundle(ExportConfig(model, str(self.checkpoint), [folder / t / f"{t}.rmtask"
                                                                               for t in self.packs],
                                                 self.bundle, mode="both"), progress=False)
        self.base = load_base(model, str(self.checkpoint))

    def task_file(self, task: str) -> Path:
        """The .rmtask file `rmt-deploy train` wrote for task a or b."""
        return self.bundle.parent / task / f"{task}.rmtask"

    def masked_embeddings(self, task: str, images: np.ndarray) -> np.ndarray:
        """The L2-normalised embeddings of the torch tower with the task's masks multiplied into a copy of
        its parameters (independent of the export code)."""
        import torch

        pack = self.packs[task]
        visual = copy.deepcopy(self.base.model.visual).eval()
        with torch.no_grad():
            for name, keep in pack.masks.items():
                visual.get_parameter(name[len("visual."):]).mul_(torch.from_numpy(keep.astype(np.float32)))
            return torch.nn.functional.normalize(visual(torch.from_numpy(images)), dim=-1).numpy()

    def masked_logits(self, task: str, images: np.ndarray) -> np.ndarray:
        """Masks multiplied into a copy of the torch tower's parameters (independent of the export code)."""
        pack = self.packs[task]
        return pack.logit_scale * self.masked_embeddings(task, images) @ pack.head.T

    def images(self, count: int = 3) -> np.ndarray:
        """Real pictures of the dataset, through open_clip's own eval transform (float32 NCHW)."""
        import torch
        from PIL import Image

        return torch.stack([self.base.preprocess(Image.open(p)) for p in self.paths()[:count]]).numpy()

    def paths(self) -> list[Path]:
        return sorted(self.bundle.parent.parent.glob("families_data*/patterns/*/*.png"))
