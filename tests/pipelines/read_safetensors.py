#!/usr/bin/env python3
"""Reads a shard folder written by longnet's ShardWriter with the standard library and numpy only, as any
safetensors reader would, and writes a JSON summary that the C++ test compares with what it wrote.

    read_safetensors.py SHARD_DIR OUT_JSON

Checks on the way (exit 1 with a message on the first failure): the index's byte count and CRC-32 of every shard,
the header layout (8-byte little-endian length, JSON, tensors back to back covering the data exactly), each tensor's
byte count against dtype and shape, and the names "<sample_index>.<field>" against the index.
Summary: {"<sample_index>.<field>": {"dtype": ..., "shape": [...], "sum": float, "first": float}}.
"""
import json
import os
import struct
import sys
import zlib

import numpy as np

DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
          "F16": np.float16, "F32": np.float32, "F64": np.float64}


def fail(message):
    print("read_safetensors: " + message, file=sys.stderr)
    sys.exit(1)


def main():
    folder, out = sys.argv[1], sys.argv[2]
    with open(os.path.join(folder, "index.json"), encoding="utf-8") as f:
        index = json.load(f)
    summary = {}
    for shard in index["shards"]:
        path = os.path.join(folder, shard["file"])
        with open(path, "rb") as f:
            blob = f.read()
        if len(blob) != shard["bytes"]:
            fail(f"{path}: {len(blob)} bytes, index says {shard['bytes']}")
        if f"{zlib.crc32(blob):08x}" != shard["crc32"]:
            fail(f"{path}: CRC-32 differs from the index")
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n].decode("utf-8"))
        data = blob[8 + n:]
        meta = header.pop("__metadata__")
        if meta["format"] != "longnet-shards" or int(meta["first_sample"]) != shard["first_sample"]:
            fail(f"{path}: unexpected __metadata__ {meta}")
        if json.loads(meta["sample_ids"]) != [s["id"] for s in shard["samples"]]:
            fail(f"{path}: sample ids in __metadata__ differ from the index")
        spans = sorted(tuple(t["data_offsets"]) for t in header.values())
        position = 0
        for begin, end in spans:
            if begin != position:
                fail(f"{path}: tensors are not back to back at byte {begin}")
            position = end
        if position != len(data):
            fail(f"{path}: tensors cover {position} of {len(data)} data bytes")
        expected = {f"{shard['first_sample'] + k}.{field}"
                    for k, s in enumerate(shard["samples"]) for field in s["fields"]}
        if expected != set(header):
            fail(f"{path}: tensor names {sorted(header)} differ from the index {sorted(expected)}")
        for name, t in header.items():
            begin, end = t["data_offsets"]
            if t["dtype"] == "BF16":  # numpy has no bfloat16: widen the 16 bits to float32
                raw = np.frombuffer(data[begin:end], dtype="<u2").astype(np.uint32) << 16
                array = raw.view(np.float32).reshape(t["shape"])
            else:
                dtype = np.dtype(DTYPES[t["dtype"]]).newbyteorder("<")
                array = np.frombuffer(data[begin:end], dtype=dtype).reshape(t["shape"])
            summary[name] = {"dtype": t["dtype"], "shape": list(array.shape),
                             "sum": float(array.astype(np.float64).sum()),
                             "first": float(array.reshape(-1)[0]) if array.size else 0.0}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main()
