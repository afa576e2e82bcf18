#!/usr/bin/env bash
# The device run of benchmarks/gpu_check.py (about 8 minutes on one H100; see its docstring).
#
# The device's image has torch, lightning, timm, OpenCV and pandas but not every package of this
# project: fetch the rest once, here, as wheels for its Python 3.12, and carry them:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl -r benchmarks/gpu_wheels.txt
# then run `bash benchmarks/gpu_check.sh` on the device with carry [".whl"] and a timeout of 600 s.
# What it measured comes back as $OUT/gpu_check.json (and .md, log.txt); write RESULTS.md's section
# from it with `python -m benchmarks.gpu_check --results-from .../gpu_check.json`.
set -euo pipefail
out="${OUT:-benchmarks/out/gpu_check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/log.txt"
python3 -m benchmarks.gpu_check --out "$out" --work /tmp/gpu_check_work --budget "${BUDGET:-540}" 2>&1 | tee -a "$out/log.txt"
