#!/usr/bin/env python3
"""Markdown tables from `longnet bench attention` JSON records (bench/results/*.json).

    tools/bench_table.py bench/results/h100_attention_local5.json [more.json ...] > table.md

One table per (config, mode): a row per length N, a column per method with median ms (p10–p90) and effective
TFLOP/s; then the no-grad forward lengths and time(4M)/time(1M), time(8M)/time(1M) per backend. Nothing is typed by hand.
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
        own = [m for m in ("fused", "ours") if m in methods]  # our backends: throughput, memory, check
        header = (["N"] + methods + [f"tokens/s ({m})" for m in own] + [f"peak GiB ({m})" for m in own]
                  + [f"max error vs composed ({m})" for m in own])
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for n in sorted({k[0] for k in recs}):
            tps, mem, err = [], [], []
            for m in own:
                r = recs.get((n, m))
                ok = r is not None and r["status"] == "ok"
                tps.append(f"{r['tokens_per_s']:.3g}" if ok else "")
                mem.append(f"{r['peak_memory_bytes'] / 2**30:.1f}" if ok else "")
                chk = r.get("check", {}) if r else {}
                err.append(f"{chk['max_abs_error']:.2g} (rel {chk['relative_error']:.2g})" if "max_abs_error" in chk
                           else "")
            out.append("| " + " | ".join([tokens(n)] + [cell(recs.get((n, m))) for m in methods] + tps + mem + err)
                       + " |")
        for other in ("composed", "fkodom"):
            ratios = [f"{tokens(n)}: {recs[(n, other)]['stats']['median_ms'] / recs[(n, 'ours')]['stats']['median_ms']:.2f}×"
                      for n in sorted({k[0] for k in recs})
                      if all(recs.get((n, m), {}).get("status") == "ok" for m in ("ours", other))]
            if ratios and other == "fkodom":
                out.append("")
                out.append(f"ours faster than {other} by: " + ", ".join(ratios) + ".")
        if mode == "inference":
            for m in ("fused", "ours"):
                t = {n: r["stats"]["median_ms"] for (n, mm), r in recs.items() if mm == m and r["status"] == "ok"}
                for big in (1 << 22, 1 << 23):
                    if (1 << 20) in t and big in t:
                        out.append("")
                        out.append(f"{m}: time({tokens(big)}) / time(1M) = {t[big] / t[1 << 20]:.2f} (linear scaling: "
                                   f"{big >> 20}.00); largest length run: {tokens(max(t))}.")
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
