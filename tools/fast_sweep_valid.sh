#!/usr/bin/env bash
# Re-selection of the `fast` recipe's warm-start settings on the VALID split only (docs/recipes.md).
# Each candidate changes one setting from the defaults; seed 0, width 0.125, 150 CMVAE steps, one thread each,
# two candidates at a time; the budget is set far above what 150 steps need, so --max-steps ends each run.
# `--score-splits valid` keeps the test split out of every number the choice sees.
# Usage: tools/fast_sweep_valid.sh NAME=FAST_SET [NAME=FAST_SET ...]   (FAST_SET "" = the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
run() {
  local name=${1%%=*} set=${1#*=}
  .venv/bin/cmvae-engine bench convergence polydigits --recipes fast --seeds 0 --budget-minutes 600 \
    --max-steps 150 --eval-every-steps 50 --prune-every 1 --diagnostics --score-splits valid --width 0.125 \
    --threads 1 --tag "sweep-$name" ${set:+--fast-set "$set"} > "bench/results/sweep-$name.log" 2>&1
}
while (($#)); do
  run "$1" & a=$!
  b=
  if (($# > 1)); then run "$2" & b=$!; shift; fi
  shift
  wait $a; [[ -z $b ]] || wait $b
done
