"""Search's sidecar files are caches, never trusted: damaged or crafted files are rebuilt, links are never
followed, and a place that cannot be written leaves search answering from memory.

Every fault is a real file: bytes flipped or cut in the sidecar the search wrote, files crafted with
json/numpy/faiss (with a name whose sha256 matches, as a hand-made file would have), real symbolic
links, a real immutable (or read-only) directory and a real ``RLIMIT_FSIZE``. Each test checks the
answer after the fault against the brute-force answer, and that the sidecar is rebuilt.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from featurestore import open_store
from featurestore.cli import main
from featurestore.store import search as search_mod
from tests.featurestore.test_search import FEAT, N, brute_force, build

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------- helpers
def _folder(path: Path) -> Path:
    return Path(str(path) + search_mod.SIDECAR_SUFFIX) / "clip" / "ViT-B-32"


def _one(path: Path, ext: str) -> Path:
    """The one ``ext`` sidecar file of FEAT (fails when there are none or several)."""
    files = sorted(_folder(path).glob(f"*{ext}"))
    assert len(files) == 1, f"expected one {ext} sidecar, found {[f.name for f in files]}"
    return files[0]


def _forge(file: Path, data: bytes) -> Path:
    """Replace ``file`` by ``data`` under the name a file of those bytes would have (its sha256 matches)."""
    key = file.name.split("-")[0]
    forged = file.with_name(f"{key}-{hashlib.sha256(data).hexdigest()}{file.suffix}")
    file.unlink()
    forged.write_bytes(data)
    return forged


def _expected(data: np.ndarray, row: int = 1) -> list[str]:
    """Clip ids nearest to clip ``row`` (itself left out), the slow way."""
    rows, _ = brute_force(data, data[row].astype(np.float64).mean(0), np.array([r for r in range(N) if r != row]))
    return [f"c{r:03d}" for r in rows]


def _search(path: Path, method: str) -> search_mod.SearchResult:
    with open_store(path) as store:  # a fresh store object: nothing memoised from earlier searches
        return store.search(FEAT, "c001", k=N, method=method)


def _built(result: search_mod.SearchResult) -> bool:
    return any(n.startswith("built ") for n in result.notes)


def _assert_rebuilt_and_right(path: Path, data: np.ndarray, method: str, ext: str, damaged: bytes,
                              result: search_mod.SearchResult) -> None:
    """The answer is the exact one and the index was built again (see `_assert_rebuilt_file`)."""
    assert result.clip_ids == _expected(data), "a damaged sidecar was served"
    assert result.method == method and _built(result), result.notes
    assert float(np.max(np.abs(result.scores))) <= 1 + 1e-5
    _assert_rebuilt_file(path, method, ext, damaged, result.clip_ids)


def _assert_rebuilt_file(path: Path, method: str, ext: str, damaged: bytes, answer: list[str]) -> None:
    """The one sidecar left is whole (its bytes hash to its name), not the damaged bytes, and the next
    search loads it without building or warning."""
    new = _one(path, ext)
    raw = new.read_bytes()
    assert raw != damaged and new.name == f"{new.name.split('-')[0]}-{hashlib.sha256(raw).hexdigest()}{ext}"
    again = _search(path, method)
    assert not _built(again) and again.clip_ids == answer, again.notes
    assert _one(path, ext) == new


def _vector_offset(raw: bytes, data: np.ndarray) -> int:
    """Where clip 0's unit clip vector (float32) sits in a sidecar's bytes."""
    vector = search_mod.clip_vectors(data[0]).astype(np.float32).tobytes()
    offset = raw.find(vector)
    assert offset > 0, "clip 0's vector is not stored as float32 in the sidecar"
    return offset


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.zarr"
    return path, build(path)


needs_faiss = pytest.mark.skipif(not search_mod.faiss_available(), reason="faiss-cpu is not installed")


# ------------------------------------------------------------------------------ damaged faiss files
@needs_faiss
def test_a_flipped_bit_in_the_faiss_sidecar_is_never_served_and_the_index_is_rebuilt(store, capsys):
    """Issue 19 item 4: one flipped exponent bit made a wrong top neighbour with a "cosine" of 5e35."""
    path, data = store
    _search(path, "faiss")
    sidecar = _one(path, ".faiss")
    raw = bytearray(sidecar.read_bytes())
    raw[_vector_offset(bytes(raw), data) + 3] ^= 0x40  # the top exponent bit of clip 0's first value
    sidecar.write_bytes(bytes(raw))
    capsys.readouterr()
    code = main(["search", str(path), "--feature-set", FEAT, "--like", "c001", "-k", str(N), "--method", "faiss",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    got = json.loads(out)["results"]
    assert [r["clip_id"] for r in got] == _expected(data) and max(abs(r["score"]) for r in got) <= 1 + 1e-5
    assert any(n.startswith("built the faiss index") for n in json.loads(out)["notes"])
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "is damaged" in warnings[0] and "sha256" in warnings[0], err
    _assert_rebuilt_file(path, "faiss", ".faiss", bytes(raw), _expected(data))


def _refuses_256_gib() -> bool:
    """Whether an allocation of 256 GiB fails at once here (heuristic overcommit, less RAM + swap)."""
    try:
        mode = Path("/proc/sys/vm/overcommit_memory").read_text().strip()
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    except OSError:
        return False
    kib = sum(int(info.get(k, "0 kB").split()[0]) for k in ("MemTotal", "SwapTotal"))
    return mode == "0" and kib * 1024 < 200 * 2**30


@needs_faiss
@pytest.mark.parametrize("name", ["stale name", "forged name"])
def test_a_faiss_sidecar_whose_header_claims_2_36_floats_is_rebuilt(store, capsys, name):
    """Issue 19 item 10: MemoryError on every search until the file was deleted by hand. A stale name
    fails its sha256 before faiss reads a byte; a forged one reaches faiss, whose MemoryError is damage."""
    path, data = store
    if name == "forged name" and not _refuses_256_gib():
        pytest.skip("faiss would get its 256 GiB here (no heuristic overcommit, or that much memory)")
    _search(path, "faiss")
    sidecar = _one(path, ".faiss")
    raw = bytearray(sidecar.read_bytes())
    count_at = _vector_offset(bytes(raw), data) - 8  # the flat index's codes: a size_t count, then the floats
    assert int.from_bytes(raw[count_at:count_at + 8], "little") in (N * 8, N * 8 * 4)
    raw[count_at:count_at + 8] = (2**36).to_bytes(8, "little")
    if name == "forged name":
        _forge(sidecar, bytes(raw))
    else:
        sidecar.write_bytes(bytes(raw))
    result = _search(path, "faiss")
    assert "is damaged" in capsys.readouterr().err
    _assert_rebuilt_and_right(path, data, "faiss", ".faiss", bytes(raw), result)


@needs_faiss
def test_a_forged_faiss_sidecar_holding_a_5e35_vector_is_rebuilt(store, capsys):
    """The name's sha256 matches (made by hand), but a vector is no unit vector: never served."""
    path, data = store
    _search(path, "faiss")
    sidecar = _one(path, ".faiss")
    raw = bytearray(sidecar.read_bytes())
    at = _vector_offset(bytes(raw), data)
    raw[at:at + 32] = (np.frombuffer(bytes(raw[at:at + 32]), np.float32) * 5e35).astype(np.float32).tobytes()
    _forge(sidecar, bytes(raw))
    result = _search(path, "faiss")
    assert "not unit vectors" in capsys.readouterr().err
    _assert_rebuilt_and_right(path, data, "faiss", ".faiss", bytes(raw), result)


