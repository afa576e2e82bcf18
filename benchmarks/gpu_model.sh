#!/usr/bin/env bash
# The device run of `make model` (Makefile): the shipped model trained on one GPU, the same steps
# with the AASCE films carried re-encoded and the loader, precision and calibration set for the GPU.
#
# Prepare, here, once (from the repository root; runs/ and .whl/ are ignored by git):
#   python -m data.pack_aasce --aasce ../shared/data/aasce --out runs/carry/aasce   # or: make pack-aasce
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl -r benchmarks/gpu_wheels.txt        # what the device's image lacks (see gpu_check.sh)
# What travels (the limit is 64 MiB in all; measured 2026-12-06 with `du -cb`): the repository's tracked
# files 13.7 MB (`git ls-files -z | du --files0-from=- -ch | tail -1` says 14M; 10.4 MB of it the shipped
# bundle), runs/carry/aasce 16.2 MB (481 films at most 1024 px, JPEG quality 80) and .whl 13.1 MB:
# 42.9 MB (41 MiB), untracked files that git does not ignore on top.
# What the device's image is taken to hold (its package list, /work/.library/device/KINDS.md, not
# tried on a machine yet): Python 3.12 with torch, lightning, timm, torchmetrics, safetensors, numpy,
# pandas, scipy, scikit-learn, opencv-python-headless, pillow, pyyaml, tqdm, matplotlib and onnx. What
# these steps import beyond that, counting imports inside functions: albumentations (and albucore,
# stringzilla, simsimd, pydantic), monai, jsonargparse (LightningCLI) and pydicom (data.readers): the
# wheels of benchmarks/gpu_wheels.txt. nibabel and highdicom are not imported by these steps.
#
# Run on the device: the tool's `run` with carry [".whl", "runs/carry/aasce"], timeout_s 600 and the
# command `set -o pipefail; bash benchmarks/gpu_model.sh 2>&1 | tee "$OUT/log.txt"`. The budget
# below is meant to take about 8 minutes on one H100: the two training stages stop at 2:15 and 3:00
# minutes at the latest (Lightning's max_time), plus phantom films (8 processes), start-ups,
# calibration and exports; fractures are simulated on the AASCE films beside stage 1. That is an
# estimate (no GPU was lent when this was written): timings.json gives the real seconds and
# optimizer steps. A stage cut by its time limit ends its cosine schedule early; from 80 % of the
# schedule on, the learning rate is about a tenth of its peak or less, so a late cut costs little; an
# early one means MODEL_EPOCHS / MODEL_STEPS should come down to what the GPU does in the time.
#
# What comes back in $OUT (at most 8 files; the tool copies them here):
#   bundle.tar                  the calibrated bundle, int8 weights, as the folder spine-vcf-default/
#   bundle-fp32.tar.part-*      the same checkpoint with fp32 weights, split (16 MiB a file at most)
#   logs.tar.gz                 training metrics (CSV) and configs of both stages, data, simulation and
#                               calibration summaries
#   timings.json                seconds per stage, optimizer steps, device, budget, exit status
#   log.txt                     the whole output (from the tee above)
# Install the returned bundle, here (OUT is the folder the tool names):
#   rm -rf models/bundles/spine-vcf-default && tar -xf OUT/bundle.tar -C models/bundles
#   sha256sum models/bundles/spine-vcf-default/metadata.json   # the registry's "sha256" (models/registry.json);
#       say there too, and in the card, how long it trained (timings.json)
#   mkdir -p runs/model && cat OUT/bundle-fp32.tar.part-* | tar -x -C runs/model   # runs/model/bundle-fp32
#   python -m benchmarks.shipped_model --reference runs/model/bundle-fp32
#
# Every budget is an environment variable (the GPU's defaults in brackets):
#   MODEL_EPOCHS [12] stage 1 epochs over STAGE1_FILMS [1600] 3D phantom films; STAGE1_MAX_TIME [00:00:02:15]
#   MODEL_STEPS [3000] stage 2 optimizer steps; STAGE2_MAX_TIME [00:00:03:00]
#   AASCE [runs/carry/aasce], AASCE_LIMIT [all films], SIMULATED_PER_FILM [2]
#   ACCELERATOR [gpu], PRECISION [bf16-mixed], WORKERS [14] loader and calibration workers,
#   THREADS [all cores] stage 1 threads, CALIBRATION_DEVICE [cuda], CALIBRATION_BATCH [32],
#   PYTHON [python3], WHEELS [auto: install .whl/*.whl when there are any; 0: never], OUT
#   DRY_RUN=1 prints each stage's command line and runs nothing.
# Like make model, it goes on from what runs/model already holds (phantom films, simulated films,
# checkpoints); a device machine starts without it. A CPU check of the whole path (1 min 47 s on 2
# shared cores; calibration needs fractured and normal films among the validation films, hence 96 and 24):
#   ACCELERATOR=cpu PRECISION=32-true CALIBRATION_DEVICE=cpu WORKERS=1 THREADS=1 WHEELS=0 STAGE1_FILMS=96 \
#   MODEL_EPOCHS=1 MODEL_STEPS=2 AASCE_LIMIT=24 SIMULATED_PER_FILM=1 OUT=/tmp/gpu_model bash benchmarks/gpu_model.sh
set -euo pipefail

