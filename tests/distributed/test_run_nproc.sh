#!/usr/bin/env bash
# `longnet run --nproc 2` end to end on CPU (Gloo): both ranks train, rank 1's lines come prefixed, rank 0 alone writes
# one run folder whose token count covers both ranks; a config error exits 2 before any rank starts.
set -euo pipefail
longnet=$1
config=$2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sets=(--set train.steps=2 --set train.warmup_steps=1 --set data.sequence_length=32 --set train.batch_size=2
      --set eval.batches=1 --set train.log_every=1 --set run.device=cpu --set run.output_dir="$dir/runs"
      --set run.name=dp)

"$longnet" run "$config" --nproc 2 "${sets[@]}" >"$dir/log" 2>&1 || { cat "$dir/log"; exit 1; }
grep -q '^\[rank 1\] .*step 2/2' "$dir/log" || { echo "no step line from rank 1"; cat "$dir/log"; exit 1; }
test -f "$dir/runs/dp/summary.json" || { echo "no summary.json"; exit 1; }
test ! -e "$dir/runs/dp-2" || { echo "a rank other than 0 wrote a run folder"; exit 1; }
# 2 ranks × 2 steps × batch 2 × 32 tokens
grep -q '"tokens": 256' "$dir/runs/dp/summary.json" || { echo "token count"; cat "$dir/runs/dp/summary.json"; exit 1; }
test -n "$(ls "$dir/runs/dp/checkpoints")" || { echo "no checkpoint"; exit 1; }

status=0
"$longnet" run "$config" --nproc 2 "${sets[@]}" --set train.steps=0 >"$dir/log2" 2>&1 || status=$?
test "$status" -eq 2 || { echo "config error: exit status $status, expected 2"; cat "$dir/log2"; exit 1; }
if [ "$(grep -c '^error:' "$dir/log2")" -ne 1 ]; then
  echo "expected one error line (no rank started)"
  cat "$dir/log2"
  exit 1
fi
echo "ok"
