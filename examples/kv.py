"""kv.py -- a small Redis-compatible key/value server (RESP2) on goev.

What it teaches:

  1. An incremental, pipelining protocol parser: one read may hold half a
     command or a hundred of them.  Every complete command in the buffer is
     executed, the replies are joined and sent with one write, in order.
  2. Who owns the data.  The dict lives on ONE poller thread (poller 0) and
     only that thread touches it, so there are no locks.  With --pollers N,
     a connection on another poller hands its parsed commands to poller 0
     with ``reactor.call_later(0, ...)`` (safe from any thread, FIFO for one
     sender); poller 0 runs them and answers with ``write()``, which goev
     routes back to the connection's own poller (``async_write``) in order.
     With the default --pollers 1 everything runs on one thread, directly.
  3. Expiry on the timer heap: ``SET k v EX 10`` schedules
     ``poller.call_later(10, expire, k)`` and keeps the Timer, so a later SET,
     DEL or FLUSHALL cancels it.  Reads also check the deadline ("passive"
     expiry, as Redis does), so a key never outlives its TTL by a loop pass.

Commands: PING [msg], ECHO, SET key value [EX s|PX ms] [NX|XX], GET, DEL,
EXISTS, INCR, EXPIRE, TTL, DBSIZE, FLUSHALL, INFO, COMMAND, CONFIG GET, QUIT.
Both wire forms work: RESP arrays (what clients send) and inline commands
(``PING`` typed into telnet or nc).

Try it::

    python examples/kv.py 127.0.0.1:6380
    redis-cli -p 6380 set greeting hello ex 60     # then: get greeting / ttl greeting
    redis-benchmark -p 6380 -t set,get -P 16 -n 20000 -q
    printf 'PING\\r\\n' | nc -q1 127.0.0.1 6380     # an inline command
"""

import argparse
import os
import re
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import goev  # noqa: E402

MAX_BULK = 16 * 1024 * 1024      # largest bulk string (Redis: 512 MB; ours is a small server)
MAX_ARGS = 1024 * 1024           # largest multibulk count
MAX_INLINE = 64 * 1024           # longest inline command / header line without a newline

OK, PONG, NIL = b"+OK\r\n", b"+PONG\r\n", b"$-1\r\n"
_INT = re.compile(rb"-?(0|[1-9][0-9]*)\Z")     # Redis accepts no "+", spaces or "1_0"


def parse_int(s):
    """A strict 64-bit signed integer, or None."""
    if len(s) > 20 or not _INT.match(s):
        return None
    v = int(s)
    return v if -2**63 <= v < 2**63 else None


def bulk(b):
    return b"$%d\r\n%s\r\n" % (len(b), b)


def integer(n):
    return b":%d\r\n" % n


def error(msg):
    return b"-ERR %s\r\n" % msg.encode()


# =============================================================================
# The wire format: RESP2 requests  (*<n>\r\n  then n times  $<len>\r\n<bytes>\r\n)
# =============================================================================

class ProtocolError(Exception):
    pass


def parse_commands(buf):
    """Remove every complete command from ``buf`` (a bytearray) and return them
    as lists of bytes.  An incomplete tail stays in ``buf`` for the next read.
    Raises ProtocolError (after the commands before it were taken) on garbage;
    the commands parsed so far travel on the exception as ``.commands``."""
    cmds = []
    pos, n = 0, len(buf)
    try:
        while pos < n:
            if buf[pos] == 0x2A:                              # "*": a RESP array
                eol = buf.find(b"\r\n", pos, pos + MAX_INLINE)
                if eol < 0:
                    if n - pos >= MAX_INLINE:
                        raise ProtocolError("too big mbulk count string")
                    break
                count = parse_int(bytes(buf[pos + 1:eol]))
                if count is None or count > MAX_ARGS:
                    raise ProtocolError("invalid multibulk length")
                p, args = eol + 2, []
                while len(args) < count:
                    if p >= n:
                        break
                    if buf[p] != 0x24:                        # "$"
                        raise ProtocolError("expected '$', got '%s'" % chr(buf[p]))
                    eol = buf.find(b"\r\n", p, p + MAX_INLINE)
                    if eol < 0:
                        if n - p >= MAX_INLINE:
                            raise ProtocolError("too big bulk count string")
                        break
                    size = parse_int(bytes(buf[p + 1:eol]))
                    if size is None or not 0 <= size <= MAX_BULK:
                        raise ProtocolError("invalid bulk length")
                    start = eol + 2
                    if start + size + 2 > n:
                        break                                 # the payload is not all here
                    if buf[start + size:start + size + 2] != b"\r\n":
                        raise ProtocolError("bulk string not terminated by CRLF")
                    args.append(bytes(buf[start:start + size]))
                    p = start + size + 2
                if len(args) < count:
                    break                                     # wait for the rest
                pos = p
                if args:                                      # "*0" / "*-1" are no-ops
                    cmds.append(args)
            else:                                             # an inline command line
                eol = buf.find(b"\n", pos, pos + MAX_INLINE)
                if eol < 0:
                    if n - pos >= MAX_INLINE:
                        raise ProtocolError("too big inline request")
                    break
                args = bytes(buf[pos:eol]).split()            # whitespace-split (no quoting); drops the "\r"
                pos = eol + 1
                if args:
                    cmds.append(args)
    except ProtocolError as e:
        e.commands = cmds
        raise
    finally:
        del buf[:pos]
    return cmds


