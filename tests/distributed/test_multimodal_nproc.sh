#!/usr/bin/env bash
# `longnet run --nproc 2` of a multimodal experiment on CPU (Gloo): the contrastive losses gather every rank's
# embeddings (with gradient), so two ranks with half the batch each train exactly like one process with the whole
# batch — the same loss at every step (float32 sums in another order: 1e-4 relative). Rank 0 alone writes the run folder.
#
#   tests/distributed/test_multimodal_nproc.sh path/to/longnet path/to/python path/to/repo
set -euo pipefail
longnet=$1
python=$2
repo=$3
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

# Random samples of the quickstart's shapes: text ids, 8 video frames of 4 patches (1536 values), audio patches (320).
for split in train val; do
  "$python" "$repo/tools/make_synthetic_shards.py" --out "$dir/shards/$split" --samples 24 --seed "${#split}" \
    --text-tokens 8 --vocab-size 64 --video-frames 8 --video-grid 2 --video-dim 1536 --audio-patches 6 \
    --audio-dim 320 >/dev/null
done
sets=(--set "data.shards=$dir/shards" --set "data.tokenizer=$dir/unused.model" --set "run.output_dir=$dir/runs"
      --set run.device=cpu --set train.steps=4 --set train.warmup_steps=1 --set train.log_every=1
      --set eval.every=0 --set objectives.lm=0 --set data.missing_rate=0.3 --set data.loader_workers=1
      --set 'eval.zero_shot_classes=[]')

"$longnet" run "$repo/experiments/quickstart.toml" "${sets[@]}" --set train.batch_size=8 --set run.name=one \
  >"$dir/one.log" 2>&1 || { cat "$dir/one.log"; exit 1; }
"$longnet" run "$repo/experiments/quickstart.toml" --nproc 2 "${sets[@]}" --set train.batch_size=4 --set run.name=two \
  >"$dir/two.log" 2>&1 || { cat "$dir/two.log"; exit 1; }
grep -q "2 data-parallel ranks, rank 1, global batch 8" "$dir/two.log" || { echo "rank 1 did not train"; cat "$dir/two.log"; exit 1; }
test ! -e "$dir/runs/two-2" || { echo "a rank other than 0 wrote a run folder"; exit 1; }
"$python" - "$dir/runs/one" "$dir/runs/two" <<'PY'
import json, sys
def train(run):
    return [r for r in map(json.loads, open(run + "/metrics.jsonl")) if r["kind"] == "train"]
one, two = train(sys.argv[1]), train(sys.argv[2])
assert len(one) == len(two) == 4, (len(one), len(two))
for a, b in zip(one, two):
    for key in ("loss", "loss_video_text", "loss_audio_text", "loss_media_text", "temperature", "grad_norm"):
        assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    assert a["samples_per_s"] > 0 and b["samples_per_s"] > 0
s = json.load(open(sys.argv[2] + "/summary.json"))
assert s["data_parallel_ranks"] == 2, s
print("2 ranks match 1 process:", [round(r["loss"], 6) for r in two])
PY
echo "ok"
