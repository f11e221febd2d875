# =============================================================================
# Threads: async_write, write() off the poller thread, Reactor.post / post_to,
# the per-poller cache (sync_cache / init_cache), wake-up coalescing, bounded
# inbox drain, posts racing stop() and from signal handlers, data for closed
# handlers (dropped and counted, never delivered to a reused fd number), and
# examples/async_http.py
# =============================================================================
# Every test runs on both backends; where placement matters also with 1 and 3
# pollers.  The comment above each test names the bug it catches.

from test_goev import *                                   # noqa: F401,F403
from test_goev import (backend, npollers, hygiene, make_reactor, goev_log,   # noqa: F401
                       wait_until, recv_exact, recv_all, Echo, WAIT, spawn_py, stop_child)

import http.client
import os
import queue
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading

import pytest

import goev


# -- helpers ------------------------------------------------------------------

def served(make_reactor, npollers, cls=Echo):
    """A started reactor with an acceptor whose handlers are handed to the test
    through a queue: returns (reactor, acceptor, connect); connect() gives a
    (client socket, server-side handler) pair; connect.handlers is the queue."""
    r = make_reactor(npollers)
    got = queue.Queue()

    class H(cls):
        def on_open(self):
            ok = super().on_open()
            got.put(self)
            return ok
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()

    def connect():
        c = socket.create_connection(a.address)
        h = got.get(timeout=WAIT)
        # on_open may only have *posted* the registration (selectors backend,
        # another poller): wait until the handler is really on its poller.
        wait_until(lambda: h.poller is not None and h.poller._handlers.get(h.fd) is h,
                   what="registration")
        return c, h
    connect.handlers = got
    return r, a, connect


def block_poller(r, h):
    """Park h's poller inside a posted callback; returns the Event that releases it."""
    started, release = threading.Event(), threading.Event()

    def blocker():
        started.set()
        release.wait(WAIT)
    r.post_to(h, blocker)
    assert started.wait(WAIT), "the poller never ran the posted callback"
    return release


def run_threads(targets):
    """Start one thread per target, join them all; re-raise the first failure."""
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:          # noqa: B902 - reported below
                errors.append(e)
        return run
    ts = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in ts:
        t.start()
    for t in ts:
        t.join(WAIT * 3)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    if errors:
        raise errors[0]


REC = struct.Struct("!II")          # (thread id, sequence number): a numbered record


def check_records(data, nthreads, per_thread):
    """Every thread's records arrive complete and in that thread's order."""
    assert len(data) == nthreads * per_thread * REC.size
    nxt = [0] * nthreads
    for tid, seq in REC.iter_unpack(data):
        assert seq == nxt[tid], "thread %d: record %d arrived when %d was due" % (tid, seq, nxt[tid])
        nxt[tid] += 1
    assert nxt == [per_thread] * nthreads


# -- async_write / write off-thread: no lost wake-up, FIFO -------------------

# The Go original's lost wake-up: a producer that lands between the consumer's
# swap and its flag reset skips the waker write, and its item waits forever.
# 8 threads x 10k numbered records (half with async_write, half with write()
# from off the poller thread, which must behave the same); the receiver checks
# the count and each thread's order.  Each producer keeps at most WINDOW
# records unacknowledged by the receiver, so the poller keeps falling asleep
# while other producers are mid-post: a lost wake-up leaves every producer
# waiting and the test times out; a reordered, dropped or duplicated record
# fails the check.
def test_lost_wakeup_8_threads_x_10k(make_reactor, npollers):
    r, a, connect = served(make_reactor, npollers)
    c, h = connect()
    N, T, WINDOW = 10000, 8, 64
    seen = [0] * T
    cond = threading.Condition()
    got = bytearray()

    def receiver():
        c.settimeout(60)
        want = N * T * REC.size
        while len(got) < want:
            chunk = c.recv(65536)
            if not chunk:
                break
            start = len(got) - len(got) % REC.size
            got.extend(chunk)
            with cond:
                for tid, seq in REC.iter_unpack(got[start:len(got) - len(got) % REC.size]):
                    seen[tid] = seq + 1
                cond.notify_all()

    def producer(tid):
        send = h.async_write if tid % 2 else h.write
        pack = REC.pack

        def run():
            for i in range(N):
                if i % WINDOW == 0:
                    with cond:
                        if not cond.wait_for(lambda: seen[tid] >= i - WINDOW, timeout=30):
                            raise AssertionError("thread %d: record %d never arrived (lost wake-up?)"
                                                 % (tid, i - WINDOW))
                send(pack(tid, i))
        return run
    rt = threading.Thread(target=receiver)
    rt.start()
    try:
        run_threads([producer(t) for t in range(T)])
    finally:
        rt.join(90)
        c.close()
    check_records(bytes(got), T, N)
    assert h.dropped_bytes == 0


