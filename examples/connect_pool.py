"""connect_pool -- a pool of client connections to redis, used from worker threads.

What it teaches:
  * ``Connector`` + ``ConnectPool``: the pool keeps a few connections to redis
    open and ready, refills itself on a poller timer, and hands them out with
    ``acquire()`` / ``release()`` to threads that never touch a socket.
  * Worker threads talk to the reactor only through ``async_write`` (safe from
    any thread); replies are parsed *incrementally* on the poller thread, in
    ``on_read``, because TCP delivers bytes, not messages: one read may hold half
    a reply or three of them.
  * Handing a reply back to a waiting thread: each request gets a small slot
    (an Event plus a value) queued in send order; redis answers in order, so
    the oldest slot gets the next reply.

Try it (the test suite does the same against its own redis-server):

    redis-server --port 6379 --save '' --appendonly no &
    python3 examples/connect_pool.py 127.0.0.1:6379 --workers 4 --requests 5
    redis-cli -p 6379 GET goev:worker0:0          # -> "value-0-0"

Exit codes: 0 when every request got its reply (or after Ctrl-C/SIGTERM),
1 if redis cannot be reached or a reply is wrong, 2 for a bad argument.
"""

import argparse
import collections
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import goev  # noqa: E402


# -- RESP (the redis protocol) --------------------------------------------------

class RedisError(Exception):
    """A "-ERR ..." reply: an answer, not a broken connection."""


def encode(*args):
    """A command as a RESP array of bulk strings: *N, then $len + bytes each."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


_INCOMPLETE = object()                             # "wait for more bytes"


def parse(buf, pos=0):
    """Parse one reply at ``buf[pos:]``: (value, next_pos), or (_INCOMPLETE, pos)
    if the reply is not all there yet (wait for more bytes -- never block)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind, line = buf[pos:pos + 1], bytes(buf[pos + 1:end])
    nxt = end + 2
    if kind == b"+":                               # +OK, +PONG
        return line.decode(), nxt
    if kind == b"-":                               # -ERR ...
        return RedisError(line.decode()), nxt
    if kind == b":":                               # :42
        return int(line), nxt
    if kind == b"$":                               # $5\r\nhello\r\n, or $-1 (null)
        n = int(line)
        if n < 0:
            return None, nxt
        if len(buf) < nxt + n + 2:
            return _INCOMPLETE, pos
        return bytes(buf[nxt:nxt + n]), nxt + n + 2
    if kind == b"*":                               # *2\r\n + two replies, or *-1
        n = int(line)
        if n < 0:
            return None, nxt
        items = []
        for _ in range(n):
            item, nxt = parse(buf, nxt)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, nxt
    raise ValueError("not a RESP reply: %r" % bytes(buf[pos:pos + 20]))


# -- the pooled connection ----------------------------------------------------------

class Slot:
    """One request waiting for its reply (filled on the poller thread)."""
    __slots__ = ("event", "value")

    def __init__(self):
        self.event = threading.Event()
        self.value = None

    def set(self, value):
        self.value = value
        self.event.set()


connect_errors = []                 # filled by on_connect_fail (poller thread)
connect_failed = threading.Event()


class RedisConn(goev.IOHandle):
    """A redis connection: requests from any thread, replies parsed on the poller."""

    def __init__(self):
        self.buf = bytearray()
        self.waiting = collections.deque()   # slots in the order their commands were sent
        self.lock = threading.Lock()         # keeps "queue the slot" and "send" in one order

    def on_connect_fail(self, err):
        # The pool retries on its own timer; we only remember why, for main().
        connect_errors.append(err)
        connect_failed.set()

    def request(self, *args, timeout=10.0):
        """Send one command and wait for its reply.  Any thread but the poller's
        (it blocks).  Raises ConnectionError if the connection dies first."""
        slot = Slot()
        with self.lock:
            self.waiting.append(slot)
            self.async_write(encode(*args))  # copied now, sent in order by the poller
        if not slot.event.wait(timeout):
            raise TimeoutError("no reply to %r within %gs" % (args[0], timeout))
        if isinstance(slot.value, ConnectionError):
            raise slot.value
        return slot.value

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:                     # redis closed the connection
            return False
        self.buf += data                 # copy: the view is the poller's shared buffer
        while self.buf:
            value, used = parse(self.buf)
            if value is _INCOMPLETE:
                break                    # half a reply: the rest comes in a later read
            del self.buf[:used]
            with self.lock:
                slot = self.waiting.popleft() if self.waiting else None
            if slot is None:
                return False             # a reply nobody asked for: protocol error
            slot.set(value)
        return True

    def on_close(self):
        # Wake every waiter: a thread must never hang on a dead connection.
        with self.lock:
            waiting, self.waiting = self.waiting, collections.deque()
        for slot in waiting:
            slot.set(ConnectionError("redis connection closed"))
        self.destroy()


