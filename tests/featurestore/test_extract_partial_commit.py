"""Partly filled chunks are committed every ``commit_seconds``: a real extraction with a slow plug-in
encoder, SIGKILLed right after its first partial commit (long before any chunk is full), keeps the
rows encoded so far; the rerun does not encode them again and ends bit for bit equal to an
uninterrupted run, with the feature set's data version unchanged (no churn per commit). It runs
twice: with outputs small enough that a chunk is one plain Zarr chunk, and with outputs of 16 KiB a
clip, which the store shards (a chunk of 8 clips = a shard of 8 inner chunks of one clip).

The encoder is a real plug-in (a distribution with a ``featurestore.encoders`` entry point, on the
child's ``PYTHONPATH`` too) that sleeps in every call and appends the size of each call to a file,
so the test counts what every run encoded.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.featurestore.fault_support import finish, start_child
from tests.featurestore.test_extract_support import assert_same_arrays, make_dataset, read_all

from featurestore.encoders import _registry, refresh_plugins
from featurestore.extract import extract
from featurestore.store import open_store

PLUGIN = textwrap.dedent('''
    import os, time
    import torch
    from featurestore.encoders import AudioSegments, Encoder

    class SlowStats(Encoder):
        """Mean, std, peak and energy per 1 s segment, slowly: every call sleeps and is logged."""
        modality = "audio"
        dtype = "float32"

        def __init__(self, spec):
            super().__init__(spec)
            self.sample_rate = 16000
            self.segment_seconds = 1.0

        @property
        def output_shape(self):
            return (int(os.environ.get("FS_TEST_DIM", "4")),)

        def config(self):
            return {"statistics": ["mean", "std", "peak", "energy"], "dim": self.output_shape[0]}

        def preprocessor(self):
            return AudioSegments(samples=16000, sample_rate=16000)

        def forward(self, batch):
            time.sleep(float(os.environ.get("FS_TEST_SLOW_SECONDS", "0")))
            log = os.environ.get("FS_TEST_CALL_LOG")
            if log:
                with open(log, "a") as f:
                    f.write(f"{os.getpid()} {batch.shape[0]}\\n")
            stats = torch.stack([batch.mean(dim=1), batch.std(dim=1), batch.abs().amax(dim=1),
                                 (batch * batch).mean(dim=1)], dim=1)
            return stats.repeat(1, self.output_shape[0] // 4)
''')
NAME = "slowstats"
N_CLIPS = 10
SEGMENTS = 2  # per clip (2 s clips): the encoder sees 2 items per clip
CHUNK = 8  # the first chunk: rows 0..7; nothing is written before it is full without partial commits
OPTIONS = dict(device="cpu", batch_size=2, num_workers=1, chunk_clips=CHUNK, progress=False, commit_seconds=0.2)


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Iterator[dict]:
    """The plug-in installed on sys.path (and for child processes); yields the children's env."""
    root = tmp_path / "site"
    (root / "fs_slowstats").mkdir(parents=True)
    (root / "fs_slowstats" / "__init__.py").write_text(PLUGIN)
    dist = root / "fs_slowstats-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fs_slowstats\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[featurestore.encoders]\n{NAME} = fs_slowstats:SlowStats\n")
    saved = dict(_registry._REGISTRY)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("FS_TEST_SLOW_SECONDS", "0.3")
    refresh_plugins()
    yield {"PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(saved)
    sys.modules.pop("fs_slowstats", None)
    refresh_plugins()


def _encoded_clips(log: Path) -> int:
    """Clips encoded by the runs that logged into ``log``."""
    if not log.exists():
        return 0
    return sum(int(line.split()[1]) for line in log.read_text().split("\n") if line) // SEGMENTS


@pytest.mark.parametrize("dim,inner", [(4, CHUNK), (2048, 1)], ids=["plain-chunks", "sharded"])
def test_sigkill_after_a_partial_commit_keeps_the_rows_and_the_rerun_equals_a_clean_run(plugin, tmp_path,
                                                                                        monkeypatch, dim, inner):
    monkeypatch.setenv("FS_TEST_DIM", str(dim))  # the children inherit it
    manifest = make_dataset(tmp_path / "data", N_CLIPS)
    store = tmp_path / "killed.zarr"
    killed_log = tmp_path / "killed.log"
    proc = start_child(tmp_path / "child", manifest, store, dict(encoders=NAME, **OPTIONS), signal_at="KILL:1",
                       env={**plugin, "FS_TEST_CALL_LOG": str(killed_log)})
    code, err = finish(proc)
    assert code == -signal.SIGKILL, err
    with open_store(store) as fs:
        assert fs.arrays.inner_rows(f"features/{NAME}/data") == inner
        report = fs.verify()
        assert report.ok, report.problems
        done = fs.done_mask(NAME)
        version = fs.data_version(NAME)
    kept = int(done.sum())
    assert 0 < kept < CHUNK, done  # committed before the first chunk was full
    assert done[:kept].all() and kept % OPTIONS["batch_size"] == 0  # whole encode batches, from the start
    assert _encoded_clips(killed_log) >= kept

    rerun_log = tmp_path / "rerun.log"
    monkeypatch.setenv("FS_TEST_CALL_LOG", str(rerun_log))
    summary = extract(manifest, store, NAME, **OPTIONS)
    assert summary.exit_code == 0 and summary.clips_skipped == kept and summary.clips_done == N_CLIPS - kept
    assert _encoded_clips(rerun_log) == N_CLIPS - kept  # the rows kept are never encoded again
    with open_store(store) as fs:
        assert fs.verify().ok and fs.done_mask(NAME).all()
        assert fs.data_version(NAME) == version  # partial commits rewrite done rows bit for bit: no churn

    monkeypatch.delenv("FS_TEST_CALL_LOG")
    reference = tmp_path / "reference.zarr"
    assert extract(manifest, reference, NAME, **{**OPTIONS, "commit_seconds": 3600.0}).exit_code == 0
    assert_same_arrays(read_all(store), read_all(reference))


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "60", True])
def test_commit_seconds_must_be_a_positive_number(tmp_path, bad):
    manifest = make_dataset(tmp_path / "data", 1)
    with pytest.raises(ValueError, match=r"commit_seconds must be a number of seconds > 0, got"):
        extract(manifest, tmp_path / "x.zarr", "logmel", **{**OPTIONS, "commit_seconds": bad})
    assert not (tmp_path / "x.zarr").exists()


def test_commit_every_reaches_extract_from_the_command_line(tmp_path, capsys):
    from featurestore.cli import main

    make_dataset(tmp_path / "data", 1)
    assert main(["extract", str(tmp_path / "data"), str(tmp_path / "s.zarr"), "--commit-every", "-5"]) == 2
    assert "commit_seconds must be a number of seconds > 0, got -5.0" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()
