# =============================================================================
# Every core: serve(), REUSEPORT, python -m goev http, graceful shutdown (issue 6)
# and trace mode (issue 9)
# =============================================================================

from test_goev import *  # noqa: F401,F403
from test_goev import backend, npollers, hygiene, make_reactor, goev_log  # noqa: F401

import http.client
import sys as _sys

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


def test_serve_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        goev.serve("127.0.0.1:0", Echo, workers=0)
    with pytest.raises(TypeError, match="factory"):
        goev.serve("127.0.0.1:0", 42)
    with pytest.raises(ValueError, match="backend"):
        goev.serve("127.0.0.1:0", Echo, backend="nope")


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
    out = http_raw(http_server, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    assert out.count(b"200 OK") == 1            # answered once, then closed
    out = http_raw(http_server, b"GET / HTTP/1.0\r\n\r\n")
    assert out.count(b"200 OK") == 1


@pytest.mark.parametrize("bad", [
    b"garbage\r\n\r\n",
    b"GET /\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
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


# -- trace mode ------------------------------------------------------------------------

TRACE_SCRIPT = r'''
import socket, sys, goev

class Echo(goev.IOHandle):
    def on_read(self):
        d = self.read()
        if d is None:
            return True
        self.write(d)
        return bool(d)

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
        "recv -> 5 bytes",
        "send 5 bytes -> 5 sent",
        "recv -> 0 bytes (end of stream)",
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


def test_trace_partial_send_and_out_armed(backend, capfd):
    r = goev.Reactor(1, backend=backend, trace=True)
    try:
        class Big(goev.IOHandle):
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
    echo session, and the loop is _Poller's own."""
    r, a = echo_server(make_reactor, 1)
    assert type(r.pollers[0]) is goev._Poller
    trace_codes = {f.__code__ for cls in (goev._TracePoller, goev._TracedBackend, goev._TracedSocket)
                   for f in vars(cls).values() if hasattr(f, "__code__")}
    calls = []

    def prof(frame, event, arg):
        if event == "call" and frame.f_code in trace_codes:
            calls.append(frame.f_code.co_name)
    threading.setprofile(prof)
    try:
        # the poller thread already runs: install the profiler on it via a post
        done = threading.Event()
        r.post(lambda: (_sys.setprofile(prof), done.set()))
        assert done.wait(WAIT)
        with socket.create_connection(a.address) as c:
            for _ in range(50):
                c.sendall(b"abc")
                assert recv_exact(c, 3) == b"abc"
        done2 = threading.Event()
        r.post(lambda: (_sys.setprofile(None), done2.set()))
        assert done2.wait(WAIT)
    finally:
        threading.setprofile(None)
    assert calls == []


# -- examples/reuseport.py and examples/http_hello.py ------------------------------------

def _need(tool):
    import shutil
    if shutil.which(tool):
        return True
    if os.environ.get("CI"):
        pytest.fail("%s is not installed (CI installs it)" % tool)
    pytest.skip("%s is not installed" % tool)


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
    _need("curl")
    url = "http://127.0.0.1:%d/" % hello_server
    r = subprocess.run(["curl", "-s", "--http1.1", url, url], capture_output=True, timeout=WAIT)
    assert r.returncode == 0 and r.stdout == b"Hello, World!" * 2
    _need("wrk")
    r = subprocess.run(["wrk", "-t1", "-c10", "-d1s", url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Non-2xx" not in r.stdout and "Socket errors" not in r.stdout, r.stdout
    assert int(r.stdout.split("requests in")[0].split()[-1]) > 0


def test_http_fast_path_never_answers_what_the_parser_would_not(http_server):
    """The memoized fast path: after a plain GET was learned, variants of it
    (a different header, a body, Connection: close, a prefix) take the parser."""
    req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert http_raw(http_server, req * 3, until=3).count(b"200 OK") == 3      # learned
    assert http_raw(http_server, req + req[:-2], until=1).count(b"200 OK") == 1  # 2nd incomplete
    close = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert http_raw(http_server, close + req).count(b"200 OK") == 1           # closed after one
    bad = b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"
    assert http_raw(http_server, bad).startswith(b"HTTP/1.1 400")
    body = b"POST / HTTP/1.1\r\nContent-Length: 27\r\n\r\n" + req                 # req is a body here
    assert http_raw(http_server, body + req, until=2).count(b"200 OK") == 2
