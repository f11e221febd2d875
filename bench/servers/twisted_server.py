"""Twisted echo / HTTP plaintext server, for the goev.py benchmark.

    python bench/servers/twisted_server.py echo|http 127.0.0.1:PORT

A `twisted.internet.protocol.Protocol` on the epoll reactor: the way a Twisted
user writes a raw TCP server.  The HTTP responder is the other servers'
one, common.py (count the `\\r\\n\\r\\n` terminators, answer each in order),
not twisted.web.  TCP_NODELAY on every connection, as asyncio sets it.
SIGINT/SIGTERM exit 0 (Twisted's own handlers stop the reactor).
"""
import os
import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import protocol, reactor  # noqa: E402  (after install())

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py's folder, also under PYTHONSAFEPATH
from common import http_answerer, parse_args  # noqa: E402

answer = http_answerer("twisted")


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
        reply, buf = answer(self.buf + data if self.buf else data)
        if reply:
            self.transport.write(reply)  # one answer per request, in order
        if len(buf) > 65536:
            self.transport.loseConnection()
            return
        self.buf = buf


def main(argv=None):
    kind, host, port = parse_args(argv, "twisted_server.py")
    factory = protocol.Factory.forProtocol(Echo if kind == "echo" else Http)
    reactor.listenTCP(port, factory, backlog=1024, interface=host)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
