"""dns.py -- a small authoritative DNS server (UDP) on goev.

What it teaches:

  1. A datagram server: one ``goev.DatagramHandle`` bound to ADDR, one
     ``on_datagram(data, addr)`` per query, one ``sendto(reply, addr)`` per
     answer.  No connection, no per-client state: the whole protocol is a
     pure function from a query's bytes to a reply's bytes (``answer``).
  2. A binary wire format read defensively (RFC 1035 section 4): a 12-byte
     header, the question's name as length-prefixed labels with compression
     pointers, then records.  Everything a packet says is checked before it
     is believed: pointers must point backwards (no loops), label types 01
     and 10 are reserved, a name is at most 255 bytes, counts must match what
     is there.  A malformed query gets FORMERR; a packet shorter than the
     header is dropped (it has no ID to answer); no input makes a traceback.
  3. Size rules that are part of the protocol: an answer over 512 bytes to a
     query without EDNS is cut to its header and question with the TC bit
     set (the client then asks over TCP); EDNS(0) (RFC 6891) lets a client
     say how large a datagram it takes, in an OPT record, and the server
     answers with its own (``--udp-size``).  Answers point at the question's
     name (compression: two bytes instead of the name in every record).
     The same port serves TCP (a 2-byte length before each message), where
     a client asks again after a truncated answer.

The zone: every name it holds is answered authoritatively (AA); a name it
does not hold is NXDOMAIN; a name without records of the type asked is an
empty NOERROR.  Types A, AAAA and TXT (and ANY).  The built-in zone::

    goev.test.      A     127.0.0.1
    goev.test.      AAAA  ::1
    goev.test.      TXT   "goev.py: a reactor in one file"
    big.goev.test.  TXT   (10 strings of 100 bytes: over 512, to see TC)

``--zone FILE`` replaces it: one record per line, ``NAME [TTL] TYPE VALUE``,
``#`` comments, TXT values in double quotes (several quoted strings: one
record with several strings).

Try it::

    python3 examples/dns.py 127.0.0.1:5353
    dig @127.0.0.1 -p 5353 goev.test A +short           # 127.0.0.1
    dig @127.0.0.1 -p 5353 nothing.goev.test            # status: NXDOMAIN
    dig @127.0.0.1 -p 5353 big.goev.test TXT +noedns +ignore   # flags: qr aa tc
    dig @127.0.0.1 -p 5353 big.goev.test TXT +noedns    # truncated, then again over TCP
"""

import argparse
import ipaddress
import os
import shlex
import signal
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import goev  # noqa: E402

TYPE_A, TYPE_AAAA, TYPE_TXT, TYPE_OPT, TYPE_ANY = 1, 28, 16, 41, 255
CLASS_IN, CLASS_ANY = 1, 255
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16                       # an extended RCODE (RFC 6891): upper 8 bits in the OPT record
TYPES = {"A": TYPE_A, "AAAA": TYPE_AAAA, "TXT": TYPE_TXT}

HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
PLAIN_UDP_LIMIT = 512              # RFC 1035 4.2.1: without EDNS, at most 512 bytes
DEFAULT_UDP_SIZE = 1232            # what we accept and offer with EDNS (DNS flag day 2020)
DEFAULT_TTL = 300
MAX_NAME = 255                     # RFC 1035 2.3.4: a name on the wire, length bytes included
MAX_POINTERS = 64                  # compression jumps in one name: far more than any real one

BUILTIN_ZONE = (
    "goev.test A 127.0.0.1\n"
    "goev.test AAAA ::1\n"
    'goev.test TXT "goev.py: a reactor in one file"\n'
    + "".join('big.goev.test TXT "%s"\n' % (("%d" % i) * 100)[:100] for i in range(10))
)


class FormatError(Exception):
    """The query is malformed: the answer is FORMERR."""


# -- the zone ---------------------------------------------------------------------

