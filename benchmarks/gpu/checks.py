"""rmt-deploy's GPU check: machine facts, then five independent checks, each in its own process with
its own hard timeout, all within one wall-clock budget; results.json + summary.txt (+ machine.txt,
checks.log) in the output folder. benchmarks/gpu/run.sh is the entry point (it installs the carried
wheels first); docs/gpu.md says how to run it and what it writes.

    python3 benchmarks/gpu/checks.py --out DIR [--dry-run] [--budget 450] [--only train_step,tensorrt]

A dry run (--dry-run, or no CUDA device) attempts every check: each runs its CPU part on the tiny
model, or says it has none, and is recorded as "skipped: no CUDA device" with that CPU part under
figures.cpu_part. Exit status 1 when a check (or, in a dry run, a CPU part) failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from gpukit import CHECKS  # gpukit lives beside this script
from gpukit.common import (
    FAIL,
    GPU_MODEL,
    SKIPPED,
    STATUSES,
    TINY_MODEL,
    Context,
    first_line,
    result,
    round_figures,
)

KIT_VERSION = 1
MODULES = {"machine": "facts", "cuda_tests": "suite", "train_step": "train", "torch_switch": "torch_switch",
           "ort_cuda": "ort_cuda", "tensorrt": "trt"}
# hard timeout of each check in seconds (also cut to what is left of the budget)
TIMEOUTS = {"machine": 60, "cuda_tests": 150, "train_step": 120, "torch_switch": 150, "ort_cuda": 120,
            "tensorrt": 240}
TITLES = {"cuda_tests": "(1) the suite's CUDA tests", "train_step": "(2) R-AMT training step, fp32 vs bf16",
          "torch_switch": "(3) torch CUDA backend: switch and predict", "ort_cuda": "(4) ONNX Runtime CUDA, IOBinding",
          "tensorrt": "(5) TensorRT refit engine"}
DEFAULT_BUDGET = 450.0  # seconds for everything after the wheels: the whole run stays under 8 minutes
MIN_START = 20.0        # a check is not started with less than this left of the budget
NO_CUDA = "skipped: no CUDA device"
FORCED = "skipped: dry run (--dry-run given; a CUDA device is present)"


def default_out(dry_run: bool) -> Path:
    """$OUT, else benchmarks/results/gpu/ for a GPU run; a dry run never overwrites the committed results."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    if dry_run:
        return Path(tempfile.gettempdir()) / "rmt-gpu-check-dry-run"
    return REPO / "benchmarks" / "results" / "gpu"


# ---------------------------------------------------------------- worker (one check, in its own process)

def worker(args: argparse.Namespace) -> int:
    import importlib

    def log(text: str) -> None:
        print(text, flush=True)

    ctx = Context(device=args.device, work=Path(args.work), repo=REPO, model=args.model, trt_model=args.trt_model,
                  log=log)
    try:
        module = importlib.import_module(f"gpukit.{MODULES[args.worker]}")
        out = module.run(ctx)
        if out.get("status") not in STATUSES or not out.get("reason"):
            out = result(FAIL, f"the check returned no status or reason: {str(out)[:200]}")
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the check's reason
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        frames = traceback.extract_tb(exc.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames) if "rmt_deploy" in f.filename),
                     f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?")
        out = result(FAIL, f"{first_line(exc)} (at {where})", traceback=tb[-3000:])
    Path(args.result).write_text(json.dumps(round_figures(out), indent=1, default=str) + "\n")
    return 0


# ---------------------------------------------------------------- driver

