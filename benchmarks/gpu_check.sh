#!/usr/bin/env bash
# GPU paths in one short run (≤ 5 min): NCCL DDP + AMP train, a tune trial, the bundle export,
# CUDA inference on the exported bundle and an HTTP serve request. Prints what passed.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with GPUs
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
#
# Self-contained: makes its own venv (reusing a preinstalled torch through system site packages),
# installs the project if it can (`pip install -e .`; offline it falls back to --no-deps or to
# PYTHONPATH) and reports which imports are missing instead of failing obscurely.
# Never a test dependency. Each step has its own timeout; a failed step does not stop the rest.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu-check-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
declare -a NAMES=() STATUS=() NOTES=()
START=$(date +%s)

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
record() { NAMES+=("$1"); STATUS+=("$2"); NOTES+=("${3:-}"); say "$1: $2 ${3:-}"; }
step() {  # step NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  say "--- $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  if timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1; then
    record "$name" PASS "($(( $(date +%s) - t0 ))s)"; return 0
  fi
  local rc=$?
  record "$name" FAIL "(rc $rc after $(( $(date +%s) - t0 ))s; see $LOG)"
  tail -n 25 "$LOG"
  return 1
}

cd "$REPO"
# ---------------------------------------------------------------- environment
SYS_PY="$(command -v python3 || command -v python)"
[ -n "$SYS_PY" ] || { echo "no python3 on this machine"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >>"$LOG" 2>&1 || true
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
say "python: $SYS_PY ($($SYS_PY --version 2>&1)); GPUs: $NGPU"
VENV="$OUT/venv"
if [ ! -x "$VENV/bin/python" ]; then
  # System site packages: a preinstalled CUDA torch is reused instead of downloaded.
  "$SYS_PY" -m venv --system-site-packages "$VENV" >>"$LOG" 2>&1 \
    || "$SYS_PY" -m virtualenv --system-site-packages "$VENV" >>"$LOG" 2>&1 \
    || say "cannot create a venv; using $SYS_PY directly"
fi
PY="$VENV/bin/python"; [ -x "$PY" ] || PY="$SYS_PY"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=15
if timeout 240 "$PY" -m pip install -q -e "$REPO" >>"$LOG" 2>&1; then
  record "pip install -e ." PASS
elif timeout 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e "$REPO" >>"$LOG" 2>&1; then
  record "pip install -e ." PARTIAL "(dependencies not installable here; --no-deps used)"
else
  record "pip install -e ." FAIL "(using PYTHONPATH=$REPO)"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MISSING=$("$PY" - <<'EOF' 2>>"$LOG"
import importlib
mods = ["torch", "torchvision", "ray", "ray.train", "ray.tune", "ray.serve", "ray.data",
        "optuna", "pydantic", "pyarrow", "PIL", "fastapi", "yaml", "safetensors", "sklearn",
        "jinja2", "imgpipe"]
missing = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # noqa: BLE001 - report every kind of import failure
        missing.append(f"{m} ({type(e).__name__})")
print(", ".join(missing))
EOF
)
if [ -n "$MISSING" ]; then record "imports" FAIL "missing: $MISSING"; else record "imports" PASS; fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count())" 2>&1 | tee -a "$LOG"
CUDA_N=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
WORKERS=$(( CUDA_N >= 2 ? 2 : 1 ))

export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/r-gpucheck}" RAY_DATA_DISABLE_PROGRESS_BARS=1
DATA="$OUT/data/shapes-lt"
if [ "$CUDA_N" -lt 1 ] || [ -n "$MISSING" ]; then
  record "GPU steps" SKIP "(CUDA devices: $CUDA_N; missing imports: ${MISSING:-none})"
else
  # ------------------------------------------------------------ data, train, tune, export
  step "prepare shapes-lt" 90 "$PY" jobs/prepare_data.py --dataset shapes-lt --out "$DATA" \
    --num-classes 10 --images-per-class 200
  step "train: NCCL DDP x$WORKERS + AMP" 150 "$PY" jobs/train.py --data "$DATA" --use-gpu --amp \
    --num-workers "$WORKERS" --cpus-per-worker 1 --epochs 3 --batch-size 128 \
    --out "$OUT/train" \
    && "$PY" - "$OUT/train/results.json" <<'EOF' >>"$LOG" 2>&1 \
    && record "train metrics" PASS "($(cat "$OUT/train_bal.txt"))" || record "train metrics" FAIL
import json, pathlib, sys
r = json.loads(pathlib.Path(sys.argv[1]).read_text())
assert r["config"]["use_gpu"] and r["config"]["amp"], "not a GPU/AMP run"
b = r["test"]["balanced_accuracy"]
assert b > 0.2, f"test balanced accuracy {b:.3f}: GPU training did not learn"
pathlib.Path(sys.argv[1]).parent.parent.joinpath("train_bal.txt").write_text(
    f"test balanced accuracy {b:.3f}, {len(r['history'])} epochs")
EOF
  step "tune trial on GPU + export" 180 "$PY" jobs/tune.py --data "$DATA" --dataset shapes-lt \
    --use-gpu --num-samples 1 --max-concurrent 1 --workers-per-trial 1 --cpus-per-worker 1 \
    --epochs 2 --grace-period 1 --no-report --out "$OUT/tune" --bundle-root "$OUT/bundles" \
    --bundle-name shapes-lt
  BUNDLE=$(ls -d "$OUT"/bundles/shapes-lt/v* 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$BUNDLE" ]; then
    step "CUDA inference on the bundle (= CPU)" 60 "$PY" - "$BUNDLE" "$DATA" <<'EOF'
import sys
import numpy as np
import pyarrow.parquet as pq
from imgpipe.data.shards import split_files
from imgpipe.inference import Predictor
bundle, data = sys.argv[1], sys.argv[2]
images = [bytes(b) for b in pq.read_table(split_files(data, "test")[0]).column("image").to_pylist()[:64]]
cpu, gpu = Predictor.load(bundle, "cpu"), Predictor.load(bundle, "cuda")
assert next(gpu.model.parameters()).is_cuda
a, b = cpu.predict_images(images), gpu.predict_images(images)
assert np.allclose(a, b, atol=1e-3), float(np.abs(a - b).max())
print("cuda == cpu on", len(images), "images; max |dp|", float(np.abs(a - b).max()))
EOF
    step "serve: HTTP request (jobs/serve.py --smoke)" 120 "$PY" jobs/serve.py --bundle "$BUNDLE" \
      --port 8765 --smoke
  else
    record "bundle" FAIL "(no bundle written under $OUT/bundles)"
  fi
fi

# ---------------------------------------------------------------- summary
echo
echo "gpu_check summary ($(( $(date +%s) - START )) s, log: $LOG)"
fails=0
for i in "${!NAMES[@]}"; do
  printf '  %-45s %-7s %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${NOTES[$i]}"
  [ "${STATUS[$i]}" = FAIL ] && fails=$((fails + 1))
done
exit $(( fails > 0 ))
