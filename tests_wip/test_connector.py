# =============================================================================
# Connector and ConnectPool (issue 4)
# =============================================================================
# Connector: every outcome (success on IPv4/IPv6/unix/abstract/hostname,
# refused, missing unix path, timeout against a full accept queue, reactor
# stopped mid-connect), exactly one of on_open/on_connect_fail on the poller
# thread, never re-entrant, no fd leaked; 1000 parallel connects.
# ConnectPool: fill/refill/limits, acquire never returns a closed handler,
# foreign release, a dead server (no spin, no leak), server restart, close.
# The redis example runs against a real redis-server.

from test_goev import *  # noqa: F401,F403
from test_goev import backend, npollers, hygiene, make_reactor, goev_log  # noqa: F401

import collections
import errno
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

import goev
from test_goev import (HERE, WAIT, Echo, echo_server, free_port, recv_exact, spawn_py,
                       stop_child, wait_port, wait_until, _open_fds)


def _on_poller():
    return threading.current_thread().name.startswith("goev-poller")


class Probe(goev.IOHandle):
    """Records on_open / on_connect_fail / on_close, and on which thread."""

    def __init__(self, greeting=b""):
        self.events = []
        self.threads = []
        self.err = None
        self.greeting = greeting
        self.got = bytearray()
        self.settled = threading.Event()    # on_open or on_connect_fail ran
        self.closed_ev = threading.Event()

    def on_open(self):
        self.events.append("open")
        self.threads.append(_on_poller())
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        if self.greeting:
            self.write(self.greeting)
        self.settled.set()
        return True

    def on_connect_fail(self, err):
        self.events.append("fail")
        self.threads.append(_on_poller())
        self.err = err
        self.settled.set()

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        self.got += data
        return True

    def on_close(self):
        self.events.append("close")
        self.closed_ev.set()
        self.destroy()


def _sockets_to(port):
    """Count this process's TCP sockets connected to 127.0.0.1:port (via /proc)."""
    n = 0
    inodes = set()
    for fd, target in _open_fds().items():
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    hexport = ":%04X" % port
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[2].endswith(hexport) and parts[9] in inodes:
                        n += 1
        except OSError:
            pass
    return n