def test_a_score_outside_minus_one_one_at_query_time_drops_the_index_and_answers_exactly(store, capsys):
    """The last guard: an index already in memory whose numbers went bad gives a cosine of 5e35; the
    query is answered again from a matrix built from the store, never with that score."""
    path, data = store
    with open_store(path) as s:
        held = search_mod.clip_matrix(s, FEAT)
        bad = held.matrix.copy()
        bad[0] *= 5e35
        search_mod._MEMO[s][("exact", FEAT)] = search_mod.ClipMatrix(held.key, held.rows, bad)
        result = s.search(FEAT, "c001", k=N)
    assert re.search(r"gave a cosine of [0-9.]+e\+3[0-9], outside \[-1, 1\]; rebuilding", capsys.readouterr().err)
    assert result.clip_ids == _expected(data) and float(np.max(np.abs(result.scores))) <= 1 + 1e-5


# ------------------------------------------------------------------------- damaged clip matrix files
HEADER = search_mod._files.HEADER_BYTES


def _matrix_files(path: Path) -> tuple[Path, Path]:
    """The one manifest and its ``.npy`` (fails when there are none or several)."""
    manifest = _one(path, ".json")
    matrix = _one(path, ".npy")
    assert matrix.name == manifest.name.removesuffix(".json") + ".npy"
    return manifest, matrix


