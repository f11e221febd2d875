"""The goev test suite: real sockets on loopback, real threads, real processes.

Every test that takes the ``backend`` fixture runs on both backends (epoll and
selectors); ``npollers`` adds 1 and 3 pollers where placement matters.  Each
test has a watchdog deadline, and after each test the harness checks that no
fd, thread or child process was left behind.  Nothing here asserts on timing
beyond generous timeouts.

Run:  python -m pytest -q test_goev.py
"""

import ast
import base64
import contextlib
import errno
import faulthandler
import fcntl
import gc
import hashlib
import http.client
import importlib.util
import logging
import math
import os
import pathlib
import pty
import queue
import random
import re
import resource
import shlex
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import weakref

import pytest

import goev

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_DEADLINE = 120          # seconds per test before the watchdog dumps stacks and exits
WAIT = 20.0                  # generous timeout for "this should happen soon"


# =============================================================================
# Harness: fixtures, leak checks and the helper kit
# =============================================================================
# Every test runs on each backend (the backend fixture) and, where placement
# matters, with 1 and 3 pollers (npollers).  hygiene checks after each test that no
# fd, thread or child process is left behind.  The helpers below are shared by
# several sections; a helper used by one section lives at the top of it.
#
# Tests use the public API wherever the behaviour is public.  Where a test must
# look inside, it uses these internals, and only for these reasons:
#   poller._post (on_poller)       run code on a poller's thread: the only place
#                                  its own state may be read without a race;
#   poller._handlers               is this fd registered (no public view of it);
#   poller._timers, _call_at,      the timer heap's invariants and bookkeeping
#     _timers_dead, _heap_*, ...   (section 5), which no public call exposes;
#   poller._backend                count the loop's passes (_PollCounter), or
#                                  make a backend call fail on purpose;
#   handler._sock, _paused, _state what close / pause left behind;
#   goev._proxy_parse, _tls_class, the parsers and the class swap, fed directly
#     HttpFeeder (goev._Http...)   (every split of the input, malformed corpora).


BACKENDS = ["epoll", "selectors"] if hasattr(__import__("select"), "epoll") else ["selectors"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test once per backend."""
    return request.param


@pytest.fixture(params=[1, 3], ids=["1poller", "3pollers"])
def npollers(request):
    """Runs the test with one poller and with several (fd % N placement)."""
    return request.param


def _open_fds():
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink("/proc/self/fd/%s" % name)
        except OSError:
            pass                         # the listdir fd itself
    return fds


def _children():
    kids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/children" % task) as f:
                kids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return kids


def wait_until(pred, timeout=WAIT, what="condition"):
    """Wait for ``pred()`` to become true (polling an observable state; a
    generous timeout, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


@pytest.fixture(autouse=True)
def hygiene():
    """Watchdog deadline + no leaked fds, threads or child processes."""
    faulthandler.dump_traceback_later(TEST_DEADLINE, exit=True)
    gc.collect()
    fds_before = _open_fds()
    threads_before = set(threading.enumerate())
    kids_before = _children()
    yield
    faulthandler.cancel_dump_traceback_later()
    gc.collect()

    def settled():
        return (set(threading.enumerate()) <= threads_before
                and set(_open_fds()) <= set(fds_before) and _children() <= kids_before)
    try:
        wait_until(settled, timeout=10, what="fds/threads/children to be released")
    except AssertionError:
        pass
    leaked_threads = set(threading.enumerate()) - threads_before
    assert not leaked_threads, "threads leaked: %r" % leaked_threads
    fds_after = _open_fds()
    leaked = {fd: fds_after[fd] for fd in set(fds_after) - set(fds_before)}
    assert not leaked, "fds leaked: %r" % leaked
    kids = _children() - kids_before
    assert not kids, "child processes left behind: %r" % kids


@pytest.fixture
def make_reactor(backend):
    """make_reactor(pollers=1, **kw) -> a Reactor on the test's backend, stopped at teardown."""
    made = []

    def make(pollers=1, **kw):
        r = goev.Reactor(pollers, backend=backend, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.stop(timeout=WAIT)
        assert r.stopped, "reactor did not stop: %r" % r


class LogCapture(logging.Handler):
    """Collects records of the "goev" logger (used to assert on error logs)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def errors(self):
        return [r for r in self.records if r.levelno >= logging.ERROR]


@pytest.fixture
def goev_log():
    h = LogCapture()
    log = logging.getLogger("goev")
    log.addHandler(h)
    yield h
    log.removeHandler(h)


@pytest.fixture
def debug_log(goev_log):
    """goev_log with the "goev" logger at DEBUG, so DEBUG records exist (quiet
    failures -- a bad PROXY header, a failed TLS handshake -- log there only)."""
    log = logging.getLogger("goev")
    old = log.level
    log.setLevel(logging.DEBUG)
    yield goev_log
    log.setLevel(old)


def need_tool(tool):
    """The path of a real client program; skip without it, but fail under CI
    (.ci/run installs every one the tests use)."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("%s is not installed (.ci/run installs it)" % tool)
        pytest.skip("%s is not installed" % tool)
    return path


def recv_exact(sock, n, timeout=WAIT):
    """Read exactly n bytes from a blocking client socket (b'' short if EOF)."""
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_all(sock, timeout=WAIT):
    """Read until EOF."""
    sock.settimeout(timeout)
    buf = bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(buf)
        buf += chunk


class Echo(goev.IOHandle):
    """The Go-shaped echo handler: on_read does its own read (DataEcho is the on_data one)."""

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        self.write(data)
        return True


def echo_server(make_reactor, pollers=1, addr="127.0.0.1:0", factory=Echo, **kw):
    r = make_reactor(pollers)
    a = goev.Acceptor(r, addr, factory, **kw)
    r.start()
    return r, a


def _child_env(extra):
    """A Python child's environment: goev importable, and faulthandler on, so a
    child that hangs prints its threads' stacks when finish() sends SIGABRT."""
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONFAULTHANDLER="1")
    env.update(extra)
    return env


def run_py(args, **kw):
    """Run a Python child process with goev importable; returns CompletedProcess."""
    env = _child_env(kw.pop("env", {}))
    return subprocess.run([sys.executable] + args, cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=kw.pop("timeout", 60), **kw)


def spawn_py(args, **kw):
    """Start a Python child with goev importable (stdout/stderr piped)."""
    env = _child_env(kw.pop("env", {}))
    return subprocess.Popen([sys.executable] + args, cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, host="127.0.0.1", timeout=WAIT):
    def up():
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            return False
    wait_until(up, timeout, "port %d to listen" % port)


def stop_child(proc, sig=signal.SIGTERM, timeout=WAIT):
    """Signal a child we started and reap it; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr, proc.stdin):
            if f:
                f.close()


# =============================================================================

# -- the helper kit: payloads, memory, echo checks, running code on a poller ----------

def random_bytes(n, seed=0):
    """``n`` random bytes, the same for the same seed (byte-exact checks)."""
    return random.Random(seed).randbytes(n)


def proc_status(pid, field):
    """A /proc/PID/status field in bytes (VmRSS: resident now, VmHWM: the peak)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


def rss_kib(pid):
    """Resident memory of a process, KiB."""
    return proc_status(pid, "VmRSS") // 1024


def echo_ok(address, data=b"ping"):
    """One round trip on a new connection: True if ``data`` comes back whole."""
    with socket.create_connection(address[:2], timeout=WAIT) as c:
        c.sendall(data)
        return recv_exact(c, len(data)) == data


def on_poller(poller, fn, *args):
    """Run fn(*args) on ``poller``'s thread and return its result (or raise it
    here).  Internals (poller._post): the tests that inspect a poller's own
    state (its timers, its handlers) must look from its thread."""
    box = queue.Queue()

    def run():
        try:
            box.put((True, fn(*args)))
        except BaseException as e:            # handed to the test thread
            box.put((False, e))
    poller._post(run)
    ok, val = box.get(timeout=WAIT)
    if not ok:
        raise val
    return val


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


def _core_collecting(cls, *args):
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


class _AnswerAtEof(goev.IOHandle):
    """Collects the request; answers at end of stream, then closes (a half-close)."""

    def __init__(self):
        self.got = b""
        self.errors = []

    def on_data(self, data):
        self.got += bytes(data)
        return False                      # ignored: on_data's return value never closes

    def on_eof(self):
        self.errors.append(self.error)
        self.write(b"got %d bytes" % len(self.got))
        self.close()


def _start_program(source, env=None):
    """Run ``source`` (listening on 127.0.0.1:8080, rewritten to a free port)
    in a child; returns (process, port) once it accepts connections."""
    port = free_port()
    assert "127.0.0.1:8080" in source
    p = spawn_py(["-c", source.replace("127.0.0.1:8080", "127.0.0.1:%d" % port)], env=env or {})
    try:
        wait_port(port)
    except AssertionError:
        stop_child(p, signal.SIGKILL)
        raise
    return p, port


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
    payload = random_bytes(_Commands.BIG, seed=4)
    factory, handlers = _core_collecting(type("Commands", (_Commands,), {"payload": payload}))
    r, a = echo_server(make_reactor, 1, factory=factory)
    return r, a, handlers, payload


def _assert_one_line_exit_2(res, *named):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res
    assert len(lines) == 1, "expected one line on stderr, got %r" % res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    for n in named:
        assert n in lines[0], (n, lines[0])


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


def read_response(f, head=False):
    """One response from the binary file ``f``: (status, {lowercase name: value}, body),
    or None at EOF.  ``head``: the answer to a HEAD (no body whatever the length)."""
    line = f.readline()
    if not line:
        return None
    assert line.startswith(b"HTTP/1.1 "), line
    status = int(line.split()[1])
    fields = {}
    while True:
        line = f.readline()
        assert line, "EOF inside a response head"
        if line == b"\r\n":
            break
        name, colon, value = line.partition(b":")
        assert colon, line
        fields[name.strip().lower().decode()] = value.strip().decode()
    body = b""
    if not head and status >= 200:
        body = f.read(int(fields.get("content-length", "0")))
    return status, fields, body


def _connector_on_poller():
    return threading.current_thread().name.startswith("goev-poller")


class Probe(goev.IOHandle):
    """Records on_open / on_connect_fail / on_close, and on which thread."""

    def __init__(self, greeting=b""):
        self.events = []
        self.threads = []
        self.err = None
        self.greeting = greeting
        # bytes, not a bytearray: the test thread reads .got while the poller appends;
        # a bytearray being copied cannot be resized (BufferError on free-threaded builds)
        self.got = b""
        self.settled = threading.Event()    # on_open or on_connect_fail ran
        self.closed_ev = threading.Event()

    def on_open(self):
        self.events.append("open")
        self.threads.append(_connector_on_poller())
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        if self.greeting:
            self.write(self.greeting)
        self.settled.set()
        return True

    def on_connect_fail(self, err):
        self.events.append("fail")
        self.threads.append(_connector_on_poller())
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
        self.destroy()                 # first: a waiter may check fd == -1 at once
        self.closed_ev.set()


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


def http_raw(port, payload, until=None):
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(payload)
        if until is None:
            s.shutdown(socket.SHUT_WR)
            return recv_all(s)
        buf = b""
        while buf.count(b"Hello, World!") < until:
            chunk = s.recv(65536)
            assert chunk, "server closed early: %r" % buf
            buf += chunk
        return buf


# -- trace mode ------------------------------------------------------------------------

ECHO_SRC = '''
class Echo(goev.IOHandle):
    def on_read(self):
        d = self.read()
        if d is None:
            return True
        self.write(d)
        return bool(d)
'''    # an echo handler (on_read), for the trace-mode child scripts


def _stderr_file():
    return tempfile.TemporaryFile(mode="w+")


def _park(poller):
    """Block ``poller``'s thread until the returned Event is set: I/O that happens
    meanwhile is reported to it in one batch when it polls again."""
    started, release = threading.Event(), threading.Event()

    def block():
        started.set()
        release.wait(WAIT)
    poller._post(block)
    assert started.wait(WAIT)
    return release


class _PollCounter:
    """Stands in for a poller's backend and counts the loop's passes (its poll
    calls): the evidence that a loop sleeps or spins, whatever the machine's
    speed or load.  (Internals: the loop has no public pass counter.)"""

    def __init__(self, backend):
        self._backend = backend
        self.polls = 0

    def poll(self, timeout):
        self.polls += 1
        return self._backend.poll(timeout)

    def __getattr__(self, name):
        return getattr(self._backend, name)


def _count_polls(r):
    """Count every poller's passes; call before r.start() (the loop binds poll once)."""
    for p in r.pollers:
        p._backend = _PollCounter(p._backend)


def _idle_passes(poller, seconds=0.6):
    """How many times ``poller``'s loop goes round in ``seconds`` in which
    nothing should happen: an idle loop sleeps in poll() (a pass or two), a
    spinning one goes round thousands of times.  A window, not a deadline."""
    n0 = poller._backend.polls
    time.sleep(seconds)
    return poller._backend.polls - n0


_SPINNING = 50          # passes in an idle window that mean a busy loop (idle: 0-2)


def _reliability_collecting(cls):
    """A factory for ``cls`` that also puts each handler on a queue when it opens."""
    got = queue.Queue()

    class H(cls):
        def on_open(self):
            ok = super().on_open()
            got.put(self)
            return ok
    H.__name__ = cls.__name__
    return H, got


def _registered(h):
    return h.poller is not None and h.poller._handlers.get(h.fd) is h


def _connect_pair(a, got):
    """A client socket and its server-side handler, registered."""
    c = socket.create_connection(a.address, timeout=WAIT)
    h = got.get(timeout=WAIT)
    wait_until(lambda: _registered(h), what="registration")
    return c, h


class _RawReader(goev.IOHandle):
    """A handler on a raw fd (a pipe or socket end the test owns): reads with os.read."""

    def __init__(self, close_fd_on_read=False):
        # bytes, not a bytearray: the test thread reads .got while the poller appends;
        # a bytearray being copied cannot be resized (BufferError on free-threaded builds)
        self.got = b""
        self.reads = 0
        self.closes = 0
        self.close_fd_on_read = close_fd_on_read

    def on_read(self):
        self.reads += 1
        if self.close_fd_on_read:
            os.close(self.fd)                 # behind the loop's back
            self.close_fd_on_read = False
            return False
        try:
            d = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        self.got += d
        return bool(d)

    def on_close(self):
        self.closes += 1                      # the fd belongs to the test: not closed here


def _eof_or_reset(sock):
    """True when the peer closed: EOF, or a reset (it closed with data unread)."""
    try:
        return recv_all(sock) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def kids():
    """Child processes started by the test; any still running at teardown is
    killed (by PID) and reaped, so a failing test leaves nothing behind."""
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        try:
            p.communicate(timeout=WAIT)
        except (ValueError, OSError, subprocess.TimeoutExpired):
            p.wait()


# HEAD, Content-Length and chunked bodies, the Connection list, Host and control
# bytes, the head and idle timeouts, and a corpus of malformed requests: each
# against a real `python -m goev http` process, or the handler fed one read at a
# time in-process.

# -- the server process -------------------------------------------------------------------

def _http_die_with_us():
    """In the child, before exec: SIGKILL it if this process dies (the deadline's
    watchdog exits hard), so no server outlives the tests (Linux)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG
    except Exception:
        pass


class HttpCliServer:
    """``python -m goev http 127.0.0.1:0 *args`` from GOEV_DIR; stderr is collected
    by a thread (ready: the line naming the port)."""

    def __init__(self, *args):
        env = dict(os.environ, PYTHONPATH=HERE, PYTHONFAULTHANDLER="1")
        env.pop("GOEV_TRACE", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "goev", "http", "127.0.0.1:0"] + list(args),
                                     cwd=HERE, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=_http_die_with_us if sys.platform.startswith("linux") else None)
        self.lines = []
        self.port = None
        self.ready = threading.Event()
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()
        if not self.ready.wait(WAIT) or self.port is None:
            err = self.stop()
            raise AssertionError("the server did not start: %s" % err)

    def _pump(self):
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            m = re.search(r"server on \('127\.0\.0\.1', (\d+)\)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self.ready.set()
        self.ready.set()                           # EOF: it died (or stopped)

    @property
    def stderr(self):
        return "".join(self.lines)

    def stop(self):
        """SIGTERM by PID, reap (SIGKILL after WAIT); returns stderr."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.pump.join(WAIT)
            self.proc.stderr.close()
        return self.stderr

    def connect(self):
        return socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)


def _http_cli_serve(*args):
    s = HttpCliServer(*args)
    try:
        yield s
    finally:
        err = s.stop()
        assert "Traceback" not in err, err
        assert s.proc.returncode == 0, err


http_cli_serving = contextlib.contextmanager(_http_cli_serve)


# -- client helpers (and read_response, above) -------------------------------------------

def http_exchange(srv, payload, half_close=True):
    """Send ``payload`` on a new connection (then half-close); return every byte the
    server sent until it closed.  A reset counts as a close."""
    with srv.connect() as s:
        try:
            s.sendall(payload)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:                            # EPIPE, ECONNRESET, ENOTCONN: closed already
            pass
        out = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)


HTTP_GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


# =============================================================================
# 3. Small helpers: addresses, sockets, logging
# =============================================================================
# Address parsing: every accepted form, and mistakes answered with a message
# that says what to do.


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


ADDRESS_MISTAKES = [
    ("http://127.0.0.1:8080", ["is a URL", "scheme, not an address", "did you mean '127.0.0.1:8080'",
                               "'unix:/path'"]),
    ("https://example.com/x", ["is a URL", "did you mean 'example.com:443'"]),
    ("127.0.0.1:-1", ["port -1 out of range 0..65535"]),
    ("8080", ["has no port; did you mean ':8080'", "'127.0.0.1:8080'"]),
    ("localhost", ["has no port", "'[::1]:8080'"]),
    ("127.0.0.1:http", ["port 'http'", "is not a number", "'localhost:8080'"]),
]


@pytest.mark.parametrize("addr,says", ADDRESS_MISTAKES, ids=[m[0] for m in ADDRESS_MISTAKES])
def test_address_mistake_message_says_what_to_do(make_reactor, addr, says):
    """A URL, a negative port, a bare port or a host without one: the ValueError
    names the mistake and the fix (the address meant, or the accepted forms)."""
    r = make_reactor()
    with pytest.raises(ValueError) as ei:
        goev.Acceptor(r, addr, Echo)
    for s in says:
        assert s in str(ei.value), (s, str(ei.value))


def test_unresolvable_host_is_gaierror(make_reactor):
    """A name that does not resolve is socket.gaierror naming the host."""
    with pytest.raises(socket.gaierror) as ei:
        goev.parse_address("no-such-host.invalid:80")
    assert "no-such-host.invalid" in str(ei.value)
    r = make_reactor()
    with pytest.raises(socket.gaierror) as ei:
        goev.Acceptor(r, "no-such-host.invalid:80", Echo)
    assert "no-such-host.invalid" in str(ei.value)


# =============================================================================
# 4. Poller backends: epoll, selectors, and the waker
# =============================================================================
# Registration against the kernel: fd reuse (epoll keeps the open file
# description, not the number), fds closed behind the loop, regular files,
# fds above FD_SETSIZE, spurious readiness, signals and EINTR, fork.


def _close_on(poller, h, how="close"):
    """Close ``h`` on its poller and return once its on_close ran (end of pass)."""
    on_poller(poller, getattr(h, how))
    on_poller(poller, lambda: None)          # runs in a later pass: closes are finished


class _Counting(Echo):
    """Echo that counts its callbacks."""

    def on_open(self):
        self.n_read = self.n_write = self.n_close = 0
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        return True

    def on_read(self):
        self.n_read += 1
        return super().on_read()

    def on_write(self):
        self.n_write += 1
        return super().on_write()

    def on_close(self):
        self.n_close += 1
        self.destroy()


def test_unregister_after_fd_close_and_dup2_reuse(make_reactor):
    """A handler whose fd was closed behind the loop's back is
    still closed cleanly (unregister does not raise, on_close once); and when the
    fd number is replaced with dup2 while registered, closing the old handler
    succeeds and a new handler on the same number gets only the new file's data."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    # 1: close behind the back, then let goev close the handler
    rd, wr = os.pipe()
    a = _RawReader()
    r.add_handler(a, rd, goev.EV_IN)
    wait_until(lambda: _registered(a))
    os.close(rd)
    os.close(wr)
    _close_on(p, a)
    assert a.closes == 1 and rd not in p._handlers
    # 2: dup2 a new pipe onto a registered number
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        b = _RawReader()
        r.add_handler(b, r1, goev.EV_IN)
        wait_until(lambda: _registered(b))
        os.dup2(r2, r1)                      # r1 now names pipe 2; pipe 1's read end is gone
        _close_on(p, b)
        assert b.closes == 1 and r1 not in p._handlers
        c = _RawReader()
        r.add_handler(c, r1, goev.EV_IN)
        os.write(w2, b"new owner")
        wait_until(lambda: bytes(c.got) == b"new owner", what="data for the new owner")
        assert not b.got and b.reads == 0
        _close_on(p, c)
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    assert echo_ok(goev.Acceptor(r, "127.0.0.1:0", Echo).address)


def test_event_for_handler_closed_earlier_in_batch_is_dropped(make_reactor):
    """Two connections become
    readable in one batch; whichever runs first closes the other and opens a new
    socket.  The closed one never gets its pending event, the new socket cannot
    get the closed one's fd number during the batch (the real close(fd) waits
    for the batch end), and the closed handler gets on_close exactly once."""
    H, got = _reliability_collecting(_Counting)
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c1, h1 = _connect_pair(a, got)
    c2, h2 = _connect_pair(a, got)
    seen = {}

    def killer(self_h, other):
        def on_read():
            if "first" in seen:
                seen.setdefault("late", []).append(self_h)
                return True
            seen["first"] = self_h
            seen["other_fd"] = other.fd
            other.close()
            s = socket.socket()
            seen["new_fd"] = s.fileno()
            seen["other_fd_open"] = _fd_open(other.fd)
            s.close()
            return Echo.on_read(self_h)
        return on_read
    h1.on_read = killer(h1, h2)
    h2.on_read = killer(h2, h1)
    release = _park(r.pollers[0])
    c1.sendall(b"x")
    c2.sendall(b"y")
    wait_until(lambda: _inq(h1.fd) == 1 and _inq(h2.fd) == 1,   # both in one batch
               what="both bytes in the server sockets before the poller looks")
    release.set()
    wait_until(lambda: "first" in seen, what="the first on_read")
    first = seen["first"]
    other = h2 if first is h1 else h1
    wait_until(lambda: other.n_close == 1, what="on_close of the closed one")
    on_poller(r.pollers[0], lambda: None)    # one more pass
    assert "late" not in seen, "event delivered to a handler closed earlier in the batch"
    assert seen["new_fd"] != seen["other_fd"] and seen["other_fd_open"]
    assert other.n_close == 1
    (c1 if first is h1 else c2).settimeout(WAIT)
    assert (c1 if first is h1 else c2).recv(10) in (b"x", b"y")
    assert _eof_or_reset(c2 if first is h1 else c1)   # closed with "y" unread: RST
    c1.close()
    c2.close()


def _fd_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("how", ["returns_false", "dup_then_reuse"])
def test_fd_closed_behind_the_loops_back_no_busy_loop(make_reactor, goev_log, how):
    """A handler closes its own fd with os.close() behind the
    loop's back while a dup() keeps the file description alive (so epoll still
    holds a registration goev can no longer remove by number), and the peer keeps
    sending.  The loop must not wedge or busy-loop (the loop sleeps: few passes), the
    handler gets on_close once, and a new handler later given the same fd number
    (dup2) receives exactly its own data."""
    r = make_reactor(1)
    _count_polls(r)
    r.start()
    p = r.pollers[0]
    s1, s2 = socket.socketpair()
    keep = os.dup(s1.fileno())               # the dup that keeps the description alive
    num = os.dup(s1.fileno())
    s1.close()
    h = _RawReader(close_fd_on_read=True)
    r.add_handler(h, num, goev.EV_IN)
    wait_until(lambda: _registered(h))
    s2.sendall(b"a")
    wait_until(lambda: h.closes == 1, what="on_close")
    s2.sendall(b"more data nobody reads" * 100)   # level-triggered: reported forever if registered
    passes = _idle_passes(p)
    assert passes < _SPINNING, "%d passes of the loop in 0.6 s: busy loop on a stale fd" % passes
    if how == "dup_then_reuse":
        n1, n2 = socket.socketpair()         # (may itself get the freed number)
        if n2.fileno() == num:
            n1, n2 = n2, n1
        if n1.fileno() == num:
            n1.detach()
        else:
            os.dup2(n1.fileno(), num)        # the old number now names a new socket
            n1.close()
        c = _RawReader()
        r.add_handler(c, num, goev.EV_IN)
        n2.sendall(b"mine")
        wait_until(lambda: bytes(c.got) == b"mine", what="the new owner's data")
        passes = _idle_passes(p)
        assert passes < _SPINNING, "%d passes: stale registration fires for the new owner" % passes
        assert bytes(c.got) == b"mine"                  # (and nothing else, in that window)
        _close_on(p, c)
        os.close(num)
        n2.close()
    assert h.closes == 1 and h.reads == 1
    assert not [rec for rec in goev_log.errors() if "callback" in rec.getMessage()]
    os.close(keep)
    s2.close()
    assert echo_ok(goev.Acceptor(r, "127.0.0.1:0", Echo).address)


def test_stale_close_of_a_finished_handler_spares_the_new_owner(make_reactor):
    """Once a handler is closed, every late call on it (close, abort,
    destroy, shutdown_write, write, async_write) is a no-op even after its fd
    number went to a new connection: the new owner keeps echoing and receives
    nothing of the old one's.  Also: destroy() on a *registered* handler (the
    public "release the socket" call) first takes it off the poller, so its
    number can be reused and no stale entry blocks the next registration."""
    H, got = _reliability_collecting(Echo)
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c1, old = _connect_pair(a, got)
    old_fd = old.fd
    c1.close()
    wait_until(lambda: old.closed and old.fd == -1, what="old handler closed")
    for _ in range(20):                       # the lowest free number: the old one, normally
        c2, new = _connect_pair(a, got)
        if new.fd == old_fd:
            break
        c2.close()
    else:
        pytest.skip("fd number %d was not reused" % old_fd)
    for call in (old.close, old.abort, old.destroy, old.shutdown_write,
                 lambda: old.write(b"STALE"), lambda: old.async_write(b"STALE")):
        call()
        on_poller(r.pollers[0], call)
    c2.sendall(b"hello")
    assert recv_exact(c2, 5) == b"hello"
    c2.settimeout(0.2)
    with pytest.raises(socket.timeout):
        c2.recv(10)                           # nothing stale arrives
    # destroy() while registered: leaves the poller first
    on_poller(r.pollers[0], new.destroy)
    assert recv_all(c2) == b""
    assert old_fd not in r.pollers[0]._handlers
    c2.close()
    for _ in range(20):
        c3, h3 = _connect_pair(a, got)
        ok = recv_exact(c3, 0) == b"" and (c3.sendall(b"z") or recv_exact(c3, 1) == b"z")
        c3.close()
        assert ok
        if h3.fd == old_fd:
            break


def test_register_regular_file(make_reactor, tmp_path):
    """Registering a regular file: epoll refuses it (PermissionError
    at the call) and the bookkeeping is rolled back, so the fd can be registered
    again later; the selectors backend (poll) accepts it as always readable."""
    r = make_reactor(1)
    r.start()
    path = tmp_path / "f"
    path.write_bytes(b"file data")
    fd = os.open(str(path), os.O_RDONLY)
    try:
        h = _RawReader()
        if r.backend == "epoll":
            with pytest.raises(PermissionError):
                r.add_handler(h, fd, goev.EV_IN)
            assert fd not in r.pollers[0]._handlers and h.poller is None
        else:
            r.add_handler(h, fd, goev.EV_IN)
            wait_until(lambda: h.closes == 1, what="EOF of the file")
            assert bytes(h.got) == b"file data"
            assert fd not in r.pollers[0]._handlers
    finally:
        os.close(fd)
    assert echo_ok(goev.Acceptor(r, "127.0.0.1:0", Echo).address)


def _raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return soft, hard, max(new, soft)


def test_fds_above_fd_setsize(make_reactor):
    """Fds numbered far above FD_SETSIZE (1024) are registered and
    served (select() could not; epoll and poll() can): 1500 socketpairs on one
    reactor with 2 pollers, every one echoes its own bytes."""
    soft, hard, now = _raise_nofile(4200)
    if now < 3300:
        pytest.skip("RLIMIT_NOFILE hard limit %d too low" % hard)
    pairs, handlers = [], []
    try:
        r = make_reactor(2)
        r.start()

        class E(Echo):
            pass
        for i in range(1500):
            a, b = socket.socketpair()
            a.setblocking(False)
            h = E()
            h._sock = a                        # a socket goev did not create: hand it over
            h.fd = a.fileno()
            h.reactor = r
            r.add_handler(h, a.fileno(), goev.EV_IN)
            pairs.append((a, b))
            handlers.append(h)
        assert max(a.fileno() for a, _ in pairs) > 1024
        for i, (_, b) in enumerate(pairs):
            b.sendall(b"%d;" % i)
        for i, (_, b) in enumerate(pairs):
            want = b"%d;" % i
            assert recv_exact(b, len(want)) == want
    finally:
        r.stop(timeout=WAIT)
        for a, b in pairs:
            a.close()
            b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_read_only_handler_never_sees_write(make_reactor):
    """A handler registered for EV_IN only is never called with
    on_write, although its socket is writable the whole time."""
    H, got = _reliability_collecting(_Counting)
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c, h = _connect_pair(a, got)
    for i in range(50):
        c.sendall(b"m%d" % i)
        recv_exact(c, len(b"m%d" % i))
    on_poller(h.poller, lambda: None)
    assert h.n_write == 0 and h.n_read >= 1
    c.close()
    # A reset (the kernel reports IN|HUP|ERR): still only on_read, then on_close.
    c, h = _connect_pair(a, got)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    wait_until(lambda: h.n_close == 1, what="closed after the reset")
    assert h.n_write == 0 and h.n_read >= 1


def test_spurious_readiness_and_idempotent_removal(make_reactor):
    """Read() with nothing ready returns None (the handler
    stays open); remove_event twice is harmless, append_event restores reading;
    a second add_handler of a live handler is refused; closing twice is one close."""
    H, got = _reliability_collecting(_Counting)
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c, h = _connect_pair(a, got)
    p = h.poller
    assert on_poller(p, h.read) is None and not h.closed
    r.remove_event(h.fd, goev.EV_IN)
    r.remove_event(h.fd, goev.EV_IN)
    on_poller(p, lambda: None)
    c.sendall(b"held")
    wait_until(lambda: _inq(h.fd) == 4, what="the bytes in the server socket")
    for _ in range(2):                        # a whole pass with them readable (posted
        on_poller(p, lambda: None)   # work runs before the pass's events)
    assert h.n_read == 0                      # not polled for reading any more
    r.append_event(h.fd, goev.EV_IN)
    assert recv_exact(c, 4) == b"held"
    with pytest.raises(ValueError):
        r.add_handler(h, h.fd, goev.EV_IN)
    on_poller(p, h.close)
    on_poller(p, h.close)
    assert recv_all(c) == b""
    assert h.n_close == 1
    with pytest.raises(ValueError):
        on_poller(p, r.remove_event, 10 ** 6, goev.EV_IN)
    c.close()


def test_add_close_churn_same_fd(make_reactor):
    """300 rounds of register, close at once (on the poller and
    from this thread), reusing fd numbers: every handler gets on_close once and
    the table ends empty; the next connection on a reused number is served."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    hs = []
    for i in range(300):
        a, b = socket.socketpair()
        a.setblocking(False)
        h = _Counting()
        h.n_read = h.n_write = h.n_close = 0
        h._sock = a
        h.fd = a.fileno()
        h.reactor = r
        r.add_handler(h, a.fileno(), goev.EV_IN | (goev.EV_OUT if i % 2 else 0))
        if i % 3:
            h.close()
        else:
            on_poller(p, h.close)
        b.close()
        hs.append(h)
    on_poller(p, lambda: None)
    wait_until(lambda: all(h.n_close == 1 for h in hs), what="every on_close")
    assert not [fd for fd in p._handlers if fd != -1 and not isinstance(p._handlers[fd], goev.Acceptor)]
    assert echo_ok(goev.Acceptor(r, "127.0.0.1:0", Echo).address)


def test_setitimer_storm_no_eintr(make_reactor, goev_log):
    """Run() on the main thread under a 1 ms SIGALRM storm (each
    signal interrupts epoll_wait/poll and the I/O calls): no InterruptedError
    escapes, echo of 2 MiB and timers work, and the loop ends normally."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals need the main thread")
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    hits = [0]
    old = signal.signal(signal.SIGALRM, lambda *_: hits.__setitem__(0, hits[0] + 1))
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    payload = random_bytes(2 << 20, 60)
    out = {}

    def client():
        try:
            with socket.create_connection(a.address, timeout=WAIT) as c:
                t = threading.Thread(target=c.sendall, args=(payload,))
                t.start()
                out["got"] = recv_exact(c, len(payload))
                t.join()
        finally:
            r.call_later(0.3, r.stop)
    ticks = []
    r.call_later(0.01, lambda: ticks.append(1))
    t = threading.Thread(target=client)
    try:
        t.start()
        r.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
        t.join(WAIT)
    assert out.get("got") == payload and ticks == [1]
    assert hits[0] > 10
    assert not goev_log.errors()


def test_wakeup_fd_left_alone(backend):
    """A reactor's life (create, run, stop) leaves the signal
    wakeup fd as it found it (goev never takes it over)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("set_wakeup_fd needs the main thread")
    a, b = socket.socketpair()
    a.setblocking(False)
    old = signal.set_wakeup_fd(a.fileno())
    try:
        r = goev.Reactor(2, backend=backend)
        r.call_later(0.01, r.stop)
        r.run()
        assert signal.set_wakeup_fd(a.fileno()) == a.fileno()
    finally:
        signal.set_wakeup_fd(old)
        a.close()
        b.close()


_FORK_CHILD_CHECK = 0


# Forking a process whose reactor threads run is the point of this test
# (Python 3.12+ warns about exactly that).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_child_builds_its_own_reactor(make_reactor, npollers):
    """A process with a running reactor (background pollers,
    live connections) forks.  The child does not share the parent's loop: it
    builds its own Reactor and serves on it, and its use of the inherited one
    (stop()) neither touches the parent's epoll set nor its sockets; the parent
    keeps serving its existing connection and new ones during and after the
    child's life."""
    H, got = _reliability_collecting(Echo)
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c, h = _connect_pair(a, got)
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:                              # the child: never return into pytest
        code = 1
        try:
            os.close(rd)
            r.stop(timeout=5)                 # the inherited reactor: must do no harm
            mine = goev.Reactor(1, backend=r.backend)
            ca = goev.Acceptor(mine, "127.0.0.1:0", Echo)
            mine.start()
            with socket.create_connection(ca.address, timeout=5) as cc:
                cc.sendall(b"child")
                ok = recv_exact(cc, 5, timeout=5) == b"child"
            mine.stop(timeout=5)
            os.write(wr, b"ok" if ok and mine.stopped else b"no")
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(wr)
    try:
        with os.fdopen(rd, "rb") as f:
            verdict = f.read()
        _, status = os.waitpid(pid, 0)
    finally:
        pass
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and verdict == b"ok"
    for i in range(20):                      # the parent's connection and listener still work
        c.sendall(b"p%d" % i)
        assert recv_exact(c, len(b"p%d" % i)) == b"p%d" % i
    assert echo_ok(a.address)
    c.close()


# =============================================================================
# 5. The timer heap (4-ary) and Timer
# =============================================================================
# The heap against a model, order and FIFO ties, never early, periods without
# drift, cancellation from any thread, compaction, bad delays.


def _assert_4ary_heap(heap):
    for i in range(1, len(heap)):
        assert not heap[i] < heap[(i - 1) >> 2], "heap property broken at %d" % i


def _dead_entries(p):
    return sum(1 for t in p._timers if t.cancelled)


# -- the heap functions alone -------------------------------------------------------

def test_heap_functions_model_random():
    """_heap_push/_heap_pop/_heapify against a sorted list: 6000 seeded random
    operations, many equal deadlines (the seq breaks ties), heapify of arbitrary
    lists and of filtered heaps (what compaction does)."""
    rnd = random.Random(31337)
    heap, ref, seq = [], [], 0
    for step in range(6000):
        op = rnd.random()
        if op < 0.5 or not heap:
            seq += 1
            item = (rnd.randint(0, 50) / 4.0, seq)     # few distinct deadlines: many ties
            goev._heap_push(heap, item)
            ref.append(item)
        elif op < 0.85:
            got = goev._heap_pop(heap)
            ref.sort()
            assert got == ref.pop(0)
        elif op < 0.95:                                  # compaction: drop some, re-heapify
            keep = [e for e in heap if rnd.random() < 0.7]
            heap[:] = keep
            goev._heapify(heap)
            ref = list(keep)
        else:                                            # heapify an arbitrary list
            heap = [(rnd.randint(0, 50) / 4.0, seq + k) for k in range(1, rnd.randint(0, 300))]
            seq += len(heap) + 1
            rnd.shuffle(heap)
            ref = list(heap)
            goev._heapify(heap)
        if step % 25 == 0:
            _assert_4ary_heap(heap)
            assert sorted(heap) == sorted(ref)
    out = [goev._heap_pop(heap) for _ in range(len(heap))]
    assert out == sorted(ref)
    for n in range(0, 70):                               # every small size, all orders
        items = [(float(rnd.randint(0, 5)), k) for k in range(n)]
        h = list(items)
        goev._heapify(h)
        _assert_4ary_heap(h)
        assert [goev._heap_pop(h) for _ in range(n)] == sorted(items)


# -- the poller's timer code, driven directly ---------------------------------------

def test_poller_timers_model_random():
    """A never-started reactor's poller, driven by hand with a synthetic clock:
    4000 seeded random schedule / periodic / burst / cancel / advance / compact
    operations, callbacks that cancel other timers and schedule new ones (also in
    the past: they must wait for the next pass), checked against a reference: the
    firing order ((deadline, FIFO)) of every pass; every 20 steps the live set and
    deadlines, periodic deadlines on their grid, the dead-entry count and the heap
    property.  Bursts take both sides of the split-or-pop choice.  No poll()
    happens, so the backend does not matter.  Exact binary fractions keep the
    float maths exact; the synthetic clock runs far ahead of time.monotonic() (a
    periodic re-arm also consults the real clock, which must never be the later)."""
    r = goev.Reactor(1)              # never started: this thread may drive the heap
    try:
        _poller_model(r.pollers[0])
    finally:
        r.stop()


def _poller_model(p):
    rnd = random.Random(4242)
    Q = 0.125
    now = [2.0 ** math.ceil(math.log2(time.monotonic() + 10 ** 6))]
    fired, timers, ref, plan = [], {}, {}, {}   # ref: the *live* timers only
    ids = {}                          # Timer -> id (Timers hash by identity)
    next_id = [0]
    ref_seq = [0]                     # the reference's FIFO counter

    def callback(i):
        fired.append(i)
        target, spawn, keep = plan[i]
        if target is not None:
            timers[target].cancel()
        if spawn is not None:
            schedule(now[0] + spawn, 0.0)
        return keep

    def schedule(when, interval):
        i = next_id[0]
        next_id[0] += 1
        target = rnd.randrange(i + 1) if rnd.random() < 0.1 else None
        spawn = Q * rnd.randint(-4, 10) if rnd.random() < 0.1 else None
        plan[i] = (target, spawn, rnd.random() < 0.9)
        t = p._call_at(when, interval, callback, (i,))
        timers[i] = t
        ids[t] = i
        return i

    def ref_add(i, when, interval):
        ref_seq[0] += 1
        ref[i] = {"when": when, "seq": ref_seq[0], "iv": interval, "first": when}

    def ref_pass(t_now, first_spawn_id):
        """What one _run_timers(t_now) must fire, applying the callbacks' effects."""
        expected = []
        spawned = first_spawn_id
        due = sorted((e["when"], e["seq"], i) for i, e in ref.items() if e["when"] <= t_now)
        for _, _, i in due:
            e = ref.get(i)
            if e is None:
                continue                      # cancelled by an earlier callback of this pass
            expected.append(i)
            if not e["iv"]:
                del ref[i]
            target, spawn, keep = plan[i]
            ref.pop(target, None)
            if spawn is not None:
                ref_add(spawned, t_now + spawn, 0.0)
                spawned += 1
            if e["iv"] and i in ref:
                if not keep:
                    del ref[i]
                    continue
                k = round((e["when"] - e["first"]) / e["iv"]) + 1
                while e["first"] + k * e["iv"] <= t_now:   # skip missed periods
                    k += 1
                ref_seq[0] += 1
                e["when"], e["seq"] = e["first"] + k * e["iv"], ref_seq[0]
        return expected

    bursts = 0
    n_fired = 0
    for step in range(4000):
        op = rnd.random()
        if op < 0.35:
            when = now[0] + Q * rnd.randint(-2, 40)
            ref_add(schedule(when, 0.0), when, 0.0)
        elif op < 0.40:
            when, iv = now[0] + Q * rnd.randint(0, 20), Q * rnd.randint(1, 16)
            ref_add(schedule(when, iv), when, iv)
        elif op < 0.41:                                   # a burst that will be due together
            bursts += 1
            for _ in range(rnd.randint(100, 400)):
                when = now[0] + Q * rnd.randint(0, 8)
                ref_add(schedule(when, 0.0), when, 0.0)
        elif op < 0.413:                                  # a big far-off crowd: bursts are a small share
            for _ in range(1000):
                when = now[0] + Q * rnd.randint(2000, 6000)
                ref_add(schedule(when, 0.0), when, 0.0)
        elif op < 0.62:
            live = list(ref)
            if live:
                i = rnd.choice(live)
                timers[i].cancel()
                del ref[i]
            else:                                         # cancel of a finished timer: a no-op
                if timers:
                    timers[rnd.choice(list(timers))].cancel()
        elif op < 0.95:
            now[0] += Q * (rnd.randint(0, 30) if rnd.random() < 0.97 else rnd.randint(100, 2000))
            del fired[:]
            expected = ref_pass(now[0], next_id[0])
            heap = p._timers
            if heap and heap[0][0] <= now[0]:             # what the loop does
                p._run_timers(now[0])
            assert fired == expected, "step %d" % step
            n_fired += len(fired)
        else:
            p._timeout()                                  # compaction and dead heads
        # -- invariants after every operation
        heap = p._timers
        if step % 10 == 0 or op >= 0.95:
            _assert_4ary_heap(heap)
        if step % 20 and op < 0.95:
            continue                                      # (the full comparison is O(n): not every step)
        live_real = {ids[t]: t.when for t in heap if not t.cancelled}
        live_ref = {i: e["when"] for i, e in ref.items()}
        assert live_real == live_ref, "step %d" % step
        for i, e in ref.items():
            if e["iv"]:
                k = (e["when"] - e["first"]) / e["iv"]
                assert k == int(k), "periodic deadline off its grid"
        assert p._timers_dead == _dead_entries(p), "dead-entry count drifted at step %d" % step
    assert bursts >= 20 and next_id[0] > 5000 and n_fired > 4000


def test_burst_path_keeps_order_and_the_rest(make_reactor):
    """Most of a big heap due at once takes the split path; the due ones fire in
    (deadline, FIFO) order, the rest stay a valid heap and fire later."""
    r = make_reactor(1)
    p = r.pollers[0]
    rnd = random.Random(7)
    base = float(2 ** 20)
    order = []
    whens = {}
    for i in range(5000):
        w = base + rnd.randint(0, 400) / 8.0
        whens[i] = w
        p._call_at(w, 0.0, order.append, (i,))
    cut = base + 30.0                                   # ~60% due
    p._run_timers(cut)
    due = sorted((w, i) for i, w in whens.items() if w <= cut)
    assert order == [i for _, i in due]
    _assert_4ary_heap(p._timers)
    del order[:]
    p._run_timers(base + 1000.0)
    assert order == [i for _, i in sorted((w, i) for i, w in whens.items() if w > cut)]
    assert not p._timers


# -- through running reactors ---------------------------------------------------------

def test_order_and_fifo_ties(make_reactor):
    """Random delays fire in deadline order; equal deadlines in scheduling order."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    order = []
    done = threading.Event()
    n = 2000

    def record(i):
        order.append(i)
        if len(order) == n:
            done.set()

    def schedule():
        rnd = random.Random(99)
        base = time.monotonic() + 0.05
        whens = []
        for i in range(n):
            if i % 2:                                   # exact ties: same deadline
                w = base + rnd.randint(0, 20) / 1000.0
                p._call_at(w, 0.0, record, (i,))
            else:
                w = p.call_later(rnd.uniform(0, 0.02), record, i).when
            whens.append(w)
        return whens
    whens = on_poller(r.pollers[0], schedule)
    assert done.wait(WAIT)
    assert order == sorted(range(n), key=lambda i: (whens[i], i))


def test_never_early(make_reactor):
    """A timer never runs before its deadline: time.monotonic() read in the
    callback is >= Timer.when and >= scheduling time + delay; so for
    handler timers (on_timeout's now_ms is a floor of the pass's clock)."""
    r = make_reactor(1)
    r.start()
    results = []
    done = threading.Event()
    delays = [0.0, 0.0005, 0.001, 0.0015, 0.003, 0.007, 0.01, 0.02, 0.05] * 4

    def cb(t0, delay, box):
        results.append((time.monotonic(), t0, delay, box[0].when))
        if len(results) == len(delays):
            done.set()

    def schedule():
        for d in delays:
            box = []
            box.append(r.call_later(d, cb, time.monotonic(), d, box))
    on_poller(r.pollers[0], schedule)
    assert done.wait(WAIT)
    for fired_at, t0, delay, when in results:
        assert fired_at >= when >= t0 + delay - 1e-9

    # handler timers, from on_open on the poller thread
    seen = []
    hdone = threading.Event()

    class H(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.k = 0
            self.t0 = time.monotonic()
            self.timer = self.schedule_timer(3)
            return True

        def on_timeout(self, now_ms):
            seen.append((time.monotonic(), self.t0, self.timer.when, now_ms))
            self.k += 1
            if self.k == 5:
                hdone.set()
                return False
            self.t0 = time.monotonic()
            self.timer = self.schedule_timer([1, 0, 2, 4][self.k - 1])
            return True
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    with socket.create_connection(a.address):
        assert hdone.wait(WAIT)
    assert len(seen) == 5
    for fired_at, t0, when, now_ms in seen:
        assert fired_at >= when >= t0
        assert isinstance(now_ms, int) and int(when * 1000) <= now_ms <= fired_at * 1000


class _Periodic(goev.IOHandle):
    """schedule_timer(interval, interval) from on_open; records every firing."""
    interval_ms = 10
    stop_after = 50
    log = None              # list of (monotonic in callback, deadline, now_ms)
    done = None

    def on_open(self):
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        self.timer = self.schedule_timer(self.interval_ms, self.interval_ms)
        type(self).instance = self
        return True

    def on_timeout(self, now_ms):
        self.log.append((time.monotonic(), self.timer.when, now_ms))
        if len(self.log) >= self.stop_after:
            self.done.set()
            return False
        return True


def test_period_without_drift(make_reactor):
    """50 periods: every deadline is exactly first + k*interval (computed, not
    accumulated), k strictly increasing, each firing at or after its deadline;
    returning False stops the timer (and releases it)."""
    r = make_reactor(1)
    r.start()

    class P(_Periodic):
        log = []
        done = threading.Event()
    a = goev.Acceptor(r, "127.0.0.1:0", P)
    with socket.create_connection(a.address):
        assert P.done.wait(WAIT)
        h = P.instance
        assert on_poller(r.pollers[0], lambda: h.timer.cancelled)      # False stopped it
        assert on_poller(r.pollers[0], lambda: not any(not t.cancelled for t in r.pollers[0]._timers))
    iv = P.interval_ms / 1000.0
    first = P.log[0][1]
    ks = []
    for fired_at, when, now_ms in P.log:
        k = round((when - first) / iv)
        assert when == first + k * iv, "deadline drifted off the grid"
        assert fired_at >= when
        assert now_ms >= int(when * 1000)
        ks.append(k)
    assert len(ks) == 50 and ks[0] == 0
    assert all(b > a for a, b in zip(ks, ks[1:]))     # under load periods may be skipped, never repeated


def test_skip_missed_periods_after_a_stall(make_reactor):
    """The poller thread blocked for 20+ periods: afterwards the timer fires once
    for the missed time (the overdue deadline), not once per missed period, and
    its next deadline is on the grid after the stall."""
    r = make_reactor(1)
    r.start()

    class P(_Periodic):
        log = []
        done = threading.Event()
        stop_after = 10**9
    a = goev.Acceptor(r, "127.0.0.1:0", P)
    stall = {}
    with socket.create_connection(a.address):
        wait_until(lambda: len(P.log) >= 3, what="3 periods")

        def block():
            stall["begin"] = time.monotonic()
            time.sleep(0.25)                  # 25 periods of 10 ms: the stall under test
            stall["end"] = time.monotonic()
        r.pollers[0]._post(block)
        wait_until(lambda: "end" in stall and sum(1 for f, _, _ in list(P.log) if f > stall["end"]) >= 3,
                   what="3 firings after the stall")
        on_poller(r.pollers[0], P.instance.cancel_timer)
    after = [(f, w) for f, w, _ in P.log if f > stall["end"]]
    overdue = [w for f, w in after if w <= stall["end"]]
    assert len(overdue) <= 1, "missed periods fired as a burst: %d overdue firings" % len(overdue)
    iv = P.interval_ms / 1000.0
    first = P.log[0][1]
    for f, w in after:
        k = round((w - first) / iv)
        assert w == first + k * iv
    assert any(w > stall["end"] for f, w in after)


def test_reschedule_and_cancel_inside_callbacks(make_reactor):
    """on_timeout may reschedule (a chain of one-shots with changing delays),
    replace a periodic timer, and cancel its own timer and return True; a
    call_later callback may cancel another timer due in the same pass (which
    then does not run) and schedule a delay-0 timer (which runs in a later pass)."""
    r = make_reactor(1)
    r.start()
    events = []
    finished = threading.Event()

    class H(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.n = 0
            self.schedule_timer(1, 1)                 # periodic, replaced below
            return True

        def on_timeout(self, now_ms):
            self.n += 1
            events.append(("h", self.n))
            if self.n < 5:
                self.schedule_timer(self.n)          # replace: one-shot chain
                return True
            if self.n == 5:
                self.schedule_timer(2, 2)            # back to periodic
                return True
            if self.n == 8:
                self.cancel_timer()                   # cancel itself, yet return True
                self.reactor.pollers[0].call_later(0.03, finished.set)
                return True
            return True
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    with socket.create_connection(a.address):
        assert finished.wait(WAIT)
    assert [e for e in events if e[0] == "h"] == [("h", i) for i in range(1, 9)]

    # same pass: A cancels B; A schedules C with delay 0 (must not run in A's pass)
    p = r.pollers[0]
    log = []
    done = threading.Event()
    box = {}

    def a_cb():
        log.append(("A",))
        box["B"].cancel()
        box["C"] = p.call_later(0, c_cb)

    def b_cb():
        log.append(("B",))

    def c_cb():
        log.append(("C",))
        done.set()

    def schedule():
        box["A"] = p.call_later(0, a_cb)
        box["B"] = p.call_later(0, b_cb)
        box["D"] = p.call_later(0, log.append, ("D",))
    on_poller(r.pollers[0], schedule)
    assert done.wait(WAIT)
    names = [e[0] for e in log]
    assert names == ["A", "D", "C"], names               # B never ran; C after D (a later pass)
    assert box["B"].cancelled and box["C"].cancelled
    assert on_poller(r.pollers[0], lambda: p._timers_dead == _dead_entries(p))


def test_timer_is_not_made_directly(make_reactor):
    """goev.Timer() is a TypeError that says where timers come from (a Timer
    belongs to a poller's heap); the ones call_later returns are Timers."""
    with pytest.raises(TypeError, match=r"not made directly: Reactor.call_later\(delay_s, fn, \*args\)"):
        goev.Timer()
    with pytest.raises(TypeError, match="call_later"):
        goev.Timer([0.0, 0, print, (), None, 0.0])
    r = make_reactor(1)
    fired = []

    class Ticks(goev.IOHandle):
        def on_timeout(self, now_ms):
            fired.append(3)
            return len(fired) < 5
    rfd, wfd = os.pipe()
    try:
        h = Ticks()
        r.add_handler(h, rfd, goev.EV_IN)
        t1 = r.call_later(0, fired.append, 1)
        t2 = r.call_later(3600, fired.append, 2)
        t3 = h.schedule_timer(1, 1)                      # periodic
        assert all(type(t) is goev.Timer for t in (t1, t2, t3))
        assert t2.interval == 0 and t3.interval == 0.001 and "every" in repr(t3)
        t2.cancel()
        r.start()
        wait_until(lambda: fired.count(3) >= 3 and 1 in fired, what="the timers to fire")
        assert 2 not in fired
        h.close()
        r.stop()
    finally:
        os.close(rfd)
        os.close(wfd)


def test_same_pass_timers_share_now_ms(make_reactor):
    """now_ms is the pass's clock, read once: handler timers due in one pass
    receive the same value, and it equals poller.now_ms."""
    r = make_reactor(1)
    r.start()
    got = []
    done = threading.Event()
    hs = []

    class H(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            hs.append(self)
            return True

        def on_timeout(self, now_ms):
            got.append((now_ms, self.poller.now_ms))
            if len(got) == 3:
                done.set()
            return False
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    cs = [socket.create_connection(a.address) for _ in range(3)]
    try:
        wait_until(lambda: len(hs) == 3, what="3 handlers")
        on_poller(r.pollers[0], lambda: [h.schedule_timer(0) for h in hs])   # one callback: due together
        assert done.wait(WAIT)
    finally:
        for c in cs:
            c.close()
    assert len({g[0] for g in got}) == 1 and all(a == b for a, b in got)


def test_cancel_releases_callback_and_args(make_reactor):
    """A cancelled timer drops fn and args at once (before start, from another
    thread while running, on the poller thread); a fired one-shot drops them too;
    a cancelled timer never runs."""
    r = make_reactor(1)

    class Obj:
        pass
    ran = []

    def make():
        o = Obj()
        return o, weakref.ref(o)

    o1, w1 = make()
    t1 = r.call_later(0.01, ran.append, o1)            # before start
    del o1
    t1.cancel()
    gc.collect()
    assert w1() is None and t1.cancelled
    r.start()
    o2, w2 = make()
    t2 = r.call_later(0.02, ran.append, o2)            # from this (non-poller) thread
    del o2
    t2.cancel()
    gc.collect()
    assert w2() is None
    o3, w3 = make()

    def on_thread(o):
        t = r.pollers[0].call_later(0.01, ran.append, o)
        t.cancel()
        return t
    t3 = on_poller(r.pollers[0], on_thread, o3)
    del o3
    gc.collect()
    assert w3() is None and t3.cancelled
    o4, w4 = make()
    fired = threading.Event()
    t4 = r.call_later(0, lambda o: fired.set(), o4)
    del o4
    assert fired.wait(WAIT)
    on_poller(r.pollers[0], lambda: None)                       # the firing pass has finished
    gc.collect()
    assert w4() is None and t4.cancelled
    # the cancelled ones never run: a later deadline fires after theirs
    later = threading.Event()
    r.call_later(0.1, later.set)
    assert later.wait(WAIT)
    assert ran == []


def test_cross_thread_cancel_bookkeeping(make_reactor):
    """Timers scheduled and cancelled from several other threads while the poller
    runs: none runs, the dead-entry count matches the heap, compaction frees them
    (also when it runs while cancelled timers are still on their way in)."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    ran = []
    keep = r.call_later(100, ran.append, "keep")     # a live head: dead entries stay behind it

    def worker(seed):
        rnd = random.Random(seed)
        ts = [r.call_later(rnd.uniform(200, 500), ran.append, seed) for _ in range(500)]
        for t in ts:
            t.cancel()
    ths = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    on_poller(r.pollers[0], lambda: None)                       # posts are FIFO: all applied now
    # every posted push has landed: the count is exact (nothing fired, so no race)
    assert on_poller(r.pollers[0], lambda: p._timers_dead == _dead_entries(p))
    # compaction (over half of the heap dead) leaves the live one
    wait_until(lambda: on_poller(r.pollers[0], lambda: len(p._timers)) == 1, what="compaction")
    assert on_poller(r.pollers[0], lambda: p._timers_dead) >= 0
    assert ran == [] and not keep.cancelled
    keep.cancel()


def test_compaction_while_cancelled_timers_are_on_their_way(make_reactor):
    """Timers scheduled and cancelled from another thread while the poller is
    busy: their cancels are counted before their (posted) pushes land, and a
    compaction in between must not forget them (regression: the count was
    reset to 0 there, and the dead entries arriving next were never counted)."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    keep = r.call_later(100, lambda: None)
    on_poller(r.pollers[0], lambda: None)
    release = threading.Event()
    busy = threading.Event()

    def block():
        busy.set()
        release.wait(WAIT)
    p._post(block)
    assert busy.wait(WAIT)
    ts = [r.call_later(200 + i, lambda: None) for i in range(500)]   # posted behind block()
    for t in ts:
        t.cancel()
    release.set()
    on_poller(r.pollers[0], lambda: None)            # every push has landed (and a compaction ran first)
    assert on_poller(r.pollers[0], lambda: p._timers_dead == _dead_entries(p))
    wait_until(lambda: on_poller(r.pollers[0], lambda: len(p._timers)) == 1, what="compaction")
    assert on_poller(r.pollers[0], lambda: p._timers_dead) == 0
    keep.cancel()


def test_churn_does_not_grow_the_heap(make_reactor):
    """Schedule/cancel churn on the poller thread (one live timer ahead of them, 50 passes
    of 1000 schedule+cancel): compaction keeps the heap near the live size."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    keep = r.call_later(30, lambda: None)            # a live head: dead entries stay behind it
    sizes = []

    def churn():
        for _ in range(1000):
            p.call_later(60, lambda: None).cancel()
        sizes.append(len(p._timers))
    for _ in range(50):
        on_poller(r.pollers[0], churn)
    assert max(sizes) <= 2100, sizes
    assert on_poller(r.pollers[0], lambda: len(p._timers)) <= 1001
    keep.cancel()


def test_huge_delays_never_fire_nor_wake(make_reactor):
    """call_later(inf), call_later(1e9), call_later(10**400) and
    schedule_timer(1e12 ms) are accepted, never run, do not make the poll
    timeout overflow, and do not wake the loop; stop() is not delayed."""
    r = make_reactor(1)
    p = r.pollers[0]
    passes = []
    real_timeout = p._timeout

    def counting_timeout():
        v = real_timeout()
        passes.append(v)
        return v
    p._timeout = counting_timeout               # the loop calls self._timeout() once per pass
    ran = []
    r.start()
    t_inf = on_poller(r.pollers[0], lambda: p.call_later(math.inf, ran.append, "inf"))
    t_big_int = r.call_later(10 ** 400, ran.append, "int")    # beyond float range: never
    on_poller(r.pollers[0], lambda: None)
    wait_until(lambda: passes[-1] == -1.0, what="an infinite poll timeout")   # only "never" timers
    t_1e9 = on_poller(r.pollers[0], lambda: p.call_later(1e9, ran.append, "1e9"))
    wait_until(lambda: passes[-1] == goev._MAX_POLL_TIMEOUT, what="the clamped timeout")   # no overflow
    n = len(passes)
    time.sleep(0.3)                              # a quiet window: nothing may wake the loop
    assert len(passes) == n, "the loop woke %d times for far timers" % (len(passes) - n)
    assert not (t_inf.cancelled or t_1e9.cancelled or t_big_int.cancelled) and ran == []
    t0 = time.monotonic()
    r.stop(timeout=WAIT)
    assert r.stopped and time.monotonic() - t0 < WAIT / 2
    assert ran == [] and t_inf.cancelled and t_1e9.cancelled   # released at stop

    # the handler API with a huge delay
    r2 = make_reactor(1)
    r2.start()
    seen = []

    class H(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.schedule_timer(1e12)
            seen.append(self)
            return True

        def on_timeout(self, now_ms):
            seen.append("fired")
            return False
    a = goev.Acceptor(r2, "127.0.0.1:0", H)
    with socket.create_connection(a.address):
        wait_until(lambda: seen, what="handler")
        assert seen[0]._timer.when > time.monotonic() + 1e8
        on_poller(r2.pollers[0], lambda: None)
    assert "fired" not in seen


def test_100k_timers_fire_in_order(make_reactor):
    """100,000 timers (scheduled before start, from this thread) all fire, once
    each, in (deadline, FIFO) order."""
    r = make_reactor(1)
    n = 100000
    rnd = random.Random(5)
    order = []
    done = threading.Event()

    def record(i):
        order.append(i)
        if len(order) == n:
            done.set()
    ts = [r.call_later(rnd.uniform(0, 0.05), record, i) for i in range(n)]
    whens = [t.when for t in ts]
    r.start()
    assert done.wait(WAIT * 3)
    assert order == sorted(range(n), key=lambda i: (whens[i], i))
    assert all(t.cancelled for t in ts)           # one-shots are spent
    assert on_poller(r.pollers[0], lambda: len(r.pollers[0]._timers)) == 0


def test_closed_handler_timers_are_cancelled(make_reactor):
    """Closing a handler cancels its timer (it never fires again); schedule_timer
    on a closed handler raises RuntimeError naming it."""
    r = make_reactor(1)
    r.start()
    fired = []
    hs = []

    class H(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.timer = self.schedule_timer(20, 20)
            hs.append(self)
            return True

        def on_timeout(self, now_ms):
            fired.append(self.closed)
            return True
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    with socket.create_connection(a.address) as c:
        wait_until(lambda: fired, what="a first firing")
        h = hs[0]
        on_poller(r.pollers[0], h.close)
        assert h.timer.cancelled
        n = len(fired)
        with pytest.raises(RuntimeError, match="not registered"):
            on_poller(r.pollers[0], h.schedule_timer, 10)
        # peer sees EOF; a later timer on the same poller fires after the old deadline
        c.settimeout(WAIT)
        assert c.recv(10) == b""
        ev = threading.Event()
        r.call_later(0.1, ev.set)
        assert ev.wait(WAIT)
    assert len(fired) == n and not any(fired)


@pytest.mark.parametrize("bad, exc, text", [
    (-1, ValueError, "-1"), (-0.001, ValueError, "-0.001"), (float("nan"), ValueError, "nan"),
    ("1", TypeError, "'1'"), (None, TypeError, "None"), (True, TypeError, "True"),
    (b"\x01", TypeError, "b'\\\\x01'"),
])
def test_bad_delays_name_the_value(make_reactor, bad, exc, text):
    r = make_reactor(1)
    with pytest.raises(exc, match="delay_s.*" + text):
        r.call_later(bad, lambda: None)
    with pytest.raises(exc, match="delay_s.*" + text):
        r.pollers[0].call_later(bad, lambda: None)
    assert not r.pollers[0]._timers


def test_bad_callables_and_handler_timer_args(make_reactor):
    r = make_reactor(1)
    for fn in (5, None, "f"):
        with pytest.raises(TypeError, match="callable.*%s" % repr(fn).replace("'", ".")):
            r.call_later(1, fn)
    assert not r.pollers[0]._timers
    errors = []
    done = threading.Event()

    class H(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            for args in ((-5,), (float("nan"),), ("10",), (10, -1), (10, math.inf), (10, float("nan"))):
                try:
                    self.schedule_timer(*args)
                    errors.append(("accepted", args))
                except (ValueError, TypeError) as e:
                    errors.append((type(e).__name__, str(e)))
            done.set()
            return True
    r.start()
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    with socket.create_connection(a.address):
        assert done.wait(WAIT)
    assert [e[0] for e in errors] == ["ValueError", "ValueError", "TypeError", "ValueError",
                                      "ValueError", "ValueError"], errors
    assert "delay_ms" in errors[0][1] and "-5" in errors[0][1]
    assert "nan" in errors[1][1] and "'10'" in errors[2][1]
    assert "interval_ms" in errors[3][1] and "-1" in errors[3][1]
    assert "inf" in errors[4][1] and "nan" in errors[5][1]
    unregistered = goev.IOHandle()
    with pytest.raises(RuntimeError, match="not registered"):
        unregistered.schedule_timer(10)


def test_call_later_right_after_start(make_reactor):
    """Reactor.call_later from another thread just after start() lands on poller 0
    and fires (it is posted, never pushed into a heap the poller is reading)."""
    for _ in range(20):
        r = make_reactor(1)
        r.start()
        ev = threading.Event()
        where = []
        r.call_later(0, lambda: (where.append(threading.current_thread().name), ev.set()))
        assert ev.wait(WAIT)
        assert where == ["goev-poller-0"]
        r.stop(timeout=WAIT)


def test_reactor_call_later_lands_on_poller_0(make_reactor):
    r = make_reactor(3)
    r.start()
    got = []
    done = threading.Event()

    def cb():
        got.append(r.current_poller() is r.pollers[0])
        done.set()
    t = on_poller(r.pollers[2], lambda: r.call_later(0.001, cb))   # from another poller's thread
    assert done.wait(WAIT) and got == [True] and t.cancelled


def test_exception_in_callback_is_logged_and_others_run(make_reactor, goev_log):
    r = make_reactor(1)
    r.start()
    done = threading.Event()
    order = []

    def boom():
        order.append("boom")
        raise RuntimeError("timer boom")

    def schedule():
        p = r.pollers[0]
        p.call_later(0, boom)
        p.call_later(0, order.append, "after")
        p.call_later(0.001, done.set)
    on_poller(r.pollers[0], schedule)
    assert done.wait(WAIT)
    assert order == ["boom", "after"]
    assert any("timer boom" in str(rec.exc_info[1]) for rec in goev_log.errors() if rec.exc_info)


def test_system_exit_in_a_timer_loses_no_timer(make_reactor):
    """SystemExit from a timer callback leaves run(): the other timers due in that
    pass are kept (not dropped), a periodic one stays armed, and run() resumes."""
    r = make_reactor(1)
    p = r.pollers[0]
    ran = []
    base = time.monotonic()
    ticks = []

    def tick():
        ticks.append(1)
        return True

    def raiser():
        ran.append("exit")
        raise SystemExit(3)

    def stopper():
        ran.append("c2")
        r.stop()
    p._call_at(base, 0.0, ran.append, ("a",))
    p._call_at(base, 0.0, raiser, ())
    p._call_at(base, 0.0, ran.append, ("c",))
    periodic = p._call_at(base, 0.005, tick, ())
    with pytest.raises(SystemExit):
        r.run()
    assert ran == ["a", "exit"]
    assert not periodic.cancelled
    p._call_at(base, 0.0, stopper, ())                  # due now, but after "c" (FIFO)
    r.run()
    assert ran == ["a", "exit", "c", "c2"]
    assert r.stopped and periodic.cancelled            # released at stop


# =============================================================================
# 6. IOHandle: the handler base
# =============================================================================
# One connection: read (views, end of stream, a reset), write (queue, water
# marks, backpressure), close / abort / shutdown_write, half-close, on_data and
# on_eof, return values of on_read, on_open, faults in callbacks, reprs.


@pytest.mark.parametrize("size", [1, 100, 65536, 1 << 20, 8 << 20])
def test_echo_byte_exact(make_reactor, npollers, size):
    r, a = echo_server(make_reactor, npollers)
    data = random.Random(size).randbytes(size) if hasattr(random.Random, "randbytes") else os.urandom(size)
    with socket.create_connection(a.address) as c:
        t = threading.Thread(target=c.sendall, args=(data,))
        t.start()
        got = recv_exact(c, size)
        t.join()
    assert got == data


class _ReleasingEcho(goev.IOHandle):
    """Echoes a copy, then releases the view read() returned (alternately with
    release() and with a ``with`` block): the poller's cached view of that length
    must be replaced, not handed dead to the next read."""

    def __init__(self):
        self.n = 0

    def on_read(self):
        self.n += 1
        if self.n % 2:
            data = self.read()
            if not data:
                return data is not None
            copy = bytes(data)
            data.release()
        else:
            with self.read() or memoryview(b"") as data:
                copy = bytes(data)
            if not copy:
                return False
        self.write(copy)
        return True


def test_read_views_per_length_survive_release(make_reactor, npollers, goev_log):
    """read() hands out one view per short length (made once per poller);
    a user's release() of it is harmless, every length reads its own bytes,
    and reads longer than the cache get a fresh slice."""
    r, a = echo_server(make_reactor, npollers, factory=_ReleasingEcho)
    rng = random.Random(7)
    with socket.create_connection(a.address) as c1, socket.create_connection(a.address) as c2:
        for size in (10, 10, 10, 1, 2047, 2047, 2048, 2048, 5000, 5000, 5000, 10, 1, 2048):
            for c in (c1, c2):                  # two handlers, maybe one poller
                msg = rng.randbytes(size)
                c.sendall(msg)
                assert recv_exact(c, size) == msg
    assert not goev_log.errors()


def test_accepted_tcp_connections_have_nodelay(make_reactor, npollers):
    """Every accepted TCP connection has TCP_NODELAY (on Linux inherited from
    the listener, which goev sets once): bound IPv4/IPv6 and adopted listeners."""
    seen = queue.Queue()

    class Probe(Echo):
        def on_open(self):
            seen.put(socket.socket(fileno=os.dup(self.fd)))
            return super().on_open()

    r = make_reactor(npollers)
    ls = socket.create_server(("127.0.0.1", 0))          # adopted: goev sets the option
    acceptors = [goev.Acceptor(r, "127.0.0.1:0", Probe), goev.Acceptor.from_socket(r, ls, Probe)]
    if socket.has_ipv6:
        try:
            acceptors.append(goev.Acceptor(r, "[::1]:0", Probe))
        except OSError:                                    # pragma: no cover (no ::1 here)
            pass
    r.start()
    for a in acceptors:
        with socket.create_connection(a.address[:2]) as c:
            c.sendall(b"x")
            assert recv_exact(c, 1) == b"x"
            with seen.get(timeout=WAIT) as s:
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, a


def test_accepted_connection_sock_made_on_first_use(make_reactor, npollers):
    """An accepted connection keeps a bare fd (no socket object) until ``sock``
    (or ``peer``) is read; then ``sock`` is a socket.socket on that fd, good for
    options, and kept.  Both kinds close their fd; ``sock`` is None after close
    and for a bare fd registered with add_handler."""
    seen = queue.Queue()

    class Probe(Echo):
        def on_open(self):
            seen.put((self._sock, self.fd))
            return super().on_open()

    class UseSock(Echo):
        def on_open(self):
            s = self.sock
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            seen.put((s, self.fd, s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                      self.sock is s, self.peer))
            return super().on_open()

    r = make_reactor(npollers)
    a1 = goev.Acceptor(r, "127.0.0.1:0", Probe)
    a2 = goev.Acceptor(r, "127.0.0.1:0", UseSock)
    r.start()
    with socket.create_connection(a1.address) as c:
        c.sendall(b"x")
        assert recv_exact(c, 1) == b"x"
        bare, fd = seen.get(timeout=WAIT)
        assert bare is goev._BARE and fd >= 0
    with socket.create_connection(a2.address) as c:
        c.sendall(b"y")
        assert recv_exact(c, 1) == b"y"
        s, fd, keep, same, peer = seen.get(timeout=WAIT)
        assert type(s) is socket.socket and s.fileno() == fd and s.family == socket.AF_INET
        assert keep != 0 and same and peer == c.getsockname()
    wait_until(lambda: s.fileno() == -1, what="the made socket closed with the handler")
    rfd, wfd = os.pipe()
    try:
        os.set_blocking(rfd, False)
        closed = threading.Event()

        class Pipe(Echo):
            def on_close(self):
                super().on_close()
                closed.set()
        h = Pipe()
        r.add_handler(h, rfd, goev.EV_IN)
        assert h.sock is None
        h.close()
        assert closed.wait(WAIT)
        os.fstat(rfd)                      # still open: a bare fd stays the caller's
    finally:
        os.close(rfd)
        os.close(wfd)


def test_accepted_connection_sock_off_the_poller_thread(make_reactor, npollers):
    """Off the poller's thread an accepted connection's socket is not made and
    kept (it could outlive the fd): ``peer`` asks through a throwaway object,
    ``sock`` is a new object on a dup of the fd whose options apply to the
    connection.  On the poller's thread ``sock`` is made once and kept."""
    r, a, connect = served(make_reactor, npollers)
    c, h = connect()
    with c:
        assert h.peer == c.getsockname()
        assert h._sock is goev._BARE                  # asked, not made
        s = h.sock
        assert s.fileno() != h.fd
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        s.close()                                     # closes the dup only
        got = queue.Queue()
        r.post_to(h, lambda: got.put((h.sock, h.sock, h.sock.getsockopt(socket.SOL_SOCKET,
                                                                         socket.SO_KEEPALIVE))))
        s1, s2, keep = got.get(timeout=WAIT)
        assert s1 is s2 and s1.fileno() == h.fd and keep != 0
        c.sendall(b"still here")
        assert recv_exact(c, 10) == b"still here"
    wait_until(lambda: h.fd == -1, what="handler closed")
    assert h.sock is None and h.peer is None


def test_handler_on_pipe_fds(make_reactor):
    """read()/write() work on any fd, not only sockets: 1 MiB goes from a
    handler on a pipe's write end (partial writes, queued, gathered) to one on
    its read end, then EOF.  A bare fd stays the caller's to close."""
    r = make_reactor(1)
    rd, wr = os.pipe()
    os.set_blocking(rd, False)
    os.set_blocking(wr, False)
    got = bytearray()
    eof = threading.Event()

    class Reader(goev.IOHandle):
        def on_read(self):
            data = self.read()
            if data is None:
                return True
            got.extend(data)
            if not data:
                eof.set()
            return bool(data)

    class Writer(goev.IOHandle):
        pass

    try:
        rh, wh = Reader(), Writer()
        r.add_handler(rh, rd, goev.EV_IN)
        r.add_handler(wh, wr, goev.EV_IN)    # never readable: EV_OUT comes with a queue
        r.start()
        data = random_bytes(1 << 20, seed=3)
        for i in range(0, len(data), 4096):  # many writes: the queue gathers them
            wh.write(data[i:i + 4096])       # (off the poller thread: async_write)
        wait_until(lambda: len(got) == len(data), what="1 MiB through the pipe")
        assert bytes(got) == data
        assert wh.pending_write_bytes == 0
        r.post_to(wh, wh.close)              # leave the poller first: a poll() that sleeps
        wait_until(lambda: wh.closed)        # with the fd in its set holds the file open
        os.close(wr)
        wr = -1
        assert eof.wait(WAIT)
        wait_until(lambda: rh.closed)
    finally:
        r.stop(timeout=WAIT)
        os.close(rd)
        if wr >= 0:
            os.close(wr)


def _outq(fd):
    """Bytes in the socket's send queue (unsent + unacknowledged): SIOCOUTQ."""
    return _ioctl_int(fd, termios.TIOCOUTQ)


def test_echo_random_chunks_tiny_buffers(make_reactor, npollers):
    """Random send sizes one way, random recv sizes the other, through 4 KiB
    client buffers: every partial send / queued remainder / EV_OUT resume is
    exercised.  A lost, duplicated or reordered queue piece changes the bytes;
    extra bytes after the stream show up before the final EOF."""
    r, a = echo_server(make_reactor, npollers)
    size = 1 << 20
    data = random_bytes(size, seed=7)
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
    factory, handlers = _core_collecting(_TrackedEcho)
    r, a = echo_server(make_reactor, npollers, factory=factory)
    rng = random.Random(200)
    payloads = [b"client %03d:" % i + rng.randbytes(rng.randint(1, 40000)) for i in range(200)]
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


class _Flood(goev.IOHandle):
    """Writes TOTAL bytes in CHUNK pieces while pending_write_bytes <= HIGH,
    continuing in on_write_drained; records every on_read with the queue size
    at that moment.  Closes once everything is written and the client said bye."""
    # During a stall the queue may shrink only by what the kernel still takes, and
    # it must stay above LOW.  With these buffers the kernel usually takes ~120 KiB
    # but up to ~250 KiB (Linux 6.x: the send queue may pass SO_SNDBUF by one 64 KiB
    # loopback segment, and the receive window nears the whole SO_RCVBUF).  A HIGH
    # of 256 KiB failed once in CI; 1 MiB leaves a 3x margin.
    HIGH = 1024 * 1024
    LOW = 16 * 1024
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
    data = random_bytes(total, seed=32)
    factory, handlers = _core_collecting(type("Flood", (_Flood,), {"data": data}))
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
    factory, handlers = _core_collecting(_MeasuredEcho)
    a = goev.Acceptor(r, "127.0.0.1:0", factory)
    r.start()
    size = 20 << 20
    data = random_bytes(size, seed=20)
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
    factory, handlers = _core_collecting(_AnswerAfterEOF)
    r, a = echo_server(make_reactor, npollers, factory=factory)
    body = random_bytes(200000, seed=3)
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
    factory, handlers = _core_collecting(_Recorder)
    a = goev.Acceptor(r, "127.0.0.1:0", factory)
    data = random_bytes(50000, seed=50)
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


class DataEcho(goev.IOHandle):
    """The README's first handler: on_data echoes, the default on_eof closes."""

    def on_data(self, data):
        self.write(data)


def test_on_data_echo_byte_exact(make_reactor, npollers):
    """on_data receives every byte in order (short reads, long reads beyond the
    view cache), and the default on_eof closes after the queued echo is flushed."""
    r, a = echo_server(make_reactor, npollers, factory=DataEcho)
    data = random.Random(7).randbytes(3 << 20) if hasattr(random.Random, "randbytes") else os.urandom(3 << 20)
    with socket.create_connection(a.address, timeout=WAIT) as c:
        s = _Bg(lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)))
        got = recv_all(c)                 # EOF: the server closed after the flush
        s.join()
    assert got == data


def test_on_eof_answers_a_half_close(make_reactor, npollers):
    """on_eof runs once at the client's FIN; the handler may still write, and
    on_data returning False did not close the connection early."""
    handlers = []

    def make():
        h = _AnswerAtEof()
        handlers.append(h)
        return h
    r, a = echo_server(make_reactor, npollers, factory=make)
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(b"x" * 1000)
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"got 1000 bytes"
    wait_until(lambda: handlers and handlers[0].closed, what="the handler closed")
    assert handlers[0].errors == [None]


def test_on_eof_after_a_reset_carries_the_error(make_reactor):
    """A reset is an end of stream too: on_eof runs with self.error set."""
    handlers = []

    def make():
        h = _AnswerAtEof()
        handlers.append(h)
        return h
    r, a = echo_server(make_reactor, factory=make)
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(b"abc")
        wait_until(lambda: handlers and handlers[0].got == b"abc", what="the bytes before the reset")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # (closed with SO_LINGER 0: a reset)
    wait_until(lambda: handlers[0].errors, what="on_eof after the reset")
    assert isinstance(handlers[0].errors[0], ConnectionResetError)
    wait_until(lambda: handlers[0].closed, what="the handler closed")


def test_on_data_and_on_read_in_one_class_is_a_type_error():
    """A class that overrides both is refused when it is defined, with a message
    naming both; so is a subclass that adds on_read under an on_data parent."""
    with pytest.raises(TypeError, match="has both on_data and on_read"):
        class Both(goev.IOHandle):
            def on_read(self):
                return True

            def on_data(self, data):
                pass
    with pytest.raises(TypeError, match="Later has both on_data and on_read"):
        class Later(DataEcho):
            def on_read(self):
                return True


def test_stop_just_before_a_new_connection_registers_is_not_an_error(make_reactor, goev_log):
    """A stop that lands between an accept and the handler's registration (a
    signal handler calling stop() mid-batch, here stop() in on_open) makes
    add_handler refuse; the handler is closed (on_close once, fd closed) and
    nothing is logged as an error."""
    closes = []

    class StopThenRegister(goev.IOHandle):
        def on_open(self):
            self.reactor.stop()                 # from the poller: returns at once
            return super().on_open()            # add_handler: "reactor is stopped"

        def on_close(self):
            closes.append(self.fd)
            self.destroy()

    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", StopThenRegister)
    r.start()
    with socket.create_connection(a.address, timeout=WAIT) as c:
        assert recv_all(c) == b""              # closed by the server
    r.stop(timeout=WAIT)
    assert r.stopped and len(closes) == 1
    assert goev_log.errors() == []


def test_on_data_edge_triggered_reads_until_nothing_is_left(make_reactor):
    """An on_data handler registered edge-triggered (EV_ET) gets every byte:
    goev reads until read() says None, as EV_ET requires (with a 4 KiB read
    buffer, 100 000 bytes take many reads per edge)."""
    got = []
    done = threading.Event()

    class Edge(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN | goev.EV_ET)

        def on_data(self, data):
            got.append(bytes(data))
            if sum(map(len, got)) == 100000:
                done.set()

    r = make_reactor(1, read_buffer_size=4096)
    a = goev.Acceptor(r, "127.0.0.1:0", Edge)
    r.start()
    data = random_bytes(100000, seed=9)
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(data)
        assert done.wait(WAIT), "received %d of 100000 bytes" % sum(map(len, got))
    assert b"".join(got) == data


def test_on_data_view_released_by_the_handler(make_reactor, npollers):
    """Releasing the view on_data received is harmless: the next read of that
    length (short, and long) gets a new view."""
    seen = []

    class Releaser(goev.IOHandle):
        def on_data(self, data):
            seen.append(bytes(data))
            data.release()
            self.write(b"k")

    r, a = echo_server(make_reactor, npollers, factory=Releaser)
    with socket.create_connection(a.address, timeout=WAIT) as c:
        for msg in (b"a" * 10, b"b" * 10, b"c" * 5000, b"d" * 5000):
            c.sendall(msg)
            assert recv_exact(c, 1) == b"k"
    assert [m[:1] * len(m) == m for m in seen] and b"".join(seen) == b"a" * 10 + b"b" * 10 + b"c" * 5000 + b"d" * 5000


def test_on_data_under_trace_names_the_callbacks(backend, capfd):
    """Trace mode runs the same loop (no fast path): on_data and on_eof are
    called the same way, and the trace names them."""
    r = goev.Reactor(1, backend=backend, trace=True)
    try:
        a = goev.Acceptor(r, "127.0.0.1:0", DataEcho)
        r.start()
        with socket.create_connection(a.address, timeout=WAIT) as c:
            c.sendall(b"hello")
            assert recv_exact(c, 5) == b"hello"
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b""
    finally:
        r.stop()
    err = capfd.readouterr().err
    assert "DataEcho.on_data/on_eof()" in err
    assert "readv -> 5 bytes" in err and "readv -> 0 bytes (end of stream)" in err


def test_on_data_exception_closes_only_that_handler(make_reactor, caplog):
    """An exception in on_data is logged and closes that handler; the acceptor
    and other connections go on."""

    class Bad(goev.IOHandle):
        def on_data(self, data):
            if bytes(data) == b"boom":
                raise RuntimeError("boom in on_data")
            self.write(data)

    r, a = echo_server(make_reactor, factory=Bad)
    with socket.create_connection(a.address, timeout=WAIT) as good, \
            socket.create_connection(a.address, timeout=WAIT) as bad:
        bad.sendall(b"boom")
        assert recv_all(bad) == b""
        good.sendall(b"fine")
        assert recv_exact(good, 4) == b"fine"
    assert "boom in on_data" in caplog.text


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
    factory, handlers = _core_collecting(type("Refuse", (_Refuse,), {"mode": mode}))
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


def test_read_and_write_without_a_connection_raise_and_say_why():
    """A handler never accepted, connected or registered: read() and write()
    raise RuntimeError saying where they work (not AttributeError, not a
    silent drop), and ``error`` stays None.  Once closed, read() is end of
    stream and a write is dropped and counted."""
    h = goev.IOHandle()
    with pytest.raises(RuntimeError, match="not registered with a reactor: read in on_read"):
        h.read()
    with pytest.raises(RuntimeError, match="has no connection yet"):
        h.write(b"x")
    with pytest.raises(RuntimeError, match="has no connection yet"):
        h.async_write(b"x")
    assert h.error is None and h.dropped_bytes == 0
    h.close()
    assert h.read() == b""
    h.write(b"abc")
    assert h.dropped_bytes == 3 and h.error is None


class _UsedAfterClose(goev.IOHandle):
    """Echoes one chunk and closes; its on_close reads and writes once more."""
    late = None

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        self.write(data)
        return False

    def on_close(self):
        self.destroy()                         # the fd is gone (-1) from here
        view = self.read()
        self.write(b"late")
        self.late = (bytes(view), self.error, self.dropped_bytes)


def test_read_and_write_after_close_are_end_of_stream_and_dropped(make_reactor):
    """On a closed handler read() returns an empty view without setting
    ``error`` (no EBADF of an fd that is gone), and write() counts its bytes
    in ``dropped_bytes``."""
    handlers = []
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", lambda: handlers.append(_UsedAfterClose()) or handlers[-1])
    r.start()
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(b"once")
        assert recv_all(c) == b"once"
    wait_until(lambda: handlers and handlers[0].late is not None, what="on_close")
    assert handlers[0].late == (b"", None, 4)


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
    factory, handlers = _core_collecting(_NoSuper, b"hello>")
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
    factory, handlers = _core_collecting(_TrackedEcho)
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


def test_write_rejects_non_bytes_whether_or_not_data_is_queued(make_reactor):
    """On the poller thread, write(5) is a TypeError on the direct path and on
    the queued path alike (bytes(5) would have queued five NUL bytes)."""
    r = make_reactor(1)
    a, b = socket.socketpair()
    a.setblocking(False)
    h = goev.IOHandle()
    h._sock, h.fd = a, a.fileno()
    r.add_handler(h, h.fd, goev.EV_IN)
    r.start()
    results = queue.Queue()

    def on_poller():
        for queued in (False, True):
            if queued:
                h._enqueue(b"queued")          # a non-empty queue: the other path
            try:
                h.write(5)
                results.put("accepted")
            except TypeError:
                results.put("TypeError")
        results.put(h.pending_write_bytes)
    r.post_to(h, on_poller)
    assert [results.get(timeout=WAIT) for _ in range(3)] == ["TypeError", "TypeError", len(b"queued")]
    r.stop(timeout=WAIT)
    b.close()


class _Answer(goev.IOHandle):
    """Collects the request until EOF, answers it reversed, half-closes, and
    closes once the peer's FIN has been seen *and* its own FIN sent."""

    def on_open(self):
        self.buf = bytearray()
        self.closes = 0
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        type(self).opened.put(self)
        return True

    def on_read(self):
        d = self.read()
        if d is None:
            return True
        if d:
            self.buf += d
            return True
        self.write(bytes(self.buf[::-1]))
        self.shutdown_write()
        self.shutdown_write()                 # twice: one FIN
        return True                           # keep the handler: the peer may still say something

    def on_write_drained(self):
        pass

    def on_close(self):
        self.closes += 1
        self.destroy()


def test_double_half_close(make_reactor, npollers):
    """The client writes and half-closes; the server answers
    after EOF and half-closes too (shutdown_write twice = one FIN, after the
    flush).  The client gets the whole answer then EOF while its own socket is
    still open; then the server's close() ends it with on_close once."""
    H = type("A", (_Answer,), {"opened": queue.Queue()})
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    body = random_bytes(300000, 44)
    with socket.create_connection(a.address, timeout=WAIT) as c:
        h = H.opened.get(timeout=WAIT)
        c.sendall(body)
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == body[::-1]
        assert h.closes == 0 and not h.closed
        h.close()
        wait_until(lambda: h.closes == 1)


class _Pusher(goev.IOHandle):
    """Writes ``total`` bytes as soon as it opens (and echoes nothing)."""
    total = 0

    def on_open(self):
        self.closes = 0
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        type(self).opened.put(self)
        self.write(random_bytes(type(self).total, 7))
        return True

    def on_read(self):
        d = self.read()
        return d is None or bool(d)

    def on_close(self):
        self.closes += 1
        self.destroy()


def test_close_while_reading_paused_is_not_lost(make_reactor, goev_log):
    """A server handler is paused (queue above high water,
    so it stopped reading) because the client does not read; the client then
    closes with data unread (the kernel sends RST).  The handler gets on_close
    promptly with a ConnectionResetError/BrokenPipeError in ``error``, and no
    error is logged."""
    H = type("P", (_Pusher,), {"opened": queue.Queue(), "total": 16 << 20})
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c = socket.create_connection(a.address, timeout=WAIT)
    h = H.opened.get(timeout=WAIT)
    c.sendall(b"x" * 1000)
    wait_until(lambda: h.pending_write_bytes > 0)
    c.close()
    wait_until(lambda: h.closes == 1, what="on_close after the peer's reset")
    assert isinstance(h.error, (ConnectionResetError, BrokenPipeError)), h.error
    assert h.dropped_bytes > 0
    assert not goev_log.errors()


def test_peer_reset_mid_write_is_on_close_not_error(make_reactor, npollers, goev_log):
    """20 clients each reset (SO_LINGER 0) while the server
    is in the middle of writing megabytes to them and while it reads: every
    handler ends in on_close with the EPIPE/ECONNRESET in ``error``, nothing is
    logged at ERROR, and the reactor keeps serving."""
    H = type("P", (_Pusher,), {"opened": queue.Queue(), "total": 4 << 20})
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    hs = []
    for i in range(20):
        c = socket.create_connection(a.address, timeout=WAIT)
        h = H.opened.get(timeout=WAIT)
        if i % 2:
            recv_exact(c, 100000)             # let the write get going
        c.sendall(b"request")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        hs.append(h)
    wait_until(lambda: all(h.closes == 1 for h in hs), what="every on_close")
    for h in hs:
        assert h.error is None or isinstance(h.error, (ConnectionResetError, BrokenPipeError)), h.error
    assert not goev_log.errors()
    assert echo_ok(goev.Acceptor(r, "127.0.0.1:0", Echo).address)


def test_write_after_send_error_dropped_and_counted(make_reactor, goev_log):
    """After the peer reset the connection and a send failed,
    later write()/async_write() calls neither raise nor log: the bytes are
    dropped and counted in dropped_bytes."""
    H = type("P", (_Pusher,), {"opened": queue.Queue(), "total": 8 << 20})
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c = socket.create_connection(a.address, timeout=WAIT)
    h = H.opened.get(timeout=WAIT)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    wait_until(lambda: h.closes == 1)
    before = h.dropped_bytes
    on_poller(h.poller, h.write, b"12345")
    h.async_write(b"678")
    h.write(b"90")
    on_poller(h.poller, lambda: None)
    assert h.dropped_bytes == before + 10
    assert not goev_log.errors()


def test_server_closes_mid_read_100_clients(make_reactor, npollers, goev_log):
    """The server closes each of 100 connections after reading
    4 bytes while the client is still sending 256 KiB: every client sees EOF or
    a reset (never a hang), every handler gets on_close once, nothing logged."""
    closes = []

    class Four(goev.IOHandle):
        def on_read(self):
            d = self.read()
            return d is None or len(d) < 4 and bool(d)

        def on_close(self):
            closes.append(self)
            self.destroy()
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", Four)
    r.start()
    payload = b"z" * (256 * 1024)

    def one(results):
        with socket.create_connection(a.address, timeout=WAIT) as c:
            try:
                c.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass
            results.append(_eof_or_reset(c))
    results = []
    threads = [threading.Thread(target=one, args=(results,)) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert len(results) == 100 and all(results)
    wait_until(lambda: len(closes) == 100, what="100 on_close")
    assert len(set(map(id, closes))) == 100
    assert not goev_log.errors()


def test_water_marks_validated_and_drained_writes_elsewhere(make_reactor):
    """Set_write_buffer_limits rejects low > high and negatives,
    naming the value; with 1 KiB marks and tiny socket buffers a handler pauses
    and resumes, and on_write_drained may write to *another* handler (a relay),
    whose peer receives every byte."""
    h = goev.IOHandle()
    with pytest.raises(ValueError, match="2048"):
        h.set_write_buffer_limits(1024, 2048)
    with pytest.raises(ValueError, match="-1"):
        h.set_write_buffer_limits(-1)
    with pytest.raises(TypeError):
        h.set_write_buffer_limits("1024")
    relay = {}
    total = 512 * 1024
    data = random_bytes(total, 54)

    class Src(goev.IOHandle):
        def on_open(self):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            self.set_write_buffer_limits(1024, 256)
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.chunks = [data[i:i + 32768] for i in range(0, total, 32768)]
            self.drained = self.paused_seen = 0
            relay.setdefault("src", []).append(self)
            return True

        def on_read(self):
            d = self.read()
            if d is None:
                return True
            return bool(d)

        def push(self):
            self.write(b"s" * 65536)              # to its own slow peer: queues, pauses
            self.paused_seen += self._paused

        def on_write_drained(self):
            self.drained += 1
            first = relay["src"][0]
            if first is not self and self.chunks:  # relay a chunk to the *other* handler
                first.write(self.chunks.pop(0))
                if self.chunks:
                    self.push()

    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Src)
    r.start()
    c1 = socket.create_connection(a.address, timeout=WAIT)
    wait_until(lambda: len(relay.get("src", ())) == 1)
    c2 = socket.create_connection(a.address, timeout=WAIT)
    wait_until(lambda: len(relay.get("src", ())) == 2)
    first, second = relay["src"]
    n_chunks = len(second.chunks)
    got2 = []
    t = threading.Thread(target=lambda: got2.append(recv_exact(c2, 65536 * (n_chunks - 1))))
    t.start()
    on_poller(second.poller, second.push)    # start the chain
    got = recv_exact(c1, total)
    t.join(WAIT)
    assert got == data
    assert got2 and got2[0] == b"s" * (65536 * (n_chunks - 1))
    assert second.drained == n_chunks and second.paused_seen >= 1   # it did pause
    c1.close()
    c2.close()


class _Blast(goev.IOHandle):
    """On open, writes ``plan()``'s buffers (each with one write() call)."""

    def on_open(self):
        self.closes = 0
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        for buf in type(self).plan():
            self.write(buf)
        self.close()                          # flush, then close
        return True

    def on_close(self):
        self.closes += 1
        self.destroy()


def _read_verify(sock, expect_chunks, total):
    """Read ``total`` bytes then EOF, comparing with the concatenation of
    ``expect_chunks`` (an iterable of buffers) without building it."""
    sock.settimeout(WAIT * 3)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    it = iter(expect_chunks)
    cur = memoryview(b"")
    got = 0
    while True:
        n = sock.recv_into(view)
        if not n:
            break
        got += n
        off = 0
        while off < n:
            if not len(cur):
                cur = memoryview(next(it))
            k = min(len(cur), n - off)
            if view[off:off + k] != cur[:k]:
                raise AssertionError("stream differs near byte %d" % (got - n + off))
            cur = cur[k:]
            off += k
    return got


def test_60mib_single_write(make_reactor):
    """One write() of 60 MiB (most of it queued at once) arrives
    exactly, then EOF; nothing is left queued or dropped."""
    big = random_bytes(60 << 20, 56)
    H = type("B", (_Blast,), {"plan": staticmethod(lambda: [big])})
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    with socket.create_connection(a.address, timeout=WAIT) as c:
        assert _read_verify(c, [big], len(big)) == len(big)


@pytest.mark.slow
def test_10000_writes_of_100kib(make_reactor):
    """10 000 write() calls of 100 KiB each (1000 MiB queued
    behind a socket the client drains at its own pace; the gathered sendmsg
    path): every byte arrives, in order, then EOF."""
    chunks = [bytes([i]) * 1024 + random_bytes(100 * 1024 - 1024, i) for i in range(7)]
    H = type("B", (_Blast,), {"plan": staticmethod(lambda: (chunks[i % 7] for i in range(10000)))})
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    with socket.create_connection(a.address, timeout=WAIT) as c:
        got = _read_verify(c, (chunks[i % 7] for i in range(10000)), 10000 * 100 * 1024)
    assert got == 10000 * 100 * 1024


def test_random_chunks_both_ways_tiny_sndbuf(make_reactor, npollers):
    """Both directions at once with SO_SNDBUF of 10 000 on
    both ends: the server streams 1 MB in seeded random-size write()s while it
    reads and checks the client's own 1 MB (random-size sendall()s), then each
    side half-closes; each side gets the other's exact bytes, then EOF."""
    seed = 2024
    rnd = random.Random(seed)
    down = random_bytes(1 << 20, seed)
    up = random_bytes(1 << 20, seed + 1)
    res = {}

    class Both(goev.IOHandle):
        def on_open(self):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 10000)
            self.got = bytearray()
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            r2 = random.Random(seed + 2)
            pos = 0
            while pos < len(down):
                n = r2.randint(1, 30000)
                self.write(down[pos:pos + n])
                pos += n
            self.shutdown_write()
            return True

        def on_read(self):
            d = self.read()
            if d is None:
                return True
            if d:
                self.got += d
                return True
            res["up"] = bytes(self.got)
            self.close()
            return True
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", Both)
    r.start()
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 10000)
    c.connect(a.address)

    def sender():
        pos = 0
        while pos < len(up):
            n = rnd.randint(1, 30000)
            c.sendall(up[pos:pos + n])
            pos += n
        c.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=sender)
    t.start()
    got = bytearray()
    c.settimeout(WAIT)
    rr = random.Random(seed + 3)
    while True:
        chunk = c.recv(rr.randint(1, 30000))
        if not chunk:
            break
        got += chunk
    t.join(WAIT)
    c.close()
    assert bytes(got) == down
    wait_until(lambda: "up" in res)
    assert res["up"] == up


def test_abort_variants_leave_reactor_clean(make_reactor, goev_log):
    """Abort twice; abort then close; close then abort; abort
    from inside on_read; abort with a full queue (the peer gets a reset, the
    queue is counted as dropped); abort from on_open; a callback that raises
    after abort.  Each handler gets on_close once, errors only for the raise,
    and afterwards the poller holds no handler and no timer but the listener's."""
    events = []

    class Ab(goev.IOHandle):
        def on_open(self):
            self.n_close = 0
            mode = type(self).modes.pop(0)
            self.mode = mode
            if mode == "in_on_open":
                self.abort()
                return True
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.schedule_timer(60000)
            if mode == "full_queue":              # reading pauses (backpressure): abort from a timer
                self.write(b"q" * (32 << 20))
                self.schedule_timer(20)
            return True

        def on_timeout(self, now_ms):
            if self.mode == "full_queue":
                self.queued_at_abort = self.pending_write_bytes
                self.abort()
            return False

        def on_read(self):
            d = self.read()
            if d is None:
                return True
            m = self.mode
            if m == "twice":
                self.abort()
                self.abort()
            elif m == "abort_close":
                self.abort()
                self.close()
            elif m == "close_abort":
                self.write(b"x" * (4 << 20))
                self.close()
                self.abort()
            elif m == "raise_after":
                self.abort()
                raise RuntimeError("after abort")
            return True

        def on_close(self):
            self.n_close += 1
            events.append(self)
            self.destroy()
    modes = ["twice", "abort_close", "close_abort", "full_queue", "raise_after", "in_on_open"]
    Ab.modes = list(modes)
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Ab)
    r.start()
    for m in modes:
        try:
            c = socket.create_connection(a.address, timeout=WAIT)
        except ConnectionResetError:
            # abort in on_open resets at once; connect() with a timeout reads
            # SO_ERROR after the socket turns writable, and the RST may be first
            assert m == "in_on_open"
            continue
        if m not in ("in_on_open", "full_queue"):
            c.sendall(b"go")
        if m == "full_queue":                 # read nothing until the abort happened
            wait_until(lambda: any(h.mode == m for h in events), what="the abort")
            with pytest.raises(ConnectionResetError):
                recv_all(c)
        else:
            _eof_or_reset(c)
        c.close()
    wait_until(lambda: len(events) == len(modes), what="every on_close")
    assert all(h.n_close == 1 for h in events)
    full = next(h for h in events if h.mode == "full_queue")
    assert full.queued_at_abort > 0 and full.dropped_bytes == full.queued_at_abort
    p = r.pollers[0]
    on_poller(p, lambda: None)
    assert list(p._handlers.values()) == [a]
    assert not [t for t in p._timers if t[2] is not None]
    errs = [rec.getMessage() for rec in goev_log.errors()]
    assert len(errs) == 1 and "callback" in errs[0]


def test_closed_handler_releases_fd_and_references(make_reactor, npollers):
    """After a connection ends, its socket is closed (fd -1, the
    number no longer names our socket) and the reactor keeps no reference to the
    handler: a weakref dies after gc (no cycle through the poller's table, the
    closing list, timers or the inbox)."""
    H, got = _reliability_collecting(Echo)
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    refs = []
    for i in range(5):
        c, h = _connect_pair(a, got)
        c.sendall(b"abc")
        recv_exact(c, 3)
        fd = h.fd
        ino = os.fstat(fd).st_ino             # the connection's socket inode
        refs.append(weakref.ref(h))
        c.close()
        wait_until(lambda: h.fd == -1 and h.closed, what="close")
        assert h._sock is None
        try:                                  # closed: EBADF, or the number reused by another file
            assert os.fstat(fd).st_ino != ino
        except OSError:
            pass
        del h
    for p in r.pollers:
        on_poller(p, lambda: None)
    while not got.empty():
        got.get()
    gc.collect()
    alive = [w() for w in refs if w() is not None]
    assert not alive, "handlers still referenced: %r" % ([x for x in gc.get_referrers(alive[0]) if x is not alive],)


class _BigWriterRecorder(goev.IOHandle):
    """Queues a write the kernel cannot take at once (EV_OUT armed while
    reading), and records what it reads."""
    got = None

    def on_open(self):
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        self.set_write_buffer_limits(high=64 << 20)        # reading is not paused
        ok = super().on_open()
        self.write(b"z" * (8 << 20))
        return ok

    def on_read(self):
        data = self.read()
        if data:
            type(self).got.append(bytes(data))
        return data is None or bool(data)

    def on_close(self):
        type(self).got.append(None)
        super().on_close()


def test_bytes_before_a_reset_are_read_while_a_flush_is_pending(make_reactor, npollers):
    """A handler with queued writes (EV_OUT armed) and reading on: the peer
    sends data, then resets.  The data is read before the failing flush
    closes the handler (readable first when HUP/ERR is reported)."""
    _BigWriterRecorder.got = []
    r, a = echo_server(make_reactor, npollers, factory=_BigWriterRecorder)
    c = socket.create_connection(a.address)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    wait_until(lambda: any(h.pending_write_bytes for p in r.pollers for h in list(p._handlers.values())
                           if isinstance(h, _BigWriterRecorder)), what="a queued write")
    c.sendall(b"hello")
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()                                             # RST, unread data and all
    wait_until(lambda: None in _BigWriterRecorder.got, what="on_close")
    assert b"".join(x for x in _BigWriterRecorder.got if x) == b"hello"


class _Resetter(goev.IOHandle):
    made = None

    def on_open(self):
        type(self).made.append(weakref.ref(self))
        return super().on_open()


def test_reset_handlers_are_freed_by_reference_counting(make_reactor):
    """A handler ended by a reset keeps its error without the traceback (which
    would hold the frames that hold the handler): with the garbage collector
    off, it is freed as soon as goev lets go of it."""
    _Resetter.made = []
    r, a = echo_server(make_reactor, 1, factory=_Resetter)
    gc.disable()
    try:
        for _ in range(20):
            c = socket.create_connection(a.address)
            c.sendall(b"x")
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        wait_until(lambda: len(_Resetter.made) == 20, what="20 connections")
        wait_until(lambda: len(r.pollers[0]._handlers) == 1, what="every reset one closed")
        # (each check posts a no-op: see the TLS test below)
        wait_until(lambda: (r.post(lambda: None), all(w() is None for w in _Resetter.made))[1],
                   what="the reset handlers to be freed without a collection")
    finally:
        gc.enable()


# -- what a callback returns; on_open that registers nothing -----------------------------

class _NoReturnEcho(goev.IOHandle):
    """The handler a Python programmer writes first: no return statement."""
    closed = None

    def on_read(self):
        data = self.read()
        if data:
            self.write(data)

    def on_close(self):
        type(self).closed.set()
        super().on_close()


def test_on_read_returning_none_keeps_the_connection_until_end_of_stream(make_reactor, npollers):
    """None keeps the connection (many reads), and closes it after end of stream."""
    _NoReturnEcho.closed = threading.Event()
    r, a = echo_server(make_reactor, npollers, factory=_NoReturnEcho)
    with socket.create_connection(a.address) as c:
        for i in range(3):
            c.sendall(b"round %d" % i)
            assert recv_exact(c, 7) == b"round %d" % i
        assert not _NoReturnEcho.closed.is_set()
        c.shutdown(socket.SHUT_WR)
        assert _NoReturnEcho.closed.wait(WAIT)
        c.settimeout(WAIT)
        assert c.recv(10) == b""


class _HalfCloseAnswer(goev.IOHandle):
    """At end of stream, answers and returns True: the half-closed connection stays."""

    def on_read(self):
        data = self.read()
        if data is not None and not data:
            self.write(b"bye")
            self.call_me = self.reactor.call_later(0.05, self.close)
            return True


def test_on_read_true_at_end_of_stream_keeps_a_half_closed_connection(make_reactor):
    r, a = echo_server(make_reactor, 1, factory=_HalfCloseAnswer)
    with socket.create_connection(a.address) as c:
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"bye"


class _Greeter(goev.IOHandle):
    """on_open writes a greeting and returns None: goev registers it for reading."""

    def on_open(self):
        self.write(b"hello\n")

    def on_read(self):
        data = self.read()
        if data:
            self.write(data)


class _SelfRegistering(goev.IOHandle):
    """on_open registers the handler itself (EV_IN | EV_OUT) and returns None."""

    def on_open(self):
        self.reactor.add_handler(self, self.fd, goev.EV_IN | goev.EV_OUT)

    def on_write(self):
        self.write(b"ready\n")
        self.reactor.remove_event(self.fd, goev.EV_OUT)

    def on_read(self):
        data = self.read()
        if data:
            self.write(data)


@pytest.mark.parametrize("factory, first", [(_Greeter, b"hello\n"), (_SelfRegistering, b"ready\n")])
def test_on_open_returning_none(make_reactor, npollers, goev_log, factory, first):
    """An on_open that returns None and registers nothing is registered for
    EV_IN by goev; one that registered itself is left alone (no error)."""
    r, a = echo_server(make_reactor, npollers, factory=factory)
    with socket.create_connection(a.address) as c:
        assert recv_exact(c, len(first)) == first
        c.sendall(b"echo")
        assert recv_exact(c, 4) == b"echo"
    assert not goev_log.errors()


# =============================================================================
# 7. _Poller: one thread, one loop; the hooks; the slow-callback watchdog
# =============================================================================
# Cross-thread work: async_write, post, post_to and the cache, in order and
# without a lost wake-up; posts racing a stop; the watchdog.


def test_stop_from_a_signal_handler_inside_a_goev_lock_does_not_deadlock(make_reactor, npollers):
    """A signal handler runs on the main thread between two bytecodes, maybe while
    that thread is inside wake() (holding the waker's lock).  If it calls stop(),
    stop() must not wait for pollers that need that lock to close their wakers
    (this hung examples/http_hello.py once: its Date refresh posts every second)."""
    r = make_reactor(npollers)
    r.start()
    with r.pollers[-1]._waker._lock:     # as if SIGTERM arrived inside wake()
        r.stop()                         # returns: does not wait for the pollers
    r.stop(timeout=WAIT)                 # outside the lock it waits, and they are done
    assert r.stopped


def block_poller(r, h):
    """Park h's poller inside a posted callback; returns the Event that releases it."""
    started, release = threading.Event(), threading.Event()

    def blocker():
        started.set()
        release.wait(WAIT)
    r.post_to(h, blocker)
    assert started.wait(WAIT), "the poller never ran the posted callback"
    return release


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


# start() returns before each poller thread runs its loop.  A call made from
# another thread in that window is posted like any later one, in order with
# the posts before it.  shutdown_write() and close() used to act at once there
# (they tested "the poller is running", write() "this is not the poller's
# thread"): the FIN went out ahead of the data just posted, which was then
# dropped.  The suite hit it under load: a client got EOF and no byte.  The
# pollers are held at the start of their threads, so the window stays open.
# (Bare fds of the test's own: goev neither half-closes nor closes them, so
# what shows the order is that every byte arrives and none is dropped.)
def test_calls_between_start_and_the_first_pass_keep_their_order(make_reactor, npollers):
    r = make_reactor(npollers)
    gate = threading.Event()
    entered = []
    for p in r.pollers:
        p._run = (lambda run: lambda: (gate.wait(WAIT), entered.append(1), run()))(p._run)
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        _start_gated_and_call(r, gate, pairs, entered)
    finally:
        gate.set()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def _start_gated_and_call(r, gate, pairs, entered):
    hs = [_RawReader() for _ in pairs]
    for (ours, _), h in zip(pairs, hs):
        ours.setblocking(False)
        r.add_handler(h, ours.fileno(), goev.EV_IN)
    big = random_bytes(1 << 20, 7)                      # more than the kernel takes at once
    r.start()
    hs[0].write(b"hello")
    hs[0].shutdown_write()
    hs[1].write(big)
    hs[1].close()
    hs[2].async_write(b"x")
    r.remove_event(hs[2].fd, goev.EV_IN)            # reading stops after the write, not before
    assert not entered, "a poller ran before the gate opened"
    gate.set()
    for _ in range(2):
        _round_trip(r)
    assert [h.dropped_bytes for h in hs] == [0, 0, 0]
    peers = [theirs for _, theirs in pairs]
    assert recv_exact(peers[0], 5) == b"hello"
    assert recv_exact(peers[1], len(big)) == big
    wait_until(lambda: hs[1].closes == 1, what="on_close after the flush")
    assert recv_exact(peers[2], 1) == b"x"
    peers[2].sendall(b"unread")
    for _ in range(2):
        _round_trip(r)
    assert hs[2].reads == 0 and not hs[2].closed


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
        me = r.current_poller()
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
    # each poller runs its own inbox in order: its sync_cache item before this post
    r.post(lambda: log.append(r.current_poller().cache.get("k")))
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
@pytest.mark.slow
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


# A process-directed signal may land on any thread that does not block it.
# There only its C handler runs; the Python handler waits for the main thread,
# which sleeps in poller 0's epoll_wait/poll: before run() pointed
# signal.set_wakeup_fd at its loop, it slept on until the next I/O event --
# forever on an idle server (a SIGTERM seemingly ignored; a signal landing
# on the main thread just before the syscall did the same).  Here the signal
# is sent to a thread of the test's own once the main thread is asleep in
# poll.  The previous wakeup fd is back once run() returns.
def test_signal_on_another_thread_wakes_run_on_the_main_thread(make_reactor, npollers):
    r = make_reactor(npollers)
    ran, failed = [], []
    main = threading.get_native_id()

    def asleep_in_poll():
        with open("/proc/self/task/%d/wchan" % main) as f:
            return "poll" in f.read()           # do_epoll_wait, poll_schedule_timeout

    def sender():
        try:
            wait_until(asleep_in_poll, what="the main thread asleep in poll")
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)   # lands here
            wait_until(lambda: ran, timeout=5, what="the handler to run")
        except AssertionError as e:
            failed.append(e)
            r.post(r.stop)                      # the waker: run() returns anyway
    pr, pw = os.pipe()
    os.set_blocking(pw, False)
    prev = signal.set_wakeup_fd(pw)
    old = signal.signal(signal.SIGUSR1, lambda *_: (ran.append(1), r.stop()))
    t = threading.Thread(target=sender)
    t.start()
    try:
        r.run()
    finally:
        signal.signal(signal.SIGUSR1, old)
        restored = signal.set_wakeup_fd(prev)
        t.join(WAIT)
        os.close(pr)
        os.close(pw)
    assert not failed, failed
    assert r.stopped and ran == [1]
    assert restored == pw, "run() did not give the previous wakeup fd back"


def test_post_from_poller_inside_timer_wakes_next_pass(make_reactor):
    """A post made on the poller's own thread from inside a timer
    callback (the waker is not needed there, but the loop must not sleep on it)
    runs promptly in the next pass, even with no I/O and no other timer."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    done = threading.Event()
    ran_on = []

    def in_timer():
        p._post(lambda: (ran_on.append(r.current_poller()), done.set()))
        r.post(lambda: None)
    r.call_later(0.01, in_timer)
    assert done.wait(5.0), "a post from inside a timer waited for an unrelated wake-up"
    assert ran_on == [p]


def test_posts_interleaved_with_timer_churn_exact_count(make_reactor, npollers):
    """4 threads x 1024 posts interleaved with call_later /
    cancel churn from the same threads: every post runs exactly once, no
    cancelled timer runs, every kept timer runs once.  A cancel from another
    thread cannot stop a callback that is already due (the producer may be
    preempted between call_later and cancel for longer than a few ms under
    load: the suite saw it), so the timers it cancels are 0.5 s away."""
    r = make_reactor(npollers)
    r.start()
    lock = threading.Lock()
    counts = {"post": 0, "kept": 0, "cancelled": 0}

    def bump(k):
        with lock:
            counts[k] += 1

    def producer(seed):
        rnd = random.Random(seed)
        for i in range(1024):
            r.post(bump, "post") if npollers == 1 else r.post_to(anchor, bump, "post")
            if i % 2:
                t = r.call_later(0.5 + rnd.random() * 0.02, bump, "cancelled")
                t.cancel()
            else:
                r.call_later(rnd.random() * 0.02, bump, "kept")
    anchor = goev.IOHandle()
    a, b = socket.socketpair()
    try:
        if npollers > 1:                          # post_to needs a registered handler
            a.setblocking(False)
            anchor._sock, anchor.fd, anchor.reactor = a, a.fileno(), r
            r.add_handler(anchor, a.fileno(), goev.EV_IN)
        threads = [threading.Thread(target=producer, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        past = time.monotonic() + 0.52            # every cancelled deadline is before this
        wait_until(lambda: counts["post"] == 4096 and counts["kept"] == 2048, what="all posts and timers")
        wait_until(lambda: time.monotonic() > past, what="the cancelled timers' deadlines")
        for _ in range(2):                        # a whole pass after them: any misfire has run
            _round_trip(r)
        assert counts == {"post": 4096, "kept": 2048, "cancelled": 0}
    finally:
        b.close()
        if npollers == 1:
            a.close()


class _SlowSink(goev.IOHandle):
    """Reads nothing: lets the client's unread data pile up (for close races)."""

    def on_open(self):
        self.closes = 0
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        return True

    def on_read(self):
        d = self.read()
        return d is None or bool(d)

    def on_close(self):
        self.closes += 1
        self.destroy()


@pytest.mark.parametrize("how", ["close", "abort"])
def test_async_writes_racing_handler_close_account_every_byte(make_reactor, npollers, goev_log, how):
    """4 threads async_write numbered
    records to one handler while another thread closes (or aborts) it.  Nothing
    raises or logs; on_close runs once; with close() every byte is either
    received by the client or counted in dropped_bytes, and what arrived is a
    clean prefix-ordered sequence of whole records per thread."""
    H, got = _reliability_collecting(_SlowSink)
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c, h = _connect_pair(a, got)
    written = [0] * 4
    go = threading.Event()

    errors_in_threads = []

    def producer(k):
        go.wait()
        try:
            for i in range(3000):
                rec = struct.pack("!BI", k, i) + b"." * 59
                h.async_write(rec) if i % 2 else h.write(rec)
                written[k] += len(rec)
        except BaseException as e:
            errors_in_threads.append(repr(e))
            raise
    threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    go.set()
    time.sleep(0.005)
    getattr(h, how)()
    for t in threads:
        t.join()
    try:
        data = recv_all(c)
    except ConnectionResetError:
        data = None
    c.close()
    wait_until(lambda: h.closes == 1, what="on_close")
    on_poller(h.poller, lambda: None)        # FIFO: every posted write has run (or been dropped)
    assert h.closes == 1 and not goev_log.errors() and not errors_in_threads
    if how == "close":
        assert data is not None
        per = [0] * 4
        for off in range(0, len(data), 64):
            per[data[off]] += 1
        assert len(data) + h.dropped_bytes == sum(written), (per, written)
        assert len(data) % 64 == 0
        nxt = [0] * 4
        for off in range(0, len(data), 64):
            k, i = struct.unpack("!BI", data[off:off + 5])
            assert i == nxt[k], "record %d of thread %d out of order" % (i, k)
            nxt[k] += 1
    else:
        assert h.dropped_bytes <= sum(written)


def test_exception_in_posted_callback_is_logged(make_reactor, npollers, goev_log):
    """A posted callback that raises is logged on "goev" and
    the loop keeps running; the posts after it still run, in order."""
    r = make_reactor(npollers)
    r.start()
    seen = []

    def boom():
        raise RuntimeError("posted boom")
    for p in r.pollers:
        p._post(seen.append, 1)
        p._post(boom)
        p._post(lambda: seen.append(2) if seen.count(1) else seen.append("out of order"))
    wait_until(lambda: len(seen) == 2 * npollers)
    assert sorted(seen) == [1] * npollers + [2] * npollers
    errs = [rec for rec in goev_log.errors() if "posted" in rec.getMessage()]
    assert len(errs) == npollers and "posted boom" in str(errs[0].exc_info[1])
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    assert echo_ok(a.address)


def test_broken_repr_in_error_path_is_contained(make_reactor, goev_log):
    """The error path itself hits a user bug -- a handler whose
    __repr__ raises, raising in on_read, then in on_close.  Both are logged (with
    a fallback repr), the handler is closed once, the loop keeps serving."""
    class Bad(goev.IOHandle):
        def __repr__(self):
            raise ValueError("repr is broken too")

        def on_read(self):
            raise RuntimeError("read boom")

        def on_close(self):
            self.destroy()
            raise RuntimeError("close boom")
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Bad)
    b = goev.Acceptor(r, "127.0.0.1:0", Echo)
    r.start()
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(b"x")
        assert _eof_or_reset(c)
    wait_until(lambda: len(goev_log.errors()) >= 2, what="two error logs")
    msgs = [rec.getMessage() for rec in goev_log.errors()]
    assert any("Bad object at" in m for m in msgs), msgs
    assert echo_ok(b.address)


class _Slow(goev.IOHandle):
    def on_read(self):
        data = self.read()
        if data:
            if bytes(data) == b"slow":
                time.sleep(0.3)                     # the blocked callback under test
            self.write(data)
        return data is None or bool(data)


def test_slow_callback_watchdog(make_reactor, goev_log):
    """Reactor(slow_callback_ms=N): a handler callback, a timer or a posted
    function that holds its poller longer than N ms logs one WARNING naming
    the handler class and the callback; fast ones log nothing."""
    r = make_reactor(1, slow_callback_ms=100)
    a = goev.Acceptor(r, "127.0.0.1:0", _Slow)
    r.start()
    with socket.create_connection(a.address) as c:
        c.sendall(b"fast")
        assert recv_exact(c, 4) == b"fast"
        c.sendall(b"slow")
        assert recv_exact(c, 4) == b"slow"
    done = threading.Event()

    def sleepy():
        time.sleep(0.3)

    r.call_later(0, sleepy)
    r.post(sleepy)
    r.post(done.set)
    assert done.wait(WAIT)
    wait_until(lambda: len([x for x in goev_log.records if x.levelno == logging.WARNING]) >= 3,
               what="three warnings")
    warnings = [x.getMessage() for x in goev_log.records if x.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings
    assert re.fullmatch(r"_Slow\.on_read held poller 0 for \d+ ms", warnings[0]), warnings
    assert int(warnings[0].split()[-2]) >= 300
    assert all(re.fullmatch(r".*sleepy held poller 0 for \d+ ms", w) for w in warnings[1:]), warnings


def test_slow_callback_watchdog_validated_and_off_by_default(make_reactor):
    with pytest.raises(ValueError):
        goev.Reactor(1, slow_callback_ms=-1)
    with pytest.raises(TypeError):
        goev.Reactor(1, slow_callback_ms="5")
    assert make_reactor(1).pollers[0]._observer is None


class _SlowOpenClose(goev.IOHandle):
    def on_open(self):
        time.sleep(0.25)                        # the blocked callbacks under test
        return super().on_open()

    def on_close(self):
        time.sleep(0.25)
        super().on_close()


def test_slow_callback_watchdog_names_on_close_and_the_accept(make_reactor, goev_log):
    """on_close is named as itself; a slow on_open holds the callback that
    accepted the connection, and that one is named."""
    r = make_reactor(1, slow_callback_ms=100)
    a = goev.Acceptor(r, "127.0.0.1:0", _SlowOpenClose)
    r.start()
    socket.create_connection(a.address).close()
    wait_until(lambda: len([x for x in goev_log.records if x.levelno == logging.WARNING]) >= 2,
               what="two warnings")
    names = [x.getMessage().split()[0] for x in goev_log.records if x.levelno == logging.WARNING]
    assert "Acceptor.on_read" in names and "_SlowOpenClose.on_close" in names, names


# -- threads: race-hunting stress --------------------------------------------------
# Many threads at once against several pollers: async_write, post, post_to,
# close, call_later + cancel, add_handler and stop.  Each test is bounded (a
# few thousand operations, a few seconds on a loaded machine) and checks
# exact results -- byte-exact order per handler and per producer thread,
# exact counters -- so a lost update, a lost wake-up or a double close shows
# as a wrong number or a timeout, not as a flaky timing.  They run on the GIL
# builds and on free-threaded CPython with PYTHON_GIL=0 (.ci/run).

STRESS_THREADS = 6


class _StressTracked(goev.IOHandle):
    """A server-side handler that records itself and counts its on_close calls;
    it reads and discards whatever the peer sends, closing at end of stream."""

    def __init__(self, made):
        self.made = made
        self.closes = 0

    def on_open(self):
        super().on_open()
        self.made.append(self)

    def on_read(self):
        data = self.read()
        return data is None or bool(data)

    def on_close(self):
        self.closes += 1
        super().on_close()


def _tracked_server(make_reactor, pollers, n):
    """A reactor with ``pollers`` pollers and ``n`` accepted connections:
    (reactor, acceptor, server handlers, client sockets)."""
    made = []
    r, a = echo_server(make_reactor, pollers, factory=lambda: _StressTracked(made))
    clients = [socket.create_connection(a.address) for _ in range(n)]
    wait_until(lambda: len(made) == n and all(h.poller is not None and h.poller._handlers.get(h.fd) is h
                                              for h in made), what="accepts and registrations")
    return r, a, made, clients


def _run_threads(targets):
    """Start one thread per callable, all released at once; re-raise the first error."""
    go = threading.Event()
    errors = []

    def wrap(fn):
        go.wait(WAIT)
        try:
            fn()
        except BaseException as e:
            errors.append(e)
    ts = [threading.Thread(target=wrap, args=(fn,)) for fn in targets]
    for t in ts:
        t.start()
    go.set()
    for t in ts:
        t.join(WAIT * 3)
    assert not any(t.is_alive() for t in ts), "a stress thread hangs"
    if errors:
        raise errors[0]


def _records(data):
    """b"t:k;" records -> {t: [k, ...]} in arrival order."""
    out: dict = {}
    for rec in data.split(b";")[:-1]:
        t, k = rec.split(b":")
        out.setdefault(int(t), []).append(int(k))
    return out


def _peers(made, clients):
    """The client socket of each server handler (matched by port)."""
    ports = {c.getsockname()[1]: c for c in clients}
    return [ports[h.sock.getpeername()[1]] for h in made]


def test_stress_async_write_from_many_threads_keeps_each_threads_order(make_reactor):
    """Threads async_write to handlers on three pollers while others post, post_to
    and schedule/cancel timers: every handler's peer gets every record of every
    thread, each thread's in the order it wrote them; every post runs exactly
    once; no cancelled timer runs and every other one runs once."""
    n_conns, per_thread, n_posts, n_timers = 6, 300, 500, 300
    r, a, made, clients = _tracked_server(make_reactor, 3, n_conns)
    peer = _peers(made, clients)
    size = sum(len(b"%d:%d;" % (t, k)) for t in range(STRESS_THREADS) for k in range(per_thread))
    got = [b""] * n_conns

    def reader(i):
        got[i] = recv_exact(peer[i], size)
    readers = [threading.Thread(target=reader, args=(i,)) for i in range(n_conns)]
    for t in readers:
        t.start()
    # Counters kept per poller and bumped on that poller's thread only.
    posts = [[0] for _ in r.pollers]
    posts_to = [[0] * n_conns for _ in r.pollers]
    fired = [[] for _ in r.pollers]
    cancelled = []

    def on_post():
        posts[r.current_poller().index][0] += 1

    def on_post_to(i):
        posts_to[r.current_poller().index][i] += 1

    def writer(t):
        def run():
            for k in range(per_thread):
                for h in made:
                    h.async_write(b"%d:%d;" % (t, k))
        return run

    def poster():
        for _ in range(n_posts):
            r.post(on_post)

    def poster_to():
        for _ in range(200):
            for i, h in enumerate(made):
                r.post_to(h, on_post_to, i)

    def timers():
        for k in range(n_timers):
            p = r.pollers[k % 3]
            t = p.call_later(0.0 if k % 2 else 60.0, fired[p.index].append, k)
            if k % 3 == 0:
                t.cancel()              # (a due one may already be running: it may fire)
                cancelled.append(k)
    _run_threads([writer(t) for t in range(STRESS_THREADS)] + [poster, poster_to, timers])
    for t in readers:
        t.join(WAIT * 3)
    for i in range(n_conns):
        assert len(got[i]) == size, i
        recs = _records(got[i])
        for t in range(STRESS_THREADS):
            assert recs[t] == list(range(per_thread)), (i, t)
    due = {k for k in range(n_timers) if k % 2 and k % 3}      # zero delay, not cancelled
    racing = {k for k in range(n_timers) if k % 2 and not k % 3}   # zero delay, then cancelled
    wait_until(lambda: {k for f in fired for k in f} >= due, what="the due timers")
    wait_until(lambda: sum(p[0] for p in posts) == n_posts * 3, what="the posts")
    wait_until(lambda: sum(map(sum, posts_to)) == 200 * n_conns, what="the post_to calls")
    assert [p[0] for p in posts] == [n_posts] * 3
    assert [sum(c[i] for c in posts_to) for i in range(n_conns)] == [200] * n_conns
    ran = sorted(k for f in fired for k in f)
    assert len(ran) == len(set(ran)) and due <= set(ran) <= due | racing     # each at most once
    assert all(h.dropped_bytes == 0 and h.closes == 0 for h in made)
    close_all(*clients)


def test_stress_close_racing_async_writes_accounts_for_every_byte(make_reactor):
    """Writer threads stream to handlers on three pollers while other threads
    close them: each peer receives a prefix of what its writer wrote, in
    order, and received + dropped_bytes is exactly what was written; every
    handler gets on_close exactly once."""
    n_conns, per_thread = 6, 2000
    r, a, made, clients = _tracked_server(make_reactor, 3, n_conns)
    peer = _peers(made, clients)
    got = [b""] * n_conns

    def reader(i):
        got[i] = recv_all(peer[i])
    readers = [threading.Thread(target=reader, args=(i,)) for i in range(n_conns)]
    for t in readers:
        t.start()
    written = [0] * n_conns
    halfway = [threading.Event() for _ in range(n_conns)]

    def writer(i):
        def run():
            for k in range(per_thread):
                rec = b"%d:%d;" % (i, k)
                made[i].async_write(rec)
                written[i] += len(rec)                    # this thread's slot only
                if k == per_thread // 2:
                    halfway[i].set()
        return run

    def closer(i):
        def run():
            halfway[i].wait(WAIT)
            made[i].close()
            made[i].close()                               # idempotent
        return run

    def early_closer():
        for i in range(0, n_conns, 2):
            made[i].close()
    _run_threads([writer(i) for i in range(n_conns)] + [closer(i) for i in range(n_conns)] + [early_closer])
    for t in readers:
        t.join(WAIT * 3)
    wait_until(lambda: all(h.closes for h in made), what="every on_close")
    wait_until(lambda: all(len(got[i]) + made[i].dropped_bytes == written[i] for i in range(n_conns)),
               what="every byte received or counted as dropped")
    for i in range(n_conns):
        recs = _records(got[i]).get(i, [])
        assert recs == list(range(len(recs)))            # a prefix, in order
    assert [h.closes for h in made] == [1] * n_conns
    close_all(*clients)


@pytest.mark.parametrize("delay_ms", [0, 5, 20])
def test_stress_stop_racing_writes_posts_and_registrations(make_reactor, delay_ms):
    """stop() while threads async_write, post, post_to, schedule and cancel
    timers and register handlers on three pollers: stop returns with every
    poller stopped, every handler -- including a registration that came too
    late to run -- gets on_close exactly once, and every written byte is
    either received or counted in dropped_bytes."""
    r, a, made, clients = _tracked_server(make_reactor, 3, 6)
    peer = _peers(made, clients)
    got = [b""] * len(made)

    def reader(i):
        got[i] = recv_all(peer[i])
    readers = [threading.Thread(target=reader, args=(i,)) for i in range(len(made))]
    for t in readers:
        t.start()
    written = [0] * len(made)
    late, pairs = [], []

    def writer(i):
        def run():
            for k in range(3000):
                rec = b"%d:%d;" % (i, k)
                made[i].async_write(rec)
                written[i] += len(rec)
        return run

    def poster():
        for k in range(3000):
            r.post(len, ())
            r.post_to(made[k % len(made)], len, ())
            if k % 10 == 0:
                try:
                    r.call_later(0.0 if k % 20 else 60.0, len, ()).cancel()
                except RuntimeError:                       # stopped
                    return

    def registrar():
        for _ in range(200):
            s1, s2 = socket.socketpair()
            pairs.append((s1, s2))
            s1.setblocking(False)
            h = _StressTracked(late)
            try:
                r.add_handler(h, s1.fileno(), goev.EV_IN)
            except RuntimeError:                           # stopped: never registered
                h.closes = 1
            late.append(h)

    def stopper():
        time.sleep(delay_ms / 1000.0)
        r.stop(timeout=WAIT)
    _run_threads([writer(i) for i in range(len(made))] + [poster, registrar, stopper])
    assert r.stopped
    for t in readers:
        t.join(WAIT * 3)
    wait_until(lambda: all(h.closes for h in made + late), what="every on_close")
    assert [h.closes for h in made + late] == [1] * (len(made) + len(late))
    for i in range(len(made)):
        recs = _records(got[i]).get(i, [])
        assert recs == list(range(len(recs)))
        assert len(got[i]) + made[i].dropped_bytes == written[i]
    close_all(*clients, *(s for pair in pairs for s in pair))


def test_stress_posts_to_an_idle_poller_are_never_stranded(make_reactor):
    """Threads post to idle pollers and each waits for its post to run before
    the next: a lost wake-up (the inbox/wake-flag handshake) would leave a post
    waiting for an event that never comes, and time the test out."""
    r = make_reactor(2)
    r.start()

    def pinger(t):
        def run():
            p = r.pollers[t % 2]
            for _ in range(1000):
                done = threading.Event()
                p._post(done.set)
                assert done.wait(WAIT), "a post was stranded in the inbox"
        return run
    _run_threads([pinger(t) for t in range(4)])
    r.stop(timeout=WAIT)


# =============================================================================
# 8. Reactor: N pollers, placement, start/stop, cross-thread posts
# =============================================================================
# The life cycle: run / start / stop / shutdown, from any thread, a callback or
# a signal handler; Ctrl-C and SIGTERM; KeyboardInterrupt; bad arguments.


_CLOSE_REPORTING = '''
import logging, os, sys, goev
logging.basicConfig(level=logging.INFO, format="%(message)s")

class Echo(goev.IOHandle):
    def on_data(self, data):
        if bytes(data) == b"flood":
            self.write(b"x" * (64 << 20))   # more than the client will read: the drain waits
        else:
            self.write(data)

    def on_close(self):
        os.write(1, b"on_close %d\\n" % self.peer[1])   # one write: pollers run in parallel

with goev.Reactor(POLLERS) as r:
    goev.Acceptor(r, "127.0.0.1:8080", Echo)
    r.run(drain_timeout=DRAIN)
print("run returned", flush=True)
'''


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_runs_on_close_for_every_connection(backend, npollers, sig):
    """One signal: every open connection gets on_close before run() returns,
    and the program goes on after run() (exit 0)."""
    src = _CLOSE_REPORTING.replace("POLLERS", str(npollers)).replace("DRAIN", "60")
    p, port = _start_program(src, env={"GOEV_BACKEND": backend})
    clients = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(4)]
    try:
        for c in clients:
            c.sendall(b"ping")
            assert recv_exact(c, 4) == b"ping"
        p.send_signal(sig)
        out, err = p.communicate(timeout=WAIT)
        assert p.returncode == 0, err
        lines = out.splitlines()          # (wait_port's probe connection has its on_close too)
        assert {"on_close %d" % c.getsockname()[1] for c in clients} <= set(lines[:-1])
        assert len(set(lines)) == len(lines) and lines[-1] == "run returned"
        assert "%s: shutting down" % signal.Signals(sig).name in err and "Traceback" not in err
    finally:
        for c in clients:
            c.close()
        stop_child(p, signal.SIGKILL)


def test_second_stop_signal_stops_at_once(backend):
    """A connection whose queue cannot drain holds the graceful stop (up to its
    60 s drain timeout); a second Ctrl-C stops at once: on_close, exit 0."""
    src = _CLOSE_REPORTING.replace("POLLERS", "1").replace("DRAIN", "60")
    p, port = _start_program(src, env={"GOEV_BACKEND": backend})
    c = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    try:
        c.sendall(b"flood")                 # the server queues 64 MiB we never read
        assert recv_exact(c, 1) == b"x"
        p.send_signal(signal.SIGINT)
        line = p.stderr.readline()          # the first signal was handled: draining
        assert "SIGINT: shutting down" in line
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=WAIT)
        assert p.returncode == 0, err
        assert out.splitlines()[-2:] == ["on_close %d" % c.getsockname()[1], "run returned"]
        assert "Traceback" not in err
    finally:
        c.close()
        stop_child(p, signal.SIGKILL)


def test_own_signal_handler_is_kept(backend):
    """A program that installed its own SIGTERM handler keeps it during run();
    SIGINT (left at Python's default) still stops gracefully, and after run()
    both handlers are what they were."""
    src = '''
import os, signal, sys, goev
seen = []
def mine(signo, frame):
    seen.append(signo)
    r.post(r.stop)
signal.signal(signal.SIGTERM, mine)
with goev.Reactor() as r:
    goev.Acceptor(r, "127.0.0.1:8080", goev.IOHandle)
    r.run()
    print("seen", seen, signal.getsignal(signal.SIGTERM) is mine,
          signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)
'''
    p, port = _start_program(src, env={"GOEV_BACKEND": backend})
    try:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=WAIT)
        assert p.returncode == 0, err
        assert out.strip() == "seen [%d] True True" % signal.SIGTERM
    finally:
        stop_child(p, signal.SIGKILL)


def test_run_off_the_main_thread_leaves_signals_alone(make_reactor):
    """run() on another thread installs nothing (Python runs signal handlers on
    the main thread only): the main thread's handlers stay as they were."""
    r = make_reactor()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    seen = []

    def check():
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        r.stop()
    r.call_later(0, check)
    t = threading.Thread(target=r.run)
    t.start()
    t.join(WAIT)
    assert not t.is_alive()
    assert seen == [before]


def test_stop_with_live_connections(make_reactor, npollers):
    """stop() from the test thread: every handler gets on_close once, every
    client sees EOF, every server fd is closed and every poller thread joined
    by the time stop() returns; a second stop() is a no-op."""
    fds_before = set(os.listdir("/proc/self/fd"))
    factory, handlers = _core_collecting(_TrackedEcho)
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
    factory, handlers = _core_collecting(_StopOnCommand)
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


def test_reactor_refuses_an_absurd_poller_count():
    """Reactor(pollers=N) is bounded by the fd limit and the cores; the
    ValueError says which, and nothing is left open."""
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(ValueError, match=r"pollers=100000 is too many: at most \d+ here \(each poller"):
        goev.Reactor(100000)
    with pytest.raises(ValueError, match="pollers=100000 is too many"):
        goev.serve("127.0.0.1:0", Echo, pollers=100000)
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before
    with goev.Reactor(2) as r:                   # small counts are untouched
        assert len(r.pollers) == 2


def test_acceptor_pinned_to_poller(make_reactor):
    r = make_reactor(3)
    accs = [goev.Acceptor(r, "127.0.0.1:0", Echo, reuse_port=True, poller=i) for i in range(3)]
    for i, a in enumerate(accs):
        assert a.poller is r.pollers[i]
    port = accs[0].address[1]
    extra = goev.Acceptor(r, ("127.0.0.1", port), Echo, reuse_port=True, poller=1)
    assert extra.poller is r.pollers[1]
    r.start()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"ping")
        assert recv_exact(c, 4) == b"ping"
    with pytest.raises(ValueError, match="poller 3"):
        goev.Acceptor(r, "127.0.0.1:0", Echo, poller=3)


def test_reactor_shutdown_flushes_then_stops(make_reactor):
    size = 16 << 20
    ready = threading.Event()

    class Big(goev.IOHandle):
        def on_read(self):
            d = self.read()
            if d:
                self.write(b"y" * size)
                ready.set()
            return d is None or bool(d)
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Big)
    addr = a.address
    r.start()
    idle = socket.create_connection(a.address)          # an idle keep-alive connection
    s = socket.create_connection(a.address)
    s.sendall(b"go")
    assert ready.wait(WAIT)
    r.shutdown(drain_timeout=WAIT)
    assert len(recv_all(s)) == size                      # the queued response completed
    assert recv_all(idle) == b""                         # the idle one was closed
    wait_until(lambda: r.stopped, what="reactor to stop after the drain")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr, timeout=5).close()
    s.close()
    idle.close()


def test_empty_reactor_runs_and_stops(make_reactor):
    """A reactor with nothing registered neither spins nor blocks
    stop(): run() on this thread returns after a timer stops it, and start()
    then stop() with nothing registered returns promptly."""
    r = make_reactor(2)
    r.call_later(0.05, r.stop)
    t0 = time.monotonic()
    r.run()
    assert r.stopped and time.monotonic() - t0 < WAIT
    r2 = make_reactor(3)
    _count_polls(r2)
    r2.start()
    passes = _idle_passes(r2.pollers[1], 0.3)
    assert passes < _SPINNING, "an idle poller went round %d times in 0.3 s" % passes
    r2.stop(timeout=WAIT)
    assert r2.stopped


class _KIHandler(Echo):
    """Raises KeyboardInterrupt from on_read the first time it sees b"!".  Lives on
    poller 0, the one run() drives on the calling thread (a KeyboardInterrupt on a
    background poller thread has nowhere to go: that poller logs and shuts down)."""
    raised = 0

    def on_open(self):
        self.reactor.add_handler(self, self.fd, goev.EV_IN, poller=0)
        return True

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        data = bytes(data)
        self.write(data.replace(b"!", b""))
        if b"!" in data and not type(self).raised:
            type(self).raised += 1
            raise KeyboardInterrupt
        return True


def test_keyboard_interrupt_from_callbacks_reactor_reusable(make_reactor, npollers):
    """KeyboardInterrupt raised in on_read, in a posted
    callback and in a timer, with run() on this thread, propagates out of run()
    each time; run() is then called again and everything keeps working: the
    interrupted connection still echoes, no event is delivered twice (the bytes
    read before the raise come back exactly once), the other posts and timers
    still run, and stop() ends it cleanly."""
    H = type("KI", (_KIHandler,), {"raised": 0})
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    c = socket.create_connection(a.address, timeout=WAIT)
    out = []
    c.sendall(b"abc!")
    with pytest.raises(KeyboardInterrupt):
        r.run()
    assert recv_exact(c, 3) == b"abc"
    # a posted callback raising KeyboardInterrupt; the posts behind it still run
    p0 = r.pollers[0]
    p0._post(_raise_ki)
    p0._post(out.append, "after-post")
    with pytest.raises(KeyboardInterrupt):
        r.run()
    # a timer raising KeyboardInterrupt; a later timer still runs
    r.call_later(0.0, _raise_ki)
    r.call_later(0.01, out.append, "after-timer")
    with pytest.raises(KeyboardInterrupt):
        r.run()
    r.call_later(0.05, out.append, "final")
    r.call_later(0.1, r.stop)

    def client():
        c.sendall(b"more")
        out.append(recv_exact(c, 4))
    t = threading.Thread(target=client)
    t.start()
    r.run()
    t.join()
    assert r.stopped
    assert out[0] == "after-post" and len(out) == 4
    assert "after-post" in out and "after-timer" in out and b"more" in out and "final" in out
    assert _eof_or_reset(c)
    c.close()


def _raise_ki():
    raise KeyboardInterrupt


def test_after_stop_apis_refuse_or_drop(make_reactor, tmp_path):
    """After stop(): run()/start() raise RuntimeError,
    add_handler and Acceptor raise RuntimeError (no socket leaked),
    Connector.connect raises RuntimeError, post/post_to are dropped (never run,
    never raise), call_later raises RuntimeError, remove_event on a gone fd is a ValueError; a
    second start() on a running reactor is a RuntimeError too."""
    r = make_reactor(2)
    r.start()
    with pytest.raises(RuntimeError):
        r.start()
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    port = a.address[1]
    r.stop(timeout=WAIT)
    assert r.stopped
    with pytest.raises(RuntimeError):
        r.run()
    with pytest.raises(RuntimeError):
        r.start()
    s1, s2 = socket.socketpair()
    with pytest.raises(RuntimeError):
        r.add_handler(goev.IOHandle(), s1.fileno(), goev.EV_IN)
    s1.close()
    s2.close()
    with pytest.raises(RuntimeError):
        goev.Acceptor(r, "127.0.0.1:0", Echo)
    with pytest.raises(RuntimeError):
        goev.Connector(r).connect(("127.0.0.1", port), goev.IOHandle(), 1000)
    ran = []
    r.post(ran.append, 1)                       # dropped at once: the pollers are done
    assert ran == [] and not any(p._inbox for p in r.pollers)
    with pytest.raises(RuntimeError, match="stopped"):
        r.call_later(0, ran.append, 2)          # a timer that could never fire is refused
    with pytest.raises(RuntimeError, match="stopped"):
        r.pollers[1].call_later(0, ran.append, 3)
    with pytest.raises(ValueError):
        r.remove_event(a.fd if a.fd >= 0 else 10 ** 6, goev.EV_IN)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_internal_fds_counted_and_released(backend):
    """A reactor's own fds are exactly one waker per poller (an
    eventfd; a socketpair, two fds, where the OS or Python < 3.10 has none) plus,
    with epoll, one epoll fd per poller; all of them are closed by stop()
    (started or not), and by the context manager."""
    waker = 1 if hasattr(os, "eventfd") else 2
    per = waker + (1 if backend == "epoll" else 0)
    for n in (1, 3):
        before = _fd_count()
        r = goev.Reactor(n, backend=backend)
        assert _fd_count() - before == per * n
        r.start()
        r.stop(timeout=WAIT)
        assert _fd_count() == before
        with goev.Reactor(n, backend=backend):
            assert _fd_count() - before == per * n
        assert _fd_count() == before


class _RaisingClose(Echo):
    def on_open(self):
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        type(self).opened.append(self)
        return True

    def on_close(self):
        type(self).closed.append(self)
        self.destroy()
        raise RuntimeError("on_close boom during stop")


def test_callbacks_raising_during_stop(make_reactor, npollers, goev_log):
    """Every on_close raises
    and a posted callback raises while stop() closes everything: each is logged,
    every handler still gets its on_close once, every client sees the close,
    stop() completes, all threads are joined and no fd is left (hygiene)."""
    H = type("RC", (_RaisingClose,), {"opened": [], "closed": []})
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    clients = [socket.create_connection(a.address, timeout=WAIT) for _ in range(12)]
    wait_until(lambda: len(H.opened) == 12 and all(_registered(h) for h in H.opened))

    def boom():
        raise RuntimeError("posted boom during stop")
    r.post(boom)
    r.stop(timeout=WAIT)
    assert r.stopped
    assert sorted(map(id, H.closed)) == sorted(map(id, H.opened))
    for c in clients:
        assert _eof_or_reset(c)
        c.close()
    msgs = [rec.getMessage() for rec in goev_log.errors()]
    assert sum("on_close" in m for m in msgs) == 12


def test_keyboard_interrupt_in_on_close_during_stop_leaks_nothing(backend):
    """On_close raising KeyboardInterrupt while run() stops
    the reactor: the interrupt propagates out of run(), and a second stop()
    finishes the job -- every other handler still gets on_close and every fd
    is closed."""
    r = goev.Reactor(1, backend=backend)
    closed = []

    class K(Echo):
        def on_close(self):
            closed.append(self)
            self.destroy()
            if len(closed) == 2:
                raise KeyboardInterrupt
    a = goev.Acceptor(r, "127.0.0.1:0", K)
    clients = [socket.create_connection(a.address, timeout=WAIT) for _ in range(6)]

    def stop_when_open():
        if len(r.pollers[0]._handlers) == 7:
            r.stop()
        else:
            r.call_later(0.01, stop_when_open)
    r.call_later(0.01, stop_when_open)
    with pytest.raises(KeyboardInterrupt):
        r.run()
    r.stop(timeout=WAIT)
    assert r.stopped and len(closed) == 6
    for c in clients:
        assert _eof_or_reset(c)
        c.close()


def test_add_handler_with_closed_fd(make_reactor, goev_log):
    """A handler handed an fd that is already closed: epoll
    refuses it at the call (OSError EBADF, nothing registered); poll() reports it
    invalid and the handler is closed (on_close once) without a busy loop.
    Either way the reactor keeps serving."""
    r = make_reactor(1)
    _count_polls(r)
    r.start()
    s = socket.socket()
    fd = s.fileno()
    s.close()
    h = _RawReader()
    if r.backend == "epoll":
        with pytest.raises(OSError) as ei:
            r.add_handler(h, fd, goev.EV_IN)
        assert ei.value.errno == errno.EBADF and fd not in r.pollers[0]._handlers
    else:
        r.add_handler(h, fd, goev.EV_IN)
        wait_until(lambda: h.closes == 1, what="on_close of the invalid fd")
        assert _idle_passes(r.pollers[0]) < _SPINNING
    assert echo_ok(goev.Acceptor(r, "127.0.0.1:0", Echo).address)


# run()/start()/stop() as a state machine (NEW -> RUNNING -> STOPPING -> DONE):
# refusals, a run() interrupted by KeyboardInterrupt, then stop() or run()
# again; the one loop seen with and without trace mode; the slow-callback
# watchdog.

class _Raise(goev.IOHandle):
    """Echo, but a read of b"boom" raises KeyboardInterrupt in the callback."""
    opened = []
    closed = []

    def on_open(self):
        type(self).opened.append(self)
        return super().on_open()

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if bytes(data) == b"boom":
            raise KeyboardInterrupt
        self.write(data)
        return bool(data)

    def on_close(self):
        type(self).closed.append(self)
        super().on_close()


def test_run_refused_while_running(make_reactor):
    """run() after start(), or from a second thread during run(), raises
    RuntimeError("reactor is already running") and leaves the reactor working:
    a stop() from a callback of the real run() still ends it."""
    r = make_reactor(2)
    r.start()
    with pytest.raises(RuntimeError, match="already running"):
        r.run()
    r.stop(timeout=WAIT)
    assert r.stopped

    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    refused = []
    t = threading.Thread(target=r.run)
    t.start()
    try:
        wait_until(lambda: r.pollers[0]._state == goev._RUNNING, what="run() to start")
        with socket.create_connection(a.address) as c:     # poller 0 is looping now
            c.sendall(b"x")
            assert recv_exact(c, 1) == b"x"
        try:
            r.run()
        except RuntimeError as e:
            refused.append(str(e))
        r.call_later(0, r.stop)                            # stop() from a callback
        t.join(WAIT)
        assert not t.is_alive(), "run() did not return after stop() from a callback"
    finally:
        r.stop(timeout=WAIT)
        t.join(WAIT)
    assert refused == ["reactor is already running"]
    assert r.stopped


def test_stop_after_keyboard_interrupt_closes_everything(make_reactor):
    """A KeyboardInterrupt raised in a callback leaves run(); stop() then still
    closes every handler (on_close each) and fd, and the reactor is stopped
    (this is what a ``with Reactor() as r: r.run()`` block does on Ctrl-C)."""
    _Raise.opened, _Raise.closed = [], []
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", _Raise)
    c1 = socket.create_connection(a.address)
    c2 = socket.create_connection(a.address)
    try:
        c1.sendall(b"boom")
        with pytest.raises(KeyboardInterrupt):
            r.run()
        assert not r.stopped
        r.stop(timeout=WAIT)
        assert r.stopped
        assert len(_Raise.closed) == len(_Raise.opened) >= 1
        assert all(h.fd == -1 for h in _Raise.opened)
        assert a.fd == -1
        c2.settimeout(WAIT)
        assert c2.recv(10) == b""                  # the server side is closed
    finally:
        c1.close()
        c2.close()


def test_run_again_after_keyboard_interrupt(make_reactor):
    """After run() left by KeyboardInterrupt, run() resumes with every handler
    and timer; the reactor is not stopped until stop()."""
    _Raise.opened, _Raise.closed = [], []
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", _Raise)
    with socket.create_connection(a.address) as c:
        c.sendall(b"boom")
        with pytest.raises(KeyboardInterrupt):
            r.run()
        echoed = []

        def client():
            c.sendall(b"again")
            echoed.append(recv_exact(c, 5))
            r.stop()
        t = threading.Thread(target=client)
        t.start()
        r.run()
        t.join(WAIT)
    assert echoed == [b"again"]
    assert r.stopped and len(_Raise.closed) == 1


def test_keyboard_interrupt_on_a_background_poller_reaches_run(make_reactor):
    """A KeyboardInterrupt raised in a callback on another poller's thread
    stops the reactor (every handler closed) and comes out of run(), or, after
    start(), out of stop()."""
    def interrupt_on_poller_1(r):
        if r.current_poller().index == 1:
            raise KeyboardInterrupt
    for mode in ("run", "start"):
        _Raise.opened, _Raise.closed = [], []
        r = make_reactor(2)
        a = goev.Acceptor(r, "127.0.0.1:0", _Raise)
        with socket.create_connection(a.address) as c:
            if mode == "run":
                r.call_later(0.01, r.post, interrupt_on_poller_1, r)
                with pytest.raises(KeyboardInterrupt):
                    r.run()
            else:
                r.start()
                wait_until(lambda: len(_Raise.opened) == 1, what="the connection")
                r.post(interrupt_on_poller_1, r)
                wait_until(lambda: r.pollers[0]._state >= goev._STOPPING, what="the reactor to stop")
                with pytest.raises(KeyboardInterrupt):
                    r.stop(timeout=WAIT)
            assert r.stopped
            assert len(_Raise.closed) == len(_Raise.opened)
            c.settimeout(WAIT)
            assert c.recv(10) == b""


# -- hardening: what outside probes broke ---------------------------------------------

def test_bad_sizes_are_value_errors_naming_the_limit(make_reactor):
    """Sizes beyond what the kernel takes are ValueErrors that name the value and
    the limit, not MemoryError/OverflowError/TypeError, and leave no fd."""
    before = _fd_count()
    with pytest.raises(ValueError, match="read_buffer_size must be <= 2147479552"):
        goev.Reactor(1, read_buffer_size=2 ** 50)
    r = make_reactor(1)
    with pytest.raises(ValueError, match="backlog must be <= 2147483647"):
        goev.Acceptor(r, "127.0.0.1:0", Echo, backlog=2 ** 40)
    with pytest.raises(ValueError, match="rcvbuf must be <= 2147483647"):
        goev.Acceptor(r, "127.0.0.1:0", Echo, rcvbuf=2 ** 40)
    with pytest.raises(ValueError, match="rcvbuf"):
        goev.Connector(r, rcvbuf=2 ** 40)
    r.stop()
    assert _fd_count() == before


def test_failed_reactor_construction_leaks_no_fd(monkeypatch):
    """A poller whose construction fails half-way (here: its waker) closes what
    it opened; the pollers made before it are closed too."""
    made = []
    real = goev._Waker

    def flaky():
        if made:
            raise OSError(errno.EMFILE, "injected")
        made.append(1)
        return real()
    monkeypatch.setattr(goev, "_Waker", flaky)
    before = _fd_count()
    for _ in range(20):
        made.clear()
        with pytest.raises(OSError, match="injected"):
            goev.Reactor(3)
    assert _fd_count() == before


def test_pollers_auto_is_the_core_count_without_the_gil_and_one_with_it(make_reactor):
    """Reactor(pollers="auto"): one poller per usable core when the GIL is off
    (free-threaded CPython), one under the GIL; any other string is refused."""
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    r = make_reactor("auto")
    assert len(r.pollers) == (1 if gil else cores)
    with pytest.raises(TypeError):
        goev.Reactor("many")


# =============================================================================
# 9. Acceptor: listening sockets and the accept pipeline
# =============================================================================
# Address families (IPv4, IPv6, unix paths, abstract names), accept batches,
# EMFILE and the other accept() errors, adopted sockets, Acceptor.close().


def _have_ipv6():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


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
    """unix:@name binds the abstract namespace (no file); address is "@name",
    as the API writes it ("unix:" + address binds or connects the same name);
    close() really stops listening."""
    name = "goev-test-%d-%d" % (os.getpid(), random.getrandbits(32))
    r, a = echo_server(make_reactor, 1, addr="unix:@" + name)
    assert a.address == "@" + name
    assert goev.parse_address("unix:" + a.address) == (socket.AF_UNIX, "\0" + name)
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
class Counting:                 # the loop's passes: it sleeps between retries, or spins
    def __init__(self, backend):
        self.backend, self.polls = backend, 0
    def poll(self, timeout):
        self.polls += 1
        return self.backend.poll(timeout)
    def __getattr__(self, name):
        return getattr(self.backend, name)
r.pollers[0]._backend = counting = Counting(r.pollers[0]._backend)
r.start()
fds = [int(x) for x in os.listdir("/proc/self/fd")]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(fds) + 1 + 4, hard))
print("PORT", a.address[1], flush=True)
deadline = time.monotonic() + 30
while not warnings and time.monotonic() < deadline:
    time.sleep(0.01)
n0 = len(warnings)
p0 = counting.polls
time.sleep(3.0)        # a window to count in, not a wait for an event
print("PAUSED", len(opened), n0, len(warnings) - n0, counting.polls - p0, flush=True)
sys.stdin.readline()
r.stop()
print("DONE", r.stopped, len(opened), flush=True)
"""


@pytest.mark.slow
def test_emfile_pauses_accepting_and_recovers(backend):
    """A child server runs out of fds while 12 clients connect: the acceptor
    logs one warning for the episode and retries on a timer (the loop sleeps
    between retries: a busy loop on the still-readable listener would spin), the accepted
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
        passes = int(fields[4])
        assert 1 <= opened < 12, "the fd limit did not bite"
        assert first_warnings >= 1
        # One episode: its retries (every 100 ms) log nothing more until it ends.
        assert more_warnings == 0, more_warnings
        # Retrying every 100 ms is about 30 passes in 3 s; a loop spinning on the
        # still-readable listener goes round hundreds of thousands of times.
        assert passes < 1000, "acceptor spins while out of fds: %d passes in 3 s" % passes
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


# -- adopting listening sockets -----------------------------------------------------------

def test_acceptor_from_socket_and_fd(make_reactor, backend):
    r = make_reactor(2)
    s1 = socket.create_server(("127.0.0.1", 0))
    port1 = s1.getsockname()[1]
    a1 = goev.Acceptor.from_socket(r, s1, Echo)
    assert s1.fileno() == -1                     # taken over
    s2 = socket.create_server(("127.0.0.1", 0))
    fd2 = s2.detach()
    a2 = goev.Acceptor(r, None, Echo, fd=fd2)
    assert a2.fd == fd2 and a2.address[1] > 0
    r.start()
    for port in (port1, a2.address[1]):
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"adopted")
            assert recv_exact(c, 7) == b"adopted"
    a2.close()
    with pytest.raises(OSError):
        os.fstat(fd2)                            # the Acceptor owned it: closed


def test_acceptor_adopt_rejects_non_listeners(make_reactor):
    r = make_reactor(1)
    with socket.socket() as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        s.bind(("127.0.0.1", 0))                 # bound, not listening
        u.bind(("127.0.0.1", 0))
        for sock in (s, u):
            with pytest.raises(ValueError, match="fd %d is not a listening" % sock.fileno()):
                goev.Acceptor.from_socket(r, sock, Echo)
            os.fstat(sock.fileno())              # still open: not ours
        with pytest.raises(ValueError, match="not both"):
            goev.Acceptor(r, "127.0.0.1:0", Echo, fd=s.fileno())
    rd, wr = os.pipe()
    try:
        with pytest.raises(ValueError, match="fd %d is not a socket" % rd):
            goev.Acceptor(r, None, Echo, fd=rd)
        os.fstat(rd)
    finally:
        os.close(rd)
        os.close(wr)
    with pytest.raises(TypeError, match="sock"):
        goev.Acceptor.from_socket(r, 3, Echo)


def test_accept_batches_a_full_backlog(make_reactor, goev_log):
    """300 connections queued while the poller is parked are all
    accepted in a few batches (the acceptor's on_read runs far fewer times than
    there are connections; EAGAIN ends a batch quietly), and each one echoes."""
    calls = []

    class CountingAcceptor(goev.Acceptor):
        def on_read(self):
            calls.append(1)
            return super().on_read()
    r = make_reactor(1)
    a = CountingAcceptor(r, "127.0.0.1:0", Echo, backlog=1024)
    r.start()
    release = _park(r.pollers[0])
    clients = [socket.create_connection(a.address, timeout=WAIT) for _ in range(300)]
    release.set()
    for i, c in enumerate(clients):
        c.sendall(b"%d." % i)
    for i, c in enumerate(clients):
        assert recv_exact(c, len(b"%d." % i)) == b"%d." % i
        c.close()
    assert len(calls) <= 30, "%d accept passes for 300 queued connections" % len(calls)
    assert not goev_log.errors()


def test_eaddrinuse_and_reuse_port(make_reactor):
    """A second listener on a used port fails with
    OSError(EADDRINUSE) and leaks no socket; SO_REUSEPORT is off by default and,
    when asked for on both, two listeners share the port and both serve."""
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    with pytest.raises(OSError) as ei:
        goev.Acceptor(r, a.address, Echo)
    assert ei.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError) as ei:
        goev.Acceptor(r, a.address, Echo, reuse_port=True)   # the first did not ask for it
    assert ei.value.errno == errno.EADDRINUSE
    b1 = goev.Acceptor(r, "127.0.0.1:0", Echo, reuse_port=True)
    b2 = goev.Acceptor(r, b1.address, Echo, reuse_port=True)
    r.start()
    for _ in range(20):
        assert echo_ok(b1.address)
    b1.close()
    assert echo_ok(b2.address)                       # the port is still served by the second


def test_listener_kept_alive_without_user_reference(make_reactor):
    """An Acceptor the user does not keep a reference to keeps
    serving (the reactor owns it) through garbage collections."""
    r = make_reactor(1)
    port = goev.Acceptor(r, "127.0.0.1:0", Echo).address[1]
    r.start()
    for _ in range(3):
        gc.collect()
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
            c.sendall(b"alive")
            assert recv_exact(c, 5) == b"alive"


def test_dual_stack_listener(make_reactor):
    """A listener on "[::]:0" is dual-stack where the OS allows: both ::1 and
    127.0.0.1 reach it and echo."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    r = make_reactor(1)
    try:
        a = goev.Acceptor(r, "[::]:0", Echo)
    except OSError as e:
        pytest.skip("no IPv6 listener: %s" % e)
    r.start()
    port = a.address[1]
    for host in ("::1", "127.0.0.1"):
        try:
            c = socket.create_connection((host, port), timeout=WAIT)
        except OSError as e:
            if host == "127.0.0.1":
                pytest.skip("not dual-stack here: %s" % e)
            raise
        with c:
            c.sendall(host.encode())
            assert recv_exact(c, len(host)) == host.encode()


# Loopback cannot produce these errors, so a wrapper around the listening
# socket injects them (accept(2): ENETDOWN & co. mean "that connection is
# gone", EBADF/EINVAL/ENOTSOCK "this listener is unusable").

class _FailingAccept:
    """Stands in for an Acceptor's socket: its first ``times`` accepts raise OSError(code)."""

    def __init__(self, sock, code, times):
        self._s, self.code, self.left, self.calls = sock, code, times, 0

    def __getattr__(self, name):
        return getattr(self._s, name)

    def _accept(self):
        self.calls += 1
        if self.left:
            self.left -= 1
            raise OSError(self.code, os.strerror(self.code))
        return self._s._accept()


def _failing_acceptor(make_reactor, code, times):
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    a._sock = _FailingAccept(a._sock, code, times)     # before start(): no loop yet
    r.start()
    return r, a


@pytest.mark.parametrize("name", ["EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "EPROTO", "ENONET"])
def test_accept_error_about_one_connection_is_skipped(make_reactor, goev_log, name):
    """accept(2)'s "treat like EAGAIN" errors skip that connection and accept
    again at once: the next pending connection is served, nothing is logged,
    the listener stays open."""
    if not hasattr(errno, name):
        pytest.skip("%s is not defined on this OS" % name)
    r, a = _failing_acceptor(make_reactor, getattr(errno, name), 1)
    with socket.create_connection(a.address) as c:
        c.sendall(b"still here")
        assert recv_exact(c, 10) == b"still here"
    assert a._sock.calls >= 2 and not a.closed
    assert not [x for x in goev_log.records if x.levelno >= logging.WARNING]


def test_accept_unexpected_error_pauses_and_logs_once(make_reactor, goev_log):
    """An unexpected errno (EIO) logs one ERROR for the episode, pauses, retries
    until accept works, then says how many calls failed; the connection that
    waited is served."""
    r, a = _failing_acceptor(make_reactor, errno.EIO, 3)
    with socket.create_connection(a.address) as c:
        c.sendall(b"waited")
        assert recv_exact(c, 6) == b"waited"
    errors = [x.getMessage() for x in goev_log.records if x.levelno >= logging.ERROR]
    assert len(errors) == 1 and "pausing" in errors[0] and "Input/output error" in errors[0], errors
    wait_until(lambda: any("accepting again after 3 failed" in x.getMessage() for x in goev_log.records),
               what="the end-of-episode line")
    assert not a.closed


def test_accept_emfile_episode_logged_once(make_reactor, goev_log):
    """EMFILE (out of fds) is the same episode: one WARNING, then a count."""
    r, a = _failing_acceptor(make_reactor, errno.EMFILE, 4)
    with socket.create_connection(a.address) as c:
        c.sendall(b"x")
        assert recv_exact(c, 1) == b"x"
    warnings = [x.getMessage() for x in goev_log.records if x.levelno == logging.WARNING]
    wait_until(lambda: len([x for x in goev_log.records if x.levelno == logging.WARNING]) == 2,
               what="the end-of-episode line")
    warnings = [x.getMessage() for x in goev_log.records if x.levelno == logging.WARNING]
    assert "Too many open files" in warnings[0] and "logged again when it ends" in warnings[0], warnings
    assert re.search(r"accepting again after 4 failed accept\(\) calls over \d+\.\d s \(Too many open files\)",
                     warnings[1]), warnings


def test_accept_episode_that_outlasts_the_listener_logs_its_end(make_reactor, goev_log):
    """An accept failure still going on when the listener closes: its end is
    logged once (count and duration), and the retries in between log nothing."""
    r, a = _failing_acceptor(make_reactor, errno.EMFILE, 10 ** 9)
    c = socket.create_connection(a.address)
    try:
        wait_until(lambda: a._sock.calls >= 3, what="three retries")
        a.close()
    finally:
        c.close()
    msgs = [x.getMessage() for x in goev_log.records if x.levelno >= logging.WARNING]
    assert len(msgs) == 2, msgs
    assert "accept failed" in msgs[0] and "pausing 100 ms" in msgs[0]
    assert re.search(r"stopped listening after \d+ failed accept\(\) calls over \d+\.\d s "
                     r"\(Too many open files\)", msgs[1]), msgs


@pytest.mark.parametrize("name", ["EBADF", "EINVAL", "ENOTSOCK"])
def test_accept_error_on_an_unusable_listener_closes_it(make_reactor, goev_log, name):
    """EBADF/EINVAL/ENOTSOCK: the listener is closed with an ERROR naming it."""
    r, a = _failing_acceptor(make_reactor, getattr(errno, name), 1)
    port = a.address[1]
    socket.create_connection(("127.0.0.1", port)).close()
    wait_until(lambda: a.closed and a.fd == -1, what="the listener to close")
    assert isinstance(a.error, OSError) and a.error.errno == getattr(errno, name)
    assert a.error.__traceback__ is None
    errors = [x.getMessage() for x in goev_log.records if x.levelno >= logging.ERROR]
    assert len(errors) == 1 and "unusable" in errors[0], errors
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()


# =============================================================================
# 10. Connector: non-blocking connects
# =============================================================================
# Exactly one outcome per connect (on_open or on_connect_fail) on the poller
# thread: refused, timed out, unix paths, host names resolved off the pollers.


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


class _Client(goev.IOHandle):
    def __init__(self):
        self.events = queue.Queue()

    def on_open(self):
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        self.events.put("open")
        self.write(b"hi")
        return True

    def on_read(self):
        d = self.read()
        if d is None:
            return True
        if d:
            self.events.put(bytes(d))
        return bool(d)

    def on_connect_fail(self, err):
        self.events.put(err)

    def on_close(self):
        self.events.put("close")
        self.destroy()


def test_connect_refused_then_same_handler_connects(make_reactor):
    """A connect before anyone listens fails with
    ConnectionRefusedError; once a listener is up, the very same handler object
    connects and talks."""
    r = make_reactor(1)
    r.start()
    port = free_port()
    h = _Client()
    goev.Connector(r).connect(("127.0.0.1", port), h, 5000)
    assert isinstance(h.events.get(timeout=WAIT), ConnectionRefusedError)
    a = goev.Acceptor(r, ("127.0.0.1", port), Echo)
    goev.Connector(r).connect(("127.0.0.1", port), h, 5000)
    assert h.events.get(timeout=WAIT) == "open"
    assert h.events.get(timeout=WAIT) == b"hi"
    h.close()
    assert h.events.get(timeout=WAIT) == "close"
    a.close()


def test_rst_during_connect_loop_survives(make_reactor, goev_log):
    """50 clients connect and reset at once (SO_LINGER 0) while
    the listener has not accepted yet: the loop survives, any accepted one is
    closed (on_close once), nothing is logged, and the next client is served."""
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    r.start()
    release = _park(r.pollers[0])
    for _ in range(50):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.connect(a.address)
        c.close()
    release.set()
    assert echo_ok(a.address)
    wait_until(lambda: list(r.pollers[0]._handlers.values()) == [a], what="every reset one closed")
    assert not goev_log.errors()


# -- host names are looked up off the pollers --------------------------------------------

class _SlowDNS:
    """A stand-in for socket.getaddrinfo: "slow.test" takes ``delay`` seconds,
    "fast.test" answers at once, "gone.test" does not resolve (127.0.0.1 otherwise)."""

    def __init__(self, delay):
        self.delay, self.real, self.release = delay, socket.getaddrinfo, threading.Event()

    def __call__(self, host, port, *a, **kw):
        if host == "slow.test":
            self.release.wait(self.delay)
        elif host == "gone.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host.endswith(".test"):
            host = "127.0.0.1"
        return self.real(host, port, *a, **kw)


class _Outcome(goev.IOHandle):
    def __init__(self):
        self.done = threading.Event()
        self.result = None

    def on_open(self):
        self.result = "open"
        self.done.set()
        return super().on_open()

    def on_connect_fail(self, err):
        self.result = err
        self.done.set()


def test_host_names_are_resolved_off_the_pollers(make_reactor, monkeypatch, npollers):
    """A stuck lookup delays neither the pollers (an echo keeps answering) nor
    another lookup; the lookup counts in timeout_ms (TimeoutError while it is
    still running); a name that does not resolve reaches on_connect_fail as a
    socket.gaierror naming the host."""
    dns = _SlowDNS(WAIT)
    monkeypatch.setattr(goev.socket, "getaddrinfo", dns)
    r, a = echo_server(make_reactor, npollers)
    port = a.address[1]
    conn = goev.Connector(r)
    stuck, late, fast, gone = _Outcome(), _Outcome(), _Outcome(), _Outcome()
    try:
        conn.connect("slow.test:%d" % port, stuck, 0)          # no timeout: waits for the lookup
        conn.connect("slow.test:%d" % port, late, 300)         # gives up after 300 ms
        conn.connect("fast.test:%d" % port, fast, 5000)
        conn.connect("gone.test:%d" % port, gone, 5000)
        with socket.create_connection(a.address) as c:          # the pollers are free
            c.sendall(b"still serving")
            assert recv_exact(c, 13) == b"still serving"
        assert fast.done.wait(WAIT) and fast.result == "open"
        assert gone.done.wait(WAIT) and isinstance(gone.result, socket.gaierror)
        assert "gone.test" in str(gone.result)
        assert late.done.wait(WAIT) and isinstance(late.result, TimeoutError)
        assert not stuck.done.is_set()                        # the lookup is still running
    finally:
        dns.release.set()
    assert stuck.done.wait(WAIT) and stuck.result == "open"
    assert late.result.__class__ is TimeoutError              # one outcome only


# =============================================================================
# 11. Datagrams: UDP and unix datagram sockets
# =============================================================================
# DatagramHandle: every size up to 65,507 bytes, truncation counted, bounded
# read batches, the send queue and its limit, ICMP and EMSGSIZE errors, IPv6,
# unix datagram sockets, reuse_port, broadcast and multicast, threads.

class DgramEcho(goev.DatagramHandle):
    """Sends every datagram back to where it came from."""

    def on_datagram(self, data, addr):
        self.sendto(data, addr)


class DgramProbe(goev.DatagramHandle):
    """Records datagrams (as bytes), errors and the size of each read batch."""

    def __init__(self):
        self.got = []               # (bytes, addr); appended on the poller, read by the test
        self.errors = []            # (OSError, addr)
        self.batches = []

    def on_datagram(self, data, addr):
        self.got.append((bytes(data), addr))

    def on_error(self, err, addr):
        super().on_error(err, addr)
        self.errors.append((err, addr))

    def on_read(self):
        before = len(self.got)
        keep = super().on_read()
        self.batches.append(len(self.got) - before)
        return keep


def _udp_client(family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(WAIT)
    return s


def test_udp_echo_every_size_from_1_byte_to_the_ipv4_maximum(make_reactor):
    r = make_reactor()
    e = DgramEcho().bind(r, "127.0.0.1:0")
    r.start()
    c = _udp_client()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        for n in (1, 2, 100, 1472, 1473, 8192, 65000, 65507):
            payload = os.urandom(n)
            c.sendto(payload, e.address)
            data, addr = c.recvfrom(70000)
            assert data == payload and addr == e.address
    finally:
        c.close()
    assert e.truncated_datagrams == 0 and e.dropped_datagrams == 0 and not e.closed


def test_udp_datagram_larger_than_the_read_buffer_is_counted_never_delivered_cut(make_reactor):
    r = make_reactor(read_buffer_size=1024)
    h = DgramProbe().bind(r, "127.0.0.1:0")
    r.start()
    c = _udp_client()
    try:
        c.sendto(b"a" * 2000, h.address)        # cut: counted, skipped
        c.sendto(b"b" * 1024, h.address)        # exactly the buffer: whole (Linux: MSG_TRUNC)
        c.sendto(b"c" * 10, h.address)
        wait_until(lambda: len(h.got) >= 2 and h.got[-1][0] == b"c" * 10, what="the small datagram")
    finally:
        c.close()
    assert h.truncated_datagrams == 1
    assert [d for d, _ in h.got] == [b"b" * 1024, b"c" * 10]
    assert not h.closed


def test_udp_connected_client_gets_icmp_refused_as_an_error_and_stays_open(make_reactor):
    r = make_reactor()
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    gone = dead.getsockname()
    dead.close()                                 # nobody listens there any more
    h = DgramProbe().connect(r, gone)
    assert h.peer == gone
    r.start()
    h.sendto(b"anyone?")
    wait_until(lambda: h.errors, what="ECONNREFUSED in on_error")
    err, addr = h.errors[0]
    assert isinstance(err, ConnectionRefusedError) and addr is None
    assert h.error is err and not h.closed
    h.sendto(b"still there?")                    # the error was news, not an end
    wait_until(lambda: len(h.errors) >= 2, what="a second ECONNREFUSED")
    assert not h.closed and h.fd >= 0


def test_udp_emsgsize_reaches_on_error_with_the_destination(make_reactor):
    r = make_reactor()
    h = DgramProbe().bind(r, "127.0.0.1:0")
    h.sendto(b"x" * 65508, ("127.0.0.1", 9))     # over the IPv4 maximum (before start: direct)
    assert len(h.errors) == 1
    err, addr = h.errors[0]
    assert err.errno == errno.EMSGSIZE and addr == ("127.0.0.1", 9)
    assert not h.closed


def test_udp_flood_is_read_in_bounded_batches_and_a_tcp_echo_on_the_same_poller_keeps_working(make_reactor):
    r = make_reactor()
    sink = DgramProbe().bind(r, "127.0.0.1:0", rcvbuf=1 << 20)
    a = goev.Acceptor(r, "127.0.0.1:0", DataEcho)
    r.start()
    stop = threading.Event()
    sent = [0]

    def blast():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            while not stop.is_set():
                for _ in range(100):
                    s.sendto(b"x" * 32, sink.address)
                sent[0] += 100
        finally:
            s.close()
    blasters = [threading.Thread(target=blast) for _ in range(2)]
    for t in blasters:
        t.start()
    try:
        wait_until(lambda: len(sink.got) > 1000, what="the flood to arrive")
        with socket.create_connection(a.address, timeout=WAIT) as c:
            for i in range(50):                  # each round trip while the flood goes on
                c.sendall(b"ping %d\n" % i)
                assert recv_exact(c, len(b"ping %d\n" % i)) == b"ping %d\n" % i
    finally:
        stop.set()
        for t in blasters:
            t.join(WAIT)
    assert max(sink.batches) <= goev._DGRAM_BATCH
    assert not sink.closed


def test_datagram_send_queue_keeps_order_and_drops_beyond_its_limit(make_reactor, tmp_path):
    # A unix datagram receiver that does not read makes the sender's kernel say
    # EAGAIN (UDP on loopback would drop at the receiver instead).
    path = str(tmp_path / "rx.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.settimeout(WAIT)
    r = make_reactor()
    h = DgramProbe().connect(r, "unix:" + path)
    h.queue_limit = 50 * 1000
    r.start()
    n = 3000
    done = threading.Event()

    def burst():                                 # on the poller: nothing drains in between
        for i in range(n):
            h.sendto(b"%08d" % i + bytes(992))
        done.set()
    r.post_to(h, burst)
    assert done.wait(WAIT)
    wait_until(lambda: h.dropped_datagrams > 0, what="drops")
    assert 0 < h.pending_write_bytes <= 50 * 1000
    got = []
    try:
        while len(got) + h.dropped_datagrams < n:
            got.append(int(rx.recv(2000)[:8]))
    finally:
        rx.close()
    assert got == list(range(len(got)))          # in order, none lost but the counted drops
    assert len(got) + h.dropped_datagrams == n
    wait_until(lambda: h.pending_write_bytes == 0, what="the queue to empty")
    assert not h.errors and not h.closed


def test_udp_sendto_from_another_thread_keeps_call_order(make_reactor, tmp_path):
    path = str(tmp_path / "rx.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.settimeout(WAIT)
    r = make_reactor(3)
    h = DgramProbe().connect(r, "unix:" + path)
    h.queue_limit = 1 << 20
    r.start()
    n = 2000
    got = []

    def receive():
        while len(got) < n:
            got.append(int(rx.recv(100)))
    t = threading.Thread(target=receive)
    t.start()
    try:
        for i in range(n):
            if i % 100 == 50:                    # some from the poller itself, in between
                r.post_to(h, h.sendto, b"%d" % i)
            else:
                h.sendto(b"%d" % i)              # from this thread: posted, FIFO
        t.join(WAIT)
    finally:
        rx.close()
    assert got == list(range(n))
    assert h.dropped_datagrams == 0


def test_udp_sendto_after_the_reactor_stopped_is_dropped_and_counted(make_reactor):
    r = make_reactor()
    h = DgramProbe().bind(r, "127.0.0.1:0")
    r.start()
    r.stop(timeout=WAIT)
    h.sendto(b"late")
    h.sendto(b"later", ("127.0.0.1", 9))
    assert h.dropped_datagrams == 2 and h.closed


def test_udp_ipv6_echo(make_reactor):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    r = make_reactor()
    try:
        e = DgramEcho().bind(r, "[::1]:0")
    except OSError as err:
        pytest.skip("no IPv6 loopback: %s" % err)
    r.start()
    c = _udp_client(socket.AF_INET6)
    try:
        c.sendto(b"six", e.address)
        assert c.recvfrom(100)[0] == b"six"
    finally:
        c.close()
    assert len(e.address) == 4


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_unix_datagram_echo_with_a_goev_client(make_reactor, tmp_path, kind):
    addr = "unix:" + (str(tmp_path / "dg.sock") if kind == "path" else "@goev-test-dg-%d" % os.getpid())
    r = make_reactor()
    e = DgramEcho().bind(r, addr)
    c = DgramProbe().connect(r, addr)            # autobound: the server can answer
    r.start()
    c.sendto(b"hello")
    wait_until(lambda: c.got, what="the echo")
    assert c.got[0][0] == b"hello"
    r.stop(timeout=WAIT)
    if kind == "path":
        assert not os.path.exists(addr[5:])      # unlinked on close
    else:
        assert e.address is None


def test_unix_datagram_bind_refuses_a_live_path_and_replaces_a_stale_one(make_reactor, tmp_path):
    path = str(tmp_path / "dg.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    live.bind(path)
    r = make_reactor()
    try:
        with pytest.raises(OSError) as info:
            DgramEcho().bind(r, "unix:" + path)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        live.close()                             # now stale: replaced
    e = DgramEcho().bind(r, "unix:" + path)
    assert e.address == path


def test_udp_reuse_port_binds_twice_and_a_busy_port_raises_leaving_no_fd(make_reactor):
    r = make_reactor()
    one = DgramEcho().bind(r, "127.0.0.1:0", reuse_port=True)
    two = DgramEcho().bind(r, one.address, reuse_port=True)
    assert two.address == one.address
    plain = DgramEcho().bind(r, "127.0.0.1:0")
    lone = DgramEcho()
    with pytest.raises(OSError) as info:
        lone.bind(r, plain.address)
    assert info.value.errno == errno.EADDRINUSE
    assert lone.fd == -1                         # (the hygiene fixture checks no fd leaked)


def test_udp_broadcast_option_and_multicast_membership(make_reactor):
    r = make_reactor()
    b = DgramEcho().bind(r, "127.0.0.1:0", broadcast=True)
    assert b.sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST) == 1
    m = DgramProbe().bind(r, ":0")
    group = "239.255.77.%d" % (os.getpid() % 200 + 1)
    try:
        m.join_group(group, "127.0.0.1")
    except OSError as err:
        pytest.skip("no multicast on loopback here: %s" % err)
    r.start()
    c = _udp_client()
    try:
        c.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        c.sendto(b"to the group", (group, m.address[1]))
        wait_until(lambda: m.got, what="the multicast datagram")
    finally:
        c.close()
    assert m.got[0][0] == b"to the group"
    m.leave_group(group, "127.0.0.1")


def test_datagram_handler_needs_a_bind_before_use_and_refuses_a_second_bind(make_reactor):
    r = make_reactor()
    h = DgramProbe()
    with pytest.raises(RuntimeError, match="not bound"):
        h.sendto(b"x", ("127.0.0.1", 9))
    h.bind(r, "127.0.0.1:0")
    with pytest.raises(ValueError, match="already bound"):
        h.bind(r, "127.0.0.1:0")
    with pytest.raises(TypeError):
        DgramProbe().bind(object(), "127.0.0.1:0")


def test_udp_close_from_another_thread_and_on_close_runs_once(make_reactor):
    closes = []

    class H(DgramProbe):
        def on_close(self):
            closes.append(threading.current_thread().name)
            super().on_close()
    r = make_reactor()
    h = H().bind(r, "127.0.0.1:0")
    r.start()
    h.close()
    wait_until(lambda: closes, what="on_close")
    assert h.closed and h.fd == -1 and len(closes) == 1
    assert closes[0].startswith("goev-poller")


def test_udp_trace_shows_recvfrom_and_sendto(make_reactor, capfd):
    r = make_reactor(trace=True)
    e = DgramEcho().bind(r, "127.0.0.1:0")
    r.start()
    c = _udp_client()
    try:
        c.sendto(b"trace", e.address)
        assert c.recvfrom(100)[0] == b"trace"
        port = c.getsockname()[1]
    finally:
        c.close()
    r.stop(timeout=WAIT)
    err = capfd.readouterr().err
    assert "recvfrom -> 5 bytes from ('127.0.0.1', %d)" % port in err
    assert "sendto(('127.0.0.1', %d)) 5 bytes -> 5 sent" % port in err


# =============================================================================
# 12. Trace mode: every step of the loop on stderr
# =============================================================================
# The trace shows the real loop, in its order, and costs nothing when off.


TRACE_SCRIPT = r'''
import socket, sys, goev
''' + ECHO_SRC + r'''
r = goev.Reactor(1, trace=True if sys.argv[1] == "on" else None)
a = goev.Acceptor(r, "127.0.0.1:0", Echo)
r.start()
c = socket.create_connection(a.address)
c.sendall(b"hello")
assert c.recv(100) == b"hello"
c.close()
r.call_later(0.01, lambda: None)
import time
time.sleep(0.3)
r.stop()
'''


def test_trace_shows_the_echo_session_in_order(backend):
    r = run_py(["-c", TRACE_SCRIPT, "on"], env={"GOEV_BACKEND": backend})
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""                                       # trace goes to stderr only
    lines = r.stderr.splitlines()
    wait = "epoll_wait" if backend == "epoll" else "select_wait"
    expected = [
        "add handler Acceptor for IN",
        wait,
        "Acceptor.on_read()",
        "accept -> new connection fd",
        "add handler Echo for IN",
        "Echo.on_read()",
        "readv -> 5 bytes",
        "write 5 bytes -> 5 sent",
        "readv -> 0 bytes (end of stream)",
        "closed -> on_close of Echo",
        "close(fd)",
        "timers: 1 due",
        "loop ends",
    ]
    i = 0
    for line in lines:
        if i < len(expected) and expected[i] in line:
            i += 1
    assert i == len(expected), "missing step %r in trace:\n%s" % (expected[i], r.stderr)
    assert all(line.startswith("goev[p0] ") for line in lines if line)


def test_trace_env_and_partial_write_visible(backend):
    r = run_py(["-c", TRACE_SCRIPT, "env"], env={"GOEV_BACKEND": backend, "GOEV_TRACE": "1"})
    assert r.returncode == 0 and "goev[p0]" in r.stderr
    r = run_py(["-c", TRACE_SCRIPT, "env"], env={"GOEV_BACKEND": backend, "GOEV_TRACE": ""})
    assert r.returncode == 0 and "goev[p0]" not in r.stderr


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("Yes", True), ("ON", True),
                                      ("0", False), ("false", False), ("no", False), ("off", False),
                                      ("", False)])
def test_trace_env_accepts_clear_true_and_false_spellings(monkeypatch, value, on):
    """GOEV_TRACE=no (or 0, false, off, empty) leaves tracing off; 1, true, yes, on turn it on."""
    monkeypatch.setenv("GOEV_TRACE", value)
    with goev.Reactor(1) as r:
        assert r.trace is on


def test_trace_env_refuses_an_unclear_value(monkeypatch):
    """Any other GOEV_TRACE value is a ValueError naming it and the spellings,
    rather than a guess; trace=False given explicitly does not read it."""
    monkeypatch.setenv("GOEV_TRACE", "maybe")
    with pytest.raises(ValueError, match=r"GOEV_TRACE='maybe': expected one of 1, true, yes, on"):
        goev.Reactor(1)
    with goev.Reactor(1, trace=False) as r:
        assert not r.trace


def test_trace_partial_send_and_out_armed(backend, capfd):
    r = goev.Reactor(1, backend=backend, trace=True)
    try:
        class Big(goev.IOHandle):
            def on_open(self):
                # a small send buffer: the 8 MiB write cannot go out in one send,
                # even with the client reading concurrently on the other core
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
                return super().on_open()

            def on_read(self):
                d = self.read()
                if d:
                    self.write(b"z" * (8 << 20))
                return d is None or bool(d)
        a = goev.Acceptor(r, "127.0.0.1:0", Big)
        r.start()
        with socket.create_connection(a.address) as c:
            c.sendall(b"x")
            assert len(recv_exact(c, 8 << 20)) == 8 << 20
    finally:
        r.stop()
    err = capfd.readouterr().err
    assert "(partial: rest queued)" in err
    assert "(EV_OUT armed)" in err and "(EV_OUT disarmed)" in err


def test_trace_off_costs_nothing_per_event(make_reactor):
    """Counting, not timing: with trace off no trace code runs at all during an
    echo session, and the loop has no observer."""
    r, a = echo_server(make_reactor, 1)
    assert r.pollers[0]._observer is None
    trace_codes = {f.__code__ for cls in (goev._Tracer, goev._TracedBackend, goev._TracedSocket, goev._Observer)
                   for f in vars(cls).values() if hasattr(f, "__code__")}
    calls = []

    def prof(frame, event, arg):
        if event == "call" and frame.f_code in trace_codes:
            calls.append(frame.f_code.co_name)
    threading.setprofile(prof)
    try:
        # the poller thread already runs: install the profiler on it via a post
        done = threading.Event()
        r.post(lambda: (sys.setprofile(prof), done.set()))
        assert done.wait(WAIT)
        with socket.create_connection(a.address) as c:
            for _ in range(50):
                c.sendall(b"abc")
                assert recv_exact(c, 3) == b"abc"
        done2 = threading.Event()
        r.post(lambda: (sys.setprofile(None), done2.set()))
        assert done2.wait(WAIT)
    finally:
        threading.setprofile(None)
    assert calls == []


ORDER_SCRIPT = r'''
import socket, sys, goev
r = goev.Reactor(1, trace=(sys.argv[1] == "on"))
log = []
class P(goev.IOHandle):
    def on_read(self):
        if self.read():
            log.append(self.name)
            if self.name == "A":
                r.call_later(0, log.append, "T")     # due at once
                c_peer.send(b"c")                    # and fd C readable
        return True
a_ours, a_peer = socket.socketpair()
c_ours, c_peer = socket.socketpair()
for name, s in (("A", a_ours), ("C", c_ours)):
    s.setblocking(False)
    h = P()
    h.name = name
    r.add_handler(h, s.fileno(), goev.EV_IN)
r.start()
a_peer.send(b"a")
import time
deadline = time.monotonic() + 20
while len(log) < 3 and time.monotonic() < deadline:
    time.sleep(0.01)
r.stop()
print(" ".join(log))
'''


def test_trace_mode_shows_the_order_of_the_real_loop(backend):
    """One loop: a callback that schedules call_later(0, T) and makes another
    fd C readable sees C's callback before T, with trace mode on and off (a
    timer due at once waits for the next pass; that pass's events come first)."""
    out = {}
    for mode in ("off", "on"):
        r = run_py(["-c", ORDER_SCRIPT, mode], env={"GOEV_BACKEND": backend})
        assert r.returncode == 0, r.stderr
        out[mode] = r.stdout.split()
    assert out["off"] == out["on"] == ["A", "C", "T"], out
    assert "goev[p0]" in run_py(["-c", ORDER_SCRIPT, "on"], env={"GOEV_BACKEND": backend}).stderr


# =============================================================================
# 13. TLS: SSLObject over memory BIOs, and the class swap
# =============================================================================
# Handshakes (server and client), byte-exact echo, close_notify, half-close,
# backpressure, bad peers, the CLI with certificates.


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory):
    """(cert, key) paths of a self-signed localhost certificate made now."""
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is required in CI (.ci/run installs it)")
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
                    "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def server_ctx(tls_cert):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls_cert)
    return ctx


@pytest.fixture
def client_ctx(tls_cert):
    """Verifies the server against the test certificate (hostname checked)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # (create_default_context: PROTOCOL_TLS on 3.9)
    ctx.load_verify_locations(cafile=tls_cert[0])
    return ctx


def tls_connect(address, client_ctx, **kw):
    raw = socket.create_connection(address[:2], timeout=WAIT)
    try:
        return client_ctx.wrap_socket(raw, server_hostname="localhost", **kw)
    except BaseException:
        raw.close()
        raise


def test_tls_on_data_handler_echo_and_eof(make_reactor, npollers, server_ctx, client_ctx):
    """An on_data handler behind TLS receives plaintext (through the TLS read,
    not the loop's plain-read fast path), and on_eof runs at close_notify/FIN."""
    handlers = []

    def make():
        h = _AnswerAtEof()
        handlers.append(h)
        return h
    r, a = echo_server(make_reactor, npollers, factory=make, ssl=server_ctx)
    with tls_connect(a.address, client_ctx) as c:
        c.sendall(b"tls " * 100)
        wait_until(lambda: handlers and len(handlers[0].got) == 400, what="the plaintext")
        c.sendall(b"!")
        wait_until(lambda: len(handlers[0].got) == 401, what="the second record")
        assert handlers[0].got == b"tls " * 100 + b"!"
        socket.socket.shutdown(c, socket.SHUT_WR)   # a FIN under the TLS layer (no close_notify)
        assert recv_all(c) == b"got 401 bytes"      # decrypted; then the server's close
    wait_until(lambda: handlers[0].closed, what="the handler closed")
    assert handlers[0].errors == [None]


def echo_through(c, data):
    """Send data while reading the echo; returns what came back.

    ``c`` is a MemoryClient: OpenSSL forbids using one SSL object from two
    threads at once, so the data is encrypted here first, a thread sends the
    ciphertext on the raw socket, and this thread receives and decrypts.  An
    SSLSocket ``c`` is used sequentially (small data only)."""
    if isinstance(c, ssl.SSLSocket):
        c.sendall(data)
        return recv_exact(c, len(data))
    c.obj.write(data)
    cipher = c.out.read()
    t = threading.Thread(target=c.sock.sendall, args=(cipher,))
    t.start()
    got = c.recv_exact(len(data))
    t.join(WAIT)
    return got


def quiet(goev_log):
    """Records above DEBUG (a failed handshake must log at DEBUG only)."""
    return [r for r in goev_log.records if r.levelno > logging.DEBUG]


def wait_eof(sock):
    """Read until the server closes (EOF or a reset both count)."""
    sock.settimeout(WAIT)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


class MemoryClient:
    """A TLS client over memory BIOs: the test decides what goes in which send."""

    def __init__(self, address, ctx, hostname="localhost", rcvbuf=0):
        self.sock = socket.socket()
        if rcvbuf:                          # before connect: a small window
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(WAIT)
        try:
            self.sock.connect(address[:2])
        except BaseException:
            self.sock.close()
            raise
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=hostname)

    def handshake(self, send_last_flight=True):
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.out.pending:
                    self.sock.sendall(self.out.read())
                self._pull()
        if send_last_flight and self.out.pending:
            self.sock.sendall(self.out.read())

    def _pull(self):
        data = self.sock.recv(65536)
        if data:
            self.inc.write(data)
        else:
            self.inc.write_eof()

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.obj.read(n - len(buf))
            except ssl.SSLWantReadError:
                self._pull()
                continue
            if not chunk:
                break
            buf += chunk
        return bytes(buf)

    def unwrap(self):
        """close_notify both ways: ours, then wait for the server's."""
        while True:
            try:
                self.obj.unwrap()
                return
            except ssl.SSLWantReadError:
                if self.out.pending:
                    self.sock.sendall(self.out.read())
                self._pull()

    def close(self):
        self.sock.close()

    def __enter__(self):
        self.handshake()
        return self

    def __exit__(self, *exc):
        self.close()


# -- echo: byte-exact through TLS ------------------------------------------------

@pytest.mark.parametrize("size", [1, 100, 65536, 1 << 20, 8 << 20])
def test_tls_echo_byte_exact(make_reactor, npollers, server_ctx, client_ctx, size):
    r, a = echo_server(make_reactor, npollers, ssl=server_ctx)
    data = random_bytes(size, seed=size)
    with MemoryClient(a.address, client_ctx) as c:
        assert c.obj.version() in ("TLSv1.2", "TLSv1.3")
        assert echo_through(c, data) == data
        c.unwrap()                          # our close_notify, then the server's: a clean close


def test_tls_many_clients_both_ways(make_reactor, npollers, server_ctx, client_ctx):
    """20 concurrent TLS clients, each a different size, each echoed exactly."""
    r, a = echo_server(make_reactor, npollers, ssl=server_ctx)
    errors = []

    def one(i):
        try:
            data = random_bytes(1000 + 7919 * i)
            with MemoryClient(a.address, client_ctx) as c:
                if echo_through(c, data) != data:
                    errors.append(i)
        except Exception as e:              # reported below
            errors.append((i, e))
    ts = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(WAIT)
    assert not errors


def test_tls_handler_sees_plaintext_and_ssl_object(make_reactor, server_ctx, client_ctx):
    """on_open runs after the handshake; the class swap keeps the user's class."""
    seen = {}

    class Greeter(goev.IOHandle):
        def on_open(self):
            seen["version"] = self.ssl_object.version()
            seen["type"] = type(self)
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.write(b"hello over tls\n")
            return True

        def on_read(self):
            data = self.read()
            if data is None:
                return True
            return False

    r, a = echo_server(make_reactor, 1, factory=Greeter, ssl=server_ctx)
    with tls_connect(a.address, client_ctx) as c:
        assert recv_exact(c, 15) == b"hello over tls\n"
    assert seen["version"] in ("TLSv1.2", "TLSv1.3")
    assert issubclass(seen["type"], Greeter) and seen["type"].__name__ == "TLSGreeter"
    assert goev.IOHandle().ssl_object is None     # plaintext handlers: None


def test_tls_data_right_behind_the_handshake(make_reactor, npollers, server_ctx, client_ctx):
    """The client's Finished and its first record arrive in one segment: the
    record sits in the BIO with no readable event to announce it, and must
    still be delivered (posted read when reading starts)."""
    r, a = echo_server(make_reactor, npollers, ssl=server_ctx)
    m = MemoryClient(a.address, client_ctx)
    try:
        m.handshake(send_last_flight=False)
        m.obj.write(b"early bird")
        m.sock.sendall(m.out.read())        # Finished + application data together
        assert m.recv_exact(10) == b"early bird"
    finally:
        m.close()


# -- goev as the TLS client ------------------------------------------------------

class TLSProbe(goev.IOHandle):
    def __init__(self, send=b""):
        self.send = send
        self.got = bytearray()
        self.err = None
        self.outcome = []
        self.settled = threading.Event()
        self.done = threading.Event()

    def on_open(self):
        self.outcome.append("open")
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        self.write(self.send)
        self.settled.set()
        return True

    def on_connect_fail(self, err):
        self.outcome.append("fail")
        self.err = err
        self.settled.set()

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        self.got += data
        if len(self.got) >= len(self.send):
            self.done.set()
            return False
        return bool(data)

    def on_close(self):
        self.done.set()
        self.destroy()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_tls_goev_client_to_goev_server(make_reactor, npollers, server_ctx, client_ctx, host):
    """Connector.connect(ssl=) verifies the certificate against the host part of
    the address (127.0.0.1 and ::1 as IP SANs, localhost as a DNS name)."""
    listen = "[::1]:0" if host == "[::1]" else "127.0.0.1:0"
    try:
        r, a = echo_server(make_reactor, npollers, addr=listen, ssl=server_ctx)
    except OSError:
        pytest.skip("no IPv6 loopback")
    data = random_bytes(300000, seed=300000)
    h = TLSProbe(data)
    goev.Connector(r).connect("%s:%d" % (host, a.address[1]), h, 5000, ssl=client_ctx)
    assert h.done.wait(WAIT)
    assert h.outcome == ["open"], h.err
    assert bytes(h.got) == data


def test_tls_hostname_mismatch_reaches_on_connect_fail(make_reactor, server_ctx, client_ctx, debug_log):
    r, a = echo_server(make_reactor, 1, ssl=server_ctx)
    h = TLSProbe(b"x")
    goev.Connector(r).connect(a.address, h, 5000, ssl=client_ctx, server_hostname="wrong.example")
    assert h.settled.wait(WAIT)
    assert h.outcome == ["fail"]
    assert isinstance(h.err, ssl.SSLCertVerificationError), h.err
    assert "wrong.example" in str(h.err)
    assert h.fd == -1
    # The server saw the client's alert: a failed handshake, logged at DEBUG only.
    wait_until(lambda: any("handshake" in r.getMessage() for r in debug_log.records), what="debug log")
    assert not quiet(debug_log)


def test_tls_untrusted_certificate_reaches_on_connect_fail(make_reactor, server_ctx):
    r, a = echo_server(make_reactor, 1, ssl=server_ctx)
    h = TLSProbe(b"x")
    ctx = ssl.create_default_context()       # the system CAs: our self-signed cert is unknown
    goev.Connector(r).connect(a.address, h, 5000, ssl=ctx, server_hostname="localhost")
    assert h.settled.wait(WAIT)
    assert h.outcome == ["fail"] and isinstance(h.err, ssl.SSLCertVerificationError)


def test_tls_client_handshake_timeout_and_stop(make_reactor, client_ctx):
    """A server that accepts but never answers: TimeoutError after
    ssl_handshake_timeout_ms; a stop mid-handshake gives ConnectionAbortedError."""
    r = make_reactor(1)
    r.start()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        h = TLSProbe(b"x")
        goev.Connector(r).connect(srv.getsockname(), h, 5000, ssl=client_ctx,
                                  server_hostname="localhost", ssl_handshake_timeout_ms=300)
        assert h.settled.wait(WAIT)
        assert h.outcome == ["fail"] and isinstance(h.err, TimeoutError), h.err
        h2 = TLSProbe(b"x")
        goev.Connector(r).connect(srv.getsockname(), h2, 5000, ssl=client_ctx,
                                  server_hostname="localhost")
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(WAIT)
            assert conn.recv(5)                # the ClientHello arrived: mid-handshake now
            r.stop(timeout=WAIT)
        assert h2.outcome == ["fail"] and isinstance(h2.err, ConnectionAbortedError), h2.err
        srv.accept()[0].close()


def test_tls_client_server_closes_mid_handshake(make_reactor, client_ctx):
    r = make_reactor(1)
    r.start()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        h = TLSProbe(b"x")
        goev.Connector(r).connect(srv.getsockname(), h, 5000, ssl=client_ctx, server_hostname="localhost")
        conn, _ = srv.accept()
        conn.settimeout(WAIT)
        conn.recv(5)
        conn.close()
        assert h.settled.wait(WAIT)
        assert h.outcome == ["fail"] and isinstance(h.err, OSError), h.err


# -- real clients: openssl s_client ----------------------------------------------

class EchoUntilBye(goev.IOHandle):
    def on_read(self):
        data = self.read()
        if data is None:
            return True
        self.write(data)
        return bool(data) and b"bye" not in bytes(data)


def test_tls_openssl_s_client(make_reactor, server_ctx, tls_cert):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    r, a = echo_server(make_reactor, 1, factory=EchoUntilBye, ssl=server_ctx)
    p = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % a.address[1], "-quiet",
                        "-CAfile", tls_cert[0], "-verify_return_error", "-servername", "localhost"],
                       input=b"hello from s_client\nbye\n", capture_output=True, timeout=60)
    assert b"hello from s_client\nbye\n" in p.stdout, (p.stdout, p.stderr)
    assert p.returncode == 0, p.stderr


# -- hostile and broken peers: closed, DEBUG only ----------------------------------

def test_tls_handshake_timeout_server(make_reactor, npollers, server_ctx, debug_log):
    r, a = echo_server(make_reactor, npollers, ssl=server_ctx, ssl_handshake_timeout=0.3)
    with socket.create_connection(a.address) as c:     # connects, says nothing
        wait_eof(c)
    wait_until(lambda: any("timed out" in r.getMessage() for r in debug_log.records), what="debug log")
    assert not quiet(debug_log)


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05garbage" * 100,
                                  b"\x00" * 70000])
def test_tls_plaintext_or_garbage_client(make_reactor, server_ctx, client_ctx, goev_log, junk):
    r, a = echo_server(make_reactor, 1, ssl=server_ctx)
    with socket.create_connection(a.address) as c:
        try:
            c.sendall(junk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        wait_eof(c)
    # The server keeps serving.
    with tls_connect(a.address, client_ctx) as c:
        assert echo_through(c, b"still up") == b"still up"
    assert not quiet(goev_log)


def test_tls_peer_vanishes_mid_handshake(make_reactor, server_ctx, client_ctx, debug_log):
    r, a = echo_server(make_reactor, 1, ssl=server_ctx)
    for reset in (False, True):
        m = MemoryClient(a.address, client_ctx)
        try:
            m.obj.do_handshake()
        except ssl.SSLWantReadError:
            m.sock.sendall(m.out.read())       # the ClientHello, then gone
        if reset:
            m.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        m.close()
    wait_until(lambda: sum("handshake" in r.getMessage() for r in debug_log.records) >= 2, what="debug logs")
    wait_until(lambda: len(r.pollers[0]._handlers) == 1, what="handshakes closed")
    assert not quiet(debug_log)


def test_tls_garbage_after_handshake(make_reactor, server_ctx, client_ctx, goev_log):
    """A broken record after a good handshake: end of stream for the handler,
    handler.error is the SSLError, no close_notify sent, DEBUG only."""
    errs = []

    class E(Echo):
        def on_close(self):
            errs.append(self.error)
            self.destroy()
    r, a = echo_server(make_reactor, 1, factory=E, ssl=server_ctx)
    c = tls_connect(a.address, client_ctx)
    try:
        assert echo_through(c, b"ok") == b"ok"
        with socket.socket(fileno=os.dup(c.fileno())) as raw:
            raw.sendall(b"\x17\x03\x03\x00\x20" + b"\xee" * 32)   # an application record that fails to decrypt
        wait_until(lambda: errs, what="server close")
    finally:
        c.close()
    assert isinstance(errs[0], ssl.SSLError)
    assert not quiet(goev_log)


# -- close_notify, half-close ------------------------------------------------------

def test_tls_server_close_sends_close_notify(make_reactor, server_ctx, client_ctx):
    class OneShot(goev.IOHandle):
        def on_read(self):
            data = self.read()
            if data is None:
                return True
            self.write(data)
            return False                     # close after the echo: close_notify, then FIN
    r, a = echo_server(make_reactor, 1, factory=OneShot, ssl=server_ctx)
    with tls_connect(a.address, client_ctx, suppress_ragged_eofs=False) as c:
        c.sendall(b"ping")
        assert recv_exact(c, 4) == b"ping"
        assert c.recv(10) == b""             # a clean close_notify (a ragged EOF would raise)


def test_tls_shutdown_write_half_close(make_reactor, server_ctx, client_ctx):
    got = []

    class Half(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.write(b"all I have")
            self.shutdown_write()            # close_notify + FIN; reading goes on
            return True

        def on_read(self):
            data = self.read()
            if data is None:
                return True
            got.append(bytes(data))
            return bool(data)
    r, a = echo_server(make_reactor, 1, factory=Half, ssl=server_ctx)
    with tls_connect(a.address, client_ctx, suppress_ragged_eofs=False) as c:
        assert recv_exact(c, 10) == b"all I have"
        assert c.recv(10) == b""
        c.sendall(b"still talking")
        wait_until(lambda: b"".join(got).startswith(b"still talking"), what="server read after half-close")


# -- the send queue: backpressure, ordering, off-thread writes --------------------

def test_tls_backpressure_slow_reader(make_reactor, server_ctx, client_ctx):
    """The client sends 4 MiB and reads nothing: the server's queue of
    ciphertext stays near the high water mark (reading paused), then all of
    it arrives, exact."""
    peak = [0]
    handlers = []

    class Watch(Echo):
        def on_open(self):
            handlers.append(self)
            # Small kernel buffers, so the queue (not the kernel) must absorb the echo.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            return super().on_open()

        def write(self, data):
            super().write(data)
            peak[0] = max(peak[0], self.pending_write_bytes)
    r, a = echo_server(make_reactor, 1, factory=Watch, ssl=server_ctx)
    data = random_bytes(4 << 20)
    with MemoryClient(a.address, client_ctx, rcvbuf=16384) as c:
        c.obj.write(data)
        t = threading.Thread(target=c.sock.sendall, args=(c.out.read(),))
        t.start()
        wait_until(lambda: handlers and handlers[0]._paused, what="reading paused")
        assert peak[0] <= goev.DEFAULT_HIGH_WATER + 2 * 65536 + 8192, peak[0]
        got = c.recv_exact(len(data))
        t.join(WAIT)
    assert got == data
    assert peak[0] <= goev.DEFAULT_HIGH_WATER + 2 * 65536 + 8192, peak[0]


def test_tls_off_thread_writes_in_order(make_reactor, npollers, server_ctx, client_ctx):
    """write() from worker threads is routed to the poller, which encrypts:
    records stay whole and in order."""
    class Threaded(goev.IOHandle):
        def on_read(self):
            data = self.read()
            if data is None:
                return True
            if not data:
                return False
            n = int(bytes(data).decode())

            def work():
                for i in range(n):
                    self.write(b"%06d\n" % i)
            threading.Thread(target=work).start()
            return True
    r, a = echo_server(make_reactor, npollers, factory=Threaded, ssl=server_ctx)
    with tls_connect(a.address, client_ctx) as c:
        c.sendall(b"5000")
        got = recv_exact(c, 5000 * 7)
    assert got == b"".join(b"%06d\n" % i for i in range(5000))


def test_tls_edge_triggered_reader(make_reactor, server_ctx, client_ctx):
    class ET(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN | goev.EV_ET)
            return True

        def on_read(self):
            while True:                      # ET: read until None
                data = self.read()
                if data is None:
                    return True
                if not data:
                    return False
                self.write(data)
    r, a = echo_server(make_reactor, 1, factory=ET, ssl=server_ctx)
    data = random_bytes(1 << 20)
    with MemoryClient(a.address, client_ctx) as c:
        assert echo_through(c, data) == data


def test_tls_tiny_read_buffer(make_reactor, server_ctx, client_ctx):
    """A read buffer smaller than one TLS record: plaintext left in the SSL
    object is delivered by posted reads, nothing is stranded."""
    r = make_reactor(1, read_buffer_size=1000)
    a = goev.Acceptor(r, "127.0.0.1:0", Echo, ssl=server_ctx)
    r.start()
    data = random_bytes(200000, seed=200000)
    with MemoryClient(a.address, client_ctx) as c:
        assert echo_through(c, data) == data


# -- the class swap --------------------------------------------------------------------

class SlotCounter(goev.IOHandle):
    __slots__ = ("count", "note")

    def __init__(self):
        self.count = 0
        self.note = "slots"

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        self.count += len(data)
        self.write(b"%d|" % self.count)
        return True


class Framer(goev.IOHandle):
    """Overrides write() and calls super(): the TLS layer must sit below it."""

    def write(self, data):
        super().write(b"<" + bytes(data) + b">")

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        self.write(data)
        return True


def test_tls_class_swap_with_user_slots_and_overrides(make_reactor, server_ctx, client_ctx):
    made = []
    r, a = echo_server(make_reactor, 1, factory=lambda: made.append(SlotCounter()) or made[-1],
                       ssl=server_ctx)
    with tls_connect(a.address, client_ctx) as c:
        c.sendall(b"abc")
        assert recv_exact(c, 2) == b"3|"
    assert type(made[0]).__name__ == "TLSSlotCounter" and isinstance(made[0], SlotCounter)
    assert made[0].note == "slots" and not hasattr(made[0], "__dict__")
    r2, a2 = echo_server(make_reactor, 1, factory=Framer, ssl=server_ctx)
    with tls_connect(a2.address, client_ctx) as c:
        c.sendall(b"xyz")
        assert recv_exact(c, 5) == b"<xyz>"
    # One subclass per user class, made once.
    assert goev._tls_class(SlotCounter) is goev._tls_class(SlotCounter) is type(made[0])


# -- arguments, trace mode ---------------------------------------------------------------

def test_tls_bad_arguments(make_reactor, server_ctx, client_ctx):
    r = make_reactor(1)
    with pytest.raises(TypeError, match="ssl"):
        goev.Acceptor(r, "127.0.0.1:0", Echo, ssl="yes")
    with pytest.raises(ValueError):
        goev.Acceptor(r, "127.0.0.1:0", Echo, ssl=client_ctx)      # a client context
    with pytest.raises(ValueError, match="ssl_handshake_timeout"):
        goev.Acceptor(r, "127.0.0.1:0", Echo, ssl=server_ctx, ssl_handshake_timeout=0)
    with pytest.raises(ValueError):                                  # check_hostname, no name
        goev.Connector(r).connect("unix:/nonexistent/x", TLSProbe(), 1000, ssl=client_ctx)
    assert not r.pollers[0]._handlers


def test_tls_trace_mode(make_reactor, server_ctx, client_ctx, capfd):
    r = make_reactor(1, trace=True)
    a = goev.Acceptor(r, "127.0.0.1:0", Echo, ssl=server_ctx)
    r.start()
    with tls_connect(a.address, client_ctx) as c:
        assert echo_through(c, b"traced") == b"traced"
    err = capfd.readouterr().err
    assert "_TLSHandshake" in err and "TLSEcho" in err


# -- the CLI ------------------------------------------------------------------------------

def test_tls_cli_echo_and_http(tls_cert, client_ctx, backend):
    cert, key = tls_cert
    for cmd in ("echo", "http"):
        port = free_port()
        p = spawn_py(["-m", "goev", cmd, "127.0.0.1:%d" % port, "--backend", backend,
                      "--tls-cert", cert, "--tls-key", key])
        try:
            wait_port(port)
            if cmd == "echo":
                with tls_connect(("127.0.0.1", port), client_ctx) as c:
                    assert echo_through(c, b"cli tls") == b"cli tls"
            else:
                ctx = ssl._create_unverified_context()
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=WAIT)
                try:
                    conn.request("GET", "/")
                    resp = conn.getresponse()
                    assert resp.status == 200 and resp.read() == b"Hello, World!"
                finally:
                    conn.close()
        finally:
            assert stop_child(p) == 0


def test_tls_cli_bad_certificate(tmp_path):
    bad = tmp_path / "nothing.pem"
    bad.write_text("not a certificate")
    p = spawn_py(["-m", "goev", "echo", "127.0.0.1:0", "--tls-cert", str(bad)])
    try:
        assert p.wait(WAIT) == 2
        assert "certificate" in p.stderr.read()
    finally:
        stop_child(p)


def test_tls_cli_file_problems_name_the_file_and_the_fix(tls_cert, tmp_path):
    """A missing --tls-key is blamed on the key file; a certificate file without
    a key says to pass --tls-key; the files swapped say which one lacks what;
    a key that does not match is reported with both names.  One line, exit 2."""
    cert, key = tls_cert
    other = tmp_path / "other-key.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True, capture_output=True,
                   timeout=60)
    missing = str(tmp_path / "missing.pem")
    cases = [
        (["--tls-cert", cert, "--tls-key", missing], ["cannot read the --tls-key file " + missing,
                                                      "No such file or directory"]),
        (["--tls-cert", missing], ["cannot read the --tls-cert file " + missing]),
        (["--tls-cert", cert], ["no private key in %s; pass --tls-key" % cert]),
        (["--tls-cert", key, "--tls-key", cert], ["no PEM certificate", key]),
        (["--tls-cert", cert, "--tls-key", cert], ["no PEM private key", cert]),
        (["--tls-cert", cert, "--tls-key", str(other)], [cert, str(other), "KEY_VALUES_MISMATCH"]),
    ]
    for args, says in cases:
        res = run_py(["-m", "goev", "echo", "127.0.0.1:0"] + args)
        _assert_one_line_exit_2(res, *says)
        assert "PEM lib" not in res.stderr


def test_failed_tls_handshakes_are_freed_by_reference_counting(make_reactor, server_ctx):
    """A handshake that fails (garbage, then a reset) holds an SSLObject; with
    the garbage collector off it is freed as soon as goev lets go of it."""
    r, a = echo_server(make_reactor, 1, ssl=server_ctx)

    def handshakes():
        return [o for o in gc.get_objects() if type(o) is goev._TLSHandshake]
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            c = socket.create_connection(a.address)
            c.sendall(b"\x16\x03\x01\x00\x05hello")        # a broken ClientHello
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        wait_until(lambda: len(r.pollers[0]._handlers) == 1, what="every handshake closed")
        # Each check posts a no-op: the wake-up makes the loop drop its reference
        # to the last handler it dispatched (see _Poller._loop).
        wait_until(lambda: (r.post(lambda: None), handshakes() == [])[1],
                   what="the failed handshakes to be freed without a collection")
    finally:
        gc.enable()


def test_reactor_stop_sends_tls_close_notify(make_reactor, server_ctx, client_ctx, npollers):
    """Reactor.stop() ends a TLS connection with close_notify, as close() does:
    the client sees a clean end of stream, not a truncation (ragged EOF)."""
    r, a = echo_server(make_reactor, npollers, ssl=server_ctx)
    with tls_connect(a.address, client_ctx, suppress_ragged_eofs=False) as c:
        c.sendall(b"ping")
        assert recv_exact(c, 4) == b"ping"
        r.stop(timeout=WAIT)
        assert c.recv(10) == b""          # SSLEOFError here would be a ragged EOF


def test_tls_head_and_idle_timeout(tmp_path):
    """Over TLS (the handler's class is swapped after the handshake): HEAD, the
    Connection list, and the idle close."""
    import ssl
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    ctx = ssl._create_unverified_context()
    with http_cli_serving("--tls-cert", cert, "--tls-key", key, "--idle-timeout", "0.5") as srv:
        with ctx.wrap_socket(srv.connect()) as s, s.makefile("rb") as f:
            s.sendall(HTTP_GET + b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" + HTTP_GET)
            assert read_response(f)[2] == b"Hello, World!"
            assert read_response(f, head=True)[1]["content-length"] == "13"
            assert read_response(f)[2] == b"Hello, World!"
            t0 = time.monotonic()
            assert f.read() == b""                     # closed when idle (TLS close_notify or EOF)
            assert 0.4 <= time.monotonic() - t0 < 10
        with ctx.wrap_socket(srv.connect()) as s, s.makefile("rb") as f:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n" + HTTP_GET)
            assert read_response(f)[1]["connection"] == "close"
            assert f.read() == b""


# =============================================================================
# 14. The PROXY protocol: the client's address from a load balancer
# =============================================================================
# v1 and v2 headers, split and bad headers, timeouts, HAProxy in front.


V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(cmd=1, fam=0x11, body=b""):
    return V2_SIG + bytes([0x20 | cmd, fam]) + len(body).to_bytes(2, "big") + body


def v2_inet(src, sport, dst="10.0.0.1", dport=80, tlvs=b""):
    body = socket.inet_aton(src) + socket.inet_aton(dst) + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    return v2_header(1, 0x11, body + tlvs)


def v2_inet6(src, sport, dst="2001:db8::2", dport=443):
    body = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))
    return v2_header(1, 0x21, body)


def v2_unix(path):
    return v2_header(1, 0x31, path.encode().ljust(108, b"\0") + b"/srv".ljust(108, b"\0"))


class Recorder:
    """A factory whose handlers record (peer, sock_peer, poller of on_open) and echo."""

    def __init__(self):
        self.made = 0
        self.opened = []

    def __call__(self):
        self.made += 1
        rec = self

        class H(goev.IOHandle):
            def on_open(self):
                rec.opened.append((self.peer, self.sock_peer, self.reactor.current_poller()))
                return super().on_open()

            def on_read(self):
                d = self.read()
                if d is None:
                    return True
                if not d:
                    return False
                self.write(d)
                return True
        return H()


def proxy_server(make_reactor, pollers=1, **kw):
    rec = Recorder()
    r = make_reactor(pollers)
    a = goev.Acceptor(r, "127.0.0.1:0", rec, proxy_protocol=True, **kw)
    r.start()
    return rec, a


def closed_by_server(c):
    """True once the server closed (EOF or RST); nothing may be echoed."""
    c.settimeout(WAIT)
    try:
        return c.recv(100) == b""
    except ConnectionResetError:
        return True


# -- the parser ----------------------------------------------------------------------

@pytest.mark.parametrize("data, expect", [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 80\r\n", (36, 1, ("1.2.3.4", 1111))),
    (b"PROXY TCP6 2001:db8::1 ::1 4242 443\r\nrest", (37, 1, ("2001:db8::1", 4242, 0, 0))),
    (b"PROXY UNKNOWN whatever\r\n", (24, 1, None)),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 80", None),             # no CRLF yet: need more
    (b"PROX", None),
    (V2_SIG[:7], None),
    (v2_inet("9.8.7.6", 5555)[:20], None),                      # length known, body incomplete
    (v2_inet("9.8.7.6", 5555) + b"x", (28, 2, ("9.8.7.6", 5555))),
    (v2_inet("9.8.7.6", 5555, tlvs=b"\x04\x00\x03abc"), (34, 2, ("9.8.7.6", 5555))),   # a TLV, skipped
    (v2_inet6("2001:db8::7", 7), (52, 2, ("2001:db8::7", 7, 0, 0))),
    (v2_unix("/run/client.sock"), (232, 2, "/run/client.sock")),
    (v2_header(0, 0x00), (16, 2, None)),                         # LOCAL: a health check
    (v2_header(0, 0x11, bytes(12)), (28, 2, None)),
])
def test_proxy_parse_good(data, expect):
    assert goev._proxy_parse(data) == expect


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    b"PROXY TCP4 999.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY " + b"A" * 120,
    V2_SIG[:11] + b"X" + b"\x21\x11\x00\x00",
    V2_SIG + b"\x11\x11\x00\x0c" + bytes(12),                     # version 1 in a v2 header
    V2_SIG + b"\x22\x11\x00\x0c" + bytes(12),                     # command 2
    V2_SIG + b"\x21\x11" + (5000).to_bytes(2, "big"),             # oversized
    v2_header(1, 0x11, bytes(4)),                                 # INET with 4 address bytes
    v2_header(1, 0x51, bytes(12)),                                # unknown family
])
def test_proxy_parse_bad(data):
    with pytest.raises(goev._ProxyError):
        goev._proxy_parse(data)


# -- the Acceptor with proxy_protocol=True ----------------------------------------------

GOOD = [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 80\r\n", ("1.2.3.4", 1111)),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 4242 443\r\n", ("2001:db8::1", 4242, 0, 0)),
    (v2_inet("9.8.7.6", 5555, tlvs=b"\x04\x00\x03abc"), ("9.8.7.6", 5555)),
    (v2_inet6("2001:db8::7", 7), ("2001:db8::7", 7, 0, 0)),
    (v2_unix("/run/client.sock"), "/run/client.sock"),
    (b"PROXY UNKNOWN\r\n", None),
    (v2_header(0, 0x00), None),
]


@pytest.mark.parametrize("header, client", GOOD, ids=["v1-tcp4", "v1-tcp6", "v2-inet-tlv", "v2-inet6",
                                                       "v2-unix", "v1-unknown", "v2-local"])
def test_proxy_header_then_data_same_segment(make_reactor, npollers, header, client):
    rec, a = proxy_server(make_reactor, npollers)
    with socket.create_connection(a.address) as c:
        c.sendall(header + b"hello after the header")      # one segment: the bytes after the
        assert recv_exact(c, 22) == b"hello after the header"   # header reach on_read
        c.sendall(b"more")
        assert recv_exact(c, 4) == b"more"
        me = c.getsockname()
        wait_until(lambda: rec.opened, what="on_open")
        peer, sock_peer, poller = rec.opened[0]
        assert peer == (me if client is None else client)    # UNKNOWN/LOCAL: the real peer
        assert sock_peer == me                               # the balancer stays available
        assert poller is a.poller                            # on_open on the acceptor's poller
    assert rec.made == 1


@pytest.mark.parametrize("which", [0, 2], ids=["v1", "v2"])
def test_proxy_header_split_byte_by_byte(make_reactor, backend, which):
    header, client = GOOD[which]
    rec, a = proxy_server(make_reactor, 1)

    def got():                            # header bytes consumed so far (none past it)
        return sum(len(h._buf) for h in list(a.poller._handlers.values())
                   if isinstance(h, goev._ProxyHeader))
    with socket.create_connection(a.address) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(header) - 1):
            c.sendall(header[i:i + 1])
            if i % 5 == 0:                 # some bytes arrive alone: a read per byte
                wait_until(lambda: got() == i + 1, what="byte %d to be read" % i)
        wait_until(lambda: got() == len(header) - 1, what="all but the last byte")
        assert rec.made == 0 and rec.opened == []      # no user code before the header ends
        c.sendall(header[-1:] + b"ping")
        assert recv_exact(c, 4) == b"ping"
    assert rec.opened[0][0] == client


BAD = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                         # missing header
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 99999\r\nhello",
    b"PROXY " + b"A" * 200,                                       # oversized v1
    V2_SIG + b"\x21\x11" + (60000).to_bytes(2, "big") + bytes(100),   # oversized v2
    V2_SIG + b"\x11\x11\x00\x0c" + bytes(12),                     # bad v2 version
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",              # a TLS ClientHello, no header
]


@pytest.mark.parametrize("data", BAD, ids=["missing", "v1-fields", "v1-port", "v1-oversized",
                                           "v2-oversized", "v2-version", "tls-no-header"])
def test_proxy_bad_header_closes_quietly(make_reactor, backend, debug_log, data):
    goev_log = debug_log
    rec, a = proxy_server(make_reactor, 1)
    with socket.create_connection(a.address) as c:
        c.sendall(data)
        assert closed_by_server(c)
    wait_until(lambda: any(r.levelno == logging.DEBUG and "connection closed" in r.getMessage()
                           for r in goev_log.records), what="the DEBUG line")
    assert rec.made == 0 and rec.opened == []                # never reached user code
    assert [r for r in goev_log.records if r.levelno > logging.DEBUG] == []


def test_proxy_eof_before_header_and_timeout(make_reactor, backend, debug_log):
    goev_log = debug_log
    rec, a = proxy_server(make_reactor, 1, proxy_header_timeout=0.3)
    with socket.create_connection(a.address) as c:          # half a header, then FIN
        c.sendall(b"PROXY TCP4 1.2")
        c.shutdown(socket.SHUT_WR)
        assert closed_by_server(c)
    with socket.create_connection(a.address) as c:          # a slow peer: says nothing
        assert closed_by_server(c)                           # closed by the timer, not by us
    with socket.create_connection(a.address) as c:          # a slow peer: half a header
        c.sendall(V2_SIG[:5])
        assert closed_by_server(c)
    msgs = [r.getMessage() for r in goev_log.records]
    assert any("end of stream before the PROXY header" in m for m in msgs)
    assert sum("no PROXY header within 0.3s" in m for m in msgs) == 2
    assert rec.made == 0
    assert [r for r in goev_log.records if r.levelno > logging.DEBUG] == []
    with pytest.raises(ValueError, match="proxy_header_timeout"):
        goev.Acceptor(a.reactor, "127.0.0.1:0", Echo, proxy_protocol=True, proxy_header_timeout=0)


def test_proxy_pending_header_closed_by_stop(make_reactor, backend):
    """A connection still sending its header when the reactor stops: closed, no leak."""
    rec, a = proxy_server(make_reactor, 2)
    c = socket.create_connection(a.address)
    c.sendall(b"PROXY TCP4")
    wait_until(lambda: any(isinstance(h, goev._ProxyHeader) for h in a.poller._handlers.values()),
               what="the header reader")
    a.reactor.stop(timeout=WAIT)
    assert closed_by_server(c)
    c.close()
    assert rec.made == 0


# -- HAProxy in front ------------------------------------------------------------------

HAPROXY_CFG = """
global
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:%(front)d
    default_backend be
backend be
    server goev 127.0.0.1:%(back)d %(mode)s
"""


@pytest.fixture
def haproxy():
    """haproxy(back_port, "send-proxy"|"send-proxy-v2") -> the frontend port; killed by PID after."""
    exe = need_tool("haproxy")
    procs = []
    tmp = tempfile.mkdtemp(prefix="goev-haproxy-")

    def start(back, mode):
        front = free_port()
        cfg = os.path.join(tmp, "haproxy-%d.cfg" % front)
        with open(cfg, "w") as f:
            f.write(HAPROXY_CFG % {"front": front, "back": back, "mode": mode})
        log = open(os.path.join(tmp, "haproxy-%d.log" % front), "w")
        p = subprocess.Popen([exe, "-f", cfg, "-db"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        procs.append(p)
        wait_port(front)
        return front
    yield start
    for p in procs:
        stop_child(p)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("mode", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_of_acceptor(make_reactor, backend, haproxy, mode):
    rec, a = proxy_server(make_reactor, 1)
    front = haproxy(a.address[1], mode)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", front)) as c:
            c.sendall(b"through haproxy")
            assert recv_exact(c, 15) == b"through haproxy"
            me = ("127.0.0.1", c.getsockname()[1])
        # (the order of on_open calls is not ours to rely on: wait_port's probe
        # connection may reach the server after this one)
        wait_until(lambda: any(o[0] == me for o in rec.opened), what="on_open with peer %r" % (me,))
        sock_peer = next(o[1] for o in rec.opened if o[0] == me)
        assert sock_peer[0] == "127.0.0.1" and sock_peer != me  # HAProxy's own connection
        assert sock_peer[1] != a.address[1]
    assert all(o[0] != o[1] for o in rec.opened)            # peer is never the balancer


@pytest.mark.parametrize("mode", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_of_cli_echo(backend, haproxy, mode):
    """python -m goev echo --proxy-protocol --trace: the trace line shows the client."""
    back = free_port()
    err = _stderr_file()
    env = dict(os.environ, GOEV_BACKEND=backend, PYTHONPATH=HERE)
    p = subprocess.Popen([sys.executable, "-m", "goev", "echo", "127.0.0.1:%d" % back, "--proxy-protocol",
                          "--trace"], cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_port(back)                   # (this probe has no header: closed at DEBUG, unseen)
        front = haproxy(back, mode)
        with socket.create_connection(("127.0.0.1", front)) as c:
            c.sendall(b"hello")
            assert recv_exact(c, 5) == b"hello"
            me = ("127.0.0.1", c.getsockname()[1])
        want = "PROXY v%d header: client %r via" % (2 if mode.endswith("v2") else 1, me)

        def seen():
            err.seek(0)
            return want in err.read()
        wait_until(seen, what="the trace line %r" % want)
    finally:
        assert stop_child(p) == 0
        err.close()


# =============================================================================
# 15. ConnectPool: a pool of client connections
# =============================================================================
# Fill, acquire, release; a server that goes away and comes back; close.


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
        # h is idle once, not twice; acquire() may have started a refill
        # (min_idle 1), which can have added a second connection meanwhile.
        assert list(other._idle).count(h) == 1 and other.idle <= 2
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
                if p is r.current_poller():
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
            for p in sr.pollers:
                if p is sr.current_poller():
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


# =============================================================================
# 16. Multi-process serving: serve()
# =============================================================================
# Workers on REUSEPORT, restarts, SIGTERM drains, SIGHUP reloads, SIGQUIT,
# systemd socket activation.


WORKER_SCRIPT = r'''
import os, sys
import goev

class H(goev.IOHandle):
    """Answers each line with this worker's pid; "big N" sends N bytes then closes."""
    def on_read(self):
        d = self.read()
        if d is None:
            return True
        if not d:
            return False
        d = bytes(d)
        if d.startswith(b"big "):
            self.write(b"x" * int(d.split()[1]))
            return False
        self.write(str(os.getpid()).encode() + b"\n")
        return True

def ready(addr):
    print("READY %s %d" % (addr[0], addr[1]), flush=True)

sys.exit(goev.serve("127.0.0.1:0", H, workers=int(sys.argv[1]), pollers=int(sys.argv[2]),
                    drain_timeout=float(sys.argv[3]), ready=ready))
'''


def start_workers(backend, workers, pollers=1, drain=20.0):
    p = spawn_py(["-c", WORKER_SCRIPT, str(workers), str(pollers), str(drain)],
                 env={"GOEV_BACKEND": backend})
    line = p.stdout.readline()
    assert line.startswith("READY"), (line, p.stderr.read() if p.poll() is not None else "")
    port = int(line.split()[2])
    return p, port


def ask_pid(port):
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(b"pid\n")
        return int(recv_exact(s, 1, WAIT) + s.recv(100))


def test_serve_two_workers_both_serve(backend):
    p, port = start_workers(backend, 2)
    try:
        pids = set()
        wait_until(lambda: pids.add(ask_pid(port)) or len(pids) >= 2, what="both workers to answer")
        assert len(pids) == 2 and p.pid not in pids
    finally:
        assert stop_child(p) == 0


def test_serve_restarts_killed_worker(backend):
    p, port = start_workers(backend, 2)
    try:
        pids = set()
        wait_until(lambda: pids.add(ask_pid(port)) or len(pids) >= 2, what="both workers")
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        seen = set()

        def replaced():
            # No try/except: connections hashed to the dead worker's listener wait in
            # its queue (the supervisor holds it) until the replacement accepts them.
            seen.add(ask_pid(port))
            return len(seen - {victim} - pids) >= 1
        wait_until(replaced, what="a replacement worker to answer")
        assert victim not in seen - pids
    finally:
        assert stop_child(p) == 0


def test_serve_sigterm_lets_inflight_response_finish(backend):
    size = 64 << 20
    p, port = start_workers(backend, 2)
    try:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"big %d" % size)
        first = recv_exact(s, 1)          # the response is under way ...
        os.kill(p.pid, signal.SIGTERM)    # ... when the supervisor is told to stop
        rest = recv_all(s)
        s.close()
        assert len(first) + len(rest) == size
        assert p.wait(WAIT) == 0
    finally:
        stop_child(p)


def test_serve_in_process_pollers_and_reuseport(backend):
    """workers=1 with 3 pollers: one REUSEPORT acceptor pinned to each poller."""
    p, port = start_workers(backend, 1, pollers=3)
    try:
        for _ in range(20):
            assert ask_pid(port) == p.pid
    finally:
        assert stop_child(p, signal.SIGINT) == 0


def test_serve_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        goev.serve("127.0.0.1:0", Echo, workers=0)
    with pytest.raises(TypeError, match="factory"):
        goev.serve("127.0.0.1:0", 42)
    with pytest.raises(ValueError, match="backend"):
        goev.serve("127.0.0.1:0", Echo, backend="nope")


def test_cli_http_workers_and_help():
    r = run_py(["-m", "goev", "http", "--help"])
    assert r.returncode == 0 and "--workers" in r.stdout and "--trace" in r.stdout
    port = free_port()
    p = spawn_py(["-m", "goev", "http", "127.0.0.1:%d" % port, "--workers", "2", "--pollers", "2"])
    try:
        wait_port(port)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        c.request("GET", "/")
        assert c.getresponse().read() == b"Hello, World!"
        c.close()
    finally:
        assert stop_child(p) == 0
    assert p.returncode == 0


def test_listen_fds_ignores_other_pids_and_unsets(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 100000))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "x")
    assert goev._listen_fds() == []
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ
    assert "LISTEN_FDNAMES" not in os.environ


def _ssa(port, backend, args, err):
    exe = need_tool("systemd-socket-activate")
    # systemd-socket-activate listens, and on the first connection execs the
    # command with the socket as fd 3 (LISTEN_FDS=1, LISTEN_PID = that pid).
    return subprocess.Popen([exe, "-l", "127.0.0.1:%d" % port, "-E", "GOEV_BACKEND=" + backend,
                             "-E", "PYTHONPATH=" + HERE, sys.executable, "-m", "goev"] + args,
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=err)


def _children_of(pid):
    kids = set()
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                kids.update(int(x) for x in f.read().split())
        except OSError:
            pass
    return kids


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_socket_activate_cli(backend, workers):
    port = free_port()
    err = _stderr_file()
    p = _ssa(port, backend, ["echo", "--workers", str(workers)], err)   # no ADDR: the socket is passed
    try:
        wait_port(port)                   # systemd-socket-activate itself listens
        for i in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
                c.sendall(b"activated %d" % i)
                assert recv_exact(c, 11) == b"activated %d" % i
        want = "echo server on ('127.0.0.1', %d)" % port

        def announced():
            err.seek(0)
            return want in err.read()
        wait_until(announced, what=want)
        if workers > 1:                   # a reload over the inherited socket too
            old = _children_of(p.pid)
            os.kill(p.pid, signal.SIGHUP)
            wait_until(lambda: len(_children_of(p.pid)) == 2 and not _children_of(p.pid) & old,
                       what="a new generation")
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
                c.sendall(b"reloaded")
                assert recv_exact(c, 8) == b"reloaded"
    finally:
        assert stop_child(p) == 0
        err.close()


# -- zero-downtime reload -------------------------------------------------------------------

class Hammer:
    """Client threads: connect, send random bytes, check the echo, close -- in a loop."""

    def __init__(self, port, threads=2):
        self.port = port
        self.ok = 0
        self.bytes = 0
        self.failures = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, seed):
        rnd = random.Random(seed)
        while not self._stop.is_set():
            data = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 3000)))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as c:
                    c.sendall(data)
                    got = recv_exact(c, len(data))
                if got != data:
                    raise AssertionError("echo lost bytes: sent %d, got %d" % (len(data), len(got)))
            except Exception as e:          # noqa: BLE001 - every failure counts
                with self._lock:
                    self.failures.append(repr(e))
                continue
            with self._lock:
                self.ok += 1
                self.bytes += len(data)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(WAIT)


def test_sighup_reload_zero_failures(backend):
    port = free_port()
    p = spawn_py(["-m", "goev", "echo", "127.0.0.1:%d" % port, "--workers", "2"],
                 env={"GOEV_BACKEND": backend})
    hammer = None
    try:
        wait_port(port)
        wait_until(lambda: len(_children_of(p.pid)) == 2, what="two workers")
        hammer = Hammer(port)
        generations = [_children_of(p.pid)]
        for _ in range(2):
            before = hammer.ok
            wait_until(lambda: hammer.ok >= before + 20, what="traffic before the reload")
            os.kill(p.pid, signal.SIGHUP)
            old = generations[-1]
            wait_until(lambda: len(_children_of(p.pid)) == 2 and not _children_of(p.pid) & old,
                       what="the old generation to be replaced")
            generations.append(_children_of(p.pid))
            mid = hammer.ok
            wait_until(lambda: hammer.ok >= mid + 20, what="traffic after the reload")
        hammer.stop()
        assert hammer.failures == [], hammer.failures[:5]
        assert hammer.ok > 60
        assert len(set().union(*generations)) == 6            # three generations of two workers
    finally:
        if hammer is not None:
            hammer.stop()
        assert stop_child(p) == 0


def test_sigquit_retires_after_open_connections_end(backend):
    """SIGQUIT (what a reload sends the old workers): stop accepting at once, keep
    serving the open connection until its peer closes it, then exit 0."""
    port = free_port()
    p = spawn_py(["-m", "goev", "echo", "127.0.0.1:%d" % port], env={"GOEV_BACKEND": backend})
    try:
        wait_port(port)
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"one")
        assert recv_exact(c, 3) == b"one"
        p.send_signal(signal.SIGQUIT)

        def refused():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                return False
            except ConnectionRefusedError:
                return True
            except ConnectionResetError:
                # the probe was queued just as the (only) listener closed: the
                # kernel resets it -- closing, not closed yet: probe again
                return False
        try:
            wait_until(refused, what="the listener to close")
            c.sendall(b"still served")                    # the open connection carries on
            assert recv_exact(c, 12) == b"still served"
            assert p.poll() is None
        finally:
            c.close()
        assert p.wait(WAIT) == 0                      # ... and then the server exits
    finally:
        stop_child(p)


def test_sighup_without_workers_is_ignored(backend):
    port = free_port()
    err = _stderr_file()
    env = dict(os.environ, GOEV_BACKEND=backend, PYTHONPATH=HERE)
    p = subprocess.Popen([sys.executable, "-m", "goev", "echo", "127.0.0.1:%d" % port], cwd=HERE, env=env,
                         stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_port(port)
        p.send_signal(signal.SIGHUP)

        def warned():
            err.seek(0)
            return "SIGHUP ignored" in err.read()
        wait_until(warned, what="the warning")
        assert p.poll() is None                       # not killed by SIGHUP
        assert echo_ok(("127.0.0.1", port), b"x")
    finally:
        assert stop_child(p) == 0
        err.close()


def test_serve_shared_socket_unix_workers(backend, tmp_path):
    """workers=N on a unix socket: one listening socket made by the supervisor
    (per-worker binds could not share a path); the path is removed at exit."""
    path = str(tmp_path / "echo.sock")
    p = spawn_py(["-m", "goev", "echo", "unix:" + path, "--workers", "2"], env={"GOEV_BACKEND": backend})
    try:
        wait_until(lambda: os.path.exists(path), what="the socket file")
        for i in range(5):
            with socket.socket(socket.AF_UNIX) as c:
                c.settimeout(WAIT)
                c.connect(path)
                c.sendall(b"unix %d" % i)
                assert recv_exact(c, 6) == b"unix %d" % i
    finally:
        assert stop_child(p) == 0
    assert not os.path.exists(path)


SERVE_BROKEN_LISTENER = r'''
import errno, os, socket, sys, threading, goev
class Echo(goev.IOHandle):
    def on_read(self):
        d = self.read()
        if d:
            self.write(d)
        return d is None or bool(d)
class Broken:
    def __init__(self, s): self._s = s
    def __getattr__(self, n): return getattr(self._s, n)
    def _accept(self): raise OSError(errno.EBADF, "injected")
def setup(r):
    a = [h for h in r.pollers[0]._handlers.values() if isinstance(h, goev.Acceptor)][0]
    a._sock = Broken(a._sock)
def ready(addr):
    threading.Thread(target=lambda: socket.create_connection(addr).close()).start()
sys.exit(goev.serve("127.0.0.1:0", Echo, setup=setup, ready=ready, drain_timeout=1.0))
'''


def test_serve_exits_nonzero_when_its_listener_breaks(backend):
    """Under serve() a listener closed by an accept() error ends the process
    with exit status 1 (a supervisor would start a new worker)."""
    r = run_py(["-c", SERVE_BROKEN_LISTENER], env={"GOEV_BACKEND": backend})
    assert r.returncode == 1, r.stderr
    assert "listener lost" in r.stderr and "Traceback" not in r.stderr


# =============================================================================
# 17. The command line: python -m goev echo|http ADDR, echo --udp ADDR
# =============================================================================
# Real processes: options, exit codes, and the HTTP server (RFC 9112 framing,
# timeouts, malformed input, its fast path).


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


def test_cli_version():
    """`python -m goev --version` prints "goev VERSION" on stdout and exits 0."""
    res = run_py(["-m", "goev", "--version"])
    assert res.returncode == 0, res
    assert res.stdout == "goev %s\n" % goev.__version__ and res.stderr == ""


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


@pytest.mark.parametrize("addr,says", [("8080", "did you mean ':8080'"),
                                       ("127.0.0.1:-1", "out of range 0..65535"),
                                       ("http://127.0.0.1:0", "did you mean '127.0.0.1:0'")])
def test_cli_address_mistake_says_what_to_do(addr, says):
    """The address messages reach the command line as one line, exit 2."""
    _assert_one_line_exit_2(run_py(["-m", "goev", "echo", addr]), addr, says)


def test_cli_without_address_says_one_is_needed():
    """No ADDR (and no socket activation): the echo usage and a line saying an
    address is needed, with examples, socket activation only as the alternative."""
    res = run_py(["-m", "goev", "echo"], env={"LISTEN_PID": "", "LISTEN_FDS": ""})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "usage: python -m goev echo" in res.stderr
    assert "ADDR is needed, e.g. 127.0.0.1:8080" in res.stderr and "LISTEN_FDS" in res.stderr


@pytest.mark.parametrize("args", [["echo", "127.0.0.1:0", "--bogus"],
                                  ["http", "127.0.0.1:0", "--log-level", "chatty"],
                                  ["http", "127.0.0.1:0", "--header-timeout", "-1"],
                                  ["echo", "127.0.0.1:0", "--tls-key", "k.pem"]])
def test_cli_subcommand_mistake_prints_the_subcommand_usage(args):
    """An unknown option, a bad value or a missing companion option: exit 2
    with the subcommand's own usage (its options listed), not the top-level one."""
    res = run_py(["-m", "goev"] + args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "usage: python -m goev %s [-h]" % args[0] in res.stderr, res.stderr
    assert "python -m goev %s: error:" % args[0] in res.stderr, res.stderr


def test_cli_log_level_debug_shows_proxy_rejections():
    """--log-level DEBUG sets the "goev" logger: a connection without a PROXY
    header is then logged (one line, level and pid shown); at the default
    level (WARNING) it is not."""
    for level in ("DEBUG", None):
        srv = HttpCliServer("--proxy-protocol", *(["--log-level", level.lower()] if level else []))
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as c:
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                try:                                  # closed without an answer (a reset:
                    assert c.recv(100) == b""         # the request was never read)
                except ConnectionResetError:
                    pass
            if level:
                wait_until(lambda: "; connection closed" in srv.stderr, what="the DEBUG line")
        finally:
            err = srv.stop()
        lines = [x for x in err.splitlines() if "; connection closed" in x]
        if level:
            assert len(lines) == 1 and re.match(r"goev\[\d+\] DEBUG: <_ProxyHeader", lines[0]), err
            assert "PROXY" in lines[0]
        else:
            assert not lines, err


def test_cli_pollers_auto(backend):
    """--pollers auto: one poller per core with the GIL off, else 1; the banner
    says how many, and the server echoes and stops on SIGTERM."""
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    want = 1 if gil else cores
    port = free_port()
    p = spawn_py(["-m", "goev", "echo", "127.0.0.1:%d" % port, "--pollers", "auto"], env={"GOEV_BACKEND": backend})
    try:
        banner = p.stderr.readline()
        wait_port(port)
        assert echo_ok(("127.0.0.1", port))
    finally:
        assert stop_child(p) == 0
    assert "x %d poller" % want in banner, banner
    assert "N|auto" in run_py(["-m", "goev", "echo", "--help"]).stdout


def test_cli_refuses_an_absurd_poller_count_up_front():
    """--pollers 100000: one line saying the bound and why, before any thread
    or fd is made (not EMFILE after thousands of pollers)."""
    _assert_one_line_exit_2(run_py(["-m", "goev", "echo", "127.0.0.1:0", "--pollers", "100000"]),
                            "pollers=100000 is too many: at most", "thread")
    _assert_one_line_exit_2(run_py(["-m", "goev", "echo", "127.0.0.1:0", "--pollers", "9", "--workers", "2"],
                                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))),
                            "at most 8", "RLIMIT_NOFILE")


# -- python -m goev http ------------------------------------------------------------

@pytest.fixture
def http_server(backend):
    port = free_port()
    p = spawn_py(["-m", "goev", "http", "127.0.0.1:%d" % port], env={"GOEV_BACKEND": backend})
    try:
        wait_port(port)
        yield port
    finally:
        assert stop_child(p) == 0
        assert p.returncode == 0


def test_http_keepalive_with_http_client(http_server):
    c = http.client.HTTPConnection("127.0.0.1", http_server, timeout=WAIT)
    for _ in range(5):
        c.request("GET", "/")
        r = c.getresponse()
        assert r.status == 200 and r.read() == b"Hello, World!"
        assert r.getheader("Content-Length") == "13"
        assert r.getheader("Date", "").endswith("GMT")
    c.close()


def test_http_pipelined_and_split(http_server):
    req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    out = http_raw(http_server, req * 50, until=50)
    assert out.count(b"HTTP/1.1 200 OK") == 50
    with socket.create_connection(("127.0.0.1", http_server), timeout=WAIT) as s:
        for b in req * 3:                      # one byte per send: split across reads
            s.sendall(bytes([b]))
        buf = b""
        while buf.count(b"Hello, World!") < 3:
            buf += s.recv(65536)
    post = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    out = http_raw(http_server, post + req + post[:40], until=2)
    assert out.count(b"200 OK") == 2


def test_http_connection_close_and_http10(http_server):
    out = http_raw(http_server, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.count(b"200 OK") == 1            # answered once, then closed
    out = http_raw(http_server, b"GET / HTTP/1.0\r\n\r\n")
    assert out.count(b"200 OK") == 1


@pytest.mark.parametrize("bad", [
    b"garbage\r\n\r\n",
    b"GET /\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",                                     # HTTP/1.1 without Host
    b"GET / HTTP/1.1\r\nX: " + b"a" * 10000,               # oversized head, never finished
])
def test_http_malformed_gets_400_and_close(http_server, bad):
    out = http_raw(http_server, bad)
    assert out.startswith(b"HTTP/1.1 400 Bad Request")
    assert out.endswith(b"Bad Request")


def test_http_curl(http_server):
    import shutil
    if not shutil.which("curl"):
        if os.environ.get("CI"):
            pytest.fail("curl is not installed")
        pytest.skip("curl is not installed")
    url = "http://127.0.0.1:%d/" % http_server
    r = subprocess.run(["curl", "-s", "--http1.1", url, url, url], capture_output=True, timeout=WAIT)
    assert r.returncode == 0 and r.stdout == b"Hello, World!" * 3


def test_http_fast_path_never_answers_what_the_parser_would_not(http_server):
    """The memoized fast path: after a plain GET was learned, variants of it
    (a different header, a body, Connection: close, a prefix) take the parser."""
    req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert http_raw(http_server, req * 3, until=3).count(b"200 OK") == 3      # learned
    assert http_raw(http_server, req + req[:-2], until=1).count(b"200 OK") == 1  # 2nd incomplete
    close = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert http_raw(http_server, close + req).count(b"200 OK") == 1           # closed after one
    bad = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n"
    assert http_raw(http_server, bad).startswith(b"HTTP/1.1 400")
    body = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 27\r\n\r\n" + req      # req is a body here
    assert http_raw(http_server, body + req, until=2).count(b"200 OK") == 2


def test_cli_slow_callback_ms(backend, tmp_path):
    """python -m goev echo --slow-callback-ms N serves (the option reaches the
    reactor: a fast echo logs no warning, the server exits 0 on SIGTERM)."""
    port = free_port()
    with open(tmp_path / "err", "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "goev", "echo", "127.0.0.1:%d" % port,
                              "--slow-callback-ms", "50", "--backend", backend],
                             cwd=HERE, env=_child_env({}), stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_port(port)
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(b"ping")
                assert recv_exact(c, 4) == b"ping"
        finally:
            rc = stop_child(p)
    text = (tmp_path / "err").read_text()
    assert rc == 0, text
    assert "goev" in text and "held poller" not in text


@pytest.fixture
def http_cli():
    yield from _http_cli_serve()


@pytest.fixture
def http_fast_timeouts():
    yield from _http_cli_serve("--header-timeout", "0.5", "--idle-timeout", "0.5")


@contextlib.contextmanager
def http_sent(srv, payload):
    """A new connection on which ``payload`` was sent (not half-closed): yields it
    and its binary file."""
    with srv.connect() as s, s.makefile("rb") as f:
        try:
            s.sendall(payload)
        except OSError:                            # closed already (it answered first)
            pass
        yield s, f


def http_until_close(f):
    """What the server sends until it closes (a reset counts as a close)."""
    rest = b""
    while True:
        try:
            chunk = f.read1(65536)
        except ConnectionResetError:
            return rest
        if not chunk:
            return rest
        rest += chunk


def http_closed_within(sock, limit):
    """Wait (select) until the server closes ``sock``; returns the seconds it took and
    whatever came before the EOF.  Fails after ``limit`` seconds."""
    t0 = time.monotonic()
    got = b""
    while True:
        left = t0 + limit - time.monotonic()
        assert left > 0, "not closed within %gs (got %r)" % (limit, got)
        r, _, _ = select.select([sock], [], [], left)
        if r:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return time.monotonic() - t0, got
            got += chunk


# -- 8. HEAD ----------------------------------------------------------------------------------

def test_head_gets_headers_only(http_cli):
    with http_cli.connect() as s, s.makefile("rb") as f:
        s.sendall(HTTP_GET + b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" + HTTP_GET)   # GET first: learned
        st, fields, body = read_response(f)
        assert st == 200 and body == b"Hello, World!"
        st, fields, body = read_response(f, head=True)
        assert st == 200 and fields["content-length"] == "13"
        st, fields, body = read_response(f)                # the body was not sent: in step
        assert st == 200 and body == b"Hello, World!"


def test_head_with_curl_no_excess(http_cli):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    url = "http://127.0.0.1:%d/" % http_cli.port
    r = subprocess.run([curl, "-sS", "-v", "-I", "--http1.1", url, url], capture_output=True, timeout=WAIT)
    assert r.returncode == 0, r.stderr
    assert b"Excess" not in r.stderr, r.stderr
    assert r.stdout.count(b"HTTP/1.1 200 OK") == 2 and b"Hello" not in r.stdout
    assert b"Content-Length: 13" in r.stdout


# -- 9. Content-Length and Transfer-Encoding ------------------------------------------------

@pytest.mark.parametrize("fields, status", [
    pytest.param(b"Content-Length: " + b"9" * 5000, 400, id="cl-5000-digits"),   # beyond int()'s limit
    pytest.param(b"Content-Length: " + b"1" * 19, 400, id="cl-19-digits"),       # beyond the digit cap
    pytest.param(b"Content-Length: 5\r\nContent-Length: 6", 400, id="cl-twice-differing"),  # smuggling
    pytest.param(b"Content-Length: 5, 6", 400, id="cl-list-differing"),
    pytest.param(b"Content-Length: -5", 400, id="cl-negative"),
    pytest.param(b"Content-Length : 5", 400, id="cl-space-before-colon"),        # RFC 9112 5.1
    pytest.param(b"Transfer-Encoding : chunked", 400, id="te-space-before-colon-chunked"),
    pytest.param(b"Transfer-Encoding : x", 400, id="te-space-before-colon-x"),
    pytest.param(b"Transfer-Encoding: gzip", 501, id="te-gzip"),                 # not implemented
    pytest.param(b"Transfer-Encoding: gzip, chunked", 501, id="te-gzip-chunked"),
    pytest.param(b"Transfer-Encoding: chunked, chunked", 400, id="te-chunked-twice"),
    pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: 5", 400, id="te-and-cl"),
    pytest.param(b"Content-Length: 5\r\nTransfer-Encoding: chunked", 400, id="cl-and-te"),
])
def test_bad_framing_is_refused_and_closed(http_cli, fields, status):
    req = b"POST / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n\r\nhello" + HTTP_GET
    with http_sent(http_cli, req) as (_, f):
        st, fields_, body = read_response(f)
        assert (st, fields_.get("connection")) == (status, "close")
        assert http_until_close(f) == b""                          # one error, then the close


def test_same_length_twice_is_one_length(http_cli):
    req = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    with http_cli.connect() as s, s.makefile("rb") as f:
        s.sendall(req + HTTP_GET)
        assert read_response(f)[0] == 200
        assert read_response(f)[0] == 200


CHUNKED = (b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;name=value;q=\"a \\\"quoted\\\" ext\"\r\nhello\r\n"
           b"1A\r\n" + b"z" * 26 + b"\r\n"
           b"0 ;last\r\nX-Trailer: yes\r\nOther: 1\r\n\r\n")


def test_chunked_body_is_read_and_dropped(http_cli):
    with http_cli.connect() as s, s.makefile("rb") as f:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(CHUNKED + HTTP_GET + CHUNKED.replace(b"POST", b"PUT") + HTTP_GET)
        for _ in range(4):
            st, fields, body = read_response(f)
            assert st == 200 and body == b"Hello, World!"
            assert "connection" not in fields
        for b in CHUNKED + HTTP_GET:                       # one byte per send
            s.sendall(bytes([b]))
        for _ in range(2):
            assert read_response(f)[0] == 200


@pytest.mark.parametrize("body", [
    pytest.param(b"f" * 5000 + b"\r\n", id="size-5000-digits"),
    pytest.param(b"1" * 17 + b"\r\n", id="size-17-digits"),
    pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="no-crlf-after-data"),
    pytest.param(b"-5\r\n", id="size-negative"),
    pytest.param(b"5 \r\nhello\r\n0\r\n\r\n", id="space-after-size"),
    pytest.param(b"0\r\nbad trailer\r\n\r\n", id="trailer-without-colon"),
    pytest.param(b"0\r\nX : 1\r\n\r\n", id="trailer-space-before-colon"),
    pytest.param(b"g\r\n", id="size-not-hex"),
    pytest.param(b"5;\r\nhello\r\n0\r\n\r\n", id="extension-without-name"),
])
def test_bad_chunked_body_gets_400(http_cli, body):
    req = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    out = http_exchange(http_cli, req)
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n"), out
    assert out.count(b"HTTP/1.1") == 1, out          # no 200 first: the answer waits for the body


def test_expect_100_continue(http_cli):
    with http_cli.connect() as s, s.makefile("rb") as f:
        s.sendall(b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
        s.sendall(b"hello" + HTTP_GET)
        assert read_response(f)[0] == 200
        assert read_response(f)[0] == 200


# -- 10. Connection ----------------------------------------------------------------------

@pytest.mark.parametrize("req", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", id="close"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nConnection:close\r\n\r\n", id="close-no-space"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nconnection: keep-alive, close\r\n\r\n", id="list"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nCONNECTION: Upgrade\r\nConnection: CLOSE\r\n\r\n",
                 id="two-fields-uppercase"),
    pytest.param(b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: TE, close \r\n\r\n", id="head-list"),
    pytest.param(b"GET / HTTP/1.0\r\n\r\n", id="http10"),                 # 1.0: closes by default
    pytest.param(b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", id="http10-list"),
])
def test_connection_close_is_honoured_and_announced(http_cli, req):
    with http_cli.connect() as s, s.makefile("rb") as f:
        s.sendall(req + HTTP_GET)                       # a second request the server must not answer
        st, fields, body = read_response(f, head=req.startswith(b"HEAD"))
        assert st == 200 and fields["connection"] == "close"
        assert http_until_close(f) == b""                 # then the server closed


def test_http10_keep_alive_is_echoed_and_kept(http_cli):
    req = b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
    with http_cli.connect() as s, s.makefile("rb") as f:
        for _ in range(3):
            s.sendall(req)
            st, fields, body = read_response(f)
            assert st == 200 and fields["connection"].lower() == "keep-alive" and body == b"Hello, World!"
        s.sendall(HTTP_GET)                             # and 1.1 on the same connection: no field
        st, fields, body = read_response(f)
        assert st == 200 and "connection" not in fields


# -- 11. Host, control bytes, head size ----------------------------------------------

@pytest.mark.parametrize("req", [
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="no-host"),
    pytest.param(b"GET / HTTP/1.1\r\nX: y\r\n\r\n", id="no-host-other-field"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", id="two-hosts"),
    pytest.param(b"GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n", id="two-hosts-http10"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", id="invalid-host"),
    pytest.param(b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", id="nul-in-target"),
    pytest.param(b"GET /\x01x HTTP/1.1\r\nHost: x\r\n\r\n", id="ctl-in-target"),
    pytest.param(b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n", id="del-in-target"),
    pytest.param(b"GET\t/ HTTP/1.1\r\nHost: x\r\n\r\n", id="tab-separator"),
    pytest.param(b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", id="two-spaces"),
    pytest.param(b"GET / HTTP/1.1\x00\r\nHost: x\r\n\r\n", id="nul-after-version"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", id="nul-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", id="bare-cr-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\nb\r\n\r\n", id="bare-lf-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 60000 + b"\r\n\r\n", id="60KB-head-complete"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 2000 + b"\r\n", id="2000-fields"),
])
def test_bad_head_gets_400_and_close(http_cli, req):
    with http_sent(http_cli, req + HTTP_GET) as (_, f):
        st, fields, body = read_response(f)
        assert (st, fields.get("connection"), body) == (400, "close", b"Bad Request")
        assert http_until_close(f) == b""


def test_head_just_under_the_limit_is_fine(http_cli):
    pad = b"X: " + b"a" * (8192 - 40) + b"\r\n"
    req = b"GET / HTTP/1.1\r\nHost: x\r\n" + pad + b"\r\n"
    assert len(req) - 4 <= 8192
    with http_cli.connect() as s, s.makefile("rb") as f:
        s.sendall(req)
        assert read_response(f)[0] == 200


# -- 12. timeouts -------------------------------------------------------------------------

def test_options_in_help():
    env = dict(os.environ, PYTHONPATH=HERE)
    r = subprocess.run([sys.executable, "-m", "goev", "http", "--help"], cwd=HERE, env=env,
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0 and "--header-timeout" in r.stdout and "--idle-timeout" in r.stdout
    r = subprocess.run([sys.executable, "-m", "goev", "http", "127.0.0.1:0", "--idle-timeout", "-1"],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 2 and "--idle-timeout" in r.stderr


def test_dripping_client_is_closed(http_fast_timeouts):
    with http_fast_timeouts.connect() as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        got = b""
        for b in HTTP_GET * 100:                        # one byte per 50 ms: 70 s if never cut
            try:
                s.sendall(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                break
            r, _, _ = select.select([s], [], [], 0.05)   # the drip's pace, watching for the close
            if r:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
                if b"408" in got:
                    http_closed_within(s, WAIT)
                    break
        took = time.monotonic() - t0
    assert b"200 OK" not in got                    # the head never completed
    assert got.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), got
    assert 0.4 <= took < 10, took


def test_silent_connection_is_closed(http_fast_timeouts):
    with http_fast_timeouts.connect() as s:
        took, got = http_closed_within(s, WAIT)
    assert got == b"" and 0.4 <= took < 10


def test_idle_keepalive_connection_is_closed(http_fast_timeouts):
    with http_fast_timeouts.connect() as s, s.makefile("rb") as f:
        s.sendall(HTTP_GET)
        assert read_response(f)[0] == 200
        took, got = http_closed_within(s, WAIT)
    assert got == b"" and 0.4 <= took < 10


@pytest.mark.slow
def test_active_connection_is_not_closed(http_fast_timeouts):
    """Requests every 0.2 s for 2 s (four idle timeouts), heads split in two parts;
    then whole GETs every 0.2 s for 2 s; then silence, and the close."""
    with http_fast_timeouts.connect() as s, s.makefile("rb") as f:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 2.0:
            s.sendall(HTTP_GET[:10])                     # a head in two parts, 0.1 s apart
            r, _, _ = select.select([s], [], [], 0.1)
            assert not r, "the server answered or closed mid-head"
            s.sendall(HTTP_GET[10:])
            assert read_response(f)[0] == 200
            n += 1
            r, _, _ = select.select([s], [], [], 0.2)   # idle, under the timeout
            assert not r, "closed while active"
        assert n >= 5
        t0 = time.monotonic()                       # whole GETs: the fast path answers these
        while time.monotonic() - t0 < 2.0:
            s.sendall(HTTP_GET)
            assert read_response(f)[0] == 200
            last = time.monotonic()
            r, _, _ = select.select([s], [], [], 0.2)
            assert not r, "closed while active (fast path)"
        _, got = http_closed_within(s, WAIT)             # and once idle, closed
        took = time.monotonic() - last              # (since the last answer)
    assert got == b"" and 0.4 <= took < 10


def test_peer_that_does_not_read_its_answers_is_dropped(http_fast_timeouts):
    """Pipelined requests, answers never read: more answers than the kernel's
    buffers hold, so they queue in the server, which stops reading (above the
    high water mark); the idle timeout then drops the connection, queue and all
    (a reset: a FIN would wait behind the unsent answers)."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", http_fast_timeouts.port))
        s.setblocking(False)
        http_sent = 0
        try:
            while http_sent < len(HTTP_GET) * 80000:           # 12 MB of answers
                http_sent += s.send(HTTP_GET * 1000)
        except BlockingIOError:                      # the server stopped reading
            pass
        assert http_sent >= len(HTTP_GET) * 1000
        t0 = time.monotonic()
        p = select.poll()                            # the event: a hang-up or a reset,
        p.register(s, select.POLLRDHUP | select.POLLHUP | select.POLLERR)   # unread data or not
        events = p.poll(WAIT * 1000)
        took = time.monotonic() - t0
        assert events, "not dropped within %gs" % WAIT
        assert took < 10
    finally:
        s.close()


def test_idle_timeout_shorter_than_head_timeout():
    with http_cli_serving("--header-timeout", "30", "--idle-timeout", "0.5") as srv:
        with srv.connect() as s, s.makefile("rb") as f:
            s.sendall(HTTP_GET)                           # the first head: its timeout was set at open
            assert read_response(f)[0] == 200
            took, got = http_closed_within(s, WAIT)       # and yet the idle one applies after it
        assert got == b"" and 0.4 <= took < 10
        with srv.connect() as s, s.makefile("rb") as f:
            s.sendall(HTTP_GET[:10])                      # a head in two reads, then idle
            r, _, _ = select.select([s], [], [], 0.1)
            assert not r
            s.sendall(HTTP_GET[10:])
            assert read_response(f)[0] == 200
            took, got = http_closed_within(s, WAIT)
        assert got == b"" and 0.4 <= took < 10


@pytest.mark.slow
def test_head_timeout_shorter_than_idle_timeout():
    with http_cli_serving("--header-timeout", "0.5", "--idle-timeout", "30") as srv:
        with srv.connect() as s, s.makefile("rb") as f:
            s.sendall(HTTP_GET)
            assert read_response(f)[0] == 200
            r, _, _ = select.select([s], [], [], 1.5)   # idle: 30 s allowed
            assert not r, "closed while idle under the idle timeout"
            t0 = time.monotonic()
            s.sendall(HTTP_GET[:10])                      # a new head starts, never ends
            took, got = http_closed_within(s, WAIT)
            took = time.monotonic() - t0
        assert got.startswith(b"HTTP/1.1 408 ") and 0.4 <= took < 10


@pytest.mark.parametrize("extra", [
    pytest.param(["--pollers", "3"], id="3pollers"),
    pytest.param(["--backend", "selectors", "--pollers", "2"], id="selectors"),
    pytest.param(["--trace"], id="trace"),
])
def test_timeouts_on_every_poller(extra):
    """Connections spread over several pollers (the timer is set from the
    acceptor's thread), the selectors backend, trace mode: each connection is
    answered, then closed when idle; a silent one is closed too."""
    with http_cli_serving("--header-timeout", "0.5", "--idle-timeout", "0.5", *extra) as srv:
        conns = [srv.connect() for _ in range(6)]
        files = [c.makefile("rb") for c in conns]
        try:
            for c, f in zip(conns[:5], files):
                c.sendall(HTTP_GET)
                assert read_response(f)[0] == 200
            for c in conns:
                took, got = http_closed_within(c, WAIT)
                assert got == b""
        finally:
            for f in files:
                f.close()
            for c in conns:
                c.close()


def test_default_timeouts_leave_a_fresh_connection_alone(http_cli):
    """The defaults (10 s, 60 s): a second of silence is fine."""
    with http_cli.connect() as s:
        r, _, _ = select.select([s], [], [], 1.0)
        assert not r


# -- 13. no input makes a traceback -----------------------------------------------------

HTTP_CORPUS = [
    b"", b"\r\n", b"\r\n\r\n", b"\r\n\r\n\r\n\r\n", b"\n\n", b"GET\r\n\r\n", b"GET /\r\n\r\n",
    b"GET / HTTP/1.1", b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n",
    b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", b"GET / HTTP/1.1.1\r\nHost: x\r\n\r\n",
    b"GET / http/1.1\r\nHost: x\r\n\r\n", b"GET / HTTP/11\r\nHost: x\r\n\r\n",
    b"GET / HTTP/\xff.1\r\nHost: x\r\n\r\n", b" GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n", b"GET / HTTP/1.1\n\n", b"GET / HTTP/1.1\nHost: x\n\n",
    b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00" * 100, b"\xff\xfe\xfd" * 1000, bytes(range(256)) * 40,
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",                  # a TLS ClientHello
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n",
    b"A" * 20000 + b" / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET " + b"/" * 20000 + b" HTTP/1.1\r\n\r\n",
    b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n", b"g\xc3\xa9t / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n: empty\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n  folded\r\n\r\n",
    b"GET / HTTP/1.1\r\n folded: x\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX\x00Y: 1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nX: \x1b[31m\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"0" * 5000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: \xd9\xa3\r\n\r\n",      # an Arabic-Indic digit
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3,\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 5000 + b"\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcde\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1;" + b"a" * 9000 + b"\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X: y\r\n" * 3000,
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"T" * 10000,
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \xff\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n\r\n",
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: \x00\r\n\r\n",
]


def test_nul_bytes_never_take_the_fast_path(http_cli):
    """Before any GET was learned, a read of NULs on a kept-alive connection was
    "k copies" of the fast path's initial b"\\0" and got k 200s."""
    post = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"
    with http_sent(http_cli, post) as (s, f):                    # answered, not learned
        assert read_response(f)[0] == 200
        s.sendall(b"\0" * 10)
        st, fields, body = read_response(f)
        assert (st, fields.get("connection")) == (400, "close")
        assert http_until_close(f) == b""


def test_malformed_corpus_never_traces(http_cli):
    wrong = []
    for payload in HTTP_CORPUS:
        out = http_exchange(http_cli, payload)
        if not (out == b"" or re.match(rb"HTTP/1\.1 [45]\d\d ", out)) or b" 200 OK" in out:
            wrong.append((payload[:60], out[:60]))
        assert http_cli.proc.poll() is None
    with http_cli.connect() as s, s.makefile("rb") as f:        # still serving (and every
        s.sendall(HTTP_GET)                                        # earlier answer was logged)
        assert read_response(f)[0] == 200
    assert "Traceback" not in http_cli.stderr, http_cli.stderr[-3000:]
    assert not wrong, "answered, neither 4xx/5xx nor a close: %r" % wrong


# -- in-process: every split of a request across reads --------------------------------------

@pytest.fixture(scope="module")
def http_goev_mod():
    """GOEV_DIR's goev.py as a module of its own name (the repository's goev may
    be imported in the same session)."""
    spec = importlib.util.spec_from_file_location("goev_http_under_test", os.path.join(HERE, "goev.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class HttpFeeder:
    """An _HttpHandler on one end of a socketpair in a reactor that is not started:
    each feed() is exactly one read (on_read called by hand)."""

    def __init__(self, goev):
        self.goev = goev
        self.r = goev.Reactor(1)
        goev._http_setup(self.r)
        self.a, self.b = socket.socketpair()
        self.b.setblocking(False)
        self.a.settimeout(WAIT)
        self.h = goev._HttpHandler()
        self.h.reactor = self.r
        self.h.fd = self.b.fileno()
        assert self.h.on_open()
        self.open = True

    def feed(self, data):
        self.a.sendall(data)
        if not self.h.on_read():
            self.h.close()
            self.open = False

    def output(self):
        self.a.setblocking(False)
        out = b""
        while True:
            try:
                chunk = self.a.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            out += chunk
        self.a.setblocking(True)
        return out

    def close(self):
        self.r.stop()
        self.a.close()
        self.b.close()


def _http_statuses(out):
    return re.findall(rb"HTTP/1\.1 (\d\d\d) ", out)


HTTP_STREAM = (CHUNKED + HTTP_GET
          + b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\nabc\r\nde"
          + b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
          + b"\r\n" + HTTP_GET
          + b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
          + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


def test_every_split_gives_the_same_answers(http_goev_mod):
    def run(pieces):
        fd = HttpFeeder(http_goev_mod)
        try:
            for p in pieces:
                if fd.open:
                    fd.feed(p)
            return fd.output(), fd.open
        finally:
            fd.close()
    whole, still_open = run([HTTP_STREAM])
    assert _http_statuses(whole) == [b"200"] * 7 and not still_open
    assert whole.count(b"Hello, World!") == 6                  # not for the HEAD
    assert whole.endswith(b"Connection: close\r\n\r\nHello, World!")
    assert b"Connection: keep-alive\r\n" in whole
    date = re.compile(rb"Date: [^\r]*")
    norm = date.sub(b"Date: D", whole)
    for i in range(1, len(HTTP_STREAM)):
        out, _ = run([HTTP_STREAM[:i], HTTP_STREAM[i:]])
        assert date.sub(b"Date: D", out) == norm, i
    out, _ = run([bytes([b]) for b in HTTP_STREAM])
    assert date.sub(b"Date: D", out) == norm


def test_fast_path_learns_only_plain_gets(http_goev_mod):
    cls = http_goev_mod._HttpHandler
    for req in (b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n"):
        cls._known = b""
        fd = HttpFeeder(http_goev_mod)
        try:
            fd.feed(req)
            if fd.open:
                fd.feed(req)
        finally:
            fd.close()
        assert cls._known == b"", req
    fd = HttpFeeder(http_goev_mod)
    try:
        fd.feed(HTTP_GET)
        assert cls._known == HTTP_GET                      # learned ...
        fd.feed(HTTP_GET * 3)                              # ... and answered by the fast path
        assert fd.h._buf is None
        assert _http_statuses(fd.output()) == [b"200"] * 4
    finally:
        fd.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_udp_echo_serves_on_every_poller_and_stops_on_signal(backend, sig):
    """`python -m goev echo --udp 127.0.0.1:0 --pollers 2` echoes datagrams
    (one socket per poller on the port) and exits 0 on SIGINT/SIGTERM."""
    p = spawn_py(["-m", "goev", "echo", "--udp", "127.0.0.1:0", "--backend", backend, "--pollers", "2"])
    try:
        err = _Pipe(p.stderr)
        banner = err.readline()
        assert "echo (UDP) server on ('127.0.0.1', " in banner and backend in banner, banner
        port = int(re.search(r"'127\.0\.0\.1', (\d+)\)", banner).group(1))
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
        try:
            for i, c in enumerate(clients):
                c.settimeout(WAIT)
                msg = b"%d:" % i + os.urandom(1000 * i + 1)
                c.sendto(msg, ("127.0.0.1", port))
                assert c.recvfrom(70000) == (msg, ("127.0.0.1", port))
        finally:
            for c in clients:
                c.close()
        p.send_signal(sig)
        assert p.wait(WAIT) == 0
        assert "Traceback" not in err.read_rest()
    finally:
        stop_child(p, signal.SIGKILL)


def test_cli_udp_echo_trace_shows_recvfrom_and_sendto():
    """--trace prints each datagram read (size and sender) and each send."""
    p = spawn_py(["-m", "goev", "echo", "--udp", "127.0.0.1:0", "--trace"])
    try:
        err = _Pipe(p.stderr)
        line = err.readline()
        while "echo (UDP) server on" not in line:
            line = err.readline()
            assert line, "no banner"
        port = int(re.search(r"'127\.0\.0\.1', (\d+)\)", line).group(1))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(WAIT)
            c.sendto(b"ping", ("127.0.0.1", port))
            assert c.recvfrom(100)[0] == b"ping"
            me = ("127.0.0.1", c.getsockname()[1])
        p.send_signal(signal.SIGTERM)
        assert p.wait(WAIT) == 0
        rest = err.read_rest()
        assert "recvfrom -> 4 bytes from %r" % (me,) in rest, rest
        assert "sendto(%r) 4 bytes -> 4 sent" % (me,) in rest, rest
    finally:
        stop_child(p, signal.SIGKILL)


def test_cli_udp_port_in_use_and_tcp_only_options():
    """A UDP port in use, and --workers/--tls-cert with --udp: exit 2, no traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        _assert_one_line_exit_2(run_py(["-m", "goev", "echo", "--udp", "127.0.0.1:%d" % port]), str(port))
    res = run_py(["-m", "goev", "echo", "--udp", "127.0.0.1:0", "--workers", "2"])
    assert res.returncode == 2 and "--workers is for TCP" in res.stderr and "Traceback" not in res.stderr


# =============================================================================
# Examples: every program in examples/, with its real clients
# =============================================================================
# Each example runs as a process and is driven by the client it names (curl,
# wrk, redis-cli, the websockets package, socat), plus malformed input.


EXAMPLE = os.path.join(HERE,
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


# -- examples/reuseport.py and examples/http_hello.py ------------------------------------


def test_example_reuseport_counts(backend):
    port = free_port()
    p = spawn_py(["examples/reuseport.py", "127.0.0.1:%d" % port, "--pollers", "3"],
                 env={"GOEV_BACKEND": backend})
    wait_port(port)                     # the probe connection counts too
    for _ in range(150):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        c.request("GET", "/")
        assert c.getresponse().read() == b"Hello, World!"
        c.close()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=WAIT)
    assert p.returncode == 0, err
    counts = [int(line.split()[3]) for line in out.splitlines() if line.startswith("poller")]
    assert len(counts) == 3 and sum(counts) >= 150
    # 150 connections hashed over 3 listeners: each gets some (P(one gets none) ~ 1e-26)
    assert all(c > 0 for c in counts), counts


@pytest.fixture
def hello_server(backend):
    port = free_port()
    p = spawn_py(["examples/http_hello.py", "127.0.0.1:%d" % port, "--pollers", "2"],
                 env={"GOEV_BACKEND": backend})
    try:
        wait_port(port)
        yield port
    finally:
        assert stop_child(p) == 0


def test_example_http_hello(hello_server):
    port = hello_server
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    for path in ("/", "/a", "/b"):
        c.request("GET", path)
        r = c.getresponse()
        assert r.status == 200 and r.read() == b"Hello, World!" and r.getheader("Date")
    c.request("POST", "/p", body=b"x" * 100000)
    assert c.getresponse().read() == b"Hello, World!"
    c.close()
    req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert http_raw(port, req * 40, until=40).count(b"200 OK") == 40
    assert http_raw(port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert http_raw(port, b"GET / HTTP/1.0\r\n\r\n").count(b"200 OK") == 1


def test_example_http_hello_curl_and_wrk(hello_server):
    need_tool("curl")
    url = "http://127.0.0.1:%d/" % hello_server
    r = subprocess.run(["curl", "-s", "--http1.1", url, url], capture_output=True, timeout=WAIT)
    assert r.returncode == 0 and r.stdout == b"Hello, World!" * 2
    need_tool("wrk")
    r = subprocess.run(["wrk", "-t1", "-c10", "-d1s", url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Non-2xx" not in r.stdout and "Socket errors" not in r.stdout, r.stdout
    assert int(r.stdout.split("requests in")[0].split()[-1]) > 0


def _readline(stream, timeout=WAIT):
    """One line from a child's pipe, or '' if none came within the timeout."""
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


def start_example(kids, args, backend=None):
    """Start examples/<args[0]> with goev on ``backend``; returns (proc, port)."""
    env = {"GOEV_BACKEND": backend} if backend else {}
    proc = spawn_py([os.path.join("examples", args[0])] + list(args[1:]), env=env)
    kids.append(proc)
    line = _readline(proc.stderr)
    m = re.search(r"listening on \S*:(\d+)\b", line)     # (the last colon: "[::1]:PORT" too)
    if not m:
        code, out, err = finish(proc)
        pytest.fail("%s did not start (rc=%r): %s%s" % (args[0], code, line, err))
    return proc, int(m.group(1))


def finish(proc, sig=signal.SIGTERM):
    """Signal a child and reap it: (returncode, stdout, stderr)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        try:                                    # pending, blocked, caught: which signals
            with open("/proc/%d/status" % proc.pid) as f:
                masks = "".join(line for line in f if line.startswith(("Sig", "ShdPnd", "State")))
        except OSError:
            masks = ""
        proc.send_signal(signal.SIGABRT)        # faulthandler prints where every thread is
        try:
            out, err = proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail("child %d ignored %s:\n%s%s" % (proc.pid, sig, masks, err))
    return proc.returncode, out, err


def assert_clean_exit(proc):
    code, out, err = finish(proc)
    assert code == 0, "exit code %r, stderr:\n%s" % (code, err)
    assert "Traceback" not in err, err
    return out, err


def echo_roundtrip(port, data):
    """Send ``data`` (from a thread) while reading the echo; byte-exact check."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
        t = threading.Thread(target=c.sendall, args=(data,))
        t.start()
        got = recv_exact(c, len(data))
        t.join()
        c.shutdown(socket.SHUT_WR)
        rest = recv_all(c)                    # the server answers our FIN with its own
    assert got == data
    assert rest == b""


def run_tool(argv, data=b"", timeout=WAIT):
    """Run a real client to completion; returns its stdout (bytes)."""
    p = subprocess.run(argv, input=data, capture_output=True, timeout=timeout)
    assert p.returncode == 0, "%s: rc=%d %s" % (argv[0], p.returncode, p.stderr.decode(errors="replace"))
    return p.stdout


def nc_argv(port):
    """nc that exits after stdin EOF + the server's EOF (openbsd -N, else -q)."""
    nc = need_tool("nc")
    helptext = subprocess.run([nc, "-h"], capture_output=True, text=True).stderr
    return [nc, "-N" if "-N" in helptext else "-q1", "127.0.0.1", str(port)]


# -- echo.py -----------------------------------------------------------------------

def test_example_echo(backend, kids):
    proc, port = start_example(kids, ["echo.py", "127.0.0.1:0"], backend)
    echo_roundtrip(port, random_bytes(1 << 20))
    line = b"hello from a real client\n"
    assert run_tool([need_tool("socat"), "-", "TCP:127.0.0.1:%d" % port], line) == line
    assert run_tool(nc_argv(port), line) == line
    assert_clean_exit(proc)


def test_example_echo_sigint(backend, kids):
    proc, port = start_example(kids, ["echo.py", "127.0.0.1:0"], backend)
    echo_roundtrip(port, b"x")
    code, _, err = finish(proc, signal.SIGINT)
    assert code == 0, err


def test_example_echo_on_a_unix_socket(backend, kids, tmp_path):
    """echo.py unix:PATH says where it listens (unix:PATH), echoes a unix-socket
    client byte for byte and exits 0 on SIGTERM."""
    path = str(tmp_path / "echo.sock")
    proc = spawn_py([os.path.join("examples", "echo.py"), "unix:" + path], env={"GOEV_BACKEND": backend})
    kids.append(proc)
    line = _readline(proc.stderr)
    assert line.strip() == "echo: listening on unix:" + path, line + finish(proc)[2]
    data = random_bytes(300000, seed=23)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(WAIT)
        c.connect(path)
        t = threading.Thread(target=c.sendall, args=(data,))
        t.start()
        got = recv_exact(c, len(data))
        t.join(WAIT)
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b""               # our FIN answered by the server's
    assert got == data
    assert run_tool([need_tool("socat"), "-", "UNIX-CONNECT:" + path], b"hi\n") == b"hi\n"
    assert_clean_exit(proc)


# -- tcp_proxy.py ---------------------------------------------------------------------

class Upstream:
    """A blocking test server on a thread: ``script(conn, index)`` runs per accepted
    connection (one at a time); exceptions are re-raised by ``close()``."""

    def __init__(self, script, conns=1, listen_sock=None):
        self.sock = listen_sock or socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.script = script
        self.conns = conns
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.sock.settimeout(WAIT)
            for i in range(self.conns):
                conn, _ = self.sock.accept()
                with conn:
                    conn.settimeout(WAIT)
                    self.script(conn, i)
        except BaseException as e:            # noqa: B902 - reported by close()
            self.error = e

    def close(self):
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "upstream thread stuck"
        self.sock.close()
        if self.error is not None:
            raise self.error


def start_proxy(kids, backend, upstream_port, pollers=1):
    return start_example(kids, ["tcp_proxy.py", "127.0.0.1:0", "127.0.0.1:%d" % upstream_port,
                                "--pollers", str(pollers)], backend)


def test_proxy_echo_8mib_both_ways(backend, npollers, kids):
    echo, echo_port = start_example(kids, ["echo.py", "127.0.0.1:0"], backend)
    proxy, port = start_proxy(kids, backend, echo_port, npollers)
    echo_roundtrip(port, random_bytes(8 << 20, seed=npollers))
    # several clients at once (pairs spread over the pollers)
    threads = [threading.Thread(target=echo_roundtrip, args=(port, random_bytes(300000, seed=i)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    line = b"through the proxy\n"
    assert run_tool([need_tool("socat"), "-", "TCP:127.0.0.1:%d" % port], line) == line
    assert_clean_exit(proxy)
    assert_clean_exit(echo)


def test_proxy_relays_half_close(backend, npollers, kids):
    seen = {}

    def script(conn, i):
        if i == 0:
            # client -> upstream EOF: read to EOF, *then* answer and close
            data = recv_all(conn)
            seen[0] = data
            conn.sendall(b"got %d bytes" % len(data))
        else:
            # upstream -> client EOF first: greet, half-close, keep reading
            conn.sendall(b"hello")
            conn.shutdown(socket.SHUT_WR)
            seen[1] = recv_all(conn)

    up = Upstream(script, conns=2)
    proxy, port = start_proxy(kids, backend, up.port, npollers)
    data = random_bytes(300000)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)            # upstream must see EOF, and still answer
        assert recv_all(c) == b"got 300000 bytes"
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
        assert recv_all(c) == b"hello"        # the upstream's FIN reached us ...
        c.sendall(b"bye")                     # ... and our direction still works
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b""             # both directions done: closed
    up.close()
    assert seen == {0: data, 1: b"bye"}
    assert_clean_exit(proxy)


@pytest.mark.parametrize("direction,pollers", [("down", 1), ("up", 1), ("down", 3)])
def test_proxy_backpressure_bounds_memory(backend, kids, direction, pollers):
    """A fast sender on one side, a reader that pauses on the other ("down":
    upstream sends, the client pauses; "up": the reverse).  The proxy must stop
    reading the sender -- its RSS stays flat -- and then deliver every byte."""
    total = 40 << 20
    chunk = random_bytes(1 << 20)
    paused = threading.Event()
    resume = threading.Event()
    got = []

    def slow_read(sock):
        paused.set()
        resume.wait(WAIT)                     # not reading: the proxy must not queue
        got.append(len(recv_all(sock)))

    def fast_send(sock):
        for _ in range(total // len(chunk)):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)

    def upstream_script(conn, i):
        if direction == "down":
            fast_send(conn)
            recv_all(conn)                    # until the client closes
        else:
            slow_read(conn)

    up = Upstream(upstream_script)
    proxy, port = start_proxy(kids, backend, up.port, pollers)   # 3: the pair spans two pollers
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)   # little kernel buffering
    try:
        c.connect(("127.0.0.1", port))
        client = threading.Thread(target=slow_read if direction == "down" else
                                  lambda s: (fast_send(s), recv_all(s)), args=(c,))
        client.start()
        assert paused.wait(WAIT)
        base = peak = rss_kib(proxy.pid)
        # While nobody reads, watch the proxy for a second: without backpressure
        # it would be reading the sender's 40 MiB into its queues meanwhile.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(proxy.pid))
            time.sleep(0.02)
        resume.set()
        while not got and time.monotonic() < deadline + WAIT:
            peak = max(peak, rss_kib(proxy.pid))
            time.sleep(0.01)
        if direction == "down":
            c.shutdown(socket.SHUT_WR)        # lets the upstream script finish
        client.join(WAIT)
    finally:
        resume.set()
        c.close()
    up.close()
    assert got == [total]
    assert peak - base < 12 * 1024, "proxy RSS grew by %d KiB" % (peak - base)
    assert_clean_exit(proxy)


def _syn_sent_to(port):
    """True if some local socket is connecting (SYN_SENT) to 127.0.0.1:port."""
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[3] == "02":
                return True
    return False


def test_proxy_buffers_data_sent_before_upstream_connects(backend, kids):
    """Upstream's accept queue is full (listen(0) + one waiting connection), so
    the proxy's SYN is dropped and its connect stays in progress (until the
    SYN is retransmitted, ~1 s); meanwhile the client sends 1 MiB and its FIN.
    All of it, in order, must reach upstream once the connect completes."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    filler = socket.create_connection(ls.getsockname())     # fills the accept queue
    proxy = c = None
    try:
        upstream_port = ls.getsockname()[1]
        proxy, port = start_proxy(kids, backend, upstream_port)
        data = random_bytes(1 << 20, seed=7)
        c = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        sender = threading.Thread(target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)))
        sender.start()
        wait_until(lambda: _syn_sent_to(upstream_port), what="the proxy's connect to be pending")
        ls.settimeout(WAIT)
        ls.accept()[0].close()                                # the filler's
        filler.close()
        conn, _ = ls.accept()                                 # the proxy's, after the SYN retry
        with conn:
            got = recv_all(conn)
            conn.sendall(b"ok")
        sender.join(WAIT)
        assert got == data
        assert recv_all(c) == b"ok"
    finally:
        filler.close()
        ls.close()
        if c is not None:
            c.close()
    assert_clean_exit(proxy)


def test_proxy_upstream_refused_closes_client(backend, kids):
    proxy, port = start_proxy(kids, backend, free_port())     # nothing listens there
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
        try:
            c.sendall(b"anyone there?")
            assert recv_all(c) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass                                              # closed with our data unread: RST
    _, err = assert_clean_exit(proxy)
    assert "upstream connect failed" in err


def test_proxy_curl_to_http_server(backend, kids, tmp_path):
    blob = random_bytes(3 << 20, seed=3)
    (tmp_path / "blob.bin").write_bytes(blob)
    http_port = free_port()
    server = spawn_py(["-u", "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                       str(tmp_path), str(http_port)])
    kids.append(server)
    wait_port(http_port)
    proxy, port = start_proxy(kids, backend, http_port, 2)
    out = tmp_path / "out.bin"
    run_tool([need_tool("curl"), "-sS", "--fail", "-o", str(out), "http://127.0.0.1:%d/blob.bin" % port])
    assert out.read_bytes() == blob
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request("GET", "/blob.bin")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read() == blob
    finally:
        conn.close()
    assert_clean_exit(proxy)
    finish(server)


def test_proxy_redis_cli(backend, kids, tmp_path):
    redis_cli = need_tool("redis-cli")
    redis_server = need_tool("redis-server")
    rport = free_port()
    redis = subprocess.Popen([redis_server, "--port", str(rport), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kids.append(redis)
    wait_port(rport)
    proxy, port = start_proxy(kids, backend, rport)
    cli = [redis_cli, "-h", "127.0.0.1", "-p", str(port)]
    assert run_tool(cli + ["PING"]).strip() == b"PONG"
    assert run_tool(cli + ["SET", "greeting", "hello"]).strip() == b"OK"
    assert run_tool(cli + ["GET", "greeting"]).strip() == b"hello"
    big = random_bytes(1 << 20, seed=5).hex().encode()[: 1 << 20]   # 1 MiB value through -x (stdin)
    assert run_tool(cli + ["-x", "SET", "big"], big).strip() == b"OK"
    assert run_tool(cli + ["STRLEN", "big"]).strip() == str(len(big)).encode()
    assert run_tool(cli + ["GET", "big"]).rstrip(b"\n") == big
    assert_clean_exit(proxy)
    finish(redis)


def test_proxy_to_goev_examples_curl_http_hello_and_redis_cli_kv(backend, kids):
    """The pairings: curl through tcp_proxy to http_hello, and
    redis-cli through tcp_proxy to kv -- goev on both sides of the proxy."""
    curl, redis_cli = need_tool("curl"), need_tool("redis-cli")
    env = {"GOEV_BACKEND": backend}
    hport, kport = free_port(), free_port()
    for args, port in ((["examples/http_hello.py", "127.0.0.1:%d" % hport], hport),
                       (["examples/kv.py", "127.0.0.1:%d" % kport], kport)):
        kids.append(spawn_py(args, env=env))
        wait_port(port)
    _, hproxy = start_proxy(kids, backend, hport)
    _, kproxy = start_proxy(kids, backend, kport)
    url = "http://127.0.0.1:%d/" % hproxy
    r = subprocess.run([curl, "-s", "--http1.1", url, url], capture_output=True, timeout=WAIT)
    assert r.returncode == 0 and r.stdout == b"Hello, World!" * 2
    cli = [redis_cli, "-h", "127.0.0.1", "-p", str(kproxy)]
    assert run_tool(cli + ["SET", "k", "through the proxy"]).strip() == b"OK"
    assert run_tool(cli + ["GET", "k"]).strip() == b"through the proxy"
    for p in kids:
        assert finish(p)[0] == 0


# -- download.py ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["write", "sendfile"])
def test_download_delivers_the_file(backend, kids, tmp_path, mode):
    blob = random_bytes(3 << 20 | 12345, seed=11)
    path = tmp_path / "file.bin"
    path.write_bytes(blob)
    extra = ["--sendfile"] if mode == "sendfile" else []
    proc, port = start_example(kids, ["download.py", "127.0.0.1:0", str(path)] + extra, backend)
    out = tmp_path / "out.bin"
    run_tool([need_tool("curl"), "-sS", "--fail", "-o", str(out), "http://127.0.0.1:%d/any/path" % port])
    assert out.read_bytes() == blob
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        assert int(resp.getheader("Content-Length")) == len(blob)
        assert resp.read() == blob
        assert resp.will_close                   # Connection: close
        conn.close()
        conn.request("HEAD", "/")
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(blob)
        assert resp.read() == b""
        conn.close()
        conn.request("POST", "/", body=b"x")
        assert conn.getresponse().status == 405
    finally:
        conn.close()
    # the server closes cleanly after the body: FIN, not RST
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        c.shutdown(socket.SHUT_WR)               # half-closed clients still get it all
        raw = recv_all(c)
    assert raw.endswith(blob) and raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert_clean_exit(proc)


@pytest.mark.slow
def test_download_rate_limit_is_applied(backend, kids, tmp_path):
    """200 KB at 100 KB/s cannot take less than ~2 s (asserted: >= 1.5 s), in
    both modes at once; and the bytes are exact."""
    blob = random_bytes(200000, seed=13)
    path = tmp_path / "file.bin"
    path.write_bytes(blob)
    curl = need_tool("curl")
    procs = []
    for extra in ([], ["--sendfile"]):
        procs.append(start_example(kids, ["download.py", "127.0.0.1:0", str(path),
                                          "--rate", "100000"] + extra, backend))
    t0 = time.monotonic()
    clients = [subprocess.Popen([curl, "-sS", "--fail", "-o", str(tmp_path / ("out%d" % i)),
                                 "http://127.0.0.1:%d/" % port])
               for i, (_, port) in enumerate(procs)]
    kids.extend(clients)
    for i, cl in enumerate(clients):
        assert cl.wait(WAIT) == 0
        elapsed = time.monotonic() - t0
        assert elapsed >= 1.5, "download %d took %.2f s: not throttled" % (i, elapsed)
        assert (tmp_path / ("out%d" % i)).read_bytes() == blob
    for proc, _ in procs:
        assert_clean_exit(proc)


@pytest.mark.slow
def test_download_slow_readers_keep_memory_flat(backend, kids, tmp_path):
    """50 MiB to a reader that stops and then reads, with curl --limit-rate 10k
    running at the same time: the server's RSS must not follow the file size."""
    size = 50 << 20
    path = tmp_path / "big.bin"
    block = random_bytes(1 << 20, seed=17)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            digest.update(b)
    proc, port = start_example(kids, ["download.py", "127.0.0.1:0", str(path)], backend)
    # warm up (first request allocates what every request reuses)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    conn.request("HEAD", "/")
    assert conn.getresponse().status == 200
    conn.close()
    base = rss_kib(proc.pid)
    peak = base
    curl_out = tmp_path / "curl.out"
    slow_curl = subprocess.Popen([need_tool("curl"), "-sS", "--limit-rate", "10k", "-o", str(curl_out),
                                  "http://127.0.0.1:%d/" % port], stderr=subprocess.PIPE)
    kids.append(slow_curl)
    c = socket.socket()
    try:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        c.connect(("127.0.0.1", port))
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: curl_out.exists() and curl_out.stat().st_size > 0,
                   what="curl --limit-rate to receive data")
        # Nobody reads for a while: a server that queued the file would grow now.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(proc.pid))
            time.sleep(0.02)
        c.settimeout(WAIT)
        head = b""
        while b"\r\n\r\n" not in head:
            head += c.recv(4096)
        body = head[head.index(b"\r\n\r\n") + 4:]
        h = hashlib.sha256(body)
        n = len(body)
        reads = 0
        while True:
            b = c.recv(1 << 18)
            if not b:
                break
            h.update(b)
            n += len(b)
            reads += 1
            if reads % 16 == 0:
                peak = max(peak, rss_kib(proc.pid))
    finally:
        c.close()
    assert n == size and h.hexdigest() == digest.hexdigest()
    assert slow_curl.poll() is None, "curl --limit-rate finished 50 MiB: not a slow reader?"
    peak = max(peak, rss_kib(proc.pid))
    assert peak - base < 8 * 1024, "server RSS grew by %d KiB" % (peak - base)
    slow_curl.send_signal(signal.SIGTERM)       # our own child, by PID
    slow_curl.communicate(timeout=WAIT)
    assert_clean_exit(proc)


# -- timers.py --------------------------------------------------------------------------

def test_example_timers(backend, kids):
    proc = spawn_py([os.path.join("examples", "timers.py")], env={"GOEV_BACKEND": backend})
    kids.append(proc)
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    lines = out.splitlines()
    assert lines[-1] == "done"
    events = []
    for line in lines[:-1]:
        m = re.match(r"\s*([\d.]+) ms  due\s+(\d+) ms  (.*)$", line)
        assert m, "unexpected line %r" % line
        ran, due, what = float(m.group(1)), int(m.group(2)), m.group(3)
        assert ran >= due, "timer ran early: %r" % line
        events.append(what)
    assert not any("BUG" in e for e in events), out
    order = [e.split(":")[0] for e in events if not e.startswith("from a thread")]
    assert order == ["one-shot", "periodic", "cancel", "periodic", "periodic", "stop"], out
    assert [e for e in events if e.startswith("periodic")] == [
        "periodic: beat %d of 3 (on_timeout)" % i for i in (1, 2, 3)]
    threaded = [e for e in events if e.startswith("from a thread")]
    assert threaded == ["from a thread: call_later posted by 'worker', ran on 'MainThread'"], out
    assert events[-1].startswith("stop: heartbeat beat 3 times")


# -- threads_baseline.py ------------------------------------------------------------------

def test_threads_baseline_echo(kids):
    proc, port = start_example(kids, ["threads_baseline.py", "echo", "127.0.0.1:0"])
    echo_roundtrip(port, random_bytes(1 << 20))
    threads = [threading.Thread(target=echo_roundtrip, args=(port, random_bytes(100000, seed=i)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    line = b"hello threads\n"
    assert run_tool([need_tool("socat"), "-", "TCP:127.0.0.1:%d" % port], line) == line
    assert run_tool(nc_argv(port), line) == line
    assert_clean_exit(proc)


def test_threads_baseline_http(kids):
    proc, port = start_example(kids, ["threads_baseline.py", "http", "127.0.0.1:0"])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        for _ in range(3):                       # keep-alive: one connection
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read() == b"Hello, World!"
            assert not resp.will_close
        first = conn.sock
        conn.request("POST", "/", body=b"x" * 1000)
        assert conn.getresponse().read() == b"Hello, World!"
        assert conn.sock is first
    finally:
        conn.close()
    # pipelining: 20 requests in one send, 20 answers in order, then close
    reqs = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 19 + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
        c.sendall(reqs)
        raw = recv_all(c)
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 20 and raw.endswith(b"Hello, World!")
    out = run_tool([need_tool("curl"), "-sS", "--fail", "http://127.0.0.1:%d/" % port,
                    "http://127.0.0.1:%d/again" % port])
    assert out == b"Hello, World!" * 2
    assert_clean_exit(proc)


# -- every example: a port in use, bad arguments, --help, python3 ----------------------------

_EXAMPLES_DIR = os.path.join(HERE, "examples")       # (absent from a copy of the two files alone)


EXAMPLES = sorted(f for f in os.listdir(_EXAMPLES_DIR) if f.endswith(".py")) if os.path.isdir(_EXAMPLES_DIR) else []


# Every example that listens, with what follows ADDR on its command line
# (threads_baseline takes its mode first: "{}" marks where ADDR goes).
LISTENERS = {
    "echo.py": ["{}"], "http_hello.py": ["{}"], "reuseport.py": ["{}"], "async_http.py": ["{}"],
    "kv.py": ["{}"], "websocket.py": ["{}"], "tcp_proxy.py": ["{}", "127.0.0.1:1"],
    "download.py": ["{}", os.path.join(HERE, "README.md")], "threads_baseline.py": ["echo", "{}"],
    "dns.py": ["{}"],
}


def run_example(kids, args):
    """Run examples/<args[0]> to its end: (returncode, stdout, stderr); it must end
    by itself within WAIT (one that starts serving is killed and fails the test)."""
    proc = spawn_py([os.path.join("examples", args[0])] + list(args[1:]))
    kids.append(proc)
    try:
        out, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail("%s did not exit: %s" % (" ".join(args), err))
    return proc.returncode, out, err


def test_every_listening_example_is_in_the_list():
    """LISTENERS below covers every example that takes an address to listen on."""
    takes_addr = set()
    for name in EXAMPLES:
        with open(os.path.join(HERE, "examples", name)) as f:
            if "goev.Acceptor(" in f.read() or name == "threads_baseline.py":
                takes_addr.add(name)
    assert takes_addr == set(LISTENERS)


@pytest.mark.parametrize("name", sorted(LISTENERS))
def test_example_on_a_port_in_use_says_so_in_one_line_and_exits_2(name, kids):
    """A port some other socket listens on: one line naming the address and the
    error, exit status 2, no traceback."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        addr = "127.0.0.1:%d" % taken.getsockname()[1]
        code, out, err = run_example(kids, [name] + [a.format(addr) for a in LISTENERS[name]])
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert addr in lines[0] and "in use" in lines[0], err


BAD_EXAMPLE_ARGS = [
    (["echo.py", "8080"], "has no port"),
    (["echo.py", "127.0.0.1:x"], "not a number"),
    (["echo.py"], "required: ADDR"),
    (["http_hello.py", "8080"], "has no port"),
    (["http_hello.py", "--pollers", "x", "127.0.0.1:0"], "invalid int value: 'x'"),
    (["http_hello.py", "--pollers", "0", "127.0.0.1:0"], "--pollers must be positive"),
    (["reuseport.py", "8080"], "has no port"),
    (["reuseport.py", "--pollers", "x", "127.0.0.1:0"], "invalid int value: 'x'"),
    (["reuseport.py", "--pollers", "0", "127.0.0.1:0"], "--pollers must be positive"),
    (["async_http.py", "8080"], "has no port"),
    (["async_http.py", "--threads", "0", "127.0.0.1:0"], "must be positive"),
    (["async_http.py", "--backend", "x", "127.0.0.1:0"], "unknown backend 'x'"),
    (["kv.py", "--pollers", "0", "127.0.0.1:0"], "must be positive"),
    (["websocket.py", "--pollers", "0", "127.0.0.1:0"], "must be positive"),
    (["tcp_proxy.py", "--pollers", "0", "127.0.0.1:0", "127.0.0.1:1"], "--pollers must be positive"),
    (["tcp_proxy.py", "127.0.0.1:0", "8080"], "bad UPSTREAM '8080'"),
    (["download.py", "127.0.0.1:0", "/nonexistent/file"], "No such file"),
    (["download.py", "--rate", "x", "127.0.0.1:0", "README.md"], "rate must be a number"),
    (["connect_pool.py", "8080"], "has no port"),
    (["connect_pool.py", "--workers", "0"], "must be positive"),
    (["threads_baseline.py", "echo", "8080"], "expected HOST:PORT"),
    (["threads_baseline.py", "ftp", "127.0.0.1:0"], "invalid choice: 'ftp'"),
    (["timers.py", "now"], "unrecognized arguments: now"),
    (["dns.py", "8080"], "has no port"),
    (["dns.py", "--udp-size", "100", "127.0.0.1:0"], "--udp-size must be 512..65535"),
    (["dns.py", "--zone", "/nonexistent/zone", "127.0.0.1:0"], "No such file"),
    (["dns.py", "--zone", "README.md", "127.0.0.1:0"], "this server knows A, AAAA and TXT"),
]


@pytest.mark.parametrize("args,why", BAD_EXAMPLE_ARGS, ids=[" ".join(a) for a, _ in BAD_EXAMPLE_ARGS])
def test_example_bad_argument_says_why_in_one_line_and_exits_2(args, why, kids):
    """A bad argument ends the example with one line saying what is wrong (after
    argparse's usage lines when argparse found it), exit status 2, no traceback."""
    code, out, err = run_example(kids, args)
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert why in lines[-1], err
    if len(lines) > 1:                      # argparse: the usage, then "PROG: error: ..."
        assert lines[0].startswith("usage: python3 examples/" + args[0]), err
        assert lines[-1].startswith("python3 examples/%s: error: " % args[0]), err
        assert not any(": error: " in line for line in lines[:-1]), err


def _help_entries(text):
    """argparse --help text -> {first word of an entry ("--pollers", "ADDR"): its text}."""
    entries, key = {}, None
    for line in text.splitlines():
        m = re.match(r"  (\S+)", line)
        if m and not line.startswith("   "):
            key = m.group(1).rstrip(",")
            entries[key] = line
        elif key and line.startswith("   "):
            entries[key] += " " + line.strip()
        else:
            key = None
    return entries


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_help_shows_every_default(name, kids):
    """--help exits 0, shows how to run it with python3, and every option (and
    optional positional) that has a default says what it is."""
    code, out, err = run_example(kids, [name, "--help"])
    assert code == 0 and err == "", err
    assert out.startswith("usage: python3 examples/%s " % name), out
    entries = _help_entries(out)
    assert "-h" in entries, out
    optional_positionals = re.findall(r"\[([A-Z_]+)\]", out.split("\n\n")[0])
    checked = [k for k in entries if k.startswith("--") or k in optional_positionals]
    for key in checked:
        assert "default" in entries[key], "%s --help: %s shows no default:\n%s" % (name, key, out)


def test_examples_show_command_lines_with_python3():
    """Command lines in the examples' docstrings, usage and README say python3
    (Debian and others have no "python")."""
    for name in EXAMPLES + ["README.md"]:
        with open(os.path.join(HERE, "examples", name)) as f:
            text = f.read()
        assert not re.search(r"\bpython (?:examples/|-m )", text), name


class Example:
    """examples/NAME.py on a free loopback port, under GOEV_BACKEND=backend."""

    def __init__(self, name, backend, *extra):
        self.port = free_port()
        self.backend = backend
        self.proc = spawn_py([os.path.join("examples", name), "127.0.0.1:%d" % self.port] + list(extra),
                             env={"GOEV_BACKEND": backend})

        def up():
            if self.proc.poll() is not None:
                return True
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_until(up, what="%s to listen" % name)
        assert self.proc.poll() is None, "%s died: %s" % (name, self.proc.stderr.read())

    def connect(self):
        return socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)

    def stop(self):
        """SIGTERM; the example must exit 0, having run on the backend we asked for."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=WAIT)
        finally:
            code = stop_child(self.proc)
        assert code == 0, "exit code %r, stderr:\n%s" % (code, err)
        assert "(%s," % self.backend in err, err
        assert "Traceback" not in err, err

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.stop()
        else:
            stop_child(self.proc)


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def xor_mask(data, key):
    n = len(data)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


def ws_frame(opcode, payload=b"", fin=True, mask=True, rsv=0, length=None):
    """A client frame; ``length`` overrides the declared payload length."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + xor_mask(payload, key)


def upgrade_request(port, key, version=b"13", method=b"GET", connection=b"keep-alive, Upgrade"):
    return (b"%s /chat HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: %s\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: %s\r\n\r\n"
            % (method, port, connection, key, version))


class WSClient:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    @classmethod
    def open(cls, ex, pieces=1, then=b""):
        """Handshake (the request sent in ``pieces`` parts, ``then`` appended to the
        last one, in the same segment) and check the server's proof."""
        c = cls(ex.connect())
        key = base64.b64encode(os.urandom(16))
        req = upgrade_request(ex.port, key)
        step = -(-len(req) // pieces)
        chunks = [req[i:i + step] for i in range(0, len(req), step)]
        chunks[-1] += then
        for i, chunk in enumerate(chunks):
            if i:
                time.sleep(0.02)    # not for correctness: makes separate reads likely
            c.sock.sendall(chunk)
        head = c.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        assert b"\r\nsec-websocket-accept: %s\r\n" % accept.lower() in head.lower(), head
        return c

    def fill(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("server closed the connection")
        self.buf += chunk

    def read_until(self, sep):
        while sep not in self.buf:
            self.fill()
        i = self.buf.index(sep) + len(sep)
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out

    def read_n(self, n):
        while len(self.buf) < n:
            self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def recv_frame(self):
        """-> (fin, opcode, payload); asserts server frames are unmasked, RSV-free
        and use the minimal length encoding."""
        b0, b1 = self.read_n(2)
        assert not b1 & 0x80, "server frames must not be masked"
        assert not b0 & 0x70, "reserved bits set"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.read_n(2))[0]
            assert n >= 126, "non-minimal 16-bit length %d" % n
        elif n == 127:
            n = struct.unpack("!Q", self.read_n(8))[0]
            assert n >= 65536, "non-minimal 64-bit length %d" % n
        return bool(b0 & 0x80), b0 & 0x0F, self.read_n(n)

    def send(self, *frames):
        self.sock.sendall(b"".join(frames))

    def recv_message(self):
        fin, op, payload = self.recv_frame()
        assert fin, "the echo server sends unfragmented messages"
        return op, payload

    def expect_close(self, code):
        """The next frame is a close with ``code``, then the server closes TCP."""
        fin, op, payload = self.recv_frame()
        assert op == OP_CLOSE, (op, payload)
        got = struct.unpack("!H", payload[:2])[0] if payload else None
        assert got == code, "close code %r, expected %r (%r)" % (got, code, payload)
        while True:                          # then EOF: nothing more
            chunk = self.sock.recv(65536)
            assert not chunk, "data after the close frame: %r" % chunk[:100]
            break
        return payload[2:]

    def close(self):
        self.sock.close()


@pytest.fixture
def ws_server(backend, npollers):
    with Example("websocket.py", backend, "--pollers", str(npollers)) as ex:
        yield ex


def test_ws_echo_framing_fragmentation_ping_close(ws_server):
    ex = ws_server
    # The request split over several reads; a frame in the same segment as its end.
    c = WSClient.open(ex, pieces=3, then=ws_frame(OP_TEXT, b"early"))
    assert c.recv_message() == (OP_TEXT, b"early")
    # Text stays text, binary stays binary; lengths on both sides of 125/126
    # and 65535/65536 exercise the 7-, 16- and 64-bit encodings (both ways).
    for op, payload in [(OP_TEXT, "héllo wörld ✓".encode()), (OP_BINARY, b"\x00\xff\x80"),
                        (OP_TEXT, b""), (OP_BINARY, b"b" * 125), (OP_BINARY, b"c" * 126),
                        (OP_TEXT, b"d" * 65535), (OP_BINARY, b"e" * 65536)]:
        c.send(ws_frame(op, payload))
        assert c.recv_message() == (op, payload)
    # Many frames in one segment, each byte of one frame in its own send.
    c.send(*[ws_frame(OP_TEXT, b"m%d" % i) for i in range(20)])
    assert [c.recv_message()[1] for _ in range(20)] == [b"m%d" % i for i in range(20)]
    f = ws_frame(OP_BINARY, b"dribble")
    for i in range(len(f)):
        c.send(f[i:i + 1])
    assert c.recv_message() == (OP_BINARY, b"dribble")
    # Fragmented text with a ping between the fragments (and a UTF-8
    # character split across fragments): pong first, then the whole message.
    word = "naïve".encode()
    c.send(ws_frame(OP_TEXT, word[:3], fin=False), ws_frame(OP_PING, b"ping-data"),
           ws_frame(OP_CONT, word[3:], fin=False), ws_frame(OP_PONG, b"unsolicited"),
           ws_frame(OP_CONT, b" frag", fin=True))
    assert c.recv_frame() == (True, OP_PONG, b"ping-data")
    assert c.recv_message() == (OP_TEXT, word + b" frag")
    # A 1 MiB binary message, byte-exact.
    big = os.urandom(1 << 20)
    c.send(ws_frame(OP_BINARY, big[:300000], fin=False), ws_frame(OP_CONT, big[300000:]))
    assert c.recv_message() == (OP_BINARY, big)
    # Close handshake: the server echoes the code, then closes TCP.
    c.send(ws_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye"))
    c.expect_close(1000)
    c.close()
    # A close without a status code gets one without a code.
    c = WSClient.open(ex)
    c.send(ws_frame(OP_CLOSE, b""))
    fin, op, payload = c.recv_frame()
    assert (op, payload) == (OP_CLOSE, b"")
    assert c.sock.recv(10) == b""
    c.close()


WS_ERRORS = [   # (name, frames, the close code the server must answer with)
    ("unmasked", [ws_frame(OP_TEXT, b"no mask", mask=False)], 1002),
    ("bad-utf8", [ws_frame(OP_TEXT, b"\xff\xfe")], 1007),
    ("surrogate", [ws_frame(OP_TEXT, b"\xed\xa0\x80")], 1007),
    ("bad-utf8-fragment", [ws_frame(OP_TEXT, b"ok", fin=False), ws_frame(OP_CONT, b"\xc0\xaf")], 1007),
    ("rsv1-without-extension", [ws_frame(OP_TEXT, b"x", rsv=0x40)], 1002),
    ("data-opcode-3", [ws_frame(3, b"x")], 1002),
    ("control-opcode-11", [ws_frame(0xB, b"x")], 1002),
    ("fragmented-ping", [ws_frame(OP_PING, b"x", fin=False)], 1002),
    ("ping-over-125", [ws_frame(OP_PING, b"x" * 126)], 1002),
    ("stray-continuation", [ws_frame(OP_CONT, b"x")], 1002),
    ("interrupted-message", [ws_frame(OP_TEXT, b"a", fin=False), ws_frame(OP_TEXT, b"b")], 1002),
    ("declared-17MiB", [ws_frame(OP_BINARY, b"", length=17 << 20)], 1009),
    ("close-1-byte", [ws_frame(OP_CLOSE, b"\x03")], 1002),
    ("close-1005", [ws_frame(OP_CLOSE, struct.pack("!H", 1005))], 1002),
    ("close-bad-reason", [ws_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff")], 1007),
    ("close-4321-echoed", [ws_frame(OP_CLOSE, struct.pack("!H", 4321))], 4321),
]


def test_ws_protocol_errors_close_with_the_right_code(backend):
    with Example("websocket.py", backend) as ex:
        for name, frames, code in WS_ERRORS:
            c = WSClient.open(ex)
            c.send(ws_frame(OP_TEXT, b"before"))           # a good message is still echoed
            assert c.recv_message() == (OP_TEXT, b"before"), name
            c.send(*frames)
            try:
                c.expect_close(code)
            except (AssertionError, EOFError, OSError) as e:
                raise AssertionError("case %s: %s" % (name, e)) from e
            c.close()
        # The server is unharmed: a new connection works.
        c = WSClient.open(ex)
        c.send(ws_frame(OP_TEXT, b"after"))
        assert c.recv_message() == (OP_TEXT, b"after")
        c.close()


def test_ws_non_upgrade_requests(backend):
    with Example("websocket.py", backend) as ex:
        page = http_exchange(ex, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert page.startswith(b"HTTP/1.1 200 ") and b"new WebSocket(" in page, page
        key = base64.b64encode(os.urandom(16))
        r = http_exchange(ex, upgrade_request(ex.port, key, version=b"8"))
        assert r.startswith(b"HTTP/1.1 426 ") and b"Sec-WebSocket-Version: 13" in r, r
        r = http_exchange(ex, upgrade_request(ex.port, b"short"))
        assert r.startswith(b"HTTP/1.1 400 "), r
        r = http_exchange(ex, upgrade_request(ex.port, key, method=b"POST"))
        assert r.startswith(b"HTTP/1.1 405 "), r
        r = http_exchange(ex, b"garbage\r\n\r\n")
        assert r.startswith(b"HTTP/1.1 400 "), r


@pytest.mark.slow
def test_ws_idle_ping_and_size_limit(backend):
    with Example("websocket.py", backend, "--ping-interval", "0.5", "--max-size", "1000") as ex:
        c = WSClient.open(ex)
        # Silent for a period: the server pings; we answer with the same payload.
        fin, op, payload = c.recv_frame()
        assert op == OP_PING and payload, (op, payload)
        c.send(ws_frame(OP_PONG, payload))
        # Silent again and the next ping goes unanswered: close 1011, then EOF.
        fin, op, payload = c.recv_frame()
        assert op == OP_PING
        c.expect_close(1011)
        c.close()
        # --max-size counts the whole reassembled message, not one frame.
        c = WSClient.open(ex)
        c.send(ws_frame(OP_BINARY, b"a" * 1000))
        assert c.recv_message() == (OP_BINARY, b"a" * 1000)
        c.send(ws_frame(OP_BINARY, b"a" * 600, fin=False), ws_frame(OP_CONT, b"b" * 600))
        c.expect_close(1009)
        c.close()


def _python_with_websockets():
    for exe in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if exe and os.path.exists(exe) and subprocess.run(
                [exe, "-c", "import websockets"], capture_output=True).returncode == 0:
            return exe
    return None


def test_ws_real_client_python_websockets(backend):
    exe = _python_with_websockets()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("no Python with the websockets client (.ci/run installs python3-websockets)")
        pytest.skip("no Python with the websockets package (apt-get install python3-websockets)")
    with Example("websocket.py", backend) as ex:
        # The interactive client: reads lines from stdin, prints "< reply".
        p = subprocess.Popen([exe, "-m", "websockets", "ws://127.0.0.1:%d/" % ex.port],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            p.stdin.write("hello goev\nsecond ✓\n".encode())
            p.stdin.flush()
            out = b""
            deadline = time.monotonic() + WAIT
            while b"< second \xe2\x9c\x93" not in out and time.monotonic() < deadline:
                if select.select([p.stdout], [], [], 0.5)[0]:
                    chunk = os.read(p.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    out += chunk
            p.stdin.close()                   # EOF: the client closes (code 1000) and exits
            out += p.stdout.read()
            assert p.wait(WAIT) == 0, out
        finally:
            stop_child(p)
        assert b"< hello goev" in out and b"< second \xe2\x9c\x93" in out, out
        assert b"1000" in out, out


def resp_command(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class RESPClient:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        i = self.buf.index(b"\r\n")
        out = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return out

    def reply(self):
        """One reply: str for +simple, Exception-like ("ERR", msg) for -errors,
        int, bytes or None for bulk, list for arrays."""
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return ("ERR", rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise EOFError("short bulk")
                self.buf += chunk
            out = bytes(self.buf[:n])
            assert self.buf[n:n + 2] == b"\r\n"
            del self.buf[:n + 2]
            return out
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise AssertionError("bad reply line %r" % line)

    def call(self, *args):
        self.sock.sendall(resp_command(*args))
        return self.reply()

    def pipeline(self, *commands):
        """Every command in one send; the replies, in order."""
        self.sock.sendall(b"".join(resp_command(*c) for c in commands))
        return [self.reply() for _ in commands]

    def at_eof(self):
        return not self.buf and self.sock.recv(1) == b""


def is_err(reply, text=""):
    return isinstance(reply, tuple) and reply[0] == "ERR" and text in reply[1]


@pytest.fixture
def kv_server(backend, npollers):
    with Example("kv.py", backend, "--pollers", str(npollers)) as ex:
        yield ex


def test_kv_commands_pipelined_and_split(kv_server):
    ex = kv_server
    with ex.connect() as s1, ex.connect() as s2:   # with 3 pollers: on different threads
        a, b = RESPClient(s1), RESPClient(s2)
        got = a.pipeline(("PING",), ("PING", "hi"), ("ECHO", "x y"), ("SET", "k", "v"), ("GET", "k"),
                         ("GET", "nope"), ("SET", "k", "w", "NX"), ("SET", "new", "1", "XX"),
                         ("SET", "k", "w", "XX"), ("get", "k"), ("INCR", "n"), ("INCR", "n"),
                         ("INCR", "k"), ("EXISTS", "k", "n", "zz", "k"), ("DBSIZE",),
                         ("DEL", "k", "zz"), ("DBSIZE",), ("TTL", "n"), ("TTL", "zz"),
                         ("FOO", "bar"), ("GET",), ("SET", "a", "b", "EX", "0"),
                         ("SET", "a", "b", "EX", "x"), ("SET", "a", "b", "BOGUS"), ("COMMAND",))
        assert got[:13] == ["PONG", b"hi", b"x y", "OK", b"v", None, None, None, "OK", b"w", 1, 2,
                            ("ERR", "ERR value is not an integer or out of range")]
        assert got[13:19] == [3, 2, 1, 1, -1, -2]
        assert is_err(got[19], "ERR unknown command 'FOO'")
        assert got[20] == ("ERR", "ERR wrong number of arguments for 'get' command")
        assert is_err(got[21], "invalid expire time") and is_err(got[22], "not an integer")
        assert is_err(got[23], "syntax error") and got[24] == []
        # The other connection sees the same data (it lives on one poller).
        assert b.call("GET", "n") == b"2"
        # A command dribbled one byte per send, and 500 pipelined SETs + GETs.
        for byte in resp_command("SET", "dribble", "ok"):
            s2.sendall(bytes([byte]))
        assert b.reply() == "OK"
        cmds = [("SET", "key%d" % i, "val%d" % i) for i in range(500)]
        cmds += [("GET", "key%d" % i) for i in range(500)]
        assert b.pipeline(*cmds) == ["OK"] * 500 + [b"val%d" % i for i in range(500)]
        # Inline commands, as typed into telnet, mixed with RESP in one segment.
        s1.sendall(b"PING\r\nSET inline  yes\nGET inline\r\n" + resp_command("DBSIZE"))
        assert [a.reply() for _ in range(4)] == ["PONG", "OK", b"yes", 503]
        # A binary-safe value with CRLFs inside, 1 MiB long.
        blob = os.urandom(1 << 20) + b"\r\n$3\r\n"
        assert a.call("SET", "blob", blob) == "OK" and b.call("GET", "blob") == blob
        info = a.call("INFO")
        assert b"redis_version:" in info and b"db0:keys=504" in info
        assert a.pipeline(("FLUSHALL",), ("DBSIZE",)) == ["OK", 0]
        # QUIT answers +OK, ignores what follows and closes.
        s2.sendall(resp_command("PING") + resp_command("QUIT") + resp_command("SET", "after", "quit"))
        assert [b.reply(), b.reply()] == ["PONG", "OK"]
        assert b.at_eof()
        assert a.call("EXISTS", "after") == 0


@pytest.mark.slow
def test_kv_expiry_on_the_timer_heap(kv_server):
    ex = kv_server
    with ex.connect() as s:
        c = RESPClient(s)
        assert c.pipeline(("SET", "short", "1", "PX", "300"), ("SET", "ex", "2", "EX", "100"),
                          ("SET", "kept", "3", "EX", "1"), ("SET", "kept", "4"),
                          ("SET", "inc", "5", "EX", "100"), ("INCR", "inc"),
                          ("SET", "probe", "6", "EX", "1"), ("EXPIRE", "missing", "5")) == \
            ["OK", "OK", "OK", "OK", "OK", 6, "OK", 0]
        assert c.call("TTL", "ex") in (99, 100)
        assert c.call("TTL", "kept") == -1                # a plain SET drops the old expiry
        assert c.call("TTL", "inc") in (99, 100)          # INCR keeps it
        # Wait (on a generous condition, not a fixed sleep) for the keys to go.
        wait_until(lambda: c.call("GET", "short") is None, what="PX 300 to expire")
        wait_until(lambda: c.call("EXISTS", "probe") == 0, what="EX 1 to expire")
        assert c.call("TTL", "short") == -2
        # "kept" had its 1 s timer cancelled: it outlives "probe", set after it.
        assert c.call("GET", "kept") == b"4"
        # EXPIRE on a live key; a non-positive one deletes at once.
        assert c.pipeline(("EXPIRE", "kept", "1"), ("EXPIRE", "ex", "0"), ("EXISTS", "ex")) == [1, 1, 0]
        # DBSIZE falls as the timer heap removes keys, without any reads of them.
        wait_until(lambda: c.call("DBSIZE") == 1, what="the timer to remove 'kept'")
        assert c.call("GET", "inc") == b"6"


KV_PROTOCOL_ERRORS = [   # (request, what the error must say)
    (b"*1\r\n$x\r\n", "invalid bulk length"),
    (b"*1\r\n:5\r\n", "expected '$'"),
    (b"*abc\r\n", "invalid multibulk length"),
    (b"*1\r\n$%d\r\n" % (17 << 20), "invalid bulk length"),          # over the 16 MiB limit
    (b"*1\r\n$3\r\nabcXY", "CRLF"),
    (b"x" * (70 * 1024), "too big inline request"),
]


def test_kv_protocol_errors_answer_then_close(backend):
    with Example("kv.py", backend) as ex:
        for request, what in KV_PROTOCOL_ERRORS:
            with ex.connect() as s:
                c = RESPClient(s)
                # The good command in the same segment is answered first, in order.
                s.sendall(resp_command("SET", "a", request[:20]) + request)
                assert c.reply() == "OK", request[:20]
                r = c.reply()
                assert is_err(r, "Protocol error") and what in r[1], (request[:20], r)
                assert c.at_eof(), request[:20]
        with ex.connect() as s:
            assert RESPClient(s).call("GET", "a") == b"x" * 20


def test_kv_redis_cli(backend):
    cli = need_tool("redis-cli")
    with Example("kv.py", backend) as ex:
        def run(*args):
            r = subprocess.run([cli, "-p", str(ex.port)] + list(args), capture_output=True, text=True,
                               timeout=WAIT)
            assert r.returncode == 0, r
            return r.stdout.strip()
        assert run("PING") == "PONG"
        assert run("SET", "greeting", "hello", "EX", "60") == "OK"
        assert run("GET", "greeting") == "hello"
        assert run("TTL", "greeting") in ("59", "60")
        assert run("INCR", "counter") == "1"
        assert run("FOO").startswith("ERR unknown command 'FOO'")
        # Interactive mode, on a pseudo-terminal: redis-cli asks for COMMAND
        # DOCS at start-up, then shows a prompt and the replies.
        master, slave = pty.openpty()
        p = subprocess.Popen([cli, "-p", str(ex.port)], stdin=slave, stdout=slave, stderr=slave,
                             env=dict(os.environ, TERM="dumb"), close_fds=True)
        os.close(slave)
        out = bytearray()

        def expect(text):
            deadline = time.monotonic() + WAIT
            while text not in out:
                assert time.monotonic() < deadline, "no %r in %r" % (text, bytes(out))
                if select.select([master], [], [], 0.5)[0]:
                    try:
                        out.extend(os.read(master, 4096))
                    except OSError:         # EIO: the child closed the terminal
                        break
                    if b"\x1b[6n" in out:   # a cursor-position query: answer it
                        del out[:out.index(b"\x1b[6n") + 4]
                        os.write(master, b"\x1b[1;1R")
            assert text in out, "no %r in %r" % (text, bytes(out))
            del out[:out.index(text) + len(text)]
        try:
            expect(b"127.0.0.1:%d> " % ex.port)
            os.write(master, b"incr counter\r")
            expect(b"(integer) 2")
            os.write(master, b"get greeting\r")
            expect(b'"hello"')
            os.write(master, b"quit\r")
            assert p.wait(WAIT) == 0
        finally:
            os.close(master)
            stop_child(p)


def test_kv_redis_benchmark(backend, npollers):
    bench = need_tool("redis-benchmark")
    with Example("kv.py", backend, "--pollers", str(npollers)) as ex:
        r = subprocess.run([bench, "-p", str(ex.port), "-t", "set,get", "-P", "16", "-n", "20000", "-q"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r
        out = r.stdout.replace("\r", "\n")
        assert "SET: " in out and "GET: " in out and "requests per second" in out, out
        assert "WARNING" not in r.stdout + r.stderr, r.stderr   # CONFIG GET answered well enough
        with ex.connect() as s:
            assert len(RESPClient(s).call("GET", "key:__rand_int__")) == 3   # -d 3 (default)


MiB = 1 << 20


def reset_peak_rss(pid):
    """Make VmHWM start again from the current VmRSS (Linux >= 4.0; our own child).
    Where that is refused the peak keeps counting from the start: a stricter test."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
    except OSError:
        pass


def exchange_to_eof(ex, data):
    """Send ``data`` and FIN on a new connection; everything the server sends
    until it closes (a reset counts as a close)."""
    with ex.connect() as s:
        got = bytearray()
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        return bytes(got)


def mutations(rng, samples, count):
    """``count`` malformed variants of the ``samples``: bytes flipped, cut,
    repeated or replaced by digits and separators a parser trips over."""
    nasty = [b"\r\n", b"\n", b"\r", b"\x00", b"\xff", b"-1", b"0", b"99999999999999999999999",
             b"1" * 5000, b"*", b"$", b":", b" ", b"\t", b"\x80\x81", b"%s", b"\xed\xa0\x80"]
    out = []
    for _ in range(count):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 4)):
            if not data:
                data += rng.choice(nasty)
                continue
            i = rng.randrange(len(data))
            op = rng.randrange(5)
            if op == 0:
                data[i] = rng.randrange(256)
            elif op == 1:
                del data[i:]
            elif op == 2:
                data[i:i] = rng.choice(nasty)
            elif op == 3:
                j = rng.randrange(i, len(data) + 1)
                data[i:i] = data[i:j]
            else:
                data[i:i + rng.randint(1, 8)] = rng.choice(nasty)
        out.append(bytes(data))
    return out


# -- kv.py --------------------------------------------------------------------

def test_kv_pipelined_gets_of_a_big_value_keep_memory_bounded(backend, npollers):
    """Item 14: 200 pipelined ``GET big`` (4.4 KB asked, 200 MB to answer) from a
    client that does not read.  The replies must wait for the client, not pile
    up in the server: its memory stays within the water marks and one batch.
    With 3 pollers, three connections (consecutive fds) land on three pollers,
    so two of them go through poller 0 and back."""
    value = os.urandom(MiB)
    n = 200
    with Example("kv.py", backend, "--pollers", str(npollers)) as ex:
        socks = [ex.connect() for _ in range(npollers)]
        try:
            clients = [RESPClient(s) for s in socks]
            assert clients[0].call("SET", "big", value) == "OK"
            for c in clients:
                assert c.call("PING") == "PONG"
            pid = ex.proc.pid
            reset_peak_rss(pid)
            base = proc_status(pid, "VmRSS")
            for c in clients:
                c.sock.sendall(resp_command("GET", "big") * n)
                # Not reading yet: the server has begun answering once bytes
                # arrive here (an unbounded server has built every reply by then).
                wait_until(lambda: _inq(c.sock.fileno()) > 0, what="the first reply")
                stalled = proc_status(pid, "VmRSS") - base
                assert stalled < 100 * MiB, "server RSS grew %d MiB while the client did not read" % (
                    stalled >> 20)
                for i in range(n):
                    got = c.reply()
                    assert got == value, "reply %d: %r" % (i, got[:40] if got else got)
                assert c.call("PING") == "PONG"
            peak = proc_status(pid, "VmHWM") - base
        finally:
            for s in socks:
                s.close()
    assert peak < 100 * MiB, "server peak RSS grew %d MiB for 200 pipelined GETs of 1 MiB" % (peak >> 20)


def test_kv_commands_split_across_many_reads(backend):
    """Item 15: a parser that keeps a command's finished arguments between reads
    must still get every split right: inside "\\r\\n", inside length lines,
    inside payloads, one byte at a time."""
    rng = random.Random(15)
    with Example("kv.py", backend) as ex, ex.connect() as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = RESPClient(s)
        keys = [b"key:%d" % i for i in range(200)]
        values = [rng.randbytes(rng.choice([0, 1, 2, 100, 5000, 70000])) + b"\r\n$3\r\n*1\r\n"
                  for _ in keys]
        # 200 SETs, pipelined, cut at random points.
        wire = b"".join(resp_command("SET", k, v) for k, v in zip(keys, values))
        i = 0
        while i < len(wire):
            step = rng.randint(1, 3000)
            s.sendall(wire[i:i + step])
            i += step
        assert [c.reply() for _ in keys] == ["OK"] * len(keys)
        # One command of 101 arguments, sent in pieces of 1 to 7 bytes.
        wire = resp_command("DEL", *keys[:100], b"missing")
        i = 0
        while i < len(wire):
            step = rng.randint(1, 7)
            s.sendall(wire[i:i + step])
            i += step
        assert c.reply() == 100
        # A 3 MiB argument in 1000-byte pieces, then read back whole.
        big = rng.randbytes(3 * MiB)
        wire = resp_command("SET", "big", big)
        for i in range(0, len(wire), 1000):
            s.sendall(wire[i:i + 1000])
        assert c.reply() == "OK"
        got = c.pipeline(*[("GET", k) for k in keys[100:]], ("GET", "big"), ("EXISTS", keys[0]))
        assert got == values[100:] + [big, 0]
        # An inline command one byte per send, then a RESP one in the same segment as its end.
        for byte in b"SET inline yes\r":
            s.sendall(bytes([byte]))
        s.sendall(b"\n" + resp_command("GET", "inline"))
        assert [c.reply(), c.reply()] == ["OK", b"yes"]


def _load_kv():
    """examples/kv.py as a fresh module (its goev import finds the one loaded)."""
    spec = importlib.util.spec_from_file_location("_kv_under_test", os.path.join(HERE, "examples", "kv.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _NoLoop:
    """The reactor and poller an offline kv Client sees: registration is a no-op."""

    def add_handler(self, *args, **kw):
        pass

    def append_event(self, *args):
        pass

    def remove_event(self, *args):
        pass

    def call_later(self, *args):
        raise AssertionError("one poller: nothing should cross threads")


def _kv_offline(mod, chunks):
    """Feed ``chunks`` to a kv Client, one read each, without sockets or threads
    (one poller: the data's).  Returns everything it wrote."""
    loop = _NoLoop()
    mod.Client.db = mod.Store(loop)

    class Offline(mod.Client):
        def read(self):
            return self.inbox.pop(0) if self.inbox else None

        def write(self, data):
            self.outbox.append(bytes(data))

        def close(self):
            self.outbox.append(b"<close>")

    h = Offline()
    h.inbox, h.outbox = [], []
    h.reactor = h.poller = loop
    assert h.on_open()
    for chunk in chunks:
        h.inbox.append(chunk)
        assert h.on_read() is not False
    return b"".join(h.outbox)


def test_kv_parser_work_is_linear_in_the_input():
    """Item 15: one DEL with n arguments of 4 KiB arriving in 4 KiB reads.  A
    parser that re-parses from the start of the command copies every finished
    argument again at every read: n^2/2 argument copies.  Work is counted, not
    timed: every slice taken from the connection's input buffers (the module's
    ``bytearray``, swapped for a counting one) -- the copies that grow with a
    re-parse."""
    work = {}
    for n in (200, 400):
        mod = _load_kv()

        class Counting(bytearray):
            copied = 0

            def __getitem__(self, index):
                item = bytearray.__getitem__(self, index)
                if isinstance(index, slice):
                    Counting.copied += len(item)
                return item
        mod.bytearray = Counting             # the buffers kv.py makes are these now
        args = [b"%06d" % i + b"x" * 4090 for i in range(n)]
        wire = resp_command("SET", args[7], "v") + resp_command("DEL", *args, "missing")
        out = _kv_offline(mod, [wire[i:i + 4096] for i in range(0, len(wire), 4096)])
        assert out == b"+OK\r\n:1\r\n", out[:100]
        work[n] = Counting.copied
        assert Counting.copied <= 3 * len(wire), (
            "%d bytes copied out of the input buffer for %d bytes of input" % (Counting.copied, len(wire)))
    assert work[400] < 2.5 * work[200], "twice the input cost %.1fx the work" % (work[400] / work[200])


def test_kv_query_buffer_limit_gives_protocol_error_and_close(backend):
    """Item 15: --max-query-bytes caps the memory of one command (each argument
    counted as its length plus a fixed overhead).  A length line that would pass
    it is refused at once -- before its bytes are sent, let alone buffered."""
    with Example("kv.py", backend, "--max-query-bytes", "100000") as ex:
        with ex.connect() as s:
            assert RESPClient(s).call("SET", "small", b"v" * 50000) == "OK"     # under the cap
        for name, request in [
                ("big argument", b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$150000\r\n"),  # its payload never sent
                ("many arguments", resp_command("DEL", *[b"k"] * 3000))]:       # 3000 * (1 + overhead)
            with ex.connect() as s:
                c = RESPClient(s)
                s.sendall(resp_command("PING") + request)
                assert c.reply() == "PONG", name          # what came before is answered first
                r = c.reply()
                assert is_err(r, "Protocol error") and "query buffer limit" in r[1], (name, r)
                assert c.at_eof(), name
        with ex.connect() as s:
            assert RESPClient(s).call("GET", "small") == b"v" * 50000


def test_kv_default_query_buffer_limit_is_64_mib(backend):
    """Item 15: without the option a command may hold 64 MiB: four 15 MiB
    arguments are taken, the length line of a fifth is refused."""
    arg = b"a" * (15 * MiB)
    with Example("kv.py", backend) as ex, ex.connect() as s:
        c = RESPClient(s)
        s.sendall(b"*6\r\n$3\r\nDEL\r\n")
        for _ in range(4):
            s.sendall(b"$%d\r\n" % len(arg))
            s.sendall(arg)
            s.sendall(b"\r\n")
        s.sendall(b"$%d\r\n" % len(arg))
        r = c.reply()
        assert is_err(r, "Protocol error") and "query buffer limit" in r[1], r
        assert c.at_eof()


KV_NASTY = [
    b"*-1\r\n", b"*0\r\n", b"*1\r\n$-1\r\n", b"*1\r\n$0\r\n\r\n", b"$5\r\n", b"\r\n\r\n\r\n",
    b"\x00\xff\xfe\n", b"*2\r\n$3\r\nGET\r\n$99999999999999999999\r\n", b"*99999999999999999999\r\n",
    b"*1\r\n$1\r\n", b"*1\r\n$1\r\nx", b"*3\r\n$3\r\nSET\r\n", b"*1\r\n" + b"$" * 70000,
    resp_command(b"\xff\xfe", b"\xed\xa0\x80"), resp_command("SET", "k", "v", "EX", "9223372036854775807"),
    resp_command("SET", "k", "v", "PX", "9223372036854775807"), resp_command("SET", "k", "v", "EX"),
    resp_command("SET", "k", "v", "PX", "-1"), resp_command("SET", "k", "v", "NX", "XX"),
    resp_command("EXPIRE", "k", "99999999999999999999"), resp_command("EXPIRE", "k", "9223372036854775807"),
    resp_command("INCR", "k"), resp_command("CONFIG"), resp_command("CONFIG", "SET", "a", "b"),
    resp_command("CONFIG", "GET"), resp_command("TTL"), resp_command("ECHO"), resp_command("PING", "a", "b"),
    resp_command("QUIT", "x") + resp_command("PING"), resp_command("DEL"), resp_command("COMMAND", "DOCS"),
]


def test_kv_malformed_input_never_prints_a_traceback(backend):
    """No input -- listed nasties, then 300 seeded mutations of real commands --
    makes kv print a traceback (Example.stop checks stderr); each connection
    ends with the server's close, and the server keeps serving."""
    rng = random.Random(1415)
    samples = [resp_command(*c) for c in [("SET", "k", "12"), ("GET", "k"), ("INCR", "k"),
                                          ("SET", "k", "v", "EX", "10", "NX"), ("EXPIRE", "k", "5"),
                                          ("DEL", "k", "j"), ("CONFIG", "GET", "save"), ("PING", "x")]]
    samples += [b"SET k 12\r\n", b"PING\r\n", b"GET k\n"]
    with Example("kv.py", backend) as ex:
        for data in KV_NASTY + mutations(rng, samples, 300):
            exchange_to_eof(ex, data)
        with ex.connect() as s:
            c = RESPClient(s)
            assert c.call("SET", "after", "fuzz") == "OK" and c.call("GET", "after") == b"fuzz"


# -- websocket.py -------------------------------------------------------------

def test_ws_empty_continuation_frames_are_capped(backend):
    """Item 16: a message of empty continuation frames has no size, so --max-size
    never stops it; the frame count does (default 65536 per message): close 1009."""
    with Example("websocket.py", backend) as ex:
        with contextlib.closing(WSClient.open(ex)) as c:
            empty = ws_frame(OP_CONT, b"", fin=False)
            c.send(ws_frame(OP_BINARY, b"x", fin=False), empty * 65535, ws_frame(OP_PING, b"at the limit"))
            assert c.recv_frame() == (True, OP_PONG, b"at the limit")      # 65536 frames: still open
            c.send(empty)
            c.expect_close(1009)
        with contextlib.closing(WSClient.open(ex)) as c:                  # the server is fine
            c.send(ws_frame(OP_TEXT, b"after"))
            assert c.recv_message() == (OP_TEXT, b"after")


def test_ws_max_fragments_option(backend):
    """Item 16: --max-fragments N allows N frames in a message, not N + 1."""
    with Example("websocket.py", backend, "--max-fragments", "100", "--max-size", "1000") as ex, \
            contextlib.closing(WSClient.open(ex)) as c:
        c.send(ws_frame(OP_TEXT, b"a", fin=False), *[ws_frame(OP_CONT, b"b", fin=False)] * 98,
               ws_frame(OP_CONT, b"c"))
        assert c.recv_message() == (OP_TEXT, b"a" + b"b" * 98 + b"c")
        c.send(ws_frame(OP_BINARY, b"", fin=False), *[ws_frame(OP_CONT, b"", fin=False)] * 100)
        c.expect_close(1009)


def test_ws_one_byte_fragments_cost_their_bytes_not_an_object_each(backend):
    """Item 16: 500000 one-byte fragments (3.5 MB on the wire, a 0.5 MB message)
    must cost about the message, not a Python object per fragment (~120 bytes
    each: 60 MB)."""
    n = 500000
    body = os.urandom(n)
    frames = bytearray(b"\x00\x81\x00\x00\x00\x00\x00" * n)   # CONT, masked (key 0), 1 byte
    frames[6::7] = body
    frames[0] = OP_BINARY                                     # the first frame starts the message
    frames[7 * (n - 1)] = 0x80 | OP_CONT                      # the last one ends it
    with Example("websocket.py", backend, "--max-fragments", str(n), "--max-size", str(n)) as ex, \
            contextlib.closing(WSClient.open(ex)) as c:
        pid = ex.proc.pid
        reset_peak_rss(pid)
        base = proc_status(pid, "VmRSS")
        c.send(bytes(frames))
        assert c.recv_message() == (OP_BINARY, body)
        peak = proc_status(pid, "VmHWM") - base
    assert peak < 20 * MiB, "a 0.5 MB message in 1-byte fragments cost %d MiB" % (peak >> 20)


@pytest.mark.slow
def test_ws_handshake_deadline_counts_from_the_accept(backend):
    """Item 17: a client dripping its upgrade request a byte every 0.1 s is never
    idle for a ping period (0.5 s), but the handshake must be done 1 s after the
    accept: the server closes while the client is still sending.  A client that
    finished in time is not bound by it: it outlives the deadline, idle pings
    and all."""
    with Example("websocket.py", backend, "--handshake-timeout", "1", "--ping-interval", "0.5") as ex:
        with contextlib.closing(WSClient.open(ex)) as c:
            for _ in range(2):                      # the second ping comes ~2 s after the accept
                fin, op, payload = c.recv_frame()
                assert op == OP_PING, (op, payload)
                c.send(ws_frame(OP_PONG, payload))
            c.send(ws_frame(OP_TEXT, b"still here"))
            assert c.recv_message() == (OP_TEXT, b"still here")
        request = upgrade_request(ex.port, base64.b64encode(os.urandom(16)))   # ~170 bytes: 17 s
        with ex.connect() as s:
            sent, answer = 0, None
            deadline = time.monotonic() + WAIT
            while sent < len(request) and answer is None:
                assert time.monotonic() < deadline, "the dripping client was never cut off"
                try:
                    s.sendall(request[sent:sent + 1])
                    sent += 1
                    if select.select([s], [], [], 0.1)[0]:
                        answer = s.recv(4096)       # the 408, or EOF
                except (ConnectionResetError, BrokenPipeError):
                    answer = b""
            assert answer is not None and sent < len(request), (
                "the server waited for the whole request (%d bytes): %r" % (sent, answer))
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer


def test_ws_malformed_input_never_prints_a_traceback(backend):
    """No handshake and no frames -- listed nasties, then seeded mutations --
    make the server print a traceback (Example.stop checks stderr)."""
    rng = random.Random(1617)
    key = base64.b64encode(os.urandom(16))
    hello = upgrade_request(0, key)
    nasty = [b"GET / HTTP/1.1\r\n\r\n", b"\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/2\r\n\r\n",
             b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Key: \xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9"
             b"\xe9\xe9==\r\n\r\n",
             hello.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: \xff"),
             hello.replace(b"\r\n", b"\n"), b"X" * 20000, b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 4000]
    frames = [ws_frame(OP_TEXT, b"hi"), ws_frame(OP_BINARY, b"\x00" * 200),
              ws_frame(OP_TEXT, b"a", fin=False) + ws_frame(OP_CONT, b"b"),
              ws_frame(8, struct.pack("!H", 1000) + b"bye"), ws_frame(OP_PING, b"p"), ws_frame(OP_PONG, b""),
              ws_frame(OP_BINARY, b"", length=1 << 63), ws_frame(OP_BINARY, b"", length=(1 << 63) - 1),
              ws_frame(OP_TEXT, b"x" * 70000), ws_frame(8, b"\x03\xe8\xff"), ws_frame(8, b"\x00")]
    with Example("websocket.py", backend) as ex:
        for data in nasty:
            exchange_to_eof(ex, data)
        for data in mutations(rng, [hello], 80) + [hello + m for m in mutations(rng, frames, 200)]:
            exchange_to_eof(ex, data)
        with contextlib.closing(WSClient.open(ex)) as c:
            c.send(ws_frame(OP_TEXT, b"after"))
            assert c.recv_message() == (OP_TEXT, b"after")


# -- async_http.py ------------------------------------------------------------

def test_async_http_content_length_of_many_digits_is_400(backend):
    """Item 18: a Content-Length of thousands of digits must not reach int()
    (Python's limit on int-from-string digits raises, a traceback per request):
    more than 18 digits is a 400; 18 digits is a number, just too big (413)."""
    with Example("async_http.py", backend) as ex:
        for clen, status in [(b"1" * 5000, 400), (b"0" * 4400 + b"5", 400), (b"9" * 19, 400),
                             (b"1" * 18, 413)]:
            with ex.connect() as s:
                s.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: " + clen + b"\r\n\r\n")
                f = s.makefile("rb")
                assert read_response(f)[::2] == (200, b"/a")
                got, headers, _ = read_response(f)
                assert (got, headers.get("connection")) == (status, "close"), (clen[:20], got)
                assert f.read() == b""
                f.close()


    # Example.stop: exit 0, and no "Traceback" on the server's stderr


def test_async_http_malformed_input_never_prints_a_traceback(backend):
    """No request -- listed nasties, then seeded mutations of real ones -- makes
    the server print a traceback (Example.stop checks stderr)."""
    rng = random.Random(18)
    samples = [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
               b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
               b"HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
               b"GET /b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"]
    nasty = [b"GET /\xff\xfe HTTP/1.1\r\nHost: \x80\r\n\r\n", b"\r\n" * 5000, b"GET / HTTP/1.1\r\n\r\n",
             b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
             b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
             b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n",
             b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \xd9\xa3\r\n\r\n",      # an Arabic-Indic 3
             b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"7" * 5000 + b"\r\n\r\n",
             b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
             b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n"]
    with Example("async_http.py", backend) as ex:
        for data in nasty + mutations(rng, samples, 300):
            exchange_to_eof(ex, data)
        with ex.connect() as s:
            s.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
            f = s.makefile("rb")
            assert read_response(f)[::2] == (200, b"/after")
            f.close()


def dns_name(name):
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"


def dns_query(name, qtype=1, qid=0x1234, edns=None, version=0):
    """A query for ``name``; ``edns``: the payload size of an OPT record to add."""
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0) + dns_name(name) + struct.pack("!HH", qtype, 1)
    if edns:
        q += b"\0" + struct.pack("!HHIH", 41, edns, version << 16, 0)
    return q


def dns_exchange(port, packet, timeout=WAIT):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, ("127.0.0.1", port))
        return s.recv(65535)


def dig(port, *args):
    return run_tool([need_tool("dig"), "@127.0.0.1", "-p", str(port), "+tries=1", "+time=%d" % WAIT]
                    + list(args)).decode()


def test_dns_example_answers_dig(backend):
    """dig's A, AAAA and TXT questions get the built-in zone's records; an
    unknown name is NXDOMAIN; over 512 bytes without EDNS the answer is
    truncated (TC) and dig gets it over TCP; with EDNS the server offers its
    payload size and answers in full over UDP."""
    with Example("dns.py", backend) as ex:
        assert dig(ex.port, "goev.test", "A", "+short") == "127.0.0.1\n"
        assert dig(ex.port, "GOEV.test", "AAAA", "+short") == "::1\n"
        assert dig(ex.port, "goev.test", "TXT", "+short") == '"goev.py: a reactor in one file"\n'
        out = dig(ex.port, "nothing.goev.test", "A")
        assert "status: NXDOMAIN" in out and "flags: qr aa rd;" in out, out
        out = dig(ex.port, "big.goev.test", "TXT", "+noedns", "+ignore")
        assert "flags: qr aa tc rd;" in out and "ANSWER: 0" in out, out
        out = dig(ex.port, "big.goev.test", "TXT", "+noedns")
        assert "Truncated, retrying in TCP mode" in out and "ANSWER: 10," in out, out
        out = dig(ex.port, "big.goev.test", "TXT")
        assert "udp: 1232" in out and "ANSWER: 10," in out and "Truncated" not in out, out


def test_dns_example_wire_format_details(backend):
    """Answers point at the question's name (compression), the question comes
    back as sent, EDNS version 1 gets BADVERS, and a name without records of the
    asked type is an empty NOERROR."""
    with Example("dns.py", backend) as ex:
        reply = dns_exchange(ex.port, dns_query("GoEv.TEST", 1, qid=7))
        qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", reply[:12])
        assert (qid, flags & 0x8F, qd, an, ns, ar) == (7, 0, 1, 1, 0, 0)
        assert flags & 0x8400 == 0x8400                       # QR, AA
        question = dns_name("GoEv.TEST") + struct.pack("!HH", 1, 1)
        assert reply[12:12 + len(question)] == question
        assert reply[12 + len(question):] == b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([127, 0, 0, 1])
        reply = dns_exchange(ex.port, dns_query("goev.test", 1, edns=4096, version=1))
        assert reply[3] & 0xF == 0 and reply[-10:-8] == b"\x00\x29" and reply[-6] == 1   # OPT, BADVERS (16 >> 4)
        reply = dns_exchange(ex.port, dns_query("goev.test", 15))                 # MX: none
        assert reply[3] & 0xF == 0 and struct.unpack("!H", reply[6:8])[0] == 0


MALFORMED_DNS = {
    "compression loop": struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c" + b"\0\1\0\1",
    "pointer forwards": struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x20" + b"\0\1\0\1" + bytes(30),
    "reserved label type": struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x44goev\0\0\1\0\1",
    "no question": struct.pack("!HHHHHH", 1, 0, 0, 0, 0, 0),
    "two questions": struct.pack("!HHHHHH", 1, 0, 2, 0, 0, 0) + (dns_name("goev.test") + b"\0\1\0\1") * 2,
    "name over 255 bytes": struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 4 + b"\0\0\1\0\1",
    "question cut short": struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + dns_name("goev.test") + b"\0",
    "label past the end": struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x20goev",
    "additional record cut": dns_query("goev.test") [:-3],
}


def test_dns_example_malformed_queries_get_formerr_and_short_packets_are_dropped(backend):
    """Each malformed query gets FORMERR with its ID; a packet shorter than the
    header (no ID to answer) and a response are dropped, which the next real
    query's answer shows (it is the first thing that comes back); the server
    prints no traceback (checked at its exit)."""
    with Example("dns.py", backend) as ex:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(WAIT)
            for i, (what, packet) in enumerate(sorted(MALFORMED_DNS.items())):
                packet = struct.pack("!H", 100 + i) + packet[2:]
                s.sendto(packet, ("127.0.0.1", ex.port))
                reply = s.recv(65535)
                assert reply[:2] == struct.pack("!H", 100 + i), what
                assert reply[2] & 0x80 and reply[3] & 0xF == 1, (what, reply)       # QR, FORMERR
            s.sendto(b"\x12\x34\x01", ("127.0.0.1", ex.port))                      # 3 bytes: dropped
            s.sendto(b"", ("127.0.0.1", ex.port))                                  # empty: dropped
            s.sendto(dns_query("goev.test", qid=9)[:2] + b"\x81\x00" + dns_query("goev.test")[4:],
                     ("127.0.0.1", ex.port))                                       # a response: dropped
            s.sendto(dns_query("goev.test", qid=42), ("127.0.0.1", ex.port))
            assert s.recv(65535)[:2] == struct.pack("!H", 42)


def test_dns_example_serves_a_zone_file(backend, tmp_path):
    """--zone FILE: NAME [TTL] TYPE VALUE lines, comments, several strings in a TXT."""
    zone = tmp_path / "zone.txt"
    zone.write_text("# a test zone\n"
                    "a.example 60 A 10.1.2.3\n"
                    "a.example AAAA 2001:db8::1   # trailing comment\n"
                    'a.example TXT "one string" "two"\n')
    with Example("dns.py", backend, "--zone", str(zone)) as ex:
        assert dig(ex.port, "a.example", "A", "+short") == "10.1.2.3\n"
        assert dig(ex.port, "a.example", "AAAA", "+short") == "2001:db8::1\n"
        assert dig(ex.port, "a.example", "TXT", "+short") == '"one string" "two"\n'
        out = dig(ex.port, "a.example", "A", "+noall", "+answer")
        assert "\t60\tIN\tA\t10.1.2.3" in out, out
        assert "NXDOMAIN" in dig(ex.port, "goev.test", "A")


# =============================================================================
# bench/servers: the comparison servers of bench/run.py answer like goev's
# =============================================================================
# bench/run.py measures goev against the servers a user would pick instead; each
# must do the same work (echo every byte; one plaintext answer per HTTP request,
# in order) and stop with exit status 0 on SIGTERM, or the comparison is void.
# Twisted, tornado and gevent live in bench/.venv (run.py installs them there).

_BENCH_VENV_PY = os.path.join(HERE, "bench", ".venv", "bin", "python")


def _bench_server_python(module):
    """The interpreter that runs a bench server needing ``module`` (None: stdlib),
    or skip the test when bench/.venv lacks it."""
    if module is None:
        return sys.executable
    missing = None
    if not os.path.exists(_BENCH_VENV_PY):
        missing = "bench/.venv does not exist (python bench/run.py and .ci/run create it)"
    elif subprocess.run([_BENCH_VENV_PY, "-c", "import " + module], capture_output=True,
                        timeout=60).returncode != 0:
        missing = "%s is not installed in bench/.venv" % module
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    return _BENCH_VENV_PY


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("script,module", [("asyncio_server.py", None), ("threads_server.py", None),
                                           ("twisted_server.py", "twisted"), ("tornado_server.py", "tornado"),
                                           ("gevent_server.py", "gevent")])
def test_bench_server_echoes_and_answers_http(script, module):
    """A bench comparison server echoes 64 bytes exactly, answers two pipelined
    HTTP requests with two 200 plaintext responses in order on one kept-alive
    connection, and exits 0 on SIGTERM; it finds its shared module
    (bench/servers/common.py) also under PYTHONSAFEPATH."""
    py = _bench_server_python(module)
    env = dict(os.environ, PYTHONSAFEPATH="1")
    for kind in ("echo", "http"):
        port = free_port()
        proc = subprocess.Popen([py, os.path.join(HERE, "bench", "servers", script), kind, "127.0.0.1:%d" % port],
                                cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: proc.poll() is not None or _listening(port), what="%s to listen" % script)
            assert proc.poll() is None, proc.communicate()
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
                if kind == "echo":
                    msg = bytes(range(64))
                    s.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        d = s.recv(4096)
                        assert d, got
                        got += d
                    assert got == msg
                else:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
                    f = s.makefile("rb")
                    for _ in range(2):
                        assert f.readline() == b"HTTP/1.1 200 OK\r\n"
                        headers = {}
                        for line in iter(f.readline, b"\r\n"):
                            k, _, v = line.decode().partition(":")
                            headers[k.lower()] = v.strip()
                        assert headers["content-type"] == "text/plain" and headers["content-length"] == "13"
                        assert f.read(13) == b"Hello, World!"
                    f.close()
        finally:
            rc = stop_child(proc)
        assert rc == 0, (script, kind, rc)


# =============================================================================
# The file itself, the wheel, and the README
# =============================================================================
# goev.py reads top to bottom (each name defined before use, Part I alone is a
# reactor), the wheel installs it as a typed package, and the README says what
# the code does (tests whose names contain "readme").


def _readme_first_program():
    """The README's first Python block (its "Ten lines")."""
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_readme_first_program_stops_cleanly(backend, sig):
    """The README's first program, verbatim: on Ctrl-C or SIGTERM it closes its
    connections (each client reads an orderly EOF after its echo) and exits 0
    without a traceback."""
    p, port = _start_program(_readme_first_program(), env={"GOEV_BACKEND": backend})
    clients = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(3)]
    try:
        for i, c in enumerate(clients):
            c.sendall(b"hi %d" % i)
            assert recv_exact(c, 4) == b"hi %d" % i
        p.send_signal(sig)
        for c in clients:
            assert recv_all(c) == b""
        out, err = p.communicate(timeout=WAIT)
        assert p.returncode == 0, err
        assert err == "" and out == ""
    finally:
        for c in clients:
            c.close()
        stop_child(p, signal.SIGKILL)


# PEP 561 reads a py.typed marker only inside a package, so the wheel installs
# goev.py as goev/__init__.py beside py.typed and a __main__.py.  These tests
# build the wheel from a copy of the checkout's build files, install it in a
# fresh venv and use it from outside the checkout, as a user would.

WHEEL_SOURCES = ("goev.py", "setup.py", "pyproject.toml", "README.md", "LICENSE")


# What pip prints when it cannot get setuptools for an isolated build (no network).
PIP_OFFLINE = ("No matching distribution found", "Could not find a version that satisfies",
               "Failed to establish a new connection", "Network is unreachable",
               "Temporary failure in name resolution")


# A user's file with two mistakes the annotations catch: a str where a number of
# milliseconds is required, and a method Reactor does not have.
USER_MISUSE = '''\
import goev


class Echo(goev.IOHandle):
    def on_read(self) -> bool:
        data = self.read()
        if data:
            self.write(data)
        self.schedule_timer("5")
        return True


with goev.Reactor() as r:
    goev.Acceptor(r, "127.0.0.1:0", Echo)
    r.run_forever()
'''


def _setuptools_builds_wheels():
    """Can this Python's own setuptools build our wheel (pip --no-build-isolation)?"""
    try:
        from importlib.metadata import version
        v = tuple(int(x) for x in version("setuptools").split(".")[:2])
    except Exception:
        return False
    return v >= (70, 1) or (v >= (61, 0) and importlib.util.find_spec("wheel") is not None)


def _venv_env():
    """The environment of a process that must see the venv only, not this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "MYPYPATH")}
    env["PYTHONFAULTHANDLER"] = "1"
    return env


class _Installed:
    def __init__(self, root):
        self.root = root                              # the work directory: no goev.py here
        self.bin = root / "venv" / "bin"
        self.python = str(self.bin / "python")
        self.site = None


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The wheel of this checkout, built with pip and installed in a fresh venv.
    Offline-safe: this Python's setuptools when it can build wheels, else pip's
    isolated build (setuptools from the index); skips when neither is possible."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("this Python has no pip")
    w = _Installed(tmp_path_factory.mktemp("wheel"))
    src = w.root / "src"
    src.mkdir()
    for name in WHEEL_SOURCES:
        shutil.copy(os.path.join(HERE, name), str(src / name))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
           "-w", str(w.root / "dist"), str(src)]
    offline = _setuptools_builds_wheels()
    cmd += ["--no-build-isolation"] if offline else ["--retries", "1", "--timeout", "20"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(w.root))
    if res.returncode and not offline and any(m in res.stdout + res.stderr for m in PIP_OFFLINE):
        pytest.skip("no setuptools to build the wheel with (not in this Python, index unreachable)")
    assert res.returncode == 0, res.stdout + res.stderr
    wheels = list((w.root / "dist").glob("goev-*.whl"))
    assert len(wheels) == 1, wheels
    w.wheel = wheels[0]
    subprocess.run([sys.executable, "-m", "venv", str(w.root / "venv")], check=True, timeout=300)
    res = subprocess.run([w.python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          "--no-index", "--no-deps", str(w.wheel)],
                         capture_output=True, text=True, timeout=300, cwd=str(w.root))
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([w.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, timeout=60, cwd=str(w.root), env=_venv_env())
    w.site = pathlib.Path(res.stdout.strip())
    return w


@pytest.mark.slow
def test_wheel_installs_goev_py_as_a_typed_package(installed_wheel):
    """The wheel installs goev/__init__.py (goev.py byte for byte), goev/__main__.py
    and the PEP 561 marker goev/py.typed -- no top-level goev.py beside them --
    and a `goev` console script whose entry point is goev's CLI."""
    w = installed_wheel
    pkg = w.site / "goev"
    with open(os.path.join(HERE, "goev.py"), "rb") as f:
        assert (pkg / "__init__.py").read_bytes() == f.read()
    assert (pkg / "py.typed").is_file()
    assert "_main" in (pkg / "__main__.py").read_text()
    assert not (w.site / "goev.py").exists()
    infos = list(w.site.glob("goev-%s.dist-info" % goev.__version__))
    assert len(infos) == 1, list(w.site.glob("goev-*"))
    entry = (infos[0] / "entry_points.txt").read_text()
    assert re.search(r"\[console_scripts\]\s*goev = goev:_main\b", entry), entry
    assert os.access(str(w.bin / "goev"), os.X_OK)
    res = subprocess.run([w.python, "-c", "import goev; print(goev.__file__); print(goev.__version__)"],
                         capture_output=True, text=True, timeout=60, cwd=str(w.root), env=_venv_env())
    assert res.stdout.splitlines() == [str(pkg / "__init__.py"), goev.__version__], res


@pytest.mark.slow
@pytest.mark.parametrize("how", ["goev", "python -m goev"])
def test_installed_goev_prints_its_version(installed_wheel, how):
    """The installed `goev --version` and `python -m goev --version` print
    "goev VERSION" and exit 0, as `python -m goev --version` does in a checkout."""
    w = installed_wheel
    cmd = [str(w.bin / "goev")] if how == "goev" else [w.python, "-m", "goev"]
    res = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=60,
                         cwd=str(w.root), env=_venv_env())
    assert (res.returncode, res.stdout, res.stderr) == (0, "goev %s\n" % goev.__version__, ""), res


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("how", ["goev", "python -m goev"])
def test_installed_goev_echo_serves_and_stops_on_signal(installed_wheel, how, sig):
    """The installed CLI is goev.py's: `goev echo` and `python -m goev echo`
    echo, and stop on SIGINT/SIGTERM with exit code 0 and no traceback."""
    w = installed_wheel
    port = free_port()
    cmd = [str(w.bin / "goev")] if how == "goev" else [w.python, "-m", "goev"]
    p = subprocess.Popen(cmd + ["echo", "127.0.0.1:%d" % port], cwd=str(w.root), env=_venv_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        err = _Pipe(p.stderr)
        banner = err.readline()                 # printed once the signal handlers are set
        assert "goev %s: echo server" % goev.__version__ in banner, banner
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
            c.sendall(b"installed")
            assert recv_exact(c, 9) == b"installed"
            p.send_signal(sig)
            assert p.wait(WAIT) == 0
            assert recv_all(c) == b""
        assert "Traceback" not in err.read_rest()
    finally:
        stop_child(p, signal.SIGKILL)


def _mypy_command():
    """How to run mypy here: this Python's, else one on PATH; None if there is none."""
    for cmd in ([sys.executable, "-m", "mypy"], [shutil.which("mypy")]):
        if cmd[-1] is None:
            continue
        try:
            if subprocess.run(cmd + ["--version"], capture_output=True, timeout=120).returncode == 0:
                return cmd
        except OSError:
            pass
    return None


@pytest.mark.slow
def test_mypy_checks_user_code_against_the_installed_wheel(installed_wheel):
    """mypy run on a user's file, against the venv the wheel is installed in,
    reports the two misuses (a str for a number of milliseconds, a method
    Reactor lacks): goev's annotations reach users, no "missing library stubs
    or py.typed marker"."""
    mypy = _mypy_command()
    if mypy is None:
        pytest.skip("mypy is not installed (.ci/run checks this with its own)")
    w = installed_wheel
    work = w.root / "user"
    work.mkdir(exist_ok=True)
    (work / "user.py").write_text(USER_MISUSE)
    res = subprocess.run(mypy + ["--python-executable", w.python, "--cache-dir", str(work / ".mypy_cache"),
                                 "user.py"], capture_output=True, text=True, timeout=300, cwd=str(work),
                         env=_venv_env())
    out = res.stdout + res.stderr
    assert "py.typed" not in out and "missing library stubs" not in out, out
    assert 'user.py:9: error: Argument 1 to "schedule_timer" of "IOHandle" has incompatible type "str"' in out, out
    assert 'user.py:15: error: "Reactor" has no attribute "run_forever"' in out, out
    assert "Found 2 errors in 1 file" in out and res.returncode == 1, out


# goev.py is read top to bottom: Part I (the reactor) names nothing defined in
# Part II (the extras), and no module-level name is used above its definition.

GOEV_PY = os.path.join(HERE, "goev.py")


PART_II_BANNER = "# PART II -- production extras"


def _module_defs(tree):
    """{name: line} of every module-level definition (first one wins)."""
    defs = {}
    for node in tree.body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [(a.asname or a.name).split(".")[0] for a in node.names]
        else:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Assign):
                    names += [n.id for t in sub.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
                elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                    names.append(sub.target.id)
                elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                    names += [(a.asname or a.name).split(".")[0] for a in sub.names]
        for n in names:
            defs.setdefault(n, node.lineno)
    return defs


def _name_uses(tree):
    """(line, name) of every name loaded, annotations aside (they are not evaluated)."""
    skip = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = n.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
                if arg is not None and arg.annotation is not None:
                    skip.update(id(x) for x in ast.walk(arg.annotation))
            if n.returns is not None:
                skip.update(id(x) for x in ast.walk(n.returns))
        elif isinstance(n, ast.AnnAssign):
            skip.update(id(x) for x in ast.walk(n.annotation))
    return [(n.lineno, n.id) for n in ast.walk(tree)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and id(n) not in skip]


def test_goev_py_defines_each_name_before_use():
    """No module-level name is referenced on a line above its definition."""
    with open(GOEV_PY) as f:
        tree = ast.parse(f.read())
    defs = _module_defs(tree)
    early = sorted((line, name, defs[name]) for line, name in _name_uses(tree)
                   if name in defs and line < defs[name])
    assert not early, "used before defined (line, name, defined at): %r" % early


def test_part_one_names_nothing_from_part_two():
    """Part I (above the PART II banner) refers to no name Part II defines."""
    with open(GOEV_PY) as f:
        text = f.read()
    assert text.count(PART_II_BANNER) == 1
    cut = text[:text.index(PART_II_BANNER)].count("\n") + 1
    tree = ast.parse(text)
    part2 = {name for name, line in _module_defs(tree).items() if line > cut}
    crossing = sorted((line, name) for line, name in _name_uses(tree) if line < cut and name in part2)
    assert not crossing, "Part I names Part II: %r" % crossing


PART_ONE_ECHO = r'''
import socket, sys
sys.path.insert(0, sys.argv[1])
import goev
assert not hasattr(goev, "ConnectPool") and not hasattr(goev, "serve")
from goev import *
''' + ECHO_SRC + r'''
with goev.Reactor(2, backend=sys.argv[2]) as r:
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    r.start()
    with socket.create_connection(a.address) as c:
        c.sendall(b"part one")
        got = b""
        while len(got) < 8:
            got += c.recv(100)
    for kw in ({"trace": True},):
        try:
            goev.Reactor(1, **kw)
        except RuntimeError as e:
            print("refused:", e)
    for kw in ({"proxy_protocol": True}, {"ssl": object()}):
        try:
            goev.Acceptor(r, "127.0.0.1:0", Echo, **kw)
        except RuntimeError as e:
            print("refused:", e)
print(got.decode())
'''


def test_part_one_alone_is_a_working_reactor(backend, tmp_path):
    """goev.py cut at the PART II banner imports and serves an echo round trip;
    the extras it lacks are refused with a RuntimeError that says so."""
    with open(GOEV_PY) as f:
        text = f.read()
    (tmp_path / "goev.py").write_text(text[:text.index(PART_II_BANNER)])
    r = run_py(["-c", PART_ONE_ECHO, str(tmp_path), backend])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "part one"
    assert len([x for x in lines if x.startswith("refused:") and "Part II" in x]) == 3, r.stdout


# -- README.md: its commands, package list and API table match the code -----------------

def _readme():
    with open(os.path.join(HERE, "README.md")) as f:
        return f.read()


def test_readme_first_commands_serve_on_loopback_and_test_in_a_venv():
    """The first two commands: a server on 127.0.0.1 (not every interface), and the
    test suite inside a venv (Debian's python3 refuses pip install outside one)."""
    first = re.search(r"```sh\n(.*?)```", _readme(), re.S).group(1).splitlines()
    assert re.match(r"python3 -m goev echo 127\.0\.0\.1:\d+ ", first[0]), first
    assert re.match(r"python3 -m venv (\S+) && \. \1/bin/activate && pip install pytest && "
                    r"python -m pytest -q -m 'not slow' test_goev\.py$", first[1]), first


def test_readme_lists_the_debian_packages_ci_installs():
    """The README's apt-get line names exactly the packages .ci/run installs."""
    with open(os.path.join(HERE, ".ci", "run")) as f:
        ci = set(w for m in re.finditer(r"need\+=\(([^)]*)\)", f.read()) for w in m.group(1).split())
    line = re.search(r"sudo apt-get install ((?:[^\n\\]|\\\n)*)", _readme()).group(1)
    assert set(line.replace("\\", " ").split()) == ci


def test_readme_names_every_option_of_the_command_line():
    """Every option of python3 -m goev echo appears in the README."""
    out = run_py(["-m", "goev", "echo", "--help"]).stdout
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", out)) - {"--help"}
    assert options, out
    text = _readme()
    assert sorted(o for o in options if o not in text) == []


def test_readme_api_table_has_the_real_signatures():
    """The keyword arguments and defaults the README's API table gives for Reactor,
    Acceptor and Connector.connect are the code's, none missing."""
    import inspect
    text = _readme()
    for shown, func in (("Reactor(", goev.Reactor.__init__), ("Acceptor(", goev.Acceptor.__init__),
                        ("Connector(r).connect(", goev.Connector.connect)):
        m = re.search(r"^\| `%s([^`]*)\)`" % re.escape(shown), text, re.M)
        assert m, shown
        documented = {}
        for item in m.group(1).split(", "):
            if "=" in item:
                name, default = item.split("=", 1)
                documented[name] = ast.literal_eval(default)
        real = {n: p.default for n, p in inspect.signature(func).parameters.items()
                if p.default is not inspect.Parameter.empty}
        assert set(documented) == set(real), shown
        for name, default in documented.items():
            assert default == real[name], (shown, name, default, real[name])


def test_readme_api_table_names_every_public_handler_and_reactor_attribute():
    """Every public attribute of IOHandle (h.NAME, callbacks aside) and Reactor
    (r.NAME) is in the README's API table."""
    text = _readme()
    missing = []
    for prefix, cls, extra in (("h", goev.IOHandle, ()), ("r", goev.Reactor, ("pollers", "backend"))):
        names = set(n for n in dir(cls) if not n.startswith(("_", "on_"))) | set(extra)
        missing += ["%s.%s" % (prefix, n) for n in sorted(names)
                    if not re.search(r"`(?:%s|handler)\.%s\b" % (prefix, n), text)]
    assert missing == []


def _readme_blocks(lang):
    """The README's fenced blocks of ``lang`` (python, or "" for plain ones)."""
    blocks, current, opened = [], None, None
    for line in _readme().splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, opened = [], line[3:].strip()
            else:
                if opened == lang:
                    blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _trace_normalised(line):
    """A trace line without what varies between runs: fd numbers, ports."""
    line = re.sub(r"\bfd \d+", "fd N", line)
    return re.sub(r"\('127\.0\.0\.1', \d+\)", "('127.0.0.1', PORT)", line)


def test_readme_trace_tour_is_a_real_run():
    """The README's trace tour is what its own two commands print: the traced
    CLI echo server and the client that waits for the echo before it closes.
    Compared line by line (the annotation column cut off, fd numbers and ports
    normalised): a changed step, byte count or callback name fails."""
    text = _readme()
    client = re.search(r'`(python3 -c "import socket; c = socket\.create_connection.*?")`', text).group(1)
    assert "GOEV_TRACE=1 python3 -m goev echo 127.0.0.1:8080" in text
    tour = next(b for b in _readme_blocks("") if b.startswith("goev[p0] created: "))
    expected = [_trace_normalised(re.split(r"\s{2,}", line)[0]) for line in tour.splitlines()]
    port = free_port()
    with tempfile.NamedTemporaryFile("w") as err:       # (read by name: the child has its own offset)
        p = subprocess.Popen([sys.executable, "-m", "goev", "echo", "127.0.0.1:%d" % port],
                             cwd=HERE, env=_child_env({"GOEV_TRACE": "1", "GOEV_BACKEND": "epoll"}),
                             stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            def trace():
                with open(err.name) as f:
                    return [l for l in f.read().splitlines() if l.startswith("goev[p0] ")]
            ready = next(i for i, l in enumerate(expected) if "epoll_wait" in l)   # lines before the first wait
            wait_until(lambda: len(trace()) >= ready, what="the server's set-up lines")
            argv = shlex.split(client.replace("8080", str(port)))
            assert argv[0] == "python3"
            out = subprocess.run([sys.executable] + argv[1:], capture_output=True, text=True, timeout=WAIT)
            assert out.stdout == "b'hello\\n'\n", out
            n = len(expected)
            wait_until(lambda: len(trace()) >= n and "close(fd)" in trace()[n - 1], what="the session's close")
        finally:
            assert stop_child(p) == 0
        got = [_trace_normalised(l) for l in trace()[:n]]
    assert got == expected


_SECTION_RE = re.compile(r"^# (\d+)\. (.*)$", re.M)


def _goev_sections():
    """{number: (title, names defined in that section of goev.py)}."""
    src = open(os.path.join(HERE, "goev.py")).read()
    heads = [(m.start(), int(m.group(1)), m.group(2)) for m in _SECTION_RE.finditer(src)]
    tree = ast.parse(src)
    sections = {}
    for i, (pos, num, title) in enumerate(heads):
        first = src.count("\n", 0, pos) + 1
        last = src.count("\n", 0, heads[i + 1][0]) if i + 1 < len(heads) else 1 << 30
        names = set()
        for node in tree.body:
            if first <= node.lineno <= last:
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                        names.add(sub.name)
                    elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        names.add(sub.id)
        sections[num] = (title, names)
    return sections


def test_readme_section_references_name_real_sections():
    """Every "§ N" (and "§ N–M") in the README is a section of goev.py, and a
    code name right after it (IOHandle.read, _Waker, add_handler) is defined in
    that section."""
    sections = _goev_sections()
    refs = re.findall(r"§ (\d+)(?:[–-](\d+))?(?:'s)?(?: ([A-Za-z_][\w.]*))?", _readme())
    assert len(refs) > 10
    for first, last, word in refs:
        for n in filter(None, (first, last)):
            assert int(n) in sections, "§ %s is not a section of goev.py" % n
        if word and ("_" in word or "." in word or word[:1].isupper()) and not last:
            title, names = sections[int(first)]
            head = word.split(".")[0]
            assert head in names or head.lower() in title.lower(), \
                "§ %s %s: not defined in section %s (%s)" % (first, word, first, title)


def test_readme_python_blocks_run():
    """Every ```python block of the README: a complete program runs (a server
    on a free port, echoing, stopped by SIGINT with exit 0); a block marked as
    a fragment at least compiles."""
    blocks = _readme_blocks("python")
    assert len(blocks) >= 3
    for src in blocks:
        if src.startswith("# a fragment"):
            compile(src, "README fragment", "exec")
            continue
        if "127.0.0.1:8080" in src:
            p, port = _start_program(src)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
                    c.sendall(b"readme")
                    assert recv_exact(c, 6) == b"readme"
                p.send_signal(signal.SIGINT)
                out, err = p.communicate(timeout=WAIT)
                assert p.returncode == 0 and "Traceback" not in err, err
            finally:
                stop_child(p, signal.SIGKILL)
        else:
            r = run_py(["-c", src])
            assert r.returncode == 0, (src, r.stderr)


# =============================================================================
# Scale (slow; run by .ci/run)
# =============================================================================
# 10 000 concurrent connections on one reactor.


_SCALE_SERVER = r"""
import signal, sys
import goev
r = goev.Reactor(1, backend=sys.argv[1])
a = goev.Acceptor(r, "127.0.0.1:0", goev._EchoHandler, backlog=4096)
signal.signal(signal.SIGTERM, lambda *_: r.stop())
print(a.address[1], flush=True)
r.run()
"""


@pytest.mark.slow
def test_10k_connections(backend):
    """One reactor (a child process running the CLI's echo
    handler) holds 10 000 concurrent connections from source addresses
    127.0.0.2-5, echoes a distinct message on every one, and its RSS grows by
    less than 8 KiB per connection (measured with /proc/PID/status VmRSS)."""
    n = 10000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 30000 if hard == resource.RLIM_INFINITY else min(hard, 30000)
    if want < n + 500:
        pytest.skip("RLIMIT_NOFILE hard limit %d is below %d" % (hard, n + 500))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    clients = []
    proc = None
    try:
        proc = spawn_py(["-c", _SCALE_SERVER, backend])     # inherits the raised limit
        port = int(proc.stdout.readline())
        pid = proc.pid
        base_fds = len(os.listdir("/proc/%d/fd" % pid))
        rss0 = rss_kib(pid)
        t0 = time.monotonic()
        for i in range(n):
            s = socket.socket()
            s.bind(("127.0.0.%d" % (2 + i % 4), 0))
            s.connect(("127.0.0.1", port))
            clients.append(s)
        wait_until(lambda: len(os.listdir("/proc/%d/fd" % pid)) >= base_fds + n, timeout=60,
                   what="the server to accept all %d connections" % n)
        t_conn = time.monotonic() - t0
        for i, s in enumerate(clients):
            s.sendall(b"%05d" % i)
        for i, s in enumerate(clients):
            assert recv_exact(s, 5) == b"%05d" % i
        t_echo = time.monotonic() - t0 - t_conn
        rss1 = rss_kib(pid)
        per_conn = (rss1 - rss0) * 1024.0 / n
        print("\n10k connections [%s]: RSS %.1f -> %.1f MiB, %.0f bytes per connection; "
              "connect %.1fs, echo %.1fs" % (backend, rss0 / 1024, rss1 / 1024, per_conn, t_conn, t_echo))
        assert per_conn < 8192, "%.0f bytes of RSS per connection" % per_conn
        assert proc.poll() is None
    finally:
        for s in clients:
            s.close()
        if proc is not None:
            assert stop_child(proc) == 0
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
