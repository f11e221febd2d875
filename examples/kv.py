"""kv.py -- a small Redis-compatible key/value server (RESP2) on goev.

What it teaches:

  1. An incremental, pipelining protocol parser that stays linear: one read
     may hold half a command or a hundred of them, and a command may arrive
     in a thousand reads; the arguments already complete are kept, so no
     byte is parsed twice.  A command in progress is capped by
     --max-query-bytes (Redis: client-query-buffer-limit).
  2. Backpressure on the replies: ``GET big`` costs 13 bytes to ask and may
     cost a megabyte to answer.  Commands are run in small batches and
     answering stops while the connection's send queue is above its high
     water mark (``pending_write_bytes``); reading stops too, so what the
     client keeps sending waits in the kernel, and ``on_write_drained``
     resumes both.  Memory per connection is bounded by the water mark plus
     one batch of replies, however many GETs are pipelined.
  3. Who owns the data.  The dict lives on ONE poller thread (poller 0) and
     only that thread touches it, so there are no locks.  With --pollers N,
     a connection on another poller hands a batch of parsed commands to
     poller 0 with ``reactor.call_later(0, ...)`` (safe from any thread);
     poller 0 runs them and hands the replies back with
     ``reactor.post_to(conn, ...)``, so the connection writes them on its
     own thread, where its send queue and water marks live.  One batch per
     connection is away at a time, which keeps the replies in order.  With
     the default --pollers 1 everything runs on one thread, directly.
  4. Expiry on the timer heap: ``SET k v EX 10`` schedules
     ``poller.call_later(10, expire, k)`` and keeps the Timer, so a later SET,
     DEL or FLUSHALL cancels it.  Reads also check the deadline ("passive"
     expiry, as Redis does), so a key never outlives its TTL by a loop pass.

Commands: PING [msg], ECHO, SET key value [EX s|PX ms] [NX|XX], GET, DEL,
EXISTS, INCR, EXPIRE, TTL, DBSIZE, FLUSHALL, INFO, COMMAND, CONFIG GET, QUIT.
Both wire forms work: RESP arrays (what clients send) and inline commands
(``PING`` typed into telnet or nc).

Try it::

    python3 examples/kv.py 127.0.0.1:6380
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
MAX_QUERY = 64 * 1024 * 1024     # default --max-query-bytes: the memory one command may hold
ARG_OVERHEAD = 48                # what an argument costs beyond its bytes (a bytes object, a list slot)
MAX_EXPIRE_S = (2**63 - 1) // 1000   # Redis refuses an EX whose milliseconds overflow 64 bits

WRITE_HIGH = 256 * 1024          # stop answering (and reading) above this many queued reply bytes
REPLY_CHUNK = 64 * 1024          # replies are joined into writes of about this size
BATCH = 256                      # commands parsed (and, with --pollers N, sent to poller 0) at once
READ_AHEAD = 1024 * 1024         # input buffered while a batch is on poller 0, before reading pauses

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


class RequestParser:
    """An incremental RESP2 request parser: ``feed(data)`` each read, then call
    ``next()`` until it returns None (it needs more input).  Raises
    ProtocolError on garbage; the commands before it were already returned.

    Linear in the input, however it is split into reads: the buffer always
    starts where parsing stopped (consumed bytes are deleted from the front
    of the bytearray, which CPython does without moving the rest), the
    arguments already complete of a command in progress are kept in
    ``args`` and never looked at again, and the search for a line end
    resumes where the last one gave up.  (The naive way -- re-parse the
    buffer from the start of the command at every read -- copies a
    command's finished arguments once per read: quadratic.)

    ``held`` is the memory the command in progress holds: its finished
    arguments, each counted as its length plus ARG_OVERHEAD.  A bulk length
    that would take it past ``max_query`` is refused at once, before its
    bytes are buffered: the input buffer never holds more than the command
    in progress plus one read."""

    def __init__(self, max_query=MAX_QUERY):
        self.buf = bytearray()     # unparsed input; buf[0] starts a token
        self.args = None           # the finished arguments of the array in progress
        self.count = 0             # ... how many it declared
        self.bulk = -1             # the length of the bulk string awaited (-1: a "$" line is next)
        self.held = 0              # bytes held by ``args`` (payload + ARG_OVERHEAD each)
        self.scanned = 0           # buf[:scanned] holds no line end: a search resumes there
        self.max_query = max_query

    def feed(self, data):
        self.buf += data           # copies: ``data`` may be the poller's shared buffer

    def clear(self):
        """Forget everything (after QUIT or an error: nothing more is parsed)."""
        self.buf = bytearray()
        self.args, self.bulk, self.held, self.scanned = None, -1, 0, 0

    def _line(self, sep, what):
        """The line at the front of buf without ``sep`` (consumed), or None."""
        buf = self.buf
        eol = buf.find(sep, self.scanned, MAX_INLINE)
        if eol < 0:
            if len(buf) >= MAX_INLINE:
                raise ProtocolError("too big %s" % what)
            self.scanned = max(0, len(buf) - len(sep) + 1)   # a "\r" at the end may pair up later
            return None
        line = bytes(buf[:eol])
        del buf[:eol + len(sep)]
        self.scanned = 0
        return line

    def next(self):
        """The next complete command (a list of bytes), or None until more input."""
        buf = self.buf
        while True:
            if self.args is None:                         # between commands
                if not buf:
                    return None
                if buf[0] != 0x2A:                        # not "*": an inline command line
                    line = self._line(b"\n", "inline request")
                    if line is None:
                        return None
                    args = line.split()                   # whitespace-split (no quoting); drops the "\r"
                    if args:
                        return args
                    continue
                line = self._line(b"\r\n", "mbulk count string")
                if line is None:
                    return None
                count = parse_int(line[1:])
                if count is None or count > MAX_ARGS:
                    raise ProtocolError("invalid multibulk length")
                if count <= 0:                            # "*0" / "*-1" are no-ops
                    continue
                self.args, self.count = [], count
            args = self.args
            while len(args) < self.count:
                size = self.bulk
                if size < 0:                              # a "$<len>" line comes first
                    if not buf:
                        return None
                    if buf[0] != 0x24:
                        raise ProtocolError("expected '$', got '%s'" % chr(buf[0]))
                    line = self._line(b"\r\n", "bulk count string")
                    if line is None:
                        return None
                    size = parse_int(line[1:])
                    if size is None or not 0 <= size <= MAX_BULK:
                        raise ProtocolError("invalid bulk length")
                    if self.held + size + ARG_OVERHEAD > self.max_query:
                        raise ProtocolError("query buffer limit of %d bytes exceeded (--max-query-bytes)"
                                            % self.max_query)
                    self.bulk = size
                if len(buf) < size + 2:
                    return None                           # the payload is not all here
                if buf[size:size + 2] != b"\r\n":
                    raise ProtocolError("bulk string not terminated by CRLF")
                args.append(bytes(buf[:size]))
                del buf[:size + 2]                        # O(1) at the front of a bytearray
                self.held += size + ARG_OVERHEAD
                self.bulk = -1
            self.args, self.held = None, 0
            return args


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
            if n <= 0 or o == b"EX" and n > MAX_EXPIRE_S:
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
    if secs > MAX_EXPIRE_S:
        return error("invalid expire time in 'expire' command")
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


def run_batch(db, cmds):
    """Run commands on the data's thread until about REPLY_CHUNK bytes of
    replies are made: -> (the replies joined, the commands not run yet)."""
    out, size = [], 0
    for i, args in enumerate(cmds):
        reply = execute(db, args)
        out.append(reply)
        size += len(reply)
        if size >= REPLY_CHUNK:
            return b"".join(out), cmds[i + 1:]
    return b"".join(out), []


# =============================================================================
# The connection handler
# =============================================================================

class Client(goev.IOHandle):
    db = None                  # the Store, set by main() (it lives on poller 0)
    max_query = MAX_QUERY      # --max-query-bytes

    def on_open(self):
        self.parser = RequestParser(self.max_query)
        self.todo = []         # parsed commands not run yet
        self.last = None       # QUIT's +OK or a protocol error: sent after ``todo``, then close
        self.away = False      # a batch is on poller 0's thread (--pollers > 1)
        self.reading = True    # EV_IN wanted (False while the client is behind on replies)
        self.eof = False       # the client sent FIN: answer what it sent, then close
        self.set_write_buffer_limits(WRITE_HIGH)
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        return True

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            self.eof = True
        elif self.last is not None:
            return True                     # after QUIT or a protocol error: ignore the rest
        else:
            self.parser.feed(data)
            if self.away:                   # poller 0 has our batch: just buffer, up to a point
                if len(self.parser.buf) > READ_AHEAD:
                    self.pause()
                return True
        self.pump()
        return True

    def on_write_drained(self):
        self.pump()                         # the client caught up: answer (and read) again

    def pump(self):
        """Run what the client sent, while it keeps up with the replies.  The one
        place that decides: answer more, wait for the send queue to drain
        (reading paused too), wait for input, or close."""
        while not self.away and not self.closed:
            if self.pending_write_bytes > WRITE_HIGH:
                self.pause()                # on_write_drained calls pump again
                return
            if not self.todo and self.last is None:
                self.todo = self.take_commands()
            if not self.todo:
                if self.last is not None:
                    self.write(self.last)   # nothing after QUIT or an error is answered
                    self.close()            # flushes first
                elif self.eof:
                    self.close()
                else:
                    self.resume()           # everything is answered: read more
                return
            cmds, self.todo = self.todo, []
            if self.poller is self.db.poller:
                replies, self.todo = run_batch(self.db, cmds)
                self.write(replies)
            else:
                # The data belongs to poller 0: send it the batch; came_back
                # continues here.  One batch away at a time keeps the order.
                self.away = True
                self.reactor.call_later(0, self.run_on_data_thread, cmds)

    def take_commands(self):
        """Up to BATCH parsed commands; stops at QUIT or a protocol error (self.last)."""
        cmds, parser = [], self.parser
        while len(cmds) < BATCH:
            try:
                args = parser.next()
            except ProtocolError as e:
                self.last = error("Protocol error: %s" % e)
                break
            if args is None:
                break
            if args[0].upper() == b"QUIT":
                self.last = OK
                break
            cmds.append(args)
        if self.last is not None:
            parser.clear()                  # what follows is never parsed: free it now
        return cmds

    def run_on_data_thread(self, cmds):
        """Poller 0: run the batch (up to REPLY_CHUNK of replies), send the
        replies and the rest back to the connection's own poller."""
        replies, rest = run_batch(self.db, cmds)
        self.reactor.post_to(self, self.came_back, replies, rest)

    def came_back(self, replies, rest):
        self.away = False
        if self.closed:
            return                          # the client went away meanwhile
        self.write(replies)
        self.todo = rest
        self.pump()

    def pause(self):
        if self.reading:
            self.reading = False
            self.reactor.remove_event(self.fd, goev.EV_IN)

    def resume(self):
        if not self.reading:
            self.reading = True
            self.reactor.append_event(self.fd, goev.EV_IN)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 examples/kv.py",
                                     description="a Redis-compatible key/value server on goev")
    parser.add_argument("addr", metavar="ADDR", help='e.g. "127.0.0.1:6380" or ":6380" (every interface)')
    parser.add_argument("--pollers", type=int, default=1, metavar="N", help="poller threads (default 1)")
    parser.add_argument("--max-query-bytes", type=int, default=MAX_QUERY, metavar="BYTES",
                        help="the most one command may hold, each argument counted as its length + %d; "
                             "more gets a protocol error and a close (default %d MiB)"
                        % (ARG_OVERHEAD, MAX_QUERY >> 20))
    args = parser.parse_args(argv)
    if args.pollers < 1 or args.max_query_bytes < 1:
        parser.error("--pollers and --max-query-bytes must be positive")
    Client.max_query = args.max_query_bytes
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
