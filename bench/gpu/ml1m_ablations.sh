#!/bin/bash
# Ablations on one GPU without Ray, trained concurrently in bf16 to early stopping: HM4SR's auxiliary
# losses and text stream; FAME and SASRec at dropout 0.5. Same data and usage as ml1m_converged.sh.
export PYTHONUNBUFFERED=1
B=${1:-300}
DATA=${DATA:-.device/ml1m.npz}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
run() {  # label model model_config
  timeout 440 python3 bench/ml1m_one_process.py train --data "$DATA" --models $2 --precision bf16 \
    --time-budget-s "$B" --label $1 --model-config "$3" --out "$OUT/$1.json" 2>&1 | sed "s/^/$1 /" >> "$OUT/train.log" &
}
run hm4sr_no_aux hm4sr '{"cp_weight": 0, "idcl_weight": 0, "pcl_weight": 0}'
run hm4sr_no_pcl hm4sr '{"pcl_weight": 0}'
run hm4sr_no_idcl hm4sr '{"idcl_weight": 0}'
run hm4sr_aux_0.1 hm4sr '{"cp_weight": 0.1, "idcl_weight": 0.1, "pcl_weight": 0.1}'
run hm4sr_id_no_aux hm4sr '{"modalities": ["id"], "cp_weight": 0, "idcl_weight": 0, "pcl_weight": 0}'
run fame_dropout_0.5 fame '{"dropout": 0.5, "attn_dropout": 0.5}'
run sasrec_dropout_0.5 sasrec '{"dropout": 0.5, "attn_dropout": 0.5}'
wait
grep -E "Error|Traceback" "$OUT/train.log" | head; tail -n 7 "$OUT/train.log"
