"""gevent echo / HTTP plaintext server, for the goev.py benchmark.

    python bench/servers/gevent_server.py echo|http 127.0.0.1:PORT

A `gevent.server.StreamServer`: one greenlet per connection running blocking-
style `recv`/`sendall` on gevent's cooperative socket (libev loop): the way a
gevent user writes a raw TCP server.  The HTTP responder is the other
servers' one, common.py (count the `\\r\\n\\r\\n` terminators, answer each in
order), not gevent.pywsgi.  TCP_NODELAY on every connection.  SIGINT/SIGTERM
exit 0.
"""
import os
import signal
import socket
import sys

import gevent
from gevent.server import StreamServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py's folder, also under PYTHONSAFEPATH
from common import answer_http, http_answerer, parse_args  # noqa: E402

answer = http_answerer("gevent")


def serve_echo(conn, address):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
    except OSError:
        return


def serve_http(conn, address):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    answer_http(conn, answer)


def main(argv=None):
    kind, host, port = parse_args(argv, "gevent_server.py")
    server = StreamServer((host, port), serve_echo if kind == "echo" else serve_http, backlog=1024)
    server.stop_timeout = 0.5  # seconds the open connections get to finish when stopping
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, server.close)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
