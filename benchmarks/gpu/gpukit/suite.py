"""Check 1: the suite's CUDA tests, the ones that skip on the CPU machines.

The files: tests/runtime/test_gpu.py, tests/export/test_tensorrt.py and any other test file that
marks a test `gpu`; the selection: `-m gpu` (their CPU tests run in CI already). Counts and every
skip and failure message come from pytest's JUnit XML. On a CPU (the dry run) the same selection
is only collected.
"""
from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from gpukit.common import FAIL, PASS, Context, result

KNOWN = ("tests/runtime/test_gpu.py", "tests/export/test_tensorrt.py")
_MARK = re.compile(r"pytest\.mark\.gpu\b")


def gpu_test_files(repo: Path) -> list[str]:
    """KNOWN plus every test file that uses pytest.mark.gpu, relative to the repo, sorted."""
    found = {p for p in KNOWN if (repo / p).is_file()}
    for path in (repo / "tests").rglob("test_*.py"):
        if _MARK.search(path.read_text(errors="replace")):
            found.add(str(path.relative_to(repo)))
    return sorted(found)


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes (with the skip / failure message) from a JUnit XML file."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "").strip().splitlines()[0][:300] \
                    if (child.get("message") or child.text) else ""
                break
        cases.append({"test": name, "outcome": outcome, "message": message, "seconds": float(case.get("time") or 0)})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": cases}


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(ctx: Context) -> dict[str, Any]:
    files = gpu_test_files(ctx.repo)
    base = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rs", *files]
    if not ctx.cuda:
        done = subprocess.run([*base, "--collect-only"], cwd=ctx.repo, capture_output=True, text=True, check=False)
        ctx.log(done.stdout + done.stderr)
        selected = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", done.stdout)
        count = int(selected.group(1)) if selected else None
        if done.returncode not in (0, 5) or not count:
            return result(FAIL, f"collecting the CUDA tests failed (pytest rc {done.returncode}): "
                                f"{_tail(done.stdout + done.stderr, 3)}", files=files)
        return result(PASS, f"collected {count} gpu-marked tests in {len(files)} files (not run: no CUDA device)",
                      files=files, collected=count)
    junit = ctx.work / "cuda_tests.xml"
    done = subprocess.run([*base, f"--junitxml={junit}"], cwd=ctx.repo, capture_output=True, text=True, check=False)
    ctx.log(done.stdout + done.stderr)
    if not junit.is_file():
        return result(FAIL, f"pytest wrote no report (rc {done.returncode}): {_tail(done.stdout + done.stderr, 3)}",
                      files=files, rc=done.returncode)
    report = parse_junit(junit)
    counts = report["counts"]
    ran = counts["passed"] + counts["failed"] + counts["error"]
    skips = sorted({c["message"] for c in report["tests"] if c["outcome"] == "skipped"})
    text = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no tests"
    bad = [c for c in report["tests"] if c["outcome"] in ("failed", "error")]
    figures = dict(files=files, rc=done.returncode, **report, skip_reasons=skips)
    if bad:
        first = bad[0]
        return result(FAIL, f"{text}; first: {first['test']}: {first['message']}", **figures)
    if not ran:
        return result(FAIL, f"{text}: every CUDA test skipped on a CUDA machine ({'; '.join(skips)[:300]})", **figures)
    return result(PASS, text + (f" (skips: {'; '.join(skips)[:300]})" if skips else ""), **figures)
