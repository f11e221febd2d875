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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py's folder, also under PYTHONSAFEPATH
from common import answer_http, http_answerer, parse_args  # noqa: E402

answer = http_answerer("threads")


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
    with conn:
        answer_http(conn, answer)


def main(argv=None):
    kind, host, port = parse_args(argv, "threads_server.py")
    handler = serve_echo if kind == "echo" else serve_http
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
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
