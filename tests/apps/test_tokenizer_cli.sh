#!/usr/bin/env bash
# `longnet tokenizer` end to end: training from text files and from a manifest's captions, encode and decode
# round trips, special tokens, and exit statuses with one clear line on stderr for each mistake.
#
#   tests/apps/test_tokenizer_cli.sh path/to/longnet
#
# Every check prints PASS or FAIL with what it saw; the script exits 1 if any check failed.
set -uo pipefail

if [ $# -ne 1 ] || [ ! -x "$1" ]; then
  echo "usage: $0 path/to/longnet (an executable)" >&2
  exit 2
fi
longnet=$1
# shellcheck source=cli_harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/cli_harness.sh"

# ---- fixtures: captions in the demo dataset's style -------------------------------------------------------------
for count in one two three; do
  for colour in red green blue yellow white; do
    for dir in left right up down; do
      echo "$count $colour squares moving $dir"
      echo "a video of $count $colour bars moving $dir on a dark background"
    done
  done
done >"$tmp/corpus.txt"
{
  echo '{"id": "a", "video": "missing.mp4", "text": "two red squares moving left"}'
  i=0
  while read -r line; do
    i=$((i + 1))
    echo "{\"id\": \"s$i\", \"split\": \"train\", \"text\": [\"$line\"]}"
  done <"$tmp/corpus.txt"
} >"$tmp/manifest.jsonl"

# ---- train from text files --------------------------------------------------------------------------------------
run "train from a file" tokenizer train --input "$tmp/corpus.txt" --output "$tmp/models/spm" --vocab-size 40
expect_status 0
expect_file "$tmp/models/spm.model"
expect_file "$tmp/models/spm.vocab"
expect_stdout_line "wrote $tmp/models/spm.model and $tmp/models/spm.vocab (40 pieces, unigram)"
if [ "$(wc -l <"$tmp/models/spm.vocab")" -eq 40 ]; then pass "40 lines in the .vocab"; else fail "vocab lines"; fi
if [ "$(sed -n 5p "$tmp/models/spm.vocab" | cut -f1)" = "<video>" ]; then
  pass "<video> is id 4"
else
  fail "<video> is not the fifth piece"
fi

run "encode" tokenizer encode --model "$tmp/models/spm.model" "<video> two red squares moving left"
expect_status 0
ids=$(cat "$tmp/out")
if [ -n "$ids" ] && echo "$ids" | grep -qE '^[0-9]+( [0-9]+)*$'; then pass "ids: $ids"; else fail "no ids"; fi
if echo " $ids " | grep -q ' 4 '; then pass "<video> encodes to id 4"; else fail "id 4 missing from '$ids'"; fi

# shellcheck disable=SC2086  # the ids are separate arguments
run "decode the encoded ids" tokenizer decode --model "$tmp/models/spm.model" $ids
expect_status 0
expect_stdout_line "<video> two red squares moving left"

run "encode with BOS and EOS" tokenizer encode --model "$tmp/models/spm.model" --bos --eos one red bar
expect_status 0
if grep -qE '^1 .* 2$' "$tmp/out"; then pass "framed by 1 ... 2"; else fail "not framed by BOS/EOS ids"; fi

run "encode pieces" tokenizer encode --model "$tmp/models/spm.model" --pieces "<audio> moving"
expect_status 0
if grep -qF '<audio>' "$tmp/out"; then pass "<audio> is one piece"; else fail "no <audio> piece"; fi

run "bpe with own special tokens" tokenizer train --input "$tmp/corpus.txt" --output "$tmp/models/bpe" \
  --vocab-size 70 --model-type bpe --special "<sep>,<cls>" --seed 3 --threads 2
expect_status 0
if [ "$(sed -n 5,6p "$tmp/models/bpe.vocab" | cut -f1 | tr '\n' ' ')" = "<sep> <cls> " ]; then
  pass "<sep> and <cls> are ids 4 and 5"
else
  fail "special tokens not at ids 4, 5"
fi

# ---- train from a manifest's captions (the media files need not exist) ------------------------------------------
run "train from a manifest" tokenizer train --manifest "$tmp/manifest.jsonl" --output "$tmp/models/cap" \
  --vocab-size 40 --no-special
expect_status 0
expect_file "$tmp/models/cap.model"
run "encode with the manifest model" tokenizer encode --model "$tmp/models/cap.model" --pieces "two red squares"
expect_status 0
if grep -qF '<video>' "$tmp/models/cap.vocab"; then fail "--no-special still added <video>"; else pass "no separators"; fi

# ---- mistakes ---------------------------------------------------------------------------------------------------
run "missing input file" tokenizer train --input "$tmp/absent.txt" --output "$tmp/models/x" --vocab-size 60
expect_status 2
expect_one_error_line 'absent\.txt: tokenizer training input does not exist'
expect_absent "$tmp/models/x.model"

run "vocabulary too large for the text" tokenizer train --input "$tmp/corpus.txt" --output "$tmp/models/x" \
  --vocab-size 5000
expect_status 1
expect_one_error_line 'corpus\.txt: cannot train a unigram tokenizer of 5000 pieces: .*Vocabulary size too high'
expect_absent "$tmp/models/x.model"
expect_absent "$tmp/models/x.vocab"

run "unknown model type" tokenizer train --input "$tmp/corpus.txt" --output "$tmp/models/x" --vocab-size 60 \
  --model-type trigram
expect_status 2
expect_one_error_line "model type 'trigram'"

run "input and manifest together" tokenizer train --input "$tmp/corpus.txt" --manifest "$tmp/manifest.jsonl" \
  --output "$tmp/models/x" --vocab-size 60
expect_status 2

run "neither input nor manifest" tokenizer train --output "$tmp/models/x" --vocab-size 60
expect_status 2
expect_one_error_line 'give either --input'

echo '{"id": "a", "txt": "x"}' >"$tmp/bad.jsonl"
run "bad manifest" tokenizer train --manifest "$tmp/bad.jsonl" --output "$tmp/models/x" --vocab-size 60
expect_status 1
expect_one_error_line "bad\.jsonl:1: key 'txt': unknown key \(did you mean 'text'\?\)"

run "missing model" tokenizer encode --model "$tmp/models/none.model" hello
expect_status 2
expect_one_error_line 'none\.model: tokenizer model does not exist'

run "id outside the vocabulary" tokenizer decode --model "$tmp/models/spm.model" 3 40
expect_status 1
expect_one_error_line 'spm\.model: id 40 is outside the vocabulary \[0, 40\)'

run "tokenizer without a subcommand" tokenizer
expect_status 2

if [ "$failures" -gt 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all checks passed"