def full_listener():
    """A loopback listener whose accept queue is full and never drained: Linux
    then drops further SYNs, so a connect to it can only time out.  Returns
    (listener, fillers); the caller closes them."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    fillers = []
    try:
        for _ in range(32):
            c = socket.socket()
            c.setblocking(False)
            fillers.append(c)
            c.connect_ex(ls.getsockname())
            _, w, _ = select.select([], [c], [], 0.5)
            if not w:                 # this SYN was dropped: the queue is full
                return ls, fillers
    except BaseException:
        for s in fillers + [ls]:
            s.close()
        raise
    for s in fillers + [ls]:
        s.close()
    pytest.skip("could not fill a listen backlog on this kernel")


def close_all(*socks):
    for s in socks:
        if isinstance(s, (list, tuple)):
            close_all(*s)
        else:
            s.close()


def _has_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# -----------------------------------------------------------------------------
# Connector: outcomes
# -----------------------------------------------------------------------------

def _connect_and_echo(make_reactor, listen_addr, connect_addr=None, pollers=1):
    sr, a = echo_server(make_reactor, pollers, addr=listen_addr)
    r = make_reactor(pollers)
    r.start()
    if connect_addr is None:
        addr = a.address
        if isinstance(addr, str):
            connect_addr = "unix:" + (("@" + addr[1:]) if addr.startswith("\0") else addr)
        elif len(addr) == 4:
            connect_addr = "[%s]:%d" % addr[:2]
        else:
            connect_addr = "%s:%d" % addr
    h = Probe(b"hello goev")
    goev.Connector(r).connect(connect_addr, h, 5000)
    assert h.settled.wait(WAIT)
    assert h.events == ["open"], (h.events, h.err)
    assert h.threads == [True]
    wait_until(lambda: bytes(h.got) == b"hello goev", what="echo")
    h.close()
    wait_until(lambda: h.events == ["open", "close"], what="on_close")
    return h


def test_connect_ipv4(make_reactor, npollers):
    h = _connect_and_echo(make_reactor, "127.0.0.1:0", pollers=npollers)
    assert h.peer is not None


def test_connect_tuple_and_hostname(make_reactor):
    sr, a = echo_server(make_reactor, 1, addr="localhost:0")
    r = make_reactor(1)
    r.start()
    for addr in ("localhost:%d" % a.address[1], ("localhost", a.address[1])):
        h = Probe(b"x")
        goev.Connector(r).connect(addr, h, 5000)
        assert h.settled.wait(WAIT)
        assert h.events == ["open"], h.err
        wait_until(lambda: bytes(h.got) == b"x")
        h.close()
        assert h.closed_ev.wait(WAIT)


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
def test_connect_ipv6(make_reactor):
    _connect_and_echo(make_reactor, "[::1]:0")


def test_connect_unix_path(make_reactor, tmp_path):
    path = str(tmp_path / "echo.sock")
    _connect_and_echo(make_reactor, "unix:" + path)


def test_connect_unix_abstract(make_reactor):
    _connect_and_echo(make_reactor, "unix:@goev-test-%d-%d" % (os.getpid(), free_port()))


def test_connect_refused(make_reactor, npollers):
    r = make_reactor(npollers)
    r.start()
    c = goev.Connector(r)
    hs = [Probe() for _ in range(20)]
    port = free_port()                    # nothing listens there
    for h in hs:
        c.connect("127.0.0.1:%d" % port, h, 5000)
    for h in hs:
        assert h.settled.wait(WAIT)
    for h in hs:
        assert h.events == ["fail"] and h.threads == [True]
        assert isinstance(h.err, ConnectionRefusedError), h.err
        assert str(port) in str(h.err)
        assert h.fd == -1 and not h.closed


def test_connect_unix_missing_path(make_reactor, tmp_path):
    """Immediate failure still reports on the poller thread, after connect() returned."""
    r = make_reactor(1)
    r.start()
    c = goev.Connector(r)
    h = Probe()
    c.connect("unix:" + str(tmp_path / "nobody.sock"), h, 1000)
    assert h.settled.wait(WAIT)
    assert h.events == ["fail"] and h.threads == [True]
    assert isinstance(h.err, FileNotFoundError), h.err
    h2 = Probe()
    c.connect("unix:@goev-nobody-%d" % os.getpid(), h2, 1000)
    assert h2.settled.wait(WAIT)
    assert h2.events == ["fail"] and isinstance(h2.err, ConnectionRefusedError), h2.err


def test_connect_unix_backlog_full_is_a_failure(make_reactor, tmp_path):
    """A non-blocking unix connect to a full backlog returns EAGAIN: it did not
    start, so it must fail -- never a false on_open on an unconnected socket."""
    path = str(tmp_path / "full.sock")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(0)
    fillers = []
    try:
        for _ in range(64):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            fillers.append(s)
            if s.connect_ex(path) == errno.EAGAIN:
                break
        else:
            pytest.skip("unix backlog never filled")
        r = make_reactor(1)
        r.start()
        h = Probe()
        goev.Connector(r).connect("unix:" + path, h, 1000)
        assert h.settled.wait(WAIT)
        assert h.events == ["fail"], h.events
        assert isinstance(h.err, OSError) and h.err.errno == errno.EAGAIN, h.err
    finally:
        close_all(fillers, ls)


def test_connect_timeout(make_reactor, npollers):
    ls, fillers = full_listener()
    try:
        r = make_reactor(npollers)
        r.start()
        c = goev.Connector(r)
        hs = [Probe() for _ in range(3)]
        for h in hs:
            c.connect(ls.getsockname(), h, 200)
        for h in hs:
            assert h.settled.wait(WAIT)
            assert h.events == ["fail"] and h.threads == [True]
            assert isinstance(h.err, TimeoutError), h.err
            assert h.fd == -1
    finally:
        close_all(fillers, ls)


def test_connect_reactor_stopped_mid_connect(make_reactor, npollers):
    ls, fillers = full_listener()
    try:
        r = make_reactor(npollers)
        r.start()
        hs = [Probe() for _ in range(4)]
        for h in hs:
            goev.Connector(r).connect(ls.getsockname(), h, 0)    # 0: no timeout
        # the connects are in flight (they cannot complete): stop the reactor
        wait_until(lambda: sum(isinstance(x, goev._Connecting) for p in r.pollers
                               for x in list(p._handlers.values())) == 4, what="connects in flight")
        r.stop(timeout=WAIT)
        for h in hs:
            assert h.settled.is_set()
            assert h.events == ["fail"], h.events
            assert isinstance(h.err, ConnectionAbortedError), h.err
    finally:
        close_all(fillers, ls)


def test_connect_before_start_then_stop(make_reactor):
    ls, fillers = full_listener()
    try:
        r = make_reactor(1)
        h = Probe()
        goev.Connector(r).connect(ls.getsockname(), h, 0)
        r.stop()
        assert h.events == ["fail"] and isinstance(h.err, ConnectionAbortedError), h.err
        with pytest.raises(RuntimeError):
            goev.Connector(r).connect(ls.getsockname(), Probe(), 0)
    finally:
        close_all(fillers, ls)


def test_connect_before_start_succeeds_after_start(make_reactor):
    sr, a = echo_server(make_reactor)
    r = make_reactor(1)
    h = Probe(b"early")
    goev.Connector(r).connect(a.address, h, 5000)
    r.start()
    assert h.settled.wait(WAIT) and h.events == ["open"]
    wait_until(lambda: bytes(h.got) == b"early")


def test_connect_from_poller_callback_is_not_reentrant(make_reactor, npollers):
    """connect() from a poller callback returns before on_open/on_connect_fail
    run (so the caller's state is consistent); from another thread it works too."""
    sr, a = echo_server(make_reactor)
    r = make_reactor(npollers)
    r.start()
    c = goev.Connector(r)
    inside = threading.local()              # set while this thread is inside connect()
    reentered = []
    done = threading.Event()
    unix_missing = "unix:/nonexistent-goev-%d/x.sock" % os.getpid()

    class H(Probe):
        def on_open(self):
            reentered.append(getattr(inside, "v", False))
            return Probe.on_open(self)

        def on_connect_fail(self, err):
            reentered.append(getattr(inside, "v", False))
            Probe.on_connect_fail(self, err)

    hs = []

    def in_callback():
        for _ in range(10):                 # several, so some land on this very poller
            for addr in (a.address, unix_missing):
                h = H()
                hs.append(h)
                inside.v = True
                try:
                    c.connect(addr, h, 5000)
                finally:
                    inside.v = False
        done.set()
    r.pollers[0]._post(in_callback)
    assert done.wait(WAIT)
    for h in hs:
        assert h.settled.wait(WAIT)
    assert reentered == [False] * 20
    for i, h in enumerate(hs):
        assert h.events == (["open"] if i % 2 == 0 else ["fail"]) and h.threads == [True]
    # and from a plain thread
    h = H()
    c.connect(a.address, h, 5000)
    assert h.settled.wait(WAIT) and h.events == ["open"] and h.threads == [True]


def test_connect_on_open_false_or_raising(make_reactor, goev_log):
    sr, a = echo_server(make_reactor)
    r = make_reactor(1)
    r.start()

    class No(Probe):
        def on_open(self):
            self.events.append("open")
            self.settled.set()
            return False

    class Boom(Probe):
        def on_open(self):
            self.events.append("open")
            self.settled.set()
            raise RuntimeError("boom in on_open")

    for cls in (No, Boom):
        h = cls()
        goev.Connector(r).connect(a.address, h, 5000)
        assert h.closed_ev.wait(WAIT)
        assert h.events == ["open", "close"]
        assert h.fd == -1
    assert any("boom in on_open" in str(rec.exc_info[1]) for rec in goev_log.errors() if rec.exc_info)


def test_connect_on_connect_fail_raising_is_logged(make_reactor, goev_log):
    r = make_reactor(1)
    r.start()

    class Bad(Probe):
        def on_connect_fail(self, err):
            Probe.on_connect_fail(self, err)
            raise RuntimeError("boom in on_connect_fail")
    h = Bad()
    goev.Connector(r).connect("127.0.0.1:%d" % free_port(), h, 1000)
    assert h.settled.wait(WAIT)
    wait_until(lambda: goev_log.errors(), what="the error to be logged")
    assert h.events == ["fail"] and isinstance(h.err, ConnectionRefusedError)


def test_connect_internal_fault_still_reports_once(make_reactor, goev_log, monkeypatch):
    """Safety net: if the connect handler itself is closed by the poller (an
    exception, or ERR/HUP without OUT), the target still gets exactly one
    on_connect_fail and the socket is closed."""
    sr, a = echo_server(make_reactor)
    r = make_reactor(1)
    r.start()

    def broken(self):
        raise RuntimeError("internal failure")
    monkeypatch.setattr(goev._Connecting, "on_write", broken)
    hs = [Probe() for _ in range(5)]
    for h in hs:
        goev.Connector(r).connect(a.address, h, 5000)
    for h in hs:
        assert h.settled.wait(WAIT)
        assert h.events == ["fail"] and isinstance(h.err, ConnectionAbortedError), (h.events, h.err)
        assert h.fd == -1
    monkeypatch.undo()
    r.stop(timeout=WAIT)
    for h in hs:
        assert h.events == ["fail"]


def test_connect_bad_input(make_reactor):
    sr, a = echo_server(make_reactor)
    r = make_reactor(1)
    r.start()
    c = goev.Connector(r)
    for bad in ("127.0.0.1", "127.0.0.1:99999", "::1:80", "[::1:80", "host name:80", "unix:", 80):
        with pytest.raises((ValueError, TypeError)) as ei:
            c.connect(bad, Probe(), 100)
        assert repr(bad) in str(ei.value) or str(bad) in str(ei.value), ei.value
    with pytest.raises(ValueError, match="port 0"):
        c.connect("127.0.0.1:0", Probe(), 100)
    for bad_t in (-1, float("nan")):
        with pytest.raises(ValueError, match="timeout_ms"):
            c.connect(a.address, Probe(), bad_t)
    with pytest.raises(TypeError, match="timeout_ms"):
        c.connect(a.address, Probe(), "100")
    with pytest.raises(TypeError, match="handler"):
        c.connect(a.address, object(), 100)
    with pytest.raises(TypeError, match="reactor"):
        goev.Connector("not a reactor")
    # a handler that is open, or still connecting, cannot be connected again
    h = Probe()
    ls, fillers = full_listener()
    try:
        c.connect(ls.getsockname(), h, 300)
        with pytest.raises(ValueError, match="Probe"):
            c.connect(a.address, h, 100)
        assert h.settled.wait(WAIT) and isinstance(h.err, TimeoutError)
    finally:
        close_all(fillers, ls)
    h2 = Probe()
    c.connect(a.address, h2, 5000)
    assert h2.settled.wait(WAIT) and h2.events == ["open"]
    with pytest.raises(ValueError, match="Probe"):
        c.connect(a.address, h2, 100)
    # a handler whose connect failed may try again
    h.settled.clear()
    c.connect(a.address, h, 5000)
    assert h.settled.wait(WAIT) and h.events == ["fail", "open"]
    h.async_write(b"again")
    wait_until(lambda: bytes(h.got) == b"again", what="echo after a reconnect")
    assert h.events == ["fail", "open"] and not h.closed


def test_connect_1000_parallel(make_reactor, npollers):
    """1000 connects in flight at once, each verified with its own echo."""
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip("RLIMIT_NOFILE hard limit %d is below %d" % (hard, need))
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else hard, hard))
    try:
        sr, a = echo_server(make_reactor, npollers, backlog=2048)
        r = make_reactor(npollers)
        r.start()
        lock = threading.Lock()
        good, bad = [], []
        all_done = threading.Event()

        class One(goev.IOHandle):
            def __init__(self, i):
                self.msg = b"hello %d\n" % i
                self.got = bytearray()

            def on_open(self):
                self.reactor.add_handler(self, self.fd, goev.EV_IN)
                self.write(self.msg)
                return True

            def on_read(self):
                data = self.read()
                if data is None:
                    return True
                self.got += data
                if len(self.got) >= len(self.msg) or not data:
                    self._result(bytes(self.got) == self.msg)
                    return False
                return True

            def on_connect_fail(self, err):
                self._result(err)

            def _result(self, res):
                with lock:
                    (good if res is True else bad).append(res)
                    if len(good) + len(bad) == n:
                        all_done.set()

        c = goev.Connector(r)
        for i in range(n):
            c.connect(a.address, One(i), 30000)
        assert all_done.wait(90), "only %d of %d finished" % (len(good) + len(bad), n)
        assert not bad, bad[:5]
        assert len(good) == n
        r.stop(timeout=WAIT)
        sr.stop(timeout=WAIT)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -----------------------------------------------------------------------------