# The lost wake-up again, where it is most likely: the posted work is tiny
# (an empty write is one send() syscall, which lets the producers run while
# the poller is in the middle of its drain), so the poller keeps catching up
# with a producer posting in a tight loop, empties its inbox and goes back
# to sleep over and over while a producer is half-way through a post.  A
# wake-up lost on the way leaves the rest unrun (nothing else wakes it).
def test_lost_wakeup_fast_consumer(make_reactor, npollers):
    r, a, connect = served(make_reactor, npollers)
    c, h = connect()
    ran = [0]

    def bump():
        ran[0] += 1                            # one poller thread only: exact

    def producer():
        post_to, write = r.post_to, h.async_write
        for _ in range(100000):
            write(b"")
            post_to(h, bump)
    run_threads([producer])
    wait_until(lambda: ran[0] == 100000, what="all 100k posts to run (lost wake-up?)")
    c.close()


# The same race, sharpened: every record is a round trip, so the poller is
# asleep in poll() before nearly every post, and each one needs its wake-up.
# 4 threads each ping-pong 300 times on their own connection.
def test_lost_wakeup_ping_pong(make_reactor, npollers):
    r, a, connect = served(make_reactor, npollers)
    pairs = [connect() for _ in range(4)]

    def pinger(c, h, tid):
        def run():
            for i in range(300):
                rec = REC.pack(tid, i)
                h.async_write(rec)
                assert recv_exact(c, REC.size) == rec, "round trip %d of thread %d" % (i, tid)
        return run
    run_threads([pinger(c, h, i) for i, (c, h) in enumerate(pairs)])
    for c, _ in pairs:
        c.close()


# Ordering on the poller thread itself: async_write there is a direct write,
# so interleaved write/async_write calls keep their order.
def test_write_async_write_interleaved_on_poller(make_reactor, npollers):
    r, a, connect = served(make_reactor, npollers)
    c, h = connect()

    def on_poller():
        for i in range(200):
            (h.write if i % 2 else h.async_write)(b"%04d" % i)
    r.post_to(h, on_poller)
    assert recv_exact(c, 800) == b"".join(b"%04d" % i for i in range(200))
    c.close()


# Ordering across the two paths from one other thread: async_write, write()
# (routed to async_write off-thread) and a write made *on the poller* through
# post_to, all interleaved, arrive in call order (FIFO per handler, ordered
# with the poller's own writes).
def test_write_async_write_post_to_order_from_thread(make_reactor, npollers):
    r, a, connect = served(make_reactor, npollers)
    c, h = connect()
    recs = [REC.pack(0, i) for i in range(3000)]
    for i, rec in enumerate(recs):
        if i % 3 == 0:
            h.async_write(rec)
        elif i % 3 == 1:
            h.write(bytearray(rec))             # a mutable buffer: copied at the call
        else:
            r.post_to(h, h.write, rec)
    check_records(recv_exact(c, len(recs) * REC.size), 1, len(recs))
    c.close()


# async_write copies: mutating the buffer after the call changes nothing.
def test_async_write_copies_the_data(make_reactor):
    r, a, connect = served(make_reactor, 1)
    c, h = connect()
    release = block_poller(r, h)             # the data sits in the inbox meanwhile
    buf = bytearray(b"original")
    h.async_write(buf)
    h.async_write(memoryview(buf)[:4])
    buf[:] = b"CHANGED!"
    release.set()
    assert recv_exact(c, 12) == b"originalorig"
    c.close()


# Causality: an async_write that returned before the client sent a request
# comes out before the poller's answer to that request.  The poller is parked
# so that the request and the posted write are both pending when it looks
# again; a loop that dispatches I/O before it drains its inbox sends "XA".
def test_async_write_before_a_request_precedes_its_answer(make_reactor, npollers):
    r, a, connect = served(make_reactor, npollers)
    c, h = connect()
    for i in range(5):
        release = block_poller(r, h)
        h.async_write(b"A")
        c.sendall(b"X")                        # Echo answers with a write on the poller
        release.set()
        assert recv_exact(c, 2) == b"AX", "round %d" % i
    c.close()


