# =============================================================================
# Core: byte-exact streams, concurrency, flow control, half-close, FIN/RST,
# faults in callbacks, stop(), close/abort/shutdown_write, IPv6 and unix
# sockets, bad input, EMFILE, the CLI, handler ergonomics
# =============================================================================
# Every test runs on both backends; the ones where placement matters also run
# with 1 and 3 pollers.  Each assertion is one a broken implementation fails:
# each test's docstring names the bug it catches.

from test_goev import *                                   # noqa: F401,F403
from test_goev import (backend, npollers, hygiene, make_reactor, goev_log,   # noqa: F401
                       wait_until, recv_exact, recv_all, Echo, echo_server, run_py,
                       spawn_py, free_port, stop_child, WAIT)

import errno
import fcntl
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

import goev


# -- helpers of this section ----------------------------------------------------

def _randbytes(rng, n):
    if hasattr(rng, "randbytes"):
        return rng.randbytes(n)
    return bytes(rng.getrandbits(8) for _ in range(n))      # pragma: no cover (3.8-)


class _Bg:
    """Run fn in a thread; join() re-raises its exception in the test thread."""

    def __init__(self, fn, *args):
        self.exc = None
        self.result = None

        def run():
            try:
                self.result = fn(*args)
            except BaseException as e:                      # reported by join()
                self.exc = e
        self.t = threading.Thread(target=run, daemon=True)
        self.t.start()

    def join(self, timeout=WAIT):
        self.t.join(timeout)
        assert not self.t.is_alive(), "background thread did not finish"
        if self.exc is not None:
            raise self.exc
        return self.result


