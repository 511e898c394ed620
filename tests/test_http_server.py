"""The test HTTP server (tests/http_server.py): a client that goes away mid-body is normal, not a traceback."""
from __future__ import annotations

import socket
import struct
import time

import pytest

from tests import http_server
from tests.http_server import serve_folder


def _wait_for(condition, seconds: float = 5.0) -> bool:
    """Whether `condition()` came true within `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _get_then_leave(url_port: int, path: str, reset: bool) -> bytes:
    """Send a GET, read the first bytes of the answer, then close: with an RST (reset) or a plain FIN."""
    sock = socket.create_connection(("127.0.0.1", url_port))
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        first = sock.recv(4096)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    return first


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_client_leaving_mid_body_ends_its_request_without_a_traceback(tmp_path, capfd, reset):
    (tmp_path / "big.tar").write_bytes(bytes(48 << 20))   # far more than the socket buffers hold
    with serve_folder(tmp_path) as server:
        port = server.server_address[1]
        assert _get_then_leave(port, "/big.tar", reset).startswith(b"HTTP/1.1 200")
        counted = _wait_for(lambda: server.disconnects == 1)
        assert server.gets["/big.tar"] == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "ConnectionResetError" not in err, err
    assert counted, "the disconnect was not seen"


def test_any_other_handler_error_is_still_printed(tmp_path, capfd, monkeypatch):
    def broken(self):
        raise RuntimeError("planted handler bug")

    monkeypatch.setattr(http_server._Handler, "_file", broken)
    with serve_folder(tmp_path) as server:
        with pytest.raises(OSError):   # the server drops the connection without an answer
            with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as sock:
                sock.sendall(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                if not sock.recv(4096):
                    raise ConnectionAbortedError("closed without an answer")
        seen: list[str] = []

        def printed() -> bool:
            seen.append(capfd.readouterr().err)
            return "planted handler bug" in "".join(seen)

        assert _wait_for(printed)
    assert "Traceback" in "".join(seen) and server.disconnects == 0
