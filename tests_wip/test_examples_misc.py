# =============================================================================
# Examples: echo, tcp_proxy, download, timers, threads_baseline
# =============================================================================
# Each example runs as a child process on a port it picks itself (ADDR
# 127.0.0.1:0; the first stderr line says "listening on HOST:PORT"), talked to
# with stdlib clients and with real ones (socat, nc, curl, redis-cli).  With
# $CI set, a missing real client is a failure, not a skip.  Every child is
# stopped with SIGTERM and must exit 0.

from test_goev import *                                   # noqa: F401,F403
from test_goev import (backend, npollers, hygiene, WAIT, wait_until,      # noqa: F401
                       recv_exact, recv_all, spawn_py, free_port, wait_port)

import hashlib
import http.client
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest


def _need(tool):
    """The path of a real client; skip without it (fail under CI)."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("%s is required under CI (apt-get install it)" % tool)
        pytest.skip("%s is not installed" % tool)
    return path


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
    m = re.search(r"listening on \S*?:(\d+)\b", line)
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
        proc.kill()
        out, err = proc.communicate()
        pytest.fail("child %d ignored %s: %s" % (proc.pid, sig, err))
    return proc.returncode, out, err


def assert_clean_exit(proc):
    code, out, err = finish(proc)
    assert code == 0, "exit code %r, stderr:\n%s" % (code, err)
    assert "Traceback" not in err, err
    return out, err


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def payload(n, seed=0):
    r = random.Random(seed)
    return r.randbytes(n) if hasattr(r, "randbytes") else os.urandom(n)


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
    nc = _need("nc")
    helptext = subprocess.run([nc, "-h"], capture_output=True, text=True).stderr
    return [nc, "-N" if "-N" in helptext else "-q1", "127.0.0.1", str(port)]


# -- echo.py -----------------------------------------------------------------------

def test_example_echo(backend, kids):
    proc, port = start_example(kids, ["echo.py", "127.0.0.1:0"], backend)
    echo_roundtrip(port, payload(1 << 20))
    line = b"hello from a real client\n"
    assert run_tool([_need("socat"), "-", "TCP:127.0.0.1:%d" % port], line) == line
    assert run_tool(nc_argv(port), line) == line
    assert_clean_exit(proc)


def test_example_echo_sigint(backend, kids):
    proc, port = start_example(kids, ["echo.py", "127.0.0.1:0"], backend)
    echo_roundtrip(port, b"x")
    code, _, err = finish(proc, signal.SIGINT)
    assert code == 0, err


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
    echo_roundtrip(port, payload(8 << 20, seed=npollers))
    # several clients at once (pairs spread over the pollers)
    threads = [threading.Thread(target=echo_roundtrip, args=(port, payload(300000, seed=i)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    line = b"through the proxy\n"
    assert run_tool([_need("socat"), "-", "TCP:127.0.0.1:%d" % port], line) == line
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
    data = payload(300000)
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
    chunk = payload(1 << 20)
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
        data = payload(1 << 20, seed=7)
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
    blob = payload(3 << 20, seed=3)
    (tmp_path / "blob.bin").write_bytes(blob)
    http_port = free_port()
    server = spawn_py(["-u", "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                       str(tmp_path), str(http_port)])
    kids.append(server)
    wait_port(http_port)
    proxy, port = start_proxy(kids, backend, http_port, 2)
    out = tmp_path / "out.bin"
    run_tool([_need("curl"), "-sS", "--fail", "-o", str(out), "http://127.0.0.1:%d/blob.bin" % port])
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
    redis_cli = _need("redis-cli")
    redis_server = _need("redis-server")
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
    big = payload(1 << 20, seed=5).hex().encode()[: 1 << 20]   # 1 MiB value through -x (stdin)
    assert run_tool(cli + ["-x", "SET", "big"], big).strip() == b"OK"
    assert run_tool(cli + ["STRLEN", "big"]).strip() == str(len(big)).encode()
    assert run_tool(cli + ["GET", "big"]).rstrip(b"\n") == big
    assert_clean_exit(proxy)
    finish(redis)


# -- download.py ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["write", "sendfile"])
def test_download_delivers_the_file(backend, kids, tmp_path, mode):
    blob = payload(3 << 20 | 12345, seed=11)
    path = tmp_path / "file.bin"
    path.write_bytes(blob)
    extra = ["--sendfile"] if mode == "sendfile" else []
    proc, port = start_example(kids, ["download.py", "127.0.0.1:0", str(path)] + extra, backend)
    out = tmp_path / "out.bin"
    run_tool([_need("curl"), "-sS", "--fail", "-o", str(out), "http://127.0.0.1:%d/any/path" % port])
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


def test_download_rate_limit_is_applied(backend, kids, tmp_path):
    """200 KB at 100 KB/s cannot take less than ~2 s (asserted: >= 1.5 s), in
    both modes at once; and the bytes are exact."""
    blob = payload(200000, seed=13)
    path = tmp_path / "file.bin"
    path.write_bytes(blob)
    curl = _need("curl")
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


def test_download_slow_readers_keep_memory_flat(backend, kids, tmp_path):
    """50 MiB to a reader that stops and then reads, with curl --limit-rate 10k
    running at the same time: the server's RSS must not follow the file size."""
    size = 50 << 20
    path = tmp_path / "big.bin"
    block = payload(1 << 20, seed=17)
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
    slow_curl = subprocess.Popen([_need("curl"), "-sS", "--limit-rate", "10k", "-o", str(curl_out),
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
    echo_roundtrip(port, payload(1 << 20))
    threads = [threading.Thread(target=echo_roundtrip, args=(port, payload(100000, seed=i)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    line = b"hello threads\n"
    assert run_tool([_need("socat"), "-", "TCP:127.0.0.1:%d" % port], line) == line
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
    out = run_tool([_need("curl"), "-sS", "--fail", "http://127.0.0.1:%d/" % port,
                    "http://127.0.0.1:%d/again" % port])
    assert out == b"Hello, World!" * 2
    assert_clean_exit(proc)
