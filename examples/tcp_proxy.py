"""tcp_proxy.py -- a TCP relay: Acceptor + Connector, half-close, backpressure both ways.

Lesson: a proxy is two handlers joined at the hip.  For every client the
Acceptor hands us, a Connector opens a connection to UPSTREAM, and from then
on whatever one side reads, the other side writes.  Three things make it a
*correct* proxy rather than a toy:

  1. Half-close is relayed.  When the client says "I am done sending" (FIN,
     e.g. ``shutdown(SHUT_WR)``), upstream must see EOF too -- but only after
     every byte before it was delivered -- while the answer keeps flowing back.
     The pair closes once both directions have ended.
  2. Backpressure in both directions.  goev stops reading a handler whose own
     send queue is above its high water mark, but in a proxy the queue that
     fills up belongs to the *other* handler: a slow client fills the client
     handler's queue with bytes read by the upstream handler.  So the writer
     side tells its peer "hold" (stop polling for EV_IN) above the high mark
     and "release" when its queue drains (``on_write_drained``).  Memory stays
     bounded however fast one side sends and however slowly the other reads.
  3. The two halves may live on different pollers (each handler sits on
     poller[fd % N]), i.e. on different threads.  A handler's state is only
     touched on its own poller's thread, so every message to the peer goes
     through ``Reactor.post_to`` unless both happen to share a poller.  Then
     "hold" arrives late -- after the peer ran everything we posted -- so the
     reader also counts the bytes it has in flight and stops itself above the
     mark until the peer acknowledges them (credit-based flow control).

Data the client sends before the upstream connection is up is buffered (and
bounded the same way); a failed upstream connect closes the client.

Try it (e.g. in front of a web server or redis):

    python3 -m http.server --bind 127.0.0.1 8000 &
    python3 examples/tcp_proxy.py 127.0.0.1:8080 127.0.0.1:8000
    curl -v http://127.0.0.1:8080/
    redis-cli -p 8080 PING              # with: tcp_proxy.py 127.0.0.1:8080 127.0.0.1:6379
"""

import argparse
import os
import signal
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import goev  # noqa: E402  (imported from the repo root, see the line above)

HIGH_WATER = 256 * 1024       # above this many queued bytes the *peer* stops reading
LOW_WATER = 64 * 1024         # goev resumes the handler's own reading below this
CONNECT_TIMEOUT_MS = 5000


class Side(goev.IOHandle):
    """One end of a relayed pair.  Every method runs on this handler's poller thread."""

    def __init__(self):
        self.other = None          # the Side at the other end
        self.held = False          # the peer asked us to stop reading (its queue is full)
        self.holding = False       # we asked the peer to stop reading
        self.unacked = 0           # bytes posted to the peer that it has not queued yet
        self.self_held = False     # we stopped reading: too much of our data in flight
        self.got_eof = False       # our socket said "no more data"
        self.wr_shut = False       # we relayed the peer's EOF (sent our FIN)

    def setup(self):
        """Register for reading; the water marks are per handler."""
        self.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        self.reactor.add_handler(self, self.fd, goev.EV_IN)

    # -- talking to the peer -----------------------------------------------------------

    def tell(self, fn, *args):
        """Run ``fn`` (a method of the peer) on the peer's thread: directly when both
        share a poller, else through its inbox (FIFO, so messages keep their order)."""
        if self.other.poller is self.poller:
            fn(*args)
        else:
            self.reactor.post_to(self.other, fn, *args)

    def relay(self, data):
        """Peer read ``data``: send it out of our socket."""
        self.write(data)
        if self.other.poller is not self.poller:
            self.tell(self.other.ack, len(data))    # credit back: it is in our queue now
        if self.pending_write_bytes > HIGH_WATER and not self.holding:
            self.holding = True                     # our queue is full: peer, stop reading
            self.tell(self.other.hold)

    def on_write_drained(self):
        if self.holding:                            # queue empty again: peer, carry on
            self.holding = False
            self.tell(self.other.release)

    def hold(self):
        self.held = True
        if not self.closed:
            # EV_IN off: the kernel's receive buffer fills and TCP flow control
            # slows the sender down -- the backpressure travels end to end.
            self.reactor.remove_event(self.fd, goev.EV_IN)

    def release(self):
        self.held = False
        if not self.closed and not self.self_held:
            self.reactor.append_event(self.fd, goev.EV_IN)

    def ack(self, n):
        """The peer (on another poller) queued ``n`` of the bytes we posted it."""
        self.unacked -= n
        if self.self_held and self.unacked <= LOW_WATER:
            self.self_held = False
            if not self.held and not self.closed:
                self.reactor.append_event(self.fd, goev.EV_IN)

    def relay_eof(self):
        """Peer reached end of stream: send FIN after our queue is flushed."""
        self.wr_shut = True
        self.shutdown_write()
        self.maybe_close()

    def maybe_close(self):
        # Both directions ended: close (close() still flushes what is queued).
        if self.got_eof and self.wr_shut:
            self.close()

    # -- our own socket ----------------------------------------------------------------

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if data:
            self.forward(bytes(data))               # copy: the view is the poller's buffer
            return True
        if self.error is not None:                  # reset, not a FIN: nothing to relay
            return False                            # on_close aborts the peer
        self.got_eof = True                         # read() stopped polling EV_IN for us
        self.forward_eof()
        self.maybe_close()
        return True

    def forward(self, data):
        if self.other.poller is not self.poller:
            # Across pollers the peer's "hold" arrives only after it ran our
            # posts: meanwhile we could read and post without bound.  So count
            # what is in flight and stop reading ourselves above the mark
            # (credit-based flow control; the peer acks what it has queued).
            self.unacked += len(data)
            if self.unacked > HIGH_WATER and not self.self_held:
                self.self_held = True
                self.reactor.remove_event(self.fd, goev.EV_IN)
        self.tell(self.other.relay, data)

    def forward_eof(self):
        self.tell(self.other.relay_eof)

    def on_close(self):
        """Runs once, however we closed.  Make sure the peer does not outlive us:
        after an error (reset, broken pipe) it is aborted (its data cannot be
        answered), otherwise it is closed after its queue is flushed."""
        self.destroy()
        other = self.other
        if other is not None and other.poller is not None:
            # Through tell(), never a direct cross-thread close(): while the
            # reactor stops, each poller closes its own handlers on its own thread.
            self.tell(other.abort if self.error is not None else other.close)


