#!/usr/bin/env bash
# SCST on a small set unlike the demo's (tools/scst_datasets.py): the demo's pipeline (convert at 256², a
# cross-entropy checkpoint from configs/cpu_smoke.toml), then configs/cpu_scst.toml from it, both scored on val
# with beam 3. Usage: tools/scst_datasets.sh STYLE OUT [SEED]   (STYLE: templates | narrative)
set -euo pipefail
STYLE=$1 OUT=$2 SEED=${3:-1}
PY=${PY:-.venv/bin/python}
capfast() { "$PY" -m capfast "$@"; }

rm -rf "$OUT"
"$PY" tools/scst_datasets.py "$STYLE" "$OUT/coco" --train 240 --val 48 --seed "$SEED"
for split in train val; do  # val: with train's vocabulary (OUT/data/vocab.json)
  capfast convert --annotations "$OUT/coco/annotations/captions_$split.json" --images "$OUT/coco/images/$split" \
    --split $split --out "$OUT/data" --image-size 256 --min-count 2
done
capfast train --config configs/cpu_smoke.toml --data "$OUT/data" --out "$OUT/xe"
capfast eval --checkpoint "$OUT/xe/last.pt" --data "$OUT/data" --split val --beam 3 --no-meteor --json "$OUT/xe.json"
time capfast train --config configs/cpu_scst.toml --data "$OUT/data" --out "$OUT/scst" init_from="$OUT/xe/last.pt"
capfast eval --checkpoint "$OUT/scst/last.pt" --data "$OUT/data" --split val --beam 3 --no-meteor --json "$OUT/scst.json"