# -- the program -------------------------------------------------------------------

def show(value):
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, RedisError):
        return "(error) %s" % value
    return str(value)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 examples/connect_pool.py",
                                 description="A goev ConnectPool against redis.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("addr", nargs="?", default="127.0.0.1:6379", metavar="ADDR",
                    help="redis address")
    ap.add_argument("--workers", type=int, default=4, metavar="N", help="worker threads")
    ap.add_argument("--requests", type=int, default=5, metavar="N", help="PING/SET/GET rounds per worker")
    ap.add_argument("--pollers", type=int, default=1, metavar="N", help="reactor pollers")
    ap.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for redis")
    args = ap.parse_args(argv)
    if args.workers < 1 or args.requests < 0 or args.pollers < 1 or not args.timeout > 0:
        ap.error("--workers, --pollers and --timeout must be positive, --requests >= 0")
    try:
        goev.parse_address(args.addr)        # a malformed ADDR fails here, before any thread starts
    except (ValueError, OSError) as e:
        ap.error("bad ADDR: %s" % e)

    stop = threading.Event()
    reactor = goev.Reactor(args.pollers)
    reactor.start()
    # Refill when fewer than 2 are idle, 2 at a time, at most one per worker.
    pool = goev.ConnectPool(goev.Connector(reactor), args.addr, RedisConn,
                            min_idle=min(2, args.workers), add_step=2,
                            max_live=max(args.workers, 2), connect_timeout_ms=2000,
                            keep_interval_ms=200)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print_lock = threading.Lock()
    failures = []

    def say(line):
        with print_lock:
            print(line, flush=True)

    def worker(w):
        for i in range(args.requests):
            if stop.is_set():
                return
            h = None
            deadline = time.monotonic() + args.timeout
            while h is None and not stop.is_set():
                h = pool.acquire()       # None: all busy or not yet connected (refill triggered)
                if h is None:
                    if time.monotonic() > deadline:
                        failures.append("worker %d: no connection" % w)
                        return
                    time.sleep(0.01)     # an example may poll; a real app would wait on a Condition
            if h is None:
                return
            key, val = "goev:worker%d:%d" % (w, i), "value-%d-%d" % (w, i)
            try:
                pong = h.request("PING")
                ok = h.request("SET", key, val)
                got = h.request("GET", key)
            except (ConnectionError, TimeoutError) as e:
                failures.append("worker %d: %s" % (w, e))
                h.close()                # a half-answered connection must not go back
                pool.release(h)          # (a closed one is simply dropped)
                continue
            pool.release(h)
            say("worker %d: PING -> %s" % (w, show(pong)))
            say("worker %d: SET %s %s -> %s" % (w, key, val, show(ok)))
            say("worker %d: GET %s -> %s" % (w, key, show(got)))
            if got != val.encode():
                failures.append("worker %d: GET %s returned %r" % (w, key, got))

    try:
        # Wait for the first connection, or for the first connect to fail.
        deadline = time.monotonic() + args.timeout
        while pool.idle == 0 and not stop.is_set():
            if connect_failed.is_set() or time.monotonic() > deadline:
                why = connect_errors[0] if connect_errors else "timed out"
                print("connect_pool: could not connect to %s: %s" % (args.addr, why), file=sys.stderr)
                return 1
            connect_failed.wait(0.05)
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.workers)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():          # join in slices so SIGINT/SIGTERM are handled
                t.join(0.2)
        if stop.is_set():
            return 0
        say("pool: idle=%d live=%d" % (pool.idle, pool.live))
        for f in failures:
            print("connect_pool: %s" % f, file=sys.stderr)
        return 1 if failures else 0
    finally:
        pool.close()
        reactor.stop()


if __name__ == "__main__":
    sys.exit(main())
