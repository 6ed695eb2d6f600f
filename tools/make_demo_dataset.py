#!/usr/bin/env python3
"""The demo dataset: short synthetic videos of coloured shapes moving across the frame, a spoken description of each
as its audio track, matching captions, and a manifest.jsonl with train/val/test splits. Also, with --corpus, a plain
UTF-8 text corpus gathered from the documentation Debian packages install, for long-context language modelling.

    tools/make_demo_dataset.py --out data/demo                    # 300 samples
    tools/make_demo_dataset.py --out /tmp/d --count 6 --jobs 2    # a quick one
    tools/make_demo_dataset.py --corpus data/corpus/debian-docs.txt

Needs only Python's standard library and the ffmpeg and espeak-ng programs.

Layout of --out:
    videos/<id>.mp4   h264, with the spoken caption as an AAC track when the sample has audio
    audio/<id>.wav    the spoken caption (espeak-ng), for every sample with audio
    manifest.jsonl    one sample a line: id, split, video, audio, text (two captions), label (direction index)
    dataset.json      the options the files were made with

Every sample is a function of (seed, index) alone, so any subset of the files can be remade and comes out the same.
Files are written under a temporary name and renamed, so a file under its final name is complete: a second run skips
them and makes only what is missing (an interrupted run resumes). dataset.json guards against mixing options: a
second run with different options into the same folder is refused. The manifest is written last.
"""
import argparse
import concurrent.futures
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import wave

COLOURS = [("red", "0xe02020"), ("green", "0x20c040"), ("blue", "0x3060ff"), ("yellow", "0xf0e020"),
           ("white", "0xf0f0f0"), ("purple", "0xa040d0"), ("orange", "0xff8010"), ("cyan", "0x20d0d0")]
BACKGROUNDS = [("dark", "0x181818"), ("grey", "0x606060"), ("navy", "0x101848")]
SHAPES = ["square", "bar"]  # a bar is twice as long as it is wide, along its direction of motion
DIRECTIONS = ["left", "right", "up", "down"]  # the label is the index in this list
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp"]

# Options that change what a sample looks like; dataset.json records them.
CONTENT_OPTIONS = ["count", "seed", "size", "fps", "min_seconds", "max_seconds", "no_video_fraction",
                   "no_audio_fraction", "no_text_fraction", "val_fraction", "test_fraction"]


def log(message):
    print(message, file=sys.stderr, flush=True)


