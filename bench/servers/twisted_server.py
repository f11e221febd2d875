"""Twisted echo / HTTP plaintext server, for the goev.py benchmark.

    python bench/servers/twisted_server.py echo|http 127.0.0.1:PORT

A `twisted.internet.protocol.Protocol` on the epoll reactor: the way a Twisted
user writes a raw TCP server.  The HTTP responder is the one of
asyncio_server.py (count the `\\r\\n\\r\\n` terminators, answer each in order),
not twisted.web.  TCP_NODELAY on every connection, as asyncio sets it.
SIGINT/SIGTERM exit 0 (Twisted's own handlers stop the reactor).
"""
import sys
import time
from email.utils import formatdate

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import protocol, reactor  # noqa: E402  (after install())

_date = [0, b""]


def http_response():
    now = int(time.time())
    if now != _date[0]:
        _date[0] = now
        _date[1] = (
            b"HTTP/1.1 200 OK\r\nServer: twisted\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 13\r\nDate: "
            + formatdate(now, usegmt=True).encode()
            + b"\r\n\r\nHello, World!"
        )
    return _date[1]


class Echo(protocol.Protocol):
    def connectionMade(self):
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data):
        self.transport.write(data)


class Http(protocol.Protocol):
    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.buf = b""

    def dataReceived(self, data):
        buf = self.buf + data if self.buf else data
        n = buf.count(b"\r\n\r\n")
        if n:
            self.transport.write(http_response() * n)  # one answer per request, in order
            buf = buf[buf.rfind(b"\r\n\r\n") + 4:]
        if len(buf) > 65536:
            self.transport.loseConnection()
            return
        self.buf = buf


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("echo", "http"):
        print("usage: twisted_server.py echo|http HOST:PORT", file=sys.stderr)
        return 2
    host, _, port = argv[1].rpartition(":")
    factory = protocol.Factory.forProtocol(Echo if argv[0] == "echo" else Http)
    reactor.listenTCP(int(port), factory, backlog=1024, interface=host or "0.0.0.0")
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
