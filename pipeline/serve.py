"""Serve a synthetic world's images on a loopback HTTP port, so ``download`` really downloads."""

from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from pipeline.world import load_world
from synseg.errors import UserError

# Connections the kernel queues while every handler thread is busy starting. The standard
# library's 5 drops the SYNs of a 64-thread download, whose clients then time out.
BACKLOG = 1024


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = BACKLOG
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that closes its connection mid-reply (a timeout, a finished download) is
        normal; anything else is still reported as the base class does."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_server(world: Path, port: int) -> _Server:
    load_world(world)  # a clear error if this is not a world
    handler = functools.partial(_QuietHandler, directory=str(Path(world) / "http"))
    try:
        server = _Server(("127.0.0.1", port), handler)
    except OSError as e:
        raise UserError(f"cannot listen on 127.0.0.1:{port}: {e.strerror}") from None
    return server


@contextlib.contextmanager
def serving(world: Path, port: int) -> Iterator[str]:
    """Serve ``world`` in a background thread for the duration of the block; yield its base URL."""
    server = make_server(world, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
