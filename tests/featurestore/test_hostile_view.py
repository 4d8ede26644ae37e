"""``featurestore view`` with a port out of range, a host that does not resolve, or a port in use: one
line naming them (before: an OverflowError traceback, or ``[Errno -2] Name or service not known``)."""
from __future__ import annotations

import socket

import pytest

from featurestore.viewer.serve import _bind


@pytest.mark.parametrize("host, port, said", [("127.0.0.1", 99999, "--port 99999: expected 0-65535"),
                                              ("not a host", 0, "cannot listen on --host not a host --port 0")])
def test_a_bad_address_is_one_error_naming_it(host, port, said):
    with pytest.raises(ValueError, match=said):
        _bind(host, port)


def test_a_port_in_use_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on --host 127.0.0.1 --port {port}: "):
            _bind("127.0.0.1", port)
