# =============================================================================
# TLS (issue 11): Acceptor(ssl=), Connector.connect(ssl=, server_hostname=)
# =============================================================================
# A self-signed certificate is made at test time with the openssl command
# (session fixture).  Real clients: Python's ssl module (blocking sockets, and
# a memory-BIO client that controls exactly what goes out in which segment),
# goev's own Connector, and `openssl s_client`.  Byte-exact echo 1 B..8 MiB,
# close_notify both ways, half-close, handshake timeout, plaintext/garbage
# peers (closed, logged at DEBUG only), certificate errors reaching
# on_connect_fail, backpressure on ciphertext, edge-triggered and tiny-buffer
# readers, off-thread writes, the class swap with user __slots__ and user
# write() overrides, trace mode, and the CLI with --tls-cert/--tls-key.

from test_goev import *  # noqa: F401,F403
from test_goev import backend, npollers, hygiene, make_reactor, goev_log  # noqa: F401

for _n in [n for n in list(globals()) if n.startswith("test_")]:
    del globals()[_n]

import http.client
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import threading

import pytest

import goev
from test_goev import (WAIT, Echo, echo_server, free_port, recv_all, recv_exact, spawn_py,
                       stop_child, wait_port, wait_until)


# -- certificate and contexts ----------------------------------------------------

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


def payload(size):
    rnd = random.Random(size)
    return rnd.randbytes(size) if hasattr(rnd, "randbytes") else os.urandom(size)


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


@pytest.fixture
def debug_log(goev_log):
    """goev_log with the "goev" logger at DEBUG, so the DEBUG records exist."""
    log = logging.getLogger("goev")
    old = log.level
    log.setLevel(logging.DEBUG)
    yield goev_log
    log.setLevel(old)


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
    data = payload(size)
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
            data = payload(1000 + 7919 * i)
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
    data = payload(300000)
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
    ssl_handshake_timeout; a stop mid-handshake gives ConnectionAbortedError."""
    r = make_reactor(1)
    r.start()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        h = TLSProbe(b"x")
        goev.Connector(r).connect(srv.getsockname(), h, 5000, ssl=client_ctx,
                                  server_hostname="localhost", ssl_handshake_timeout=0.3)
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
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            return super().on_open()

        def write(self, data):
            super().write(data)
            peak[0] = max(peak[0], self.pending_write_bytes)
    r, a = echo_server(make_reactor, 1, factory=Watch, ssl=server_ctx)
    data = payload(4 << 20)
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
    data = payload(1 << 20)
    with MemoryClient(a.address, client_ctx) as c:
        assert echo_through(c, data) == data


def test_tls_tiny_read_buffer(make_reactor, server_ctx, client_ctx):
    """A read buffer smaller than one TLS record: plaintext left in the SSL
    object is delivered by posted reads, nothing is stranded."""
    r = make_reactor(1, read_buffer_size=1000)
    a = goev.Acceptor(r, "127.0.0.1:0", Echo, ssl=server_ctx)
    r.start()
    data = payload(200000)
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