# ConnectPool
# -----------------------------------------------------------------------------

def counting_server(make_reactor, pollers=1, port=0):
    """An echo server that counts the connections it accepted and has open."""
    stats = {"accepted": 0, "open": 0, "max_open": 0}
    lock = threading.Lock()

    class E(Echo):
        def on_open(self):
            with lock:
                stats["accepted"] += 1
                stats["open"] += 1
                stats["max_open"] = max(stats["max_open"], stats["open"])
            return Echo.on_open(self)

        def on_close(self):
            with lock:
                stats["open"] -= 1
            self.destroy()
    r = make_reactor(pollers)
    a = goev.Acceptor(r, "127.0.0.1:%d" % port, E)
    r.start()
    return r, a, stats


class PoolConn(goev.IOHandle):
    """A pooled connection that can do one request/response (an echo) at a time."""

    def __init__(self):
        self.got = bytearray()
        self.cv = threading.Condition()

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        with self.cv:
            self.got += data
            self.cv.notify_all()
        return True

    def request(self, msg):
        with self.cv:
            del self.got[:]
        self.async_write(msg)
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.got) >= len(msg), WAIT), "no echo"
            return bytes(self.got)


def test_pool_fills_acquire_release(make_reactor, npollers):
    sr, a, stats = counting_server(make_reactor)
    r = make_reactor(npollers)
    r.start()
    pool = goev.ConnectPool(goev.Connector(r), "127.0.0.1:%d" % a.address[1], PoolConn,
                            min_idle=3, add_step=2, max_live=6, connect_timeout_ms=5000,
                            keep_interval_ms=50)
    try:
        wait_until(lambda: pool.idle >= 3, what="pool to fill")
        assert pool.live == pool.idle == 3
        got = []
        for _ in range(6):
            h = pool.acquire()
            if h is None:
                wait_until(lambda: pool.idle > 0, what="refill")
                h = pool.acquire()
            assert h is not None and not h.closed
            got.append(h)
        assert len(set(got)) == 6
        assert pool.live == 6
        assert pool.acquire() is None                # max_live reached, none idle
        for i, h in enumerate(got):
            assert h.request(b"req %d" % i) == b"req %d" % i
        for h in got:
            pool.release(h)
        assert pool.idle == 6 and pool.live == 6
        time.sleep(0.2)                               # some maintenance ticks: nothing more
        assert stats["max_open"] <= 6 and pool.live == 6
        # threads acquire/release concurrently: each handler is used by one at a time
        errors = []

        def worker(k):
            try:
                for j in range(20):
                    h = pool.acquire()
                    if h is None:
                        continue
                    msg = b"w%d-%d" % (k, j)
                    assert h.request(msg) == msg
                    pool.release(h)
            except Exception as e:                    # pragma: no cover
                errors.append(e)
        ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        wait_until(lambda: pool.idle == 6 and not pool._pending, what="pool to settle")
        assert pool.live == 6 and stats["max_open"] <= 6
    finally:
        pool.close()
    wait_until(lambda: stats["open"] == 0, what="server to see every pooled connection close")
    assert pool.idle == 0


