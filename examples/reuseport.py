"""reuseport.py -- one listening socket per poller, and the kernel shares the work.

The lesson: SO_REUSEPORT lets several sockets listen on the same port; Linux
hashes each new connection to one of them.  Give every poller its own
listener (``Acceptor(..., reuse_port=True, poller=i)``) and accepting scales
with the pollers instead of funnelling through one accept queue.  This is the
Go goev REUSEPORT example, with each listener pinned to its poller instead of
left to ``fd % N`` chance.  The same trick across *processes* is what
``goev.serve(workers=N)`` does to use every core.

Try it:
    python3 examples/reuseport.py 127.0.0.1:8080 --pollers 4
    for i in $(seq 20); do echo hi | socat - TCP:127.0.0.1:8080; done
    # or: wrk -t2 -c50 -d5s http://127.0.0.1:8080/   (answers HTTP too)
Ctrl-C prints how many connections each poller accepted.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import goev  # noqa: E402

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\n"
            b"Hello, World!")


class Hello(goev.IOHandle):
    """Answers each read: HTTP requests get "Hello, World!", anything else is echoed."""

    def on_open(self):
        # on_open runs on the thread of the poller whose listener accepted.  Keep
        # the connection on that same poller (instead of fd % N): the kernel's
        # spreading of connections over listeners then spreads the work too.
        here = self.reactor.current_poller()
        here.cache["accepted"] = here.cache.get("accepted", 0) + 1   # no lock: our own poller
        self.reactor.add_handler(self, self.fd, goev.EV_IN, poller=here.index)
        return True

    def on_data(self, data):
        if bytes(data[:4]) in (b"GET ", b"HEAD"):
            self.write(RESPONSE * max(1, bytes(data).count(b"\r\n\r\n")))
        else:
            self.write(data)


def main():
    ap = argparse.ArgumentParser(prog="python3 examples/reuseport.py",
                                 description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("addr", metavar="ADDR", nargs="?", default="127.0.0.1:8080",
                    help='address to listen on (TCP: SO_REUSEPORT); ":8080" is every interface')
    ap.add_argument("--pollers", type=int, default=2, metavar="N",
                    help="pollers, each with its own listener")
    args = ap.parse_args()
    if args.pollers < 1:
        ap.error("--pollers must be positive")
    reactor = goev.Reactor(args.pollers)
    try:
        first = goev.Acceptor(reactor, args.addr, Hello, reuse_port=True, poller=0)
        host, port = first.address[:2]
        # The other listeners join the port the first one got (port 0 works too).
        for i in range(1, args.pollers):
            goev.Acceptor(reactor, (host, port), Hello, reuse_port=True, poller=i)
    except (OSError, ValueError) as e:
        reactor.stop()
        print("reuseport: cannot listen on %s: %s" % (args.addr, e), file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: reactor.stop())
    print("reuseport: %d listeners on %s:%d" % (args.pollers, host, port), file=sys.stderr, flush=True)
    counts = [p.cache for p in reactor.pollers]
    reactor.run()
    for i, cache in enumerate(counts):
        print("poller %d accepted %d connections" % (i, cache.get("accepted", 0)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
