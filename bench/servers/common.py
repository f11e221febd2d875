"""What the comparison servers in bench/servers share (stdlib only).

The *_server.py scripts import it as ``common``: they put their own folder
first on sys.path, which Python does for a script anyway unless
PYTHONSAFEPATH is set.  One HTTP responder (the response with its Date, the
counting of pipelined requests, and the loop of the blocking-socket servers)
and one command line for all of them, so that each server differs only in
how it drives its sockets.
"""
import sys
import time
from email.utils import formatdate


def http_answerer(server):
    """A function ``answer(buf) -> (reply, rest)`` for the bytes ``buf`` that
    have arrived on a connection: ``reply`` holds one plaintext HTTP response
    (``200 OK``, ``Server: <server>``, ``text/plain``, ``Hello, World!``) per
    complete request in ``buf``, in order (``b""`` when there is none), and
    ``rest`` is what follows the last of them (``buf`` itself when there is
    none), the start of a request still arriving.  A request is complete at
    its ``\\r\\n\\r\\n`` (GETs without a body, possibly pipelined).
    The Date header is the current second's: the response is rebuilt at most
    once a second and otherwise taken from a cache, which threads may share
    (a race at worst answers with the previous second's Date)."""
    head = (b"HTTP/1.1 200 OK\r\nServer: " + server.encode() + b"\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 13\r\nDate: ")
    cache = [0, b""]    # [the second, its response]

    def answer(buf):
        n = buf.count(b"\r\n\r\n")
        if not n:
            return b"", buf
        now = int(time.time())
        if now != cache[0]:
            cache[0] = now
            cache[1] = head + formatdate(now, usegmt=True).encode() + b"\r\n\r\nHello, World!"
        return cache[1] * n, buf[buf.rfind(b"\r\n\r\n") + 4:]

    return answer


def answer_http(conn, answer):
    """Answers the HTTP requests that arrive on ``conn``, a connected socket
    with blocking ``recv``/``sendall`` (the stdlib's in a thread, or gevent's
    cooperative one), with ``answer`` (an http_answerer), until the peer
    closes, an OSError, or 64 KiB without a complete request.  Does not close
    ``conn``."""
    pending = b""
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            reply, buf = answer(pending + data if pending else data)
            if reply:
                conn.sendall(reply)
            if len(buf) > 65536:
                return
            pending = buf
    except OSError:
        return


def parse_args(argv, prog):
    """``(kind, host, port)`` from the command line ``echo|http HOST:PORT``
    (``argv`` without the program name; None: sys.argv[1:]).  An empty HOST
    is ``0.0.0.0``; port is an int.  On a bad command line prints the usage
    (``usage: <prog> echo|http HOST:PORT``) to stderr and exits 2."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] in ("echo", "http"):
        host, _, port = argv[1].rpartition(":")
        if port.isdigit():
            return argv[0], host or "0.0.0.0", int(port)
    print("usage: %s echo|http HOST:PORT" % prog, file=sys.stderr)
    sys.exit(2)