def test_pool_release_foreign_and_double(make_reactor):
    sr, a, stats = counting_server(make_reactor)
    r = make_reactor(1)
    r.start()
    c = goev.Connector(r)
    pool = goev.ConnectPool(c, a.address, PoolConn, 1, 1, 2, 5000, 50)
    other = goev.ConnectPool(c, a.address, PoolConn, 1, 1, 2, 5000, 50)
    try:
        wait_until(lambda: pool.idle and other.idle)
        with pytest.raises(ValueError, match="does not belong"):
            pool.release(PoolConn())
        h = other.acquire()
        with pytest.raises(ValueError, match="does not belong"):
            pool.release(h)
        other.release(h)
        with pytest.raises(ValueError, match="already"):
            other.release(h)
        assert other.idle == 1
    finally:
        pool.close()
        other.close()


def test_pool_acquire_never_returns_closed(make_reactor, npollers):
    sr, a, stats = counting_server(make_reactor)
    r = make_reactor(npollers)
    r.start()
    pool = goev.ConnectPool(goev.Connector(r), a.address, PoolConn, 4, 2, 8, 5000, 30)
    try:
        wait_until(lambda: pool.idle >= 4)
        # Handlers closed on their poller are still in the idle deque until the
        # "closed" bookkeeping reaches poller 0: acquire() must skip them.  Done on
        # each poller in turn, inside its own callback, so nothing else races.
        seen = []
        for p in r.pollers:
            step = threading.Event()

            def close_mine_then_acquire(p=p, step=step):
                if p._tid == threading.get_ident():
                    mine = [h for h in list(pool._idle) if h.poller is p]
                    for h in mine:
                        h.close()
                        assert h.closed
                    got = pool.acquire()
                    seen.append((len(mine), got is not None and got.closed))
                    if got is not None:
                        pool.release(got)
                    step.set()
            r.post(close_mine_then_acquire)
            assert step.wait(WAIT)
        assert sum(n for n, _ in seen) >= 1
        assert not any(closed for _, closed in seen), seen
        wait_until(lambda: pool.idle >= 4, what="refill after closes")
        # the server closes every connection: the pool notices and refills
        def close_conns():
            me = threading.get_ident()
            for p in sr.pollers:
                if p._tid == me:
                    for x in list(p._handlers.values()):
                        if not isinstance(x, goev.Acceptor):
                            x.close()
        accepted = stats["accepted"]
        sr.post(close_conns)
        wait_until(lambda: stats["accepted"] >= accepted + 4, what="new connections")
        wait_until(lambda: pool.idle >= 4, what="refill after the server closed everything")
        h = pool.acquire()
        assert h.request(b"still works") == b"still works"
        pool.release(h)
    finally:
        pool.close()


