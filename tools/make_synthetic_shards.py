#!/usr/bin/env python3
"""Synthetic prepared samples: a folder in longnet's shard format (pipelines/shards.h) filled with random patches,
positions and token ids of the shapes `longnet prepare` writes, for data-loader and training-loop throughput
measurements on machines where media cannot be decoded (GPU hosts without FFmpeg, OpenCV or the demo media). The
content is random bytes: it is not a dataset to learn from, and losses on it say nothing about the model.

    tools/make_synthetic_shards.py --out /tmp/syn --samples 64 --seed 0 \\
        --text-tokens 512 --vocab-size 8000 \\
        --video-frames 16 --video-grid 14 --video-dim 768 \\
        --audio-patches 512 --audio-dim 256
    tools/make_synthetic_shards.py --out /tmp/img --samples 256 --image-grid 14 --image-dim 768

Needs only Python's standard library (3.9 or newer).

A modality is written when any of its options is given; its other options take the defaults shown by --help.
Fields of every sample (pipelines/loader.h), in field-name order:
    text_ids          int32 (L)         BOS (1), then ids uniform in [4, vocab_size), then EOS (2); L = --text-tokens
    image_patches     uint8 (G*G, dim)  random bytes (the loader maps uint8 to x/127.5 - 1)
    image_positions   int32 (G*G, 3)    (t, y, x) = (0, row, column), as modalities::patchify_image
    video_patches     uint8 (F*G*G, dim)
    video_positions   int32 (F*G*G, 3)  (t, y, x) = (frame, row, column), frame-major, as modalities::patchify_frames
                                        (with a tubelet, "frame" is the tubelet index: --video-frames counts them)
    audio_patches     uint8 (N, dim)
    audio_positions   int32 (N, 3)      (t, y, x) = (patch index, 0, 0), as modalities::patchify_mel
Sample ids are syn00000, syn00001, ...; sample i is a function of (seed, i) alone, each field drawn from its own
random.Random seeded with (seed, i, field), so a field does not change when other modalities are added.

Layout of --out (what pipelines::ShardWriter writes for the same samples, byte for byte, and ShardReader verifies):
    shard-00000.safetensors ...  safetensors files: 8-byte little-endian header length, a JSON header (keys sorted,
                                 "__metadata__" with format, version, first_sample, sample_ids; tensors named
                                 "<sample_index>.<field>" with dtype, shape, data_offsets) padded with spaces to a
                                 multiple of 8 bytes, then the tensors' bytes back to back. A shard is closed before a
                                 sample that would take its data past --max-shard-mb (a larger sample gets its own).
    index.json                   format, version, complete, checksum ("crc32"), samples, and per shard its file,
                                 bytes, CRC-32 (zlib's, 8 hex digits), first_sample and the samples with their fields.
Every file is written under a temporary name (<name>.tmp.<pid>), fsync'ed and renamed; index.json comes last, so a
folder with an index.json is complete. An existing folder is overwritten when it holds only shard files (anything
else there is refused): its index goes first and shards it had beyond the new ones are removed.
One shard is held in memory while it is filled (up to --max-shard-mb plus one sample). One summary line goes to
stderr: samples, shards, bytes, tokens per sample per modality, seconds.
"""
import argparse
import array
import json
import os
import random
import re
import sys
import time
import zlib

FORMAT = "longnet-shards"
VERSION = 1
PREFIX = "shard"
BOS, EOS, FIRST_ID = 1, 2, 4

# Option defaults; a modality is on when any of its options is given.
MODALITY_OPTIONS = {
    "text": {"text_tokens": 512, "vocab_size": 8000},
    "image": {"image_grid": 14, "image_dim": 768},
    "video": {"video_frames": 16, "video_grid": 14, "video_dim": 768},
    "audio": {"audio_patches": 512, "audio_dim": 256},
}
# Files this tool may replace in an existing --out folder.
OWN_FILE = re.compile(r"^(%s-\d{5}\.safetensors|index\.json|index\.partial\.json)(\.tmp\.\d+)?$" % PREFIX)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an integer" % text) from None
    if value < 1:
        raise argparse.ArgumentTypeError("%d must be >= 1" % value)
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("%r must be a positive finite number" % text)
    return value


def int32_bytes(values):
    """Little-endian int32 bytes of an iterable of ints."""
    a = array.array("i", values)
    if a.itemsize != 4:
        raise SystemExit("make_synthetic_shards: this platform's C int is not 32 bits")
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def rng_for(seed, index, field):
    # Seeding with a string hashes it with SHA-512: stable across runs, platforms and Python versions.
    return random.Random("longnet-synthetic:%d:%d:%s" % (seed, index, field))


class Field:
    __slots__ = ("name", "dtype", "shape", "data")

    def __init__(self, name, dtype, shape, data):
        self.name, self.dtype, self.shape, self.data = name, dtype, list(shape), data


