#!/bin/bash
# MovieLens-1M on one GPU without Ray (bench/ml1m_one_process.py): an fp16 (GradScaler) epoch of every model
# as a smoke check, then SASRec, FAME and HM4SR trained to early stopping in bf16, concurrently.
#   here:  python bench/ml1m_one_process.py export --out .device/ml1m.npz
#   there: bash bench/gpu/ml1m_converged.sh [training seconds per model]
# Results: $OUT (default bench/out) holds smoke.log, train.log and one JSON per model.
export PYTHONUNBUFFERED=1
B=${1:-360}
DATA=${DATA:-.device/ml1m.npz}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, sys; print('torch', torch.__version__, torch.cuda.get_device_name(0), sys.version.split()[0])"
timeout 150 python3 bench/ml1m_one_process.py train --data "$DATA" --epochs 1 --precision fp16 \
  --out "$OUT/smoke_fp16.json" > "$OUT/smoke.log" 2>&1
rc=$?; cat "$OUT/smoke.log"; [ $rc = 0 ] || exit 3
for m in sasrec fame hm4sr; do
  python3 bench/ml1m_one_process.py train --data "$DATA" --models $m --precision bf16 \
    --time-budget-s "$B" --out "$OUT/converged_$m.json" >> "$OUT/train.log" 2>&1 &
done
wait
grep -E "best\*" "$OUT/train.log" | tail -n 6; tail -n 4 "$OUT/train.log"
