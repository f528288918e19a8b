#!/usr/bin/env bash
# rmt-deploy's GPU check (issue 23; docs/gpu.md): one command on a machine with a CUDA device, under 8 minutes.
#
#   bash benchmarks/gpu/run.sh [--dry-run] [--only cuda_tests,train_step] [--budget SECONDS]
#
# Run it from anywhere; it works from the repository root it lives in, with python3 (or $PYTHON). The
# carried wheels (benchmarks/gpu/wheels/, made by `make gpu-wheels`) are installed with
# `pip install --no-index --no-deps --target` into a temp folder put on PYTHONPATH, only those whose
# package is missing or too old here. Results go to $OUT if set, else benchmarks/results/gpu/ (a dry run
# without $OUT writes to a temp folder, so it never overwrites the committed GPU results).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO"
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
  PY="$REPO/.venv/bin/python"   # a development checkout (the device machine has no .venv: python3 there)
else
  PY=python3
fi
WALL="${GPU_CHECK_WALL:-475}"   # hard cap on the whole run, seconds (the checks' own budget is --budget, 450)
START=$SECONDS

WHEELS="$HERE/wheels"
SITE=""
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  mapfile -t NEED < <("$PY" "$HERE/pick_wheels.py" "$WHEELS")
  if ((${#NEED[@]})); then
    SITE="$(mktemp -d "${TMPDIR:-/tmp}/rmt-gpu-site.XXXXXX")"
    echo "[gpu-check] installing ${#NEED[@]} carried wheel(s) into $SITE: $(for w in "${NEED[@]}"; do basename "$w"; done | tr '\n' ' ')"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" "${NEED[@]}"; then
      echo "[gpu-check] pip could not install the carried wheels: the checks that need them will say so" >&2
    fi
  fi
else
  echo "[gpu-check] no carried wheels in $WHEELS (make gpu-wheels makes them); using what is installed"
fi
# the working tree's code first (a wheel built earlier may be stale), then the carried packages
export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

timeout -k 10 "$((WALL - (SECONDS - START)))" "$PY" "$HERE/checks.py" "$@"
rc=$?
[[ -n "$SITE" ]] && rm -rf "$SITE"
if ((rc == 124 || rc == 137)); then
  echo "[gpu-check] the whole run hit its ${WALL} s cap; results.json holds the checks that finished" >&2
fi
exit $rc
