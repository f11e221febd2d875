"""tornado echo / HTTP plaintext server, for the goev.py benchmark.

    python bench/servers/tornado_server.py echo|http 127.0.0.1:PORT

A `tornado.tcpserver.TCPServer` whose `handle_stream` coroutine reads the
`IOStream` (`read_bytes(65536, partial=True)`) and awaits its writes: the way
a tornado user writes a raw TCP server.  tornado runs on the asyncio loop.
The HTTP responder is the other servers' one, common.py (count the
`\\r\\n\\r\\n` terminators, answer each in order), not tornado.web.
TCP_NODELAY on every connection.  SIGINT/SIGTERM exit 0.
"""
import asyncio
import os
import signal
import sys

from tornado.iostream import StreamClosedError
from tornado.tcpserver import TCPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py's folder, also under PYTHONSAFEPATH
from common import http_answerer, parse_args  # noqa: E402

answer = http_answerer("tornado")


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
                reply, buf = answer(pending + data if pending else data)
                if reply:
                    await stream.write(reply)  # one answer per request, in order
                if len(buf) > 65536:
                    stream.close()
                    return
                pending = buf
        except StreamClosedError:
            pass


async def serve(kind, host, port):
    server = (Echo if kind == "echo" else Http)()
    server.listen(port, address=host, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()


def main(argv=None):
    asyncio.run(serve(*parse_args(argv, "tornado_server.py")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
