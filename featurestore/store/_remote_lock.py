"""The writer lock of a store on S3: an object beside the store, created only where absent.

S3 has no ``flock``, but it has conditional writes: a PUT with ``If-None-Match: *`` succeeds only
where no object exists under the key, and one with ``If-Match: <etag>`` only where the object is still
that version. So of two writers starting at once exactly one creates ``<store>.lock``; the other reads
the record in it and is refused naming the holder (`StoreLockedError`), as beside a local store.

What S3 cannot do is drop the object when its holder dies. A record written by a process of this
host that no longer runs (a SIGKILLed ``extract``) is taken over with a PUT conditional on the ETag
read, so two writers resuming at once cannot both take it; a record of another host is refused with
the command that deletes it (this host cannot tell whether that process still runs). The holder
deletes the object when it ends, only while the object is still its own (its random token).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from typing import Any

from featurestore.store._remote import is_transport_error, remote_error
from featurestore.store.lock import LOCK_SUFFIX, StoreLockedError, _alive, describe_holder

_TRIES = 4  # create / take over rounds against writers racing for the same object


class RemoteLock:
    """An exclusive lock on one ``s3://`` store (see the module docstring); a context manager."""

    def __init__(self, store: str, command: str | None = None, storage_options: dict | None = None):
        self.store = store.rstrip("/")
        self.path = self.store + LOCK_SUFFIX  # the lock object's URL, beside the store's prefix
        self.command = command if command is not None else " ".join(sys.argv)
        self._options = dict(storage_options or {})
        self._token: str | None = None
        self._pid = os.getpid()
        self.previous: dict[str, Any] | None = None  # a dead holder's record, when taken over

    @property
    def held(self) -> bool:
        return self._token is not None and self._pid == os.getpid()

    def acquire(self) -> RemoteLock:
        """Create the lock object, take over a dead local holder's, or raise StoreLockedError."""
        if self._token is not None:
            return self
        fs, key = self._fs()
        token = uuid.uuid4().hex
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": token,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command}).encode()
        holder: dict[str, Any] = {}
        for _ in range(_TRIES):
            if self._put(fs, key, body, IfNoneMatch="*"):
                break
            etag, holder = self._read(fs, key)
            if etag is None:  # released between our PUT and our read: try to create it again
                continue
            if not _dead_here(holder):
                raise StoreLockedError(self.store, self.path, holder)
            if self._put(fs, key, body, IfMatch=etag):
                self.previous = holder
                print(f"note: {self.path}: taking over the writer lock left by a process that ended without "
                      f"releasing it ({describe_holder(holder)})", file=sys.stderr)
                break
        else:
            raise StoreLockedError(self.store, self.path, holder)
        self._token, self._pid = token, os.getpid()
        return self

    def release(self) -> None:
        """Delete the lock object if it is still this holder's (never a later holder's)."""
        if not self.held:
            return
        token, self._token = self._token, None
        fs, key = self._fs()
        try:
            etag, record = self._read(fs, key)
            if etag is not None and record.get("token") == token:
                fs.call_s3("delete_object", **key)
        except Exception as err:  # noqa: BLE001 - the work is done; a lock left behind is taken over later
            print(f"warning: {self.path}: could not remove the writer lock object ({err}); the next "
                  f"writer on this host takes it over, or delete it: aws s3 rm {self.path}", file=sys.stderr)

    def __enter__(self) -> RemoteLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---------------------------------------------------------------------------------- requests
    def _fs(self) -> tuple[Any, dict[str, str]]:
        try:
            import fsspec

            fs, path = fsspec.url_to_fs(self.path, **self._options)
        except ImportError as err:
            raise ValueError(f"{self.store}: s3:// URLs need s3fs ({err}); pip install 'avscene[s3]'") from None
        bucket, _, name = path.partition("/")
        return fs, {"Bucket": bucket, "Key": name}

    def _put(self, fs: Any, key: dict[str, str], body: bytes, **condition: str) -> bool:
        """The conditional PUT; False where its condition failed (another writer's object is there)."""
        try:
            fs.call_s3("put_object", Body=body, **key, **condition)
        except FileExistsError:  # s3fs's word for a failed If-None-Match
            return False
        except Exception as err:
            if _precondition_failed(err):
                return False
            raise self._error(err) from None
        return True

    def _read(self, fs: Any, key: dict[str, str]) -> tuple[str | None, dict[str, Any]]:
        """(ETag, record) of the lock object as it is now; (None, {}) where there is none."""
        try:
            head = fs.call_s3("head_object", **key)
            data = fs.cat_file(self.path)
        except FileNotFoundError:
            return None, {}
        except Exception as err:
            raise self._error(err) from None
        try:
            record = json.loads(data)
        except ValueError:
            record = {}
        return head["ETag"], record if isinstance(record, dict) else {}

    def _error(self, err: BaseException) -> Exception:
        if is_transport_error(err) or isinstance(err, OSError):
            return remote_error(self.store, err, f"taking the writer lock (object {self.path})")
        return err


def _precondition_failed(err: BaseException) -> bool:
    """Whether a request failed its ``If-Match`` / ``If-None-Match`` condition (HTTP 412)."""
    for e in (err, err.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return True
    return False


def _dead_here(holder: dict[str, Any]) -> bool:
    """Whether the record names a process of this host that no longer runs (or names nothing usable:
    an object that is not a record, which no running writer of this code leaves)."""
    if not holder:
        return True
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)