def test_pool_server_down_no_spin_no_leak(make_reactor, npollers):
    port = free_port()
    r = make_reactor(npollers)
    r.start()
    made = [0]

    def factory():
        made[0] += 1
        return PoolConn()
    fds_before = len(_open_fds())
    pool = goev.ConnectPool(goev.Connector(r), "127.0.0.1:%d" % port, factory, 2, 1, 4, 1000, 50)
    try:
        t0 = time.monotonic()
        # a tight acquire loop while the server is down must not become a connect storm
        while time.monotonic() - t0 < 0.5:
            assert pool.acquire() is None
        elapsed = time.monotonic() - t0
        wait_until(lambda: made[0] >= 4, what="the pool to keep trying")
        # ~ min_idle per keep interval (plus a few acquire-triggered rounds); a spin would be thousands
        assert made[0] <= 2 * (elapsed / 0.05 + 10), made[0]
        assert pool.live == 0 and pool.idle == 0
        assert len(_open_fds()) <= fds_before + 4       # at most the in-flight connects
    finally:
        pool.close()
    wait_until(lambda: not pool._members, what="in-flight connects to settle")
    wait_until(lambda: len(_open_fds()) <= fds_before, what="no fd left")


def test_pool_refills_after_server_restart(make_reactor, npollers):
    sr, a, stats = counting_server(make_reactor)
    port = a.address[1]
    r = make_reactor(npollers)
    r.start()
    pool = goev.ConnectPool(goev.Connector(r), "127.0.0.1:%d" % port, PoolConn, 2, 2, 4, 2000, 30)
    try:
        wait_until(lambda: pool.idle >= 2)
        sr.stop(timeout=WAIT)                         # server gone: every connection closes
        wait_until(lambda: pool.live == 0, what="pool to notice the server went away")
        assert pool.acquire() is None
        time.sleep(0.15)                              # a few failing maintenance rounds
        sr2, a2, stats2 = counting_server(make_reactor, port=port)
        wait_until(lambda: pool.idle >= 2, what="pool to refill after the restart")
        h = pool.acquire()
        assert h.request(b"back") == b"back"
        pool.release(h)
        assert pool.live <= 4
    finally:
        pool.close()


