"""Benchmark the binary-mask codec against its size and decode-speed targets.

For i.i.d. masks with 2.5% and 10% zeros over N elements (default: ViT-B/16 attention,
12 x (2304x768 + 768x768) = 28,311,552), report the encoded size against the entropy
bound and packbits, and the medians of interleaved timings of encode_mask, decode_mask,
decode_zero_indices and the materialisation `np.multiply(base, keep, out=buf)`.

    .venv/bin/python benchmarks/mask_codec.py [--n N] [--repeats R] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from rmt_deploy.artifacts.masks import decode_mask, decode_zero_indices, encode_mask, entropy_bound_bytes, mask_stats

VIT_B16_N = 12 * (2304 * 768 + 768 * 768)
CASES = {0.025: 2.0, 0.10: 4.0}  # zero rate -> max decode / materialise ratio
MAX_SIZE_RATIO = 1.05


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_case(n: int, zeros: float, repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    keep = rng.random(n) >= zeros
    base = rng.standard_normal(n, dtype=np.float32)
    buf = np.empty_like(base)
    blob = encode_mask(keep)
    assert np.array_equal(decode_mask(blob), keep), "round trip failed"
    steps = {
        "materialise": lambda: np.multiply(base, keep, out=buf),
        "decode_mask": lambda: decode_mask(blob),
        "decode_zero_indices": lambda: decode_zero_indices(blob),
        "encode": lambda: encode_mask(keep),
    }
    for fn in steps.values():  # warm-up: page in buffers, load code paths
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so load changes hit all steps alike
        for name, fn in steps.items():
            times[name].append(_timed(fn))
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    bound = entropy_bound_bytes(keep)
    limit = CASES.get(zeros)
    ratio = med["decode_mask"] / med["materialise"]
    return {
        "zeros": zeros,
        "n": n,
        "method": mask_stats(blob).method,
        "encoded_bytes": len(blob),
        "entropy_bound_bytes": bound,
        "packbits_bytes": (n + 7) // 8,
        "size_ratio": len(blob) / bound,
        "size_pass": len(blob) <= MAX_SIZE_RATIO * bound,
        "median_ms": med,
        "min_ms": {name: min(ts) * 1e3 for name, ts in times.items()},
        "decode_over_materialise": ratio,
        "decode_over_materialise_min": min(times["decode_mask"]) / min(times["materialise"]),
        "decode_limit": limit,
        "decode_pass": limit is None or ratio <= limit,
    }


def report(r: dict) -> str:
    med = r["median_ms"]
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    limit = f"<= {r['decode_limit']:.0f}x" if r["decode_limit"] else "no target"
    return "\n".join([
        f"zeros {r['zeros']:.1%}  N={r['n']:,}  method={r['method']}",
        f"  size      {r['encoded_bytes']:>12,} B  entropy bound {r['entropy_bound_bytes']:>12,.0f} B"
        f"  packbits {r['packbits_bytes']:>12,} B",
        f"  size/bound {r['size_ratio']:.4f} (<= {MAX_SIZE_RATIO}x: {verdict(r['size_pass'])})"
        f"   size/packbits {r['encoded_bytes'] / r['packbits_bytes']:.4f}",
        *(f"  {name:<20} {med[name]:8.2f} ms (median; min {r['min_ms'][name]:.2f})" for name in med),
        f"  decode_mask / materialise = {r['decode_over_materialise']:.2f}x ({limit}: "
        f"{verdict(r['decode_pass'])}; ratio of minima {r['decode_over_materialise_min']:.2f}x)",
        f"  decode_zero_indices / materialise = {med['decode_zero_indices'] / med['materialise']:.2f}x",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=VIT_B16_N, help="elements per mask")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"numpy {np.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, repeats {args.repeats}")
    results = [bench_case(args.n, zeros, args.repeats) for zeros in CASES]
    for r in results:
        print(report(r))
    ok = all(r["size_pass"] and r["decode_pass"] for r in results)
    print(f"overall: {'PASS' if ok else 'FAIL'}  (load average after: {os.getloadavg()[0]:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"numpy": np.__version__, "cpus": os.cpu_count(), "load_before": load,
                       "repeats": args.repeats, "results": results, "pass": ok}, fh, indent=2)


if __name__ == "__main__":
    main()
