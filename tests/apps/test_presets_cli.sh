#!/usr/bin/env bash
# `longnet ls` and `longnet cp`: every shipped experiment is listed with its description, the ones that state an
# expected result show it, a copy is a valid config (inheritance included) that is not overwritten without --force.
#
#   tests/apps/test_presets_cli.sh path/to/longnet path/to/experiments
set -uo pipefail

if [ $# -ne 2 ] || [ ! -x "$1" ]; then
  echo "usage: $0 path/to/longnet path/to/experiments" >&2
  exit 2
fi
longnet=$1
experiments=$2
# shellcheck source=cli_harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/cli_harness.sh"

run ls ls
expect_status 0
for f in "$experiments"/*.toml; do
  expect_stdout_match "^$(basename "$f" .toml) +[A-Z]"
done
expect_stdout_match "^quickstart +Quickstart: a small multimodal LongNet .*minutes\.$"
expect_stdout_match "^ +expected: val text → video R@1"

run cp cp quickstart "$tmp/mine.toml"
expect_status 0
expect_file "$tmp/mine.toml"
run check_copy config check "$tmp/mine.toml"
expect_status 0

# A preset that inherits: the copy's base still points at the shipped file.
run cp_base cp fusion_ablation.toml "$tmp/ablation.toml"
expect_status 0
run check_base config print "$tmp/ablation.toml"
expect_status 0
expect_stdout_line "strategy = 'concat_seq'"
expect_stdout_line "name = 'fusion_ablation'"

run cp_exists cp quickstart "$tmp/mine.toml"
expect_status 2
expect_one_error_line "error: cp: '.*mine.toml' exists; pass --force to overwrite it"
run cp_force cp quickstart "$tmp/mine.toml" --force
expect_status 0

run cp_unknown cp quickstrat "$tmp/x.toml"
expect_status 2
expect_one_error_line "error: cp: no experiment named \"quickstrat\" \(shipped: .*quickstart.*\)"
expect_absent "$tmp/x.toml"

export LONGNET_EXPERIMENTS=$tmp/nowhere
run ls_missing ls
unset LONGNET_EXPERIMENTS
expect_status 2
expect_one_error_line "error: no experiments folder at '.*nowhere'"

[ "$failures" -eq 0 ] || { echo "$failures check(s) failed"; exit 1; }
echo "all checks passed"
