"""The goev test suite: real sockets on loopback, real threads, real processes.

Every test that takes the ``backend`` fixture runs on both backends (epoll and
selectors); ``npollers`` adds 1 and 3 pollers where placement matters.  Each
test has a watchdog deadline, and after each test the harness checks that no
fd, thread or child process was left behind.  Nothing here asserts on timing
beyond generous timeouts.

Run:  python -m pytest -q test_goev.py
"""

import errno
import faulthandler
import gc
import logging
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import goev

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_DEADLINE = 120          # seconds per test before the watchdog dumps stacks and exits
WAIT = 20.0                  # generous timeout for "this should happen soon"


# =============================================================================
# Harness: backends, watchdog, leak checks, helpers
# =============================================================================

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
    """The echo handler of the README."""

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


def run_py(args, **kw):
    """Run a Python child process with goev importable; returns CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(kw.pop("env", {}))
    return subprocess.run([sys.executable] + args, cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=kw.pop("timeout", 60), **kw)


def spawn_py(args, **kw):
    """Start a Python child with goev importable (stdout/stderr piped)."""
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(kw.pop("env", {}))
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
# Core: echo, sizes, concurrency
# =============================================================================

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
