"""threads_baseline.py -- the classic design goev replaces: one thread per connection.

Lesson: this is the same echo server and the same keep-alive "Hello, World!"
HTTP server as ``python3 -m goev echo|http``, written the way the standard
library invites you to (``socketserver.ThreadingTCPServer``): blocking
sockets, one thread per connection, code that reads top to bottom.

It is simple and correct, so it is the baseline to beat:
  * every connection costs a thread (a stack, a scheduler entry) even while
    it is idle -- 10,000 idle keep-alive clients are 10,000 threads;
  * under the GIL those threads take turns, and every turn is a context
    switch; a reactor serves the same clients from one thread with one
    epoll_wait per batch of ready sockets;
  * backpressure is free here (``sendall`` blocks the thread) -- the one
    thing a reactor has to build by hand (see download.py and tcp_proxy.py).

Compare with bench/ or by hand:

    python3 examples/threads_baseline.py http 127.0.0.1:8080
    curl http://127.0.0.1:8080/   # wrk -t2 -c100 http://127.0.0.1:8080/
    python3 examples/threads_baseline.py echo 127.0.0.1:8081
    socat - TCP:127.0.0.1:8081
"""

import argparse
import signal
import socket
import socketserver
import sys
import threading
from email.utils import formatdate

MAX_HEAD = 65536          # a request head larger than this ends the connection


class EchoHandler(socketserver.BaseRequestHandler):
    """One thread runs this for one connection, from accept to EOF."""

    def handle(self):
        sock = self.request
        try:
            while True:
                data = sock.recv(65536)     # blocks this thread (only this one)
                if not data:
                    return                  # EOF: socketserver closes the socket
                sock.sendall(data)          # blocks until the kernel took it all
        except OSError:                     # reset by the peer
            return


def hello_response(close):
    body = b"Hello, World!"
    return (b"HTTP/1.1 200 OK\r\nServer: threads_baseline\r\nContent-Type: text/plain\r\n"
            b"Date: %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (formatdate(usegmt=True).encode(), len(body),
               b"Connection: close\r\n" if close else b"", body))


class HttpHandler(socketserver.BaseRequestHandler):
    """Keep-alive HTTP/1.1 with pipelining: every complete request in the buffer
    is answered, in order, with one sendall for the whole batch."""

    def handle(self):
        sock = self.request
        buf = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
                out = []
                close = False
                while not close:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    lines = buf[:end].split(b"\r\n")
                    headers = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(b":")
                        headers[name.strip().lower()] = value.strip().lower()
                    body_len = int(headers.get(b"content-length", b"0") or 0)
                    if len(buf) < end + 4 + body_len:
                        break                           # the body is not all here yet
                    buf = buf[end + 4 + body_len:]      # the body is ignored
                    version = lines[0].rsplit(b" ", 1)[-1]
                    conn = headers.get(b"connection", b"")
                    close = conn == b"close" or (version == b"HTTP/1.0" and conn != b"keep-alive")
                    out.append(hello_response(close))
                if out:
                    sock.sendall(b"".join(out))
                if close or len(buf) > MAX_HEAD:
                    return
        except (OSError, ValueError):                   # reset, or a bad Content-Length
            return


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True            # connection threads do not keep the process alive
    allow_reuse_address = True       # restart at once, despite TIME_WAIT
    request_queue_size = 1024        # listen() backlog


class Server6(Server):
    address_family = socket.AF_INET6


def parse_addr(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("address %r: expected HOST:PORT" % text)
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def main(argv):
    ap = argparse.ArgumentParser(prog="python3 examples/threads_baseline.py",
                                 description="One thread per connection (socketserver): the baseline.")
    ap.add_argument("kind", choices=("echo", "http"), help="which server")
    ap.add_argument("addr", metavar="ADDR",
                    help='"127.0.0.1:8080", ":8080" (every interface) or "[::1]:8080"')
    args = ap.parse_args(argv)
    try:
        host, port = parse_addr(args.addr)
        cls = Server6 if ":" in host else Server
        server = cls((host, port), EchoHandler if args.kind == "echo" else HttpHandler)
    except (ValueError, OSError, OverflowError) as e:       # (OverflowError: a port above 65535)
        print("threads_baseline: cannot listen on %s: %s" % (args.addr, e), file=sys.stderr)
        return 2
    # serve_forever() runs on a thread of its own: shutdown() must be called from
    # another thread than serve_forever's (it waits for the loop to finish).  The
    # main thread waits for SIGINT/SIGTERM with sigwait(); the signals are blocked
    # *before* any thread starts, so every thread inherits the mask and the
    # kernel cannot deliver them to a thread that would not wake the main one.
    sigs = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    loop = threading.Thread(target=server.serve_forever, name="accept-loop")
    loop.start()
    host, port = server.server_address[:2]
    print("threads_baseline: %s server listening on %s:%d" % (args.kind, host, port),
          file=sys.stderr, flush=True)
    signal.sigwait(sigs)
    server.shutdown()
    loop.join()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
