# Shared by the `longnet` command tests (tests/apps/test_*.sh): a temporary folder, `run NAME ARGS...` keeping stdout,
# stderr and the exit status of one call, and checks that print PASS or FAIL with what they saw. Source it after
# setting $longnet; the script exits 1 at the end when $failures > 0.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0

# run NAME ARGS...: runs longnet, keeping stdout, stderr and the exit status for the checks that follow.
run() {
  last=$1
  shift
  "$longnet" "$@" >"$tmp/out" 2>"$tmp/err"
  status=$?
}
fail() {
  echo "FAIL [$last]: $*"
  echo "  --- stdout:"; sed 's/^/  | /' "$tmp/out"
  echo "  --- stderr:"; sed 's/^/  | /' "$tmp/err"
  failures=$((failures + 1))
}
pass() { echo "PASS [$last]: $*"; }
expect_status() {
  if [ "$status" -eq "$1" ]; then pass "exit status $1"; else fail "exit status $status, expected $1"; fi
}
expect_stdout_line() {  # an exact line of stdout
  if grep -qxF -- "$1" "$tmp/out"; then pass "stdout has the line '$1'"; else fail "stdout lacks the line '$1'"; fi
}
expect_stdout_match() {  # a line of stdout matching an extended regular expression
  if grep -qE -- "$1" "$tmp/out"; then pass "stdout matches /$1/"; else fail "stdout does not match /$1/"; fi
}
expect_stdout_empty() {
  if [ ! -s "$tmp/out" ]; then pass "stdout is empty"; else fail "stdout is not empty"; fi
}
expect_one_error_line() {  # exactly one line on stderr, matching an extended regular expression
  local lines
  lines=$(wc -l <"$tmp/err")
  if [ "$lines" -eq 1 ] && grep -qE -- "$1" "$tmp/err"; then
    pass "one line on stderr matching /$1/"
  else
    fail "expected exactly one line on stderr matching /$1/, got $lines line(s)"
  fi
}
expect_absent() {
  if [ ! -e "$1" ]; then pass "$1 was not created"; else fail "$1 exists but nothing should have been written"; fi
}
expect_file() {
  if [ -s "$1" ]; then pass "$1 exists"; else fail "$1 is missing or empty"; fi
}