# =============================================================================
# The data and the commands (poller 0's thread only)
# =============================================================================

class Store:
    """The key space.  Every method runs on ``self.poller``'s thread."""

    def __init__(self, poller):
        self.poller = poller
        self.data = {}          # key -> bytes
        self.expiry = {}        # key -> goev.Timer; Timer.when is the monotonic deadline

    def get(self, key):
        """The value, or None; an expired key is deleted on sight."""
        t = self.expiry.get(key)
        if t is not None and t.when <= time.monotonic():
            self.delete(key)
            return None
        return self.data.get(key)

    def set(self, key, value, ttl_s=None):
        self.persist(key)
        self.data[key] = value
        if ttl_s is not None:
            # The timer heap does the work: no scanning, no sleeping thread.
            self.expiry[key] = self.poller.call_later(ttl_s, self.expire, key)

    def expire(self, key):
        self.expiry.pop(key, None)
        self.data.pop(key, None)

    def persist(self, key):
        t = self.expiry.pop(key, None)
        if t is not None:
            t.cancel()

    def delete(self, key):
        self.persist(key)
        return self.data.pop(key, None) is not None

    def flush(self):
        for t in self.expiry.values():
            t.cancel()
        self.expiry.clear()
        self.data.clear()


def cmd_ping(db, args):
    return PONG if len(args) == 1 else bulk(args[1])


def cmd_echo(db, args):
    return bulk(args[1])


def cmd_set(db, args):
    key, value, ttl, cond = args[1], args[2], None, None
    opts = [a.upper() for a in args[3:]]
    i = 0
    while i < len(opts):
        o = opts[i]
        if o in (b"NX", b"XX") and cond is None:
            cond = o
        elif o in (b"EX", b"PX") and ttl is None and i + 1 < len(opts):
            i += 1
            n = parse_int(args[3 + i])
            if n is None:
                return error("value is not an integer or out of range")
            if n <= 0:
                return error("invalid expire time in 'set' command")
            ttl = n if o == b"EX" else n / 1000.0
        else:
            return error("syntax error")
        i += 1
    exists = db.get(key) is not None
    if cond == b"NX" and exists or cond == b"XX" and not exists:
        return NIL                                  # the condition failed: nothing set
    db.set(key, value, ttl)
    return OK


def cmd_get(db, args):
    v = db.get(args[1])
    return NIL if v is None else bulk(v)


def cmd_del(db, args):
    return integer(sum(db.delete(k) for k in args[1:]))


def cmd_exists(db, args):
    return integer(sum(db.get(k) is not None for k in args[1:]))   # repeats count twice, as in Redis


def cmd_incr(db, args):
    key = args[1]
    old = db.get(key)
    n = 0 if old is None else parse_int(old)
    if n is None:
        return error("value is not an integer or out of range")
    if n == 2**63 - 1:
        return error("increment or decrement would overflow")
    db.data[key] = b"%d" % (n + 1)                  # INCR keeps the key's TTL
    return integer(n + 1)


def cmd_expire(db, args):
    key, secs = args[1], parse_int(args[2])
    if secs is None:
        return error("value is not an integer or out of range")
    value = db.get(key)
    if value is None:
        return integer(0)
    if secs <= 0:                                   # a past deadline deletes at once
        db.delete(key)
    else:
        db.set(key, value, secs)
    return integer(1)


def cmd_ttl(db, args):
    key = args[1]
    if db.get(key) is None:
        return integer(-2)                          # no such key
    t = db.expiry.get(key)
    if t is None:
        return integer(-1)                          # a key without expiry
    return integer(int(max(0.0, t.when - time.monotonic()) + 0.5))


def cmd_dbsize(db, args):
    return integer(len(db.data))


def cmd_flushall(db, args):
    db.flush()
    return OK


def cmd_info(db, args):
    text = ("# Server\r\nredis_version:7.0.0\r\ngoev_version:%s\r\nprocess_id:%d\r\n"
            "\r\n# Keyspace\r\ndb0:keys=%d,expires=%d,avg_ttl=0\r\n"
            % (goev.__version__, os.getpid(), len(db.data), len(db.expiry)))
    return bulk(text.encode())


