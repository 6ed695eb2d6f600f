#!/usr/bin/env python3
"""Compares the toolkit's log-mel (modalities/mel.h) with librosa's on a speech clip made by espeak-ng.

Both sides get the same 16 kHz samples (decoded and resampled by our code, dumped by the logmel_dump program), so
the comparison isolates the spectrogram: periodic Hann window, centred frames with zero padding, |STFT|^2, Slaney
mel filterbank with Slaney normalisation, ln(max(mel, 1e-10)). librosa runs in float64.

Tolerance 2e-4 (absolute, in natural-log units): our values are stored as float32, which rounds |v| <= 23.1 to
within 1.4e-6; librosa builds its filterbank in float32 (relative error ~6e-8, i.e. ~6e-8 in the log); the two
FFTs differ by double rounding only. Any real difference in the formula (window, padding, mel scale or
normalisation) moves values by 1e-2 or more. Exit status: 0 pass, 1 fail, 77 skipped (librosa or espeak-ng
missing), as ctest's SKIP_RETURN_CODE expects.

Usage: tools/check_logmel.py --dump build/tests/modalities/logmel_dump [--text "..."]
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SKIP = 77
TOLERANCE = 2e-4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", required=True, help="path of the logmel_dump program")
    parser.add_argument("--text", default="The quick brown fox jumps over the lazy dog. Long sequences need "
                                          "dilated attention.")
    args = parser.parse_args()
    try:
        import librosa
        import numpy as np
    except ImportError as e:
        print(f"skipped: librosa is not installed ({e})")
        return SKIP
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        print("skipped: espeak-ng is not installed")
        return SKIP

    with tempfile.TemporaryDirectory(prefix="longnet_logmel_") as tmp:
        wav = Path(tmp) / "clip.wav"
        subprocess.run([espeak, "-w", str(wav), args.text], check=True, capture_output=True)
        worst = 0.0
        for n_fft in (400, 512):
            prefix = Path(tmp) / f"ours_{n_fft}"
            out = subprocess.run([args.dump, str(wav), str(prefix), str(n_fft)], check=True, capture_output=True,
                                 text=True).stdout.split()
            frames, mels = int(out[0]), int(out[1])
            samples = np.fromfile(f"{prefix}.samples.f32", dtype="<f4")
            ours = np.fromfile(f"{prefix}.logmel.f32", dtype="<f4").reshape(frames, mels)
            power = librosa.feature.melspectrogram(
                y=samples.astype(np.float64), sr=16000, n_fft=n_fft, hop_length=160, win_length=400,
                window="hann", center=True, pad_mode="constant", power=2.0, n_mels=mels, htk=False, norm="slaney")
            ref = np.log(np.maximum(power, 1e-10)).T
            if ref.shape != ours.shape:
                print(f"FAIL n_fft={n_fft}: shape {ours.shape} != librosa {ref.shape}")
                return 1
            diff = np.abs(ref - ours)
            at = np.unravel_index(np.argmax(diff), diff.shape)
            print(f"n_fft={n_fft}: {frames} frames x {mels} mels from {samples.size} samples "
                  f"({samples.size / 16000:.2f} s); max |ours - librosa| = {diff.max():.3e} at frame {at[0]} mel "
                  f"{at[1]} (librosa {ref[at]:.4f}); mean {diff.mean():.3e}; values {ref.min():.2f}..{ref.max():.2f}")
            worst = max(worst, float(diff.max()))

        # For information: our decode + resample (libswresample) against librosa.load's (soxr), same clip.
        theirs, _ = librosa.load(str(wav), sr=16000, mono=True)
        samples = np.fromfile(f"{Path(tmp) / 'ours_400'}.samples.f32", dtype="<f4")
        n = min(theirs.size, samples.size)
        rel = np.linalg.norm(theirs[:n] - samples[:n]) / max(np.linalg.norm(theirs[:n]), 1e-12)
        print(f"resampling (information only): {samples.size} vs librosa.load {theirs.size} samples, "
              f"relative RMS difference {rel:.3e}, max abs {np.abs(theirs[:n] - samples[:n]).max():.3e}")

    if worst > TOLERANCE:
        print(f"FAIL: max abs difference {worst:.3e} exceeds {TOLERANCE:.0e}")
        return 1
    print(f"PASS: max abs difference {worst:.3e} <= {TOLERANCE:.0e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
