"""Python children that start warm: forked from a server process that imported torch and the library
once, instead of a fresh interpreter that pays ~2 s of CPU importing torch before it does anything.

The fault tests kill, stop and starve real extraction processes, dozens of them in a run; their start
was most of what those tests cost. This is multiprocessing's ``forkserver`` with a preload: the server
is a single-threaded process started once per test process (so forking it is safe, unlike forking
pytest with its threads), each child is a plain ``fork()`` of it, then runs
the same code a ``python -c CODE ARGS`` / ``python -m MODULE ARGS`` child would, with the environment,
working directory, process group (a new session), SIGINT disposition and stdio pipes the test gave.
What differs from a fresh interpreter: the preloaded modules are already imported, and what the
interpreter does once at its start is the server's (``-X`` options, site; a ``sitecustomize`` in a
directory the child's PYTHONPATH adds is run).

:func:`start` returns a :class:`WarmChild`, which answers what the tests ask of a
``subprocess.Popen``: ``pid``, ``poll``, ``wait``, ``communicate``, ``returncode``, ``stderr``.
"""
from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from multiprocessing import reduction

#: What the server imports once: everything an extraction or ``featurestore``/``heads`` command loads,
#: and timm (~2 s of CPU per child that builds a timm encoder or backbone; once here).
PRELOAD = ["featurestore.cli", "featurestore.extract.pipeline", "heads.cli", "timm"]

_CONTEXT: multiprocessing.context.ForkServerContext | None = None


def _context() -> multiprocessing.context.ForkServerContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def stop_server() -> None:
    """Stop the server and wait for it, so that its children's CPU is counted as this process's
    (a server left to exit after this process would be reaped by init, and its time lost)."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)
    if _CONTEXT is not None and stop is not None:
        stop()


class _Fd:
    """A file descriptor handed to the child (sent over the server's socket, as multiprocessing
    sends a Connection's)."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def __reduce__(self):
        return _Fd._rebuilt, (None if self.fd is None else reduction.DupFd(self.fd),)

    @staticmethod
    def _rebuilt(dup) -> int | None:
        return None if dup is None else dup.detach()


def _exit_code(exc: SystemExit) -> int:
    """What the interpreter makes of ``sys.exit(code)``: None is 0, an int is itself, anything else
    is printed to stderr and is 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _run(argv: list[str]) -> int:
    """Run ``argv`` (``["-c", CODE, *args]`` or ``["-m", MODULE, *args]``) as the interpreter would."""
    import runpy

    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    elif argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file in argv[0]
        runpy._run_module_as_main(argv[1], alter_argv=True)
    else:
        raise ValueError(f"warm children run -c CODE or -m MODULE, not {argv[0]!r}")
    return 0


def _writer(fd: int, errors: str, line_buffering: bool, write_through: bool) -> io.TextIOWrapper:
    """``sys.stdout``/``sys.stderr`` on ``fd`` as the interpreter makes them (stderr line-buffered)."""
    return io.TextIOWrapper(io.BufferedWriter(io.FileIO(fd, "w", closefd=False)), encoding="utf-8", errors=errors,
                            line_buffering=line_buffering, write_through=write_through)


def _run_sitecustomize(entries: list[str]) -> None:
    """The interpreter imports the first ``sitecustomize`` on its path at start: one in a directory
    that PYTHONPATH adds here (the S3 tests' loopback guard) is run now, as it would have been."""
    import runpy

    for entry in entries:
        path = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(path):
            runpy.run_path(path, run_name="sitecustomize")
            return


def _child(argv: list[str], env: dict[str, str], cwd: str | None, stdio: tuple[_Fd, _Fd, _Fd],
           sigint_ignored: bool, preexec_fn: Callable[[], None] | None) -> None:
    """The forked child: become what ``subprocess.Popen(start_new_session=True, ...)`` would have
    started, run ``argv``, exit with the interpreter's exit status."""
    os.setsid()
    multiprocessing.set_start_method(None, force=True)  # the interpreter's default (fork), not forkserver
    for target, fd in enumerate(stdio):
        if fd is not None:
            os.dup2(fd, target)
            os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN if sigint_ignored else signal.default_int_handler)
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))  # what the interpreter reads from it at start
    sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[:0] = extra
    _run_sitecustomize(extra)
    sys.stdin = open(0, closefd=False)
    sys.stdout = _writer(1, "strict", line_buffering=False, write_through=unbuffered)
    sys.stderr = _writer(2, "backslashreplace", line_buffering=True, write_through=unbuffered)
    if preexec_fn is not None:
        preexec_fn()
    try:
        code = _run(argv)
    except SystemExit as exc:
        code = _exit_code(exc)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = None  # the interpreter reports an unhandled Ctrl-C as death by SIGINT
    except BaseException:  # noqa: BLE001 (what the interpreter does with any uncaught exception)
        traceback.print_exc()
        code = 1
    threading._shutdown()  # as at interpreter exit: wait for non-daemon threads, then atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code is None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


