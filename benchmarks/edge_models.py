"""Issue #22's table: one row per tower family, the shared Engine against folded models on ONNX Runtime CPU.

Random weights, fp32, ONNX Runtime CPU, 2 threads; 8 random tasks at 2.5% zeros masked in each model's
mask groups of MODELS (docs/families.md). Each model works in its own temporary folder and every
measurement runs in a fresh process (clean peak RSS, memory freed between models):
  masked weights   count and share of the image tower's parameters
  .rmtask, folded  bytes of task0's task file (10 classes) and of its folded model (.onnx plus external data)
  latency b1, b8   Engine.predict vs a plain InferenceSession on the folded model: interleaved rounds, medians
  switch           uncached switch vs the floor np.multiply(base, mask, out) (runtime.measure_switch)
  peak RSS         an Engine serving the 8 tasks (cache_tasks=1, one batch each: no constant session is
                   asked for) vs one folded session; and serving one task steadily (its constant session made)
  train step       one R-AMT step on CPU, batch 8 at the model's resolution (train_step.timed_step)
  fp16             the fp16 export's folded model and Engine.predict, timed in the same rounds as fp32
Writes benchmarks/results/edge_models.json and edge_models.md.

    .venv/bin/python benchmarks/edge_models.py [--models rmt-tiny-vit,MobileCLIP2-S0,...] [--rounds 15]
        [--quick (3 rounds, 1 training step: a smoke run)] [--threads 2] [--zeros 0.025] [--train-steps 3]
        [--update (re-measure only --models, keep the other rows)]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from random_tasks import random_bundle  # noqa: E402  (benchmarks/random_tasks.py)
from runtime import EXPORTED, TASKS, _engine, measure_switch  # noqa: E402  (benchmarks/runtime.py)
from small_model_overhead import measure, settled  # noqa: E402  (interleaved rounds of calls, medians)

from rmt_deploy.bench.memory import peak_rss_mb  # noqa: E402
from rmt_deploy.bench.sessions import folded_session  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODELS = {  # open_clip 3.3 name -> mask groups (docs/families.md's recommendations)
    "rmt-tiny-vit": ("attn",),
    "MobileCLIP2-S0": ("attn", "mlp"),  # attn alone covers 18%: refused by the 20% rule
    "ViT-B-16-SigLIP2": ("attn",),
    "convnext_tiny": ("mlp", "conv"),  # no attention; issue #22 asks for conv too (mlp alone: 1.07x, families.md)
    "RN50": ("attn",),
    "ViT-B-16": ("attn",),
}
STAGES = ("prepare", "switch", "latency", "rss-engine", "rss-steady", "rss-folded", "train")
FP16 = "fp16"  # the fp16 bundle's folder in a model's work dir (task1 only, shared + folded)
ROUND_S = 0.02  # calls per round: enough that one contender's share of a round lasts this long
BATCH_BUDGET_S = 150.0  # fewer rounds (at least 3) where one batch size's rounds would take longer
TRAIN_BATCH = 8
STAGE_TIMEOUT_S = 3600


# ---------------------------------------------------------------- preparation (needs torch)

def tower_counts(model_name: str, groups: tuple[str, ...]) -> dict[str, Any]:
    """Masked tensors and weights of `groups`, against all of the image tower's parameters."""
    from rmt_deploy.basemodel.loading import load_base
    from rmt_deploy.basemodel.mask_groups import select, share

    model = load_base(model_name, None).model
    names = select(model, groups, model_name)
    params = dict(model.named_parameters())
    return {"masked_tensors": len(names), "masked_weights": int(sum(params[n].numel() for n in names)),
            "tower_params": int(sum(p.numel() for p in model.visual.parameters())),
            "masked_share": share(model, names)}


