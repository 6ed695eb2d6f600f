#!/usr/bin/env bash
# The multimodal workflow end to end on a tiny generated demo dataset: `longnet prepare` (a corrupt and a missing
# media file are reported and skipped), `longnet run` of experiments/quickstart.toml (metrics, TensorBoard events,
# checkpoints, summary with retrieval), kill -9 in the middle of a second run and `longnet run --resume` (the resumed
# run must end with exactly the metrics of the uninterrupted one, on the CPU), `longnet embed` to .safetensors and
# .npy (read back with numpy and safetensors), and `longnet ablate` (table, CSV, plot).
#
#   tests/apps/test_multimodal_cli.sh path/to/longnet path/to/python path/to/repo
set -uo pipefail

if [ $# -ne 3 ] || [ ! -x "$1" ]; then
  echo "usage: $0 path/to/longnet path/to/python path/to/repo" >&2
  exit 2
fi
longnet=$1
python=$2
repo=$3
# shellcheck source=cli_harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/cli_harness.sh"

# ---- a tiny demo dataset, one corrupt video and one missing audio file --------------------------------------------
"$python" "$repo/tools/make_demo_dataset.py" --out "$tmp/demo" --count 28 --size 48 --min-seconds 1 --max-seconds 1.5 \
  --jobs 2 --progress-every 0 || { echo "FAIL: make_demo_dataset.py"; exit 1; }
first_video=$(ls "$tmp/demo/videos" | head -1)
head -c 300 "$tmp/demo/videos/$first_video" >"$tmp/demo/videos/cut.mp4" && mv "$tmp/demo/videos/cut.mp4" \
  "$tmp/demo/videos/$first_video"
first_audio=$(ls "$tmp/demo/audio" | tail -1)  # another sample than the video's
rm "$tmp/demo/audio/$first_audio"

common=(--set "data.manifest=$tmp/demo/manifest.jsonl" --set "data.shards=$tmp/shards"
        --set "data.tokenizer=$tmp/tok.model" --set "run.output_dir=$tmp/runs" --set train.batch_size=8
        --set train.steps=24 --set train.log_every=4 --set train.checkpoint_every=4 --set train.keep_checkpoints=2
        --set train.warmup_steps=4 --set eval.every=12 --set prepare.workers=2 --set prepare.tokenizer_vocab_size=40
        --set 'eval.zero_shot_classes=["left","right","up","down"]'
        --set 'eval.zero_shot_templates=["moving {}","shapes moving {}"]')
config=$repo/experiments/quickstart.toml

run prepare prepare "$config" "${common[@]}"
expect_status 0
expect_stdout_match "skipped 2 bad of 28 samples"
expect_stdout_match "skipped demo[0-9]+: video: .*${first_video}"
expect_stdout_match "skipped demo[0-9]+: audio: .*${first_audio}"
expect_file "$tmp/tok.model"
expect_file "$tmp/shards/train/index.json"
expect_file "$tmp/shards/zero_shot_prompts.json"
if [ "$(wc -l <"$tmp/shards/bad_samples.jsonl")" -eq 2 ]; then pass "bad_samples.jsonl lists 2 samples"; else
  fail "bad_samples.jsonl does not list 2 samples"; fi

# Above data.max_bad_fraction (2 of 28 = 7 % here) prepare fails after writing what it could, and training refuses.
run prepare_too_bad prepare "$config" "${common[@]}" --set data.max_bad_fraction=0.05
expect_status 1
if grep -qE "^error: prepare: 2 of 28 samples could not be decoded, more than data.max_bad_fraction = 0.05" \
  "$tmp/err"; then pass "prepare stops above data.max_bad_fraction"; else fail "no max_bad_fraction error"; fi
run train_too_bad run "$config" "${common[@]}" --set data.max_bad_fraction=0.05 --set run.name=refused
expect_status 1
expect_one_error_line "error: .*prepare_summary.json: 2 of 28 samples could not be decoded"
expect_absent "$tmp/runs/refused"

# Audio fitted to a fixed length (the demo's clips are 1-1.5 s of speech and padding): counted in the summary.
run prepare_fit prepare "$config" "${common[@]}" --set "data.shards=$tmp/shards_fit" --set prepare.audio_seconds=1.2 \
  --set 'prepare.audio_fit="loop"'
expect_status 0
expect_stdout_match "^audio fitted to 1.2 s: [0-9]+ cropped, 0 padded, [0-9]+ looped$"
last=prepare_fit_summary
if "$python" -c "
import json, sys
s = json.load(open(sys.argv[1]))
assert s['audio_fit'] == 'loop' and s['audio_cropped'] + s['audio_looped'] >= 1 and s['audio_padded'] == 0, s
" "$tmp/shards_fit/prepare_summary.json"; then pass "prepare_summary.json counts the fitted clips"; else
  fail "audio fit counts"; fi

run prepare_fail prepare "$config" "${common[@]}" --set "data.shards=$tmp/shards_fail" --set prepare.on_bad=fail
expect_status 1
if grep -qE "^error: .*manifest.jsonl:[0-9]+: sample 'demo[0-9]+': .*on_bad = \"fail\"" "$tmp/err"; then
  pass "on_bad = fail stops at the first bad sample, naming it"; else fail "no error line naming the bad sample"; fi

run prepare_vocab prepare "$config" "${common[@]}" --set "data.tokenizer=$tmp/big.model" \
  --set prepare.tokenizer_vocab_size=60
expect_status 2
if grep -qE "^error: .*prepare.tokenizer_vocab_size = 60 is too large for the train captions.*<= [0-9]+" "$tmp/err"
then pass "a vocabulary too large for the captions is a config error naming the key"; else fail "vocab error"; fi
expect_absent "$tmp/big.model"

# ---- two datasets mixed by weight: each prepared into its own shards, training draws from both -------------------
"$python" - "$tmp/demo/manifest.jsonl" "$tmp/demo/manifest_b.jsonl" <<'EOF'
import json, sys
with open(sys.argv[1]) as src, open(sys.argv[2], "w") as dst:
    for line in src:
        s = json.loads(line)
        if s["split"] == "train":
            s["id"] = "b_" + s["id"]
            dst.write(json.dumps(s) + "\n")
EOF
mix=(--set 'data.manifest=""' --set 'data.shards=""' --set "data.tokenizer=$tmp/tok.model" --set "run.output_dir=$tmp/runs" --set train.batch_size=8
     --set train.steps=6 --set train.warmup_steps=2 --set train.log_every=2 --set eval.every=0 --set prepare.workers=2
     --set "data.sources=[{manifest = \"$tmp/demo/manifest.jsonl\", shards = \"$tmp/mix_a\"}, {manifest = \"$tmp/demo/manifest_b.jsonl\", shards = \"$tmp/mix_b\", weight = 2.0}]"
     --set data.epoch_samples=40 --set prepare.eval_clips=2 --set prepare.video_clip_seconds=0.8
     --set prepare.train_clips=2)
run prepare_mix prepare "$config" "${mix[@]}"
expect_status 0
expect_stdout_match "bad of 28 samples → $tmp/mix_a$"
expect_stdout_match "bad of [0-9]+ samples → $tmp/mix_b$"
run train_mix run "$config" "${mix[@]}" --set run.name=mixed
expect_status 0
if grep -qE "train samples in 2 sources \(5 batches an epoch\)" "$tmp/err"; then
  pass "training draws from both sources, 40 samples an epoch"; else fail "no mixing in the run log"; fi
if grep -qE "weight = 2\.0" "$tmp/runs/mixed/config.toml"; then pass "the run's config.toml keeps the sources"; else
  fail "sources missing from config.toml"; fi
# The resolved config in the run folder repeats the run: the same losses on the CPU.
run repeat_run run "$tmp/runs/mixed/config.toml" --set run.name=mixed_again
expect_status 0
last=repeat_compare
if "$python" - "$tmp/runs/mixed" "$tmp/runs/mixed_again" <<'EOF'
import json, sys
a, b = (json.load(open(d + "/summary.json")) for d in sys.argv[1:3])
assert a["final_train_loss"] == b["final_train_loss"] and a["retrieval"] == b["retrieval"], (a, b)
EOF
then pass "longnet run RUN/config.toml repeats the run"; else fail "the repeated run differs"; fi
last=eval_clips
if "$python" - "$tmp/runs/mixed" "$tmp/mix_a" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1] + "/retrieval.json"))
p = r["pairs"]["text_to_video"]
assert p["video_clips"] == 2 and "mean of its 2 clips" in p["protocol"], p
s = json.load(open(sys.argv[2] + "/prepare_summary.json"))
assert s["eval_clips"] == 2 and s["train_clips"] == 2 and s["video_clip_seconds"] == 0.8, s
index = json.load(open(sys.argv[2] + "/train/index.json"))
assert "video_patches_clip1" in json.dumps(index), "train samples lack their second clip"
EOF
then pass "held-out videos are embedded as the mean of 2 clips"; else fail "eval clips"; fi