def _ioctl_int(fd, req):
    buf = fcntl.ioctl(fd, req, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def _outq(fd):
    """Bytes in the socket's send queue (unsent + unacknowledged): SIOCOUTQ."""
    return _ioctl_int(fd, termios.TIOCOUTQ)


def _inq(fd):
    """Bytes waiting in the socket's receive queue: SIOCINQ/FIONREAD."""
    return _ioctl_int(fd, termios.FIONREAD)


def _set_sndbuf(fd, n):
    """Shrink a server socket's kernel send buffer (through a dup of its fd)."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, n)
    finally:
        s.close()


def _round_trip(reactor, handler=None):
    """Wait until the poller owning ``handler`` (or every poller) ran one more
    loop pass: anything the kernel reported before this call was dispatched."""
    done = []
    lock = threading.Lock()

    def mark():
        with lock:
            done.append(1)
    if handler is None:
        reactor.post(mark)
        n = len(reactor.pollers)
    else:
        reactor.post_to(handler, mark)
        n = 1
    # Twice: the first pass may have been in the middle of a batch.
    wait_until(lambda: len(done) >= n, what="a poller round trip")
    if handler is None:
        reactor.post(mark)
    else:
        reactor.post_to(handler, mark)
    wait_until(lambda: len(done) >= 2 * n, what="a poller round trip")


def _collecting(cls, *args):
    """(factory, list): the factory builds cls(*args) and remembers each one."""
    made = []

    def factory():
        h = cls(*args)
        made.append(h)
        return h
    return factory, made


class _Tracked(goev.IOHandle):
    """Counts on_close calls and remembers the poller it lived on."""
    # Class defaults: the test thread may look before on_open ran (the
    # factory is called, and the handler listed, first).
    closes = 0

    def on_open(self):
        self.opened_fd = self.fd
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        return True

    def on_close(self):
        self.closes += 1
        self.destroy()


class _TrackedEcho(_Tracked):
    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        self.write(data)
        return True


class _Pipe:
    """Line reader over a child's pipe with a timeout (select on the raw fd)."""

    def __init__(self, f):
        self.fd = f.fileno()
        self.buf = b""
        self.eof = False

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out reading from child (got %r)" % self.buf)
        r, _, _ = select.select([self.fd], [], [], left)
        if r:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
            self.buf += chunk

    def readline(self, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf and not self.eof:
            self._fill(deadline)
        line, sep, self.buf = self.buf.partition(b"\n")
        return (line + sep).decode()

    def read_rest(self, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while not self.eof:
            self._fill(deadline)
        rest, self.buf = self.buf, b""
        return rest.decode()


def _have_ipv6():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# =============================================================================
# Byte-exact streams and many clients
# =============================================================================

def test_echo_random_chunks_tiny_buffers(make_reactor, npollers):
    """Random send sizes one way, random recv sizes the other, through 4 KiB
    client buffers: every partial send / queued remainder / EV_OUT resume is
    exercised.  A lost, duplicated or reordered queue piece changes the bytes;
    extra bytes after the stream show up before the final EOF."""
    r, a = echo_server(make_reactor, npollers)
    size = 1 << 20
    data = _randbytes(random.Random(7), size)
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(a.address)
    c.settimeout(WAIT)
    with c:
        def sender():
            rng = random.Random(1)
            i = 0
            while i < size:
                n = rng.choice((1, 7, 100, 1500, rng.randint(1, 70000)))
                c.sendall(data[i:i + n])
                i += n
            c.shutdown(socket.SHUT_WR)          # the echo server closes at our EOF
        s = _Bg(sender)
        rng = random.Random(2)
        got = bytearray()
        while len(got) < size:
            chunk = c.recv(rng.choice((1, 13, 4096, rng.randint(1, 70000))))
            if not chunk:
                break
            got += chunk
        s.join()
        assert len(got) == size
        assert bytes(got) == data
        assert c.recv(1) == b"", "bytes after the echoed stream, or no EOF"


def test_200_concurrent_clients(make_reactor, npollers):
    """200 connections at once, each with its own payload sent in two parts
    interleaved across clients: each gets exactly its own bytes back (a mix-up
    between handlers sharing a poller's read buffer would swap payloads), and
    each handler lives on poller[fd % N] (the placement contract)."""
    factory, handlers = _collecting(_TrackedEcho)
    r, a = echo_server(make_reactor, npollers, factory=factory)
    rng = random.Random(200)
    payloads = [b"client %03d:" % i + _randbytes(rng, rng.randint(1, 40000)) for i in range(200)]
    clients = [socket.create_connection(a.address, timeout=WAIT) for _ in range(200)]
    try:
        for c, p in zip(clients, payloads):
            c.sendall(p[:len(p) // 2])
        for c, p in zip(clients, payloads):
            c.sendall(p[len(p) // 2:])
        for i, (c, p) in enumerate(zip(clients, payloads)):
            got = recv_exact(c, len(p))
            assert got == p, "client %d got the wrong bytes" % i
        wait_until(lambda: len(handlers) == 200, what="200 handlers")
        for h in handlers:
            assert h.poller.index == h.opened_fd % npollers
        assert {h.poller.index for h in handlers} == set(range(npollers))
    finally:
        for c in clients:
            c.close()
    wait_until(lambda: all(h.closes for h in handlers), what="every handler closed")
    _round_trip(r)
    assert [h.closes for h in handlers] == [1] * 200


# =============================================================================
# Flow control: slow reader, backpressure on echo
# =============================================================================

class _Flood(goev.IOHandle):
    """Writes TOTAL bytes in CHUNK pieces while pending_write_bytes <= HIGH,
    continuing in on_write_drained; records every on_read with the queue size
    at that moment.  Closes once everything is written and the client said bye."""
    HIGH = 256 * 1024
    LOW = 16 * 1024        # far below HIGH: the kernel may still take ~128 KiB during a stall
    CHUNK = 16 * 1024
    data = b""
    closes = 0
    sent = 0
    reads = b""

    def on_open(self):
        # A small kernel send buffer makes each flush move a little, so the
        # queue passes through the band between LOW and HIGH (where reading
        # must stay paused) instead of jumping from above HIGH to empty.
        _set_sndbuf(self.fd, 32768)
        self.set_write_buffer_limits(self.HIGH, self.LOW)
        self.sent = 0
        self.max_pending = 0
        self.reads = bytearray()
        self.reads_while_queued = []       # on_read calls that should have been paused
        self.above_high = False
        self.closes = 0
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        self.pump()
        return True

    def pump(self):
        view = memoryview(self.data)
        while self.sent < len(self.data) and self.pending_write_bytes <= self.HIGH:
            piece = view[self.sent:self.sent + self.CHUNK]
            self.write(piece)
            self.sent += len(piece)
            self.max_pending = max(self.max_pending, self.pending_write_bytes)
        # Between pumps the queue only shrinks: if it ended above HIGH, reading
        # is paused until it is back at LOW or below.
        self.above_high = self.pending_write_bytes > self.HIGH
        self.maybe_done()

    def on_write_drained(self):
        self.pump()

    def on_read(self):
        if self.pending_write_bytes > (self.LOW if self.above_high else self.HIGH):
            self.reads_while_queued.append(self.pending_write_bytes)
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        self.reads += data
        self.maybe_done()
        return True

    def maybe_done(self):
        if self.sent == len(self.data) and self.reads.endswith(b"bye"):
            self.close()

    def on_close(self):
        self.closes += 1
        self.destroy()


def test_slow_reader_is_paced_and_paused(make_reactor):
    """A server pushes 32 MiB at a client that stops reading twice.  Catches:
    a queue that grows past high water + one chunk (pending_write_bytes wrong
    or the write path not queueing), pending_write_bytes that does not match
    the bytes the kernel has not taken, a handler that keeps getting on_read
    while it is above the high water mark, and any reordering of the stream."""
    total = 32 << 20
    data = _randbytes(random.Random(32), total)
    factory, handlers = _collecting(type("Flood", (_Flood,), {"data": data}))
    r, a = echo_server(make_reactor, 1, factory=factory)
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    c.connect(a.address)
    c.settimeout(WAIT)
    got = bytearray()
    with c:
        wait_until(lambda: handlers, what="the server handler")
        h = handlers[0]

        def stall(marker):
            # Called just after the server's queue passed HIGH.  The client stops
            # reading: the queue may shrink only by what the kernel still takes,
            # and the kernel's buffers hold exactly the bytes not queued.
            wait_until(lambda: h.sent - h.pending_write_bytes == len(got) + _outq(h.fd) + _inq(c.fileno()),
                       what="pending_write_bytes to account for every byte not in the kernel")
            before = len(h.reads)
            c.sendall(marker)
            sent_markers.append(marker)
            unread = sum(map(len, sent_markers)) - before   # an earlier marker may still wait
            wait_until(lambda: _inq(h.fd) == unread, what="the marker in the server's socket")
            _round_trip(r, h)
            # The queue only shrank since it passed HIGH and is still above LOW:
            # reading had to stay paused the whole time.
            assert h.pending_write_bytes > h.LOW
            assert len(h.reads) == before, "on_read ran while the handler was above high water"

        sent_markers = []
        wait_until(lambda: h.pending_write_bytes > h.HIGH, what="the queue above high water")
        stall(b"one")
        stalled_twice = False
        recvs = 0
        while len(got) < total:
            chunk = c.recv(8192)
            if not chunk:
                break
            got += chunk
            recvs += 1
            if len(got) >= total // 2 and not stalled_twice and h.pending_write_bytes > h.HIGH:
                stalled_twice = True                # the server just refilled: stall again
                stall(b"two")
            if recvs % 32 == 0:
                time.sleep(0.0002)              # pace the reader a little (not for correctness)
        assert stalled_twice
        c.sendall(b"bye")
        assert c.recv(1) == b"", "no EOF after the stream"
        wait_until(lambda: h.closes, what="server handler closed")
    assert len(got) == total and bytes(got) == data
    assert bytes(h.reads) == b"onetwobye", "client bytes lost: reading never resumed"
    assert h.reads_while_queued == []
    assert h.HIGH < h.max_pending <= h.HIGH + h.CHUNK
    assert h.closes == 1


class _MeasuredEcho(Echo):
    """Echo that records its largest queue and any on_read that backpressure
    should have held back: above HIGH, or above LOW after passing HIGH (the
    queue only shrinks between reads, as only on_read writes)."""
    HIGH, LOW = goev.DEFAULT_HIGH_WATER, goev.DEFAULT_LOW_WATER
    max_pending = 0
    above_high = False
    early_reads = 0

    def on_open(self):
        _set_sndbuf(self.fd, 65536)         # a bounded kernel buffer: the queue, not the kernel, absorbs the flood
        return Echo.on_open(self)

    def on_read(self):
        if self.pending_write_bytes > (self.LOW if self.above_high else self.HIGH):
            self.early_reads += 1
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        self.write(data)
        self.max_pending = max(self.max_pending, self.pending_write_bytes)
        self.above_high = self.pending_write_bytes > self.HIGH
        return True


def test_echo_backpressure_bounds_memory(make_reactor):
    """A client sends 20 MiB without reading, then reads everything.  Without
    backpressure the echo handler would queue megabytes; with it the queue
    stays below high water + one read buffer, and every byte comes back in
    order once the client reads."""
    rbuf = 32768
    r = make_reactor(1, read_buffer_size=rbuf)
    factory, handlers = _collecting(_MeasuredEcho)
    a = goev.Acceptor(r, "127.0.0.1:0", factory)
    r.start()
    size = 20 << 20
    data = _randbytes(random.Random(20), size)
    with socket.create_connection(a.address, timeout=WAIT) as c:
        s = _Bg(c.sendall, data)
        wait_until(lambda: handlers and handlers[0].pending_write_bytes > goev.DEFAULT_HIGH_WATER,
                   what="the echo queue to pass high water (the client is not reading)")
        h = handlers[0]
        got = recv_exact(c, size)
        s.join()
        c.shutdown(socket.SHUT_WR)
        assert c.recv(1) == b""
    assert len(got) == size and got == data
    assert goev.DEFAULT_HIGH_WATER < h.max_pending <= goev.DEFAULT_HIGH_WATER + rbuf
    assert h.early_reads == 0


# =============================================================================
# Half-close, and bytes that arrived before a FIN or RST
# =============================================================================

class _AnswerAfterEOF(goev.IOHandle):
    """Collects the request until the peer's FIN, then answers in two parts
    (the second from a timer, well after EOF) and closes."""
    closes = 0

    def on_open(self):
        self.buf = bytearray()
        self.eofs = 0
        self.reads_after_eof = 0
        self.closes = 0
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        return True

    def on_read(self):
        if self.eofs:
            self.reads_after_eof += 1
        data = self.read()
        if data is None:
            return True
        if data:
            self.buf += data
            return True
        self.eofs += 1
        body = bytes(self.buf)
        self.write(b"LEN %d\n" % len(body))
        self.write(body[::-1] * 8)                # ~1.6 MiB: the flush spans many EV_OUT
        self.poller.call_later(0.02, self.finish, body)
        return True                               # keep the connection: we still write

    def finish(self, body):
        self.write(body.upper())
        self.close()

    def on_close(self):
        self.closes += 1
        self.destroy()


def test_peer_half_close_server_keeps_writing(make_reactor, npollers):
    """Client sends then shutdown(SHUT_WR).  The server sees end of stream
    once, keeps the connection to answer (also from a timer), and the client
    gets every byte then EOF.  Catches: closing on EOF, dropping writes after
    EOF, and re-polling a half-closed fd (on_read again and again)."""
    factory, handlers = _collecting(_AnswerAfterEOF)
    r, a = echo_server(make_reactor, npollers, factory=factory)
    body = _randbytes(random.Random(3), 200000)
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(body)
        c.shutdown(socket.SHUT_WR)
        got = recv_all(c)
    expect = b"LEN %d\n" % len(body) + body[::-1] * 8 + body.upper()
    assert len(got) == len(expect) and got == expect
    h = handlers[0]
    wait_until(lambda: h.closes, what="server on_close")
    _round_trip(r)
    assert h.eofs == 1 and h.reads_after_eof == 0
    assert h.error is None and h.closes == 1 and h.dropped_bytes == 0


class _Recorder(goev.IOHandle):
    events = ()
    def on_open(self):
        self.events = []
        self.buf = bytearray()
        self.error_at_eof = "unset"
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        return True

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if data:
            self.buf += data
            self.events.append("data")
            return True
        self.events.append("eof")
        self.error_at_eof = self.error
        return False

    def on_close(self):
        self.events.append("close")
        self.destroy()


@pytest.mark.parametrize("ending", ["fin", "rst"])
def test_bytes_before_fin_or_rst_are_delivered(make_reactor, npollers, ending):
    """The client connects, sends 50 kB and closes (FIN, or RST with
    SO_LINGER(1, 0)) before the reactor runs, so the server finds data and
    the FIN/RST queued together.  With a 4 KiB read buffer on_read must run
    about 13 times before end of stream; an implementation that acts on
    HUP/ERR first loses the bytes."""
    r = make_reactor(npollers, read_buffer_size=4096)
    factory, handlers = _collecting(_Recorder)
    a = goev.Acceptor(r, "127.0.0.1:0", factory)
    data = _randbytes(random.Random(50), 50000)
    c = socket.create_connection(a.address, timeout=WAIT)
    c.sendall(data)
    wait_until(lambda: _outq(c.fileno()) == 0, what="the server kernel to hold every byte")
    if ending == "rst":
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    r.start()
    wait_until(lambda: handlers and "close" in handlers[0].events, what="on_close")
    h = handlers[0]
    assert bytes(h.buf) == data, (len(h.buf), h.events, h.error_at_eof)
    assert h.events[-2:] == ["eof", "close"] and h.events.count("close") == 1
    assert h.events.count("data") >= len(data) // 4096
    if ending == "rst":
        assert isinstance(h.error_at_eof, ConnectionResetError)
    else:
        assert h.error_at_eof is None


# =============================================================================
# Faults in callbacks; on_open refusing
# =============================================================================

class _Boom(_TrackedEcho):
    count = 0

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        if b"boom" in bytes(data):
            raise RuntimeError("boom in handler")
        self.write(data)
        return True

    def __repr__(self):
        return "<Boom handler #%d>" % self.n


def test_exception_in_on_read_closes_only_that_connection(make_reactor, npollers, goev_log):
    """One handler raises in on_read: its connection closes (on_close once),
    the error is logged on "goev" with the handler's repr and the traceback,
    and the other connections (same poller or not) keep echoing."""
    seq = iter(range(100))

    def factory():
        h = _Boom()
        h.n = next(seq)
        made.append(h)
        return h
    made = []
    r, a = echo_server(make_reactor, npollers, factory=factory)
    clients = [socket.create_connection(a.address, timeout=WAIT) for _ in range(4)]
    try:
        for i, c in enumerate(clients):
            c.sendall(b"hello %d" % i)
            assert recv_exact(c, 7) == b"hello %d" % i
        wait_until(lambda: len(made) == 4)
        bad = made[0]
        clients[0].sendall(b"boom")
        assert recv_all(clients[0]) == b"", "the failing connection was not closed"
        wait_until(lambda: bad.closes, what="on_close of the failing handler")
        for i, c in enumerate(clients[1:], 1):
            msg = b"still here %d" % i * 1000
            c.sendall(msg)
            assert recv_exact(c, len(msg)) == msg
        _round_trip(r)
        assert bad.closes == 1
        assert [h.closes for h in made[1:]] == [0, 0, 0]
        errors = goev_log.errors()
        assert len(errors) == 1
        assert "<Boom handler #0>" in errors[0].getMessage()
        assert errors[0].exc_info and errors[0].exc_info[0] is RuntimeError
        assert isinstance(bad.error, RuntimeError)
    finally:
        for c in clients:
            c.close()


class _Refuse(goev.IOHandle):
    mode = "false"
    closes = 0

    def on_open(self):
        self.closes = 0
        self.fd_at_open = self.fd
        if self.mode.endswith("registered"):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
        if self.mode.startswith("raise"):
            raise ValueError("on_open refuses")
        return False

    def on_read(self):                      # must never run: the handler was refused
        self.read_called = True
        return True

    def on_close(self):
        self.closes += 1
        self.destroy()

    def __repr__(self):
        return "<Refuse %s>" % self.mode


@pytest.mark.parametrize("mode", ["false", "false-registered", "raise", "raise-registered"])
def test_on_open_refusing_closes_once(make_reactor, goev_log, mode):
    """on_open returning False or raising, before or after registering:
    on_close runs exactly once, the socket is closed (the client sees EOF),
    and a raise is logged with the handler's repr."""
    factory, handlers = _collecting(type("Refuse", (_Refuse,), {"mode": mode}))
    r, a = echo_server(make_reactor, 1, factory=factory)
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(b"data that must not reach on_read")
        try:
            rest = recv_all(c)
        except ConnectionResetError:      # unread data at close makes it an RST: also closed
            rest = b""
        assert rest == b""
    wait_until(lambda: handlers and handlers[0].closes, what="on_close")
    _round_trip(r)
    h = handlers[0]
    assert h.closes == 1 and h.fd == -1 and not hasattr(h, "read_called")
    if mode.startswith("raise"):
        msgs = [e.getMessage() for e in goev_log.errors()]
        assert len(msgs) == 1 and "<Refuse %s>" % mode in msgs[0]
    else:
        assert goev_log.errors() == []
    # The acceptor is unaffected: the next connection gets the same treatment.
    with socket.create_connection(a.address, timeout=WAIT) as c:
        assert recv_all(c) == b""
    wait_until(lambda: len(handlers) == 2 and handlers[1].closes == 1)


def test_factory_returning_garbage_is_logged_and_survived(make_reactor, goev_log):
    """A factory that returns a non-IOHandle, or raises: the connection is
    closed, the error logged, and the acceptor keeps accepting."""
    calls = []

    def factory():
        calls.append(1)
        if len(calls) == 1:
            return 42
        if len(calls) == 2:
            raise KeyError("factory broke")
        return Echo()
    r, a = echo_server(make_reactor, 1, factory=factory)
    for _ in range(2):
        with socket.create_connection(a.address, timeout=WAIT) as c:
            assert recv_all(c) == b""
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(b"works")
        assert recv_exact(c, 5) == b"works"
    msgs = [e.getMessage() for e in goev_log.errors()]
    assert len(msgs) == 2 and all("factory" in m for m in msgs)
    assert "42" in str(goev_log.errors()[0].exc_info[1])


# =============================================================================
# stop(): with live connections, twice, before start, from a callback, from a
# signal handler; the context manager
# =============================================================================

def test_stop_with_live_connections(make_reactor, npollers):
    """stop() from the test thread: every handler gets on_close once, every
    client sees EOF, every server fd is closed and every poller thread joined
    by the time stop() returns; a second stop() is a no-op."""
    fds_before = set(os.listdir("/proc/self/fd"))
    factory, handlers = _collecting(_TrackedEcho)
    r, a = echo_server(make_reactor, npollers, factory=factory)
    clients = [socket.create_connection(a.address, timeout=WAIT) for _ in range(12)]
    try:
        for i, c in enumerate(clients):
            c.sendall(b"x%d" % i)
            assert recv_exact(c, len(b"x%d" % i)) == b"x%d" % i
        wait_until(lambda: len(handlers) == 12)
        client_fds = {str(c.fileno()) for c in clients}
        r.stop(timeout=WAIT)
        assert r.stopped and "stopped" in repr(r)
        assert not [t for t in threading.enumerate() if t.name.startswith("goev-poller")]
        left = set(os.listdir("/proc/self/fd")) - fds_before - client_fds
        left = {fd for fd in left if os.path.exists("/proc/self/fd/" + fd)}   # listdir's own fd
        assert not left, "fds still open after stop(): %r" % left
        assert [h.closes for h in handlers] == [1] * 12
        for c in clients:
            assert recv_all(c) == b""
        r.stop()
        r.stop(timeout=0)
        assert [h.closes for h in handlers] == [1] * 12
        with pytest.raises(RuntimeError):
            r.start()
    finally:
        for c in clients:
            c.close()


def test_stop_before_start(make_reactor):
    """stop() before start(): the listener is closed (connect refused), the
    reactor is stopped for good, and stop() again is harmless."""
    r = make_reactor(2)
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    addr = a.address
    assert "idle" in repr(r)
    r.stop()
    assert r.stopped and a.closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr, timeout=WAIT).close()
    r.stop()
    with pytest.raises(RuntimeError):
        r.start()
    with pytest.raises(RuntimeError):
        r.run()
    with pytest.raises(RuntimeError):
        goev.Acceptor(r, "127.0.0.1:0", Echo)


class _StopOnCommand(_TrackedEcho):
    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        if bytes(data) == b"stop":
            self.reactor.stop()              # must not wait for our own thread
            self.stop_returned = True
            return True
        self.write(data)
        return True


def test_stop_from_inside_a_callback(make_reactor, npollers):
    """stop() called from a handler's on_read returns at once (no self-join
    deadlock) and still stops every poller; every client sees EOF."""
    factory, handlers = _collecting(_StopOnCommand)
    r, a = echo_server(make_reactor, npollers, factory=factory)
    clients = [socket.create_connection(a.address, timeout=WAIT) for _ in range(5)]
    try:
        for c in clients:
            c.sendall(b"hi")
            assert recv_exact(c, 2) == b"hi"
        clients[2].sendall(b"stop")
        wait_until(lambda: r.stopped, what="every poller to stop")
        assert any(getattr(h, "stop_returned", False) for h in handlers)
        for c in clients:
            assert recv_all(c) == b""
        wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("goev-poller")],
                   what="poller threads to end")
        assert [h.closes for h in handlers] == [1] * 5
    finally:
        for c in clients:
            c.close()


_SIGNAL_CHILD = r"""
import signal, sys, goev
class E(goev.IOHandle):
    def on_read(self):
        d = self.read()
        if d is None:
            return True
        if not d:
            return False
        self.write(d)
        return True
    def on_close(self):
        closes.append(self)
        self.destroy()
closes = []
r = goev.Reactor(2, backend=sys.argv[1])
a = goev.Acceptor(r, "127.0.0.1:0", E)
signal.signal(signal.SIGTERM, lambda *_: r.stop())
print(a.address[1], flush=True)
r.run()
print("closed", len(closes), r.stopped, flush=True)
"""


def test_stop_from_signal_handler(backend):
    """A child runs reactor.run() in its main thread; SIGTERM's handler calls
    stop(): run() returns, the live connection gets on_close and EOF, and the
    process exits 0."""
    p = spawn_py(["-c", _SIGNAL_CHILD, backend])
    try:
        out = _Pipe(p.stdout)
        port = int(out.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
            c.sendall(b"ping")
            assert recv_exact(c, 4) == b"ping"
            p.send_signal(signal.SIGTERM)
            assert p.wait(WAIT) == 0, p.stderr.read()
            assert recv_all(c) == b""
        assert out.read_rest() == "closed 1 True\n"
    finally:
        stop_child(p, signal.SIGKILL)


def test_context_manager_closes_everything(backend):
    """`with Reactor() as r:` stops the reactor on exit (also on an exception,
    and also when it was never started): handlers closed, clients see EOF,
    listeners closed."""
    closes = []

    class H(Echo):
        def on_close(self):
            closes.append(self)
            self.destroy()
    with goev.Reactor(2, backend=backend) as r:
        a = goev.Acceptor(r, "127.0.0.1:0", H)
        addr = a.address
        r.start()
        c = socket.create_connection(a.address, timeout=WAIT)
        c.sendall(b"in with")
        assert recv_exact(c, 7) == b"in with"
    with c:
        assert r.stopped and a.closed
        assert recv_all(c) == b""
    assert len(closes) == 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr, timeout=WAIT).close()

    with pytest.raises(ZeroDivisionError):
        with goev.Reactor(backend=backend) as r2:
            a2 = goev.Acceptor(r2, "127.0.0.1:0", H)
            addr2 = a2.address
            r2.start()
            1 / 0
    assert r2.stopped and a2.closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr2, timeout=WAIT).close()

    with goev.Reactor(backend=backend) as r3:          # never started
        a3 = goev.Acceptor(r3, "127.0.0.1:0", H)
    assert r3.stopped and a3.closed


# =============================================================================
# close() / abort() / shutdown_write() / write after close
# =============================================================================

class _Commands(goev.IOHandle):
    """Runs one command sent by the client, records what it saw."""
    BIG = 1 << 20
    payload = b""
    closes = 0
    queued_at_call = None

    def on_open(self):
        _set_sndbuf(self.fd, 16384)     # so the payload is surely queued, not all in the kernel
        self.closes = 0
        self.queued_at_call = None
        self.after = bytearray()
        self.cmd = None
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        return True

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        if self.cmd == "shutdown":                # reading continues after shutdown_write
            self.after += data
            if self.after.endswith(b"END"):
                self.write(b"zzz")                # dropped: our side is shut
                return False
            return True
        self.cmd = bytes(data).decode()
        if self.cmd == "close":
            self.write(self.payload)
            self.queued_at_call = self.pending_write_bytes
            self.close()
            self.write(b"12345")                  # after close(): dropped, counted
        elif self.cmd == "close-empty":
            self.write(b"abc")
            self.queued_at_call = self.pending_write_bytes
            self.close()
            self.write(b"12345")
        elif self.cmd == "abort":
            self.write(self.payload)
            self.queued_at_call = self.pending_write_bytes
            self.abort()
        elif self.cmd == "shutdown":
            self.write(self.payload)
            self.queued_at_call = self.pending_write_bytes
            self.shutdown_write()
        return True

    def on_close(self):
        self.closes += 1
        self.destroy()


@pytest.fixture
def commands(make_reactor):
    payload = _randbytes(random.Random(4), _Commands.BIG)
    factory, handlers = _collecting(type("Commands", (_Commands,), {"payload": payload}))
    r, a = echo_server(make_reactor, 1, factory=factory)
    return r, a, handlers, payload


def test_close_flushes_queued_data(commands):
    """close() with megabytes queued: the client still gets every byte, then
    EOF; a write after close() is dropped and counted in dropped_bytes."""
    r, a, handlers, payload = commands
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(b"close")
        wait_until(lambda: handlers and handlers[0].queued_at_call is not None)
        got = recv_all(c)
    h = handlers[0]
    assert h.queued_at_call > 0, "nothing was queued: the test did not exercise the flush"
    assert len(got) == len(payload) and got == payload
    wait_until(lambda: h.closes)
    assert h.dropped_bytes == 5 and h.closes == 1


def test_write_after_close_is_dropped(commands):
    """close() with nothing queued closes at once; a write after it is not
    sent (the client sees only what came before, then EOF) but counted."""
    r, a, handlers, payload = commands
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(b"close-empty")
        assert recv_all(c) == b"abc"
    h = handlers[0]
    wait_until(lambda: h.closes)
    assert h.queued_at_call == 0 and h.dropped_bytes == 5 and h.closes == 1


def test_abort_drops_queue_and_resets(commands):
    """abort() with data queued: the queue is dropped (counted), and the
    client gets ECONNRESET instead of the whole payload."""
    r, a, handlers, payload = commands
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(b"abort")
        wait_until(lambda: handlers and handlers[0].closes, what="the aborted handler closed")
        got = bytearray()
        with pytest.raises(ConnectionResetError):
            while True:
                chunk = c.recv(1 << 20)
                if not chunk:
                    break                          # a clean EOF fails the raises() above
                got += chunk
    h = handlers[0]
    assert h.queued_at_call > 0
    assert len(got) < len(payload) and payload.startswith(bytes(got))
    assert h.dropped_bytes == h.queued_at_call and h.closes == 1


def test_shutdown_write_flushes_then_fin_and_keeps_reading(commands):
    """shutdown_write() with megabytes queued: the client gets every byte and
    then EOF, while the server still reads what the client sends after."""
    r, a, handlers, payload = commands
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(b"shutdown")
        got = recv_all(c)                          # EOF comes from the FIN after the flush
        assert len(got) == len(payload) and got == payload
        h = handlers[0]
        assert h.queued_at_call > 0 and not h.closed
        c.sendall(b"more data after the FIN ... END")
        wait_until(lambda: h.closes, what="the server to read the rest and close")
    assert bytes(h.after) == b"more data after the FIN ... END"
    assert h.dropped_bytes == 3 and h.closes == 1


# =============================================================================
# Address families: IPv6, unix paths, abstract unix names; Acceptor.close()
# =============================================================================

@pytest.mark.skipif(not _have_ipv6(), reason="no IPv6 loopback")
def test_ipv6_echo_and_address(make_reactor):
    """[::1]:0 binds IPv6 loopback; address is getsockname()'s 4-tuple."""
    r, a = echo_server(make_reactor, 1, addr="[::1]:0")
    addr = a.address
    assert len(addr) == 4 and addr[0] == "::1" and addr[1] > 0
    with socket.create_connection(("::1", addr[1]), timeout=WAIT) as c:
        c.sendall(b"six" * 30000)
        assert recv_exact(c, 90000) == b"six" * 30000


def _unix_echo(path):
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(WAIT)
        c.connect(path)
        msg = os.urandom(300000)
        s = _Bg(c.sendall, msg)
        got = recv_exact(c, len(msg))
        s.join()
        assert got == msg


def test_unix_socket_path(make_reactor, tmp_path):
    """Echo over a unix path; address is the path; the file is unlinked by
    Acceptor.close() and by the reactor's stop()."""
    path = str(tmp_path / "echo.sock")
    r, a = echo_server(make_reactor, 1, addr="unix:" + path)
    assert a.address == path
    _unix_echo(path)
    a.close()
    assert not os.path.exists(path)
    path2 = str(tmp_path / "echo2.sock")
    r2, a2 = echo_server(make_reactor, 1, addr="unix:" + path2)
    _unix_echo(path2)
    r2.stop(timeout=WAIT)
    assert not os.path.exists(path2)


def test_unix_socket_abstract(make_reactor):
    """unix:@name binds the abstract namespace (no file); address is the
    connectable "\\0name"; close() really stops listening."""
    name = "goev-test-%d-%d" % (os.getpid(), random.getrandbits(32))
    r, a = echo_server(make_reactor, 1, addr="unix:@" + name)
    assert a.address == "\0" + name
    _unix_echo("\0" + name)
    a.close()
    with socket.socket(socket.AF_UNIX) as c:
        with pytest.raises(ConnectionRefusedError):
            c.connect("\0" + name)


def test_unix_socket_path_conflicts(make_reactor, tmp_path):
    """A stale socket file is replaced; a regular file is a FileExistsError
    (and left untouched); a live server's path is EADDRINUSE (and the live
    server keeps working)."""
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()
    assert os.path.exists(stale)
    r, a = echo_server(make_reactor, 1, addr="unix:" + stale)
    _unix_echo(stale)

    regular = tmp_path / "regular"
    regular.write_bytes(b"keep me")
    with pytest.raises(FileExistsError) as ei:
        goev.Acceptor(r, "unix:" + str(regular), Echo)
    assert str(regular) in str(ei.value)
    assert regular.read_bytes() == b"keep me"

    with pytest.raises(OSError) as ei:
        goev.Acceptor(r, "unix:" + stale, Echo)
    assert ei.value.errno == errno.EADDRINUSE
    assert os.path.exists(stale)
    _unix_echo(stale)


def test_acceptor_close_stops_listening(make_reactor, npollers):
    """Acceptor.close() from the test thread: the next connect is refused,
    an established connection keeps working, and close() is idempotent."""
    r, a = echo_server(make_reactor, npollers)
    addr = a.address
    with socket.create_connection(addr, timeout=WAIT) as c:
        c.sendall(b"before")
        assert recv_exact(c, 6) == b"before"
        a.close()
        assert a.closed and a.address is None
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(addr, timeout=WAIT).close()
        c.sendall(b"after")
        assert recv_exact(c, 5) == b"after"
        a.close()


# =============================================================================
# Bad input: a clear ValueError/TypeError naming the value
# =============================================================================

BAD_ADDRESSES = [
    (":", ValueError, "':'"),
    ("1.2.3.4", ValueError, "'1.2.3.4'"),
    ("host:99999", ValueError, "99999"),
    ("[::1:80", ValueError, "'[::1:80'"),
    ("::1:80", ValueError, "'::1:80'"),
    (("h", "80"), TypeError, "'80'"),
    (42, TypeError, "42"),
    ("unix:", ValueError, "'unix:'"),
    ("127.0.0.1:-1", ValueError, "'127.0.0.1:-1'"),
    ("127.0.0.1:http", ValueError, "'127.0.0.1:http'"),
    (("127.0.0.1", 70000), ValueError, "70000"),
    ("unix:/" + "x" * 200, ValueError, "x" * 100),
]


@pytest.mark.parametrize("addr,exc,named", BAD_ADDRESSES, ids=[repr(b[0])[:20] for b in BAD_ADDRESSES])
def test_bad_address(make_reactor, addr, exc, named):
    """parse_address, Acceptor and Connector.connect all reject it at the call
    with an error whose message names the value (and leak no socket)."""
    with pytest.raises(exc) as ei:
        goev.parse_address(addr)
    assert named in str(ei.value)
    r = make_reactor()
    with pytest.raises(exc) as ei:
        goev.Acceptor(r, addr, Echo)
    assert named in str(ei.value)
    with pytest.raises(exc) as ei:
        goev.Connector(r).connect(addr, Echo(), 1000)
    assert named in str(ei.value)


def test_unresolvable_host_is_gaierror(make_reactor):
    """A name that does not resolve is socket.gaierror naming the host."""
    with pytest.raises(socket.gaierror) as ei:
        goev.parse_address("no-such-host.invalid:80")
    assert "no-such-host.invalid" in str(ei.value)
    r = make_reactor()
    with pytest.raises(socket.gaierror) as ei:
        goev.Acceptor(r, "no-such-host.invalid:80", Echo)
    assert "no-such-host.invalid" in str(ei.value)


@pytest.mark.parametrize("kw,exc,named", [
    (dict(pollers=0), ValueError, ("pollers", "0")),
    (dict(pollers=-3), ValueError, ("pollers", "-3")),
    (dict(pollers="2"), TypeError, ("pollers", "'2'")),
    (dict(pollers=2.0), TypeError, ("pollers", "2.0")),
    (dict(backend="nope"), ValueError, ("backend", "'nope'")),
    (dict(backend=None), TypeError, ("backend", "None")),
    (dict(read_buffer_size=-1), ValueError, ("read_buffer_size", "-1")),
    (dict(read_buffer_size=0), ValueError, ("read_buffer_size", "0")),
], ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__)
def test_bad_reactor_arguments(backend, kw, exc, named):
    """Each bad argument is rejected at the call with a message naming the
    argument and its value, and no fd is left behind (the hygiene fixture)."""
    kw = dict(kw)
    kw.setdefault("backend", backend)
    with pytest.raises(exc) as ei:
        goev.Reactor(kw.pop("pollers", 1), **kw)
    for n in named:
        assert n in str(ei.value), (n, str(ei.value))


def test_bad_acceptor_and_handler_arguments(make_reactor):
    """backlog < 1, a non-callable factory (or an instance), a non-Reactor,
    add_handler with a non-IOHandle, bad events or a bad fd: each rejected at
    the call, naming the value, and nothing half-registered."""
    r = make_reactor()
    with pytest.raises(ValueError) as ei:
        goev.Acceptor(r, "127.0.0.1:0", Echo, backlog=0)
    assert "backlog" in str(ei.value) and "0" in str(ei.value)
    with pytest.raises(TypeError) as ei:
        goev.Acceptor(r, "127.0.0.1:0", 42)
    assert "factory" in str(ei.value) and "42" in str(ei.value)
    inst = Echo()
    with pytest.raises(TypeError) as ei:
        goev.Acceptor(r, "127.0.0.1:0", inst)          # an instance, not a factory
    assert repr(inst) in str(ei.value)
    with pytest.raises(TypeError) as ei:
        goev.Acceptor("not a reactor", "127.0.0.1:0", Echo)
    assert "'not a reactor'" in str(ei.value)
    with socket.socket() as s:
        fd = s.fileno()
        with pytest.raises(TypeError) as ei:
            r.add_handler(object, fd, goev.EV_IN)
        assert "object" in str(ei.value)
        for bad in (0, goev.EV_ET, 0x100, "1"):
            with pytest.raises((ValueError, TypeError)) as ei:
                r.add_handler(Echo(), fd, bad)
            assert repr(bad) in str(ei.value)
        with pytest.raises((ValueError, TypeError)) as ei:
            r.add_handler(Echo(), -1, goev.EV_IN)
        assert "-1" in str(ei.value)
    # None of the rejected calls registered anything.
    assert all(not p._handlers for p in r.pollers)


# =============================================================================
# EMFILE: the acceptor pauses instead of spinning, and recovers
# =============================================================================

_EMFILE_CHILD = r"""
import logging, os, resource, sys, time, goev
warnings = []
class Count(logging.Handler):
    def emit(self, rec):
        if rec.levelno == logging.WARNING and "accept" in rec.getMessage():
            warnings.append(rec.getMessage())
logging.getLogger("goev").addHandler(Count())
opened = []
class E(goev.IOHandle):
    def on_open(self):
        opened.append(self)
        return goev.IOHandle.on_open(self)
    def on_read(self):
        d = self.read()
        if d is None:
            return True
        if not d:
            return False
        self.write(d)
        return True
r = goev.Reactor(1, backend=sys.argv[1])
a = goev.Acceptor(r, "127.0.0.1:0", E)
r.start()
fds = [int(x) for x in os.listdir("/proc/self/fd")]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(fds) + 1 + 4, hard))
print("PORT", a.address[1], flush=True)
deadline = time.monotonic() + 30
while not warnings and time.monotonic() < deadline:
    time.sleep(0.01)
n0 = len(warnings)
u0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.monotonic()
time.sleep(3.0)        # the measuring window (not for correctness)
u1 = resource.getrusage(resource.RUSAGE_SELF)
wall = time.monotonic() - t0
cpu = (u1.ru_utime - u0.ru_utime) + (u1.ru_stime - u0.ru_stime)
print("PAUSED", len(opened), n0, len(warnings) - n0, "%.3f" % cpu, "%.3f" % wall, flush=True)
sys.stdin.readline()
r.stop()
print("DONE", r.stopped, len(opened), flush=True)
"""


def test_emfile_pauses_accepting_and_recovers(backend):
    """A child server runs out of fds while 12 clients connect: the acceptor
    logs a warning per pause and retries on a timer (CPU stays low: a busy
    loop on the still-readable listener would burn a core), the accepted
    connections keep echoing, and once clients close new connections are
    accepted and echoed again."""
    p = spawn_py(["-c", _EMFILE_CHILD, backend], stdin=subprocess.PIPE)
    clients = []
    try:
        out = _Pipe(p.stdout)
        line = out.readline().split()
        assert line and line[0] == "PORT", line
        port = int(line[1])
        clients = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(12)]
        fields = out.readline(timeout=60).split()
        assert fields and fields[0] == "PAUSED", fields
        opened, first_warnings, more_warnings = int(fields[1]), int(fields[2]), int(fields[3])
        cpu, wall = float(fields[4]), float(fields[5])
        assert 1 <= opened < 12, "the fd limit did not bite"
        assert first_warnings >= 1
        # One warning per 100 ms retry at most (plus slack), never one per loop pass.
        assert more_warnings <= wall / 0.1 + 10, more_warnings
        assert cpu < 1.5, "acceptor spins while out of fds: %.2fs CPU in %.2fs" % (cpu, wall)
        # The connections accepted before the limit still echo.
        served = 0
        for c in clients:
            c.sendall(b"x")
        for c in clients[:opened]:
            if recv_exact(c, 1) == b"x":
                served += 1
        assert served == opened
        for c in clients:
            c.close()
        clients = []
        # Once the fds are freed, new connections are accepted and echoed.
        for i in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
                c.sendall(b"again %d" % i)
                assert recv_exact(c, 7) == b"again %d" % i
        p.stdin.write("\n")
        p.stdin.flush()
        assert out.readline().split()[:2] == ["DONE", "True"]
        assert p.wait(WAIT) == 0
    finally:
        for c in clients:
            c.close()
        stop_child(p, signal.SIGKILL)


# =============================================================================
# The command line: python -m goev echo ADDR
# =============================================================================

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_echo_serves_and_stops_on_signal(backend, sig):
    """`python -m goev echo 127.0.0.1:PORT` echoes, stops on SIGINT/SIGTERM
    with exit code 0 (no traceback), connected clients see EOF, and nothing
    is ever printed on stdout."""
    port = free_port()
    p = spawn_py(["-m", "goev", "echo", "127.0.0.1:%d" % port, "--backend", backend, "--pollers", "2"])
    try:
        err = _Pipe(p.stderr)
        banner = err.readline()                 # printed once the signal handlers are set
        assert str(port) in banner and backend in banner, banner
        clients = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(3)]
        try:
            for i, c in enumerate(clients):
                msg = os.urandom(100000 + i)
                s = _Bg(c.sendall, msg)
                assert recv_exact(c, len(msg)) == msg
                s.join()
            p.send_signal(sig)
            assert p.wait(WAIT) == 0
            for c in clients:
                assert recv_all(c) == b""
        finally:
            for c in clients:
                c.close()
        assert _Pipe(p.stdout).read_rest() == "", "the library printed on stdout"
        assert "Traceback" not in err.read_rest()
    finally:
        stop_child(p, signal.SIGKILL)


def test_cli_help():
    """--help exits 0 and documents the echo command and its options."""
    res = run_py(["-m", "goev", "--help"])
    assert res.returncode == 0 and "echo" in res.stdout
    res = run_py(["-m", "goev", "echo", "--help"])
    assert res.returncode == 0 and "ADDR" in res.stdout and "--pollers" in res.stdout


def _assert_one_line_exit_2(res, *named):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res
    assert len(lines) == 1, "expected one line on stderr, got %r" % res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    for n in named:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("addr", ["1.2.3.4", "127.0.0.1:99999", "[::1:80", "unix:"])
def test_cli_malformed_address(addr):
    """A malformed address: exit 2, exactly one line naming it, no traceback."""
    _assert_one_line_exit_2(run_py(["-m", "goev", "echo", addr]), addr)


def test_cli_port_in_use():
    """A port someone listens on: exit 2, one line naming the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        _assert_one_line_exit_2(run_py(["-m", "goev", "echo", "127.0.0.1:%d" % port]), str(port))


@pytest.mark.parametrize("args,named", [(["--pollers", "0"], "pollers"),
                                        (["--backend", "nope"], "nope")])
def test_cli_bad_option(args, named):
    """--pollers 0 and an unknown backend: exit 2, one line, no traceback."""
    _assert_one_line_exit_2(run_py(["-m", "goev", "echo", "127.0.0.1:0"] + args), named)


# =============================================================================
# Handler ergonomics: no super().__init__(), informative reprs
# =============================================================================

class _NoSuper(goev.IOHandle):
    """Defines __init__ with arguments and never calls super().__init__()."""

    def __init__(self, greeting):
        self.greeting = greeting
        self.seen = 0
        self.closes = 0

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        if not self.seen:
            self.write(self.greeting)
        self.seen += len(data)
        self.write(data)
        return True

    def on_close(self):
        self.closes += 1
        self.destroy()


def test_handler_without_super_init(make_reactor):
    """A subclass whose __init__ takes arguments and skips super().__init__()
    still has every IOHandle state: it echoes a megabyte and closes once."""
    factory, handlers = _collecting(_NoSuper, b"hello>")
    r, a = echo_server(make_reactor, 1, factory=factory)
    big = os.urandom(1 << 20)
    with socket.create_connection(a.address, timeout=WAIT) as c:
        s = _Bg(c.sendall, big)
        got = recv_exact(c, 6 + len(big))
        s.join()
        c.shutdown(socket.SHUT_WR)
        assert c.recv(1) == b""
    assert got == b"hello>" + big
    h = handlers[0]
    wait_until(lambda: h.closes)
    assert h.seen == len(big) and h.closes == 1 and h.fd == -1 and h.pending_write_bytes == 0


def test_reprs_are_informative(make_reactor):
    """Handler repr: class, fd, poller, peer, state (and queued bytes); Reactor
    repr: backend, poller count, state; Timer repr: when and how often."""
    factory, handlers = _collecting(_TrackedEcho)
    r = make_reactor(3)
    a = goev.Acceptor(r, "127.0.0.1:0", factory)
    rr = repr(r)
    assert r.backend in rr and "pollers=3" in rr and "idle" in rr
    r.start()
    assert "running" in repr(r)
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(b"x")
        assert recv_exact(c, 1) == b"x"
        h = handlers[0]
        text = repr(h)
        assert text.startswith("<_TrackedEcho ")
        assert "fd=%d" % h.fd in text and "poller=%d" % (h.fd % 3) in text
        assert str(c.getsockname()[1]) in text and "open" in text
        assert "Acceptor" in repr(a) and "fd=%d" % a.fd in repr(a)
    wait_until(lambda: h.closes == 1)
    assert "closed" in repr(h) and "fd=-1" in repr(h)

    t = r.call_later(60, lambda: None)
    assert re.fullmatch(r"<goev\.Timer in (59|60)\.\d+s>", repr(t)), repr(t)
    t.cancel()
    assert "done" in repr(t)
    r.stop(timeout=WAIT)
    assert "stopped" in repr(r)