def test_pool_close_leaves_no_fd(make_reactor, npollers):
    sr, a, stats = counting_server(make_reactor)
    port = a.address[1]
    r = make_reactor(npollers)
    r.start()
    pool = goev.ConnectPool(goev.Connector(r), a.address, PoolConn, 5, 5, 10, 5000, 20)
    wait_until(lambda: pool.idle >= 5)
    held = pool.acquire()
    assert _sockets_to(port) >= 5
    pool.close()
    wait_until(lambda: _sockets_to(port) == 0, what="every pooled socket closed")
    assert held.closed
    assert pool.acquire() is None and pool.idle == 0
    pool.release(held)                                # after close: accepted, ignored
    # a pool closed while its connects are still in flight leaks nothing either
    ls, fillers = full_listener()
    try:
        p2 = goev.ConnectPool(goev.Connector(r), ls.getsockname(), PoolConn, 3, 3, 3, 0, 20)
        wait_until(lambda: len(p2._pending) == 3, what="connects in flight")
        p2.close()
        r.stop(timeout=WAIT)                          # aborts them: no fd may survive
        assert not p2._members
    finally:
        close_all(fillers, ls)
    pool2_port_socks = _sockets_to(port)
    assert pool2_port_socks == 0


def test_pool_closed_while_connecting_to_live_server(make_reactor, npollers):
    """close() right after creation: connects that complete later are closed, not leaked."""
    sr, a, stats = counting_server(make_reactor)
    port = a.address[1]
    r = make_reactor(npollers)
    r.start()
    for _ in range(5):
        pool = goev.ConnectPool(goev.Connector(r), a.address, PoolConn, 4, 4, 4, 5000, 1000)
        wait_until(lambda: pool._pending or pool._members, what="connects started")
        pool.close()
        wait_until(lambda: not pool._members, what="members to settle")
    wait_until(lambda: _sockets_to(port) == 0 and stats["open"] == 0, what="all closed")


