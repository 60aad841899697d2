#!/usr/bin/env bash
# `make demo`: the whole product on an embedded default, end to end, on whatever this machine has.
# synthetic COCO -> convert to betons -> inspect -> train a small captioner -> eval -> caption a few images.
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=${DEMO_OUT:-demo_out}
TRAIN_IMAGES=${DEMO_TRAIN_IMAGES:-800}
capfast() { "$PY" -m capfast "$@"; }

rm -rf "$OUT"
echo "== 1/5 synthetic COCO ($TRAIN_IMAGES train images) =="
capfast synth "$OUT/coco" --train "$TRAIN_IMAGES" --val 100 --seed 0 --square --shape-sizes 0.3 0.45

echo "== 2/5 convert to FFCV betons =="
capfast convert --annotations "$OUT/coco/annotations/captions_train.json" --images "$OUT/coco/images/train" \
  --split train --out "$OUT/data" --image-size 64 --min-count 2
# Each command spends seconds importing ffcv (numba compiles its typed dict) on one core: overlap two of them.
capfast convert --annotations "$OUT/coco/annotations/captions_val.json" --images "$OUT/coco/images/val" \
  --split val --out "$OUT/data" --image-size 64 > "$OUT/convert_val.log" 2>&1 &
capfast inspect "$OUT/data/train.beton"
wait $! || { cat "$OUT/convert_val.log"; exit 1; }
cat "$OUT/convert_val.log"

echo "== 3/5 train (configs/cpu_smoke.toml; on a GPU the same recipe runs there) =="
capfast train --config configs/cpu_smoke.toml --data "$OUT/data" --out "$OUT/run" ${DEMO_TRAIN_ARGS:-}

echo "== 4/5 evaluate on the validation split =="
# --no-meteor: METEOR's Java start (~10 s) does not fit the demo's 3 minutes; `capfast eval` scores it by default.
capfast eval --checkpoint "$OUT/run/last.pt" --data "$OUT/data" --split val --beam 3 --no-meteor \
  --json "$OUT/metrics.json" --results "$OUT/results.json"

echo "== 5/5 caption a few images =="
capfast caption --checkpoint "$OUT/run/last.pt" $(ls "$OUT"/coco/images/val/*.jpg | head -4)
echo "demo done: metrics in $OUT/metrics.json, TensorBoard: tensorboard --logdir $OUT/run/tb"
