"""What the tools' tests share: PASS/FAIL lines, a tool run, and the exit status."""
import subprocess
import sys

failures = []


def check(condition, what):
    print(("PASS: " if condition else "FAIL: ") + what)
    if not condition:
        failures.append(what)


def run_tool(tool, *args):
    """tool (a Python script) with args under this interpreter; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, tool, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish():
    """0 when every check passed, else 1, after a summary line."""
    if failures:
        print("%d check(s) failed" % len(failures))
        return 1
    print("all checks passed")
    return 0
