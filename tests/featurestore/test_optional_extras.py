"""Optional paths used without their extra fail in one line naming it (pyproject's extras)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _without(module: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which ``import module`` fails as if it were not installed."""
    script = f"import sys\nsys.modules[{module!r}] = None\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_the_core_install_is_lean_and_every_extra_is_in_test_and_all():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    # joblib is core since `heads sweep` runs the CNN heads' trials through it (scikit-learn needs it anyway)
    for name in ("librosa", "psutil", "dask", "faiss", "starlette", "playwright"):
        assert name not in core, f"{name} belongs in an extra"
    extras = project["optional-dependencies"]
    assert {"dask", "s3", "faiss", "export", "test", "all"} <= set(extras)
    assert "avscene[dask,s3,faiss,export]" in extras["test"]


def test_faiss_search_without_faiss_names_the_extra(tmp_path):
    proc = _without("faiss", f"""
        import numpy as np
        from featurestore import ClipRecord, Manifest, create_store
        clips = [ClipRecord(f"c{{i}}", label="x", splits=frozenset({{"s"}})) for i in range(4)]
        with create_store({str(tmp_path / "s.zarr")!r}, Manifest("toy", ["x"], clips)) as store:
            store.create_feature_set("emb", 1, (3,), {{"encoder": "emb", "config": {{}}}})
            store.write_rows("emb", 0, np.eye(4, 3, dtype=np.float16)[:, None, :] + 0.1)
            print(len(store.search("emb", "c0", k=2).clip_ids))    # auto: exact, no faiss needed
            try:
                store.search("emb", "c0", k=2, method="faiss")
            except ValueError as err:
                print("ERR", err)
    """)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "2"
    assert lines[1].startswith("ERR ") and "pip install 'avscene[faiss]'" in lines[1]
