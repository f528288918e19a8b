"""The stated memory bound per image holds whatever the shape, measured as peak RSS in a subprocess
against a baseline subprocess that does the same with a 16 x 16 image.

Bound (runtime.image_decode, runtime.preprocess): DECODE_BYTES_PER_PIXEL x decoded pixels + the
encoded file + 4 bytes x crop width x source height (Pillow's first resize pass) + the output.
Old code: a 1 x 4096 PNG at 224 px resized to 224 x 917,504 first (822 MB)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

resource = pytest.importorskip("resource")
SIZE = 224
SLACK = 12 << 20  # allocator and page granularity
WORK = """
import sys
from rmt_deploy.runtime.preprocess import ImageTransform, to_batch
transform = ImageTransform(({size}, {size}), (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
batch = to_batch([sys.argv[1]], transform)
assert batch.shape == (1, 3, {size}, {size})
"""
# Linux keeps ru_maxrss across fork and exec, so a process started from pytest (hundreds of MB with torch)
# reports pytest's peak: a fresh, small launcher starts the work and reads its child's ru_maxrss.
LAUNCH = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def _peak_rss(path) -> int:
    result = subprocess.run([sys.executable, "-c", LAUNCH, WORK.format(size=SIZE), str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.strip().splitlines()[-1])


def _ramp(height: int, width: int, mode: str) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    if mode == "I;16":
        return Image.fromarray(((x * 7 + y * 13) % 65536).astype(np.uint16))
    channels = 4 if mode == "RGBA" else 3
    pixels = np.stack([(x * (c + 1) + y * (c + 2)) % 256 for c in range(channels)], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, mode)


@pytest.mark.parametrize("height, width, mode", [
    (4096, 1, "RGB"),      # tall line: resized to 224 x 917,504 by the old code
    (1, 4096, "RGB"),      # wide line
    (1, 16384, "RGB"),     # within the servers' limits: 3.4 GB per image at 224 px before
    (2048, 2048, "RGBA"),  # a large ordinary image: the decode term dominates
    (2048, 2048, "I;16"),  # 16-bit grey: the 8-bit step
])
def test_peak_rss_per_image_stays_within_the_stated_bound(tmp_path, height, width, mode):
    from rmt_deploy.runtime.image_decode import DECODE_BYTES_PER_PIXEL

    baseline_file = tmp_path / "small.png"
    _ramp(16, 16, "RGB").save(baseline_file)
    path = tmp_path / "image.png"
    _ramp(height, width, mode).save(path)
    baseline = min(_peak_rss(baseline_file) for _ in range(2))
    extra = _peak_rss(path) - baseline
    bound = (DECODE_BYTES_PER_PIXEL * height * width + path.stat().st_size + 4 * SIZE * height
             + 4 * 3 * SIZE * SIZE + SLACK)
    print(f"{height}x{width} {mode}: extra peak RSS {extra / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB")
    assert extra <= bound, f"{extra / 2**20:.1f} MiB over the bound {bound / 2**20:.1f} MiB"