# ---- an uninterrupted run --------------------------------------------------------------------------------------
run train run "$config" "${common[@]}" --set run.name=whole
expect_status 0
whole=$tmp/runs/whole
expect_file "$whole/summary.json"
expect_file "$whole/metrics.jsonl"
expect_file "$whole/config.toml"
if [ "$(wc -l <"$whole/bad_media.jsonl")" -eq 2 ]; then pass "the run folder lists the 2 bad samples"; else
  fail "bad_media.jsonl in the run folder"; fi
if [ "$(ls "$whole/checkpoints" | wc -l)" -eq 2 ]; then pass "2 checkpoints kept"; else fail "checkpoints: $(ls "$whole/checkpoints")"; fi
if ls "$whole"/tensorboard/events.out.tfevents.* >/dev/null 2>&1; then pass "TensorBoard event file written"; else
  fail "no TensorBoard event file"; fi
last=retrieval_json
if "$python" - "$whole" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1] + "/retrieval.json"))
assert r["step"] == 24 and r["split"] == "val", r
for pair in ("text_to_video", "video_to_text", "text_to_media", "video_to_audio", "audio_to_video"):
    p = r["pairs"][pair]
    assert 0 <= p["r1"] <= p["r5"] <= p["r10"] <= 100 and p["chance_r1"] == 100 / p["gallery"], (pair, p)
    assert p["protocol"], pair
