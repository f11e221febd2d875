"""echo.py -- the smallest goev server: everything you type comes back.

Lesson: a goev server is one IOHandle subclass (what to do when a socket is
readable) plus an Acceptor (who builds one per connection) plus a Reactor
(the loop that calls them).  This is the 10-line server of goev.py's module
docstring, with an address argument and a clean stop on Ctrl-C / SIGTERM.

Try it:

    python3 examples/echo.py 127.0.0.1:8080
    socat - TCP:127.0.0.1:8080          # or:  nc 127.0.0.1 8080

    python3 examples/echo.py unix:/tmp/echo.sock
    socat - UNIX-CONNECT:/tmp/echo.sock

An address that cannot be listened on (in use, malformed) prints one line
and exits with status 2.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import goev  # noqa: E402  (imported from the repo root, see the line above)


class Echo(goev.IOHandle):
    def on_data(self, data):        # bytes arrived: a memoryview of the poller's buffer
        self.write(data)            # never blocks; at end of stream on_eof() closes


def where(address):
    """An Acceptor's address as ADDR is written: HOST:PORT, [V6]:PORT or unix:PATH."""
    if isinstance(address, str):                 # a unix path, or "@name" (abstract)
        return "unix:" + address
    host, port = address[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def main(argv):
    ap = argparse.ArgumentParser(prog="python3 examples/echo.py",
                                 description="A TCP (or unix socket) echo server on goev.")
    ap.add_argument("addr", metavar="ADDR",
                    help='"127.0.0.1:8080", ":8080" (every interface), "[::1]:8080" or "unix:/path"')
    args = ap.parse_args(argv)
    with goev.Reactor() as r:
        try:
            acceptor = goev.Acceptor(r, args.addr, Echo)
        except (ValueError, OSError) as e:
            print("echo: cannot listen on %s: %s" % (args.addr, e), file=sys.stderr)
            return 2
        # stop() is safe from a signal handler: the loop ends, run() returns,
        # and leaving the with-block closes every socket.  Exit code 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: r.stop())
        print("echo: listening on %s" % where(acceptor.address), file=sys.stderr, flush=True)
        r.run()                         # until r.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
