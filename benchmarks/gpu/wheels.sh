#!/usr/bin/env bash
# make gpu-wheels: the small wheels a GPU machine may lack, into benchmarks/gpu/wheels/ (git-ignored).
#
# What the device image has is listed in /work/.library/device/KINDS.md ("Python packages already there"):
# torch, torchvision, timm, regex, huggingface-hub, safetensors, numpy, onnx, onnx-ir, onnxscript,
# onnxruntime (CPU), pytest, click, tqdm, pillow, cuda-bindings, but not open_clip_torch, ftfy (which
# open_clip's tokenizer imports at `import open_clip`) or wcwidth (ftfy's one dependency), nor rmt-deploy.
# timm is carried too, for an image whose timm is older than open_clip 3.x needs (>= 1.0.17);
# run.sh installs a wheel only when its package is missing or too old there. Versions follow this
# checkout's .venv, so the GPU run imports what the tests here ran with.
# onnxruntime-gpu (~300 MB) and tensorrt (~1 GB with libnvinfer) are far over the 64 MiB carry: not here.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
OUT="$HERE/wheels"
LIMIT_MIB=64
PACKAGES=(open_clip_torch ftfy wcwidth timm)

rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$REPO" 2>/dev/null \
  || "$PY" -m pip wheel -q --no-deps -w "$OUT" "$REPO"
specs=()
for name in "${PACKAGES[@]}"; do
  version="$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)"
  specs+=("$name${version:+==$version}")
done
# pure-Python wheels: any platform; --python-version picks what the device's Python 3.12 can install
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$OUT" "${specs[@]}"

mib() { awk -v b="$1" 'BEGIN {printf "%.2f", b / 1048576}'; }
echo "wheels in ${OUT#"$REPO"/}:"
total=0
for wheel in "$OUT"/*.whl; do
  size=$(stat -c %s "$wheel")
  total=$((total + size))
  printf '  %-56s %8s MiB\n' "$(basename "$wheel")" "$(mib "$size")"
done
printf '  %-56s %8s MiB\n' "total" "$(mib "$total")"
# what travels to the device: tracked + untracked-not-ignored files, plus these wheels (carried)
tree=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
carry=$((tree + total))
echo "carry: working tree $(mib "$tree") MiB + wheels $(mib "$total") MiB = $(mib "$carry") MiB (limit $LIMIT_MIB MiB)"
if ((carry > LIMIT_MIB * 1048576)); then
  echo "over the ${LIMIT_MIB} MiB carry: drop a wheel or shrink the tree" >&2
  exit 1
fi
