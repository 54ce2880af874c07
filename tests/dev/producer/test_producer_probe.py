"""dev/producer/producer_probe.py: the decoder-flag probe, the producer loop and the
resampler against PIL, on a few generated photographs (as subprocesses: the loop leaves
through os._exit)."""

import json
import re
import subprocess
import sys

from conftest import ROOT, load_converter, load_tool, needs_ffcv

PROBE = ROOT / "dev" / "producer" / "producer_probe.py"


def photos(tmp_path, count):
    data = tmp_path / "bench"
    load_tool("bench_loaders").make_photos(data / "train", count, workers=1)
    return data


@needs_ffcv
def test_decode_flags_report_time_and_psnr_against_pil(tmp_path):
    data = photos(tmp_path, 6)
    result = subprocess.run([sys.executable, str(PROBE), "--data-dir", str(data), "decode-flags",
                             "--images", "6", "--reps", "1"], capture_output=True, text=True, check=True)
    lines = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert set(lines) == {"accurate DCT", "fast DCT (FFCV)", "fast DCT + fast upsampling", "cv2.imdecode"}
    assert "(1.00x FFCV's" in lines["fast DCT (FFCV)"]
    # PIL decodes with libjpeg-turbo's accurate DCT: the same pixels; the fast DCT is close, not equal.
    assert "worst inf dB" in lines["accurate DCT"]
    worst = float(re.search(r"worst ([0-9.]+) dB", lines["fast DCT (FFCV)"]).group(1))
    assert 30 < worst < 80


@needs_ffcv
def test_loop_reports_epochs_and_page_faults(tmp_path):
    data = photos(tmp_path, 16)
    load_converter().convert(data / "train", data / "train_16_jpeg.beton", max_side=500, quality=90,
                             raw_fraction=0.0, workers=1, progress=False)
    result = subprocess.run([sys.executable, str(PROBE), "--data-dir", str(data), "loop", "--images", "16",
                             "--batch-size", "4", "--epochs", "2"], capture_output=True, text=True, check=True)
    assert re.search(r"^epoch 1: [0-9.]+ images/s", result.stdout, re.M)
    faults = re.search(r"page faults: [0-9.]+ per image \(\d+ over (\d+) images\)", result.stdout)
    assert faults and int(faults.group(1)) == 2 * 16


def test_a_missing_beton_is_named(tmp_path):
    result = subprocess.run([sys.executable, str(PROBE), "--data-dir", str(tmp_path), "loop", "--images", "16"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "train_16_jpeg.beton is missing" in result.stderr


@needs_ffcv
def test_resample_compares_the_producer_with_pil_on_the_same_boxes(tmp_path):
    data = photos(tmp_path, 3)
    record = tmp_path / "resample.json"
    result = subprocess.run([sys.executable, str(PROBE), "--data-dir", str(data), "resample", "--images", "3",
                             "--reps", "2", "--json", str(record)], capture_output=True, text=True, check=True)
    producer, pil, quality, wrote = result.stdout.splitlines()
    assert producer.startswith("producer (resize_crop)") and "(8 crops; 1.00x the producer's" in producer
    assert pil.startswith("Pillow") and float(re.search(r"([0-9.]+)x the producer's", pil).group(1)) > 0
    # The same filter as PIL's (flips included), so the figure is a comparison of like with like.
    worst = re.search(r"worst PSNR ([0-9.]+) dB over (\d+) crops", quality)
    assert worst and float(worst.group(1)) > 40 and int(worst.group(2)) == 3 * 8
    # The record holds the printed figures, and the README's report renders it.
    saved = json.loads(record.read_text())
    figures = saved["resample_us_per_photograph"]
    assert len(figures["producer"]["reps"]) == 2 and figures["producer"]["median"] > 0
    assert figures["pil_over_producer"] == round(figures["pil"]["median"] / figures["producer"]["median"], 2)
    assert saved["settings"]["crops"] == "2x224 (scale 0.2-1) + 6x96 (scale 0.05-0.2)"
    row = load_tool("performance_report").table([("resample.json", saved)]).splitlines()[2]
    assert f"vs {saved['versions']['pil']} BICUBIC" in row and "resample --images 3 --reps 2" in row


def test_resample_without_photographs_says_what_to_run(tmp_path):
    result = subprocess.run([sys.executable, str(PROBE), "--data-dir", str(tmp_path), "resample"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "no photographs under" in result.stderr and "bench_loaders.py" in result.stderr
