#!/usr/bin/env bash
# `longnet model summary` end to end: the per-component table of the example multimodal config, --length forms, and
# exit status 2 with one line on stderr for bad arguments or a config without a multimodal model.
#
#   tests/apps/test_model_cli.sh path/to/longnet experiments/multimodal_tiny.toml
#
# Every check prints PASS or FAIL with what it saw; the script exits 1 if any check failed.
set -uo pipefail

if [ $# -ne 2 ] || [ ! -x "$1" ] || [ ! -f "$2" ]; then
  echo "usage: $0 path/to/longnet path/to/multimodal.toml" >&2
  exit 2
fi
longnet=$1
# shellcheck source=cli_harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/cli_harness.sh"
example=$2

# The value in column $2 of the line whose first field is $1.
field() { awk -v name="$1" -v col="$2" '$1 == name { print $col }' "$tmp/out"; }

run "config check accepts the example" config check "$example"
expect_status 0

run "summary of the example" model summary "$example"
expect_status 0
for component in encoder.text stack.text encoder.image stack.image encoder.video stack.video encoder.audio \
  stack.audio fusion.concat_seq heads total; do
  expect_stdout_match "^$component +[0-9]+ "
done
expect_stdout_match 'tokens per sample: text 256, image 256, video 256, audio 256'
# The total is the sum of the components.
sum=$(awk '$1 ~ /^(encoder|stack|fusion|heads)/ { s += $2 } END { print s }' "$tmp/out")
if [ "$sum" = "$(field total 2)" ]; then pass "parameters add up to the total ($sum)"; else fail "sum $sum != total"; fi
# image encoder: 768 × 128 patch weights + 128 bias + 128 modality embedding + 2 × 64 × 128 position tables
if [ "$(field encoder.image 2)" = "114944" ]; then pass "encoder.image has 114944 parameters"; else fail "encoder.image"; fi
# 2 · 256 patches · 768 · 128
if [ "$(field encoder.image 3)" = "5.03316e+07" ]; then pass "encoder.image FLOPs"; else fail "encoder.image FLOPs"; fi
image_stack_256=$(field stack.image 3)

run "--length modality=N" model summary "$example" --length image=196 --length video=0
expect_status 0
expect_stdout_match 'tokens per sample: text 256, image 196, video 0, audio 256'
if [ "$(field stack.video 3)" = "0" ]; then pass "an absent modality costs nothing"; else fail "stack.video FLOPs"; fi
if [ "$(field stack.image 3)" != "$image_stack_256" ]; then pass "image FLOPs follow its length"; else fail "same FLOPs"; fi

run "--set picks another strategy" model summary "$example" --set fusion.strategy=bottleneck --length 64
expect_status 0
expect_stdout_match '^fusion\.bottleneck +[0-9]+ '
expect_stdout_match 'tokens per sample: text 64, image 64, video 64, audio 64'

run "bad --length" model summary "$example" --length image=many
expect_status 2
expect_one_error_line '^error: --length image=many: expected N or modality=N with an integer N >= 0$'

run "unknown modality in --length" model summary "$example" --length smell=3
expect_status 2
expect_one_error_line 'unknown modality "smell"'

run "bad strategy via --set" model summary "$example" --set fusion.strategy=average
expect_status 2
expect_one_error_line "^error: --set fusion\.strategy=average: 'fusion\.strategy' must be one of"

cat >"$tmp/text_only.toml" <<EOF2
[attention]
causal = true
[data]
corpus = ["c.txt"]
EOF2
run "a config without modalities" model summary "$tmp/text_only.toml"
expect_status 2
expect_one_error_line 'no modality is enabled'

run "model without a subcommand" model
expect_status 2

echo
if [ "$failures" -eq 0 ]; then
  echo "all model CLI checks passed"
  exit 0
fi
echo "$failures model CLI check(s) failed"
exit 1
