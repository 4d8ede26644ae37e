"""scripts/bench/gpu_check.py runs end to end before a GPU is lent: ``--dry-run`` takes every step
(encode lane with a saved profiler trace, extraction from a stored frames set, from MP4s with each
decoder, the torchcodec comparison, both training heads' loader wait) on the CPU at toy sizes.
Device time is scarce: a script that fails on the GPU for a reason a CPU run would have shown wastes it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.scripts_support import script_module



@pytest.fixture(scope="module")
def gpu_check():
    with script_module("bench/gpu_check.py") as module:
        yield module


@pytest.mark.slow
def test_dry_run_takes_every_step_and_reports_every_floor(gpu_check, tmp_path, capsys):
    benchmark_before = torch.backends.cudnn.benchmark
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert torch.backends.cudnn.benchmark == benchmark_before  # run options only, never process-wide
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["bf16"] for r in results["lane"]] == [True]
    for lane in results["lane"]:
        assert lane["frames_per_s"] > 0 and Path(lane["trace"]).stat().st_size > 0
        assert lane["fingerprint_options"]["precision"] == ("bfloat16" if lane["bf16"] else "float32")
    stored = results["stored_extract"]
    assert (stored["clips"], stored["failed"]) == (2, 0) and "decode frames from frames/32" in stored["stages"]
    assert set(results["mp4_extract"]) >= {"pyav"} and results["mp4_extract"]["pyav"]["failed"] == 0
    codec = results["torchcodec"]
    if "skipped" not in codec:  # the CPU decoder gives PyAV's frames exactly
        assert codec["max_diff"] == 0 and results["mp4_extract"]["frames224_diff"]["max"] == 0
    for head in ("frame_cnn", "spectrogram_cnn"):
        assert 0 <= results["training"][head]["wait_fraction"] < 1 and results["training"][head]["steps"] >= 2
    out = capsys.readouterr().out
    assert "floor: frame_cnn loader wait" in out and "floor: spectrogram_cnn loader wait" in out


def test_without_a_gpu_a_real_run_refuses_in_one_line(gpu_check, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here.*--dry-run"):
        gpu_check.main(["--out", "unused"])


def test_floors_read_each_measurement(gpu_check):
    lane = {"input": "224x224", "frames_per_s": 6000.0, "gpu_busy": 0.93, "sync_warnings": {}, "bf16": True,
            "trace": "t.json"}
    slow = {**lane, "frames_per_s": 4000.0, "bf16": False}
    training = {"frame_cnn": {"wait_fraction": 0.01}, "spectrogram_cnn": {"wait_fraction": 0.2}}
    lines = gpu_check.floors({"lane": [slow, lane], "training": training})
    assert lines[0].startswith("lane from stored 224 frames") and ": met (6,000 frames/s, 93% busy" in lines[0]
    assert lines[1:] == ["frame_cnn loader wait (< 5% of the epoch): met (1.0%)",
                         "spectrogram_cnn loader wait (< 5% of the epoch): NOT met (20.0%)"]
    synced = gpu_check.floors({"lane": [{**lane, "sync_warnings": {"cudaMemcpy": 1}}]})
    assert "NOT met" in synced[0] and synced[1] == "training loader wait: not measured"
