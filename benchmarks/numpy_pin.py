"""What pinning numpy<2 (for the `serve` extra) costs the codec and task switching: run under each numpy.

Times decode_zero_indices / decode_mask on ViT-B/16-sized i.i.d. masks (2.5% zeros) and the
engine's uncached (in-place rewrite) and cached switches on a bundle (e.g. the one
benchmarks/serve.py builds with --workdir), medians. Prints one JSON line; the results file
benchmarks/results/numpy_pin.json holds one line per numpy version, run on the same machine.

    python benchmarks/numpy_pin.py --bundle DIR [--repeats 15]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    from rmt_deploy.artifacts.masks import decode_mask, decode_zero_indices, encode_mask
    from rmt_deploy.runtime.engine import Engine

    n = 12 * (2304 * 768 + 768 * 768)
    keep = np.random.default_rng(0).random(n) >= 0.025
    encoded = encode_mask(keep)
    out = {"numpy": np.__version__,
           "decode_zero_indices_ms": _median_ms(lambda: decode_zero_indices(encoded), args.repeats),
           "decode_mask_ms": _median_ms(lambda: decode_mask(encoded), args.repeats)}
    with Engine.load(args.bundle, cache_tasks=2) as engine:
        tasks = engine.tasks
        cycle = iter(range(10 ** 9))
        # 4+ tasks through 2 buffers in round-robin: every switch is an in-place rewrite
        out["uncached_switch_ms"] = _median_ms(lambda: engine.switch(tasks[next(cycle) % len(tasks)]), args.repeats)
        engine.switch(tasks[0])
        engine.switch(tasks[1])
        out["cached_switch_ms"] = _median_ms(lambda: engine.switch(tasks[next(cycle) % 2]), args.repeats)
        out["cache_stats"] = engine.cache_stats
    print(json.dumps(out))


if __name__ == "__main__":
    main()
