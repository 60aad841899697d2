#!/usr/bin/env bash
# The GPU checks, as one script for a device session. On the device machine, from the project root:
#   source .devbundle/setup.sh; OUT=$OUT bash tools/gpu_check.sh
# (prepare .devbundle here first with `bash ../shared/device/prepare.sh`; carry [".devbundle"]).
# Makes 256x256 synthetic betons, runs the GPU tests, the loader benchmark (nvJPEG vs DataLoader+PIL) and the
# train benchmark matrix (real loader vs resident batch; fp32 / bf16 / bf16+compile). Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
N=${N:-6000}
PY=${PY:-python3}
mkdir -p "$OUT"
step() { echo; echo "== $* ($(date +%T))"; }

step environment
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
for module in cv2 tqdm psutil pycocotools pycocoevalcap pytest torchcodec; do
  $PY -c "import $module" 2>/dev/null && echo "$module: ok" || echo "$module: missing"
done

step "synthetic data: $N train images stored at 256x256"
$PY -m capfast synth "$OUT/coco" --train "$N" --val 500 --seed 0 > /dev/null
for split in train val; do
  $PY -m capfast convert --annotations "$OUT/coco/annotations/captions_$split.json" --images "$OUT/coco/images/$split" \
    --split "$split" --out "$OUT/data" --image-size 256 --min-count 1 2>&1 | tail -1
done

step "GPU tests"
$PY -m pytest -q -m gpu tests 2>&1 | tail -15 || echo "pytest unavailable"

step "loader: nvJPEG + GPU crops vs DataLoader + PIL (batch 256, 224 crops)"
$PY -m capfast bench loader --data "$OUT/data/train.beton" --device cuda --batch-size 256 --batches 40 --baseline 2>&1 | tail -4

step "train: ResNet-50 + Transformer, batch 256, encoder trained (loader efficiency, precision matrix)"
$PY -m capfast bench train --config configs/coco_r50_transformer.toml --data "$OUT/data" --steps 30 --matrix \
  model.encoder_weights=random encoder_trainable_from_epoch=0 eval.every_epochs=0 2>&1 | tail -6
