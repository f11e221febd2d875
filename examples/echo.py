"""echo.py -- the smallest goev server: everything you type comes back.

Lesson: a goev server is one IOHandle subclass (what to do when a socket is
readable) plus an Acceptor (who builds one per connection) plus a Reactor
(the loop that calls them).  This is the 10-line server of goev.py's module
docstring, with an address argument and a clean stop on Ctrl-C / SIGTERM.

Try it:

    python examples/echo.py 127.0.0.1:8080
    socat - TCP:127.0.0.1:8080          # or:  nc 127.0.0.1 8080
"""

import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import goev  # noqa: E402  (imported from the repo root, see the line above)


class Echo(goev.IOHandle):
    def on_read(self):
        data = self.read()          # memoryview of the poller's buffer
        if data is None:            # spurious wake-up: nothing to read
            return True
        self.write(data)            # empty data (end of stream) too
        return bool(data)           # False closes (after the flush)


def main(argv):
    if len(argv) != 1:
        print("usage: python examples/echo.py ADDR   (e.g. 127.0.0.1:8080)", file=sys.stderr)
        return 2
    with goev.Reactor() as r:
        acceptor = goev.Acceptor(r, argv[0], Echo)
        # stop() is safe from a signal handler: the loop ends, run() returns,
        # and leaving the with-block closes every socket.  Exit code 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: r.stop())
        host, port = acceptor.address[:2]
        print("echo: listening on %s:%d" % (host, port), file=sys.stderr, flush=True)
        r.run()                         # until r.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
