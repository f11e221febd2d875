"""asyncio Protocol echo / HTTP plaintext server, for the goev.py benchmark.

    python bench/servers/asyncio_server.py [--uvloop] echo|http 127.0.0.1:PORT

Plain asyncio.Protocol callbacks (no streams), the fastest way to write an
asyncio server. With --uvloop the same code runs on uvloop's event loop.
SIGINT/SIGTERM exit 0.
"""
import asyncio
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py's folder, also under PYTHONSAFEPATH
from common import http_answerer, parse_args  # noqa: E402

answer = http_answerer("asyncio")


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
        reply, buf = answer(self.buf + data if self.buf else data)
        if reply:
            self.transport.write(reply)  # one answer per request, in order
        if len(buf) > 65536:
            self.transport.close()
            return
        self.buf = buf


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    use_uvloop = "--uvloop" in argv
    if use_uvloop:
        argv.remove("--uvloop")
    kind, host, port = parse_args(argv, "asyncio_server.py [--uvloop]")
    if use_uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    proto = Echo if kind == "echo" else Http
    server = loop.run_until_complete(
        loop.create_server(proto, host, port, backlog=1024, reuse_address=True)
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