class Layout:
    """The shapes of every sample, and the positions, which are the same for every sample."""

    def __init__(self, args):
        self.text_tokens = args.text_tokens if args.text else 0
        self.vocab_size = args.vocab_size
        self.patched = {}  # modality -> (count, dim, positions bytes)
        if args.image:
            g = args.image_grid
            self.patched["image"] = (g * g, args.image_dim,
                                     int32_bytes(v for y in range(g) for x in range(g) for v in (0, y, x)))
        if args.video:
            f, g = args.video_frames, args.video_grid
            self.patched["video"] = (f * g * g, args.video_dim,
                                     int32_bytes(v for t in range(f) for y in range(g) for x in range(g)
                                                 for v in (t, y, x)))
        if args.audio:
            n = args.audio_patches
            self.patched["audio"] = (n, args.audio_dim, int32_bytes(v for i in range(n) for v in (i, 0, 0)))

    def tokens(self):
        """Tokens per sample per modality, in loader order."""
        out = {}
        if self.text_tokens:
            out["text"] = self.text_tokens
        for m in ("image", "video", "audio"):
            if m in self.patched:
                out[m] = self.patched[m][0]
        return out

    def sample(self, seed, index):
        fields = []
        if self.text_tokens:
            rng = rng_for(seed, index, "text_ids")
            hi = self.vocab_size
            ids = [BOS] + [rng.randrange(FIRST_ID, hi) for _ in range(self.text_tokens - 2)] + [EOS]
            fields.append(Field("text_ids", "I32", [self.text_tokens], int32_bytes(ids)))
        for m, (count, dim, positions) in self.patched.items():
            data = rng_for(seed, index, m + "_patches").randbytes(count * dim)
            fields.append(Field(m + "_patches", "U8", [count, dim], data))
            fields.append(Field(m + "_positions", "I32", [count, 3], positions))
        fields.sort(key=lambda f: f.name)
        return fields


def compact(value):
    # nlohmann::json::dump() without indent: no spaces, keys sorted.
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, chunks):
    """Writes the chunks to <path>.tmp.<pid>, fsyncs, renames over path and fsyncs the folder (core/atomic_file.h).
    Returns (bytes, CRC-32)."""
    tmp = "%s.tmp.%d" % (path, os.getpid())
    size, crc = 0, 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
                crc = zlib.crc32(chunk, crc)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return size, crc


class Writer:
    """pipelines::ShardWriter's file layout and shard boundaries."""

    def __init__(self, folder, max_shard_bytes):
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self.closed = []  # index entries
        self.next_sample = 0
        self.open = []  # (index, id, fields)
        self.open_bytes = 0
        self.total_bytes = 0

    def add(self, sample_id, fields):
        nbytes = sum(len(f.data) for f in fields)
        if self.open and self.open_bytes + nbytes > self.max_shard_bytes:
            self.close_shard()
        self.open.append((self.next_sample, sample_id, fields))
        self.open_bytes += nbytes
        self.next_sample += 1
        if self.open_bytes >= self.max_shard_bytes:
            self.close_shard()

    def close_shard(self):
        if not self.open:
            return
        first = self.open[0][0]
        header = {"__metadata__": {"format": FORMAT, "version": str(VERSION), "first_sample": str(first),
                                   "sample_ids": compact([sid for _, sid, _ in self.open])}}
        offset = 0
        chunks = []
        for index, _, fields in self.open:
            for f in fields:
                header["%d.%s" % (index, f.name)] = {"dtype": f.dtype, "shape": f.shape,
                                                     "data_offsets": [offset, offset + len(f.data)]}
                offset += len(f.data)
                chunks.append(f.data)
        text = compact(header).encode("utf-8")
        text += b" " * ((8 - len(text) % 8) % 8)
        name = "%s-%05d.safetensors" % (PREFIX, len(self.closed))
        size, crc = write_atomic(os.path.join(self.folder, name),
                                 [len(text).to_bytes(8, "little"), text] + chunks)
        samples = [{"id": sid, "fields": {f.name: {"dtype": f.dtype, "shape": f.shape, "bytes": len(f.data)}
                                          for f in fields}} for _, sid, fields in self.open]
        self.closed.append({"file": name, "bytes": size, "crc32": "%08x" % crc, "first_sample": first,
                            "samples": samples})
        self.total_bytes += size
        self.open, self.open_bytes = [], 0

    def finish(self):
        self.close_shard()
        index = {"format": FORMAT, "version": VERSION, "complete": True, "checksum": "crc32",
                 "samples": self.next_sample, "shards": self.closed}
        # nlohmann::json::dump(1): one-space indent, keys sorted.
        text = json.dumps(index, indent=1, sort_keys=True) + "\n"
        size, _ = write_atomic(os.path.join(self.folder, "index.json"), [text.encode("utf-8")])
        self.total_bytes += size