# -- coalescing, bounded drain ---------------------------------------------------

# One waker write per burst: 2000 posts while the poller is busy must not
# cost 2000 eventfd/socketpair writes (each is a syscall on the producer).
def test_wakeups_coalesce(make_reactor, npollers):
    r, a, connect = served(make_reactor, npollers)
    c, h = connect()
    p = h.poller
    release = block_poller(r, h)
    before = p.wakeups
    for i in range(1000):
        h.async_write(b"x")
        r.post_to(h, len, b"")
    burst = p.wakeups - before
    release.set()
    assert recv_exact(c, 1000) == b"x" * 1000
    assert 1 <= burst <= 2, "a burst of 2000 posts wrote the waker %d times" % burst
    # And the flag is re-armed after the drain: the next post wakes again.
    wait_until(lambda: not p._inbox, what="inbox drained")
    before = p.wakeups
    h.async_write(b"y")
    assert recv_exact(c, 1) == b"y"
    assert p.wakeups > before
    c.close()


# A flood of posts cannot starve I/O: one thread posts as fast as it can
# while echo round trips still complete (an unbounded drain never returns
# to poll() while the producer keeps up).
def test_post_flood_does_not_starve_io(make_reactor, npollers):
    r, a, connect = served(make_reactor, npollers)
    c, h = connect()
    stop = threading.Event()
    ran = [0]

    def noop():
        ran[0] += 1

    def flood():
        while not stop.is_set():
            for _ in range(200):
                r.post(noop)
    t = threading.Thread(target=flood)
    t.start()
    try:
        wait_until(lambda: ran[0] > 10000, what="the flood to be running")
        for i in range(20):
            msg = b"ping %d" % i
            c.sendall(msg)
            assert recv_exact(c, len(msg)) == msg
    finally:
        stop.set()
        t.join(WAIT)
    c.close()


# -- post / post_to / sync_cache / init_cache ---------------------------------

# post runs fn exactly once on every poller, on that poller's own thread.
def test_post_runs_once_on_every_poller_thread(make_reactor, npollers):
    r = make_reactor(npollers)
    r.start()
    calls = []
    r.post(lambda tag: calls.append((tag, threading.get_ident())), "a")
    done = []
    r.post(lambda: done.append(1))
    wait_until(lambda: len(done) == npollers, what="posts on every poller")
    assert sorted(t for _, t in calls) == sorted(p._thread.ident for p in r.pollers)
    assert {tag for tag, _ in calls} == {"a"}


# post_to runs on the poller that owns the handler, never another one.
def test_post_to_runs_on_the_handlers_poller(make_reactor, npollers):
    r, a, connect = served(make_reactor, npollers)
    pairs = [connect() for _ in range(6)]
    seen = []
    for c, h in pairs:
        r.post_to(h, lambda h=h: seen.append((h, threading.get_ident())))
    wait_until(lambda: len(seen) == len(pairs), what="post_to callbacks")
    for h, tid in seen:
        assert tid == h.poller._thread.ident
    if npollers > 1:
        assert len({h.poller for _, h in pairs}) > 1, "placement spread the handlers"
    for c, _ in pairs:
        c.close()


# The cache: init_cache before start is visible from the first event;
# sync_cache reaches every poller, in order with later posts and with I/O
# that happens after it returned; init_cache after start is refused.
def test_cache_init_and_sync(make_reactor, npollers):
    r = make_reactor(npollers)

    class CacheEcho(goev.IOHandle):
        def on_read(self):
            data = self.read()
            if data is None:
                return True
            if not data:
                return False
            self.write(self.cache["v"] + b"\n")
            return True
    r.init_cache("v", b"first")
    a = goev.Acceptor(r, "127.0.0.1:0", CacheEcho)
    r.start()
    with pytest.raises(RuntimeError, match="sync_cache"):
        r.init_cache("v", b"late")
    conns = [socket.create_connection(a.address) for _ in range(4)]
    for c in conns:
        c.sendall(b"?")
        assert recv_exact(c, 6) == b"first\n"
    for i in range(20):
        val = b"v%d" % i
        r.sync_cache("v", val)
        for c in conns:
            c.sendall(b"?")
            assert recv_exact(c, len(val) + 1) == val + b"\n"
    seen = []

    def read_mine():
        me = [p for p in r.pollers if p._tid == threading.get_ident()][0]
        seen.append(me.cache["v"])
    r.post(read_mine)
    wait_until(lambda: len(seen) == npollers, what="cache reads")
    assert seen == [b"v19"] * npollers
    for c in conns:
        c.close()


