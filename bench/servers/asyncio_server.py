"""asyncio Protocol echo / HTTP plaintext server, for the goev.py benchmark.

    python bench/servers/asyncio_server.py [--uvloop] echo|http 127.0.0.1:PORT

Plain asyncio.Protocol callbacks (no streams), the fastest way to write an
asyncio server. With --uvloop the same code runs on uvloop's event loop.
SIGINT/SIGTERM exit 0.
"""
import argparse
import asyncio
import signal
import socket
import sys
import time
from email.utils import formatdate

_date = [0, b""]


def http_response():
    now = int(time.time())
    if now != _date[0]:
        _date[0] = now
        _date[1] = (
            b"HTTP/1.1 200 OK\r\nServer: asyncio\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 13\r\nDate: "
            + formatdate(now, usegmt=True).encode()
            + b"\r\n\r\nHello, World!"
        )
    return _date[1]


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class Http(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        n = buf.count(b"\r\n\r\n")
        if n:
            self.transport.write(http_response() * n)  # one answer per request, in order
            buf = buf[buf.rfind(b"\r\n\r\n") + 4:]
        if len(buf) > 65536:
            self.transport.close()
            return
        self.buf = buf


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("kind", choices=["echo", "http"])
    ap.add_argument("addr")
    a = ap.parse_args(argv)
    host, _, port = a.addr.rpartition(":")
    if a.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    proto = Echo if a.kind == "echo" else Http
    server = loop.run_until_complete(
        loop.create_server(proto, host or "0.0.0.0", int(port), backlog=1024, reuse_address=True)
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
