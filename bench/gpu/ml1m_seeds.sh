#!/bin/bash
# Issue 15's seed runs on one GPU without Ray: each model's configuration, seeds 1..3 (the same for every
# model, so the comparisons pair), trained concurrently in bf16 to early stopping on validation NDCG@10; test
# metrics ranked and with history masked, and each test user's rank under both, in one JSON per run.
#   here:  python bench/ml1m_one_process.py export --out .device/ml1m.npz [--max-len 200 ...]
#   there: SASREC_SETTINGS='{"lr": 0.001}' FAME_MODEL_CONFIG='{"n_experts": 4}' bash bench/gpu/ml1m_seeds.sh [seconds]
# Per model <M> (SASREC, FAME, HM4SR): <M>_SETTINGS (training settings) and <M>_MODEL_CONFIG (hyper-parameters)
# as JSON over the export's; MODELS, SEEDS and EPOCHS narrow a run (a CPU check: EPOCHS=1 SEEDS=1).
# The seconds are each run's training budget: a run that reaches it is marked budget-stopped in its JSON.
export PYTHONUNBUFFERED=1
B=${1:-600}
DATA=${DATA:-.device/ml1m.npz}
OUT=${OUT:-bench/out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
epochs=() && [[ -n ${EPOCHS:-} ]] && epochs=(--epochs "$EPOCHS")
for model in ${MODELS:-sasrec fame hm4sr}; do
  upper=${model^^}
  settings_var=${upper}_SETTINGS config_var=${upper}_MODEL_CONFIG
  for seed in ${SEEDS:-1 2 3}; do
    settings=$(python3 -c "import json, sys; print(json.dumps({**json.loads(sys.argv[1]), 'seed': int(sys.argv[2]),
'monitor': 'ndcg@10'}))" "${!settings_var:-{\}}" "$seed")
    timeout $((B + 600)) python3 bench/ml1m_one_process.py train --data "$DATA" --models "$model" --precision bf16 \
      --device "$DEVICE" --time-budget-s "$B" "${epochs[@]}" --settings "$settings" \
      --model-config "${!config_var:-{\}}" --label "${model}_seed$seed" --out "$OUT/${model}_seed$seed.json" \
      2>&1 | sed "s/^/${model}_seed$seed /" >> "$OUT/seeds.log" &
  done
done
wait
grep -E "Error|Traceback" "$OUT/seeds.log" | head
python3 bench/ml1m_one_process.py table "$OUT"/*_seed*.json
