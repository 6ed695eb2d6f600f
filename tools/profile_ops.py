#!/usr/bin/env python3
"""GPU time by the operator that launched it: reads the trace.json that `train.profile_from` writes (the Kineto
Chrome trace in <run>/profile/) and sums each kernel, copy and memset under the CPU operator stack that launched it,
so that a kernel name shared by many operators (an elementwise add, a copy) splits into its callers.

    tools/profile_ops.py RUN_DIR/profile/trace.json [--top 40] [--stacks 10] [--gaps 20]

Each row: milliseconds, share of all GPU time, launches, then the outermost autograd node (backward work) or nothing
(forward work), the two innermost operators, and the kernel name. --stacks N prints the whole operator stack of one
launch for each of the first N rows. --gaps N adds the GPU's idle time: every interval of at least --min-gap-us in
which no kernel, copy or memset runs is charged to the operator stack that launched the work ending it (what the
host was late to launch) and that work's name, and the N largest of those rows are printed with their share of the
traced wall time. --lag adds how far the host runs ahead: the delay from each kernel's launch to its start on the GPU
(median and percentiles). Delays of many milliseconds mean a queue of work, so the step is bound by the GPU; delays
near zero mean the GPU waits for the host.
Needs only Python's standard library. Exit status 2 for a missing or unreadable trace.
"""
import argparse
import collections
import json
import statistics
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


def launches_by_correlation(events):
    """{correlation id: (thread, start time) of the runtime or driver call that launched that GPU work}."""
    return {e["args"]["correlation"]: (e["tid"], e["ts"]) for e in events
            if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}


def launch_stacks(events):
    """A function from a GPU event to the CPU operator stack (outermost first) that launched it ([] if unknown)."""
    launches = launches_by_correlation(events)
    stacks = enclosing_stacks(events, launches.values())

    def stack_of(gpu_event):
        launch = launches.get(gpu_event.get("args", {}).get("correlation"))
        return stacks[launch] if launch else []

    return stack_of


def gpu_events(events):
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]


def key_of(stack):
    """(outermost autograd node without its prefix, or ""; the two innermost operators)."""
    node = next((name for name in stack if name.startswith("autograd::engine::evaluate_function: ")), "")
    inner = " > ".join(stack[-2:]) if stack else "(no operator)"
    return node.replace("autograd::engine::evaluate_function: ", ""), inner


def attribute(events, stack_of):
    """{(node, inner ops, kernel): [microseconds, launches, example stack]} and the total microseconds."""
    rows = {}
    total = 0.0
    for e in gpu_events(events):
        duration = float(e.get("dur", 0))
        total += duration
        stack = stack_of(e)
        row = rows.setdefault(key_of(stack) + (e["name"],), [0.0, 0, stack])
        row[0] += duration
        row[1] += 1
    return rows, total


def idle_gaps(events, stack_of, min_gap_us):
    """{(node, inner ops, name of the GPU event ending the gap): [idle microseconds, gaps, example stack]} for the idle
    intervals of at least min_gap_us between GPU events (all streams together), each charged to the stack that
    launched the event ending it; and the
    traced wall time (first GPU start to last GPU end) and the total idle time in microseconds."""
    spans = sorted(((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e) for e in gpu_events(events)),
                   key=lambda span: span[0])
    rows, idle = {}, 0.0
    if not spans:
        return rows, 0.0, 0.0
    busy_until = spans[0][1]
    for start, end, e in spans[1:]:
        gap = start - busy_until
        if gap > 0:
            idle += gap
            if gap >= min_gap_us:
                stack = stack_of(e)
                row = rows.setdefault(key_of(stack) + (e["name"],), [0.0, 0, stack])
                row[0] += gap
                row[1] += 1
        busy_until = max(busy_until, end)
    return rows, busy_until - spans[0][0], idle


def launch_lags(events):
    """Microseconds from each GPU event's launch to its start, sorted (events without a recorded launch left out)."""
    launches = launches_by_correlation(events)
    lags = []
    for e in gpu_events(events):
        launch = launches.get(e.get("args", {}).get("correlation"))
        if launch is not None:
            lags.append(float(e["ts"]) - float(launch[1]))
    return sorted(lags)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="trace.json written by train.profile_from")
    parser.add_argument("--top", type=int, default=40, help="rows to print (default 40)")
    parser.add_argument("--stacks", type=int, default=0, help="print the whole stack of the first N rows")
    parser.add_argument("--gaps", type=int, default=0, help="print the N largest rows of GPU idle time")
    parser.add_argument("--min-gap-us", type=float, default=5.0, help="shorter idle intervals are not charged")
    parser.add_argument("--lag", action="store_true", help="print the delays from launch to start on the GPU")
    args = parser.parse_args()
    events = load(args.trace)
    stack_of = launch_stacks(events)
    rows, total = attribute(events, stack_of)
    if total <= 0:
        fail(f"'{args.trace}' has no GPU kernels (was the run on a CUDA device?)")
    ordered = sorted(rows.items(), key=lambda item: -item[1][0])
    print(f"GPU time {total / 1e3:.1f} ms in {sum(r[1] for r in rows.values())} launches")
    print(f"{'ms':>9} {'share':>6} {'calls':>6}  backward node | innermost operators | kernel")
    for (node, inner, kernel), (us, calls, _) in ordered[: args.top]:
        print(f"{us / 1e3:9.2f} {100 * us / total:5.1f}% {calls:6d}  {node[:60] or '-'} | {inner[:80]} | {kernel[:90]}")
    for (node, inner, kernel), (_, _, stack) in ordered[: args.stacks]:
        print(f"\n{kernel[:100]}\n    " + (" > ".join(stack) or "(no operator)"))
    if args.gaps > 0:
        gaps, wall, idle = idle_gaps(events, stack_of, args.min_gap_us)
        charged = sum(row[0] for row in gaps.values())
        share = 100 * idle / max(wall, 1e-9)
        count = sum(row[1] for row in gaps.values())
        print(f"\nGPU idle {idle / 1e3:.1f} ms of {wall / 1e3:.1f} ms traced wall time ({share:.1f} %); "
              f"{charged / 1e3:.1f} ms in {count} gaps of at least {args.min_gap_us:g} us, "
              "by the operators that launched the work ending each gap:")
        print(f"{'ms':>9} {'wall':>6} {'gaps':>6}  backward node | innermost operators | next GPU work")
        for (node, inner, name), (us, count, _) in sorted(gaps.items(), key=lambda item: -item[1][0])[: args.gaps]:
            print(f"{us / 1e3:9.2f} {100 * us / max(wall, 1e-9):5.1f}% {count:6d}  {node[:60] or '-'} | {inner[:80]} | "
                  f"{name[:80]}")
    if args.lag:
        lags = launch_lags(events)
        if lags:
            at = lambda q: lags[round(q * (len(lags) - 1))] / 1e3  # noqa: E731  (nearest rank)
            print(f"\nlaunch to GPU start over {len(lags)} launches: median {statistics.median(lags) / 1e3:.2f} ms, "
                  f"p10 {at(0.1):.2f} ms, "
                  f"p90 {at(0.9):.2f} ms, max {lags[-1] / 1e3:.2f} ms")
        else:
            print("\nlaunch to GPU start: no GPU event has a recorded launch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
