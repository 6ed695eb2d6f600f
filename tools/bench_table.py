#!/usr/bin/env python3
"""Markdown tables from `longnet bench attention` JSON records (bench/results/*.json).

    tools/bench_table.py bench/results/h100_attention_local5.json [more.json ...] > table.md

One table per (config, mode): a row per length N, a column per method with median ms (p10–p90) and effective
TFLOP/s; then the no-grad forward lengths and time(4M)/time(1M). Nothing is typed by hand.
"""
import json
import sys
from collections import defaultdict

METHODS = ["fused", "ours", "composed", "fkodom", "dense_sdpa"]
MODE_TITLES = {"fwd": "forward", "fwdbwd": "forward + backward", "inference": "forward, no grad (inference)"}


def tokens(n):
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def cell(r):
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"]
    s = r["stats"]
    return f"{s['median_ms']:.2f} ({s['p10_ms']:.2f}–{s['p90_ms']:.2f}) · {r['tflops']:.0f}"


def tables(records):
    out = []
    first = records[0]
    out.append(f"Device: {first['device']}; torch {first['torch']}, CUDA {first['cuda']}, cuDNN {first['cudnn']}; "
               f"commit {first['commit']}; dtype {first['dtype']}.")
    out.append("")
    out.append("Cells: median ms (p10–p90) · effective TFLOP/s (dilated FLOPs Σ_i (N/w_i)·H_i·4·(w_i/r_i)²·D with H_i "
               "the heads branch i serves: all H with mix = lse, its group with head_split, fkodom's own group sizes "
               "for fkodom; ×3.5 for forward+backward; dense SDPA: its own 4·N²·H·D).")
    groups = defaultdict(dict)
    for r in records:
        # fkodom's code splits heads among branches: it is compared with attention.mix = head_split.
        mix = "head_split" if r["method"] == "fkodom" else r["params"].get("mix", "lse")
        groups[(r["config"], mix, r["mode"])][(r["params"]["N"], r["method"])] = r
    for (config, mix, mode), recs in groups.items():
        p = next(iter(recs.values()))["params"]
        methods = [m for m in METHODS if any(k[1] == m for k in recs)]
        out.append("")
        out.append(f"### `{config}` {MODE_TITLES.get(mode, mode)}, mix = {mix}: B={p['B']}, H={p['H']}, D={p['D']}, "
                   f"w={p['segment_lengths']}, r={p['dilation_rates']}, causal={str(p['causal']).lower()}")
        out.append("")
        header = ["N"] + methods + ["tokens/s (ours)", "peak GiB (ours)", "max error vs composed"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for n in sorted({k[0] for k in recs}):
            ours = recs.get((n, "ours"))
            tps = f"{ours['tokens_per_s']:.3g}" if ours and ours["status"] == "ok" else ""
            mem = f"{ours['peak_memory_bytes'] / 2**30:.1f}" if ours and ours["status"] == "ok" else ""
            chk = ours.get("check", {}) if ours else {}
            err = (f"{chk['max_abs_error']:.2g} (rel {chk['relative_error']:.2g})"
                   if "max_abs_error" in chk else "")
            out.append("| " + " | ".join([tokens(n)] + [cell(recs.get((n, m))) for m in methods] + [tps, mem, err])
                       + " |")
        for other in ("composed", "fkodom"):
            ratios = [f"{tokens(n)}: {recs[(n, other)]['stats']['median_ms'] / recs[(n, 'ours')]['stats']['median_ms']:.2f}×"
                      for n in sorted({k[0] for k in recs})
                      if all(recs.get((n, m), {}).get("status") == "ok" for m in ("ours", other))]
            if ratios and other == "fkodom":
                out.append("")
                out.append(f"ours faster than {other} by: " + ", ".join(ratios) + ".")
        if mode == "inference":
            t = {n: r["stats"]["median_ms"] for (n, m), r in recs.items() if m == "ours" and r["status"] == "ok"}
            if (1 << 20) in t and (1 << 22) in t:
                out.append("")
                out.append(f"time(4M) / time(1M) = {t[1 << 22] / t[1 << 20]:.2f} (linear scaling: 4.00); "
                           f"largest length run: {tokens(max(t))}.")
    return "\n".join(out)


def main(paths):
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    for path in paths:
        with open(path) as f:
            records = json.load(f)
        print(f"## {path.split('/')[-1]}\n")
        print(tables(records))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