# Two captions per demo sample: every caption is a text query, and the text gallery has both.
assert r["pairs"]["text_to_video"]["queries"] == 2 * r["pairs"]["video_to_text"]["queries"], r["pairs"]
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
assert all(r["peak_memory_gb"] > 0 for r in rows if r["kind"] == "train")
for m in ("media", "video", "audio"):
    z = r["zero_shot"][m]
    assert z["classes"] == 4 and z["chance_top1"] == 25 and z["samples"] >= 1, z
    assert 0 <= z["top1"] <= z["top5"] == 100, z  # 4 classes: the top 5 always hold the label
    assert any("zero_shot_%s_top1" % m in row for row in rows), m
print("retrieval.json has", sorted(r["pairs"]))
EOF
then pass "retrieval.json holds every pair with its protocol; peak memory logged"; else fail "retrieval.json"; fi

# ---- kill -9 in the middle, then resume ----------------------------------------------------------------------------
"$longnet" run "$config" "${common[@]}" --set run.name=killed >"$tmp/killed.out" 2>&1 &
pid=$!
killed=$tmp/runs/killed
for _ in $(seq 1 600); do
  if [ -e "$killed/checkpoints/step_00000012.pt" ]; then break; fi
  sleep 0.1
done
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
last=kill
if [ -e "$killed/summary.json" ]; then fail "the run finished before it was killed"; else pass "killed mid-run"; fi
run resume run --resume "$killed"
expect_status 0
if grep -q "resuming .*from step_000000" "$tmp/err"; then pass "resumed from a checkpoint"; else
  fail "no 'resuming' line"; fi

last=compare
if "$python" - "$whole" "$killed" <<'EOF'
import json, sys
whole, killed = sys.argv[1], sys.argv[2]
a, b = (json.load(open(d + "/summary.json")) for d in (whole, killed))
keys = ["final_train_loss", "final_train_losses", "retrieval"]
diff = [k for k in keys if a[k] != b[k]]
if diff:
    sys.exit("summaries differ in %s: %s vs %s" % (diff, [a[k] for k in diff], [b[k] for k in diff]))
if b.get("resumed_from_step", 0) <= 0 or b["resumed_from_step"] >= a["steps"]:
    sys.exit("resumed_from_step = %r" % b.get("resumed_from_step"))
def losses(d):
    rows = [json.loads(l) for l in open(d + "/metrics.jsonl")]
    return [(r["step"], r["kind"], r.get("loss"), r.get("text_to_video_r1")) for r in rows]
if losses(whole) != losses(killed):
    sys.exit("metrics.jsonl differ:\n%s\n%s" % (losses(whole), losses(killed)))