MODEL=runs/model   # configs/shipped.yaml's paths (data, checkpoints, logs, stage 1 weights) name this folder
MODEL_NAME=${MODEL_NAME:-spine-vcf-default}
MODEL_VERSION=${MODEL_VERSION:-2.0.0}
MODEL_STORAGE=${MODEL_STORAGE:-int8}
MODEL_EPOCHS=${MODEL_EPOCHS:-12}
MODEL_STEPS=${MODEL_STEPS:-3000}
STAGE1_FILMS=${STAGE1_FILMS:-1600}
STAGE1_MAX_TIME=${STAGE1_MAX_TIME:-00:00:02:15}
STAGE2_MAX_TIME=${STAGE2_MAX_TIME:-00:00:03:00}
AASCE=${AASCE:-runs/carry/aasce}
AASCE_LIMIT=${AASCE_LIMIT:-}
SIMULATED_PER_FILM=${SIMULATED_PER_FILM:-2}
ACCELERATOR=${ACCELERATOR:-gpu}
PRECISION=${PRECISION:-bf16-mixed}
WORKERS=${WORKERS:-14}
THREADS=${THREADS:-$(nproc)}
CALIBRATION_DEVICE=${CALIBRATION_DEVICE:-cuda}
CALIBRATION_BATCH=${CALIBRATION_BATCH:-32}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-auto}
DRY_RUN=${DRY_RUN:-0}
export MODEL_EPOCHS MODEL_STEPS STAGE1_FILMS STAGE1_MAX_TIME STAGE2_MAX_TIME AASCE AASCE_LIMIT SIMULATED_PER_FILM \
    ACCELERATOR PRECISION WORKERS THREADS CALIBRATION_DEVICE CALIBRATION_BATCH   # timings.json records them
out="${OUT:-benchmarks/out/gpu_model}"
mkdir -p "$out"
timings="$out/timings.tsv"

# The trainer and loader options of a GPU run, on top of each stage's config (later options win).
pin_memory=$([ "$ACCELERATOR" = cpu ] && echo false || echo true)
gpu_args=(--trainer.accelerator "$ACCELERATOR" --data.num_workers "$WORKERS" --data.pin_memory "$pin_memory"
          --data.persistent_workers true)

# stage NAME COMMAND...: run a command from the repository root (DRY_RUN=1: print it), its
# seconds appended to timings.tsv.
stage() {
    local name=$1
    shift
    if [ "$DRY_RUN" = 1 ]; then
        echo "$name: $(printf '%q ' "$@")"
        return
    fi
    echo "[gpu_model $(date +%H:%M:%S)] $name: $*"
    local start
    start=$(date +%s%N)
    "$@"
    echo -e "$name\t$(( ($(date +%s%N) - start) / 1000000 ))" >> "$timings"
}

