"""Thread-per-connection stdlib echo / HTTP plaintext server, for the goev.py benchmark.

    python bench/servers/threads_server.py echo|http 127.0.0.1:PORT

Blocking sockets, one thread per accepted connection: the classic baseline.
SIGINT/SIGTERM exit 0.
"""
import os
import signal
import socket
import sys
import threading
import time
from email.utils import formatdate

_date = [0, b""]


def http_response():
    now = int(time.time())
    if now != _date[0]:
        _date[0] = now
        _date[1] = (
            b"HTTP/1.1 200 OK\r\nServer: threads\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 13\r\nDate: "
            + formatdate(now, usegmt=True).encode()
            + b"\r\n\r\nHello, World!"
        )
    return _date[1]


def serve_echo(conn):
    buf = bytearray(65536)
    view = memoryview(buf)
    with conn:
        try:
            while True:
                n = conn.recv_into(buf)
                if not n:
                    return
                conn.sendall(view[:n])
        except OSError:
            return


def serve_http(conn):
    pending = b""
    with conn:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf = pending + data if pending else data
                n = buf.count(b"\r\n\r\n")
                if n:
                    conn.sendall(http_response() * n)
                    buf = buf[buf.rfind(b"\r\n\r\n") + 4:]
                if len(buf) > 65536:
                    return
                pending = buf
        except OSError:
            return


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("echo", "http"):
        print("usage: threads_server.py echo|http HOST:PORT", file=sys.stderr)
        return 2
    handler = serve_echo if argv[0] == "echo" else serve_http
    host, _, port = argv[1].rpartition(":")
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host or "0.0.0.0", int(port)))
    ls.listen(1024)

    def bye(*_):
        # os._exit: with thousands of connection threads an orderly interpreter
        # shutdown can take seconds; a benchmark server has nothing to flush.
        ls.close()
        os._exit(0)

    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGINT, bye)
    # The accept times out now and then so that the main thread runs the signal
    # handler: a SIGTERM may be delivered to any of thousands of connection
    # threads, and Python runs handlers in the main thread only.
    ls.settimeout(0.5)
    try:
        while True:
            try:
                conn, _ = ls.accept()
            except socket.timeout:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=handler, args=(conn,), daemon=True).start()
    finally:
        ls.close()


if __name__ == "__main__":
    sys.exit(main())
