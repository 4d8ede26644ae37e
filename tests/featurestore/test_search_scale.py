"""Search at scale (issue 23 item 3): the store layer imports no encoder, batch queries equal single
ones and numpy's exact answers, bad query vectors are refused in one line, the approximate default
keeps recall@10 >= 0.95 on a clustered 50k x 64 set, and the clip matrix is built in one bounded pass.

Every store here is real files built through the public API; answers are compared with numpy.
"""
from __future__ import annotations

import ast
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore.cli import main
from featurestore.store import search as search_mod
from tests.featurestore.test_search import FEAT, N, brute_force, build

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "featurestore"


# ------------------------------------------------------------------------------------- imports
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every featurestore module ``path`` imports, at the top or inside a function (lazily)."""
    name, found = _module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from featurestore import encoders`
    return {m for m in found if m == "featurestore" or m.startswith("featurestore.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def test_the_store_layer_imports_nothing_from_the_encoders_not_even_through_other_modules():
    """The store searches vectors; sentences are embedded above it (featurestore.text_query). Any path
    of imports (lazy ones too) from featurestore/store/*.py to featurestore.encoders fails."""
    graph = _graph()
    for start in sorted(m for m in graph if m.startswith("featurestore.store")):
        seen, todo, via = {start}, [start], {start: None}
        while todo:
            current = todo.pop()
            for nxt in graph[current]:
                if nxt not in seen:
                    seen.add(nxt)
                    via[nxt] = current
                    todo.append(nxt)
        bad = sorted(m for m in seen if m == "featurestore.encoders" or m.startswith("featurestore.encoders.")
                     or m == "featurestore.text_query")
        if bad:
            chain, at = [], bad[0]
            while at is not None:
                chain.append(at)
                at = via[at]
            pytest.fail(f"{start} reaches {bad[0]}: {' <- '.join(chain)}")


def test_the_import_walk_sees_lazy_and_package_imports(tmp_path):
    """The walk itself: a lazy ``from featurestore import encoders`` inside a function is an import."""
    source = tmp_path / "featurestore" / "store" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from featurestore import encoders\n    from ..encoders import registry\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert {"featurestore.encoders", "featurestore.encoders.registry"} <= _imports(source)
    finally:
        ROOT = saved


# ------------------------------------------------------------------------------- batch queries
@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "s.zarr"
    return path, build(path)


@pytest.mark.parametrize("method", ["exact", pytest.param("faiss", marks=pytest.mark.skipif(
    not search_mod.faiss_available(), reason="faiss-cpu is not installed"))])
def test_a_matrix_of_queries_gives_each_query_its_exact_answer(store_path, method):
    path, data = store_path
    queries = np.random.default_rng(5).standard_normal((7, data.shape[2])).astype(np.float32)
    with open_store(path) as store:
        results = store.search(FEAT, queries, k=6, method=method)
        singles = [store.search(FEAT, q, k=6, method=method) for q in queries]
    assert isinstance(results, list) and len(results) == 7
    for q, result, single in zip(queries, results, singles):
        rows, scores = brute_force(data, q.astype(np.float64), np.arange(N))
        assert result.clip_ids == [f"c{r:03d}" for r in rows[:6]] == single.clip_ids
        np.testing.assert_allclose(result.scores, scores[:6], atol=1e-5)
        assert result.query == {"vector": data.shape[2]} and result.method == method


def test_a_list_of_clip_ids_leaves_each_clip_out_of_its_own_answer(store_path):
    path, data = store_path
    with open_store(path) as store:
        results = store.search(FEAT, ["c003", "c011", "c003"], k=N)
    for result, row in zip(results, (3, 11, 3)):
        rows, _ = brute_force(data, data[row].astype(np.float64).mean(0), np.array([r for r in range(N) if r != row]))
        assert result.clip_ids == [f"c{r:03d}" for r in rows] and result.query == {"like": f"c{row:03d}"}


def test_cli_several_like_ids_print_one_answer_each(store_path, capsys):
    path, _ = store_path
    assert main(["search", str(path), "--feature-set", FEAT, "--like", "c005", "--like", "c009", "-k", "3",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    with open_store(path) as store:
        expected = [store.search(FEAT, c, k=3).clip_ids for c in ("c005", "c009")]
    assert [[r["clip_id"] for r in g["results"]] for g in got] == expected
    assert [g["query"] for g in got] == [{"like": "c005"}, {"like": "c009"}]
    assert main(["search", str(path), "--feature-set", FEAT, "--like", "c005", "--like", "c009", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "clips nearest to clip c005" in out and "clips nearest to clip c009" in out


# ------------------------------------------------------------------------------- bad query vectors
def test_zero_and_non_finite_query_vectors_are_refused_in_one_line(store_path):
    path, data = store_path
    dim = data.shape[2]
    bad = np.ones((3, dim), np.float32)
    bad[1, 2] = np.nan
    with open_store(path) as store:
        for query, message in ((np.zeros(dim), r"^the query embedding is all zeros: it has no direction"),
                               (np.full(dim, np.inf), r"^the query embedding holds non-finite values \(NaN or inf\)"),
                               (bad, r"^query 2 of 3 holds non-finite values"),
                               (np.vstack([np.ones(dim), np.zeros(dim)]), r"^query 2 of 2 is all zeros")):
            with pytest.raises(ValueError, match=message) as caught:
                store.search(FEAT, query)
            assert "\n" not in str(caught.value)


def test_a_clip_whose_mean_is_zero_cannot_be_a_query_cli_exit_2_in_one_line(tmp_path, capsys):
    path = tmp_path / "z.zarr"
    data = build(path)
    data[4] = 0
    with open_store(path, mode="a") as store:
        store.write_rows(FEAT, 0, data)
    assert main(["search", str(path), "--feature-set", FEAT, "--like", "c004"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "clip 'c004'" in err and "is all zeros" in err, err


# ---------------------------------------------------------------------------------- at 50k x 64
def _clustered_store(path: Path, n: int = 50_000, dim: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` clips of one 64-value float16 vector each, around 100 cluster centres (like real embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((100, dim))
    data = (centres[rng.integers(0, 100, n)] + 0.35 * rng.standard_normal((n, dim)))[:, None, :].astype(np.float16)
    clips = [ClipRecord(f"k{i:06d}", label=TAU_CLASSES[i % 10], city="x", location="x-0",
                        splits=frozenset({"train"})) for i in range(n)]
    with create_store(path, Manifest("scale", list(TAU_CLASSES), clips)) as store:
        store.create_feature_set("emb", 1, (dim,), {"encoder": "bench/synthetic", "config": {}, "weights": {}},
                                 chunk_clips=4096)
        store.write_rows("emb", 0, data)
    return data


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale") / "k.zarr"
    return path, _clustered_store(path)


def test_the_approximate_default_keeps_recall_at_10_on_50k_clustered_clips(clustered, monkeypatch):
    pytest.importorskip("faiss")
    path, data = clustered
    means = data[:, 0].astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    monkeypatch.setattr(search_mod, "APPROX_ABOVE", len(data) * data.shape[2] - 1)  # just above: auto -> faiss
    picks = np.random.default_rng(3).choice(len(data), 100, replace=False)
    queries = means[picks] + 0.05 * np.random.default_rng(4).standard_normal((100, data.shape[2])).astype(np.float32)
    with open_store(path) as store:
        results = store.search("emb", queries, k=10)
        exact = store.search("emb", queries, k=10, method="exact")
    assert {r.method for r in results} == {"faiss"} and {r.method for r in exact} == {"exact"}
    hits = 0
    for q, got, want in zip(queries, results, exact):
        truth = np.argsort(-(means @ (q / np.linalg.norm(q))), kind="stable")[:10]
        assert want.clip_ids == [f"k{r:06d}" for r in truth]  # exact is numpy's answer
        hits += len(set(got.clip_ids) & set(want.clip_ids))
    assert hits / (10 * len(queries)) >= 0.95


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_clip_matrix_is_built_in_one_bounded_pass(clustered, monkeypatch):
    """The .npy is streamed block by block: building adds far less than the matrix to what reading
    the same blocks takes (an in-memory build would add all of it), and the mapped matrix equals the
    unit clip means."""
    path, data = clustered
    monkeypatch.setattr(search_mod, "BLOCK_BYTES", 2**20)
    matrix_bytes = len(data) * data.shape[2] * 4
    with open_store(path) as store:
        search_mod.set_state(store, "emb")  # the done mask, ids and labels the store caches anyway
        reading = _peak(lambda: [None for _ in search_mod.clip_blocks(store, "emb")])
        building = _peak(lambda: search_mod.clip_matrix(store, "emb", reuse=False))
        in_memory = _peak(lambda: search_mod._matrix_in_memory(store, "emb", None))
        held = search_mod.clip_matrix(store, "emb")
    assert isinstance(held.matrix, np.memmap)
    assert building < reading + matrix_bytes / 4, (reading, building, matrix_bytes)
    assert in_memory > building + matrix_bytes / 4, (in_memory, building)  # the measure sees a matrix held whole
    np.testing.assert_allclose(held.matrix, search_mod.clip_vectors(data), atol=1e-6)


def test_a_new_process_maps_the_sidecar_and_builds_nothing(store_path):
    """The first query of a fresh interpreter answers from the memory-mapped .npy written by another."""
    import subprocess
    import sys

    path, data = store_path
    with open_store(path) as store:
        first = store.search(FEAT, "c002", k=5)
    assert any(n.startswith("built the clip matrix") for n in first.notes)
    child = (f"import json\nimport numpy as np\nfrom featurestore import open_store\n"
             f"from featurestore.store import search as m\n"
             f"with open_store({str(path)!r}) as s:\n    r = s.search({FEAT!r}, 'c002', k=5)\n"
             f"    mapped = isinstance(m.clip_matrix(s, {FEAT!r}).matrix, np.memmap)\n"
             f"print(json.dumps({{'ids': r.clip_ids, 'notes': r.notes, 'mapped': mapped}}))\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"ids": first.clip_ids, "notes": [], "mapped": True}