def encode_name(name):
    """'goev.test' -> wire labels; ValueError for an empty label or a long name."""
    out = b""
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        raw = label.encode("ascii")
        if not 0 < len(raw) <= 63:
            raise ValueError("label %r must be 1 to 63 bytes" % label)
        out += bytes([len(raw)]) + raw
    out += b"\0"
    if len(out) > MAX_NAME:
        raise ValueError("name %r is over 255 bytes" % name)
    return out


def txt_rdata(strings):
    out = b""
    for s in strings:
        for i in range(0, max(len(s), 1), 255):       # a character-string holds 255 bytes
            chunk = s[i:i + 255]
            out += bytes([len(chunk)]) + chunk
    return out


def parse_zone(text):
    """Zone text -> {lowercased wire name: [(type, ttl, rdata)]}.  ValueError
    naming the line for anything it cannot read."""
    zone = {}
    for n, line in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ValueError("line %d: %s" % (n, e)) from None
        if not words:
            continue
        try:
            if len(words) < 3:
                raise ValueError("expected NAME [TTL] TYPE VALUE")
            name, rest = words[0], words[1:]
            ttl = DEFAULT_TTL
            if rest[0].isdigit():
                ttl = int(rest.pop(0))
                if ttl >= 2 ** 31:
                    raise ValueError("TTL %d is over 2^31 - 1" % ttl)
            if len(rest) < 2:
                raise ValueError("expected NAME [TTL] TYPE VALUE")
            kind = rest[0].upper()
            if kind == "A":
                rdata = ipaddress.IPv4Address(rest[1]).packed
            elif kind == "AAAA":
                rdata = ipaddress.IPv6Address(rest[1]).packed
            elif kind == "TXT":
                rdata = txt_rdata([s.encode() for s in rest[1:]])
                if len(rdata) > 65535:
                    raise ValueError("TXT record too long")
            else:
                raise ValueError("type %r: this server knows A, AAAA and TXT" % rest[0])
            if kind != "TXT" and len(rest) != 2:
                raise ValueError("one value per %s record" % kind)
            zone.setdefault(encode_name(name).lower(), []).append((TYPES[kind], ttl, rdata))
        except ValueError as e:
            raise ValueError("line %d: %s" % (n, e)) from None
    return zone


# -- reading a query -------------------------------------------------------------------

def read_name(msg, pos):
    """The name at ``pos``: (its wire form without compression, lowercased;
    the position after it in the message).  FormatError for a pointer that
    does not point backwards (a loop), a reserved label type, a name over
    255 bytes or one that runs past the end."""
    labels = []
    length = 1                                   # the root's zero byte
    end = None                                   # where the name ends in the message
    jumps = 0
    while True:
        if pos >= len(msg):
            raise FormatError("name runs past the end")
        b = msg[pos]
        kind = b & 0xC0
        if kind == 0xC0:                         # a pointer: 14 bits of offset
            if pos + 1 >= len(msg):
                raise FormatError("pointer runs past the end")
            target = ((b & 0x3F) << 8) | msg[pos + 1]
            if end is None:
                end = pos + 2
            jumps += 1
            if target >= pos or jumps > MAX_POINTERS:   # forwards or to itself: a loop
                raise FormatError("compression pointer does not point backwards")
            pos = target
            continue
        if kind:                                 # 0x40, 0x80: reserved (RFC 6891 retired 0x40)
            raise FormatError("reserved label type %#x" % kind)
        if b == 0:
            return b"".join(labels).lower() + b"\0", (pos + 1 if end is None else end)
        length += b + 1
        if length > MAX_NAME:
            raise FormatError("name over 255 bytes")
        if pos + 1 + b > len(msg):
            raise FormatError("label runs past the end")
        labels.append(msg[pos:pos + 1 + b])
        pos += 1 + b


def skip_rr(msg, pos):
    """Read one resource record: (name, type, class, ttl, rdata, next position)."""
    name, pos = read_name(msg, pos)
    if pos + 10 > len(msg):
        raise FormatError("record header runs past the end")
    rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", msg, pos)
    pos += 10
    if pos + rdlen > len(msg):
        raise FormatError("record data runs past the end")
    return name, rtype, rclass, ttl, msg[pos:pos + rdlen], pos + rdlen