def folded_bytes(bundle_dir: Path, task: str) -> int:
    """A folded model's bytes on disk: the .onnx and its external data file, if any."""
    from rmt_deploy.artifacts.bundle import Bundle

    path = Bundle.open(bundle_dir).folded_path(task)
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def export_fp16(model_name: str, work: Path) -> dict[str, Any]:
    """task1 exported in fp16 (shared + folded) from the same checkpoint; the error instead if export fails."""
    from rmt_deploy.export import ExportConfig, export_bundle

    started = time.perf_counter()
    try:
        export_bundle(ExportConfig(model_name, str(work / "base.safetensors"), [work / "tasks" / f"{TASKS[1]}.rmtask"],
                                   work / FP16, mode="both", fp16=True, max_batch=8, verify=False), progress=False)
    except Exception as exc:  # noqa: BLE001  recorded in the table, not hidden
        return {"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
    return {"export_s": time.perf_counter() - started, "folded_bytes": folded_bytes(work / FP16, TASKS[1])}


def prepare(model_name: str, groups: tuple[str, ...], zeros: float, work: Path) -> dict[str, Any]:
    """Random checkpoint, 8 packs, the fp32 bundle (shared + folded task0/task1), the fp16 bundle; sizes."""
    started = time.perf_counter()
    random_bundle(model_name, work, TASKS, zeros, lambda i: 10 + i, EXPORTED, groups=groups, mode="both",
                  max_batch=8)
    export_s = time.perf_counter() - started
    return {**tower_counts(model_name, groups), "export_s": export_s,
            "rmtask_bytes": (work / "tasks" / f"{TASKS[0]}.rmtask").stat().st_size,
            "folded_bytes": folded_bytes(work / "bundle", TASKS[0]), "fp16": export_fp16(model_name, work)}


def measure_train(model_name: str, groups: tuple[str, ...], threads: int, steps: int) -> dict[str, Any]:
    """R-AMT step times (after one warm-up step) on CPU, batch TRAIN_BATCH, random images and head."""
    import torch
    from train_step import timed_step  # benchmarks/train_step.py

    from rmt_deploy.basemodel.loading import embed_dim, load_base, maskable_tensors, preprocess_config
    from rmt_deploy.training.masking import MaskedCLIP
    from rmt_deploy.training.trainer import TrainConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = load_base(model_name, None)
    head = torch.nn.functional.normalize(torch.randn(10, embed_dim(base.model)), dim=-1)
    model = MaskedCLIP(base.model, maskable_tensors(base.model, groups, model_name), head, 100.0)
    images = torch.randn(TRAIN_BATCH, 3, *preprocess_config(base.model)["image_size"])
    labels = torch.arange(TRAIN_BATCH) % head.shape[0]
    cfg = TrainConfig("m", "dtd", "r", "o", gdr=True, mask_groups=groups).validate()
    optimizer = torch.optim.Adam([model.flat_scores], lr=8e-5)
    generator = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    times = [timed_step(model, images, labels, cfg, optimizer, generator, cpu) for _ in range(steps + 1)][1:]
    return {"step_s": float(np.median(times)), "times_s": times, "batch": TRAIN_BATCH, "threads": threads}


# ---------------------------------------------------------------- measurements (no torch)

def images(bundle_dir: Path, batch: int) -> np.ndarray:
    """A seeded float32 NCHW batch at the bundle's image size."""
    from rmt_deploy.artifacts.bundle import Bundle

    height, width = Bundle.open(bundle_dir).manifest.preprocess.image_size
    return np.random.default_rng(batch).standard_normal((batch, 3, height, width)).astype(np.float32)


def rel_l2(test: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(test - reference) / max(np.linalg.norm(reference), 1e-12))


def contenders(work: Path, threads: int) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]], dict[str, str]]:
    """image batch -> logits, for the fp32 engine and folded session and, where they load, their fp16 twins."""
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.runtime.engine import Engine

    engine = settled(_engine(work, threads, cache_tasks=2), images(work / "bundle", 1), TASKS[1])
    folded = folded_session(Bundle.open(work / "bundle"), TASKS[1], threads)
    fns = {"engine": lambda x: engine.predict(x, task=TASKS[1]).logits,
           "folded": lambda x: folded.run(None, {"image": x})[0]}
    errors = {}
    if (work / FP16 / "manifest.json").is_file():
        try:
            half = settled(Engine.load(work / FP16, task=TASKS[1], threads=threads), images(work / "bundle", 1))
            half_folded = folded_session(Bundle.open(work / FP16), TASKS[1], threads)
            halves = {"fp16-engine": lambda x: half.predict(x, task=TASKS[1]).logits,
                      "fp16-folded": lambda x: half_folded.run(None, {"image": x})[0]}
            for fn in halves.values():  # a graph ORT loads but cannot run fails here, not in the timed rounds
                fn(images(work / "bundle", 1))
            fns.update(halves)
        except Exception as exc:  # noqa: BLE001  ONNX Runtime CPU refusing the fp16 graph is a result
            errors[FP16] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    return fns, errors


