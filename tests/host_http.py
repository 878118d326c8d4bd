"""An HTTP server on the host's loopback for network tests: every GET answers one fixed page."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator

HOST_PAGE = b"hello from the host\n"


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(HOST_PAGE)))
        self.end_headers()
        self.wfile.write(HOST_PAGE)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def host_http_server() -> Iterator[int]:
    """Serve `HOST_PAGE` on 127.0.0.1 for the body; yields the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
