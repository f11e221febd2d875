"""gevent echo / HTTP plaintext server, for the goev.py benchmark.

    python bench/servers/gevent_server.py echo|http 127.0.0.1:PORT

A `gevent.server.StreamServer`: one greenlet per connection running blocking-
style `recv`/`sendall` on gevent's cooperative socket (libev loop): the way a
gevent user writes a raw TCP server.  The HTTP responder is the one of
asyncio_server.py (count the `\\r\\n\\r\\n` terminators, answer each in order),
not gevent.pywsgi.  TCP_NODELAY on every connection.  SIGINT/SIGTERM exit 0.
"""
import signal
import socket
import sys
import time
from email.utils import formatdate

import gevent
from gevent.server import StreamServer

_date = [0, b""]


def http_response():
    now = int(time.time())
    if now != _date[0]:
        _date[0] = now
        _date[1] = (
            b"HTTP/1.1 200 OK\r\nServer: gevent\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 13\r\nDate: "
            + formatdate(now, usegmt=True).encode()
            + b"\r\n\r\nHello, World!"
        )
    return _date[1]


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
    pending = b""
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf = pending + data if pending else data
            n = buf.count(b"\r\n\r\n")
            if n:
                conn.sendall(http_response() * n)  # one answer per request, in order
                buf = buf[buf.rfind(b"\r\n\r\n") + 4:]
            if len(buf) > 65536:
                return
            pending = buf
    except OSError:
        return


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("echo", "http"):
        print("usage: gevent_server.py echo|http HOST:PORT", file=sys.stderr)
        return 2
    host, _, port = argv[1].rpartition(":")
    server = StreamServer((host or "0.0.0.0", int(port)), serve_echo if argv[0] == "echo" else serve_http,
                          backlog=1024)
    server.stop_timeout = 0.5  # seconds the open connections get to finish when stopping
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, server.close)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