class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out) if args.out else None
        self.started = time.time()
        self.deadline = time.monotonic() + args.budget
        self.own_work = not args.work  # a temp folder of ours is removed at the end; --work is kept
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rmt-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def launch(self, name: str, device: str, model: str) -> tuple[dict[str, Any], float, float]:
        """Run one check in a child process (its own session, killed as a group on timeout)."""
        timeout = min(TIMEOUTS[name], self.left() - 5)
        if timeout < MIN_START:
            return result(SKIPPED, f"not started: {max(self.left(), 0):.0f} s of the {self.args.budget:.0f} s "
                                   "budget left"), 0.0, 0.0
        result_path = self.work / f"{name}.result.json"
        result_path.unlink(missing_ok=True)
        log_path = self.work / f"{name}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result", str(result_path),
               "--work", str(self.work), "--device", device, "--model", model, "--trt-model",
               self.args.trt_model if device == "cuda" else TINY_MODEL]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(HERE), str(REPO), os.environ.get("PYTHONPATH")) if p))
        start = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc = None
        seconds = time.monotonic() - start
        self._append_log(name, log_path, seconds)
        if rc is None:
            return result(FAIL, f"timed out after {timeout:.0f} s (its hard timeout); see checks.log"), seconds, timeout
        if not result_path.is_file():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return result(FAIL, f"the check's process exited with status {rc} and no result: {tail[0][:300]}"), \
                seconds, timeout
        return json.loads(result_path.read_text()), seconds, timeout

    def _append_log(self, name: str, log_path: Path, seconds: float) -> None:
        if self.out is None:
            return
        with open(self.out / "checks.log", "a") as log:
            log.write(f"\n===== {name} ({seconds:.1f} s) =====\n")
            log.write(log_path.read_text(errors="replace")[-200_000:])

    def write(self, final: bool = False) -> None:
        data = {
            "kit": "rmt-deploy gpu-check", "kit_version": KIT_VERSION,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "wall_s": round(time.time() - self.started, 1), "finished": final, "budget_s": self.args.budget,
            "dry_run": self.dry_run, "dry_run_reason": self.skip_reason if self.dry_run else None,
            "cuda": self.cuda, "model": self.model, "argv": sys.argv[1:], "out": str(self.out),
            "machine": self.machine, "checks": self.results,
        }
        _write_atomic(self.out / "results.json", json.dumps(data, indent=1, default=str) + "\n")
        _write_atomic(self.out / "summary.txt", summary(data))

    def main(self) -> int:
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "checks.log").write_text(f"rmt-deploy gpu-check, work folder {self.work}\n")
        machine, seconds, _ = self.launch("machine", "cuda", GPU_MODEL)
        torch_facts = machine.get("figures", {}).get("torch", {})
        self.cuda = bool(torch_facts.get("cuda_available"))
        self.dry_run = self.args.dry_run or not self.cuda
        if self.out is None:  # chosen once we know whether this is a dry run
            self.out = default_out(self.dry_run)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "checks.log").write_text(f"rmt-deploy gpu-check, work folder {self.work}\n")
            self._append_log("machine", self.work / "machine.log", seconds)
        print(f"[gpu-check] results go to {self.out}", flush=True)
        report = machine.get("figures", {}).pop("report", "")
        (self.out / "machine.txt").write_text(report or f"machine facts failed: {machine.get('reason')}\n")
        self.machine = {"status": machine["status"], "reason": machine["reason"], "seconds": round(seconds, 1),
                        **machine.get("figures", {})}
        self.skip_reason = FORCED if self.cuda else NO_CUDA
        self.model = TINY_MODEL if self.dry_run else GPU_MODEL
        device = "cpu" if self.dry_run else "cuda"
        for name in CHECKS:
            if self.args.only and name not in self.args.only:
                self.results[name] = result(SKIPPED, f"skipped: not in --only {','.join(self.args.only)}")
                continue
            print(f"[gpu-check] {name}: {TITLES[name]} ...", flush=True)
            out, seconds, timeout = self.launch(name, device, self.model)
            if self.dry_run:
                out = result(SKIPPED, self.skip_reason, cpu_part=out)
            out.update(seconds=round(seconds, 1), timeout_s=round(timeout))
            self.results[name] = out
            part = out["figures"].get("cpu_part", out)
            print(f"[gpu-check] {name}: {out['status']} ({seconds:.0f} s) {part['reason'][:240]}", flush=True)
            self.write()
        self.write(final=True)
        print(summary(self.load_written()), end="", flush=True)
        failed = [n for n, r in self.results.items()
                  if r["status"] == FAIL or r["figures"].get("cpu_part", {}).get("status") == FAIL]
        return 1 if failed else 0

    def load_written(self) -> dict[str, Any]:
        return json.loads((self.out / "results.json").read_text())


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (pytest's children too), then SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summary(data: dict[str, Any]) -> str:
    """The short text report: the run, the machine, one line per check."""
    machine = data.get("machine", {})
    mode = f"dry run ({data['dry_run_reason']})" if data.get("dry_run") else f"GPU run on {data.get('model')}"
    head = (f"rmt-deploy gpu-check {data['started_utc']}  wall {data['wall_s']:.0f} s of {data['budget_s']:.0f} s  "
            f"{mode}{'' if data.get('finished') else '  (unfinished)'}")
    lines = [head, f"machine: {machine.get('reason', '-')}", f"tree: rmt_deploy {machine.get('rmt_deploy_tree', '-')}", ""]
    for name in CHECKS:
        check = data["checks"].get(name)
        if check is None:
            lines.append(f"{name:<13} not run")
            continue
        lines.append(f"{name:<13} {check['status']:<8} {check.get('seconds', 0):>5.0f} s  {check['reason']}")
        part = check["figures"].get("cpu_part")
        if part:
            lines.append(f"{'':<13} cpu part {part['status']}: {part['reason']}")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help=("results folder (default: $OUT, else benchmarks/results/gpu/ on a GPU "
                                       "and a temp folder in a dry run)"))
    parser.add_argument("--dry-run", action="store_true", help="run only the CPU parts, even with a GPU")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all checks together")
    parser.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None,
                        help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--work", help="scratch folder for checkpoints and bundles (default: a new temp folder)")
    parser.add_argument("--trt-model", default=GPU_MODEL, help="model of the TensorRT check (default ViT-B-16)")
    parser.add_argument("--worker", choices=sorted(MODULES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=TINY_MODEL, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        unknown = [n for n in args.only if n not in CHECKS]
        if unknown:
            parser.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        return worker(args)
    if not args.out and os.environ.get("OUT"):
        args.out = os.environ["OUT"]
    run = Run(args)
    try:
        return run.main()
    finally:
        if run.own_work:
            shutil.rmtree(run.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