def test_pool_on_open_false_does_not_wedge(make_reactor):
    """A member whose on_open refuses must not leave the pool thinking a connect is in flight."""
    sr, a, stats = counting_server(make_reactor)
    r = make_reactor(1)
    r.start()
    refuse = [3]

    class Picky(PoolConn):
        def on_open(self):
            if refuse[0] > 0:
                refuse[0] -= 1
                return False
            return PoolConn.on_open(self)
    pool = goev.ConnectPool(goev.Connector(r), a.address, Picky, 2, 1, 4, 5000, 20)
    try:
        wait_until(lambda: pool.idle >= 2, what="pool to fill despite refused opens")
        assert not pool._pending
    finally:
        pool.close()


def test_pool_factory_error_keeps_maintenance(make_reactor, goev_log):
    sr, a, stats = counting_server(make_reactor)
    r = make_reactor(1)
    r.start()
    fail = [2]

    def factory():
        if fail[0]:
            fail[0] -= 1
            raise RuntimeError("factory hiccup")
        return PoolConn()
    pool = goev.ConnectPool(goev.Connector(r), a.address, factory, 1, 1, 2, 5000, 20)
    try:
        wait_until(lambda: pool.idle >= 1, what="maintenance to survive a factory error")
        assert any("factory" in rec.getMessage() or (rec.exc_info and "factory hiccup" in str(rec.exc_info[1]))
                   for rec in goev_log.errors())
    finally:
        pool.close()


