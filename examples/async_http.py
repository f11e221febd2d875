"""async_http.py -- an HTTP/1.1 keep-alive server whose answers are computed on worker threads.

Lesson: how to hand blocking work (a database call, a slow library) to a
thread pool without ever blocking a poller, and how the answers get back to
the right connection, in the right order.

  * The poller only does I/O and parsing.  Each complete request gets a
    sequence number and is submitted to a ``concurrent.futures``
    ThreadPoolExecutor.  The worker computes the answer (here: sleeps a random
    0-2 ms, then "Hello, World!" for ``/``, the path for any other GET, the
    body for a POST) and sends it back with ``reactor.post_to(conn, ...)``:
    safe from any thread, it runs the function on the connection's poller.
  * Pipelining: a client may send many requests before reading any answer,
    and HTTP/1.1 says the answers must come back in request order.  Workers
    finish in any order, so the poller keeps a small *reorder buffer* per
    connection and writes answer k only after answers 0..k-1 (this is what
    the Go original's async_http example got wrong: it answered in the order
    the goroutines finished).  Writing *from the worker* with ``async_write``
    is safe and FIFO -- but FIFO in completion order, which is why the answer
    passes through the poller here.  ``async_write`` is the right tool when
    one thread owns the whole order of a stream.
  * Per-poller cache: the Date header is formatted once a second on poller 0
    and pushed to every poller with ``reactor.sync_cache``; handlers read
    ``self.cache["date"]`` without locks (``init_cache`` sets the first value
    before the pollers start).
  * Bounded memory: a connection keeps at most MAX_INFLIGHT requests in the
    pool; beyond that it stops reading (the kernel's buffers push back on the
    client) until answers have gone out.
  * The parser is incremental: a request may arrive split across many reads,
    and one read may hold many requests.  Content-Length bodies are read;
    malformed input gets "400 Bad Request" (after the answers to the requests
    before it) and the connection is closed.

Try it:

    python3 examples/async_http.py 127.0.0.1:8080 [--pollers N] [--threads N]
    curl -s --http1.1 http://127.0.0.1:8080/ http://127.0.0.1:8080/a http://127.0.0.1:8080/b
    printf 'GET /1 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\nGET /2 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' | nc -q1 127.0.0.1 8080
    wrk -t2 -c50 -d5s http://127.0.0.1:8080/

Ctrl-C or SIGTERM stops it cleanly (exit code 0).
"""

import argparse
import concurrent.futures
import email.utils
import os
import random
import re
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import goev  # noqa: E402  (imported from the repo root, see the line above)

