"""Time one R-AMT step against one plain mask-tuning step (same scores, model and batch).

R-AMT step: student forward, teacher forward (no grad), two backward passes,
gradient dropout, Adam. Plain step: student forward, one cross-entropy
backward, Adam. The method's own floor is about 2x; the bound is 2.2x.
Steps alternate (plain, rmt, rmt, plain, ...); the ratio is the median of the
ratios of adjacent pairs, which shrugs off load drift on a shared machine.
On CUDA it also records training images/s in fp32 (the default) and bf16.

    python benchmarks/train_step.py                    # ViT-B-16, CPU, batch 8
    python benchmarks/train_step.py --model rmt-tiny-vit --repeats 3   # quick check
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from rmt_deploy.basemodel.loading import load_base, maskable_tensors
from rmt_deploy.training.distributed import DistContext
from rmt_deploy.training.masking import MaskedCLIP
from rmt_deploy.training.trainer import TrainConfig, rmt_step

RESULTS = Path(__file__).parent / "results"
BOUND = 2.2


def build(model_name: str, classes: int, device: torch.device) -> MaskedCLIP:
    """A random-weight base with attention masks and a random normalised class head."""
    torch.manual_seed(0)
    base = load_base(model_name, None, device=str(device))
    head = torch.nn.functional.normalize(torch.randn(classes, base.model.visual.output_dim), dim=-1)
    return MaskedCLIP(base.model, maskable_tensors(base.model), head, 100.0).to(device)


def timed_step(model, images, labels, cfg, optimizer, generator, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    rmt_step(model, images, labels, cfg, optimizer, generator, DistContext(device=device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(model: MaskedCLIP, batch: int, repeats: int, device: torch.device, precision: str) -> dict:
    """Interleaved step times of R-AMT and plain mask tuning on the same batch."""
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(batch, 3, *size, device=device)
    labels = torch.arange(batch, device=device) % model.head.shape[0]
    configs = {
        "rmt": TrainConfig("m", "dtd", "r", "o", gdr=True, precision=precision).validate(),
        "plain": TrainConfig("m", "dtd", "r", "o", gdr=False, precision=precision).validate(),
    }
    optimizer = torch.optim.Adam([model.flat_scores], lr=8e-5)
    generator = torch.Generator(device=device).manual_seed(0)
    times = {"rmt": [], "plain": []}
    for kind in ("plain", "rmt"):  # warm-up
        timed_step(model, images, labels, configs[kind], optimizer, generator, device)
    for r in range(repeats):
        order = ("plain", "rmt") if r % 2 == 0 else ("rmt", "plain")
        for kind in order:
            times[kind].append(timed_step(model, images, labels, configs[kind], optimizer, generator, device))
            print(f"  repeat {r + 1}/{repeats} {kind:5s} {times[kind][-1]:.3f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    pair_ratios = [r / p for r, p in zip(times["rmt"], times["plain"])]
    return {
        "rmt_step_s": med["rmt"], "plain_step_s": med["plain"],
        "ratio": statistics.median(pair_ratios),  # adjacent steps share the machine's load at that moment
        "ratio_of_medians": med["rmt"] / med["plain"], "pair_ratios": pair_ratios,
        "rmt_times_s": times["rmt"], "plain_times_s": times["plain"],
        "rmt_images_per_s": batch / med["rmt"], "plain_images_per_s": batch / med["plain"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--gpu-batch", type=int, default=32, help="batch for the CUDA fp32/bf16 images/s figures")
    parser.add_argument("--out", default=str(RESULTS / "train_step"), help="results path without suffix")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cpu = torch.device("cpu")
    model = build(args.model, args.classes, cpu)
    print(f"{args.model} CPU batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{model.flat_scores.numel():,} masked weights", flush=True)
    result = {
        "benchmark": "train_step", "model": args.model, "weights": "random", "batch": args.batch,
        "repeats": args.repeats, "masked_weights": int(model.flat_scores.numel()), "bound": BOUND,
        "cpu": {"threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
                **compare(model, args.batch, args.repeats, cpu, "fp32")},
        "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    result["within_bound"] = result["cpu"]["ratio"] <= BOUND
    del model
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        model = build(args.model, args.classes, gpu)
        result["cuda"] = {"device": torch.cuda.get_device_name(), "batch": args.gpu_batch,
                          **{precision: compare(model, args.gpu_batch, max(args.repeats, 10), gpu, precision)
                             for precision in ("fp32", "bf16")}}
    else:
        result["cuda"] = None

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"train_step: {args.model} (random weights), CPU, batch {args.batch}, {result['cpu']['threads']} thread(s), "
        f"median of {args.repeats} interleaved steps, torch {torch.__version__}",
        f"  R-AMT step  {result['cpu']['rmt_step_s']:.3f} s  (fwd + teacher fwd + 2 bwd + gradient dropout + Adam)",
        f"  plain step  {result['cpu']['plain_step_s']:.3f} s  (fwd + 1 bwd + Adam)",
        f"  ratio       {result['cpu']['ratio']:.2f}  median of pair ratios "
        f"{', '.join(f'{r:.2f}' for r in result['cpu']['pair_ratios'])}; ratio of medians "
        f"{result['cpu']['ratio_of_medians']:.2f} (bound {BOUND}: {'ok' if result['within_bound'] else 'EXCEEDED'})",
    ]
    if result["cuda"]:
        c = result["cuda"]
        for precision in ("fp32", "bf16"):
            r = c[precision]
            lines.append(f"  CUDA {c['device']} {precision} batch {c['batch']}: R-AMT {r['rmt_images_per_s']:.0f} "
                         f"images/s, plain {r['plain_images_per_s']:.0f} images/s, ratio {r['ratio']:.2f}")
    else:
        lines.append("  CUDA: no GPU here, fp32 / bf16 images/s not measured")
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
