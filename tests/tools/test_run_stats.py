#!/usr/bin/env python3
"""tools/run_stats.py on hand-made metrics files: windows between train records weighted by their wall time, --steps
keeps the windows wholly inside it, other records are skipped, a run without MFU prints '-', and a missing file, a
malformed line, a span without windows and a bad --steps exit 2 with a message.

    tests/tools/test_run_stats.py [path/to/run_stats.py]
"""
import json
import os
import sys
import tempfile

from checks import check, finish, run_tool

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "tools", "run_stats.py")


def train(step, elapsed, samples, mfu=None, wait=0.0, loss=1.0):
    r = {"kind": "train", "step": step, "elapsed_s": elapsed, "samples_per_s": samples, "tokens_per_s": 1000 * samples,
         "data_wait_fraction": wait, "loss": loss, "peak_memory_gb": step / 10}
    if mfu is not None:
        r["mfu"] = mfu
    return r


def write(folder, name, records, extra_lines=()):
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def rows(*args):
    out = run_tool(TOOL, *args, "--json")
    check(out.returncode == 0, f"{' '.join(args)}: exit 0 (got {out.returncode}: {out.stderr.strip()})")
    return json.loads(out.stdout) if out.returncode == 0 else []


def near(a, b):
    return a is not None and abs(a - b) < 1e-9


with tempfile.TemporaryDirectory() as folder:
    # Windows 1-10 (2 s, startup), 11-20 (1 s at 20 samples/s), 21-30 (3 s at 10 samples/s); other kinds between.
    gpu = write(folder, "gpu.jsonl", [{"kind": "data", "step": 0, "bad_samples": 0},
                                      train(10, 2.0, 5.0, mfu=0.1, wait=0.5, loss=3.0),
                                      train(20, 3.0, 20.0, mfu=0.4, wait=0.0, loss=2.0),
                                      {"kind": "val", "step": 20, "text_to_video_r1": 10.0},
                                      train(30, 6.0, 10.0, mfu=0.2, wait=0.1, loss=1.5)])
    r = rows(gpu, "--steps", "11-30")
    if r:
        r = r[0]
        check(r["steps"] == [11, 30], "--steps 11-30 averages windows 11-20 and 21-30")
        check(near(r["samples_per_s"], (20 * 1 + 10 * 3) / 4), "samples/s weighted by wall time (12.5)")
        check(near(r["tokens_per_s"], 12500.0), "tokens/s weighted the same way")
        check(near(r["step_ms"], 4000 / 20), "milliseconds a step: 4 s over 20 steps")
        check(near(r["mfu"], (0.4 * 1 + 0.2 * 3) / 4), "MFU weighted by wall time (0.25)")
        check(near(r["data_wait_fraction"], 0.3 / 4), "data wait weighted by wall time")
        check(near(r["peak_memory_gb"], 3.0) and r["loss"] == 1.5, "peak memory is the largest, loss the last window's")
    r = rows(gpu, "--steps", "11-25")
    check(bool(r) and r[0]["steps"] == [11, 20] and near(r[0]["samples_per_s"], 20.0),
          "a window only partly inside --steps is left out")
    r = rows(gpu)
    check(bool(r) and r[0]["steps"] == [1, 30] and near(r[0]["samples_per_s"], (5 * 2 + 20 + 30) / 6),
          "without --steps every window counts, the first from the start of the run")

    cpu = write(folder, "cpu.jsonl", [train(5, 1.0, 4.0), train(10, 2.0, 4.0)])
    table = run_tool(TOOL, gpu, cpu, "--steps", "1-10")
    check(table.returncode == 0, "two files: exit 0")
    lines = table.stdout.splitlines()
    check(len(lines) == 3 and "MFU" in lines[0], "a header and one row a file")
    check(len(lines) == 3 and "10.00 %" in lines[1] and lines[1].endswith("gpu.jsonl"), "the GPU run's MFU in per cent")
    check(len(lines) == 3 and " - " in lines[2] and lines[2].endswith("cpu.jsonl"), "a run without MFU shows '-'")

    for args, what, message in [
            ((os.path.join(folder, "missing.jsonl"),), "a missing file", "cannot read"),
            ((write(folder, "bad.jsonl", [train(10, 1.0, 5.0)], ["{not json"]),), "a malformed line", "bad.jsonl:2:"),
            ((write(folder, "short.jsonl", [{"kind": "train", "step": 10}]),), "a train record without its rates",
             "short.jsonl:1:"),
            ((gpu, "--steps", "40-50"), "a span without windows", "no train window inside steps 40-50"),
            ((gpu, "--steps", "30-11"), "a reversed --steps", "FIRST <= LAST")]:
        out = run_tool(TOOL, *args)
        check(out.returncode == 2 and message in out.stderr,
              f"{what}: exit 2 naming it (got {out.returncode}: {out.stderr.strip()[-120:]})")

sys.exit(finish())
