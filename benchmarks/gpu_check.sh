#!/usr/bin/env bash
# GPU paths that CI cannot run (NCCL DDP, AMP, GPU export, CUDA serving), in one short script for a
# lent GPU machine. Never a test dependency. Prints one PASS/FAIL line per stage and a summary.
#
#   bash benchmarks/gpu_kit.sh              # here, once: wheels for what the GPU machine lacks
#   bash benchmarks/gpu_check.sh [OUTDIR]   # there (the kit travels in .whl/)
#   STAGES="cuda_predict serve_http" BUNDLE=path/v1 bash benchmarks/gpu_check.sh   # a rerun of two
#   SERVE_GPUS=0 ...                        # serve stage's replicas on the CPU (a dry run here)
#
# Stages: DDP+AMP train on shapes-lt (NCCL; 2 ranks when 2 GPUs, else 1), a one-trial GPU tune with
# export and verification, CUDA inference equal to CPU, two replicas on the GPU answering a
# prediction over HTTP. Exit: failed stage count.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu-check}}   # logs only: a lent machine returns at most 8 files
work=${WORK:-/tmp/gpu-check-work}  # data, runs and bundles
mkdir -p "$out" "$work"
log() { echo "[gpu_check $(date +%T)] $*"; }
kit=${KIT:-.whl}
if [ -d "$kit" ] && ! python3 -c "import ray, pydantic, pydantic_settings, optuna, imblearn, grpc_reflection" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$kit"/*.whl >"$out/pip.log" 2>&1 || { log "wheel install failed"; tail "$out/pip.log"; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} RAY_DATA_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
python3 -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'ray', ray.__version__)" || exit 99
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
workers=$(( ngpu >= 2 ? 2 : 1 ))
declare -A result
stages=${STAGES:-prepare train_ddp_amp tune_export cuda_predict serve_http}  # a subset reruns those
stage() {  # stage NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  [[ " $stages " == *" $name "* ]] || return 0
  log "start $name: $*"
  if timeout "$t" "$@" >"$out/$name.log" 2>&1; then result[$name]=PASS; else result[$name]="FAIL(rc=$?)"; fi
  tail -n 15 "$out/$name.log"; log "$name: ${result[$name]}"
}
stage prepare 90 python3 jobs/prepare_data.py --dataset shapes-lt --num-classes 10 --images-per-class 300 \
  --imbalance-ratio 50 --out "$work/data/shapes-lt"
stage train_ddp_amp 180 python3 jobs/train.py --data "$work/data/shapes-lt" --num-workers "$workers" --use-gpu --amp \
  --cpus-per-worker 2 --epochs 3 --batch-size 128 --model resnet18 --out "$work/train"
stage tune_export 200 python3 jobs/tune.py --data "$work/data/shapes-lt" --dataset shapes-lt --num-samples 1 --max-concurrent 1 --epochs 2 \
  --use-gpu --cpus-per-worker 2 --out "$work/tune" --bundle-root "$work/bundles"
bundle=${BUNDLE:-$(ls -d "$work"/bundles/*/v* 2>/dev/null | tail -n 1)}  # BUNDLE: one made elsewhere
stage cuda_predict 60 python3 - "$bundle" <<'PY'
import io, sys, numpy as np, torch
from PIL import Image
from imgpipe.inference import Predictor
rng = np.random.default_rng(0)
images = []
for _ in range(8):
    buf = io.BytesIO(); Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    images.append(buf.getvalue())
gpu, cpu = Predictor.load(sys.argv[1], device="cuda"), Predictor.load(sys.argv[1], device="cpu")
assert next(gpu.model.parameters()).is_cuda
pg, pc = gpu.predict_images(images), cpu.predict_images(images)
print("max |p_cuda - p_cpu| =", float(np.abs(pg - pc).max()))
assert np.allclose(pg, pc, atol=1e-3), "CUDA and CPU probabilities differ"
PY
# Two replicas on half a GPU each answer one POST /v1/predict. The GPU's used
# memory while they serve shows the replicas hold CUDA contexts (gVisor hides per-process use).
stage serve_http 150 python3 - "$bundle" <<'PY'
import io, json, os, subprocess, sys, urllib.request
from PIL import Image
def used_mib():
    q = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    return sum(int(x) for x in subprocess.run(q, capture_output=True, text=True).stdout.split())
before = used_mib()
job = subprocess.Popen([sys.executable, "jobs/serve.py", "--bundle", sys.argv[1], "--num-gpus", os.environ.get("SERVE_GPUS", "0.5"),
                        "--port", "8123"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
try:
    for line in job.stdout:  # the job prints "serving " once the replicas are ready
        print(line, end="")
        if line.startswith("serving "):
            break
    buf = io.BytesIO(); Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, "PNG")
    req = urllib.request.Request("http://127.0.0.1:8123/v1/predict", data=buf.getvalue(),
                                 headers={"Content-Type": "image/png"})
    top = json.loads(urllib.request.urlopen(req, timeout=30).read())["predictions"][0]["top_k"][0]
    print("POST /v1/predict:", top)
    during = used_mib()
    job.send_signal(2)  # Ctrl-C: the job deletes the app and stops Ray
    print(job.communicate(timeout=60)[0][-1500:])
finally:  # never leave the job holding the port and the GPU
    if job.poll() is None:
        job.send_signal(2)
        try:
            job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            job.kill()
print(f"GPU memory used: {before} MiB before serving, {during} MiB while serving")
assert job.returncode == 0, f"serve job exited {job.returncode}"
assert during - before >= 200, "the replicas did not take GPU memory"
PY
fails=0
echo; echo "== gpu_check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $ngpu GPU) =="
for k in $stages; do
  echo "  $k: ${result[$k]:-SKIPPED}"; [ "${result[$k]:-}" = PASS ] || fails=$((fails + 1))
done
exit $fails
