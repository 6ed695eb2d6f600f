#!/usr/bin/env python3
"""Times fkodom/dilated-attention-pytorch's DilatedAttention on the `local5` configuration, on the same card and in
the same session as `longnet bench attention --mix head_split`, and writes JSON records in the same format.

    python bench/compare_fkodom.py --source PATH/TO/dilated-attention-pytorch --json out.json [--lengths 1048576]

Its source is not part of this repository: PATH is a checkout of https://github.com/fkodom/dilated-attention-pytorch
(the records name the commit given by --source-commit). Its one dependency missing on the GPU machine, xformers, is
replaced by a shim that routes xformers.ops.memory_efficient_attention to torch's scaled_dot_product_attention (which
picks flash attention for these bf16 inputs), with LowerTriangularMask mapped to is_causal.

What fkodom's code computes (for the reader of the comparison): the heads are split among the branches (the first
H mod K groups get one extra head), group i runs branch i with one row offset (i mod r_i) for all its heads, and
each group's output is divided by its own sum over the sequence instead of a softmax denominator, then by K. It is
not the same function as attention.mix = head_split (per-head offsets, a softmax per head); the comparison is of
speed at the same configuration, and the FLOPs column counts its own work (its group sizes).
"""
import argparse
import json
import os
import sys
import types


def install_xformers_shim(torch):
    """A module `xformers.ops` with what dilated_attention_pytorch uses, backed by torch SDPA."""

    class LowerTriangularMask:  # the only attention bias the code passes
        pass

    def memory_efficient_attention(query, key, value, op=None, attn_bias=None, p=0.0, scale=None):
        # xformers layout (B, M, H, K) -> SDPA layout (B, H, M, K)
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            dropout_p=p, is_causal=isinstance(attn_bias, LowerTriangularMask), scale=scale)
        return out.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    ops.LowerTriangularMask = LowerTriangularMask
    ops.AttentionOp = object
    package = types.ModuleType("xformers")
    package.ops = ops
    sys.modules["xformers"] = package
    sys.modules["xformers.ops"] = ops


def tokens(n):
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K" if n % (1 << 10) == 0 else str(n)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="checkout of fkodom/dilated-attention-pytorch")
    parser.add_argument("--source-commit", default="unknown", help="its commit, recorded in the JSON")
    parser.add_argument("--json", required=True, help="output file (JSON list of records)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1 << 20])
    parser.add_argument("--repetitions", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--commit", default=os.environ.get("LONGNET_GIT_COMMIT", "unknown"))
    args = parser.parse_args()

    import torch

    install_xformers_shim(torch)
    sys.path.insert(0, os.path.abspath(args.source))
    from dilated_attention_pytorch.dilated_attention import DilatedAttention

    if not torch.cuda.is_available():
        sys.exit("compare_fkodom: no CUDA device is visible")
    segments, rates, H, D = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16], 12, 64
    module = DilatedAttention(segment_lengths=segments, dilation_rates=rates)
    K = len(segments)
    groups = [H // K + (1 if i < H % K else 0) for i in range(K)]
    device = torch.cuda.get_device_name()
    cudnn = str(torch.backends.cudnn.version())
    records = []

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(args.repetitions):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop))
        samples.sort()
        rank = lambda p: samples[max(1, min(len(samples), -(-len(samples) * p // 100))) - 1]  # nearest rank
        return {"median_ms": rank(50), "p10_ms": rank(10), "p90_ms": rank(90),
                "repetitions": args.repetitions, "warmup": args.warmup}

    print(f"fkodom DilatedAttention on {device}: B=1 H={H} D={D} bf16 (xformers -> torch SDPA shim)")
    print(f"{'method':<10} {'mode':<9} {'N':>6} {'median_ms':>10} {'p10_ms':>9} {'p90_ms':>9} {'TFLOP/s':>8} "
          f"{'peak_GB':>8}")
    for n in args.lengths:
        torch.manual_seed(n)
        opts = dict(device="cuda", dtype=torch.bfloat16)
        q, k, v = (torch.randn(1, n, H, D, **opts).requires_grad_() for _ in range(3))
        dout = torch.randn(1, n, H, D, **opts)
        # Its own work: group i runs branch i for its heads.
        flops = sum((n // w) * g * 4 * (w // r) ** 2 * D for w, r, g in zip(segments, rates, groups))

        def forward():
            with torch.no_grad():
                module(q, k, v)

        def forward_backward():
            for t in (q, k, v):
                t.grad = None
            module(q, k, v).backward(dout)

        for mode, fn, f in (("fwd", forward, flops), ("fwdbwd", forward_backward, 3.5 * flops)):
            record = {"benchmark": "attention", "config": "local5", "method": "fkodom", "mode": mode,
                      "params": {"B": 1, "N": n, "H": H, "D": D, "segment_lengths": segments,
                                 "dilation_rates": rates, "causal": False, "mix": "fkodom_head_groups",
                                 "group_sizes": groups},
                      "dtype": "bfloat16", "engine": "torch_sdpa", "device": device,
                      "torch": torch.__version__.split("+")[0], "cuda": torch.version.cuda, "cudnn": cudnn,
                      "commit": args.commit, "source": "fkodom/dilated-attention-pytorch@" + args.source_commit}
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                stats = timed(fn)
                record.update(status="ok", stats=stats, tflops=f / (stats["median_ms"] * 1e-3) / 1e12,
                              tokens_per_s=n / (stats["median_ms"] * 1e-3),
                              peak_memory_bytes=torch.cuda.max_memory_allocated())
                print(f"{'fkodom':<10} {mode:<9} {tokens(n):>6} {stats['median_ms']:>10.2f} {stats['p10_ms']:>9.2f} "
                      f"{stats['p90_ms']:>9.2f} {record['tflops']:>8.1f} "
                      f"{record['peak_memory_bytes'] / 2**30:>8.2f}", flush=True)
            except torch.cuda.OutOfMemoryError:
                record["status"] = "oom"
                print(f"{'fkodom':<10} {mode:<9} {tokens(n):>6}  out of memory", flush=True)
            records.append(record)
        del q, k, v, dout
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.json)
    print(f"wrote {len(records)} records to {args.json}")


if __name__ == "__main__":
    main()
