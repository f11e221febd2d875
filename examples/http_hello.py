"""http_hello.py -- a keep-alive HTTP/1.1 "Hello, World!" server (TechEmpower style).

The lessons:
1. Two reactors.  An *accept reactor* with one poller owns the listening socket;
   a *connection reactor* with N pollers owns the connections (each lands on
   poller[fd % N] in on_open).  Accepting never competes with request work.
2. A correct HTTP/1.1 parser for a reactor: bytes arrive in arbitrary pieces,
   so the handler keeps what it has not parsed yet, answers every complete
   request in order -- many pipelined requests in one read get their answers
   in one write -- and skips request bodies by Content-Length.
3. The poller cache.  The Date header changes once a second: a timer builds it
   once and ``sync_cache`` hands it to every poller, where handlers read it
   without a lock (the Go original's PollSyncCache).

Try it:
    python3 examples/http_hello.py 127.0.0.1:8080 --pollers 2
    curl -v http://127.0.0.1:8080/
    curl -s --http1.1 http://127.0.0.1:8080/a http://127.0.0.1:8080/b   # keep-alive
    wrk -t2 -c50 -d5s http://127.0.0.1:8080/
"""

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import goev  # noqa: E402

MAX_HEAD = 8192                 # bytes: a longer request head is refused
BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def http_date():
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()).encode()


def parse_head(head):
    """Split a request head into (method, target, version, {lowercase name: value}).
    Raises ValueError if it is not HTTP/1.x."""
    lines = head.split(b"\r\n")
    method, target, version = lines[0].split(b" ")     # ValueError if not 3 parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ValueError(version)
    fields = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise ValueError(line)
        fields[name.lower()] = value.strip()
    return method, target, version, fields


class HttpConn(goev.IOHandle):
    """One HTTP connection.  State kept between reads: the unparsed bytes."""

    def on_open(self):
        self.pending = b""          # bytes received but not yet parsed
        self.body_left = 0          # body bytes of the current request still to skip
        self.reactor.add_handler(self, self.fd, goev.EV_IN)   # last step: reads may start now
        return True

    def on_read(self):
        data = self.read()
        if data is None:
            return True             # spurious wake-up
        if not data:
            return False            # the client closed
        buf = self.pending + bytes(data)   # copy: the view is reused by the next read
        answers = []
        keep_alive = True
        while keep_alive:
            if self.body_left:                        # skip a request body
                skip = min(self.body_left, len(buf))
                buf = buf[skip:]
                self.body_left -= skip
                if self.body_left:
                    break
            end = buf.find(b"\r\n\r\n")
            if end < 0:                               # head incomplete: wait for more
                if len(buf) > MAX_HEAD:
                    return self.refuse()
                break
            try:
                method, target, version, fields = parse_head(buf[:end])
                self.body_left = int(fields.get(b"content-length", b"0"))
            except ValueError:
                return self.refuse()
            if b"transfer-encoding" in fields:       # chunked bodies: not in this lesson
                return self.refuse()
            buf = buf[end + 4:]
            connection = fields.get(b"connection", b"").lower()
            keep_alive = connection != b"close" and (version == b"HTTP/1.1" or connection == b"keep-alive")
            answers.append(self.cache["response"])   # built once a second, see refresh_date
        self.pending = buf
        if answers:
            self.write(b"".join(answers))            # one write for the whole pipeline
        return keep_alive                            # False: close after the flush

    def refuse(self):
        self.write(BAD_REQUEST)
        return False


def build_response():
    return (b"HTTP/1.1 200 OK\r\nServer: goev\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 13\r\nDate: " + http_date() + b"\r\n\r\nHello, World!")


def main():
    ap = argparse.ArgumentParser(prog="python3 examples/http_hello.py",
                                 description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("addr", metavar="ADDR", nargs="?", default="127.0.0.1:8080",
                    help='address to listen on; ":8080" is every interface')
    ap.add_argument("--pollers", type=int, default=2, metavar="N", help="connection pollers")
    args = ap.parse_args()
    if args.pollers < 1:
        ap.error("--pollers must be positive")

    accept_reactor = goev.Reactor(1)
    conn_reactor = goev.Reactor(args.pollers)
    conn_reactor.init_cache("response", build_response())     # before any poller runs

    def refresh_date():
        conn_reactor.sync_cache("response", build_response())  # posted to every poller
        accept_reactor.call_later(1.0, refresh_date)
    accept_reactor.call_later(1.0, refresh_date)

    try:
        acceptor = goev.Acceptor(accept_reactor, args.addr, HttpConn, conn_reactor=conn_reactor)
    except (OSError, ValueError) as e:
        accept_reactor.stop()
        conn_reactor.stop()
        print("http_hello: cannot listen on %s: %s" % (args.addr, e), file=sys.stderr)
        return 2

    def stop(*_):
        accept_reactor.stop()
        conn_reactor.stop()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print("http_hello on %s (1 accept poller, %d connection pollers)" % (acceptor.address, args.pollers),
          file=sys.stderr, flush=True)
    conn_reactor.start()        # connection pollers on background threads
    accept_reactor.run()        # the accept poller on this (the main) thread, until stop()
    conn_reactor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
