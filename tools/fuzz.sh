#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ with clang (-fsanitize=fuzzer,address,undefined) against the media sources
# (no LibTorch) and runs each one for FUZZ_RUNS executions (default 100000) from a small seed corpus that this script
# generates with the ffmpeg command line and OpenCV (through Python's cv2 when available, else ffmpeg's encoders).
#
#   tools/fuzz.sh                       build, make seeds, run image, video and audio
#   FUZZ_RUNS=1000000 tools/fuzz.sh video
#   FUZZ_OUT=/tmp/fz tools/fuzz.sh      where objects, binaries, corpora, logs and crash files go (default build-fuzz)
#
# Exit status: non-zero when a build fails or a fuzzer reports a crash (the reproducer is left in $FUZZ_OUT/crashes).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${FUZZ_OUT:-$repo/build-fuzz}
runs=${FUZZ_RUNS:-100000}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(image video audio)
CXX=${CXX_FUZZ:-clang++}
command -v "$CXX" >/dev/null || { echo "fuzz.sh: $CXX not found (libFuzzer needs clang)" >&2; exit 2; }
command -v ffmpeg >/dev/null || { echo "fuzz.sh: ffmpeg not found (needed for the seed corpus)" >&2; exit 2; }

pkgs="opencv4 libavformat libavcodec libswscale libswresample libavutil"
# -isystem: warnings in OpenCV's headers are not ours.
cflags="-std=c++20 -O1 -g -fno-omit-frame-pointer -I$repo $(pkg-config --cflags-only-I $pkgs | sed 's/-I/-isystem /g')"
sanitize="-fsanitize=address,undefined -fno-sanitize-recover=undefined"
libs="$(pkg-config --libs $pkgs) -lpthread"
mkdir -p "$out/obj" "$out/bin" "$out/crashes" "$out/logs"

# ---- build: the media sources and core/error.cpp once, then one binary per target ----------------------------
objs=()
for src in modalities/image.cpp modalities/video.cpp modalities/audio.cpp modalities/mel.cpp \
           modalities/patchify.cpp modalities/ffmpeg_input.cpp core/error.cpp; do
  obj="$out/obj/$(echo "$src" | tr / _).o"
  if [ ! -f "$obj" ] || [ "$repo/$src" -nt "$obj" ]; then
    echo "compiling $src"
    $CXX $cflags $sanitize -fsanitize=fuzzer-no-link -c "$repo/$src" -o "$obj"
  fi
  objs+=("$obj")
done
for t in "${targets[@]}"; do
  echo "linking fuzz_$t"
  $CXX $cflags $sanitize -fsanitize=fuzzer "$repo/fuzz/fuzz_$t.cpp" "${objs[@]}" $libs -o "$out/bin/fuzz_$t"
done

# ---- seeds: tiny valid files of every kind the decoders accept ---------------------------------------------------
seeds="$out/seeds"
ff() { ffmpeg -nostdin -v error -y "$@"; }
if [ ! -d "$seeds" ]; then
  mkdir -p "$seeds/image" "$seeds/video" "$seeds/audio"
  src="testsrc2=size=32x24:rate=10:duration=0.5"
  ff -f lavfi -i "$src" -frames:v 1 "$seeds/image/a.png"
  ff -f lavfi -i "$src" -frames:v 1 -pix_fmt gray "$seeds/image/gray.png"
  ff -f lavfi -i "$src" -frames:v 1 -pix_fmt rgba "$seeds/image/alpha.png"
  ff -f lavfi -i "$src" -frames:v 1 "$seeds/image/a.jpg"
  ff -f lavfi -i "$src" -frames:v 1 "$seeds/image/a.bmp"
  ff -f lavfi -i "$src" -frames:v 1 -c:v libwebp "$seeds/image/a.webp" || true
  ff -f lavfi -i "$src" -frames:v 1 -c:v libwebp -lossless 1 "$seeds/image/lossless.webp" || true
  ff -f lavfi -i "$src" -c:v libx264 -bf 2 -g 3 "$seeds/video/a.mp4"
  ff -f lavfi -i "$src" -c:v mpeg4 "$seeds/video/a.avi"
  ff -f lavfi -i "$src" -c:v libvpx "$seeds/video/a.webm" || true
  ff -f lavfi -i "$src" -c:v mpeg2video "$seeds/video/a.ts"
  ff -f lavfi -i "$src" -c:v mjpeg "$seeds/video/a.mkv"
  ff -f lavfi -i "testsrc2=size=16x16:rate=5:duration=0.4" "$seeds/video/a.y4m"
  ff -f lavfi -i "$src" -f lavfi -i "sine=duration=0.5" -c:v libx264 -c:a aac -shortest "$seeds/video/av.mp4"
  tone="sine=frequency=440:sample_rate=8000:duration=0.3"
  ff -f lavfi -i "$tone" -c:a pcm_s16le "$seeds/audio/a.wav"
  ff -f lavfi -i "$tone" -ac 2 -c:a pcm_f32le "$seeds/audio/stereo_f32.wav"
  ff -f lavfi -i "$tone" -c:a libmp3lame "$seeds/audio/a.mp3"
  ff -f lavfi -i "$tone" -c:a flac "$seeds/audio/a.flac"
  ff -f lavfi -i "$tone" -c:a aac "$seeds/audio/a.m4a"
  ff -f lavfi -i "sine=frequency=440:sample_rate=48000:duration=0.3" -c:a libopus "$seeds/audio/a.opus" || true
  ff -f lavfi -i "$tone" -c:a libvorbis "$seeds/audio/a.ogg" || true
fi

# ---- run -------------------------------------------------------------------------------------------------------
status=0
summary="$out/summary.txt"  # appended to: one line per run of a target
for t in "${targets[@]}"; do
  corpus="$out/corpus/$t"
  mkdir -p "$corpus"
  log="$out/logs/fuzz_$t.log"
  echo "running fuzz_$t for $runs executions (log: $log)"
  start=$(date +%s)
  set +e
  # Audio inputs stay small: garbage that decodes as seconds of noise costs a log-mel each time.
  max_len=16384
  [ "$t" = audio ] && max_len=4096
  "$out/bin/fuzz_$t" -runs="$runs" -max_len=$max_len -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$out/crashes/${t}_" "$corpus" "$seeds/$t" > "$log" 2>&1
  rc=$?
  set -e
  seconds=$(( $(date +%s) - start ))
  execs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1)
  cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+' || echo "?")
  line="$(date -u +%FT%TZ) fuzz_$t: rc=$rc executions=${execs:-?} seconds=$seconds coverage=$cov corpus=$(ls "$corpus" | wc -l)"
  echo "$line" | tee -a "$summary"
  if [ $rc -ne 0 ]; then
    status=1
    grep -E 'ERROR|SUMMARY|Test unit written' "$log" | head -5
  fi
done
exit $status
