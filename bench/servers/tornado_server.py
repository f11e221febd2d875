"""tornado echo / HTTP plaintext server, for the goev.py benchmark.

    python bench/servers/tornado_server.py echo|http 127.0.0.1:PORT

A `tornado.tcpserver.TCPServer` whose `handle_stream` coroutine reads the
`IOStream` (`read_bytes(65536, partial=True)`) and awaits its writes: the way
a tornado user writes a raw TCP server.  tornado runs on the asyncio loop.
The HTTP responder is the one of asyncio_server.py (count the `\\r\\n\\r\\n`
terminators, answer each in order), not tornado.web.  TCP_NODELAY on every
connection.  SIGINT/SIGTERM exit 0.
"""
import asyncio
import signal
import sys
import time
from email.utils import formatdate

from tornado.iostream import StreamClosedError
from tornado.tcpserver import TCPServer

_date = [0, b""]


def http_response():
    now = int(time.time())
    if now != _date[0]:
        _date[0] = now
        _date[1] = (
            b"HTTP/1.1 200 OK\r\nServer: tornado\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 13\r\nDate: "
            + formatdate(now, usegmt=True).encode()
            + b"\r\n\r\nHello, World!"
        )
    return _date[1]


class Echo(TCPServer):
    async def handle_stream(self, stream, address):
        stream.set_nodelay(True)
        try:
            while True:
                data = await stream.read_bytes(65536, partial=True)
                await stream.write(data)
        except StreamClosedError:
            pass


class Http(TCPServer):
    async def handle_stream(self, stream, address):
        stream.set_nodelay(True)
        pending = b""
        try:
            while True:
                data = await stream.read_bytes(65536, partial=True)
                buf = pending + data if pending else data
                n = buf.count(b"\r\n\r\n")
                if n:
                    await stream.write(http_response() * n)  # one answer per request, in order
                    buf = buf[buf.rfind(b"\r\n\r\n") + 4:]
                if len(buf) > 65536:
                    stream.close()
                    return
                pending = buf
        except StreamClosedError:
            pass


async def serve(kind, host, port):
    server = (Echo if kind == "echo" else Http)()
    server.listen(port, address=host or "0.0.0.0", backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("echo", "http"):
        print("usage: tornado_server.py echo|http HOST:PORT", file=sys.stderr)
        return 2
    host, _, port = argv[1].rpartition(":")
    asyncio.run(serve(argv[0], host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
