#!/usr/bin/env python3
"""tools/make_demo_dataset.py end to end: 6 samples into a temporary folder; the manifest's keys, splits, missing
modalities and captions; ffprobe reads every video (h264 at the asked size, an audio stream exactly where the sample
has audio) and every audio file; a second run makes nothing and changes nothing; other options into the same folder
are refused; --corpus gathers UTF-8 documents (gzip included) and skips binary and duplicate files.

    tests/tools/test_make_demo_dataset.py [path/to/make_demo_dataset.py]
"""
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile

from checks import check, finish, run_tool

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "tools", "make_demo_dataset.py")


def tool(*args):
    return run_tool(TOOL, *args)


def probe(path):
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,codec_name,width,height",
                          "-of", "json", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)["streams"]


def snapshot(folder):
    return {os.path.relpath(os.path.join(r, f), folder): os.stat(os.path.join(r, f)).st_mtime_ns
            for r, _, files in os.walk(folder) for f in files}


def test_dataset(tmp):
    out = os.path.join(tmp, "demo")
    args = ["--out", out, "--count", "6", "--jobs", "2", "--seed", "5", "--size", "96", "--fps", "10",
            "--no-video-fraction", "0.17", "--no-audio-fraction", "0.17", "--no-text-fraction", "0.17",
            "--val-fraction", "0.17", "--test-fraction", "0.17", "--progress-every", "1"]
    first = tool(*args)
    check(first.returncode == 0, "first run exits 0" + ("" if first.returncode == 0 else ": " + first.stderr[-500:]))
    check("[6/6] samples ready" in first.stderr, "progress on stderr")

    with open(os.path.join(out, "manifest.jsonl"), encoding="utf-8") as f:
        samples = [json.loads(line) for line in f]
    check(len(samples) == 6, "6 manifest lines")
    check(len({s["id"] for s in samples}) == 6, "ids are unique")
    check(sorted(s["split"] for s in samples) == ["test", "train", "train", "train", "train", "val"],
          "splits: 4 train, 1 val, 1 test")
    for key in ("video", "audio", "text"):
        check(sum(key not in s for s in samples) == 1, "exactly one sample lacks %s" % key)
    for s in samples:
        check(set(s) <= {"id", "split", "video", "audio", "image", "text", "label"}, s["id"] + ": known keys only")
        check(any(k in s for k in ("video", "audio", "text")), s["id"] + ": not empty")
        if "text" in s:
            caption = s["text"][0]
            m = re.fullmatch(r"(one|two|three) (\w+) (squares?|bars?) moving (left|right|up|down)", caption)
            check(m is not None, "%s: caption '%s' has the expected form" % (s["id"], caption))
            if m:
                check((m.group(1) == "one") == (not m.group(3).endswith("s")), s["id"] + ": number agrees")
                check(s["label"] == ["left", "right", "up", "down"].index(m.group(4)), s["id"] + ": label = direction")
                check(m.group(2) in s["text"][1] and m.group(4) in s["text"][1], s["id"] + ": captions agree")
        if "video" in s:
            streams = probe(os.path.join(out, s["video"]))
            check(streams is not None, "%s: ffprobe reads %s" % (s["id"], s["video"]))
            streams = streams or []
            video = [st for st in streams if st["codec_type"] == "video"]
            audio = [st for st in streams if st["codec_type"] == "audio"]
            check(len(video) == 1 and video[0]["codec_name"] == "h264" and video[0]["width"] == 96
                  and video[0]["height"] == 96, s["id"] + ": one h264 96x96 video stream")
            check(len(audio) == ("audio" in s), "%s: %s audio track" % (s["id"], "an" if "audio" in s else "no"))
        if "audio" in s:
            streams = probe(os.path.join(out, s["audio"])) or []
            check([st["codec_type"] for st in streams] == ["audio"], "%s: ffprobe reads %s" % (s["id"], s["audio"]))
    leftovers = [f for f in snapshot(out) if os.path.basename(f).startswith(".tmp-")]
    check(not leftovers, "no temporary files left")

    before = snapshot(out)
    second = tool(*args)
    check(second.returncode == 0, "second run exits 0")
    check("0 files made" in second.stderr, "second run makes nothing")
    after = snapshot(out)
    check({k: v for k, v in after.items() if k != "manifest.jsonl"} ==
          {k: v for k, v in before.items() if k != "manifest.jsonl"}, "second run leaves the media files alone")

    # An interrupted run: a missing file and a temporary leftover; the rerun remakes the one file, the same bytes.
    video = os.path.join(out, next(s["video"] for s in samples if "video" in s))
    with open(video, "rb") as f:
        original = f.read()
    os.remove(video)
    with open(os.path.join(out, "videos", ".tmp-1-1-x.mp4"), "wb") as f:
        f.write(b"partial")
    third = tool(*args)
    check(third.returncode == 0 and "1 files made" in third.stderr, "a rerun remakes the one missing file")
    with open(video, "rb") as f:
        check(f.read() == original, "the remade video is byte-identical")
    check(not os.path.exists(os.path.join(out, "videos", ".tmp-1-1-x.mp4")), "the leftover is removed")

    other = tool(*(args[:-2] + ["--progress-every", "0", "--fps", "12"]))
    check(other.returncode == 2 and "other options (fps)" in other.stderr, "other options into the folder: refused")


def test_corpus(tmp):
    docs = os.path.join(tmp, "doc")
    os.makedirs(os.path.join(docs, "pkg-a"))
    os.makedirs(os.path.join(docs, "pkg-b"))
    with gzip.open(os.path.join(docs, "pkg-a", "changelog.Debian.gz"), "wt", encoding="utf-8") as f:
        f.write("pkg-a (1.0) unstable; urgency=low\n\n  * Initial release. Ünïcode ok.\n")
    with open(os.path.join(docs, "pkg-a", "copyright"), "w", encoding="utf-8") as f:
        f.write("Licence text shared by packages\n")
    with open(os.path.join(docs, "pkg-b", "copyright"), "w", encoding="utf-8") as f:
        f.write("Licence text shared by packages\n")
    with open(os.path.join(docs, "pkg-b", "logo.bin"), "wb") as f:
        f.write(b"\x89PNG\0\0binary")
    with open(os.path.join(docs, "pkg-b", "latin1.txt"), "wb") as f:
        f.write("caf\xe9".encode("latin-1"))
    corpus = os.path.join(tmp, "corpus", "docs.txt")
    run = tool("--corpus", corpus, "--corpus-roots", docs)
    check(run.returncode == 0, "corpus mode exits 0" + ("" if run.returncode == 0 else ": " + run.stderr[-500:]))
    with open(corpus, encoding="utf-8") as f:
        text = f.read()
    check("Initial release. Ünïcode ok." in text, "the gzip changelog is in the corpus")
    check(text.count("Licence text shared by packages") == 1, "duplicate documents are kept once")
    check("PNG" not in text and "caf" not in text, "binary and non-UTF-8 files are skipped")
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty)
    check(tool("--corpus", os.path.join(tmp, "none.txt"), "--corpus-roots", empty).returncode == 1,
          "no documents: exit 1")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        test_dataset(tmp)
        test_corpus(tmp)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
