"""One line for what went wrong talking to object storage (s3fs, botocore, aiohttp errors).

A store at a URL fails in ways a local one cannot: the endpoint does not answer, the credentials
are missing or refused, the bucket does not exist, the server throttles or fails a request. s3fs
turns some of these into ``OSError`` subclasses whose text is the server's alone (no URL), and
lets others through as botocore or aiohttp exceptions whose traceback is all a user would see.
`RemoteStoreError` names the store's URL and what was wrong, and says that nothing was changed
by the failed request, so the command can be rerun once the cause is fixed.
"""
from __future__ import annotations

from featurestore.errors import FeatureStoreError

#: Modules whose exceptions are transport failures (not damage of the stored bytes).
_TRANSPORT_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3", "requests")


class RemoteStoreError(FeatureStoreError):
    """A request to the object storage behind a store failed (unreachable, refused, missing bucket,
    throttled or failed by the server): not damage of the store's data."""


def is_transport_error(err: BaseException, remote: bool = False) -> bool:
    """Whether ``err`` came from talking to the object storage rather than from the bytes read.

    s3fs raises ``FileNotFoundError`` for an absent key (callers handle that first), ``PermissionError``
    for refused credentials, and plain ``OSError`` (``EIO``, ``EINVAL``) for the server's other error
    answers, mostly with botocore's error as the cause but not always; botocore's own errors (no
    endpoint, no credentials, timeouts) are not ``OSError`` at all. ``remote``: the store is at a
    URL, where any ``OSError`` but an absent key is a failed request (there is no local file)."""
    if type(err).__module__.split(".")[0] in _TRANSPORT_MODULES:
        return True
    if not isinstance(err, OSError):
        return False
    if remote and not isinstance(err, FileNotFoundError):
        return True
    cause = err.__cause__
    return cause is not None and type(cause).__module__.split(".")[0] in _TRANSPORT_MODULES


def is_remote(location: str) -> bool:
    """Whether ``location`` is a URL (not a local path, not ``file://``)."""
    return "://" in location and not location.startswith(("file://", "local://"))


def describe(err: BaseException) -> str:
    """What was wrong, in words a user can act on."""
    name = type(err).__name__
    text = " ".join(str(err).split()) or name
    if name == "NoCredentialsError":
        return ("no credentials were found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or "
                "pass storage_options)")
    if isinstance(err, PermissionError):
        return f"access was refused: {text} (check the credentials and the bucket's permissions)"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError") or "Connect" in name:
        return f"the endpoint could not be reached: {text} (check AWS_ENDPOINT_URL or storage_options)"
    if isinstance(err, FileNotFoundError) and "bucket" in text.lower():
        return f"the bucket does not exist ({text}); create it first"
    return f"the request failed: {text}"


def remote_error(location: str, err: BaseException, doing: str) -> RemoteStoreError:
    """The error to raise for ``err`` met while ``doing`` (e.g. "opening it") on the store at ``location``."""
    return RemoteStoreError(f"{location}: {doing} failed: {describe(err)}; the failed request changed "
                            f"nothing: fix the cause and rerun")
