#!/usr/bin/env python3
"""Steady-state figures of training runs, from the metrics.jsonl that `longnet run` writes in each run folder.

    tools/run_stats.py RUN/metrics.jsonl [MORE.jsonl ...] [--steps 11-50] [--json]

Each `train` record covers the steps since the previous one (train.log_every of them). The windows that lie wholly
inside --steps (default: all) are averaged over time: every rate a record reports (samples/s, tokens/s, MFU, the
data-wait fraction) is weighted by its window's wall time, the difference of consecutive `elapsed_s`, so that the
result is what the whole span did. One row per file: the steps averaged, samples/s, tokens/s, milliseconds a step,
MFU, data wait, peak GPU memory and the last window's loss. A window's wall time includes whatever ran inside it
(an evaluation, a checkpoint); choose spans without them for throughput. --json prints the rows as a JSON list.
Needs only Python's standard library. Exit status 2 for a missing or malformed file or a span with no window.
"""
import argparse
import json
import sys


def fail(message):
    print("run_stats: " + message, file=sys.stderr)
    sys.exit(2)


def steps_range(text):
    try:
        first, last = (int(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST (e.g. 11-50), got '{text}'")
    if first < 1 or last < first:
        raise argparse.ArgumentTypeError(f"expected 1 <= FIRST <= LAST, got '{text}'")
    return first, last


def windows(path):
    """[(first step, last step, seconds, record)] of the file's train records, in order."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        fail(f"cannot read '{path}': {e}")
    out, step, elapsed = [], 0, 0.0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            fail(f"{path}:{number}: not a JSON record: {e}")
        if not isinstance(record, dict) or record.get("kind") != "train":
            continue
        try:
            end, seconds = int(record["step"]), float(record["elapsed_s"]) - elapsed
            for key in ("samples_per_s", "tokens_per_s"):
                float(record[key])
        except (KeyError, TypeError, ValueError) as e:
            fail(f"{path}:{number}: a train record needs step, elapsed_s, samples_per_s and tokens_per_s ({e})")
        if end <= step or seconds <= 0:
            fail(f"{path}:{number}: steps and elapsed_s must grow from record to record")
        out.append((step + 1, end, seconds, record))
        step, elapsed = end, float(record["elapsed_s"])
    return out


def summarise(path, span):
    chosen = [w for w in windows(path) if span is None or (w[0] >= span[0] and w[1] <= span[1])]
    if not chosen:
        where = "" if span is None else f" inside steps {span[0]}-{span[1]}"
        fail(f"'{path}' has no train window{where}")
    seconds = sum(w[2] for w in chosen)
    steps = sum(w[1] - w[0] + 1 for w in chosen)

    def mean(key):  # time-weighted; None when a record lacks the key (MFU on a CPU run)
        if any(key not in w[3] for w in chosen):
            return None
        return sum(float(w[3][key]) * w[2] for w in chosen) / seconds

    return {
        "file": path,
        "steps": [chosen[0][0], chosen[-1][1]],
        "samples_per_s": mean("samples_per_s"),
        "tokens_per_s": mean("tokens_per_s"),
        "step_ms": 1000.0 * seconds / steps,
        "mfu": mean("mfu"),
        "data_wait_fraction": mean("data_wait_fraction"),
        "peak_memory_gb": max((float(w[3].get("peak_memory_gb", 0)) for w in chosen), default=0.0) or None,
        "loss": chosen[-1][3].get("loss"),
    }


def cell(value, fmt):
    return "-" if value is None else fmt.format(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", metavar="METRICS_JSONL")
    parser.add_argument("--steps", type=steps_range, help="FIRST-LAST: only the windows wholly inside these steps")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    rows = [summarise(path, args.steps) for path in args.files]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    header = ["steps", "samples/s", "tokens/s", "ms/step", "MFU", "data wait", "peak GB", "loss", "file"]
    table = [header]
    for r in rows:
        table.append([f"{r['steps'][0]}-{r['steps'][1]}", cell(r["samples_per_s"], "{:.2f}"),
                      cell(r["tokens_per_s"] and r["tokens_per_s"] / 1000, "{:.0f}K"), cell(r["step_ms"], "{:.1f}"),
                      cell(r["mfu"] and 100 * r["mfu"], "{:.2f} %"),
                      cell(None if r["data_wait_fraction"] is None else 100 * r["data_wait_fraction"], "{:.1f} %"),
                      cell(r["peak_memory_gb"], "{:.1f}"), cell(r["loss"], "{:.4f}"), r["file"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)) + "  " + row[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