def plan_rounds(fns: dict[str, Callable[[], Any]], rounds: int) -> tuple[int, int]:
    """(calls per round, rounds) from one timed call of each, after a warm-up call."""
    from rmt_deploy.bench.timing import time_call

    for fn in fns.values():
        fn()
    single = {name: time_call(fn) for name, fn in fns.items()}
    calls = max(1, min(50, int(ROUND_S / single["folded"])))
    per_round = calls * sum(single.values())
    return calls, max(min(rounds, 3), min(rounds, int(BATCH_BUDGET_S / per_round)))


def measure_latency(work: Path, threads: int, rounds: int) -> dict[str, Any]:
    """Per batch size: medians of interleaved rounds, engine / folded, fp16 / fp32, and the logits' agreement."""
    fns, errors = contenders(work, threads)
    out: dict[str, Any] = {"errors": errors}
    for batch in (1, 8):
        x = images(work / "bundle", batch)
        logits = {name: fn(x) for name, fn in fns.items()}
        calls_of = {name: (lambda fn=fn: fn(x)) for name, fn in fns.items()}
        calls, used = plan_rounds(calls_of, rounds)
        medians = measure(calls_of, used, calls)
        row = {"median_ms": medians, "rounds": used, "calls_per_round": calls,
               "engine_vs_folded": medians["engine"] / medians["folded"],
               "engine_vs_folded_rel_l2": rel_l2(logits["engine"], logits["folded"])}
        if "fp16-folded" in medians:
            row["fp16_folded_vs_fp32_folded"] = medians["fp16-folded"] / medians["folded"]
            row["fp16_engine_vs_fp32_engine"] = medians["fp16-engine"] / medians["engine"]
            row["fp16_vs_fp32_rel_l2"] = rel_l2(logits["fp16-folded"], logits["folded"])
        out[f"batch{batch}"] = row
    return out


def measure_rss(work: Path, threads: int, what: str) -> dict[str, Any]:
    """Peak RSS of this (fresh) process after `what` served batches of 1: the engine through all 8 tasks with
    cache_tasks=1, or one plain session on task0's folded model."""
    from rmt_deploy.artifacts.bundle import Bundle

    x = images(work / "bundle", 1)
    if what == "rss-folded":
        folded_session(Bundle.open(work / "bundle"), TASKS[0], threads).run(None, {"image": x})
        return {"peak_rss_mb": peak_rss_mb()}
    engine = _engine(work, threads, cache_tasks=1)
    if what == "rss-steady":  # one task served steadily: its constant session is made and used
        settled(engine, x, TASKS[0]).predict(x, task=TASKS[0])
        return {"peak_rss_mb": peak_rss_mb(), "constant_sessions": engine.session_stats["made"]}
    for name in TASKS:
        engine.predict(x, task=name)
    assert engine.cache_stats["misses"] >= len(TASKS) - 1, engine.cache_stats
    return {"peak_rss_mb": peak_rss_mb(), "resident_tasks": len(engine.resident_tasks)}


def run_stage(args: argparse.Namespace) -> dict[str, Any]:
    groups, work = groups_of(args.child_model), args.workdir
    if args.child == "prepare":
        return prepare(args.child_model, groups, args.zeros, work)
    if args.child == "switch":
        return measure_switch(work, args.threads, args.rounds)
    if args.child == "latency":
        return measure_latency(work, args.threads, args.rounds)
    if args.child == "train":
        return measure_train(args.child_model, groups, args.threads, args.train_steps)
    return measure_rss(work, args.threads, args.child)


# ---------------------------------------------------------------- driver

def groups_of(model_name: str) -> tuple[str, ...]:
    return MODELS.get(model_name, ("attn",))