def _with_crcs(manifest: bytes, npy: bytes) -> bytes:
    """The manifest with its crc32s recomputed for ``npy`` (what a hand-made pair would hold)."""
    fields = json.loads(manifest)
    data, block = npy[HEADER:], fields["block_bytes"]
    fields["crc32"] = [zlib.crc32(data[i:i + block]) for i in range(0, len(data), block)]
    return json.dumps(fields).encode()


def _cut(manifest: bytes, npy: bytes):
    return manifest, npy[:len(npy) // 2]


def _flip_data(manifest: bytes, npy: bytes):
    at = HEADER + 5 * 4 + 1  # a mantissa byte of clip 0's sixth value: the vector stays near unit length
    return manifest, npy[:at] + bytes([npy[at] ^ 0x01]) + npy[at + 1:]


def _reorder(manifest: bytes, npy: bytes):
    rows = np.frombuffer(npy[HEADER:], np.float32).reshape(N, -1)
    return manifest, npy[:HEADER] + rows[::-1].tobytes()


def _flip_manifest(manifest: bytes, npy: bytes):
    at = manifest.index(b'"rows": ') + 8
    return manifest[:at] + bytes([manifest[at] ^ 0x01]) + manifest[at + 1:], npy


def _foreign_rows(manifest: bytes, npy: bytes):
    fields = json.loads(manifest)
    fields["left_out"] = [10**6]
    return json.dumps(fields).encode(), npy


def _huge_header(manifest: bytes, npy: bytes):
    return manifest, search_mod._files._npy_header(2**40, npy_dim(npy)) + npy[HEADER:]


def npy_dim(npy: bytes) -> int:
    return (len(npy) - HEADER) // (4 * N)


def _huge_vector(manifest: bytes, npy: bytes):
    rows = np.frombuffer(npy[HEADER:], np.float32).reshape(N, -1).copy()
    rows[0] *= 5e35
    npy = npy[:HEADER] + rows.tobytes()
    return _with_crcs(manifest, npy), npy


# (how, forge the manifest's sha256 name?): the forged ones get past the hash and must be caught by
# the bounds and content checks; the others are caught by the sha256, the size or the crc32s.
MATRIX_DAMAGE = {
    "matrix cut in half": (_cut, False),
    "one mantissa bit flipped in the matrix": (_flip_data, False),
    "matrix rows reordered": (_reorder, False),
    "one byte flipped in the manifest": (_flip_manifest, False),
    "rows that are not store rows, manifest forged": (_foreign_rows, True),
    "a header claiming 2^40 rows": (_huge_header, False),
    "not JSON, manifest forged": (lambda m, n: (b"{not json" * 10, n), True),
    "a 5e35 vector, crc32s forged to match": (_huge_vector, True),
}


@pytest.mark.parametrize("damage", MATRIX_DAMAGE)
def test_a_damaged_or_crafted_clip_matrix_is_rebuilt_not_served(store, capsys, damage):
    """Issue 19 items 4 and 10 (then for the .npz): reordered rows were served silently; cut, flipped
    or foreign files gave tracebacks. Issue 23: the memory-mapped .npy and its manifest keep that promise."""
    path, data = store
    _search(path, "exact")
    manifest, matrix = _matrix_files(path)
    change, forge = MATRIX_DAMAGE[damage]
    new_manifest, new_matrix = change(manifest.read_bytes(), matrix.read_bytes())
    if forge:
        forged = _forge(manifest, new_manifest)
        matrix.unlink()
        matrix = forged.with_suffix(".npy")
    else:
        manifest.write_bytes(new_manifest)
    matrix.write_bytes(new_matrix)
    result = _search(path, "exact")
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "is damaged" in err, err
    assert result.clip_ids == _expected(data), "a damaged clip matrix was served"
    assert result.method == "exact" and _built(result), result.notes
    assert float(np.max(np.abs(result.scores))) <= 1 + 1e-5
    kept, kept_matrix = _matrix_files(path)
    raw = kept.read_bytes()
    assert kept.name.split("-")[1] == f"{hashlib.sha256(raw).hexdigest()}.json"
    assert (raw, kept_matrix.read_bytes()) != (new_manifest, new_matrix)
    again = _search(path, "exact")
    assert not _built(again) and again.clip_ids == result.clip_ids, again.notes
    assert _matrix_files(path) == (kept, kept_matrix)


def test_the_clip_matrix_is_memory_mapped_and_checked_once_per_process(store, monkeypatch):
    """A new store object maps the .npy (no copy in memory) and does not run the block check again;
    a rewrite of the file (its ctime changes) is checked again."""
    path, data = store
    _search(path, "exact")
    search_mod._files._VERIFIED.clear()  # as in a new process
    checks = []
    real = search_mod._files._check_blocks
    monkeypatch.setattr(search_mod._files, "_check_blocks", lambda *a: checks.append(1) or real(*a))
    with open_store(path) as s:
        held = search_mod.clip_matrix(s, FEAT)
        assert isinstance(held.matrix, np.memmap) and not held.matrix.flags.writeable
    _search(path, "exact")
    assert len(checks) == 1
    _, matrix = _matrix_files(path)
    matrix.write_bytes(matrix.read_bytes())  # same bytes, new ctime
    assert _search(path, "exact").clip_ids == _expected(data)
    assert len(checks) == 2


# ------------------------------------------------------------------------------------ links
def _snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry below ``folder`` (links not followed) with its bytes or link target."""
    return {str(p.relative_to(folder)): (f"-> {os.readlink(p)}" if p.is_symlink() else
                                          p.read_bytes() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "precious.npz").write_bytes(b"someone else's matrix")
    (outside / "precious.faiss").write_bytes(b"someone else's index")
    (outside / "sub" / "deep.npz").write_bytes(b"deeper")
    return outside


@pytest.mark.parametrize("link", ["<store>.search", "<store>.search/clip", "<store>.search/clip/ViT-B-32"])
def test_a_symlinked_sidecar_directory_is_never_followed(tmp_path, capsys, link):
    """Issue 19 item 5: a link in ``<store>.search/`` made search write outside the store and delete the
    target directory's ``*.npz`` files. Now the link is left alone and search answers from memory."""
    path = tmp_path / "s.zarr"
    data = build(path)
    outside = _outside(tmp_path)
    before = _snapshot(outside)
    parts = link.split("/")
    where = tmp_path.joinpath(path.name + search_mod.SIDECAR_SUFFIX, *parts[1:])
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(outside, target_is_directory=True)
    for method in ("exact", "faiss") if search_mod.faiss_available() else ("exact",):
        capsys.readouterr()
        code = main(["search", str(path), "--feature-set", FEAT, "--like", "c001", "-k", str(N), "--method", method,
                     "--json"])
        out, err = capsys.readouterr()
        assert code == 0 and [r["clip_id"] for r in json.loads(out)["results"]] == _expected(data)
        assert _snapshot(outside) == before, "search wrote or deleted files outside the store through a link"
        assert "not keeping the search index" in err and "symbolic link" in err and "saved to" not in err, err
    assert where.is_symlink() and os.readlink(where) == str(outside)


def test_symlinked_files_in_the_sidecar_directory_are_never_followed(store, tmp_path, capsys):
    """A link under the current sidecar's name (pointing at a valid copy outside) is not read, and
    cleaning removes links, never what they point to."""
    path, data = store
    _search(path, "exact")
    sidecar = _one(path, ".npy")
    outside = _outside(tmp_path)
    shutil.copy(sidecar, outside / sidecar.name)  # whole, sha256 right: only following the link would use it
    sidecar.unlink()
    sidecar.symlink_to(outside / sidecar.name)
    (sidecar.parent / "old.npy").symlink_to(outside / "precious.npz")
    (sidecar.parent / "older.json").symlink_to(outside / "sub", target_is_directory=True)
    before = _snapshot(outside)
    result = _search(path, "exact")
    assert "symbolic link" in capsys.readouterr().err
    assert result.clip_ids == _expected(data) and _built(result)
    assert _snapshot(outside) == before
    kept = _one(path, ".npy")
    assert not kept.is_symlink() and kept.is_file()
    assert [p.name for p in sidecar.parent.iterdir() if p.is_symlink()] == []


# ---------------------------------------------------------------------------- unwritable places
@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` made unwritable for this process: immutable for root (chattr +i), else mode 0555."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("running as root on a file system without chattr +i: cannot make a read-only directory")
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
        undo = None
    try:
        yield
    finally:
        subprocess.run(undo) if undo else folder.chmod(0o755)


def test_a_read_only_store_directory_is_searched_in_memory_without_claiming_a_saved_file(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "s.zarr"
    data = build(path)
    methods = ("exact", "faiss") if search_mod.faiss_available() else ("exact",)
    with _read_only(folder):
        for method in methods:
            capsys.readouterr()
            code = main(["search", str(path), "--feature-set", FEAT, "--like", "c001", "-k", str(N), "--method",
                         method, "--json"])
            out, err = capsys.readouterr()
            assert code == 0 and [r["clip_id"] for r in json.loads(out)["results"]] == _expected(data)
            notes = json.loads(out)["notes"]
            assert any(n.startswith("built ") for n in notes) and not any("saved to" in n for n in notes), notes
            assert "not keeping the search index" in err and "searching in memory" in err, err
    assert not Path(str(path) + search_mod.SIDECAR_SUFFIX).exists()


def _search_under_fsize_limit(path: Path, method: str) -> subprocess.CompletedProcess:
    """``featurestore search`` in a child whose files may not grow past 1 KiB (SIGXFSZ ignored, so the
    write fails with EFBIG like a full disk would)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    return subprocess.run([sys.executable, "-m", "featurestore.cli", "search", str(path), "--feature-set", FEAT,
                           "--like", "c001", "-k", str(N), "--method", method, "--json"],
                          capture_output=True, text=True, cwd=ROOT, preexec_fn=limit, timeout=120)


@pytest.mark.parametrize("method", ["exact", pytest.param("faiss", marks=needs_faiss)])
def test_a_sidecar_that_cannot_be_written_leaves_no_file_and_the_answer_right(store, method):
    path, data = store
    done = _search_under_fsize_limit(path, method)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert [r["clip_id"] for r in got["results"]] == _expected(data)
    assert not any("saved to" in n for n in got["notes"]), got["notes"]
    assert "could not keep the search index" in done.stderr and "file-size limit" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert [p.name for p in _folder(path).iterdir()] == []  # no temp file, no half-written sidecar


# -------------------------------------------------------------------------- non-finite stored values
@pytest.mark.parametrize("method", ["exact", pytest.param("faiss", marks=needs_faiss)])
def test_a_clip_with_non_finite_features_is_left_out_with_a_note_and_cannot_be_a_query(tmp_path, method):
    """Such a clip has no cosine: it is left out of the index (named in a note), so the index's own
    check holds and the sidecar is loaded, not rebuilt, by the next search."""
    path = tmp_path / "nan.zarr"
    data = build(path)
    data[7, 1, 2] = np.nan
    with open_store(path, mode="a") as s:
        s.write_rows(FEAT, 0, data)
    first = _search(path, method)
    assert any("1 done clips hold non-finite values" in n and "c007" in n for n in first.notes), first.notes
    rows, _ = brute_force(data, data[1].astype(np.float64).mean(0), np.array([r for r in range(N) if r not in (1, 7)]))
    assert first.clip_ids == [f"c{r:03d}" for r in rows]
    again = _search(path, method)
    assert not _built(again) and again.clip_ids == first.clip_ids, again.notes
    with open_store(path) as s, pytest.raises(ValueError, match="c007.*non-finite"):
        s.search(FEAT, "c007", method=method)


def test_temp_files_of_a_killed_search_are_removed_once_stale_and_live_ones_kept(tmp_path):
    """A search killed while writing leaves ``.<key>-<pid>.npy.tmp``; the next save of that set removes
    it once it is an hour old, and leaves a younger one (another search may be writing it)."""
    path = tmp_path / "grow.zarr"
    data = build(path, done=16)
    _search(path, "exact")
    folder = _folder(path)
    stale, live = folder / ".0123456789abcdef-4242.npy.tmp", folder / ".0123456789abcdef-4343.npy.tmp"
    stale.write_bytes(b"half a matrix")
    live.write_bytes(b"being written")
    hour_ago = stale.stat().st_mtime - search_mod._files.STALE_TEMP_SECONDS - 5
    os.utime(stale, (hour_ago, hour_ago))
    with open_store(path, mode="a") as s:
        s.write_rows(FEAT, 16, data[16:])  # the set changes: the next search builds and saves again
    assert _built(_search(path, "exact"))
    assert not stale.exists() and live.exists()