# Work posted before start() runs once the pollers run, in order.
def test_posts_before_start_run_after_start(make_reactor, npollers):
    r = make_reactor(npollers)
    log = []
    r.sync_cache("k", 1)
    r.post(lambda: log.append(r.pollers[0].cache.get("k")))
    r.start()
    wait_until(lambda: len(log) == npollers, what="early posts")
    assert log == [1] * npollers


# Bad input gets a clear error at the call, naming the value.
def test_bad_input(make_reactor):
    r, a, connect = served(make_reactor, 1)
    c, h = connect()
    with pytest.raises(TypeError, match="42"):
        r.post(42)
    with pytest.raises(TypeError, match="not-callable"):
        r.post_to(h, "not-callable")
    with pytest.raises(ValueError, match="post_to"):
        r.post_to(object(), len)
    with pytest.raises(ValueError, match="post_to"):
        r.post_to(goev.IOHandle(), len)          # never registered
    with pytest.raises(TypeError):
        r.sync_cache(["unhashable"], 1)
    with pytest.raises(TypeError, match="int"):
        h.async_write(5)                          # bytes(5) would be five NULs
    with pytest.raises(TypeError, match="str"):
        h.async_write("text")
    with pytest.raises(TypeError, match="42"):
        r.call_later(0, 42)
    h.async_write(b"still fine")
    assert recv_exact(c, 10) == b"still fine"
    assert h.dropped_bytes == 0
    c.close()


# -- closed handlers, stop ---------------------------------------------------------

# Data for a closed handler is dropped and counted, and never reaches the new
# handler that gets the same fd number (the posted write is tied to the
# handler object, not to the number).  Also: writes queued in the inbox
# behind an abort() are dropped, not sent.
def test_async_write_to_closed_handler_dropped_not_reused(make_reactor, npollers):
    r, a, connect = served(make_reactor, npollers)
    c1, h1 = connect()
    old_fd = h1.fd
    c2 = socket.socket()                       # allocated now, so the *server* side of
    try:                                       # the next connection gets old_fd back
        release = block_poller(r, h1)
        h1.abort()                             # posted: runs before the writes below
        for _ in range(10):
            h1.async_write(b"queued")
        release.set()
        wait_until(lambda: h1.dropped_bytes == 60, what="queued writes counted as dropped")
        wait_until(lambda: h1.fd == -1, what="h1's fd closed")
        try:
            assert recv_all(c1) == b""
        except ConnectionResetError:           # abort() resets: also "nothing delivered"
            pass
        c2.settimeout(WAIT)
        c2.connect(a.address)
        h2 = connect.handlers.get(timeout=WAIT)
        c1.close()
        assert h2.fd == old_fd, "expected the fd number to be reused (%d, %d)" % (h2.fd, old_fd)
        for _ in range(50):
            h1.async_write(b"LEAK")
            h1.write(b"LEAK")
        c2.sendall(b"ping")
        assert recv_exact(c2, 4) == b"ping"    # Echo: its own data, nothing of h1's
        wait_until(lambda: h1.dropped_bytes == 460, what="late writes counted as dropped")
        c2.shutdown(socket.SHUT_WR)
        assert recv_all(c2) == b""
        assert h2.dropped_bytes == 0
    finally:
        c1.close()
        c2.close()


# After stop(): posts return at once and are dropped (the inbox does not
# grow), async writes are counted as dropped, nothing raises.
def test_after_stop_posts_dropped_and_counted(make_reactor, npollers):
    r, a, connect = served(make_reactor, npollers)
    c, h = connect()
    r.stop(timeout=WAIT)
    assert r.stopped
    ran = []
    for _ in range(100):
        r.post(ran.append, 1)
        r.post_to(h, ran.append, 2)
        r.sync_cache("k", 1)
        h.async_write(b"late")
        h.write(b"late")
    assert ran == []
    assert all(not p._inbox for p in r.pollers)
    assert h.dropped_bytes == 800
    assert recv_all(c) == b""
    c.close()