def child(args: argparse.Namespace, model_name: str, stage: str, work: Path) -> dict[str, Any]:
    """One stage in a fresh interpreter: its JSON result, or {"error": the last lines of its stderr}."""
    command = [sys.executable, __file__, "--child", stage, "--child-model", model_name, "--workdir", str(work),
               "--threads", str(args.threads), "--rounds", str(args.rounds), "--zeros", str(args.zeros),
               "--train-steps", str(args.train_steps)]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=STAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {STAGE_TIMEOUT_S} s", "stage_s": time.perf_counter() - started}
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        tail = [line.strip() for line in result.stderr.strip().splitlines() if not line.startswith("WARNING")][-3:]
        return {"error": " | ".join(tail) or f"exit status {result.returncode}", "stage_s": seconds}
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "stage_s": seconds}


def run_model(args: argparse.Namespace, model_name: str) -> dict[str, Any]:
    """Every stage of one model in its own temporary folder (removed afterwards); stops after a failed prepare."""
    row: dict[str, Any] = {"groups": list(groups_of(model_name))}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"edge-{model_name}-") as tmp:
        for stage in STAGES:
            print(f"  {model_name}: {stage}", flush=True)
            row[stage] = child(args, model_name, stage, Path(tmp))
            if stage == "prepare" and "error" in row[stage]:
                break
    row["wall_s"] = time.perf_counter() - started
    return row


# ---------------------------------------------------------------- report

def _bytes(value: float) -> str:
    if value < 1e6:
        return f"{value / 1e3:.1f} kB"
    return f"{value / 1e6:.2f} MB" if value < 1e8 else f"{value / 1e6:.0f} MB"


def _count(value: int) -> str:
    return f"{value:,}" if value < 1e6 else f"{value / 1e6:.1f} M"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s"


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _cell(row: dict[str, Any], stage: str, fill: Callable[[dict[str, Any]], str]) -> str:
    """A table cell from one stage's result, or the stage's failure."""
    result = row.get(stage, {})
    if not result:
        return "not run"
    if "error" in result:
        return "failed (see notes)"
    return fill(result)


def _latency(batch: int) -> Callable[[dict[str, Any]], str]:
    def fill(lat: dict[str, Any]) -> str:
        b = lat[f"batch{batch}"]
        m = b["median_ms"]
        return f"{_ms(m['engine'])} / {_ms(m['folded'])} ({b['engine_vs_folded']:.3f}x)"
    return fill


def _fp16(lat: dict[str, Any]) -> str:
    if lat["errors"].get(FP16):
        return "ORT CPU refused it (see notes)"
    if "fp16-folded" not in lat["batch1"]["median_ms"]:
        return "not exported (see notes)"
    parts = [f"b{batch} {_ms(lat[f'batch{batch}']['median_ms']['fp16-folded'])} "
             f"({lat[f'batch{batch}']['fp16_folded_vs_fp32_folded']:.2f}x fp32)" for batch in (1, 8)]
    return "; ".join(parts) + f", engine b1 {lat['batch1']['fp16_engine_vs_fp32_engine']:.2f}x fp32"


def table_row(name: str, row: dict[str, Any]) -> str:
    prep = row.get("prepare", {})
    if "error" in prep:
        return f"| {name} | {','.join(row['groups'])} | not measured: the preparation failed (see notes) |" + " - |" * 8
    rss = [row.get(stage, {"error": "not run"})["peak_rss_mb"] if "peak_rss_mb" in row.get(stage, {}) else None
           for stage in ("rss-engine", "rss-steady", "rss-folded")]
    rss_cell = "failed (see notes)" if None in rss else (
        f"{rss[0]:.0f} / {rss[1]:.0f} / {rss[2]:.0f} MiB ({rss[0] / rss[2]:.2f}x, {rss[1] / rss[2]:.2f}x)")
    cells = [
        f"{_count(prep['masked_weights'])} of {_count(prep['tower_params'])} ({prep['masked_share']:.0%})",
        _bytes(prep["rmtask_bytes"]),
        _bytes(prep["folded_bytes"]) + (f" (fp16 {_bytes(prep['fp16']['folded_bytes'])})"
                                        if "folded_bytes" in prep["fp16"] else ""),
        _cell(row, "latency", _latency(1)),
        _cell(row, "latency", _latency(8)),
        _cell(row, "switch", lambda s: f"{_ms(s['uncached_switch_ms'])} / {_ms(s['floor_ms'])} "
                                       f"({s['uncached_switch_ms'] / s['floor_ms']:.2f}x)"),
        rss_cell,
        _cell(row, "train", lambda t: _seconds(t["step_s"])),
        _cell(row, "latency", _fp16),
    ]
    return f"| {name} | {','.join(row['groups'])} | " + " | ".join(cells) + " |"