# -- answering -------------------------------------------------------------------------

def header(qid, flags, qd=0, an=0, ns=0, ar=0):
    return HEADER.pack(qid, flags, qd, an, ns, ar)


def opt_record(udp_size, ext_rcode=0):
    """Our OPT pseudo-record: root name, our payload size, version 0, no options."""
    return b"\0" + struct.pack("!HHIH", TYPE_OPT, udp_size, ext_rcode << 24, 0)


def answer(msg, zone, udp_size=DEFAULT_UDP_SIZE, tcp=False):
    """The reply to query ``msg`` (bytes), or None to send nothing.  Over TCP
    (``tcp``) a reply may take 65,535 bytes and is never truncated."""
    if len(msg) < HEADER.size:
        return None                              # no ID to answer
    qid, flags, qd, an, ns, ar = HEADER.unpack_from(msg)
    if flags & 0x8000:
        return None                              # a response: never answer one (no loops)
    opcode = flags & 0x7800
    rd = flags & 0x0100
    base = 0x8000 | opcode | rd                  # QR, the opcode and RD copied
    edns = None                                  # the client's payload size, if it sent OPT
    try:
        if qd != 1:
            raise FormatError("%d questions (one is expected)" % qd)
        qname, pos = read_name(msg, HEADER.size)
        if pos + 4 > len(msg):
            raise FormatError("question runs past the end")
        qtype, qclass = struct.unpack_from("!HH", msg, pos)
        question = msg[HEADER.size:pos + 4]      # echoed as sent (the case too)
        pos += 4
        version = 0
        for i in range(an + ns + ar):
            name, rtype, rclass, ttl, _, pos = skip_rr(msg, pos)
            if rtype == TYPE_OPT:
                if i < an + ns or edns is not None or name != b"\0":
                    raise FormatError("an OPT record out of place, twice or not at the root")
                edns = max(rclass, PLAIN_UDP_LIMIT)
                version = (ttl >> 16) & 0xFF
    except FormatError:
        tail = opt_record(udp_size) if edns is not None else b""
        return header(qid, base | FORMERR, ar=1 if tail else 0) + tail
    if edns is not None and version != 0:        # RFC 6891 6.1.3: only version 0 exists
        return header(qid, base, ar=1) + opt_record(udp_size, BADVERS >> 4)
    if opcode != 0:
        rcode, records, aa = NOTIMP, [], 0
    elif qclass not in (CLASS_IN, CLASS_ANY):
        rcode, records, aa = REFUSED, [], 0
    else:
        rrs = zone.get(qname)
        aa = 0x0400
        if rrs is None:
            rcode, records = NXDOMAIN, []
        else:
            rcode = NOERROR
            records = [rr for rr in rrs if qtype in (rr[0], TYPE_ANY)]
    body = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", t, CLASS_IN, ttl, len(rdata)) + rdata
                    for t, ttl, rdata in records)   # \xc0\x0c: a pointer to the question's name
    tail = opt_record(udp_size) if edns is not None else b""
    limit = 65535 if tcp else min(edns, udp_size) if edns is not None else PLAIN_UDP_LIMIT
    flags = base | aa | rcode
    reply = header(qid, flags, 1, len(records), 0, 1 if tail else 0) + question + body + tail
    if len(reply) > limit:                       # TC: header and question only, "ask over TCP"
        reply = header(qid, flags | 0x0200, 1, 0, 0, 1 if tail else 0) + question + tail
    return reply


class DnsServer(goev.DatagramHandle):
    """One socket, one datagram per query."""
    zone = {}
    udp_size = DEFAULT_UDP_SIZE
    answered = 0

    def on_datagram(self, data, addr):
        reply = answer(bytes(data), self.zone, self.udp_size)
        if reply is not None:
            self.sendto(reply, addr)
            self.answered += 1


