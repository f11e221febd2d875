# =============================================================================
# Running behind real infrastructure (issue 12): the PROXY protocol v1/v2 on the
# Acceptor (and HAProxy in front of it), socket activation (Acceptor(fd=N),
# Acceptor.from_socket, systemd-socket-activate in front of python -m goev) and
# zero-downtime reload (SIGHUP to the serve() supervisor, SIGQUIT retirement)
# =============================================================================

from test_goev import *  # noqa: F401,F403
from test_goev import backend, npollers, hygiene, make_reactor, goev_log  # noqa: F401

for _n in [n for n in list(globals()) if n.startswith("test_")]:
    del globals()[_n]

import shutil
import tempfile

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def _need(tool):
    if shutil.which(tool):
        return shutil.which(tool)
    if os.environ.get("CI"):
        pytest.fail("%s is not installed (.ci/run installs it)" % tool)
    pytest.skip("%s is not installed" % tool)


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


@pytest.fixture
def debug_log(goev_log):
    """goev_log with the "goev" logger at DEBUG (the PROXY rejections log there)."""
    log = logging.getLogger("goev")
    level = log.level
    log.setLevel(logging.DEBUG)
    yield goev_log
    log.setLevel(level)


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
    exe = _need("haproxy")
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
            me = c.getsockname()
        # (the order of on_open calls is not ours to rely on: wait_port's probe
        # connection may reach the server after this one)
        wait_until(lambda: any(o[0] == me for o in rec.opened), what="on_open with peer %r" % (me,))
        sock_peer = next(o[1] for o in rec.opened if o[0] == me)
        assert sock_peer[0] == "127.0.0.1" and sock_peer != me  # HAProxy's own connection
        assert sock_peer[1] != a.address[1]
    assert all(o[0] != o[1] for o in rec.opened)            # peer is never the balancer


def _stderr_file():
    return tempfile.TemporaryFile(mode="w+")


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
            me = c.getsockname()
        want = "PROXY v%d header: client %r via" % (2 if mode.endswith("v2") else 1, me)

        def seen():
            err.seek(0)
            return want in err.read()
        wait_until(seen, what="the trace line %r" % want)
    finally:
        assert stop_child(p) == 0
        err.close()


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


def test_listen_fds_ignores_other_pids_and_unsets(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 100000))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "x")
    assert goev._listen_fds() == []
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ
    assert "LISTEN_FDNAMES" not in os.environ


def _ssa(port, backend, args, err):
    exe = _need("systemd-socket-activate")
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
        wait_until(refused, what="the listener to close")
        c.sendall(b"still served")                    # the open connection carries on
        assert recv_exact(c, 12) == b"still served"
        assert p.poll() is None
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
        assert _echo_ok(port)
    finally:
        assert stop_child(p) == 0
        err.close()


def _echo_ok(port):
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
        c.sendall(b"x")
        return recv_exact(c, 1) == b"x"


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