def notes(models: dict[str, dict[str, Any]]) -> list[str]:
    """One line per failure: the stage and its message."""
    lines = []
    for name, row in models.items():
        for stage in STAGES:
            result = row.get(stage, {})
            if "error" in result:
                lines.append(f"- {name}, {stage}: {result['error']}")
        for label, error in [("fp16 export", row.get("prepare", {}).get("fp16", {}).get("error")),
                             ("fp16 session", row.get("latency", {}).get("errors", {}).get(FP16))]:
            if error:
                lines.append(f"- {name}, {label}: {error}")
    return lines


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"# Edge models{' (quick smoke run: too few rounds to quote)' if s['quick'] else ''}",
        "",
        f"Random weights, fp32, ONNX Runtime {report['versions']['onnxruntime']} CPU, {s['threads']} threads, "
        f"{len(TASKS)} tasks at {s['zeros']:.1%} zeros, medians of up to {s['rounds']} interleaved rounds; "
        f"{report['machine']['cpus']} CPUs, load {report['machine']['load_before'][0]:.1f} before. "
        "`benchmarks/edge_models.py`.",
        "Latency and switch cells: rmt-deploy / baseline ms (ratio); latency's baseline is a plain session on the "
        "folded model, the switch's the floor np.multiply(base, mask); the engine's latency is its constant "
        "session's (made, waited for); peak RSS: Engine serving 8 tasks with cache_tasks=1 (one batch each, no "
        "constant session) / serving one task steadily (its constant session made) / one folded session.",
        "",
        "| model | groups | masked weights | .rmtask | folded model | batch 1 ms | batch 8 ms | uncached switch ms "
        "| peak RSS | train step (batch 8) | fp16 folded, ORT CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[table_row(name, row) for name, row in report["models"].items()],
    ]
    failures = notes(report["models"])
    if failures:
        lines += ["", "Notes:", *failures]
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("onnxruntime", "torch", "open_clip_torch", "timm", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated open_clip names")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 rounds and 1 training step: a smoke run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--update", action="store_true",
                        help="keep the other models' rows of the committed results, replace these models' rows")
    parser.add_argument("--zeros", type=float, default=0.025)
    parser.add_argument("--train-steps", type=int, default=3, help="R-AMT steps timed after one warm-up step")
    parser.add_argument("--child", choices=STAGES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and not args.child:
        args.rounds, args.train_steps = min(args.rounds, 3), 1
    return args


def _updated(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The committed report with `new`'s models re-measured (in MODELS order); each model keeps its own run's
    settings and machine load."""
    models = {**old["models"], **{name: {**row, "run": {k: new[k] for k in ("settings", "machine", "wall_s")}}
                                  for name, row in new["models"].items()}}
    order = [m for m in MODELS if m in models] + [m for m in models if m not in MODELS]
    return {**old, "models": {name: models[name] for name in order}}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        print(json.dumps(run_stage(args)))
        return
    started, load = time.perf_counter(), os.getloadavg()
    models = {}
    for name in [m for m in args.models.split(",") if m]:
        print(f"== {name} ({','.join(groups_of(name))})", flush=True)
        models[name] = run_model(args, name)
    report = {"settings": {"rounds": args.rounds, "quick": args.quick, "threads": args.threads, "zeros": args.zeros,
                           "train_steps": args.train_steps, "train_batch": TRAIN_BATCH},
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "load_before": load, "load_after": os.getloadavg()},
              "versions": versions(), "wall_s": time.perf_counter() - started, "models": models}
    if args.update and (RESULTS / "edge_models.json").exists():
        report = _updated(json.loads((RESULTS / "edge_models.json").read_text()), report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "edge_models.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (RESULTS / "edge_models.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
