"""Output files are published whole or not at all, with the umask's permissions (atomic_files)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from featurestore.atomic_files import OutputWriteError, atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path: Path):
    out = tmp_path / "sub.csv"
    out.write_text("good\n")
    with pytest.raises(RuntimeError):
        with atomic_write(out) as f:
            f.write("half a ro")
            raise RuntimeError("killed mid-write")
    assert out.read_text() == "good\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]


def test_a_file_size_limit_is_one_error_naming_the_file_and_the_old_file_stays(tmp_path: Path):
    out = tmp_path / "sub.csv"
    out.write_text("good\n")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from featurestore.atomic_files import atomic_write_text, OutputWriteError
        try:
            atomic_write_text({str(out)!r}, "x" * 100_000)
        except OutputWriteError as err:
            print(err)
            sys.exit(7)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 7, proc.stderr
    assert str(out) in proc.stdout and "file-size limit" in proc.stdout
    assert out.read_text() == "good\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]


def test_files_follow_the_umask_not_0600(tmp_path: Path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "run.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_os_errors_become_output_write_errors(tmp_path: Path):
    with pytest.raises(OutputWriteError, match="could not write"):
        atomic_write_text(tmp_path / "missing-dir" / "x.txt", "text")
