"""A ``heads classify`` child that crashes (exit 1, no JSON on stdout) is one line naming the run, the
exit code and the end of its stderr; before, fusion parsed the empty stdout and said only
``Expecting value: line 1 column 1``.

The crash is real: a ``sitecustomize`` on the child's ``PYTHONPATH`` makes ``import torch`` fail the
way a torch built for another CUDA does, so heads dies with an uncaught ImportError traceback before
it prints anything (and without loading torch: the test stays cheap).
"""
from __future__ import annotations

import pytest

from featurestore.clip_files import ClipFiles
from fusion.classify import ClassifyError, ask_heads

BROKEN_TORCH = '''
import sys


class _BrokenTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("libtorch_cuda.so: cannot open shared object file: No such file or directory")
        return None


sys.meta_path.insert(0, _BrokenTorch())
'''


def test_a_crashed_heads_classify_is_one_line_naming_run_exit_code_and_stderr(tmp_path, monkeypatch):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(BROKEN_TORCH)
    monkeypatch.setenv("PYTHONPATH", str(shim))
    run_dir = tmp_path / "c04"
    run_dir.mkdir()
    clip = ClipFiles("x", audio=tmp_path / "x.wav")
    with pytest.raises(ClassifyError) as err:
        ask_heads("C04", {"run_dir": str(run_dir)}, [clip], ["a", "b"], device="cpu")
    message = str(err.value)
    assert "\n" not in message and "'C04'" in message and str(run_dir) in message, message
    assert "(exit code 1)" in message and "ImportError: libtorch_cuda.so" in message, message
