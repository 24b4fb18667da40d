#!/usr/bin/env bash
# The ML-100k study end to end, resumable: run it again to continue where it stopped (a killed sweep goes on
# with --sweep-resume, finished steps are skipped, study runs resume). Hours on 2 cores; run it in the background
# from a checkout that is not edited meanwhile, since every trial imports the code afresh:
#
#   git worktree add --detach ../study HEAD
#   mkdir -p ~/study-data/logs   # outside the work tree
#   STUDY_DATA=~/study-data setsid nohup ../study/bench/study.sh > ~/study-data/logs/study.log 2>&1 &
#
# (setsid: bench/study_pause.py stops and continues the study's session while the test suite runs.) Its state
# is the store (`runs`, `sweeps`, the runs' test ranks) and the storage folder (Tune's directories, the runs in
# flight); bench/study_ledger.py keeps both in the repository (export it, commit bench/results/study/ledger),
# and this loads it first (into a fresh store and storage folder), so the study continues on another machine
# or in another session, its trials in flight from their last checkpoints.
#
# Steps: one sweep per model (flows/tune.py: 32 trials, Optuna + ASHA, the default spaces, final seeds 1..5),
# the ablations and the authors' protocol (3 seeds) and the time-to-quality runs (bench/study_runs.py), then
# bench/study_table.py and bench/time_to_quality.py write bench/results/study.md and time_to_quality.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"  # this checkout, not the editable install's, for the driver and every Ray worker
PY="${PYTHON:-python}"
DATA="${STUDY_DATA:?set STUDY_DATA to the folder of the study store and runs}"
DB="$DATA/db" RUNS="$DATA/runs"
PROTOCOL=(--dataset ml-100k --db "$DB" --storage "$RUNS" --max-len 50 --epochs 100 --patience 10 --monitor ndcg@10)
# two trials at once, a core each: one trial's worker keeps one core busy and leaves the other idle. The
# workers keep their default thread count (1): 2 threads, whose OpenMP waits are passive, made a batch-16
# SASRec epoch slower (169 s against 125-130 s)
SWEEP=(--num-samples 32 --grace-period 5 --final-seeds 5 --sweep-seed 1 --max-concurrent 2)

"$PY" bench/study_ledger.py load --db "$DB" --storage "$RUNS" --ledger "${STUDY_LEDGER:-bench/results/study/ledger}"
for model in sasrec fame hm4sr; do
  name="study-ml100k-$model"
  [[ -f "$RUNS/$name/final_seeds.json" ]] && continue
  # resumed from Tune's directory if there is one, else from the sweep's rows in the store
  recorded=$("$PY" -c "import sys; from featurestore import store; from tuning.records import DONE, recorded_trials
print(sum(r['status'] in DONE for r in recorded_trials(store.connect(sys.argv[1]), sys.argv[2])))" "$DB" "$name")
  resume=() && [[ -f "$RUNS/$name/tuner.pkl" || $recorded -gt 0 ]] && resume=(--sweep-resume)
  flags=() && [[ $model == hm4sr ]] && flags=(--modalities id text)
  "$PY" flows/tune.py --model "$model" --sweep-name "$name" "${PROTOCOL[@]}" "${SWEEP[@]}" "${flags[@]}" "${resume[@]}"
done

rows=(fame-E1 fame-H1 fame-H1-E1 hm4sr-no-temporal hm4sr-no-interactive hm4sr-authors)
"$PY" bench/study_runs.py --db "$DB" --storage "$RUNS" --dataset ml-100k --rows "${rows[@]}" --seeds 3 --parallel 2
ttq=(ttq-sasrec-all ttq-sasrec-last ttq-fame-all ttq-fame-last ttq-hm4sr-all ttq-hm4sr-last)
"$PY" bench/study_runs.py --db "$DB" --storage "$RUNS" --dataset ml-100k --rows "${ttq[@]}" --seeds 3  # one at a time: their seconds are the result

OUT="${STUDY_RESULTS:-bench/results}"  # rerun these two from the checkout that commits the results
"$PY" bench/study_table.py --db "$DB" --storage "$RUNS" --out "$OUT/study.md" --json "$OUT/study.json" --files "$OUT/study"
"$PY" bench/time_to_quality.py --db "$DB" --storage "$RUNS" --json "$OUT/time_to_quality.json" | tee "$OUT/time_to_quality.md"
