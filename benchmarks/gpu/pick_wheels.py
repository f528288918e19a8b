"""Which carried wheels this Python needs: those whose distribution is not installed, or is older than
what rmt-deploy or open_clip require. Standard library only (it runs before anything is installed).

    python3 benchmarks/gpu/pick_wheels.py benchmarks/gpu/wheels   # prints one wheel path a line
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

MINIMUM = {"timm": (1, 0, 17), "open_clip_torch": (2, 24)}  # open_clip 3.x needs timm >= 1.0.17


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def needed(wheels: Path) -> list[Path]:
    picked = []
    for wheel in sorted(wheels.glob("*.whl")):
        name = wheel.name.split("-")[0]
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            picked.append(wheel)
            continue
        floor = MINIMUM.get(name) or MINIMUM.get(_canonical(name).replace("-", "_"))
        if floor and _version(installed) < floor:
            picked.append(wheel)
    return picked


if __name__ == "__main__":
    for path in needed(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "wheels")):
        print(path)
