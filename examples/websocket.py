"""websocket.py -- an RFC 6455 WebSocket echo server on goev.

What it teaches: a protocol that starts as HTTP and turns into something else
on the same socket, parsed incrementally in ``on_read``.

  1. The upgrade handshake: the client sends an HTTP GET with
     ``Upgrade: websocket`` and a random ``Sec-WebSocket-Key``; the server
     proves it speaks WebSocket by answering ``101 Switching Protocols`` with
     ``base64(SHA-1(key + GUID))``.  The request may arrive in pieces, and the
     first frames may arrive in the same read as its end: both are kept.
  2. Framing: every message travels in frames (a 2-byte header, an optional
     16- or 64-bit length, a 4-byte mask for client frames, the payload).
     Frames arrive split across reads or many per read, so the parser works
     on a buffer and consumes only complete frames.
  3. Fragmentation, control frames (ping/pong/close) interleaved with a
     fragmented message, UTF-8 validation of text, limits, and the close
     handshake -- each failure answered with the status code the RFC names
     (1002 protocol error, 1007 bad UTF-8, 1009 too big).  A fragmented
     message is gathered in one bytearray, so its memory is its size
     (--max-size), not a Python object per fragment, and --max-fragments
     bounds the frames of one message: a stream of empty continuation
     frames is refused, not collected forever.
  4. Timers: the opening handshake must finish within --handshake-timeout
     of the accept (a client sending one byte a second is not "active", it
     is holding a connection); afterwards ``schedule_timer`` pings an idle
     client, drops one that never answers, and bounds how long a closing
     connection may linger.

Try it (the client comes with ``pip install websockets``)::

    python3 examples/websocket.py 127.0.0.1:8080
    python3 -m websockets ws://127.0.0.1:8080/     # type lines, they come back
    curl http://127.0.0.1:8080/                   # a plain GET gets a demo page

Options: ``--pollers N`` (threads), ``--ping-interval S`` (idle ping period,
seconds), ``--max-size BYTES`` (largest message accepted), ``--max-fragments N``
(most frames in one message), ``--handshake-timeout S`` (the opening handshake's
deadline, from the accept).
"""

import argparse
import base64
import codecs
import hashlib
import os
import signal
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import goev  # noqa: E402

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # fixed by RFC 6455, section 1.3
MAX_REQUEST = 16 * 1024          # a handshake larger than this is not a browser's
CLOSE_LINGER_MS = 5000           # how long we wait for the client's FIN after our close

# Opcodes (RFC 6455 5.2).  0-2 carry data, 8-10 are control frames.
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# Status codes a peer may legally send in a close frame (7.4.1; 1004-1006 and
# 1015 are reserved for local use and must never appear on the wire).
VALID_CLOSE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}

HANDSHAKE, OPEN, CLOSING = "handshake", "open", "closing"

DEMO_PAGE = b"""<!doctype html><meta charset=utf-8><title>goev websocket echo</title>
<input id=m value="hello"> <button onclick="ws.send(m.value)">send</button><pre id=log></pre>
<script>
const ws = new WebSocket("ws://" + location.host + "/");
ws.onmessage = e => log.textContent += "echo: " + e.data + "\\n";
ws.onclose = e => log.textContent += "closed " + e.code + "\\n";
</script>
"""


def encode_frame(opcode, payload=b""):
    """One unfragmented server frame.  Servers never mask (5.1), and the length
    uses the smallest of the three encodings that fits (5.2 requires minimal)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, n)        # 0x80 = FIN
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return header + payload


def unmask(data, key):
    """XOR ``data`` with the repeating 4-byte ``key``.  A byte-by-byte Python
    loop would cost a microsecond per byte; one big-integer XOR runs in C."""
    n = len(data)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


def http_response(status, body=b"", headers=()):
    lines = ["HTTP/1.1 %s" % status, "Content-Length: %d" % len(body), "Connection: close"]
    lines += list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ProtocolError(Exception):
    """Fail the connection with close ``code`` (RFC 6455 7.1.7)."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code


