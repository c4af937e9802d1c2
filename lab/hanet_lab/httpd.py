"""The lab router's tiny web server (standalone: ``httpd.py <name> <port> <logfile>``).

``GET /whoami`` answers the client's source address as seen by the router (so a test
can tell whether SNAT happened and to which address); any other path answers
``router <name>``. Every request is appended to ``logfile`` as ``<client-ip> <method> <path>``.
"""

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME, PORT, LOG = sys.argv[1], int(sys.argv[2]), sys.argv[3]
_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server_version = "hanet-lab-router"

    def _answer(self, body: bytes):
        client = self.client_address[0]
        with _lock, open(LOG, "a") as f:
            f.write(f"{client} {self.command} {self.path}\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/whoami"):
            self._answer(f"{self.client_address[0]}\n".encode())
        else:
            self._answer(f"router {NAME}\n".encode())

    do_HEAD = do_GET

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
