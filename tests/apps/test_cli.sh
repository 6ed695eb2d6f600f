#!/usr/bin/env bash
# The `longnet` command end to end: exit statuses (0 ok, 2 config or usage error), one clear line on stderr for a
# config error, nothing written on a config error, and `config print` showing the resolved config.
#
#   tests/apps/test_cli.sh path/to/longnet
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

# ---- fixtures ---------------------------------------------------------------------------------------------------
mkdir -p "$tmp/configs/common"
printf 'the quick brown fox jumps over the lazy dog\n' >"$tmp/corpus.txt"
cat >"$tmp/configs/good.toml" <<EOF
[run]
name = "cli_test"
output_dir = "$tmp/runs"

[model]
width = 32
depth = 1
heads = 4
max_length = 64

[attention]
segment_lengths = [16, 32]
dilation_rates = [1, 2]
causal = true

[data]
corpus = ["$tmp/corpus.txt"]
sequence_length = 32

[train]
steps = 3
warmup_steps = 1
EOF
# Line 7, column 22: the dilation rate 0.
cat >"$tmp/configs/bad.toml" <<EOF
[run]
output_dir = "$tmp/runs"

[attention]
causal = true
segment_lengths = [16, 32]
dilation_rates = [1, 0]

[data]
corpus = ["$tmp/corpus.txt"]
EOF
cat >"$tmp/configs/common/base.toml" <<EOF
[model]
width = 48
heads = 6
max_length = 128

[attention]
causal = true

[data]
corpus = ["$tmp/corpus.txt"]
sequence_length = 64

[train]
steps = 40
lr = 0.25
EOF
cat >"$tmp/configs/child.toml" <<EOF
base = "common/base.toml"

[train]
steps = 11
EOF

# ---- usage ------------------------------------------------------------------------------------------------------
run "--help" --help
expect_status 0
expect_stdout_match 'run'

run "--version" --version
expect_status 0
expect_stdout_match '^torch [0-9]+\.[0-9]+'
expect_stdout_match '^longnet [0-9]+\.[0-9]+'

run "unknown subcommand" frobnicate
expect_status 2

run "no subcommand"
expect_status 2

run "config without check/print" config
expect_status 2

run "unknown log level" --log-level loud config check "$tmp/configs/good.toml"
expect_status 2
expect_one_error_line 'log level'

# ---- config check -----------------------------------------------------------------------------------------------
run "config check: valid file" config check "$tmp/configs/good.toml"
expect_status 0
expect_stdout_line "$tmp/configs/good.toml: ok"

run "config check: invalid file" config check "$tmp/configs/bad.toml"
expect_status 2
expect_one_error_line "bad\.toml:7:22: 'attention\.dilation_rates\[1\]' must be >= 1, got 0"
expect_stdout_empty

run "config check: missing file" config check "$tmp/configs/absent.toml"
expect_status 2
expect_one_error_line 'absent\.toml: cannot read config file'

run "config check: unknown key via --set" config check "$tmp/configs/good.toml" --set train.stpes=5
expect_status 2
expect_one_error_line "^error: --set train\.stpes=5: unknown key 'train\.stpes'; did you mean 'steps'\?"

run "config check: malformed --set" config check "$tmp/configs/good.toml" --set train.steps
expect_status 2
expect_one_error_line 'expected key\.path=value'

# ---- config print -----------------------------------------------------------------------------------------------
run "config print --set train.steps=7" config print "$tmp/configs/good.toml" --set train.steps=7
expect_status 0
expect_stdout_line 'steps = 7'
expect_stdout_line 'width = 32'
expect_stdout_line 'batch_size = 8'  # a default, filled in

run "config print: --set before the file" config print --set train.steps=7 "$tmp/configs/good.toml"
expect_status 0
expect_stdout_line 'steps = 7'

run "config print: base merged" config print "$tmp/configs/child.toml"
expect_status 0
expect_stdout_line 'steps = 11'   # the including file wins
expect_stdout_line 'lr = 0.25'    # inherited
expect_stdout_line 'width = 48'   # inherited table
if grep -qE '^base' "$tmp/out"; then fail "the printed config still has 'base'"; else pass "no 'base' key left"; fi
cp "$tmp/out" "$tmp/configs/printed.toml"

run "config print: base merged, then overridden" config print "$tmp/configs/child.toml" --set train.lr=0.5
expect_status 0
expect_stdout_line 'lr = 0.5'
expect_stdout_line 'steps = 11'

run "config check: the printed config is valid on its own" config check "$tmp/configs/printed.toml"
expect_status 0

run "config print: invalid file" config print "$tmp/configs/bad.toml"
expect_status 2
expect_one_error_line 'bad\.toml:7:22: '
expect_stdout_empty

# ---- run: a config error writes nothing -------------------------------------------------------------------------
run "run: invalid file" run "$tmp/configs/bad.toml"
expect_status 2
expect_one_error_line 'bad\.toml:7:22: '
expect_absent "$tmp/runs"

run "run: error from --set" run "$tmp/configs/good.toml" --set train.warmup_steps=9
expect_status 2
expect_one_error_line "^error: --set train\.warmup_steps=9: 'train\.warmup_steps' must not exceed train\.steps \(3\), got 9$"
expect_absent "$tmp/runs"

echo
if [ "$failures" -eq 0 ]; then
  echo "all CLI checks passed"
  exit 0
fi
echo "$failures CLI check(s) failed"
exit 1