# Posts racing stop() never crash, never log an error, and account for every
# byte: for each handler, bytes the client received + dropped_bytes == bytes
# the producers wrote (a write lost in an inbox nobody drains breaks this).
def test_posts_racing_stop(make_reactor, npollers, goev_log):
    r, a, connect = served(make_reactor, npollers)
    pairs = [connect() for _ in range(6)]
    sent = [[0] * len(pairs) for _ in range(4)]
    received = [0] * len(pairs)
    progress = [0]

    def reader(i, c):
        def run():
            received[i] = len(recv_all(c, timeout=60))
        return run

    def producer(tid):
        rnd = random.Random(tid)

        def run():
            for n in range(3000):
                i = rnd.randrange(len(pairs))
                h = pairs[i][1]
                data = b"%d" % n * rnd.randrange(1, 20)
                (h.async_write if n % 2 else h.write)(data)
                sent[tid][i] += len(data)
                r.post(len, b"")
                r.post_to(h, len, b"")
                r.sync_cache("n", n)
                progress[0] += 1
        return run

    def stopper():
        wait_until(lambda: progress[0] > 2000, what="producers running")
        r.stop(timeout=WAIT)
        assert r.stopped
    readers = [threading.Thread(target=reader(i, c)) for i, (c, _) in enumerate(pairs)]
    for t in readers:
        t.start()
    run_threads([producer(t) for t in range(4)] + [stopper])
    for t in readers:
        t.join(90)
    for i, (c, h) in enumerate(pairs):
        c.close()
        total = sum(s[i] for s in sent)
        assert received[i] + h.dropped_bytes == total, (i, received[i], h.dropped_bytes, total)
    assert all(not p._inbox for p in r.pollers)
    assert goev_log.errors() == []


# Posts from a signal handler (which runs on the main thread between two
# bytecodes, possibly inside another post or inside wake()): every post runs,
# none deadlocks.  Pollers run in the background here.
def test_posts_from_signal_handler(make_reactor, npollers):
    r, a, connect = served(make_reactor, npollers)
    c, h = connect()
    handled, ran, ran_to = [0], [], []

    def on_signal(signum, frame):
        handled[0] += 1
        r.post(ran.append, 1)
        r.post_to(h, ran_to.append, 1)
        h.async_write(b"s")
        r.sync_cache("sig", handled[0])
    old = signal.signal(signal.SIGUSR1, on_signal)
    try:
        main = threading.main_thread().ident
        K = 100

        def sender():
            for i in range(K):
                signal.pthread_kill(main, signal.SIGUSR1)
                wait_until(lambda: handled[0] > i, what="signal %d handled" % i)
        t = threading.Thread(target=sender)
        t.start()
        # The main thread keeps posting too, so signals land inside _post/wake().
        while t.is_alive():
            r.post_to(h, len, b"")
            h.async_write(b"")
        t.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert recv_exact(c, K) == b"s" * K
    wait_until(lambda: len(ran) == K * npollers and len(ran_to) == K, what="signal posts")
    c.close()


# The same with run() on the main thread: the signal interrupts poller 0's own
# epoll_wait/poll, the handler posts to that very poller, and the retried
# poll must still wake (the waker is written even by the owning thread).
# SIGUSR2's handler then stops the reactor, so run() returns.
def test_signal_handler_posts_to_poller_running_on_main_thread(make_reactor, npollers):
    r = make_reactor(npollers)
    ran = []
    r.call_later(3600, len, b"")                # poller 0 sleeps on a far timer
    main = threading.main_thread().ident
    olds = (signal.signal(signal.SIGUSR1, lambda *_: r.post(lambda: ran.append(threading.get_ident()))),
            signal.signal(signal.SIGUSR2, lambda *_: r.stop()))
    failed = []

    def sender():
        try:
            for i in range(30):
                signal.pthread_kill(main, signal.SIGUSR1)
                wait_until(lambda: len(ran) >= (i + 1) * npollers, what="post %d to run" % i)
        except AssertionError as e:
            failed.append(e)
        signal.pthread_kill(main, signal.SIGUSR2)
    t = threading.Thread(target=sender)
    t.start()
    try:
        r.run()
    finally:
        signal.signal(signal.SIGUSR1, olds[0])
        signal.signal(signal.SIGUSR2, olds[1])
        t.join(WAIT)
    assert not failed, failed
    assert r.stopped
    assert ran.count(main) == 30                # poller 0's share ran on the main thread


# =============================================================================
# examples/async_http.py
# =============================================================================

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "async_http.py")


