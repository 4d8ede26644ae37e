"""A Ctrl-C that Python swallows is still a Ctrl-C (``featurestore._sigint.kept``).

Python runs a SIGINT's handler at its next check between bytecodes; when that falls inside a weakref
finalizer or a ``__del__``, the KeyboardInterrupt is printed as "Exception ignored" and dropped. CI
once saw an extraction given Ctrl-C finish with exit 0 that way: the signal landed in the decode
buffer pool's finalizer. These tests put the SIGINT exactly there, in child processes (a handler
installed in pytest's own process would outlive the test).
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

from tests.featurestore.test_extract_support import make_dataset

SWALLOWED = textwrap.dedent("""
    import os, signal, sys, weakref
    from featurestore._sigint import kept, raise_swallowed

    class Thing:
        pass

    def interrupt_in_finalizer():
        thing = Thing()
        weakref.finalize(thing, lambda: (os.kill(os.getpid(), signal.SIGINT), sum(range(10))))
        del thing  # the finalizer runs here; its KeyboardInterrupt is "ignored"

    mode = sys.argv[1]
    try:
        if mode == "plain":
            interrupt_in_finalizer()
        elif mode == "loop":
            with kept():
                for step in range(3):
                    interrupt_in_finalizer() if step == 0 else None
                    raise_swallowed()
                    print("step", step, "done")
        else:  # "end": no check inside the block, the block's end raises it
            with kept():
                interrupt_in_finalizer()
        print("finished")
    except KeyboardInterrupt:
        print("interrupted")
    with kept():  # a new block after the old one: nothing pending from before
        raise_swallowed()
    print("clean after", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
""")


def _run(mode: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", SWALLOWED, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[:-1]


def test_a_sigint_in_a_finalizer_is_dropped_by_python_but_raised_by_kept():
    assert _run("plain") == ["finished", "clean after True"]  # what Python does on its own: lost
    assert _run("loop") == ["interrupted", "clean after True"]  # the first check after it raises
    assert _run("end") == ["interrupted", "clean after True"]  # the block's end raises it


def test_kept_leaves_other_unraisable_reports_alone_and_puts_the_hook_back():
    code = textwrap.dedent("""
        import sys, weakref
        from featurestore._sigint import kept
        hook = sys.unraisablehook

        class Thing:
            pass

        with kept():
            thing = Thing()
            weakref.finalize(thing, lambda: 1 / 0)
            del thing
        print(sys.unraisablehook is hook)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout == "True\n" and "ZeroDivisionError" in done.stderr, done.stderr


EXTRACT = textwrap.dedent("""
    import os, signal, sys
    from featurestore.extract import buffer_pool
    from featurestore.cli import main

    release = buffer_pool.BufferPool.release
    calls = []

    def release_interrupted(self, slot):
        calls.append(slot)
        if len(calls) == 2:  # mid-run: Ctrl-C arrives while the finalizer frees a slot
            os.kill(os.getpid(), signal.SIGINT)
        release(self, slot)

    buffer_pool.BufferPool.release = release_interrupted
    code = main(sys.argv[1:])
    print("slots released", len(calls), file=sys.stderr)
    sys.exit(code)
""")


def test_an_extraction_given_ctrl_c_inside_the_buffer_pools_finalizer_stops_exit_130(tmp_path):
    """Before ``kept``, this run printed "Exception ignored ... KeyboardInterrupt" and finished every
    clip with exit 0."""
    root = tmp_path / "TAU-urban-audio-visual-scenes-2021-development"
    make_dataset(root, 8, seconds=10.0, rate=8000, fps=1)
    store = tmp_path / "s.zarr"
    done = subprocess.run([sys.executable, "-c", EXTRACT, "extract", str(root), str(store), "--encoders", "logmel",
                           "--device", "cpu", "--num-workers", "1", "--batch-size", "1", "--chunk-clips", "2",
                           "--quiet"], capture_output=True, text=True, timeout=180)
    assert int(re.search(r"slots released (\d+)", done.stderr)[1]) >= 2, done.stderr  # the pool was used
    assert done.returncode == 130, done.stderr
    (line, _) = done.stderr.splitlines()  # the command's one line, then this test's count: no traceback
    assert re.fullmatch(rf"featurestore extract: interrupted; \d of 8 clips done and kept in {re.escape(str(store))} "
                        r"\(\d by this run\); rerun the same command to resume", line), done.stderr
