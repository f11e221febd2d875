"""download.py -- serve one file over HTTP/1.1: streaming, throttling, backpressure, sendfile.

Lesson: how to send a large file without reading it into memory, without
letting a slow reader grow the server, and at a chosen rate.

  * Pull, don't push.  The handler arms EV_OUT and sends the next piece only
    when the socket is writable *and* its send queue is nearly empty
    (``pending_write_bytes`` below the low water mark).  A reader that stops
    reading therefore stops the server reading the file: memory stays flat,
    whether the client is ``curl --limit-rate 10k`` or has gone to sleep.
    (Writing the whole file with ``write()`` would also "work" -- by queueing
    all of it in RAM.)
  * Throttle with a timer.  With ``--rate`` each connection has a periodic
    timer (``schedule_timer``) that adds rate/ticks bytes of *budget* per tick;
    the writable socket may only spend the budget.  The timer and the I/O of a
    handler run on the same poller thread, so they share state without locks.
  * ``--sendfile`` lets the kernel copy file pages straight to the socket
    (``os.sendfile``): no bytes pass through Python at all.  It is only used
    when goev's queue is empty (the HTTP header may still be queued in front).
  * One file descriptor serves every connection: ``os.pread`` and
    ``os.sendfile`` take an explicit offset, so no shared file position moves.

Every GET (any path) returns FILE with a Content-Length, then the server
closes the connection once the last byte is flushed (``Connection: close``).

Try it:

    python3 examples/download.py 127.0.0.1:8080 /usr/bin/python3 --rate 100k
    curl -o /tmp/copy http://127.0.0.1:8080/          # about 100 KiB/s
    curl --limit-rate 10k -o /dev/null http://127.0.0.1:8080/   # a slow reader
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import goev  # noqa: E402  (imported from the repo root, see the line above)

CHUNK = 64 * 1024           # one pread / sendfile at most
PER_CALL = 1 << 20          # bytes per on_write call: one fast client cannot starve the others
HIGH_WATER = 64 * 1024      # goev's water marks for this handler (see set_write_buffer_limits)
LOW_WATER = 16 * 1024       # ... we add file data only while the queue is below this
TICK_MS = 50                # throttle granularity: 20 budget refills per second
MAX_REQUEST = 8192          # a request head larger than this is refused

FILE_FD = -1                # opened once in main()
RATE = 0                    # bytes per second per connection; 0 = unlimited
SENDFILE = False


class Download(goev.IOHandle):
    def __init__(self):
        self.head = b""             # request bytes until the blank line
        self.streaming = False
        self.offset = 0             # next file offset to send
        self.remaining = 0          # file bytes still to send
        self.budget = 0.0           # bytes we may send now (float: small rates accumulate)
        self.want_out = False       # we armed EV_OUT ourselves

    def on_open(self):
        self.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        return super().on_open()    # registers EV_IN

    # -- the request -----------------------------------------------------------------

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            # End of stream.  A client that half-closed after its request may
            # still be reading the answer: keep streaming.  A reset ends it.
            return self.streaming and self.error is None
        if self.streaming:
            return True             # Connection: close -- further requests are ignored
        self.head += bytes(data)
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_REQUEST:
                self.reply_error(b"431 Request Header Fields Too Large")
                return False
            return True
        parts = self.head[:end].split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self.reply_error(b"400 Bad Request")
            return False
        if parts[0] not in (b"GET", b"HEAD"):
            self.reply_error(b"405 Method Not Allowed")
            return False
        size = os.fstat(FILE_FD).st_size
        self.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                   b"Content-Length: %d\r\nConnection: close\r\n\r\n" % size)
        if parts[0] == b"HEAD" or size == 0:
            return False            # close after the header is flushed
        self.streaming = True
        self.remaining = size
        if RATE:
            self.schedule_timer(0, TICK_MS)         # first budget now, then every tick
        else:
            self.budget = float("inf")
            self.arm(True)
        return True

    def reply_error(self, status):
        self.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    # -- the body --------------------------------------------------------------------

    def arm(self, on):
        """Ask for (or stop asking for) EV_OUT.  Level-triggered: while armed and the
        socket is writable, on_write is called on every loop pass -- so disarm
        whenever there is nothing we may send, or the poller would spin."""
        if on != self.want_out and not self.closed:
            self.want_out = on
            (self.reactor.append_event if on else self.reactor.remove_event)(self.fd, goev.EV_OUT)

    def on_timeout(self, now_ms):
        if not self.streaming:
            return False                            # False stops the periodic timer
        per_tick = RATE * TICK_MS / 1000.0
        # Unused budget carries over for one tick at most: a reader that
        # stalled must not get a burst above the rate afterwards.
        self.budget = min(self.budget + per_tick, 2 * per_tick)
        if self.budget >= 1:
            self.arm(True)
        return True

    def on_write(self):
        if self.pending_write_bytes:
            super().on_write()      # flush goev's queue first: it is ahead of the file
        if self.streaming and not self.closed:
            self.send_file()
        return True

    def send_file(self):
        sent = 0
        while self.remaining and self.budget >= 1 and sent < PER_CALL:
            n = int(min(CHUNK, self.remaining, self.budget))
            if SENDFILE:
                if self.pending_write_bytes:        # the header is still queued
                    break
                try:
                    k = os.sendfile(self.fd, FILE_FD, self.offset, n)
                except BlockingIOError:             # socket buffer full: wait for EV_OUT
                    break
                except OSError as e:                # the peer is gone
                    self.error = e
                    self.abort()
                    return
            else:
                if self.pending_write_bytes >= LOW_WATER:
                    break                           # the kernel is full: EV_OUT flushes first
                chunk = os.pread(FILE_FD, n, self.offset)
                self.write(chunk)                   # queues what the kernel refuses
                if self.closed:                     # the write failed: peer gone
                    return
                k = len(chunk)
            if k == 0:                              # the file shrank under us
                self.abort()
                return
            self.offset += k
            self.remaining -= k
            self.budget -= k
            sent += k
        if not self.remaining:                      # all handed over: flush, then close
            self.streaming = False
            self.arm(False)
            self.cancel_timer()
            self.close()
        elif self.budget < 1:
            self.arm(False)                         # out of budget: the next tick re-arms


def parse_rate(text):
    """'100000', '100k', '2M' -> bytes per second (k and M are 1024-based, as curl's)."""
    mult = {"k": 1024, "m": 1024 * 1024}.get(text[-1:].lower(), 1)
    try:
        value = int(float(text[:-1] if mult > 1 else text) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError("rate must be a number of bytes per second, got %r" % text)
    if value < 0:
        raise argparse.ArgumentTypeError("rate must be >= 0, got %r" % text)
    return value


def where(address):
    """An Acceptor's address as ADDR is written: HOST:PORT, [V6]:PORT or unix:PATH."""
    if isinstance(address, str):                 # a unix path, or "@name" (abstract)
        return "unix:" + address
    host, port = address[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def main(argv=None):
    global FILE_FD, RATE, SENDFILE
    ap = argparse.ArgumentParser(prog="python3 examples/download.py",
                                 description="Serve FILE to every HTTP GET on ADDR.")
    ap.add_argument("addr", metavar="ADDR",
                    help='address to listen on, e.g. "127.0.0.1:8080" or ":8080" (every interface)')
    ap.add_argument("file", metavar="FILE", help="the file to serve")
    ap.add_argument("--rate", type=parse_rate, default=0, metavar="BYTES_PER_S",
                    help="per-connection rate limit, e.g. 100k (default: 0, unlimited)")
    ap.add_argument("--sendfile", action="store_true",
                    help="send with os.sendfile (zero copy) (default: off, read + write)")
    args = ap.parse_args(argv)
    try:
        FILE_FD = os.open(args.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        print("download: %s" % e, file=sys.stderr)
        return 2
    RATE, SENDFILE = args.rate, args.sendfile
    try:
        with goev.Reactor() as r:
            try:
                acceptor = goev.Acceptor(r, args.addr, Download)
            except (ValueError, OSError) as e:
                print("download: cannot listen on %s: %s" % (args.addr, e), file=sys.stderr)
                return 2
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: r.stop())
            print("download: listening on %s, serving %s (%d bytes)%s%s" % (
                where(acceptor.address), args.file, os.fstat(FILE_FD).st_size,
                " at %d B/s" % RATE if RATE else "", " with sendfile" if SENDFILE else ""),
                file=sys.stderr, flush=True)
            r.run()
    finally:
        os.close(FILE_FD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