def cmd_command(db, args):
    # redis-cli asks for the command table (COMMAND DOCS) at start-up, for its
    # hints; an empty array means "nothing to tell", which it accepts.
    return b"*0\r\n"


CONFIG = {b"save": b"", b"appendonly": b"no"}    # what redis-benchmark asks for


def cmd_config(db, args):
    if args[1].upper() != b"GET" or len(args) != 3:
        return error("only CONFIG GET parameter is supported")
    value = CONFIG.get(args[2].lower())
    if value is None:
        return b"*0\r\n"
    return b"*2\r\n" + bulk(args[2].lower()) + bulk(value)


# name -> (function, arity): arity n means exactly n words (the name included),
# -n means at least n -- the convention of Redis's own command table.
COMMANDS = {
    b"PING": (cmd_ping, -1), b"ECHO": (cmd_echo, 2), b"SET": (cmd_set, -3),
    b"GET": (cmd_get, 2), b"DEL": (cmd_del, -2), b"EXISTS": (cmd_exists, -2),
    b"INCR": (cmd_incr, 2), b"EXPIRE": (cmd_expire, 3), b"TTL": (cmd_ttl, 2),
    b"DBSIZE": (cmd_dbsize, 1), b"FLUSHALL": (cmd_flushall, -1), b"INFO": (cmd_info, -1),
    b"COMMAND": (cmd_command, -1), b"CONFIG": (cmd_config, -2),
}


def execute(db, args):
    """One command -> its RESP reply (bytes)."""
    name = args[0].upper()
    entry = COMMANDS.get(name)
    if entry is None:
        shown = " ".join("'%s'" % a.decode("utf-8", "replace")[:64] for a in args[1:4])
        return error("unknown command '%s', with args beginning with: %s"
                     % (args[0].decode("utf-8", "replace")[:64], shown))
    fn, arity = entry
    if (arity > 0 and len(args) != arity) or len(args) < -arity:
        return error("wrong number of arguments for '%s' command" % name.decode().lower())
    if name == b"PING" and len(args) > 2:
        return error("wrong number of arguments for 'ping' command")
    return fn(db, args)


# =============================================================================
# The connection handler
# =============================================================================

class Client(goev.IOHandle):
    db = None                  # the Store, set by main() (it lives on poller 0)

    def on_open(self):
        self.buf = bytearray()
        self.done = False      # after QUIT or a protocol error: ignore further input
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        return True

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        if self.done:
            return True
        self.buf += data                    # copy out of the poller's shared buffer
        err = None
        try:
            cmds = parse_commands(self.buf)
        except ProtocolError as e:
            cmds, err = e.commands, error("Protocol error: %s" % e)
        if not cmds and err is None:
            return True                     # half a command: wait for more
        if self.poller is self.db.poller:
            return self.run_batch(cmds, err)
        # The data belongs to another thread: send it the work, in order.
        # Stop reading new commands if this batch ends the connection.
        self.done = err is not None or any(c[0].upper() == b"QUIT" for c in cmds)
        self.reactor.call_later(0, self.run_batch, cmds, err)
        return True

    def run_batch(self, cmds, err):
        """Execute a pipeline on the data's thread; one write for all replies.
        Returns False (close after the flush) after QUIT or a protocol error."""
        db = self.db
        out = []
        close = err is not None
        for args in cmds:
            if args[0].upper() == b"QUIT":
                out.append(OK)
                close, err = True, None     # nothing after QUIT is answered
                break
            out.append(execute(db, args))
        if err is not None:
            out.append(err)
        self.write(b"".join(out))           # off-thread this becomes async_write: still in order
        if close:
            self.close()                    # flushes first; off-thread it is queued after the write
        return not close


def main(argv=None):
    parser = argparse.ArgumentParser(description="a Redis-compatible key/value server on goev")
    parser.add_argument("addr", metavar="ADDR", help='e.g. "127.0.0.1:6380" or ":6380"')
    parser.add_argument("--pollers", type=int, default=1, metavar="N", help="poller threads (default 1)")
    args = parser.parse_args(argv)
    reactor = goev.Reactor(args.pollers)
    Client.db = Store(reactor.pollers[0])   # the data lives on poller 0, as does call_later(0)
    try:
        acceptor = goev.Acceptor(reactor, args.addr, Client)
    except (ValueError, OSError) as e:
        reactor.stop()
        print("kv: cannot listen on %s: %s" % (args.addr, e), file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: reactor.stop())
    print("kv server on %s (%s, %d poller(s))" % (acceptor.address, reactor.backend, args.pollers),
          file=sys.stderr, flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