def atomic_path(path):
    """A temporary name next to `path` with the same extension (ffmpeg picks the format from it)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, ".tmp-%d-%d-%s" % (os.getpid(), threading.get_ident(), name))


def write_text_atomic(path, text):
    tmp = atomic_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run(command):
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if result.returncode != 0:
        raise RuntimeError("%s failed (exit %d): %s" % (command[0], result.returncode,
                                                       result.stderr.decode(errors="replace").strip()[-2000:]))


def pick(count, fraction, rng_order, taken):
    """round(count * fraction) sample indices from rng_order that are not yet in `taken`."""
    want = int(round(count * fraction))
    chosen = [i for i in rng_order if i not in taken][:want]
    taken.update(chosen)
    return set(chosen)


def plan(args):
    """The description of every sample: content, modalities and split, all from the seed."""
    order = list(range(args.count))
    random.Random("%d-modalities" % args.seed).shuffle(order)
    # Disjoint sets: a sample lacks at most one modality, so none is empty.
    taken = set()
    no_video = pick(args.count, args.no_video_fraction, order, taken)
    no_audio = pick(args.count, args.no_audio_fraction, order, taken)
    no_text = pick(args.count, args.no_text_fraction, order, taken)

    split_order = list(range(args.count))
    random.Random("%d-splits" % args.seed).shuffle(split_order)
    n_test = int(round(args.count * args.test_fraction))
    n_val = int(round(args.count * args.val_fraction))
    split = {}
    for rank, i in enumerate(split_order):
        split[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"

    samples = []
    for i in range(args.count):
        rng = random.Random("%d-sample-%d" % (args.seed, i))
        count = rng.randint(1, 3)
        colour, colour_hex = rng.choice(COLOURS)
        background, background_hex = rng.choice(BACKGROUNDS)
        shape = rng.choice(SHAPES)
        direction = rng.choice(DIRECTIONS)
        seconds = round(rng.uniform(args.min_seconds, args.max_seconds), 2)
        voice = rng.choice(VOICES)
        words_per_minute = rng.randint(150, 190)
        noun = shape + ("s" if count > 1 else "")
        caption = "%s %s %s moving %s" % (COUNT_WORDS[count], colour, noun, direction)
        long_caption = "a video of %s %s %s moving %s on a %s background" % (
            COUNT_WORDS[count], colour, noun, direction, background)
        samples.append({
            "index": i, "id": "demo%05d" % i, "split": split[i], "count": count, "colour": colour_hex,
            "background": background_hex, "shape": shape, "direction": direction, "seconds": seconds,
            "voice": voice, "wpm": words_per_minute, "captions": [caption, long_caption],
            "lanes": rng.sample(range(3), count), "phase": [rng.uniform(0.0, 0.25) for _ in range(count)],
            "has_video": i not in no_video, "has_audio": i not in no_audio, "has_text": i not in no_text,
        })
    return samples


def overlay_filter(sample, size, fps):
    """Overlays one coloured box per shape on the background, moving by an expression of time."""
    n = sample["count"]
    side = size // 8
    horizontal = sample["direction"] in ("left", "right")
    length = 2 * side if sample["shape"] == "bar" else side
    w, h = (length, side) if horizontal else (side, length)
    travel = size - (w if horizontal else h)
    speed = travel / max(sample["seconds"], 0.1)  # crosses the frame once in the clip
    parts, last = [], "0:v"
    for k in range(n):
        lane = (sample["lanes"][k] + 0.5) * size / 3  # three lanes across the motion, one shape each
        start = sample["phase"][k] * travel
        if sample["direction"] in ("right", "down"):
            pos = "%.2f+%.3f*t" % (start * 0.3, speed * 0.7)
        else:
            pos = "%.2f-%.3f*t" % (travel - start * 0.3, speed * 0.7)
        across = "%d" % int(lane - (h if horizontal else w) / 2)
        x, y = (pos, across) if horizontal else (across, pos)
        parts.append("color=c=%s:s=%dx%d:r=%d[s%d]" % (sample["colour"], w, h, fps, k))
        out = "v%d" % k
        parts.append("[%s][s%d]overlay=x='%s':y='%s':eval=frame:shortest=1[%s]" % (last, k, x, y, out))
        last = out
    return ";".join(parts), last


def wav_seconds(path):
    with wave.open(path, "rb") as w:
        return w.getnframes() / float(w.getframerate())


def make_sample(sample, args):
    """Makes the sample's missing files; returns the number of files made."""
    made = 0
    audio = os.path.join(args.out, "audio", sample["id"] + ".wav")
    video = os.path.join(args.out, "videos", sample["id"] + ".mp4")
    if sample["has_audio"] and not os.path.exists(audio):
        tmp = atomic_path(audio)
        run(["espeak-ng", "-v", sample["voice"], "-s", str(sample["wpm"]), "-w", tmp, sample["captions"][0]])
        os.replace(tmp, audio)
        made += 1
    if sample["has_video"] and not os.path.exists(video):
        seconds = sample["seconds"]
        if sample["has_audio"]:  # long enough for the whole sentence
            seconds = max(seconds, round(wav_seconds(audio) + 0.2, 2))
        graph, last = overlay_filter(dict(sample, seconds=seconds), args.size, args.fps)
        command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                   "color=c=%s:s=%dx%d:r=%d:d=%.2f" % (sample["background"], args.size, args.size, args.fps, seconds)]
        if sample["has_audio"]:
            command += ["-i", audio]
        command += ["-filter_complex", graph, "-map", "[%s]" % last]
        if sample["has_audio"]:
            # Silence after the sentence, cut at the end of the video.
            command += ["-map", "1:a", "-af", "apad", "-shortest", "-c:a", "aac", "-b:a", "64k", "-ac", "1"]
        command += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-g", str(args.fps),
                    "-threads", "1", "-movflags", "+faststart", "-map_metadata", "-1", "-fflags", "+bitexact",
                    "-f", "mp4"]
        tmp = atomic_path(video)
        run(command + [tmp])
        os.replace(tmp, video)
        made += 1
    return made


def manifest_line(sample):
    entry = {"id": sample["id"], "split": sample["split"]}
    if sample["has_video"]:
        entry["video"] = "videos/%s.mp4" % sample["id"]
    if sample["has_audio"]:
        entry["audio"] = "audio/%s.wav" % sample["id"]
    if sample["has_text"]:
        entry["text"] = sample["captions"]
    entry["label"] = DIRECTIONS.index(sample["direction"])
    return json.dumps(entry, sort_keys=False)