class DnsOverTcp(goev.IOHandle):
    """RFC 1035 4.2.2 / RFC 7766: the same queries over TCP, each message after
    a 2-byte length; where a client goes after a truncated (TC) answer.  An
    idle connection is closed after TCP_IDLE_MS."""
    TCP_IDLE_MS = 10000

    def __init__(self):
        self.buf = b""

    def on_open(self):
        try:
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
        except RuntimeError:                     # accepted as the reactor stops: close it
            return False
        self.reactor.post_to(self, self.schedule_timer, self.TCP_IDLE_MS)
        return True

    def on_timeout(self, now_ms):
        self.close()
        return False

    def on_data(self, data):
        self.buf += bytes(data)
        while len(self.buf) >= 2:
            n = int.from_bytes(self.buf[:2], "big")
            if len(self.buf) < 2 + n:
                if len(self.buf) > 2 + 65535:
                    self.close()
                return
            msg, self.buf = self.buf[2:2 + n], self.buf[2 + n:]
            reply = answer(msg, DnsServer.zone, DnsServer.udp_size, tcp=True)
            if reply is None:                    # under 12 bytes, or a response: hang up
                self.close()
                return
            self.write(len(reply).to_bytes(2, "big") + reply)
        self.schedule_timer(self.TCP_IDLE_MS)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 examples/dns.py",
                                     description="a small authoritative DNS server (UDP) on goev")
    parser.add_argument("addr", metavar="ADDR", help='e.g. "127.0.0.1:5353", "[::1]:5353" or ":5353"')
    parser.add_argument("--zone", metavar="FILE", default=None,
                        help="records, one a line: NAME [TTL] TYPE VALUE (A, AAAA, TXT); "
                             "default: the built-in zone (goev.test A 127.0.0.1, AAAA ::1, TXT ...)")
    parser.add_argument("--udp-size", type=int, default=DEFAULT_UDP_SIZE, metavar="BYTES",
                        help="the EDNS payload size offered and honoured, 512..65535 (default %d)"
                        % DEFAULT_UDP_SIZE)
    parser.add_argument("--pollers", type=int, default=1, metavar="N",
                        help="poller threads, one socket each, SO_REUSEPORT (default 1)")
    parser.add_argument("--no-tcp", action="store_true",
                        help="serve UDP only (default: TCP too, on the same port, where clients "
                             "retry a truncated answer)")
    args = parser.parse_args(argv)
    if not 512 <= args.udp_size <= 65535:
        parser.error("--udp-size must be 512..65535, got %d" % args.udp_size)
    if args.pollers < 1:
        parser.error("--pollers must be positive")
    try:
        if args.zone is None:
            text = BUILTIN_ZONE
        else:
            with open(args.zone) as f:
                text = f.read()
        DnsServer.zone = parse_zone(text)
    except (OSError, ValueError, UnicodeError) as e:
        print("dns: cannot load the zone %s: %s" % (args.zone, e), file=sys.stderr)
        return 2
    DnsServer.udp_size = args.udp_size
    try:
        reactor = goev.Reactor(args.pollers)
    except ValueError as e:
        print("dns: %s" % e, file=sys.stderr)
        return 2
    try:
        first = DnsServer().bind(reactor, args.addr, reuse_port=args.pollers > 1, poller=0)
        for i in range(1, args.pollers):
            DnsServer().bind(reactor, first.address[:2], reuse_port=True, poller=i)
        if not args.no_tcp and not isinstance(first.address, str):    # (not on a unix socket)
            goev.Acceptor(reactor, first.address[:2], DnsOverTcp)
    except (ValueError, TypeError, OSError) as e:
        reactor.stop()
        print("dns: cannot listen on %s: %s" % (args.addr, e), file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: reactor.stop())
    print("dns server on %s (%s, %d poller(s); UDP%s, %d name(s))" % (
        first.address, reactor.backend, args.pollers,
        "" if args.no_tcp or isinstance(first.address, str) else " and TCP", len(DnsServer.zone)),
        file=sys.stderr, flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
