#!/usr/bin/env python3
"""Markdown tables from `longnet bench attention` JSON records (bench/results/*.json).

    tools/bench_table.py bench/results/h100_attention_local5.json [more.json ...] > table.md

One table per (config, mode): a row per length N, a column per method with median ms (p10–p90) and effective
TFLOP/s; then the no-grad forward lengths and time(4M)/time(1M), time(8M)/time(1M) per backend. A file that measures
a length more than once (a scaling run: 1M, 8M, 1M, 8M, …) also gets each backend's runs in the order they ran, with
every large length's ratio to the 1M runs before and after it. Nothing is typed by hand.
"""
import json
import sys
from collections import defaultdict

METHODS = ["fused", "fused_flash", "fused_kernels", "fused_portable", "ours", "composed", "fkodom", "dense_sdpa"]
OWN = ("fused", "fused_flash", "fused_kernels", "fused_portable", "ours")  # our backends: throughput, memory, check
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
        own = [m for m in OWN if m in methods]
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
        repeated = has_repeats(records, mode)
        if repeated:
            out.append("")
            out.append("A length measured more than once shows its last run here; every run is listed below.")
        if mode == "inference" and not repeated:
            for m in OWN:
                t = {n: r["stats"]["median_ms"] for (n, mm), r in recs.items() if mm == m and r["status"] == "ok"}
                for big in (1 << 22, 1 << 23):
                    if (1 << 20) in t and big in t:
                        out.append("")
                        out.append(f"{m}: time({tokens(big)}) / time(1M) = {t[big] / t[1 << 20]:.2f} (linear scaling: "
                                   f"{big >> 20}.00); largest length run: {tokens(max(t))}.")
    out += run_order(records)
    return "\n".join(out)


def has_repeats(records, mode):
    keys = [(r["method"], r["params"]["N"]) for r in records if r["mode"] == mode]
    return len(keys) != len(set(keys))


def run_order(records):
    """Lines listing each backend's no-grad runs in the order they ran, when a length repeats."""
    out = []
    for m in OWN:
        runs = [r for r in records if r["method"] == m and r["mode"] == "inference" and r["status"] == "ok"]
        lengths = [r["params"]["N"] for r in runs]
        if len(lengths) == len(set(lengths)):
            continue
        out.append("")
        out.append(f"{m}, no-grad runs in the order they ran: "
                   + ", ".join(f"{tokens(r['params']['N'])} {r['stats']['median_ms']:.2f} ms" for r in runs) + ".")
        ratios = []
        for i, r in enumerate(runs):
            n = r["params"]["N"]
            if n <= 1 << 20:
                continue
            for j, label in ((i - 1, "before"), (i + 1, "after")):
                if 0 <= j < len(runs) and runs[j]["params"]["N"] == 1 << 20:
                    ratios.append(f"{tokens(n)}/1M {label} = "
                                  f"{r['stats']['median_ms'] / runs[j]['stats']['median_ms']:.2f}")
        if ratios:
            out.append(f"{m}: " + ", ".join(ratios) + ".")
    return out


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