def remove_leftovers(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            if name.startswith(".tmp-"):
                os.remove(os.path.join(root, name))


def make_dataset(args):
    for folder in (args.out, os.path.join(args.out, "videos"), os.path.join(args.out, "audio")):
        os.makedirs(folder, exist_ok=True)
    options = {key: getattr(args, key) for key in CONTENT_OPTIONS}
    options_file = os.path.join(args.out, "dataset.json")
    if os.path.exists(options_file):
        with open(options_file, encoding="utf-8") as f:
            earlier = json.load(f)
        if earlier != options:
            changed = sorted(k for k in set(earlier) | set(options) if earlier.get(k) != options.get(k))
            log("error: %s was made with other options (%s); use a new folder" % (args.out, ", ".join(changed)))
            return 2
    else:
        write_text_atomic(options_file, json.dumps(options, indent=1, sort_keys=True) + "\n")
    remove_leftovers(args.out)

    samples = plan(args)
    done, made, lock = 0, 0, threading.Lock()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(make_sample, s, args): s for s in samples}
        for future in concurrent.futures.as_completed(futures):
            sample = futures[future]
            try:
                files = future.result()
            except Exception as e:  # report which sample, then stop
                for f in futures:
                    f.cancel()
                log("error: sample %s: %s" % (sample["id"], e))
                return 1
            with lock:
                done += 1
                made += files
                if args.progress_every and (done % args.progress_every == 0 or done == len(samples)):
                    log("[%d/%d] samples ready (%d files made)" % (done, len(samples), made))

    write_text_atomic(os.path.join(args.out, "manifest.jsonl"), "".join(manifest_line(s) + "\n" for s in samples))
    counts = {name: sum(1 for s in samples if s["split"] == name) for name in ("train", "val", "test")}
    log("wrote %s: %d samples (train %d, val %d, test %d), %d files made, %d already there" % (
        os.path.join(args.out, "manifest.jsonl"), len(samples), counts["train"], counts["val"], counts["test"],
        made, sum(s["has_video"] + s["has_audio"] for s in samples) - made))
    return 0


# ---- text corpus -------------------------------------------------------------------------------------------------

SKIP_SUFFIXES = (".html", ".htm", ".js", ".css", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf", ".xml", ".json",
                 ".ico", ".woff", ".ttf", ".bz2", ".xz", ".zip", ".deb", ".db", ".pyc")


def read_document(path):
    """The file's text (gzip is decompressed), or None when it is not UTF-8 text."""
    name = path.lower()
    if name.endswith(SKIP_SUFFIXES) or name.endswith(tuple(s + ".gz" for s in SKIP_SUFFIXES)):
        return None
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read(16 << 20)
        else:
            with open(path, "rb") as f:
                data = f.read(16 << 20)
        if b"\0" in data:
            return None
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    text = text.replace("\r\n", "\n").strip()
    return text if text else None


def make_corpus(args):
    paths = []
    for root in args.corpus_roots:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    paths.append(path)
    paths.sort()  # the same order, so the same corpus, on the same system
    seen, parts, total, kept = set(), [], 0, 0
    limit = int(args.corpus_max_mb * (1 << 20))
    for path in paths:
        text = read_document(path)
        if text is None:
            continue
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen:  # licences and copyright files repeat across packages
            continue
        seen.add(digest)
        piece = text + "\n\n"
        size = len(piece.encode("utf-8"))
        if limit and total + size > limit:
            break
        parts.append(piece)
        total += size
        kept += 1
    if not parts:
        log("error: no UTF-8 text documents under %s" % ", ".join(args.corpus_roots))
        return 1
    folder = os.path.dirname(os.path.abspath(args.corpus))
    os.makedirs(folder, exist_ok=True)
    write_text_atomic(args.corpus, "".join(parts))
    log("wrote %s: %d documents of %d files, %.1f MiB" % (args.corpus, kept, len(paths), total / (1 << 20)))
    return 0


def fraction(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be in [0, 1], got %s" % text)
    return value


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1, got %s" % text)
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="dataset folder (created)")
    parser.add_argument("--count", type=positive, default=300, help="samples (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=positive, default=os.cpu_count() or 1, help="samples made in parallel")
    parser.add_argument("--size", type=positive, default=128, help="frame width and height in pixels")
    parser.add_argument("--fps", type=positive, default=12)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=4.0)
    parser.add_argument("--no-video-fraction", type=fraction, default=0.1, help="samples without video")
    parser.add_argument("--no-audio-fraction", type=fraction, default=0.15, help="samples without audio")
    parser.add_argument("--no-text-fraction", type=fraction, default=0.1, help="samples without captions")
    parser.add_argument("--val-fraction", type=fraction, default=0.1)
    parser.add_argument("--test-fraction", type=fraction, default=0.1)
    parser.add_argument("--progress-every", type=int, default=10, help="a progress line every N samples (0: none)")
    parser.add_argument("--corpus", metavar="FILE", help="gather a text corpus into FILE instead")
    parser.add_argument("--corpus-roots", nargs="+", default=["/usr/share/doc", "/usr/share/common-licenses"])
    parser.add_argument("--corpus-max-mb", type=float, default=0.0, help="stop at this size (0: no limit)")
    args = parser.parse_args(argv)

    if args.corpus:
        return make_corpus(args)
    if not args.out:
        parser.error("give --out FOLDER (or --corpus FILE)")
    if not 0 < args.min_seconds <= args.max_seconds:
        parser.error("need 0 < --min-seconds <= --max-seconds")
    if args.no_video_fraction + args.no_audio_fraction + args.no_text_fraction > 1.0:
        parser.error("the no-video, no-audio and no-text fractions add up to more than 1")
    if args.val_fraction + args.test_fraction > 1.0:
        parser.error("the val and test fractions add up to more than 1")
    if args.size < 48:
        parser.error("--size must be at least 48")
    return make_dataset(args)


if __name__ == "__main__":
    sys.exit(main())
