#!/usr/bin/env bash
# `longnet run --nproc 2` end to end on CPU (Gloo): both ranks train, rank 1's lines come prefixed, rank 0 alone writes
# one run folder whose token count covers both ranks; a config error exits 2 before any rank starts. With
# train.sequence_parallel = 2 the two ranks split each sequence and train exactly as one process does: the same
# losses (float32, so to 1e-4 relative). A resumed two-rank run ends with the uninterrupted run's loss.
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
# Sequence parallelism: one process against two ranks that split each sequence (same seed, same windows).
final_loss() { sed -n 's/.*"final_train_loss": *\([-0-9.eE+]*\).*/\1/p' "$1"; }
"$longnet" run "$config" "${sets[@]}" --set run.name=one >"$dir/log3" 2>&1 || { cat "$dir/log3"; exit 1; }
"$longnet" run "$config" --nproc 2 "${sets[@]}" --set run.name=sp --set train.sequence_parallel=2 >"$dir/log4" 2>&1 ||
  { cat "$dir/log4"; exit 1; }
grep -q 'sequence parallel: 2 ranks split each sequence (this rank: 16 of 32 tokens)' "$dir/log4" ||
  { echo "no sequence-parallel line"; cat "$dir/log4"; exit 1; }
grep -q '"tokens": 128' "$dir/runs/sp/summary.json" || { echo "sp token count"; cat "$dir/runs/sp/summary.json"; exit 1; }
one=$(final_loss "$dir/runs/one/summary.json")
sp=$(final_loss "$dir/runs/sp/summary.json")
awk -v a="$one" -v b="$sp" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a > 0 && d <= 1e-4 * a) }' ||
  { echo "final train loss: one process $one, sequence parallel $sp"; exit 1; }
echo "final train loss: one process $one, sequence parallel $sp"

# Sequence × data: 4 ranks, 2 data groups of 2 ranks splitting each sequence; both groups' windows count.
"$longnet" run "$config" --nproc 4 "${sets[@]}" --set run.name=sp_dp --set train.sequence_parallel=2 >"$dir/log6" 2>&1 ||
  { cat "$dir/log6"; exit 1; }
grep -q '2 data-parallel groups' "$dir/log6" || { echo "no data-parallel groups line"; cat "$dir/log6"; exit 1; }
grep -q '^\[rank 3\] .*step 2/2' "$dir/log6" || { echo "no step line from rank 3"; cat "$dir/log6"; exit 1; }
grep -q '"tokens": 256' "$dir/runs/sp_dp/summary.json" || { echo "sp_dp token count"; exit 1; }

# Resuming a data-parallel run: each data group draws the windows the uninterrupted run drew (final loss equal).
"$longnet" run "$config" --nproc 2 "${sets[@]}" --set run.name=whole --set train.steps=4 --set train.checkpoint_every=2 \
  >"$dir/log7" 2>&1 || { cat "$dir/log7"; exit 1; }
mkdir -p "$dir/cut/checkpoints"
cp "$dir/runs/whole/config.toml" "$dir/cut/"
cp "$dir/runs/whole/checkpoints/step_00000002.pt" "$dir/cut/checkpoints/"
"$longnet" run --resume "$dir/cut" --nproc 2 >"$dir/log8" 2>&1 || { cat "$dir/log8"; exit 1; }
whole=$(final_loss "$dir/runs/whole/summary.json")
resumed=$(final_loss "$dir/cut/summary.json")
test -n "$whole" && test "$whole" = "$resumed" ||
  { echo "final train loss: uninterrupted $whole, resumed $resumed"; exit 1; }

status=0
"$longnet" run "$config" --nproc 2 "${sets[@]}" --set train.sequence_parallel=3 >"$dir/log5" 2>&1 || status=$?
test "$status" -eq 2 || { echo "sequence_parallel 3 on 2 ranks: exit status $status, expected 2"; cat "$dir/log5"; exit 1; }
grep -q 'train.sequence_parallel = 3 must divide the number of ranks' "$dir/log5" || { cat "$dir/log5"; exit 1; }
echo "ok"