print("same final metrics and the same metrics.jsonl records after resuming from step %d" % b["resumed_from_step"])
EOF
then pass "resumed run equals the uninterrupted one"; else fail "resumed run differs"; fi

# TensorBoard reads the events of both files (the restart marker drops the interrupted run's later steps).
last=tensorboard
if "$python" - "$killed/tensorboard" <<'EOF'
import sys
from tensorboard.backend.event_processing import event_accumulator
acc = event_accumulator.EventAccumulator(sys.argv[1], purge_orphaned_data=True)
acc.Reload()
steps = [e.step for e in acc.Scalars("train/loss")]
assert steps == sorted(set(steps)) and steps[-1] == 24, steps
print("train/loss steps", steps)
EOF
then pass "TensorBoard sees one train/loss per step after the resume"; else fail "TensorBoard events"; fi

run resume_missing run --resume "$tmp/nowhere"
expect_status 2
expect_one_error_line "error: run --resume: '.*nowhere' is not a run folder"

# ---- embeddings --------------------------------------------------------------------------------------------------
run embed_st embed "$whole" --split val --out "$tmp/val.safetensors"
expect_status 0
run embed_npy embed "$whole" --split val --out "$tmp/val_npy"
expect_status 0
last=embed_read
if "$python" - "$tmp/val.safetensors" "$tmp/val_npy" "$tmp/shards/val/index.json" <<'EOF'
import json, sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
st, folder, index = sys.argv[1], sys.argv[2], sys.argv[3]
tensors = load_file(st)
with safe_open(st, framework="numpy") as f:
    ids = json.loads(f.metadata()["ids"])
expected = [s["id"] for shard in json.load(open(index))["shards"] for s in shard["samples"]]
assert ids == expected, (ids, expected)
for name in ("text", "video", "audio", "media"):
    x = tensors[name]
    assert x.dtype == np.float32 and x.shape == (len(ids), 64), (name, x.shape)
    assert np.allclose(np.load(folder + "/" + name + ".npy"), x)
present = tensors["present"]
norms = np.linalg.norm(tensors["video"], axis=1)
assert np.allclose(norms[present[:, 2]], 1, atol=1e-4) and np.all(norms[~present[:, 2]] == 0)
assert list(np.load(folder + "/ids.npy")) == ids
print(len(ids), "samples; embeddings agree between .safetensors and .npy")
EOF
then pass "embeddings read back with safetensors and numpy"; else fail "embeddings"; fi

# ---- ablation ------------------------------------------------------------------------------------------------------
run ablate ablate "$config" "${common[@]}" --set run.name=abl --set train.steps=4 --set eval.every=0 \
  --set train.checkpoint_every=0 --set 'ablate.strategies=["concat_seq","late"]' --set 'ablate.missing_rates=[0.0,0.5]'
expect_status 0
expect_file "$tmp/runs/abl-ablation/ablation.md"
expect_file "$tmp/runs/abl-ablation/ablation.png"
if [ "$(wc -l <"$tmp/runs/abl-ablation/ablation.csv")" -eq 5 ]; then pass "ablation.csv has 4 runs"; else
  fail "ablation.csv: $(cat "$tmp/runs/abl-ablation/ablation.csv")"; fi
if grep -qE "^\| late \| 0.5 \|" "$tmp/runs/abl-ablation/ablation.md"; then pass "ablation.md has the late / 0.5 row"; else
  fail "ablation.md: $(cat "$tmp/runs/abl-ablation/ablation.md")"; fi
run ablate_again ablate "$config" "${common[@]}" --set run.name=abl --set train.steps=4 --set eval.every=0 \
  --set train.checkpoint_every=0 --set 'ablate.strategies=["concat_seq","late"]' --set 'ablate.missing_rates=[0.0,0.5]'
expect_status 0
if [ "$(grep -c "finished earlier" "$tmp/err")" -eq 4 ]; then pass "a rerun reuses the 4 finished runs"; else
  fail "the rerun did not reuse the finished runs"; fi

run ablate_bad ablate "$config" "${common[@]}" --set 'ablate.strategies=["concat_seq","fancy"]'
expect_status 2
expect_one_error_line "error: .*ablate.strategies\[1\].*unknown fusion strategy \"fancy\""

[ "$failures" -eq 0 ] || { echo "$failures check(s) failed"; exit 1; }
echo "all checks passed"