class WarmChild:
    """A started warm child, with the part of ``subprocess.Popen``'s interface the tests use."""

    def __init__(self, process: multiprocessing.Process, stdout, stderr, text: bool):
        self._process = process
        self.pid = process.pid
        self.stdout, self.stderr, self._text = stdout, stderr, text
        self.args = None

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None):
        """Read stdout and stderr (those that are pipes) to their end, then wait for the exit."""
        deadline = None if timeout is None else time.monotonic() + timeout
        streams = [s for s in (self.stdout, self.stderr) if s is not None]
        chunks: dict = {s: [] for s in streams}
        with selectors.DefaultSelector() as selector:
            for stream in streams:
                selector.register(stream, selectors.EVENT_READ)
            while selector.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in selector.select(left):
                    data = os.read(key.fd, 65536)
                    if data:
                        chunks[key.fileobj].append(data)
                    else:
                        selector.unregister(key.fileobj)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        out = [b"".join(chunks[s]) if s in chunks else None for s in (self.stdout, self.stderr)]
        for stream in streams:
            stream.close()
        if self._text:
            out = [None if o is None else o.decode(errors="replace") for o in out]
        return tuple(out)


def _pipe_for(where) -> tuple[int | None, object, int | None]:
    """(fd for the child, file for the test or None, fd to close here after the start)."""
    if where == subprocess.PIPE:
        r, w = os.pipe()
        return w, os.fdopen(r, "rb", buffering=0), w
    if where == subprocess.DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR)
        return fd, None, fd
    if where is None:
        return None, None, None
    raise ValueError(f"stdio {where!r}: PIPE, DEVNULL or None")


def start(argv: list[str], env: dict[str, str] | None = None, cwd=None, stdout=None, stderr=None,
          preexec_fn: Callable[[], None] | None = None, text: bool = False) -> WarmChild:
    """Start ``python ARGV`` warm, in a new session (``start_new_session=True``); ``stdout``/``stderr``
    as for Popen (PIPE, DEVNULL or None to inherit); ``preexec_fn`` must pickle (a module-level
    function or a ``functools.partial`` of one)."""
    ctx = _context()
    fds = [_pipe_for(subprocess.DEVNULL), _pipe_for(stdout), _pipe_for(stderr)]
    sigint_ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    process = ctx.Process(target=_child, args=(list(argv), dict(os.environ if env is None else env),
                                               None if cwd is None else str(cwd),
                                               tuple(_Fd(fd) for fd, _, _ in fds), sigint_ignored, preexec_fn))
    try:
        process.start()
    finally:
        for _, _, close in fds:
            if close is not None:
                os.close(close)
    _wait_for_own_session(process)
    return WarmChild(process, fds[1][1], fds[2][1], text)


def _wait_for_own_session(process: multiprocessing.Process, timeout: float = 30.0) -> None:
    """Return once the child leads its own process group, as Popen(start_new_session=True) does
    before it returns: a test that kills the group at once must reach the child."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.getpgid(process.pid) == process.pid:
                return
        except ProcessLookupError:
            return  # ended already
        if process.exitcode is not None:
            return
        time.sleep(0.001)
    raise RuntimeError(f"warm child {process.pid} did not start its session in {timeout} s")


def run(argv: list[str], env: dict[str, str] | None = None, cwd=None, timeout: float | None = None,
        preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *argv], capture_output=True, text=True, ...)``, started warm;
    on a timeout the child's process group is killed and ``TimeoutExpired`` raised, as ``run`` does."""
    child = start(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn,
                  text=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise
    return subprocess.CompletedProcess([sys.executable, *argv], child.returncode, out, err)


def ignore_sigxfsz() -> None:
    """SIGXFSZ ignored (and so in the child's own children): a write past RLIMIT_FSIZE fails with
    EFBIG instead of killing the process. A ``preexec_fn`` that pickles."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def file_size_limit(limit: int) -> None:
    """RLIMIT_FSIZE of ``limit`` bytes, SIGXFSZ ignored: ``preexec_fn=functools.partial(file_size_limit, n)``."""
    ignore_sigxfsz()
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


class SubprocessModule:
    """Stands in for the ``subprocess`` module inside a library module under test that starts its own
    Python children (``fusion.classify`` runs ``python -m heads classify``): each
    ``run([sys.executable, *argv], capture_output=True, text=True)`` runs ``argv`` as a warm child.

    Patch it in for the test only (``monkeypatch.setattr(fusion.classify, "subprocess",
    warm_child.SubprocessModule)``): the library still builds the command line, the child still runs
    it as ``python ARGV`` would; only the start is warm. Any other call is refused, so a library
    change that starts children differently fails the test instead of silently running cold.
    """

    CompletedProcess = subprocess.CompletedProcess
    TimeoutExpired = subprocess.TimeoutExpired

    @staticmethod
    def run(command: list[str], capture_output: bool = False, text: bool = False, timeout: float | None = None,
            **unexpected) -> subprocess.CompletedProcess:
        if unexpected or not (capture_output and text) or list(command[:1]) != [sys.executable]:
            raise ValueError(f"warm_child.SubprocessModule.run runs [sys.executable, ...] with capture_output=True, "
                             f"text=True, got {command[:3]!r}... capture_output={capture_output} text={text} "
                             f"{sorted(unexpected)}")
        return run(list(command[1:]), timeout=timeout)
