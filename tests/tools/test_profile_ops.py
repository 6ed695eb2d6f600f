#!/usr/bin/env python3
"""tools/profile_ops.py on a small hand-made Kineto trace: kernels are summed under the operator stack that launched
them (forward and backward work apart, one kernel name split by caller), shares add up, --stacks prints the stack,
--gaps charges each idle interval to the operators that launched the work ending it, --lag reports the delays from
launch to start, and a missing file, a file that
is not a trace and a trace without kernels exit 2 with a message.

    tests/tools/test_profile_ops.py [path/to/profile_ops.py]
"""
import json
import os
import sys
import tempfile

from checks import check, finish, run_tool

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "tools", "profile_ops.py")


def tool(*args):
    return run_tool(TOOL, *args)


def op(name, ts, dur, tid=1):
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def launch(ts, corr, tid=1):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "pid": 1, "tid": tid,
            "args": {"correlation": corr}}


def kernel(name, dur, corr):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": 1000 + corr, "dur": dur, "pid": 0, "tid": 7,
            "args": {"correlation": corr}}


ADD = "vectorized_elementwise_kernel<add>"
events = [
    # forward on thread 1: aten::linear > aten::addmm launches a GEMM; aten::add_ launches the add twice
    op("aten::linear", 0, 50), op("aten::addmm", 5, 40), launch(10, 1), kernel("gemm_kernel", 300, 1),
    op("aten::add_", 60, 10), launch(62, 2), kernel(ADD, 100, 2),
    op("aten::add_", 80, 10), launch(82, 3), kernel(ADD, 50, 3),
    # backward on thread 2: the same add kernel launched from inside an autograd node
    op("autograd::engine::evaluate_function: AddmmBackward0", 200, 100, tid=2),
    op("AddmmBackward0", 205, 80, tid=2), op("aten::sum", 210, 20, tid=2), launch(215, 4, tid=2),
    kernel(ADD, 40, 4),
    # a memset with no recorded launch
    {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 2000, "dur": 10, "pid": 0, "tid": 7,
     "args": {"correlation": 99}},
]

with tempfile.TemporaryDirectory() as tmp:
    trace = os.path.join(tmp, "trace.json")
    with open(trace, "w") as f:
        json.dump({"traceEvents": events}, f)
    r = tool(trace, "--stacks", "2")
    print(r.stdout, r.stderr)
    check(r.returncode == 0, "a valid trace exits 0")
    lines = r.stdout.splitlines()
    check(lines[0].startswith("GPU time 0.5 ms in 5 launches"), "total GPU time 500 us over 5 launches")
    rows = [l for l in lines[2:] if "|" in l]
    check(len(rows) == 4, "four rows: gemm, forward add, backward add, memset")
    check(rows[0].split()[0] == "0.30" and "aten::linear > aten::addmm" in rows[0] and "gemm_kernel" in rows[0],
          "the GEMM is first, under aten::linear > aten::addmm")
    forward_add = [l for l in rows if ADD in l and "- | aten::add_" in l]
    check(len(forward_add) == 1 and forward_add[0].split()[0] == "0.15" and forward_add[0].split()[2] == "2",
          "the forward adds are one row: 0.15 ms, 2 launches")
    backward_add = [l for l in rows if ADD in l and "AddmmBackward0 |" in l]
    check(len(backward_add) == 1 and backward_add[0].split()[0] == "0.04" and
          "AddmmBackward0 > aten::sum" in backward_add[0], "the backward add is its own row under AddmmBackward0")
    check(any("(no operator)" in l and "Memset" in l for l in rows), "a launch without a record says (no operator)")
    shares = sum(float(l.split()[1].rstrip("%")) for l in rows)
    check(abs(shares - 100.0) < 0.5, f"shares add up to 100 % ({shares})")
    check("    aten::linear > aten::addmm" in r.stdout, "--stacks prints the whole stack of the first row")

    # Idle time: kernels at [0, 100], [150, 250], [252, 300], [400, 500] leave gaps of 50, 2 and 100 us; the 2 us
    # gap is under --min-gap-us and is counted as idle but charged to no row.
    idle_events = [
        op("aten::mm", 0, 5), launch(1, 11), op("aten::gelu", 120, 40), launch(140, 12), op("aten::add", 245, 5),
        launch(246, 13), op("autograd::engine::evaluate_function: GeluBackward0", 300, 120, tid=2),
        op("aten::gelu_backward", 390, 20, tid=2), launch(395, 14, tid=2),
    ]
    for corr, (ts, dur) in zip((11, 12, 13, 14), ((0, 100), (150, 100), (252, 48), (400, 100))):
        idle_events.append({"ph": "X", "cat": "kernel", "name": f"k{corr}", "ts": ts, "dur": dur, "pid": 0,
                            "tid": 7, "args": {"correlation": corr}})
    idle_trace = os.path.join(tmp, "idle.json")
    with open(idle_trace, "w") as f:
        json.dump({"traceEvents": idle_events}, f)
    r = tool(idle_trace, "--gaps", "5", "--min-gap-us", "10")
    print(r.stdout, r.stderr)
    check(r.returncode == 0, "--gaps exits 0")
    check("GPU idle 0.2 ms of 0.5 ms traced wall time (30.4 %)" in r.stdout, "idle 152 us of 500 us wall")
    gap_lines = r.stdout.split("by the operators that launched the work ending each gap:")[1].splitlines()[2:]
    check(len(gap_lines) == 2, f"two charged gaps ({gap_lines})")
    check(gap_lines and gap_lines[0].split()[0] == "0.10" and "GeluBackward0 | " in gap_lines[0] and
          "aten::gelu_backward | k14" in gap_lines[0], "the 100 us gap first, charged to GeluBackward0's launch of k14")
    check(len(gap_lines) > 1 and gap_lines[1].split()[0] == "0.05" and "- | aten::gelu" in gap_lines[1],
          "the 50 us gap, charged to the forward aten::gelu")

    # Launch lag: the hand-made kernels start at 1000 + correlation, launched at 10, 62, 82 and 215 us: lags of 991,
    # 940, 921 and 789 us (the memset has no recorded launch).
    r = tool(trace, "--lag")
    print(r.stdout, r.stderr)
    check(r.returncode == 0, "--lag exits 0")
    check("launch to GPU start over 4 launches: median 0.93 ms, p10 0.79 ms, p90 0.99 ms, max 0.99 ms" in r.stdout,
          "--lag gives the median and percentiles of the launch-to-start delays")

    r = tool(os.path.join(tmp, "missing.json"))
    check(r.returncode == 2 and "cannot read trace" in r.stderr, "a missing file exits 2 naming it")
    bad = os.path.join(tmp, "bad.json")
    with open(bad, "w") as f:
        f.write('{"other": 1}')
    r = tool(bad)
    check(r.returncode == 2 and "no traceEvents" in r.stderr, "JSON that is not a trace exits 2")
    cpu_only = os.path.join(tmp, "cpu.json")
    with open(cpu_only, "w") as f:
        json.dump({"traceEvents": events[:2]}, f)
    r = tool(cpu_only)
    check(r.returncode == 2 and "no GPU kernels" in r.stderr, "a trace without kernels exits 2")

sys.exit(finish())