def test_pool_bad_arguments(make_reactor):
    r = make_reactor(1)
    c = goev.Connector(r)
    ok = dict(connector=c, addr="127.0.0.1:1", factory=PoolConn, min_idle=1, add_step=1,
              max_live=2, connect_timeout_ms=100, keep_interval_ms=100)
    for key, val, exc in (("connector", None, TypeError), ("factory", 3, TypeError),
                          ("min_idle", 0, ValueError), ("add_step", 0, ValueError),
                          ("max_live", 0, ValueError), ("min_idle", 3, ValueError),
                          ("connect_timeout_ms", -1, ValueError), ("keep_interval_ms", 0, ValueError),
                          ("addr", "nonsense", ValueError), ("min_idle", 1.5, TypeError)):
        kw = dict(ok, **{key: val})
        with pytest.raises(exc):
            goev.ConnectPool(**kw)


# -----------------------------------------------------------------------------
# examples/connect_pool.py against a real redis-server
# -----------------------------------------------------------------------------

def _redis_server():
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (CI must install the Debian package redis-server)")
        pytest.skip("redis-server not installed")
    return exe


def test_example_connect_pool_redis(backend):
    exe = _redis_server()
    port = free_port()
    srv = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--daemonize", "no"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        p = spawn_py([os.path.join(HERE, "examples", "connect_pool.py"), "127.0.0.1:%d" % port,
                      "--workers", "4", "--requests", "5"], env={"GOEV_BACKEND": backend})
        try:
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert p.returncode == 0, (out, err)
        assert "PING -> PONG" in out, out
        assert out.count("SET ") >= 20 and "-> OK" in out, out
        for w in range(4):
            for i in range(5):
                key = "goev:worker%d:%d" % (w, i)
                assert "GET %s -> value-%d-%d" % (key, w, i) in out, out
        # the values really are in redis (checked with a plain socket client)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"*2\r\n$3\r\nGET\r\n$14\r\ngoev:worker3:4\r\n")
            assert recv_exact(s, len(b"$9\r\nvalue-3-4\r\n")) == b"$9\r\nvalue-3-4\r\n"
    finally:
        stop_child(srv)


def test_example_connect_pool_no_server(backend):
    """Against a port where nothing listens, the example says so and exits non-zero quickly."""
    p = spawn_py([os.path.join(HERE, "examples", "connect_pool.py"), "127.0.0.1:%d" % free_port(),
                  "--timeout", "2"], env={"GOEV_BACKEND": backend})
    try:
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 1, (out, err)
    assert "could not connect" in err, err
