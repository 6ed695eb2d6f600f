#!/usr/bin/env python3
"""GPU time by the operator that launched it: reads the trace.json that `train.profile_from` writes (the Kineto
Chrome trace in <run>/profile/) and sums each kernel, copy and memset under the CPU operator stack that launched it,
so that a kernel name shared by many operators (an elementwise add, a copy) splits into its callers.

    tools/profile_ops.py RUN_DIR/profile/trace.json [--top 40] [--stacks 10]

Each row: milliseconds, share of all GPU time, launches, then the outermost autograd node (backward work) or nothing
(forward work), the two innermost operators, and the kernel name. --stacks N prints the whole operator stack of one
launch for each of the first N rows. Needs only Python's standard library. Exit status 2 for a missing or unreadable
trace.
"""
import argparse
import collections
import json
import sys

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
CPU_CATEGORIES = ("cpu_op", "user_annotation")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")


def fail(message):
    print("profile_ops: " + message, file=sys.stderr)
    sys.exit(2)


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            trace = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read trace '{path}': {e}")
    events = trace.get("traceEvents") if isinstance(trace, dict) else trace
    if not isinstance(events, list):
        fail(f"'{path}' has no traceEvents list (not a Chrome trace)")
    return events


def enclosing_stacks(events, queries):
    """{(tid, ts): names of the CPU operators on thread tid that enclose time ts, outermost first} for each query.
    Operators of one thread nest, so one sweep per thread with a stack of open operators answers all of them."""
    ops = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in CPU_CATEGORIES:
            ops[e["tid"]].append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
    times = collections.defaultdict(set)
    for tid, ts in queries:
        times[tid].add(ts)
    answers = {}
    for tid, wanted in times.items():
        thread_ops = sorted(ops.get(tid, []), key=lambda op: (op[0], -op[1]))  # an outer op before an inner one
        open_ops, i = [], 0
        for ts in sorted(wanted):
            while i < len(thread_ops) and thread_ops[i][0] <= ts:
                while open_ops and open_ops[-1][1] < thread_ops[i][0]:
                    open_ops.pop()
                open_ops.append(thread_ops[i])
                i += 1
            while open_ops and open_ops[-1][1] < ts:
                open_ops.pop()
            answers[(tid, ts)] = [name for start, end, name in open_ops if end >= ts]
    return answers


def attribute(events):
    """{(node, inner ops, kernel): [microseconds, launches, example stack]} and the total microseconds."""
    launches = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = (e["tid"], e["ts"])
    stacks = enclosing_stacks(events, launches.values())
    rows = {}
    total = 0.0
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in GPU_CATEGORIES:
            continue
        duration = float(e.get("dur", 0))
        total += duration
        launch = launches.get(e.get("args", {}).get("correlation"))
        stack = stacks[launch] if launch else []
        node = next((name for name in stack if name.startswith("autograd::engine::evaluate_function: ")), "")
        inner = " > ".join(stack[-2:]) if stack else "(no operator)"
        key = (node.replace("autograd::engine::evaluate_function: ", ""), inner, e["name"])
        row = rows.setdefault(key, [0.0, 0, stack])
        row[0] += duration
        row[1] += 1
    return rows, total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="trace.json written by train.profile_from")
    parser.add_argument("--top", type=int, default=40, help="rows to print (default 40)")
    parser.add_argument("--stacks", type=int, default=0, help="print the whole stack of the first N rows")
    args = parser.parse_args()
    rows, total = attribute(load(args.trace))
    if total <= 0:
        fail(f"'{args.trace}' has no GPU kernels (was the run on a CUDA device?)")
    ordered = sorted(rows.items(), key=lambda item: -item[1][0])
    print(f"GPU time {total / 1e3:.1f} ms in {sum(r[1] for r in rows.values())} launches")
    print(f"{'ms':>9} {'share':>6} {'calls':>6}  backward node | innermost operators | kernel")
    for (node, inner, kernel), (us, calls, _) in ordered[: args.top]:
        print(f"{us / 1e3:9.2f} {100 * us / total:5.1f}% {calls:6d}  {node[:60] or '-'} | {inner[:80]} | {kernel[:90]}")
    for (node, inner, kernel), (_, _, stack) in ordered[: args.stacks]:
        print(f"\n{kernel[:100]}\n    " + (" > ".join(stack) or "(no operator)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