# Whatever happened, pack what there is into $OUT: the logs and timings of a run cut short too.
finish() {
    local status=$?
    [ "$DRY_RUN" = 1 ] && return
    set +e
    "$PYTHON" - "$timings" "$out/timings.json" "$status" <<'EOF'
import json, os, subprocess, sys
from pathlib import Path

tsv, target, status = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
seconds = {}
if os.path.exists(tsv):
    for line in open(tsv):
        name, value = line.rstrip("\n").split("\t")
        seconds[name] = round(int(value) / 1000, 1)
steps = {}
for stage, path in (("stage1", "runs/model/stage1/3d/last.ckpt"), ("stage2", "runs/model/last.ckpt")):
    try:
        from training.checkpoint import load_checkpoint
        steps[stage] = int(load_checkpoint(path).get("global_step"))
    except Exception as exc:  # a stage that never ran or failed: said, not fatal here
        steps[stage] = f"none ({exc})"
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() or "no GPU"
except OSError:
    gpu = "no GPU"
budget = {k: os.environ.get(k, "") for k in (
    "MODEL_EPOCHS", "MODEL_STEPS", "STAGE1_FILMS", "STAGE1_MAX_TIME", "STAGE2_MAX_TIME", "AASCE", "AASCE_LIMIT",
    "SIMULATED_PER_FILM", "ACCELERATOR", "PRECISION", "WORKERS", "THREADS", "CALIBRATION_DEVICE", "CALIBRATION_BATCH")}
result = {"exit_status": status, "device": gpu, "cpu_cores": os.cpu_count(), "seconds": seconds,
          "seconds_total": round(sum(seconds.values()), 1), "optimizer_steps": steps, "budget": budget,
          "note": "simulate ran beside stage 1 (its seconds overlap stage 1's)"}
target.write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result, indent=1))
EOF
    logs=()
    for path in "$MODEL"/stage1/3d/logs "$MODEL"/stage1/3d/config.yaml "$MODEL"/stage1/3d/train_info.json \
                "$MODEL"/stage1/3d/data/phantom.json "$MODEL"/simulated/simulate.json "$MODEL"/simulate.log "$MODEL"/logs \
                "$MODEL"/bundle/calibration.json "$MODEL"/bundle/README.md; do
        [ -e "$path" ] && logs+=("$path")
    done
    [ ${#logs[@]} -gt 0 ] && tar -czf "$out/logs.tar.gz" "${logs[@]}"
    if [ -f "$MODEL/bundle/metadata.json" ]; then
        tar -cf "$out/bundle.tar" -C "$MODEL" --transform "s,^bundle,$MODEL_NAME," bundle
    fi
    if [ -f "$MODEL/bundle-fp32/metadata.json" ]; then
        tar -cf "$MODEL/bundle-fp32.tar" -C "$MODEL" bundle-fp32
        split -b 15M "$MODEL/bundle-fp32.tar" "$out/bundle-fp32.tar.part-"
    fi
    rm -f "$timings"
    echo "[gpu_model] exit status $status; in $out: $(ls "$out" | tr '\n' ' ')"
}
trap finish EXIT
trap 'echo "[gpu_model] stopped by a signal" >&2; exit 143' TERM INT

export PYTHONUNBUFFERED=1
if [ "$DRY_RUN" != 1 ]; then
    : > "$timings"
    if [ "$WHEELS" != 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
        stage wheels "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    [ -f "$AASCE/filenames.csv" ] || { echo "error: $AASCE/filenames.csv: not found (carry the packed AASCE folder; see the top of this script)" >&2; exit 2; }
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

# Fractures simulated on the AASCE films need the CPU only: they run beside stage 1.
simulate=("$PYTHON" -m data.simulate --aasce "$AASCE" --out "$MODEL/simulated" --n "$SIMULATED_PER_FILM" --seed 0 --size 1024)
[ -n "$AASCE_LIMIT" ] && simulate+=(--limit "$AASCE_LIMIT")
if [ "$DRY_RUN" = 1 ]; then
    stage simulate "${simulate[@]}"
elif [ ! -f "$MODEL/simulated/manifest.csv" ]; then
    mkdir -p "$MODEL"
    stage simulate "${simulate[@]}" > "$MODEL/simulate.log" 2>&1 &
    simulate_pid=$!
fi

stage stage1 "$PYTHON" -m benchmarks.transfer --arms 3d --epochs "$MODEL_EPOCHS" --stages data,train --out "$MODEL/stage1" \
    --films "$STAGE1_FILMS" --threads "$THREADS" \
    --train-args "${gpu_args[*]} --trainer.precision $PRECISION --trainer.max_time $STAGE1_MAX_TIME"
if [ -n "${simulate_pid:-}" ]; then
    wait "$simulate_pid" || { cat "$MODEL/simulate.log"; echo "error: data.simulate failed" >&2; exit 1; }
    tail -n 1 "$MODEL/simulate.log"
fi

stage combine "$PYTHON" -m data.combine "$MODEL/stage1/3d/data/manifest.csv" "$MODEL/simulated/manifest.csv" --out "$MODEL" \
    --test-fraction-of "$MODEL/simulated/manifest.csv=0.2"
resume=()
[ -f "$MODEL/last.ckpt" ] && resume=(--ckpt_path "$MODEL/last.ckpt")
stage stage2 "$PYTHON" train.py fit --config configs/shipped.yaml --trainer.max_steps "$MODEL_STEPS" --trainer.precision "$PRECISION" \
    "${gpu_args[@]}" --trainer.max_time "$STAGE2_MAX_TIME" "${resume[@]}"
stage export "$PYTHON" -m training.export --checkpoint "$MODEL/last.ckpt" --out "$MODEL/bundle-raw" --name "$MODEL_NAME" \
    --version "$MODEL_VERSION" --storage "$MODEL_STORAGE" --overwrite
stage calibration "$PYTHON" -m calibration --model "$MODEL/bundle-raw" --manifest "$MODEL/manifest.csv" --split val \
    --out "$MODEL/bundle" --device "$CALIBRATION_DEVICE" --num-workers "$WORKERS" --batch-size "$CALIBRATION_BATCH"
# the same checkpoint with fp32 weights: what benchmarks.shipped_model --reference compares the stored precision with
stage export_fp32 "$PYTHON" -m training.export --checkpoint "$MODEL/last.ckpt" --out "$MODEL/bundle-fp32" --name "$MODEL_NAME" \
    --version "$MODEL_VERSION" --storage fp32 --overwrite