class WebSocket(goev.IOHandle):
    # Class attributes, set from the command line by main().
    ping_interval_ms = 30000
    handshake_timeout_ms = 10000
    max_size = 16 * 1024 * 1024
    max_fragments = 65536

    def on_open(self):
        self.state = HANDSHAKE
        self.accepted = time.monotonic()   # the handshake's deadline counts from here
        self.buf = bytearray()     # bytes received and not yet parsed
        self.msg_op = None         # opcode of the fragmented message in progress
        self.msg = None            # ... its payload so far (one bytearray: no per-fragment objects)
        self.frags = 0             # ... and how many frames it took
        self.utf8 = None           # incremental UTF-8 decoder of a fragmented text message
        self.heard = True          # bytes arrived since the last timer tick
        self.pinged = False        # our idle ping is unanswered
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        # on_open runs on the *acceptor's* poller thread; timers belong to the
        # handler's own poller, so hop there before scheduling.
        self.reactor.post_to(self, self.start_timer)
        return True

    def start_timer(self):
        """The handshake's deadline (the ping timer replaces it once the
        handshake is done -- which may already have happened: on_read can
        run before this posted call)."""
        if not self.closed and self.state == HANDSHAKE:
            elapsed_ms = (time.monotonic() - self.accepted) * 1000.0
            self.schedule_timer(max(0.0, self.handshake_timeout_ms - elapsed_ms))

    # -- reading ------------------------------------------------------------

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:                # the client went away (FIN or reset)
            return False
        self.heard = True
        if self.state == CLOSING:   # our close frame is out: discard until EOF
            return True
        self.buf += data            # copy: the view is the poller's shared buffer
        if self.state == HANDSHAKE:
            if not self.handshake():
                return False
            if self.state == HANDSHAKE:
                return True         # the request is not complete yet
        try:
            self.parse_frames()
        except ProtocolError as e:
            self.send_close(e.code, str(e))
        return True

    def handshake(self):
        """Answer the upgrade request once it is complete; False closes."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_REQUEST:
                self.write(http_response("431 Request Header Fields Too Large"))
                return False
            return True                              # wait for the rest
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[:end + 4]                       # what follows is frames: keep it
        request_line, *header_lines = head.split("\r\n")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self.write(http_response("400 Bad Request", b"bad request line\n"))
            return False
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                self.write(http_response("400 Bad Request", b"bad header line\n"))
                return False
            headers[name.strip().lower()] = value.strip()
        if parts[0] != "GET":
            self.write(http_response("405 Method Not Allowed", headers=["Allow: GET"]))
            return False
        # Connection and Upgrade are comma-separated token lists, any case
        # (Firefox sends "Connection: keep-alive, Upgrade").
        connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        upgrade = {t.strip().lower() for t in headers.get("upgrade", "").split(",")}
        if "upgrade" not in connection or "websocket" not in upgrade:
            self.write(http_response("200 OK", DEMO_PAGE, ["Content-Type: text/html; charset=utf-8"]))
            return False                             # a plain GET: serve the demo page
        if headers.get("sec-websocket-version") != "13":
            self.write(http_response("426 Upgrade Required", b"WebSocket version 13 only\n",
                                     ["Sec-WebSocket-Version: 13"]))
            return False
        key = headers.get("sec-websocket-key", "")
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            valid_key = False
        if not valid_key:
            self.write(http_response("400 Bad Request", b"bad Sec-WebSocket-Key\n"))
            return False
        # The proof: SHA-1 of the key (as sent, base64 text) + the GUID.  No
        # Sec-WebSocket-Extensions in the answer means no permessage-deflate:
        # the client then sends plain frames.
        accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest())
        self.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.state = OPEN
        self.schedule_timer(self.ping_interval_ms, self.ping_interval_ms)   # replaces the deadline
        return True

    def parse_frames(self):
        """Consume every complete frame in the buffer (5.2):

             0               1               2               3
            |F|R|R|R| opcode|M| len (7)     | extended len (16 or 64) ...
            |I|S|S|S|  (4)  |A|             |
            |N|V|V|V|       |S| masking key (4 bytes, client frames) | payload
        """
        buf = self.buf
        while self.state == OPEN and len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            fin, opcode, length = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            # Check the header before waiting for the payload: a bad frame
            # fails now, and a 10 GiB length is refused without buffering it.
            if b0 & 0x70:
                raise ProtocolError(1002, "reserved bits set (no extension was agreed)")
            if not b1 & 0x80:
                raise ProtocolError(1002, "client frames must be masked")
            if opcode >= 0x8:
                if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                    raise ProtocolError(1002, "unknown control opcode %d" % opcode)
                if not fin or length > 125:
                    raise ProtocolError(1002, "control frames are <= 125 bytes, never fragmented")
            elif opcode > OP_BINARY:
                raise ProtocolError(1002, "unknown data opcode %d" % opcode)
            pos = 2
            if length == 126:                       # 16-bit extended length
                if len(buf) < 4:
                    return
                length, pos = struct.unpack_from("!H", buf, 2)[0], 4
            elif length == 127:                     # 64-bit extended length
                if len(buf) < 10:
                    return
                length, pos = struct.unpack_from("!Q", buf, 2)[0], 10
                if length >> 63:
                    raise ProtocolError(1002, "64-bit length with the top bit set")
            if opcode < 0x8:
                # The limits, on what the message would hold with this frame:
                # its bytes, and its frames (an empty frame costs a loop pass).
                have = len(self.msg) if opcode == OP_CONT and self.msg is not None else 0
                if have + length > self.max_size:
                    raise ProtocolError(1009, "message larger than %d bytes" % self.max_size)
                if opcode == OP_CONT and self.frags >= self.max_fragments:
                    raise ProtocolError(1009, "message in more than %d frames" % self.max_fragments)
            end = pos + 4 + length
            if len(buf) < end:
                return                              # wait for the rest of the frame
            payload = unmask(bytes(buf[pos + 4:end]), bytes(buf[pos:pos + 4]))
            del buf[:end]                           # O(1) at the front of a bytearray
            if opcode >= 0x8:
                self.on_control(opcode, payload)    # may arrive between fragments
            else:
                self.on_frame(opcode, bool(fin), payload)

    def on_frame(self, opcode, fin, payload):
        """Reassemble fragments: TEXT/BINARY starts a message, CONT extends it.
        Text is validated as it comes, so bad text fails at the first bad
        fragment (Python's decoder rejects overlongs and surrogates, as 8.1
        wants)."""
        if opcode == OP_CONT:
            if self.msg_op is None:
                raise ProtocolError(1002, "continuation frame without a message")
        elif self.msg_op is not None:
            raise ProtocolError(1002, "new message before the last one finished")
        elif fin:                                   # the usual case: a message in one frame
            if opcode == OP_TEXT:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolError(1007, "text message is not valid UTF-8") from None
            self.on_message(opcode, payload)
            return
        else:                                       # the first fragment
            self.msg_op, self.msg, self.frags = opcode, bytearray(), 0
            self.utf8 = codecs.getincrementaldecoder("utf-8")() if opcode == OP_TEXT else None
        if self.utf8 is not None:
            try:
                self.utf8.decode(payload, fin)
            except UnicodeDecodeError:
                raise ProtocolError(1007, "text message is not valid UTF-8") from None
        self.msg += payload                         # checked against max_size in parse_frames
        self.frags += 1
        if fin:
            opcode, message = self.msg_op, self.msg
            self.msg_op, self.msg, self.frags, self.utf8 = None, None, 0, None
            self.on_message(opcode, message)

    def on_message(self, opcode, message):
        """A whole message (bytes, or a bytearray if it came in fragments):
        echo it with the same type (text stays text)."""
        self.write(encode_frame(opcode, message))

    def on_control(self, opcode, payload):
        if opcode == OP_PING:
            self.write(encode_frame(OP_PONG, payload))    # same payload (5.5.3)
        elif opcode == OP_PONG:
            self.pinged = False                           # the client is alive
        else:
            self.on_close_frame(payload)

    def on_close_frame(self, payload):
        """The client starts the close handshake: answer with its code (5.5.1)."""
        if not payload:
            self.send_close(None)              # no status code: reply with none
            return
        if len(payload) == 1:
            raise ProtocolError(1002, "close frame with a 1-byte payload")
        code = struct.unpack_from("!H", payload)[0]
        if code not in VALID_CLOSE and not 3000 <= code <= 4999:
            raise ProtocolError(1002, "invalid close code %d" % code)
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(1007, "close reason is not valid UTF-8") from None
        self.send_close(code)

    # -- closing and timers -------------------------------------------------

    def send_close(self, code, reason=""):
        """Send a close frame, then FIN.  The server closes TCP first (7.1.1),
        but keeps reading until the client's FIN: closing a socket with unread
        input makes Linux send RST, which can destroy our close frame before
        the client reads it.  A timer bounds the wait."""
        payload = b"" if code is None else struct.pack("!H", code) + reason.encode()[:123]
        self.write(encode_frame(OP_CLOSE, payload))
        self.state = CLOSING
        self.buf.clear()
        self.msg_op = self.msg = self.utf8 = None   # a message in progress is dropped
        self.shutdown_write()
        self.schedule_timer(CLOSE_LINGER_MS)   # replaces the ping timer

    def on_timeout(self, now_ms):
        if self.state == CLOSING:      # the client never closed its side
            self.abort()
            return False
        if self.state == HANDSHAKE:    # the deadline passed: bytes dripping in do not extend it
            self.write(http_response("408 Request Timeout", b"handshake timeout\n"))
            self.close()
            return False
        if self.heard:                 # traffic since the last tick: all is well
            self.heard = False
            return True
        if self.pinged:
            # Silent for a whole period after our ping: the peer is gone or stuck.
            self.send_close(1011, "keepalive ping timeout")
            return True                # send_close scheduled the linger timer
        self.write(encode_frame(OP_PING, b"goev-idle"))
        self.pinged = True
        return True


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 examples/websocket.py",
                                     description="RFC 6455 WebSocket echo server on goev")
    parser.add_argument("addr", metavar="ADDR", help='e.g. "127.0.0.1:8080" or ":8080" (every interface)')
    parser.add_argument("--pollers", type=int, default=1, metavar="N", help="poller threads (default 1)")
    parser.add_argument("--ping-interval", type=float, default=30.0, metavar="S",
                        help="ping a client idle this many seconds (default 30)")
    parser.add_argument("--max-size", type=int, default=16 * 1024 * 1024, metavar="BYTES",
                        help="largest message accepted; bigger ones get close 1009 (default 16 MiB)")
    parser.add_argument("--max-fragments", type=int, default=65536, metavar="N",
                        help="most frames in one message; more get close 1009 (default 65536)")
    parser.add_argument("--handshake-timeout", type=float, default=10.0, metavar="S",
                        help="the opening handshake must be done this many seconds after the "
                             "accept (default 10)")
    args = parser.parse_args(argv)
    if (args.pollers < 1 or not args.ping_interval > 0 or args.max_size < 1 or args.max_fragments < 1
            or not args.handshake_timeout > 0):          # (not x > 0 also refuses "nan")
        parser.error("--pollers, --ping-interval, --max-size, --max-fragments and "
                     "--handshake-timeout must be positive")
    WebSocket.ping_interval_ms = args.ping_interval * 1000
    WebSocket.handshake_timeout_ms = args.handshake_timeout * 1000
    WebSocket.max_size = args.max_size
    WebSocket.max_fragments = args.max_fragments
    reactor = goev.Reactor(args.pollers)
    try:
        acceptor = goev.Acceptor(reactor, args.addr, WebSocket)
    except (ValueError, OSError) as e:
        reactor.stop()
        print("websocket: cannot listen on %s: %s" % (args.addr, e), file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: reactor.stop())
    print("websocket echo on %s (%s, %d poller(s))" % (acceptor.address, reactor.backend, args.pollers),
          file=sys.stderr, flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