def prepare_folder(folder):
    """Creates the folder, or clears what an earlier run of a shard writer left there (refusing other files)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit("make_synthetic_shards: --out %s exists and is not a folder" % folder)
    os.makedirs(folder, exist_ok=True)
    foreign = sorted(n for n in os.listdir(folder) if not OWN_FILE.match(n))
    if foreign:
        raise SystemExit("make_synthetic_shards: --out %s holds files that are not shards (%s); give an empty or "
                         "new folder" % (folder, ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")))
    # The index first: from here on the folder is not a complete shard set until the new index.json is written.
    for name in ("index.json", "index.partial.json"):
        if os.path.exists(os.path.join(folder, name)):
            os.unlink(os.path.join(folder, name))
    for name in os.listdir(folder):
        if ".tmp." in name:
            os.unlink(os.path.join(folder, name))


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Writes random prepared samples in longnet's shard format, for loader and training throughput "
                    "measurements where media cannot be decoded. The content is random, not a dataset to learn from.")
    parser.add_argument("--out", required=True, help="output folder (created; an earlier shard folder is replaced)")
    parser.add_argument("--samples", type=positive_int, default=64, help="number of samples (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="every byte is a function of (seed, sample index)")
    parser.add_argument("--max-shard-mb", type=positive_float, default=256.0,
                        help="close a shard before its data would pass this many MiB (default 256)")
    groups = {
        "text": ("text_ids int32 (L): BOS, random ids, EOS", [
            ("--text-tokens", "L, tokens per sample including BOS and EOS (>= 2)"),
            ("--vocab-size", "ids are drawn from [4, vocab_size) (> 4)")]),
        "image": ("image_patches uint8 (G*G, dim), image_positions int32 (t=0, y, x)", [
            ("--image-grid", "G, patches per side"), ("--image-dim", "values per patch")]),
        "video": ("video_patches uint8 (F*G*G, dim), video_positions int32 (t=frame, y, x)", [
            ("--video-frames", "F, frames (temporal patch positions)"), ("--video-grid", "G, patches per side"),
            ("--video-dim", "values per patch")]),
        "audio": ("audio_patches uint8 (N, dim), audio_positions int32 (t=index, 0, 0)", [
            ("--audio-patches", "N, patches per sample"), ("--audio-dim", "values per patch")]),
    }
    for modality, (title, options) in groups.items():
        group = parser.add_argument_group(modality, title + "; written when any of these is given")
        for flag, help_text in options:
            dest = flag[2:].replace("-", "_")
            group.add_argument(flag, type=positive_int, default=None,
                               help="%s (default %d)" % (help_text, MODALITY_OPTIONS[modality][dest]))
    args = parser.parse_args(argv)
    for modality, defaults in MODALITY_OPTIONS.items():
        on = any(getattr(args, dest) is not None for dest in defaults)
        setattr(args, modality, on)
        for dest, default in defaults.items():
            if getattr(args, dest) is None:
                setattr(args, dest, default)
    if not any(args.text or getattr(args, m) for m in MODALITY_OPTIONS):
        parser.error("no modality: give at least one of --text-tokens, --image-grid, --video-frames, "
                     "--audio-patches (or another option of that modality)")
    if args.text and args.text_tokens < 2:
        parser.error("--text-tokens must be >= 2 (BOS and EOS), got %d" % args.text_tokens)
    if args.text and args.vocab_size <= FIRST_ID:
        parser.error("--vocab-size must be > %d (ids 0-3 are reserved), got %d" % (FIRST_ID, args.vocab_size))
    if args.text and args.vocab_size > 2 ** 31:
        parser.error("--vocab-size must fit int32 ids, got %d" % args.vocab_size)
    args.max_shard_bytes = max(1, int(round(args.max_shard_mb * (1 << 20))))
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.monotonic()
    layout = Layout(args)
    prepare_folder(args.out)
    writer = Writer(args.out, args.max_shard_bytes)
    for i in range(args.samples):
        writer.add("syn%05d" % i, layout.sample(args.seed, i))
    writer.close_shard()
    # Shards of an earlier, larger run that the new index does not list.
    kept = {s["file"] for s in writer.closed}
    for name in os.listdir(args.out):
        if name not in kept and name.startswith(PREFIX + "-") and name.endswith(".safetensors"):
            os.unlink(os.path.join(args.out, name))
    writer.finish()
    seconds = time.monotonic() - start
    tokens = ", ".join("%s %d" % kv for kv in layout.tokens().items())
    print("make_synthetic_shards: %d samples, %d shard%s, %d bytes (%.1f MiB) in %s; tokens per sample: %s; "
          "%.2f s" % (args.samples, len(writer.closed), "" if len(writer.closed) == 1 else "s", writer.total_bytes,
                      writer.total_bytes / (1 << 20), args.out, tokens, seconds), file=sys.stderr)


if __name__ == "__main__":
    main()