@pytest.fixture
def async_http(backend, npollers):
    """The example running in a child process; yields its (host, port)."""
    proc = spawn_py([EXAMPLE, "127.0.0.1:0", "--pollers", str(npollers), "--backend", backend])
    try:
        line = proc.stderr.readline()
        m = re.search(r"listening on ([\d.]+):(\d+)", line)
        assert m, "unexpected first line %r" % line
        yield m.group(1), int(m.group(2))
        assert stop_child(proc) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            stop_child(proc, signal.SIGKILL)


def read_response(f):
    """(status, headers, body) of one response from a socket file."""
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while True:
        line = f.readline()
        assert line, "EOF in the response head"
        if line == b"\r\n":
            break
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def test_async_http_http_client(async_http):
    host, port = async_http
    conn = http.client.HTTPConnection(host, port, timeout=WAIT)
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"Hello, World!")
    assert resp.getheader("Date", "").endswith("GMT")
    sock = conn.sock
    for i in range(30):
        conn.request("GET", "/path/%d" % i)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"/path/%d" % i)
    body = os.urandom(100000)
    conn.request("POST", "/echo", body=body)
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, body)
    conn.request("HEAD", "/abc")
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("Content-Length"), resp.read()) == (200, "4", b"")
    assert conn.sock is sock, "the connection was not kept alive"
    conn.close()


def test_async_http_pipelined_in_order(async_http):
    host, port = async_http
    with socket.create_connection((host, port), timeout=WAIT) as s:
        # 50 requests in one write; the workers finish in random order.
        s.sendall(b"".join(b"GET /r%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(50)))
        f = s.makefile("rb")
        for i in range(50):
            assert read_response(f)[::2] == (200, b"/r%d" % i)
        # Requests split across reads, byte by byte, a body cut in the middle.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req = (b"GET /split HTTP/1.1\r\nHost: x\r\n\r\n"
               b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world"
               b"\r\nGET /after-stray-crlf HTTP/1.1\r\nHost: x\r\n\r\n")
        for i in range(0, len(req), 7):
            s.sendall(req[i:i + 7])
        assert read_response(f)[::2] == (200, b"/split")
        assert read_response(f)[::2] == (200, b"hello world")
        assert read_response(f)[::2] == (200, b"/after-stray-crlf")
        # Connection: close is answered, then the server closes.
        s.sendall(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /ignored HTTP/1.1\r\n\r\n")
        status, headers, body = read_response(f)
        assert (status, body, headers.get("connection")) == (200, b"/last", "close")
        assert f.read() == b""
        f.close()


@pytest.mark.parametrize("bad", [
    b"NONSENSE\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
    b"GET /x HTTP/1.1\r\n\r\n",                                   # HTTP/1.1 without Host
    b"GET /x HTTP/1.1\nHost: x\n\n",                              # bare LF
    b"GET /x HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n",  # head too large
], ids=["request-line", "header", "content-length", "no-host", "bare-lf", "too-large"])
def test_async_http_malformed_gets_error_and_close(async_http, bad):
    host, port = async_http
    with socket.create_connection((host, port), timeout=WAIT) as s:
        # Two good requests first: they are answered, in order, before the error.
        s.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n" + bad)
        f = s.makefile("rb")
        assert read_response(f)[::2] == (200, b"/a")
        assert read_response(f)[::2] == (200, b"/b")
        status, headers, _ = read_response(f)
        assert status in (400, 431) and headers.get("connection") == "close"
        assert f.read() == b""
        f.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_async_http_curl_reuses_connection(async_http):
    host, port = async_http
    urls = ["http://%s:%d/c%d" % (host, port, i) for i in range(5)]
    out = subprocess.run(["curl", "-s", "--http1.1", "-w", "|%{num_connects}\n"] + urls,
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["/c0|1", "/c1|0", "/c2|0", "/c3|0", "/c4|0"]


# Many clients, each pipelining, while the workers answer out of order.
def test_async_http_many_connections(async_http):
    host, port = async_http

    def client(k):
        def run():
            with socket.create_connection((host, port), timeout=WAIT) as s:
                f = s.makefile("rb")
                for burst in range(3):
                    s.sendall(b"".join(b"GET /%d/%d/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (k, burst, i)
                                       for i in range(20)))
                    for i in range(20):
                        assert read_response(f)[::2] == (200, b"/%d/%d/%d" % (k, burst, i))
                f.close()
        return run
    run_threads([client(k) for k in range(10)])
