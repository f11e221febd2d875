# =============================================================================
# Examples: examples/websocket.py (RFC 6455 echo) and examples/kv.py (RESP2
# key/value server), each run as a child process and driven by a real client:
# a small stdlib WebSocket client and a small RESP client written here, plus
# redis-cli / redis-benchmark and `python -m websockets` when installed.
# =============================================================================

from test_goev import *  # noqa: F401,F403
from test_goev import backend, npollers, hygiene  # noqa: F401

import base64
import hashlib
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from test_goev import WAIT, free_port, spawn_py, stop_child, wait_until

# `import *` also brought test_goev's own tests in; do not collect them twice.
for _name in [n for n in globals() if n.startswith("test_")]:
    del globals()[_name]


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


def need_tool(name):
    """A real client from the OS; under CI a missing one is a failure, not a skip."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("%s is not installed (apt-get install -y redis-tools)" % name)
        pytest.skip("%s is not installed" % name)
    return path


# =============================================================================
# A minimal WebSocket client (RFC 6455), strict about what the server sends
# =============================================================================

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


def http_exchange(ex, request):
    with ex.connect() as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


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
        pytest.skip("no Python with the websockets package (pip install websockets)")
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


# =============================================================================
# A minimal RESP client, for kv.py
# =============================================================================

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