class Upstream(Side):
    """Our connection to UPSTREAM, made by the Connector for one Client."""

    def __init__(self, client):
        super().__init__()
        self.other = client

    def on_open(self):
        # Runs on the poller that completed the connect (this handler's poller).
        self.setup()
        self.tell(self.other.upstream_ready)
        return True

    def on_connect_fail(self, err):
        print("tcp_proxy: upstream connect failed: %s" % (err,), file=sys.stderr, flush=True)
        self.reactor.post_to(self.other, self.other.close)     # on the client's thread


class Client(Side):
    """An accepted client connection; it starts its Upstream in on_open."""

    def __init__(self):
        super().__init__()
        self.early = []           # bytes read before upstream is connected
        self.early_bytes = 0
        self.early_eof = False
        self.ready = False

    def on_open(self):
        # on_open runs on the acceptor's thread; once setup() registers us, our
        # callbacks may already run on our own poller's thread.  So every field
        # is set first, and only then are we registered and the connect started.
        self.other = Upstream(self)
        self.setup()
        CONNECTOR.connect(UPSTREAM, self.other, CONNECT_TIMEOUT_MS)
        return True

    def forward(self, data):
        if self.ready:
            return super().forward(data)
        self.early.append(data)                     # upstream not connected yet: keep it
        self.early_bytes += len(data)
        if self.early_bytes > HIGH_WATER and not self.held:
            self.hold()                             # ... but not without bound

    def forward_eof(self):
        if self.ready:
            return super().forward_eof()
        self.early_eof = True

    def upstream_ready(self):
        """The Upstream is connected (posted to our thread by Upstream.on_open)."""
        up = self.other
        if self.closed:                             # the client left while we connected
            self.tell(up.close)
            return
        self.ready = True
        if self.held:               # the early-buffer hold ends here (before relaying it,
            self.release()          # so a hold the relay provokes is not undone)
        for data in self.early:                     # in order, ahead of anything newer
            super().forward(data)
        self.early = None
        if self.early_eof:
            super().forward_eof()

    def on_close(self):
        if self.ready:                              # no Upstream yet: upstream_ready or
            super().on_close()                      # on_connect_fail will close it
        else:
            self.destroy()


UPSTREAM = None
CONNECTOR = None


def where(address):
    """An Acceptor's address as ADDR is written: HOST:PORT, [V6]:PORT or unix:PATH."""
    if isinstance(address, str):                 # a unix path, or "@name" (abstract)
        return "unix:" + address
    host, port = address[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def main(argv=None):
    global UPSTREAM, CONNECTOR
    ap = argparse.ArgumentParser(prog="python3 examples/tcp_proxy.py",
                                 description="TCP proxy: relay LISTEN <-> UPSTREAM.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("listen", metavar="LISTEN",
                    help='address to listen on, e.g. "127.0.0.1:8080" or ":8080" (every interface)')
    ap.add_argument("upstream", metavar="UPSTREAM", help='address to relay to, e.g. "127.0.0.1:6379"')
    ap.add_argument("--pollers", type=int, default=1, metavar="N", help="poller threads")
    args = ap.parse_args(argv)
    if args.pollers < 1:
        ap.error("--pollers must be positive")
    # Resolve UPSTREAM once, now: a malformed address fails at start, and
    # connect() never has to look a host name up on a poller thread (blocking it).
    try:
        family, sockaddr = goev.parse_address(args.upstream)
    except (ValueError, OSError) as e:
        print("tcp_proxy: bad UPSTREAM %r: %s" % (args.upstream, e), file=sys.stderr)
        return 2
    UPSTREAM = args.upstream if family == socket.AF_UNIX else sockaddr
    with goev.Reactor(args.pollers) as r:
        CONNECTOR = goev.Connector(r)
        try:
            acceptor = goev.Acceptor(r, args.listen, Client)
        except (ValueError, OSError) as e:
            print("tcp_proxy: cannot listen on %s: %s" % (args.listen, e), file=sys.stderr)
            return 2
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: r.stop())
        print("tcp_proxy: listening on %s -> %s" % (where(acceptor.address), args.upstream),
              file=sys.stderr, flush=True)
        r.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
