#!/usr/bin/env bash
# Build the wheel kit that benchmarks/gpu_check.sh installs on a lent GPU machine.
#
# Why: that machine has python3 3.12 with torch/torchvision/numpy/pyarrow/pandas but no Ray,
# pydantic, Optuna or FastAPI, and it reaches no package registry. The tool that lends it carries
# at most 64 MiB of working tree, and Ray's wheel alone is 76 MiB, so Ray is repacked without the
# parts imgpipe never loads (Java jars, RLlib, the LLM library, the dashboard client's source maps).
# Output: .whl/ in the repo root (ignored by git), ~50 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${KIT:-.whl}
rm -rf "$out" && mkdir -p "$out"
py=${PYTHON:-python3}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_34_x86_64)
# Versions pinned to what this project's venv resolved, so the GPU run exercises the same code.
# Serve imports grpc_reflection at start-up; its generated code needs the grpcio and protobuf it was
# built with, so those travel too. Optuna's SQL storage (sqlalchemy, alembic) stays behind: the
# search keeps its study in memory.
pkgs=(ray pydantic pydantic-core annotated-types typing-inspection optuna
      colorlog fastapi starlette uvicorn python-multipart jsonschema jsonschema-specifications
      referencing rpds-py aiohttp-cors colorful opencensus opencensus-context opentelemetry-api
      opentelemetry-sdk opentelemetry-exporter-prometheus opentelemetry-proto
      opentelemetry-semantic-conventions smart-open tensorboardx swagger-ui-bundle-v2
      google-api-core proto-plus googleapis-common-protos google-auth pyasn1 pyasn1-modules
      safetensors pydantic-settings python-dotenv imbalanced-learn sklearn-compat
      grpcio grpcio-reflection protobuf)
for p in "${pkgs[@]}"; do
  v=$("$py" -m pip show "$p" 2>/dev/null | awk '/^Version/{print $2}')
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$out" "$p${v:+==$v}"
done
"$py" - "$out" <<'PY'
import pathlib, sys, zipfile
out = pathlib.Path(sys.argv[1])
drop = ("ray/jars/", "ray/rllib/", "ray/llm/")
skip = (".map",)  # the dashboard head refuses to start without client/build; its source maps can go
for whl in out.glob("ray-*.whl"):
    tmp = whl.with_suffix(".tmp")
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zo:
        for info in zin.infolist():
            if not info.filename.startswith(drop) and not info.filename.endswith(skip):
                zo.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(whl)
total = sum(f.stat().st_size for f in out.iterdir()) / 2**20
print(f"wheel kit: {len(list(out.iterdir()))} wheels, {total:.1f} MiB in {out}/")
PY