MAX_HEAD = 8192             # request line + headers; a larger head is refused (431)
MAX_BODY = 1 << 20          # Content-Length above this is refused (413)
MAX_INFLIGHT = 64           # requests of one connection in the pool at once
MAX_CLEN_DIGITS = 18        # a longer Content-Length is refused (400), never given to int()

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_REASONS = {200: "OK", 400: "Bad Request", 413: "Content Too Large",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented"}


class BadRequest(Exception):
    def __init__(self, status, why):
        super().__init__(why)
        self.status = status


def compute(method, path, body):
    """The "business logic", run on a worker thread: it may block as it likes."""
    time.sleep(random.uniform(0, 0.002))     # stands in for a database call
    if method == "POST":
        return 200, body
    if path == "/":
        return 200, b"Hello, World!"
    return 200, path.encode("latin-1")


def work(conn, seq, method, path, body):
    """Worker thread: compute, then hand the answer to the connection's poller."""
    try:
        status, payload = compute(method, path, body)
    except Exception as e:                   # a bug in compute: answer 500, keep serving
        status, payload = 500, ("%s\n" % e).encode()
    # post_to returns at once; conn.deliver runs on conn's poller thread.  If
    # the connection (or the whole reactor) closed meanwhile, it is harmless.
    conn.reactor.post_to(conn, conn.deliver, seq, status, payload)


def parse_head(head):
    """(method, target, version, headers{lower name: value}) or raise BadRequest."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(400 if not version.startswith(b"HTTP/") else 501, "unsupported version")
    if not (target.startswith(b"/") or target == b"*" or b"://" in target):
        raise BadRequest(400, "malformed request target")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):       # also refuses "Name :" (RFC 9112 5.1)
            raise BadRequest(400, "malformed header line")
        name = name.lower()
        value = value.strip(b" \t")
        if name in headers:
            if name == b"content-length" and headers[name] != value:
                raise BadRequest(400, "conflicting Content-Length")
            headers[name] += b", " + value
        else:
            headers[name] = value
    if version == b"HTTP/1.1" and b"host" not in headers:
        raise BadRequest(400, "HTTP/1.1 request without Host")
    return method.decode(), target.decode("latin-1"), version, headers


class HttpConn(goev.IOHandle):
    """One client connection: parse on the poller, compute in the pool, answer in order."""

    def __init__(self):
        self.buf = bytearray()      # unparsed input
        self.next_seq = 0           # sequence number of the next request parsed
        self.emit_seq = 0           # sequence number of the next answer to write
        self.meta = {}              # seq -> (keep_alive, head_only), set when parsed
        self.ready = {}             # seq -> (status, payload), set when computed
        self.last_seq = None        # after this answer the connection closes
        self.reading = True         # EV_IN armed by us (False while MAX_INFLIGHT is hit)

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:                # end of stream: answer what was asked, then close
            if self.last_seq is None:
                self.last_seq = self.next_seq - 1
            return self.emit_seq <= self.last_seq
        self.buf += data            # copy: the view is the poller's shared buffer
        self.parse()
        return True

    def parse(self):
        """Take every complete request out of self.buf (poller thread)."""
        buf = self.buf
        while self.last_seq is None:
            if self.next_seq - self.emit_seq >= MAX_INFLIGHT:
                if self.reading:    # stop reading; deliver() resumes us
                    self.reading = False
                    self.reactor.remove_event(self.fd, goev.EV_IN)
                return
            while buf.startswith(b"\r\n"):          # RFC 9112 2.2: ignore a stray CRLF
                del buf[:2]
            end = buf.find(b"\r\n\r\n")
            lf = buf.find(b"\n\n", 0, len(buf) if end < 0 else end)
            if lf >= 0 or (end < 0 and len(buf) > MAX_HEAD) or end > MAX_HEAD:
                self.refuse(BadRequest(431 if lf < 0 else 400, "bad or oversized head"))
                return
            if end < 0:
                return              # the head is incomplete: wait for more bytes
            try:
                method, path, version, headers = parse_head(bytes(buf[:end]))
                if b"transfer-encoding" in headers:
                    raise BadRequest(501, "chunked bodies are not supported")
                clen = headers.get(b"content-length", b"0")
                # At most 18 digits: int() of thousands of digits raises
                # ValueError (sys.set_int_max_str_digits), and no body is
                # that large anyway.  isdigit() on bytes is ASCII only.
                if not clen.isdigit() or len(clen) > MAX_CLEN_DIGITS:
                    raise BadRequest(400, "malformed Content-Length")
                clen = int(clen)
                if clen > MAX_BODY:
                    raise BadRequest(413, "body too large")
            except BadRequest as e:
                self.refuse(e)
                return
            start = end + 4
            if len(buf) < start + clen:
                return              # the body is incomplete
            body = bytes(buf[start:start + clen])
            del buf[:start + clen]
            conn_hdr = headers.get(b"connection", b"").lower()
            if version == b"HTTP/1.1":
                keep = b"close" not in conn_hdr
            else:
                keep = b"keep-alive" in conn_hdr
            seq = self.next_seq
            self.next_seq += 1
            self.meta[seq] = (keep, method == "HEAD")
            if not keep:
                self.last_seq = seq
            POOL.submit(work, self, seq, method, path, body)

    def refuse(self, err):
        """Queue an error answer in sequence (after the answers before it), then close."""
        seq = self.next_seq
        self.next_seq += 1
        self.meta[seq] = (False, False)
        self.last_seq = seq
        del self.buf[:]
        self.deliver(seq, err.status, ("%s\n" % err).encode())

    def deliver(self, seq, status, payload):
        """An answer is ready (poller thread, via post_to): write every answer now in order."""
        if self.closed:
            return                  # the client went away; the answer is dropped
        self.ready[seq] = (status, payload)
        while self.emit_seq in self.ready:
            seq = self.emit_seq
            status, payload = self.ready.pop(seq)
            keep, head_only = self.meta.pop(seq)
            self.emit_seq += 1
            # The date comes from this poller's cache: a plain dict read, no lock.
            head = ("HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: text/plain\r\n"
                    "Content-Length: %d\r\n%s\r\n" % (
                        status, _REASONS.get(status, ""), self.cache["date"], len(payload),
                        "" if keep else "Connection: close\r\n")).encode("latin-1")
            self.write(head if head_only else head + payload)
            if seq == self.last_seq:
                self.close()        # flushes what is queued, then closes
                return
        if not self.reading and self.next_seq - self.emit_seq < MAX_INFLIGHT // 2:
            self.reading = True     # room again: parse what is buffered, read again
            self.parse()
            if self.reading and not self.closed:
                self.reactor.append_event(self.fd, goev.EV_IN)


POOL = None                          # the ThreadPoolExecutor, made in main()


def where(address):
    """An Acceptor's address as ADDR is written: HOST:PORT, [V6]:PORT or unix:PATH."""
    if isinstance(address, str):                 # a unix path, or "@name" (abstract)
        return "unix:" + address
    host, port = address[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def main(argv):
    global POOL
    ap = argparse.ArgumentParser(prog="python3 examples/async_http.py",
                                 description="HTTP/1.1 server answering from a thread pool, in order",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("addr", metavar="ADDR",
                    help='e.g. 127.0.0.1:8080, ":8080" (every interface), "[::1]:8080", "unix:/path"')
    ap.add_argument("--pollers", type=int, default=1, metavar="N", help="poller threads")
    ap.add_argument("--threads", type=int, default=8, metavar="N", help="worker threads")
    ap.add_argument("--backend", default="auto", help="auto, epoll or selectors")
    args = ap.parse_args(argv)
    if args.pollers < 1 or args.threads < 1:
        ap.error("--pollers and --threads must be positive")
    try:
        reactor = goev.Reactor(args.pollers, backend=args.backend)
    except (ValueError, OSError) as e:                # an unknown --backend, or no epoll here
        ap.error(str(e))
    try:
        acceptor = goev.Acceptor(reactor, args.addr, HttpConn)
    except (ValueError, OSError) as e:
        reactor.stop()
        print("async_http: cannot listen on %s: %s" % (args.addr, e), file=sys.stderr)
        return 2
    POOL = concurrent.futures.ThreadPoolExecutor(args.threads, thread_name_prefix="worker")
    # init_cache before the pollers run; sync_cache afterwards, once a second.
    reactor.init_cache("date", email.utils.formatdate(usegmt=True))

    def tick():
        reactor.sync_cache("date", email.utils.formatdate(usegmt=True))
        reactor.call_later(1.0, tick)
    reactor.call_later(1.0, tick)
    # stop() is safe from a signal handler: run() returns, every socket closes.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: reactor.stop())
    print("async_http: listening on %s (%s, %d poller%s, %d worker threads)" % (
        where(acceptor.address), reactor.backend, args.pollers, "s" * (args.pollers > 1), args.threads),
        file=sys.stderr, flush=True)
    try:
        reactor.run()
    finally:
        reactor.stop()
        # Workers still running post to a stopped reactor: that is dropped, harmlessly.
        POOL.shutdown(wait=True, cancel_futures=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
