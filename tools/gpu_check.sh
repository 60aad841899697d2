#!/usr/bin/env bash
# The GPU checks, as one script for a device session: every figure of issue #8's "Done when" in one run.
# On the device machine, from the project root:
#   source .devbundle/setup.sh; OUT=$OUT bash tools/gpu_check.sh
# (prepare .devbundle here first with `bash ../shared/device/prepare.sh`; carry [".devbundle"]).
# About 8 minutes on one H100 with N=4000; PARTS picks steps, e.g. PARTS="data loader" then PARTS="tests train run"
# to split it over two commands (data stays under $OUT).
#   data    textured synthetic COCO (photo-like, ~19 KB per stored JPEG) converted at 256x256 q90
#   tests   pytest -m gpu
#   loader  bench loader --device cuda, batch 256: img/s, the same-run decode ceiling, the fraction, mean KB
#   train   bench train --matrix, ResNet-50 + Transformer batch 256: real loader vs resident batch efficiency
#   run     a short `capfast train`: median TensorBoard perf/data_wait_ms and perf/step_time_ms after warm-up
#   features `capfast features` img/s (ResNet-50 and ViT-B/16, bf16, random weights) and `capfast bench features`
#           (steps/s from the cache / on the fly, the cache's read rate against the decoder's consumption)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
N=${N:-4000}
PY=${PY:-python3}
PARTS=${PARTS:-"data tests loader train run features"}
RUN_STEPS=${RUN_STEPS:-120}
WARMUP_STEPS=${WARMUP_STEPS:-20}
DATA="$OUT/data"
RECIPE=${RECIPE:-configs/coco_r50_transformer.toml}
NO_DOWNLOAD=(model.encoder_weights=random encoder_trainable_from_epoch=0 eval.every_epochs=0)
mkdir -p "$OUT"
step() { echo; echo "== $* ($(date +%T))"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }

step environment
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
for module in cv2 tqdm psutil pycocotools pycocoevalcap pytest tensorboard torchcodec; do
  $PY -c "import $module" 2>/dev/null && echo "$module: ok" || echo "$module: missing"
done
nproc; cat /proc/loadavg

if want data; then
  step "data: $N textured train images, stored at 256x256 q90"
  $PY -m capfast synth "$OUT/coco" --train "$N" --val 128 --seed 0 --textured > /dev/null
  for split in train val; do
    $PY -m capfast convert --annotations "$OUT/coco/annotations/captions_$split.json" \
      --images "$OUT/coco/images/$split" --split "$split" --out "$DATA" --image-size 256 --min-count 1 2>&1 | tail -1
  done
  $PY -m capfast inspect "$DATA/train.beton" | grep -E "records|stored JPEG"
fi

if want tests; then
  step "GPU tests"
  $PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -25
fi

if want loader; then
  step "loader: nvJPEG + GPU crops, producer thread, batch 256, 224 crops (target >= 20,000 img/s, >= 0.85 of ceiling)"
  $PY -m capfast bench loader --data "$DATA/train.beton" --device cuda --batch-size 256 --batches 40 2>&1 | tail -5
fi

if want train; then
  step "train: real loader vs resident batch, batch 256 (target efficiency >= 0.97 ResNet-50, >= 0.95 ResNet-18)"
  $PY -m capfast bench train --config "$RECIPE" --data "$DATA" --steps 30 --matrix "${NO_DOWNLOAD[@]}" 2>&1 | tail -14
fi

if want run; then
  step "capfast train: $RUN_STEPS steps, TensorBoard medians after $WARMUP_STEPS steps (target data wait < 1 ms)"
  rm -rf "$OUT/run"
  $PY -m capfast train --config "$RECIPE" --data "$DATA" --out "$OUT/run" "${NO_DOWNLOAD[@]}" \
    max_steps="$RUN_STEPS" checkpoint_every=100000 2>&1 | grep -v "it/s\|step/s" | tail -5
  $PY - "$OUT/run" "$WARMUP_STEPS" <<'EOF'
import glob, statistics, sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run_dir, warmup = sys.argv[1], int(sys.argv[2])
series = {}
for path in sorted(glob.glob(f"{run_dir}/tb/events.*")):
    events = EventAccumulator(path, size_guidance={"scalars": 0})
    events.Reload()
    for tag in events.Tags()["scalars"]:
        if tag.startswith("perf/"):
            series.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
for tag, values in sorted(series.items()):
    steady = [v for step, v in sorted(values.items()) if step > warmup]
    if steady:
        print(f"{tag}: median {statistics.median(steady):.2f} over {len(steady)} steps after {warmup} "
              f"(max {max(steady):.2f})")
EOF
fi

if want features; then
  step "features: capfast features img/s, bf16, batch 256 (ResNet-50, then ViT-B/16; random weights)"
  for encoder in resnet50 vit_b_16; do
    rm -rf "$DATA/features/gpu_$encoder"
    /usr/bin/time -f "%e s wall" $PY -m capfast features --data "$DATA" --name "gpu_$encoder" --encoder "$encoder" \
      --encoder-weights random --image-size 224 --split train --batch-size 256 2>&1 | tail -2
  done
  step "bench features: train steps/s from the cache / the frozen trunk on the fly (batch 256, bf16)"
  $PY -m capfast bench features --data "$DATA" --recipes r50,vitb16 --batch-size 256 --steps 20 --warmup 5 \
    precision=bf16 2>&1 | tail -3
fi
