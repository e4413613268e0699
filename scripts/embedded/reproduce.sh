#!/usr/bin/env bash
# Reproduce the embedded model from nothing, in one command (every step resumes after an interruption):
#
#   bash scripts/embedded/reproduce.sh            # from the repository root, with .venv installed
#
# 1. the model folder: Wan2.1 I2V classes at the embedded size + a PatchCodec fitted on the world
#                                          -> outputs/embedded-model
# 2. training data: `omnitransfer synth` (train split, all five tasks), then `omnitransfer prepare`
#                                          -> outputs/embedded-data, outputs/embedded-cache
# 3. the DiT: `omnitransfer train --config configs/embedded.yaml` -> outputs/embedded-dit (model/ at the end)
# 4. guidance and flow shift chosen on validation samples (scripts/embedded/choose_sampler.py), then a look
#    at it and its scores: `omnitransfer demo` (per-task pictures) and `omnitransfer benchmark transfer`
#                                          -> outputs/embedded-dit/demo, outputs/embedded-dit/benchmark.json
# 5. install it as the package's embedded model  -> src/omnitransfer/embedded
#
# Knobs (environment): THREADS (default 1: the machine is shared),
# COUNT (training samples per task, 600), DIT_STEPS (the config's steps unless set), DEVICE (cpu; cuda
# for prepare and train when a GPU is at hand).
set -euo pipefail
cd "$(dirname "$0")/../.."

THREADS=${THREADS:-1}
COUNT=${COUNT:-600}
DEVICE=${DEVICE:-cpu}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
PY=${PY:-.venv/bin/python}
OMNI=("$PY" -m omnitransfer.cli)
OUT=outputs

log() { echo "[$(date +%H:%M:%S)] $*"; }

# 1. model folder (the codec is fitted in seconds)
if [ ! -f $OUT/embedded-model/omnitransfer.json ]; then
  log "model folder"
  "$PY" scripts/embedded/build_model.py --output $OUT/embedded-model
fi

# 2. data (synth refuses to write samples a manifest already lists: skip when complete)
if [ ! -f $OUT/embedded-data/.complete ]; then
  log "synth: $COUNT samples per task"
  rm -rf $OUT/embedded-data
  "${OMNI[@]}" synth --task all --split train --count "$COUNT" --output $OUT/embedded-data --quiet
  touch $OUT/embedded-data/.complete
fi
log "prepare (resumes complete shards)"
"${OMNI[@]}" prepare --manifest $OUT/embedded-data/manifest.jsonl --model $OUT/embedded-model \
    --output $OUT/embedded-cache --device "$DEVICE" --quiet

# 3. DiT
RESUME=()
if compgen -G "$OUT/embedded-dit/checkpoints/step-*" > /dev/null; then RESUME=(--resume); fi
SET=()
if [ -n "${DIT_STEPS:-}" ]; then SET=(--set "stages=[{name: dit, steps: $DIT_STEPS, trainable: all}]"); fi
log "train"
"${OMNI[@]}" train --config configs/embedded.yaml --output $OUT/embedded-dit "${RESUME[@]}" "${SET[@]}"

# 4. sampler settings (guidance, flow shift) chosen on validation samples, then a look at it
log "sampler settings, demo and benchmark"
"$PY" scripts/embedded/choose_sampler.py --model $OUT/embedded-dit/model --write
"${OMNI[@]}" demo --model $OUT/embedded-dit/model --output $OUT/embedded-dit/demo --photo samples/camera_ref1.jpg
"${OMNI[@]}" benchmark transfer --model $OUT/embedded-dit/model --output $OUT/embedded-dit/benchmark.json

# 5. ship it: the package's embedded model (what `omnitransfer generate` uses without --model)
"$PY" scripts/embedded/install.py --model $OUT/embedded-dit/model
log "done"
