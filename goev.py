"""goev -- a reactor for Python networking, in one file.

goev.py is the Python port of goev (github.com/shaovie/goev), the Go reactor
library modelled on ACE's Reactor.  A *reactor* waits for the kernel to say
"this socket is ready", then calls the one object in charge of that socket.
There are no coroutines and no futures: just objects with ``on_read`` /
``on_write`` / ``on_timeout`` / ``on_close`` methods, and a loop that calls
them.  It is standard library only, and meant to be copied into a project,
run from the command line (``python -m goev echo :8080``) and read.

A complete echo server::

    import goev

    class Echo(goev.IOHandle):
        def on_data(self, data):        # a memoryview of the poller's buffer
            self.write(data)            # (at end of stream on_eof() closes)

    with goev.Reactor() as r:
        goev.Acceptor(r, ":8080", Echo)
        r.run()                         # until r.stop() or Ctrl-C

Threading model
---------------
A ``Reactor`` owns N *pollers*.  Each poller is one thread with one epoll fd
(or one ``selectors`` selector), its own timer heap, its own read buffer and
an inbox for work sent from other threads.  A handler is placed on
``poller[fd % N]`` when it is registered and stays there for life, so every
callback of one handler runs on one thread, one at a time, and handlers need
no locks.  Other threads talk to a handler only through ``async_write``,
``close`` (both routed through the inbox when called off-thread while the
reactor runs, so they keep their call order), ``Reactor.post``/``post_to``
and ``Reactor.call_later``.  One exception: ``on_open`` runs on the thread
that accepted or connected, *before* the handler is registered -- so
register last in it (as the default does): from then on the handler's own
poller may already be calling ``on_read``.  Under the GIL the pollers give
concurrency, not parallelism: use ``serve(workers=N)`` (several processes
sharing a port) to use every core; there, extra pollers only add contention
(a CPU-bound handler, 2 cores: 2 pollers did 0.89x the requests of 1 and
p99 latency went from 12 to 51 ms; 2 workers did 1.91x).  On free-threaded
CPython (3.13t, 3.14t with the GIL off) the pollers run Python in parallel:
2 pollers did 1.89x the requests of 1 in one process (bench/cpu_bound.py).
``Reactor(pollers="auto")`` picks the core count there and 1 under the GIL.
Which state threads share, and why each piece is safe without the GIL:
"Threads and shared state" in section 7.

A learner's path
----------------
To follow one request from the kernel to your handler and back, read these,
in this order (section numbers below):

  1. ``_Poller._loop`` (7): wait, run posted work, dispatch each event,
     finish closes, run timers -- the reactor itself.
  2. ``IOHandle.read`` (6): one readv into the poller's shared buffer;
     ``IOHandle._feed``: how ``on_data``/``on_eof`` are called (the
     handler shape of the example above; ``on_read`` does its own read).
  3. ``IOHandle.write``, ``_enqueue``, ``_flush`` (6): send now, queue the
     rest, arm EV_OUT; flush when writable; the water marks.
  4. ``IOHandle._update`` (6): the one rule for which events a
     handler is registered for (two marked fast paths apply its common
     cases inline).
  5. ``IOHandle.close`` and ``_close_now`` (6), ``_Poller._finish_closes`` (7):
     leave the poller now, on_close and close(fd) at the end of the step.
  6. ``_Poller._post``, ``_drain_inbox`` and ``_unowned`` (7): cross-thread
     work without a lost wake-up (post, wake, drain, clear the flag).
  7. ``_Poller._run_timers`` (7) and the 4-ary heap (5).
  8. ``Reactor.add_handler``, ``run``, ``stop`` (8): placement and the life
     cycle (NEW, RUNNING, STOPPING, CLOSING, DONE).
  9. ``Acceptor.on_read`` (9) and ``Connector.connect`` (10).
A first reading may skip: section 4's epoll notes past the first paragraph,
the code under each ``# fast path:`` comment (the plain rule is written
beside it), and all of Part II, which only attaches to hooks (section 7).

Contents
--------
Part I, the reactor -- complete on its own:
 1. Imports, ``__all__``, ``__version__``
 2. Constants, tunables, error sets and the poller life cycle
 3. Small helpers: addresses, sockets, logging
 4. Poller backends: epoll, selectors, and the waker
 5. The timer heap (4-ary) and ``Timer``
 6. ``IOHandle``: the handler base (callbacks, read, write, close)
 7. ``_Poller``: one thread, one loop; the hooks Part II attaches to; the
    slow-callback watchdog
 8. ``Reactor``: N pollers, placement, start/stop, cross-thread posts
 9. ``Acceptor``: listening sockets and the accept pipeline
10. ``Connector``: non-blocking connects
11. ``DatagramHandle``: UDP and unix datagram sockets
Part II, production extras (below the ``PART II`` banner):
12. Trace mode: every step of the loop on stderr (``GOEV_TRACE=1``)
13. TLS: ``ssl.SSLObject`` over memory BIOs, the handshake, the class swap
14. The PROXY protocol: the client's address from a load balancer
15. ``ConnectPool``: a pool of client connections
16. ``serve()``: multi-process serving, supervised workers
17. The command line: ``python -m goev echo|http ADDR``, ``echo --udp``

Each name is defined before it is used, and Part I names nothing from Part
II.  Durations are seconds unless the name ends in ``_ms``.  Linux uses
epoll; other POSIX systems (and ``backend="selectors"``) use the
``selectors`` module with the same behaviour (not Windows: I/O goes through
``os.readv``/``os.write`` on fds).  CPython 3.9+.  MIT licence.
"""

from __future__ import annotations

# =============================================================================
# 1. Imports, __all__, __version__
# =============================================================================
# The standard library only (the design card); ssl is optional, so a Python
# built without OpenSSL still gets everything but TLS.  __all__ is the whole
# public surface: every other name is private and may change.

import collections
import errno
import itertools
import logging
import math
import operator
import os
import re
import select
import selectors
import signal
import socket
from _socket import socket as _CSocket   # socket.socket's C base: see Acceptor.on_read
import stat
import struct
import sys
import threading
import _thread
import time
from typing import Any, Callable, Optional, Union

try:
    import ssl as _ssllib         # (as _ssllib: ``ssl=`` is the name of the TLS arguments)
except ImportError:               # pragma: no cover - a Python built without OpenSSL
    _ssllib = None                # type: ignore[assignment]

__all__ = [                       # Part I's names; Part II adds its own
    "EV_IN", "EV_OUT", "EV_ET",
    "Reactor", "IOHandle", "Timer",
    "Acceptor", "Connector", "DatagramHandle", "parse_address",
]
__version__ = "0.2.0"


# =============================================================================
# 2. Constants, tunables, error sets and the poller life cycle
# =============================================================================
# The event bits are epoll's own, so the epoll backend passes them through
# untouched; the selectors backend translates.  Every tunable has its reason.

EV_IN = 0x001            #: readable (EPOLLIN); with epoll goev adds EPOLLRDHUP
EV_OUT = 0x004           #: writable (EPOLLOUT)
EV_ET = 1 << 31          #: edge-triggered (EPOLLET); epoll only, LT elsewhere

_EPOLLERR = 0x008
_EPOLLHUP = 0x010
_EPOLLRDHUP = 0x2000
_HUP_ERR = _EPOLLHUP | _EPOLLERR
# Anything that means "go and read": data, peer FIN (RDHUP), hang-up, error.
# Reading is how pending bytes get delivered before a FIN/RST is acted on.
_IN_ANY = EV_IN | _EPOLLRDHUP | _EPOLLHUP | _EPOLLERR
_EV_ALL = EV_IN | EV_OUT | EV_ET
_EVENT_MASKS = frozenset(io | et for io in (EV_IN, EV_OUT, EV_IN | EV_OUT) for et in (0, EV_ET))  # valid ``events``

DEFAULT_READ_BUFFER = 65536     # one shared buffer per poller; 64 KiB = a full socket read
DEFAULT_HIGH_WATER = 64 * 1024  # above this many queued bytes a handler stops reading
DEFAULT_LOW_WATER = 16 * 1024   # ... and resumes below this (asyncio's defaults)
_ACCEPT_BATCH = 128             # accepts per readiness: bounded so one listener cannot starve I/O
_ACCEPT_RETRY_MS = 100          # pause after EMFILE & co. before accepting again
_DGRAM_BATCH = 64               # datagrams read per readiness: one busy socket cannot starve the rest
_DGRAM_QUEUE = 256 * 1024       # bytes of datagrams queued when the kernel says EAGAIN; more are dropped
_THREAD_BLOCKED_SIGNALS = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT",
                                                         "SIGUSR1", "SIGUSR2", "SIGCHLD") if hasattr(signal, n)}
_INBOX_BATCH = 1024             # cross-thread items per loop pass: a flood cannot starve I/O
_SENDMSG_MAX = 64               # queued buffers gathered into one writev()
_VIEW_CACHE = 2048              # reads shorter than this get a view made once per length
_MAX_POLL_TIMEOUT = 86400.0     # epoll takes an int of ms: clamp far timers to a day
_MAX_READ = 0x7FFFF000          # the most one Linux read() returns: a larger buffer is never filled
_DRAIN_POLL = 0.01              # seconds between a shutdown's checks that a poller is empty
_CLOSE_WAIT_POLL = 0.05         # Acceptor.close from another thread: how often it checks
                                # whether the poller shut down (and so closed it) meanwhile
_CANCEL_LOG_TRIM = 4096         # counted cancels kept before the counts are rebased (see _timeout)
_DRAIN_CHUNK = 4096             # bytes per read when emptying a waker or the signal socket
_UNIX_PATH_MAX = 107            # sockaddr_un.sun_path is 108 bytes, its NUL included
_COMPACT_MIN = 64               # lazily cancelled timers tolerated before compaction is considered
_TLS_HANDSHAKE_TIMEOUT = 10.0   # seconds for a TLS handshake (asyncio: 60, generous to slowloris)
_PROXY_TIMEOUT = 5.0            # seconds a new connection may take to send its PROXY header

# A poller's life cycle (section 7): one state per poller, only ever moving
# forward (Reactor.start/run/stop move every poller together; the last two
# steps each poller takes itself):
#   NEW       made; no loop has run.  Any thread may touch handlers directly.
#   RUNNING   the reactor started: a loop may run at any moment, so calls from
#             other threads are posted to it (_foreign, _direct).
#   STOPPING  stop() asked: the loop ends after the current step.
#   CLOSING   the poller closes its handlers (on_close each); late calls act directly.
#   DONE      every fd closed; what is posted from now on is dropped.
# Mechanisms are not states: the wake flag (_wake_pending), the lock held by
# whoever runs the poller's code (_mine) and the inbox stay what they are.

_NEW, _RUNNING, _STOPPING, _CLOSING_ALL, _DONE = range(5)
_STATE_NAMES = ("idle", "running", "stopping", "closing", "stopped")   # (in reprs: NEW is "idle" ...)

# accept() errors that mean "out of a resource, try again later".  Linux keeps
# reporting the listener readable, so retrying at once would spin: pause instead.
_ACCEPT_TRANSIENT = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
# accept() errors about one connection that is gone (accept(2): "treat them
# like EAGAIN by retrying"): skip it, keep accepting.  ENONET is Linux-only.
_ACCEPT_SKIP = frozenset(getattr(errno, n) for n in (
    "ECONNABORTED", "EPERM", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
    "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH") if hasattr(errno, n))
# accept() errors that mean the listening socket itself is unusable: close it.
_ACCEPT_FATAL = frozenset((errno.EBADF, errno.EINVAL, errno.ENOTSOCK))
_INT_MAX = 2 ** 31 - 1          # a C int: the kernel's limit for backlog and buffer sizes


# =============================================================================
# 3. Small helpers: addresses, sockets, logging
# =============================================================================
# Address parsing is the one place user strings become sockaddrs, so every
# bad input gets a ValueError/TypeError that names it.  Nothing here prints.

_log = logging.getLogger("goev")
_get_ident = threading.get_ident
_monotonic = time.monotonic
_LINGER_RST = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST (abort)
_held = threading.local()       # how many goev locks this thread holds: see _Lock


class _Lock:
    """A reentrant lock that counts, per thread, the goev locks held.

    Python runs a signal handler on the main thread between two bytecodes --
    possibly while that thread holds one of goev's locks.  If the handler then
    called ``stop()`` and waited for a poller thread that needs the same lock
    (to close its waker, say), both would wait forever.  So ``stop()`` does not
    wait when the calling thread holds any goev lock (``_locks_held()``).  The
    count goes up before acquiring and down after releasing, so a signal in
    between can only err on the side of not waiting.
    """
    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> None:
        _held.n = getattr(_held, "n", 0) + 1
        self._lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()
        _held.n -= 1


def _locks_held() -> int:
    return getattr(_held, "n", 0)



def _check_port(port: Any, addr: Any) -> int:
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError("port must be an int, got %r in %r" % (port, addr))
    if not 0 <= port <= 65535:
        raise ValueError("port %d out of range 0..65535 in %r" % (port, addr))
    return port


# The forms parse_address accepts, for error messages.
_ADDRESS_FORMS = "':8080', '127.0.0.1:8080', '[::1]:8080', 'localhost:8080', ('host', 8080), 'unix:/path'"


def parse_address(addr: Union[str, tuple], *, resolve: bool = True) -> tuple:
    """Turn a goev address into ``(family, sockaddr)``.

    Accepted forms: ``":8080"`` (all IPv4 interfaces), ``"127.0.0.1:8080"``,
    ``"[::1]:8080"``, ``"localhost:8080"``, ``("host", port)``,
    ``"unix:/path"`` and ``"unix:@name"`` (Linux abstract namespace).
    Host names are resolved with ``getaddrinfo`` in the calling thread, which
    may block.  Raises TypeError for a non-str/tuple, ValueError for a
    malformed address or a port outside 0..65535, socket.gaierror (an OSError)
    naming the host when it does not resolve.  Any thread.
    """
    if isinstance(addr, tuple):
        if len(addr) < 2 or not isinstance(addr[0], str):
            raise ValueError("address tuple must be (host, port), got %r" % (addr,))
        host, port = addr[0], _check_port(addr[1], addr)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
    elif isinstance(addr, str):
        if addr.startswith("unix:"):
            path = addr[5:]
            if not path or "\0" in path:
                raise ValueError("empty or NUL-containing unix address %r" % addr)
            if path.startswith("@"):
                path = "\0" + path[1:]
            if len(path.encode()) > _UNIX_PATH_MAX:
                raise ValueError("unix socket path too long (max %d bytes): %r" % (_UNIX_PATH_MAX, addr))
            return socket.AF_UNIX, path
        scheme, slashes, rest = addr.partition("://")
        if slashes and scheme.isalnum():  # a URL: say what the address inside it is
            hostport = rest.partition("/")[0]
            if scheme in ("http", "https") and not hostport.rpartition("]")[2].count(":"):
                hostport += ":80" if scheme == "http" else ":443"
            raise ValueError("address %r is a URL: %s:// is a scheme, not an address; did you mean %r? "
                             "(accepted: %s)" % (addr, scheme, hostport, _ADDRESS_FORMS))
        host, sep, port_s = addr.rpartition(":")
        if not sep or not port_s:
            if addr.isdigit():
                raise ValueError("address %r has no port; did you mean ':%s' (every IPv4 interface) "
                                 "or '127.0.0.1:%s' (this machine only)?" % (addr, addr, addr))
            raise ValueError("address %r has no port (accepted: %s)" % (addr, _ADDRESS_FORMS))
        if host.startswith("["):
            if not host.endswith("]"):
                raise ValueError("malformed IPv6 address %r (expected [HOST]:PORT)" % addr)
            host = host[1:-1]
        elif ":" in host:
            raise ValueError("IPv6 address %r must be bracketed: [HOST]:PORT" % addr)
        if not port_s.isdigit():
            if port_s[0] == "-" and port_s[1:].isdigit():
                raise ValueError("port %s out of range 0..65535 in %r" % (port_s, addr))
            raise ValueError("port %r of address %r is not a number (accepted: %s)"
                             % (port_s, addr, _ADDRESS_FORMS))
        port = _check_port(int(port_s), addr)
        if not host:
            host = "0.0.0.0"          # ":8080" means all IPv4 interfaces (as in Go goev)
    else:
        raise TypeError("address must be a str or a (host, port) tuple, got %r" % (addr,))
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(fam, host.partition("%")[0])
        except OSError:
            continue
        if fam == socket.AF_INET:
            return fam, (host, port)
        return fam, socket.getaddrinfo(host, port, fam, socket.SOCK_STREAM)[0][4]
    if not host or any(c in host for c in " /\\@[]"):
        raise ValueError("malformed host in address %r" % (addr,))
    if not resolve:
        return socket.AF_UNSPEC, (host, port)
    try:
        info = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise socket.gaierror(e.errno, "%s: %r" % (e.strerror, host)) from None
    return info[0][0], info[0][4]


def _host_of(addr: Union[str, tuple]) -> str:
    """The host part of a TCP address as written (no brackets): the TLS server name."""
    host = addr[0] if isinstance(addr, tuple) else addr.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _check_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    """Validate an integer argument; the message names it, its value and the limit."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("%s must be an int, got %r" % (name, value))
    if value < minimum:
        raise ValueError("%s must be >= %d, got %r" % (name, minimum, value))
    if maximum is not None and value > maximum:
        raise ValueError("%s must be <= %d (%#x), got %r" % (name, maximum, maximum, value))
    return value


def _check_pollers(pollers: Any) -> int:
    """Validate a poller count: an int from 1 to a bound this machine can take.

    Each poller is a thread with fds of its own (epoll, the waker, a listener
    when serving), and the process's fd limit (RLIMIT_NOFILE) is mostly for
    connections, so the bound is an eighth of that limit, and at most
    max(64, 16 per core): threads beyond the cores add no speed (under the
    GIL, none beyond one; processes -- serve(workers=N) -- use the cores).
    Raises TypeError/ValueError; a count above the bound is
    refused at once, with the reason, instead of failing on EMFILE after
    thousands of threads.  ``"auto"`` is one poller per core this process may
    run on when the GIL is off (free-threaded CPython: pollers run Python in
    parallel) and 1 under the GIL (extra pollers only add contention there),
    within the same bound; returns the count."""
    auto = isinstance(pollers, str) and pollers == "auto"
    if not auto:
        _check_int("pollers", pollers, 1)
    cpus = os.cpu_count() or 1
    most = max(64, 16 * cpus)
    why = ("each poller is a thread, and threads beyond the cores add no speed (under the GIL, "
           "beyond one): worker processes (serve(workers=N), --workers N) use the %d core%s"
           % (cpus, "s" * (cpus > 1)))
    try:
        import resource
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):    # pragma: no cover - no resource module
        nofile = resource = None                  # type: ignore[assignment]
    if resource is not None and nofile != resource.RLIM_INFINITY and nofile // 8 < most:
        most = max(1, nofile // 8)
        why = ("each poller holds fds of its own (epoll, waker, a listener) and this process may "
               "open %d fds (RLIMIT_NOFILE, `ulimit -n`), most of them for connections: an eighth "
               "at most for pollers" % nofile)
    if auto:
        if getattr(sys, "_is_gil_enabled", lambda: True)():
            return 1
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):         # pragma: no cover - not Linux
            cores = cpus
        return max(1, min(cores, most))
    if pollers > most:
        raise ValueError("pollers=%d is too many: at most %d here (%s)" % (pollers, most, why))
    return pollers


_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("", "0", "false", "no", "off")


def _env_flag(name: str) -> bool:
    """An environment variable read as a switch: 1/true/yes/on (any case) is
    True, unset or 0/false/no/off/"" is False; anything else is a ValueError
    naming the variable and the spellings (a typo must not flip the switch)."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE_WORDS:
        return True
    if value in _FALSE_WORDS:
        return False
    raise ValueError("%s=%r: expected one of 1, true, yes, on (on) or 0, false, no, off, empty (off)"
                     % (name, os.environ[name]))


def _check_delay(name: str, value: Any) -> float:
    """Validate a delay (seconds or ms): a real number, >= 0, not NaN (inf is fine)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError("%s must be a number, got %r" % (name, value))
    if value != value or value < 0:
        raise ValueError("%s must be >= 0 and not NaN, got %r" % (name, value))
    try:
        return float(value)
    except OverflowError:                 # an int beyond float range: "never"
        return math.inf


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception:                     # a user __repr__ must not hide the real error
        return "<%s object at %#x>" % (type(obj).__name__, id(obj))


def _bare(e: Any) -> Any:
    """``e`` without its traceback and chained exceptions: a stored error
    (``handler.error``) must not keep alive the frames it was raised in, which
    hold the handler, until a full garbage collection."""
    e.__traceback__ = None
    e.__context__ = e.__cause__ = None
    return e


def _oserror(code: int, what: str = "") -> OSError:
    """OSError(code) picks the subclass: ConnectionRefusedError, TimeoutError, ..."""
    msg = os.strerror(code)
    return OSError(code, "%s: %s" % (msg, what) if what else msg)


# =============================================================================
# 4. Poller backends: epoll, selectors, and the waker
# =============================================================================
# A backend is register(fd, bits), modify(fd, bits), unregister(fd) (raises
# OSError if the fd is closed or not registered), poll(timeout) -> [(fd, ev)],
# close(), drop_stale(), and ``native``: EV_* mask -> the bits register/modify
# take.  The epoll backend's register/modify/unregister/poll are the epoll
# object's own methods: no Python frame between a handler and epoll_ctl.
#
# Facts about epoll worth knowing (epoll(7)):
# - epoll watches the *open file description*, not the fd number.  close(fd)
#   removes it only if no dup() (or forked child) holds the description; so
#   goev always unregisters *before* closing, and closes at the end of a batch
#   so the number cannot be reused (by accept on another poller) while events
#   for it are still being dispatched.
# - EPOLLHUP and EPOLLERR are always reported, asked for or not.  Data that
#   arrived before a FIN or RST is still readable when they are: read first.
# - EPOLLRDHUP says "the peer sent FIN" (half-close); goev asks for it with
#   EV_IN only, so a handler that stopped reading is not woken by it forever.
# - Level-triggered (the default) repeats readiness until it is consumed; with
#   EV_ET a handler must read until read() returns None.

class _EpollBackend:
    """epoll, level-triggered unless EV_ET; EV_IN also asks for EPOLLRDHUP."""
    __slots__ = ("_ep", "poll", "register", "modify", "unregister")
    name = "epoll"
    threadsafe_ctl = True      # epoll_ctl from another thread is safe and immediate
    native = {ev: ev | _EPOLLRDHUP if ev & EV_IN else ev for ev in _EVENT_MASKS}

    def __init__(self) -> None:
        ep = self._ep = select.epoll()       # CPython opens it with EPOLL_CLOEXEC
        self.poll = ep.poll                  # poll(timeout_s, -1): -1 blocks forever
        self.register, self.modify, self.unregister = ep.register, ep.modify, ep.unregister

    def drop_stale(self, fd: int, live: Callable[[], list]) -> None:
        """Forget ``fd``: epoll reports it but no handler owns it, because it was
        closed behind goev's back (os.close, a socket closed directly).  DEL by
        number works while the number still names that file.  Once it does not
        (closed: EBADF, or reused: ENOENT) and a dup() or a forked child keeps the
        old file description open, epoll keeps it registered and, level-triggered,
        reports it forever: a busy loop nothing can DEL.  Then a fresh epoll
        instance is put under the same fd number (so ``poll`` stays valid) and
        ``live()``'s (fd, events) pairs are registered again.  Rare and O(n)."""
        try:
            self._ep.unregister(fd)
            return
        except OSError:
            pass
        new = select.epoll()
        try:
            os.dup2(new.fileno(), self._ep.fileno(), inheritable=False)
        finally:
            new.close()
        for lfd, ev in live():
            try:
                self.register(lfd, self.native[ev])
            except FileExistsError:  # registered meanwhile by another thread (add_handler)
                pass

    def close(self) -> None:
        self._ep.close()


class _SelectorsBackend:
    """The same contract over the ``selectors`` module (kqueue, poll, select).

    No RDHUP and no edge trigger: EV_ET is served level-triggered (a handler
    written for ET loops until read() returns None, which stays correct), and
    a hang-up shows up as readable + a read of b"" or an error.  On Linux,
    where DefaultSelector would be epoll again, PollSelector is used so that
    forcing this backend really tests a different kernel path.
    """
    __slots__ = ("_sel",)
    name = "selectors"
    threadsafe_ctl = False     # a registration made while poll() sleeps is not seen
    native = {ev: ev for ev in _EVENT_MASKS}

    def __init__(self) -> None:
        cls: type[selectors.BaseSelector] = selectors.DefaultSelector
        if cls.__name__ == "EpollSelector" and hasattr(selectors, "PollSelector"):
            cls = selectors.PollSelector
        self._sel = cls()

    @staticmethod
    def _mask(ev: int) -> int:
        return (selectors.EVENT_READ if ev & EV_IN else 0) | (selectors.EVENT_WRITE if ev & EV_OUT else 0)

    def register(self, fd: int, ev: int) -> None:
        self._sel.register(fd, self._mask(ev))

    def modify(self, fd: int, ev: int) -> None:
        self._sel.modify(fd, self._mask(ev))

    def unregister(self, fd: int) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def drop_stale(self, fd: int, live: Callable[[], list]) -> None:
        """Forget an fd closed behind goev's back (poll() keys on the number: enough)."""
        self.unregister(fd)

    def poll(self, timeout: float) -> list:
        R = selectors.EVENT_READ
        return [(key.fd, (EV_IN if m & R else 0) | (EV_OUT if m & selectors.EVENT_WRITE else 0))
                for key, m in self._sel.select(None if timeout < 0 else timeout)]

    def close(self) -> None:
        self._sel.close()


_BACKENDS: dict[str, type] = {"selectors": _SelectorsBackend}
if hasattr(select, "epoll"):
    _BACKENDS["epoll"] = _EpollBackend


def _pick_backend(name: str) -> type[Any]:
    """'auto' -> GOEV_BACKEND if set, else epoll where it exists, else selectors."""
    if not isinstance(name, str):
        raise TypeError("backend must be a str, got %r" % (name,))
    if name == "auto":
        name = os.environ.get("GOEV_BACKEND", "") or ("epoll" if "epoll" in _BACKENDS else "selectors")
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError("unknown backend %r (choose from %s)"
                         % (name, ", ".join(["auto"] + sorted(_BACKENDS)))) from None


class _Waker:
    """Wakes a sleeping poller from another thread (the self-pipe trick).

    An eventfd where the OS has one (one fd, an 8-byte counter), else a
    non-blocking socketpair.  wake() never blocks: a full pipe or a counter
    already set means the poller is awake anyway.  drain() empties it.
    ``writes`` counts the wake-ups written (it shows that bursts coalesce).
    """
    __slots__ = ("fd", "_w", "_pair", "_lock", "writes")

    def __init__(self) -> None:
        self._pair = None
        # wake() (any thread) and close() (the poller, at stop) exclude each
        # other: without the lock a wake racing stop() could write into an fd
        # number that close() just freed and another thread reused.  An RLock,
        # because a signal handler may post on a thread already inside wake().
        # Cheap: posts coalesce, so wake() runs once per burst, not per post.
        self._lock = _Lock()
        self.writes = 0
        if hasattr(os, "eventfd"):
            self.fd = self._w = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:                                             # pragma: no cover
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            self._pair = (r, w)
            self.fd, self._w = r.fileno(), w.fileno()

    _ONE = (1).to_bytes(8, sys.byteorder)

    def wake(self) -> None:
        with self._lock:
            w = self._w
            if w < 0:           # closed: the poller is gone, nobody to wake
                return
            self.writes += 1
            try:
                os.write(w, self._ONE)
            except OSError:     # EAGAIN: already awake -- harmless
                pass

    def drain(self) -> None:
        try:
            while os.read(self.fd, _DRAIN_CHUNK):
                if self._pair is None:
                    break
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            fd, self.fd, self._w = self.fd, -1, -1    # first: a reentrant wake() sees -1
            if self._pair:
                for s in self._pair:
                    s.close()
                self._pair = None
            elif fd >= 0:
                os.close(fd)


# =============================================================================
# 5. The timer heap (4-ary) and Timer
# =============================================================================
# Every poller keeps its timers in a 4-ary min-heap.  An entry *is* the Timer:
# a small list [deadline, seq, fn, args, poller, interval, ...] (the entry
# pattern of the heapq docs), so list comparison runs in C, the unique seq
# makes ties FIFO and keeps fn out of the comparison, and one object per timer
# (not a Timer plus a tuple) halves the allocations the garbage collector
# counts.  Why 4-ary: the tree is half as deep as a binary heap, so a pop does
# half as many Python-level levels, each one a single C call (min over 4
# siblings); pushes of later deadlines (the common case) stop at once.
# Cancel is lazy -- the Timer forgets its callback and the entry is skipped
# when it surfaces -- and the heap is compacted when more than half of it is
# dead, so schedule/cancel churn cannot grow memory.  Deadlines are
# time.monotonic() seconds: wall-clock jumps cannot move them.

_WHEN = operator.itemgetter(0)      # sort keys of heap entries (see _Poller._run_timers)
_SEQ = operator.itemgetter(1)


def _heap_push(heap: list, item: list) -> None:
    """Add ``item``: sift up from the new leaf (parent of i: (i - 1) // 4)."""
    heap.append(item)
    i = len(heap) - 1
    while i:
        p = (i - 1) >> 2
        parent = heap[p]
        if item < parent:
            heap[i] = parent
            i = p
        else:
            break
    heap[i] = item


def _sift_down(heap: list, i: int, item: list) -> None:
    """Put ``item`` at slot ``i`` or below: while the smallest of the (up to
    four) children at 4i+1 .. 4i+4 is smaller, move it up and descend."""
    n = len(heap)
    c = 4 * i + 1
    while c < n:
        kids = heap[c:c + 4]
        m = min(kids)
        if m < item:
            j = c + kids.index(m)
            heap[i] = m
            i = j
            c = 4 * j + 1
        else:
            break
    heap[i] = item


def _heap_pop(heap: list) -> list:
    """Remove and return the smallest item (the heap must not be empty)."""
    last = heap.pop()
    if not heap:
        return last
    top = heap[0]
    _sift_down(heap, 0, last)
    return top


def _heapify(heap: list) -> None:
    """Make ``heap`` a heap in place: sift down every parent, the last first."""
    for i in reversed(range((len(heap) - 2) // 4 + 1)):
        _sift_down(heap, i, heap[i])


class Timer(list):
    """A scheduled call, returned by ``call_later``; ``cancel()`` from any thread.

    ``when`` is the monotonic deadline in seconds, ``interval`` the period in
    seconds (0 for one-shot).  A cancelled timer never runs, and it drops its
    callback and arguments at once.  It is the heap entry itself, a list
    ``[when, seq, fn, args, poller, interval]`` (periodic: ``+ [first, n]``,
    deadline n being first + n * interval, computed, so no drift): treat it as
    opaque.  It hashes by identity.  Not made directly: ``Timer()`` raises
    TypeError (a timer belongs to a poller's heap; ``call_later`` puts it there).
    """
    __slots__ = ()
    __hash__ = object.__hash__      # type: ignore[assignment]  # list's is None: by identity here

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Only users call this: goev makes its timers with _new_timer (list.__new__)
        # and fills them in place, so no Python frame per timer.
        raise TypeError("goev.Timer is not made directly: Reactor.call_later(delay_s, fn, *args) "
                        "or IOHandle.schedule_timer(delay_ms) returns one")

    when = property(_WHEN, doc="The monotonic deadline, seconds.")
    interval = property(operator.itemgetter(5), doc="The period in seconds, 0 for one-shot.")

    def cancel(self) -> None:
        """Cancel the timer; idempotent, safe from any thread and from callbacks.

        On the poller thread the callback will not run after this returns.  From
        another thread a callback the poller has already started (it is due right
        now) may still be running; any later one will not start."""
        if self[2] is not None:
            p = self[4]
            # Counted for compaction (see _Poller._timers_dead): the poller's
            # thread in its own counter, any other under the poller's lock.
            if p._mine._is_owned():
                self[2] = self[3] = None      # (the poller skips an entry with either None)
                p._cancels += 1
                return
            with p._lock:
                if self[2] is not None:       # two threads racing: one counts
                    self[2] = self[3] = None
                    p._cancels_elsewhere += 1

    @property
    def cancelled(self) -> bool:
        """True once cancelled or, for a one-shot timer, once it has run."""
        return self[2] is None

    def __repr__(self) -> str:
        state = "done" if self[2] is None else "in %.3fs" % (self[0] - _monotonic())
        every = " every %gs" % self[5] if self[5] else ""
        return "<goev.Timer %s%s>" % (state, every)


_new_timer = list.__new__      # an empty Timer without Timer.__init__


# =============================================================================
# 6. IOHandle: the handler base
# =============================================================================
# One IOHandle per socket.  Its state lives in __slots__ set by __new__, so a
# subclass may define __init__ without calling super().__init__().  States:
# OPEN -> (CLOSING: flushing, then) CLOSED.  Invariants: the write queue only
# ever holds bytes the kernel refused, in order; EV_OUT is armed exactly while
# the queue is non-empty (or the user asked for it); reading pauses above the
# high water mark; on_close runs exactly once, after the fd left the poller.

_OPEN, _CLOSING, _CLOSED = 0, 1, 2
_EMPTY_VIEW = memoryview(b"")
_os_write = os.write      # the fd-level I/O of a poller that is not tracing (see _Poller)


def _closes(h: "IOHandle", keep: Any) -> bool:
    """Does ``keep``, what on_read/on_write returned, close the handler?  False
    closes (after the flush).  None -- a function without a return statement --
    keeps the connection, except after end of stream (read() returned empty and
    polling for input stopped): then it closes too.  Return True to keep a
    half-closed connection open for writing."""
    return keep is False or keep is None and h._eof


class _BareFd:
    """The ``_sock`` of a handler that owns its fd without a socket object.

    An accepted connection needs none on the hot path (I/O is fd-level), and
    making one costs a getsockname() syscall and about 5 % of an accept's CPU.
    ``IOHandle._socket()`` makes it on first need (peer, shutdown, abort)."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "<bare fd>"


_BARE = _BareFd()


class IOHandle:
    """Base class of every handler.  Subclass it and override the ``on_*`` callbacks.

    Every callback runs on the thread of the poller that owns the handler.
    Two ways to receive: override ``on_data(data)`` (and maybe ``on_eof()``)
    and goev reads for you; or override ``on_read`` and call ``read()``
    yourself -- one or the other.  ``on_read``/``on_write`` return True to keep
    going, False to close (queued data is still flushed; call ``abort()`` to
    drop it).  An exception in a callback is logged on the "goev" logger and
    closes this handler only.

    Attributes: ``fd`` (-1 once closed), ``reactor`` (where ``on_open``
    registers), ``poller``, ``peer`` (the remote address), ``error`` (the
    OSError that ended the connection, if any), ``cache`` (the poller's dict),
    ``sock_peer`` (the socket's own peer: the balancer, with the PROXY protocol),
    ``sock`` (the socket, for options such as ``setsockopt``).
    """
    __slots__ = ("fd", "reactor", "poller", "_peer", "error", "_sock", "_wq", "_wq_bytes",
                 "_user", "_mask", "_state", "_eof", "_paused", "_shut_wr", "_timer",
                 "_high", "_low", "dropped_bytes", "_watcher", "_feeds", "__weakref__")
    # The slots' types, for type checkers (annotations only: no class attribute,
    # no run-time cost).  reactor and poller are None until the handler is
    # accepted, connected or registered: typed as set, as every callback sees them.
    fd: int
    reactor: "Reactor"
    poller: "_Poller"
    _peer: Any
    error: Optional[BaseException]
    _sock: Any                  # a socket, _BARE (fd-level only) or None once closed
    _wq: Optional[collections.deque]
    _wq_bytes: int
    _user: int                  # the events the user asked for (add_handler, append_event)
    _mask: int                  # the events registered with the backend now (_update decides)
    _state: int
    _eof: bool                  # end of stream seen: input is no longer polled
    _paused: bool               # reading paused: the send queue is above the high water mark
    _shut_wr: bool
    _timer: Optional[Timer]
    _high: int
    _low: int
    dropped_bytes: int
    _watcher: Any               # see _Poller's hooks: told when the handler opens/fails/closes
    _feeds: bool                # the loop reads for on_data itself (see __init_subclass__)
    _feeding = False        # on_data without a read() override: see __init_subclass__

    def __new__(cls, *args: Any, **kwargs: Any) -> "IOHandle":
        self = object.__new__(cls)
        self.fd = -1
        self.reactor = self.poller = self._peer = self.error = None    # type: ignore[assignment]  # (see above)
        self._sock = self._wq = self._timer = self._watcher = None
        self._wq_bytes = self._user = self._mask = self.dropped_bytes = 0
        self._state = _OPEN
        self._eof = self._paused = self._shut_wr = False
        self._feeds = cls._feeding          # (a slot: the loop reads it per event)
        self._high, self._low = DEFAULT_HIGH_WATER, DEFAULT_LOW_WATER
        return self

    # -- callbacks (override these) ------------------------------------------

    def on_open(self) -> Optional[bool]:
        """After accept/connect, before registration, on the acceptor's or connector's
        poller thread.  Default: register EV_IN on ``self.reactor``.  False closes.
        An override that returns None (a greeting, say) and registers nothing is
        registered for EV_IN by goev; one that registered the handler itself (on
        any reactor, for any events) or closed it is left as it is."""
        self.reactor.add_handler(self, self.fd, EV_IN)
        return True

    def on_read(self) -> Optional[bool]:
        """The fd is readable (or hung up).  Default: read and discard.  Return
        False to close (after the flush); None keeps the connection, except at
        end of stream, where it closes too (True keeps a half-closed one)."""
        self.read()
        return None

    def on_data(self, data: memoryview) -> None:
        """Bytes arrived: ``data`` is a memoryview of the poller's shared buffer,
        valid until this callback returns (copy with ``bytes(data)`` to keep it).

        The other way to write a handler (asyncio's ``data_received``): a class
        that overrides ``on_data`` gets the reading done for it -- goev reads,
        then calls ``on_data`` with the bytes, or ``on_eof()`` at end of stream.
        Its return value is ignored: call ``close()`` to close.  Such a class
        must not also override ``on_read`` (TypeError when the class is
        defined).  TLS connections take the same path (plaintext)."""

    def on_eof(self) -> None:
        """End of stream (the peer's FIN, or a reset: then ``self.error`` is set)
        on a handler that overrides ``on_data``; input is no longer polled.
        Default: ``close()``, after the queued data is flushed.  Override it to
        answer a half-close (write, then close)."""
        self.close()

    def _feed(self) -> bool:
        """``on_read`` of a class that overrides ``on_data`` (set by __init_subclass__):
        read, then on_data(view), or on_eof() at end of stream.  Edge-triggered
        (EV_ET), it reads until nothing is left, as section 4 requires."""
        while True:
            data = self.read()
            if data:
                self.on_data(data)
                if self._mask & EV_ET and self._mask & EV_IN:
                    continue                    # edge-triggered: until read() says None
            elif data is not None:
                self.on_eof()
            return True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A class that overrides ``on_data`` gets ``on_read = _feed``.  If it also
        keeps IOHandle's plain ``read`` (not TLS's), ``_feeding`` is True: copied
        to each handler's ``_feeds`` slot, it lets the loop do the reading itself
        (see _Poller._loop)."""
        super().__init_subclass__(**kwargs)
        if cls.on_data is IOHandle.on_data:
            return
        if cls.on_read is not IOHandle.on_read and cls.on_read is not IOHandle._feed:
            raise TypeError("%s has both on_data and on_read: on_data is called with "
                            "what goev read for it, on_read does its own reading -- "
                            "keep one" % cls.__qualname__)
        cls.on_read = IOHandle._feed  # type: ignore[method-assign]
        cls._feeding = cls.read is IOHandle.read

    def on_write(self) -> Optional[bool]:
        """The fd is writable.  Default: flush the send queue (keep this if you
        override).  False closes; None keeps, except after end of stream (see
        ``_closes``); True keeps."""
        return self._flush()

    def on_timeout(self, now_ms: int) -> bool:
        """The handler's timer fired; ``now_ms`` is monotonic ms.  False stops a periodic timer."""
        return False

    def on_connect_fail(self, err: OSError) -> None:
        """A Connector could not connect: ``err`` is ConnectionRefusedError, TimeoutError, ..."""

    def on_write_drained(self) -> None:
        """The send queue just became empty."""

    def on_close(self) -> None:
        """Called exactly once, after the fd left the poller.  Default: ``destroy()``."""
        self.destroy()

    # -- reading ----------------------------------------------------------------

    def read(self) -> Optional[memoryview]:
        """Read once into the poller's shared buffer (poller thread only).

        Returns a memoryview valid until the next read on this poller (copy
        with ``bytes(view)`` to keep it); an *empty* view at end of stream
        (FIN, or a reset -- then ``self.error`` holds the ConnectionResetError);
        None when nothing was ready.  After end of stream the handler stops
        being polled for reading.  The view belongs to the poller: reads of
        one length may return the same view object (releasing it is
        harmless: the next read of that length makes a new one).  Works on
        any fd, not only sockets (a pipe registered with ``add_handler``).

        On a closed handler it returns an empty view (end of stream) and
        leaves ``error`` as it is.  Raises RuntimeError on a handler that was
        never registered (read in on_read: on_open runs before registration).
        """
        p = self.poller
        try:
            readv = p._readv                    # (a local: calling an instance attribute is slower)
            n = readv(self.fd, p._rlist)        # os.readv into the shared buffer
        except BlockingIOError:
            return None
        except AttributeError:                  # no poller (p is None): see _read_unregistered
            if p is not None:
                raise
            return self._read_unregistered()
        except OSError as e:                    # a reset: end of stream, with the reason kept
            if self.fd < 0:                     # closed (EBADF): no error of the connection's
                return _EMPTY_VIEW
            self.error = _bare(e)               # (see _bare: no traceback kept)
            n = 0
        if n:
            # The answer is the buffer's first n bytes: p._rview[:n].
            # fast path: one view per length, made once (by _Poller._view) and
            # handed out again: slicing allocates a GC-tracked object, the
            # largest cost of a small read.  Pays 8.6 % of a 64-byte echo's
            # instructions.  A view a user release()d raises ValueError: then a
            # new one is made.
            if n < _VIEW_CACHE:
                try:
                    v = p._views[n]
                    if v:                       # None: a new length
                        return v
                except ValueError:
                    pass
            return p._view(n)                   # a new length, or a long read
        return self._input_ended()

    def _input_ended(self) -> memoryview:
        """End of stream: stop polling for input (nothing more will come); the
        empty view ``read()`` returns."""
        self._eof = True
        # fast path: with reading the only interest, _update's answer is "no
        # events": unregister without its frame.  With the same shortcut in
        # _Poller._add, 2.7 % of an accept's instructions (bench/icount.py).
        if self._mask == EV_IN:
            self._mask = 0
            try:
                self.poller._backend.unregister(self.fd)
            except OSError:
                pass
        elif self._mask:
            self._update()
        return _EMPTY_VIEW

    def _read_unregistered(self) -> memoryview:
        """read() without a poller: end of stream once closed, else a RuntimeError
        that says where reading works."""
        if self._state == _CLOSED:
            return _EMPTY_VIEW
        raise RuntimeError("read() on %s, which is not registered with a reactor: read in on_read "
                           "(on_open runs before registration; Reactor.add_handler registers)"
                           % _safe_repr(self))

    # -- writing ----------------------------------------------------------------

    def write(self, data: Any) -> None:
        """Send ``data`` now; queue what the kernel did not take (in order), arm EV_OUT.

        Never blocks.  From a thread other than the owning poller's it behaves as
        ``async_write``.  After ``close()`` data is dropped and counted in
        ``dropped_bytes``.  Above the high water mark reading pauses.  Raises
        RuntimeError on a handler that has no connection yet (never accepted or
        connected: fd -1); ``on_open`` is the first place to write.
        """
        p = self.poller
        if p is None:                     # not registered yet (a write in on_open)
            write = _os_write
        # fast path: p._direct() written out -- the call's frame cost 6 % of an
        # echo's instructions.
        elif p._mine._is_owned() or p._state == _NEW:
            write = p._write
        else:
            self.async_write(data)
            return
        if self._state or self._shut_wr:
            self.dropped_bytes += len(data)
            return
        if self._wq:                      # (memoryview: bytes(5) would queue five NULs)
            self._enqueue(bytes(memoryview(data)))
            return
        try:
            n = write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self._write_failed(e)
            return
        if n != len(data):
            self._enqueue(bytes(memoryview(data)[n:]))

    def async_write(self, data: Any) -> None:
        """Like ``write``, safe from any thread: the data is copied and sent, in
        order, by the owning poller.  On the owning thread it writes directly.

        FIFO per handler; with the poller's own ``write`` calls the data takes
        its place when the poller runs the posted write: before any later
        ``post_to`` and, unless a flood of more than _INBOX_BATCH posts is queued
        ahead of it, before the poller handles an I/O event that happened after
        this call returned.  Once the handler is closed (or the
        reactor stopped) the data is dropped and counted in ``dropped_bytes``;
        it is tied to this handler object, never to the fd number, so a new
        handler that reuses the number never receives it."""
        p = self.poller
        if p is None or p._direct():
            self.write(data)
            return
        # bytes(memoryview(x)) copies any buffer and, unlike bytes(x), rejects an
        # int (bytes(5) would send five NULs) with a TypeError naming the type.
        p._post(self._write_posted, data if type(data) is bytes else bytes(memoryview(data)))

    def _write_posted(self, data: bytes) -> None:
        if self._state == _CLOSED:
            self.dropped_bytes += len(data)
        else:
            self.write(data)

    @property
    def pending_write_bytes(self) -> int:
        """Bytes queued and not yet taken by the kernel."""
        return self._wq_bytes

    def set_write_buffer_limits(self, high: int = DEFAULT_HIGH_WATER, low: Optional[int] = None) -> None:
        """Set the high/low water marks (bytes); ``low`` defaults to high // 4."""
        high = _check_int("high", high, 0)
        low = high // 4 if low is None else _check_int("low", low, 0)
        if low > high:
            raise ValueError("low water mark %d is above high water mark %d" % (low, high))
        self._high, self._low = high, low

    def _enqueue(self, buf: bytes) -> None:
        wq = self._wq
        if wq is None:
            wq = self._wq = collections.deque()
        wq.append(buf)
        self._wq_bytes += len(buf)
        if self._wq_bytes > self._high and not self._paused:
            self._paused = True
        if self.poller is not None and (not self._mask & EV_OUT or self._paused and self._mask & EV_IN):
            self._update()

    def _flush(self) -> bool:
        """Send as much of the queue as the kernel takes; always returns True."""
        wq = self._wq
        if not wq:              # nothing queued (the user armed EV_OUT): no "drained" event
            return True
        p, fd = self.poller, self.fd
        write, writev = (_os_write, os.writev) if p is None else (p._write, p._writev)
        while wq:
            try:
                if len(wq) == 1:
                    offered = len(wq[0])
                    n = write(fd, wq[0])
                else:                          # gather many small writes into one syscall
                    bufs = list(itertools.islice(wq, _SENDMSG_MAX))
                    offered = sum(map(len, bufs))
                    n = writev(fd, bufs)
            except BlockingIOError:
                break
            except OSError as e:
                self._write_failed(e)
                return True
            self._wq_bytes -= n
            short = n < offered
            while n:
                head = wq[0]
                if n >= len(head):
                    n -= len(head)
                    wq.popleft()
                else:
                    wq[0] = memoryview(head)[n:]
                    n = 0
            if short:                          # the kernel is full: wait for EV_OUT
                break
        if self._paused and self._wq_bytes <= self._low and not self._state:
            self._paused = False
            self._update()
        if not wq:
            self._drained()
        return True

    def _drained(self) -> None:
        self._update()
        if self._shut_wr and self._sock is not None:
            try:
                self._socket().shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if self._state == _CLOSING:
            self._close_now()
            return
        self.on_write_drained()

    def _write_failed(self, e: OSError) -> None:
        """The peer is gone (EPIPE/ECONNRESET): drop the queue, close quietly.
        No fd at all (EBADF on fd -1: a closed handler's data was dropped before
        the write) is a RuntimeError: the handler has no connection yet."""
        if self.fd < 0:
            raise RuntimeError("write() on %s, which has no connection yet (fd %d): write from on_open "
                               "on, once accepted or connected" % (_safe_repr(self), self.fd)) from None
        self.error = _bare(e)
        self._drop_queue()
        self._eof = True
        if self.poller is not None:
            self._close_now()
        # else: not registered yet (a write in on_open); Reactor.add_handler aborts it

    # -- closing ------------------------------------------------------------------

    def _drop_queue(self) -> None:
        """Forget the unsent queue, counting its bytes in ``dropped_bytes``."""
        if self._wq:
            self.dropped_bytes += self._wq_bytes
            self._wq.clear()
        self._wq_bytes = 0

    def _posted_if_elsewhere(self, method: Callable[[], None]) -> bool:
        """Called off the owning poller's thread while its loop may run (see
        _Poller._foreign): post ``method`` there and return True (a handler's
        state is only touched on its poller)."""
        p = self.poller
        if p is not None and p._foreign():
            p._post(method)
            return True
        return False

    def close(self) -> None:
        """Flush the send queue, then close; idempotent; from any thread."""
        # fast path: _posted_if_elsewhere(self.close) written out, the usual
        # answer (on the poller's thread) first: 2.5 % of an accept's
        # instructions.
        p = self.poller
        if p is not None and not p._mine._is_owned() and p._foreign():
            p._post(self.close)
            return
        if self._state:
            return
        if self._wq and self.error is None:
            self._state = _CLOSING
            self._update()                 # stop reading, keep EV_OUT
        else:
            self._close_now()

    def abort(self) -> None:
        """Close at once: drop the send queue and reset the connection (RST)."""
        if self._posted_if_elsewhere(self.abort):
            return
        if self._state == _CLOSED:
            return
        self._drop_queue()
        s = self._socket()
        if s is not None and s.family != socket.AF_UNIX:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        self._close_now()

    def shutdown_write(self) -> None:
        """Half-close: send FIN once the queue is flushed; reading continues."""
        if self._posted_if_elsewhere(self.shutdown_write):
            return
        if self._shut_wr or self._state:
            return
        self._shut_wr = True
        if not self._wq and self._sock is not None:
            try:
                self._socket().shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _close_now(self) -> None:
        """Leave the poller now; on_close and the real close(fd) follow at the end of
        the current loop step (so the fd number is not reused mid-batch)."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        p = self.poller
        if p is None:                      # never registered: nothing to wait for
            self._finish_close()
            return
        self._leave_poller(p)
        p._closing.append(self)

    def _leave_poller(self, p: "_Poller") -> None:
        """Unregister from ``p`` and forget the fd there; the socket stays open."""
        if self._mask:
            self._mask = 0
            try:
                p._backend.unregister(self.fd)
            except OSError:     # closed behind goev's back (EBADF) or already gone (ENOENT)
                pass
        if p._handlers.get(self.fd) is self:
            del p._handlers[self.fd]

    def _detach(self) -> socket.socket:
        """Leave the poller without closing the socket and return it: how the
        internal handlers (connect, PROXY header, TLS handshake) hand a socket on."""
        self.cancel_timer()
        self._leave_poller(self.poller)
        self._state = _CLOSED
        sock, self._sock = self._socket(), None
        return sock

    def _finish_close(self) -> None:
        try:
            self.on_close()
        except Exception:
            _log.exception("exception in on_close of %s", _safe_repr(self))
        finally:                           # also on KeyboardInterrupt: the fd is closed
            if self._sock is not None or self._wq:
                self.destroy()             # (on_close did not)
        if self._watcher is not None:
            self._watcher._handler_closed(self)

    def destroy(self) -> None:
        """Release the socket and the send queue (the default ``on_close``); idempotent.

        goev always closes the fd itself once the handler is closed; calling
        this early (from ``on_close``) is allowed, as in the Go original.  Called on
        a handler still registered (poller thread), it first leaves the poller
        (on_close follows): a socket closed under a registered handler would leave
        a stale table entry that refuses the next handler given the same number."""
        if self._state != _CLOSED and self.poller is not None and self._sock is not None:
            self._close_now()
        if self._wq:                       # (mostly empty: skip the call)
            self._drop_queue()
        sock, self._sock = self._sock, None
        if sock is not None:
            fd, self.fd = self.fd, -1
            if sock is _BARE:
                os.close(fd)
            else:
                sock.close()

    def _abandon(self) -> None:
        """The reactor is stopping and closes this handler (hook: a connect in
        progress reports ConnectionAbortedError instead)."""
        self._close_now()

    def _reset_transport(self) -> None:
        """Before a new connect: forget what a previous connection layered on
        this handler (hook: a TLS handler becomes its plain class again)."""

    def _wind_down(self) -> None:
        """Reactor.shutdown() drains this handler: close after the flush (hook: a
        connect in progress is left to settle; the handler it opens is drained next)."""
        self.close()

    @property
    def sock(self) -> Any:
        """The connection's socket, for options and addresses (``setsockopt``,
        ``getsockname``); not for I/O (use read/write) and not to close (goev
        does).  An accepted connection has none until this is first read: in
        a callback (on the handler's poller thread) it is made from the fd
        then, and kept.  Read from another thread once the reactor started
        (also in ``on_open`` after ``add_handler`` placed the handler on
        another poller) it is a new object each time, on a dup of the fd:
        options set there apply to the connection; close it when done.  For
        a TLS connection an object with the socket's option and address
        methods.  None for a bare fd registered with ``add_handler``, and
        once closed."""
        s = self._socket()
        if s is _BARE:
            try:
                return socket.socket(fileno=os.dup(self.fd))
            except (OSError, ValueError):      # closed meanwhile
                return None
        return s

    def _socket(self) -> Any:
        """The socket object goev holds for this handler (None if none).  An
        accepted connection's is made from its fd on first need and kept, but
        only where handler state may be touched (the poller's thread, or
        before start()): made on another thread while the poller closes the
        handler, it could outlive the fd and later close a reused number.
        There this returns _BARE unchanged."""
        s = self._sock
        if s is _BARE:
            p = self.poller
            if p is None or p._direct():
                s = socket.socket(fileno=self.fd)   # family and type are read from the fd
                s.setblocking(False)                # (the fd is already: this sets the object's timeout)
                self._sock = s
        return s

    @property
    def closed(self) -> bool:
        """True once the handler has left its poller (or ``close()`` began a flush)."""
        return self._state != _OPEN

    # -- timers ---------------------------------------------------------------------

    def schedule_timer(self, delay_ms: float, interval_ms: float = 0) -> Timer:
        """Call ``on_timeout(now_ms)`` after ``delay_ms``, then every ``interval_ms`` if
        non-zero, until it returns False.  One timer per handler: scheduling again
        replaces the previous one.  The handler must be registered; poller thread only
        (or before the reactor starts).  Cancelled automatically on close."""
        delay = _check_delay("delay_ms", delay_ms)
        interval = _check_delay("interval_ms", interval_ms)
        if interval == math.inf:
            raise ValueError("interval_ms must be finite, got %r" % (interval_ms,))
        if self.poller is None or self._state == _CLOSED:
            raise RuntimeError("schedule_timer: %s is not registered with a reactor" % _safe_repr(self))
        if self._timer is not None:
            self._timer.cancel()
        self._timer = t = self.poller._call_at(_monotonic() + delay / 1000.0, interval / 1000.0,
                                               self._fire_timer, ())
        return t

    def cancel_timer(self) -> None:
        """Cancel the handler's timer, if any (idempotent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire_timer(self) -> bool:
        try:
            keep = self.on_timeout(self.poller.now_ms)
        except Exception:
            self.poller._fault(self, "on_timeout")
            return False
        if self._state == _CLOSED or not keep:
            return False
        return True

    # -- misc ---------------------------------------------------------------------

    @property
    def cache(self) -> dict:
        """The owning poller's cache dict (read without locks, poller thread)."""
        return self.poller.cache

    @property
    def ssl_object(self) -> Any:
        """The ``ssl.SSLObject`` of a TLS connection (getpeercert(), version(),
        cipher() ...), None for plaintext.  See section 13."""
        return None

    @property
    def peer(self) -> Any:
        """The remote address: the one set by whoever opened the connection (the
        client a PROXY-protocol header announced, the address a Connector was
        given), else the socket's ``getpeername()`` -- asked of the kernel when
        read, so an accepted connection stores no address tuple (about 140 bytes
        per idle connection).  None once the socket is closed or reset."""
        return self.sock_peer if self._peer is None else self._peer

    @peer.setter
    def peer(self, addr: Any) -> None:
        self._peer = addr

    @property
    def sock_peer(self) -> Any:
        """The address the socket is really connected to (``getpeername()``), None
        once closed or reset.  It equals ``peer`` except behind a load balancer
        speaking the PROXY protocol (``Acceptor(proxy_protocol=True)``): then
        ``peer`` is the client the balancer announced and ``sock_peer`` the
        balancer.  Asked of the kernel on each call, so no handler carries an
        extra slot for it (memory per idle connection matters here)."""
        s = self._socket()
        if s is None:
            return None
        try:
            if s is _BARE:          # another thread, an accepted connection: ask through a
                t = socket.socket(fileno=self.fd)   # throwaway object that never closes the fd
                try:
                    return t.getpeername()
                finally:
                    t.detach()
            return s.getpeername()
        except (OSError, ValueError):   # closed, reset, or (racing a close) not a socket any more
            return None

    def _update(self) -> None:
        """Make the registered events match the state (the only epoll_ctl MOD site):
        the user's EV_IN while reading may go on (not at end of stream, paused
        by the water marks or closing), EV_OUT while data is queued or the user
        asked for it, EV_ET as the user asked."""
        user = self._user
        want = 0
        if user & EV_IN and not (self._eof or self._paused or self._state):
            want = EV_IN
        if self._wq or user & EV_OUT:
            want |= EV_OUT
        if want:
            want |= user & EV_ET
        have = self._mask
        if want != have and self._state != _CLOSED:
            b = self.poller._backend
            # Publish the mask *before* the syscall: with epoll, add_handler may run
            # on another thread (on_open on the acceptor's poller), and the owning
            # poller can dispatch the fd the instant epoll_ctl returns.  Seeing the
            # old mask 0 there, it would take an IN|HUP|ERR event (data, then a
            # reset) for "not reading" and abort, losing the bytes before the RST.
            self._mask = want
            if not want:
                try:
                    b.unregister(self.fd)
                except OSError:     # closed behind goev's back (EBADF) or already gone (ENOENT)
                    pass
                return
            try:
                if not have:
                    b.register(self.fd, b.native[want])
                else:
                    b.modify(self.fd, b.native[want])
            except BaseException:
                self._mask = have
                raise

    def __repr__(self) -> str:
        state = ("open", "closing", "closed")[self._state]
        if self._eof and not self._state:
            state = "half-closed"
        where = "" if self.poller is None else " poller=%d" % self.poller.index
        q = " queued=%dB" % self._wq_bytes if self._wq_bytes else ""
        return "<%s fd=%d%s peer=%r %s%s>" % (type(self).__name__, self.fd, where, self.peer, state, q)


# =============================================================================
# 7. _Poller: one thread, one loop; the hooks; the slow-callback watchdog
# =============================================================================
# The loop, one pass:  wait (timeout = next timer, 0 if work is queued)
#   -> drain the inbox (cross-thread work) in a bounded batch: first, so work
#      posted before an event happened runs before that event's callback
#   -> dispatch each event: IN first while the handler reads (pending data is
#      read even on HUP/ERR), then OUT (connect completion, flush), then
#      HUP/ERR for a handler that neither reads nor flushes (abort)
#   -> finish closes (on_close, then close(fd)) -> run due timers.
# The event loop in _loop is the only place user I/O callbacks are called
# (timers: _run_timers, posts: _drain_inbox); it catches Exception, logs it
# with the handler's repr (_fault) and closes that handler only.
# KeyboardInterrupt and SystemExit pass through (the state stays consistent,
# so run() may be called again).

# -- Threads and shared state ------------------------------------------------------
# Everything more than one thread touches, who writes it, and why that is safe
# without the GIL (free-threaded CPython, PYTHON_GIL=0).  No row rests on a
# built-in type's own locking (the free-threading HOWTO promises none): a
# write shared by threads is under a lock; a lock-free read from another
# thread is allowed only where a stale value is harmless, and the row says why.
#
#  state                          written by                  safe because
#  inbox + _wake_pending          any thread (_post) /        _Poller._lock around append + test-and-set
#   (_post, _drain_inbox,          the poller (_drain_inbox,   and around clear + take: the two sections
#    _unowned)                     _unowned: clears)           are ordered, so the consumer's take sees
#                                                              the item or the producer sees the flag down
#                                                              and writes the waker (no lost wake-up)
#  _Poller._state, _stop_asked    start/run/stop (any thread, every store under _lock, test and store
#                                  signal handlers), the      together (_advance, _close_all); stop()'s
#                                  poller (CLOSING, DONE)     one-way _stop_asked covers a signal handler
#                                                              re-entering _advance on its own thread.
#                                                              Lock-free reads (_direct, _foreign): only
#                                                              NEW -> RUNNING changes _direct(), and a
#                                                              thread that learned of the handler after
#                                                              start() sees RUNNING; a stale _foreign()
#                                                              only posts what would have been dropped
#  _Poller._handlers              the poller only             add_handler from another thread (epoll)
#  _Poller._arrivals              add_handler (any thread) /  puts the handler in _arrivals under _lock;
#                                  the poller (takes)          the poller moves it over (_arrived) when the
#                                                              posted _arrived runs or at its first event;
#                                                              the other thread's duplicate check reads
#                                                              _handlers lock-free: stale at worst, and
#                                                              then epoll says EEXIST
#  Timer fn/args, cancel counts   the poller; cancel() from   the poller skips an entry if fn *or* args is
#   (_cancels, _cancels_elsewhere) any thread                  cleared (no read order needed); its own count
#                                                              is poller-only, others' under _lock (a stale
#                                                              read only delays a compaction)
#  handler fields: send queue,    the poller only             async_write/close/abort/event changes from
#   mask, state, dropped_bytes,                                another thread are posted (_foreign, _direct),
#   the timer heap, cache,                                     sync_cache and call_later too; the post's
#   _closing, the read buffer                                  lock hands the data over.  Exception: NEW,
#                                                              before start(), is set-up on one thread
#  dropped_bytes after DONE       whoever drops the inbox     _lock: DONE is stored under it, so the
#                                                              poller's earlier counts come first
#  _Waker fd, writes              wake(): any thread;         _Waker._lock (a wake never writes an fd
#                                  close(): the poller         number close() freed)
#  Reactor _drained, _fatal       each poller's thread        Reactor._lock; _fatal is read after the
#                                                              threads that append to it are joined
#  connect/handshake outcome      the poller, a resolver      _take_once: a fresh lock's non-blocking
#   (_ticket)                      thread, connect()           acquire succeeds once
#  resolver jobs and counts       any thread / resolver       its Condition's lock
#  signal wake-up fd (_sig)       the main thread's poller    one thread; the C handler only writes to
#                                                              the fd, set_wakeup_fd(old) goes first
#  ConnectPool's collections      any thread (acquire,        ConnectPool._lock; _failing is a hint and
#   (Part II)                      release), members' pollers  _closed a one-way flag
#  _held (locks held, per thread) its thread                  threading.local
# Tests: "Threads: race-hunting stress" in test_goev.py, run free-threaded by .ci/run.

# -- Hooks: where Part II attaches ----------------------------------------------------
# Part I (sections 1-11) is a complete reactor; Part II adds production extras
# without Part I naming any of them.  Every hook is declared here:
#  * _EXTRAS, a registry Part II fills: "tracer" (trace mode: an _Observer
#    subclass), "proxy" (Acceptor(proxy_protocol=True): an accept stage),
#    "tls_server" (Acceptor(ssl=...): an accept stage), "tls_client"
#    (Connector.connect(ssl=...): a connect stage).  Without Part II these
#    arguments raise RuntimeError, and everything else works.
#  * the loop's observer (_Poller._observer, an _Observer): sees each
#    callback, timer and posted call, registrations and posts (the watchdog
#    below, and trace mode).  None, the usual case, costs one test per event.
#  * the poller's fd-level I/O (_readv, _write, _writev) and its backend:
#    an observer may wrap them (trace mode prints every syscall).
#  * an accept stage (Acceptor._proceed): stage(acceptor, conn, peer, proceed)
#    runs on each accepted socket before a handler exists and calls
#    proceed(conn, peer, prepare=None) when done (or closes conn).
#  * a connect stage (_Connecting._succeed): stage(handler, sock, peer) runs
#    after a connect succeeds and ends in _open_connected or _connect_failed.
#  * IOHandle._watcher: an object told when its handler opened, failed to
#    connect or closed (ConnectPool keeps its members that way).
#  * IOHandle methods a subclass may override: _abandon (the reactor stops),
#    _wind_down (Reactor.shutdown), _update (event changes: TLS checks its
#    buffers), _reset_transport (before a new connect).

_EXTRAS: dict = {}


def _extra(name: str) -> Any:
    """The Part II hook ``name``; RuntimeError if this copy of goev.py has no Part II."""
    try:
        return _EXTRAS[name]
    except KeyError:
        raise RuntimeError("%s needs Part II of goev.py, which this copy lacks" % name) from None


# Names of the hooks' internal callbacks as the user knows them (the watchdog's messages).
_PUBLIC_NAMES = {"_fire_timer": "on_timeout", "_write_posted": "async_write", "_finish_close": "on_close",
                 "_sendto_posted": "sendto"}
# The posted sends whose data a stopped poller drops: function -> how to count
# the drop on the handler (the bytes of an async write; one datagram, section 11).
_POSTED_SENDS: dict = {IOHandle._write_posted: lambda h, args: setattr(h, "dropped_bytes", h.dropped_bytes + len(args[0]))}


def _callback_name(fn: Any) -> str:
    """``Class.method`` for a bound method (as a user wrote it), else the qualified name."""
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", None)
    if owner is not None and name is not None and not isinstance(owner, type):
        return "%s.%s" % (type(owner).__name__, _PUBLIC_NAMES.get(name, name))
    return getattr(fn, "__qualname__", None) or _safe_repr(fn)


class _Observer:
    """Watches one poller's loop; this base class is the slow-callback watchdog.

    With ``slow`` (seconds) set, a handler callback, timer or posted function
    that holds the poller longer logs a WARNING on the "goev" logger, naming
    the handler class and the callback.  The other methods are the hooks
    trace mode prints from (no-ops here).  Poller thread only, except posted()."""
    __slots__ = ("poller", "slow")

    def __init__(self, poller: "_Poller", slow: Optional[float]) -> None:
        self.poller = poller
        self.slow = slow
        poller._observer = self

    def _timed(self, fn: Callable, args: tuple, name: Callable[[], str]) -> Any:
        if self.slow is None:
            return fn(*args)
        t0 = _monotonic()
        try:
            return fn(*args)
        finally:
            held = _monotonic() - t0
            if held > self.slow:
                _log.warning("%s held poller %d for %d ms", name(), self.poller.index, held * 1000)

    @staticmethod
    def _label(h: "IOHandle", method: str) -> str:
        """A callback's name in warnings and the trace: a handler with on_data
        has goev's on_read (IOHandle._feed), which calls on_data or on_eof."""
        if method == "on_read" and type(h).on_read is IOHandle._feed:
            method = "on_data/on_eof"
        return "%s.%s" % (type(h).__name__, method)

    def call(self, h: "IOHandle", method: str) -> Any:
        """Run ``h.<method>()`` (on_read, on_write) for the loop."""
        return self._timed(getattr(h, method), (), lambda: self._label(h, method))

    def run(self, fn: Callable, args: tuple) -> Any:
        """Run a timer's or a posted callback."""
        return self._timed(fn, args, lambda: _callback_name(fn))

    def say(self, msg: str) -> None:
        """A line of trace mode."""

    def added(self, h: "IOHandle", fd: int, events: int) -> None:
        """``h`` is being registered on this poller (before the epoll_ctl)."""

    def posted(self, fn: Callable) -> None:
        """A post wrote the waker (any thread)."""

    def draining(self, n: int) -> None:
        """The loop runs ``n`` posted items."""

    def timers_due(self, due: list) -> None:
        """The loop runs the timers ``due`` (cancelled ones included)."""


class _Poller:
    """One event loop on one thread.  Internal; users see it as ``handler.poller``.

    ``cache`` is a dict for the handlers of this poller (lock-free: only this
    poller's thread writes it, through ``Reactor.sync_cache``).  ``now_ms`` is
    the monotonic clock in ms, read once per loop pass while timers are
    pending (the value ``on_timeout`` receives).
    """

    def __init__(self, reactor: "Reactor", index: int, backend_cls: type, read_buffer_size: int) -> None:
        self.reactor = reactor
        self.index = index
        self.cache: dict = {}
        self.now_ms = int(_monotonic() * 1000)
        self._rbuf = bytearray(read_buffer_size)      # first: it may fail, the fds below may not leak
        self._rview = memoryview(self._rbuf)
        self._rlist = [self._rview]         # readv's argument, made once
        self._views: list = [None] * _VIEW_CACHE   # length -> view of the buffer's head
        self._long_view: Any = None         # the last read of _VIEW_CACHE bytes or more (a memoryview)
        # The fd-level I/O of IOHandle.read/write/_flush: os.readv/os.write/os.writev
        # take their arguments positionally (argument clinic), while the socket
        # methods parse a format string per call -- about 15% of an echo's CPU.
        # On a stream socket write() is send() with no flags.  Trace mode
        # replaces these three with printing versions (section 7's hooks).
        self._readv, self._write, self._writev = os.readv, os.write, os.writev
        self._handlers: dict = {}           # fd -> IOHandle
        self._closing: list = []            # handlers closed this step: on_close pending
        self._timers: list = []             # the 4-ary heap of Timers (section 5)
        self._cancels = 0                   # Timer.cancel()s made on this poller's thread
        self._cancels_elsewhere = 0         # ... and on other threads (under _lock)
        self._timers_gone = 0               # cancelled entries that have left the heap (poller thread)
        self._seq = 0
        self._inbox: collections.deque = collections.deque()
        self._wake_pending = False          # the waker is written and not yet drained
        self._state = _NEW                  # the life cycle: see "A poller's life cycle"
        self._stop_asked = False            # stop() was called: see _advance
        # Guards the inbox, the wake flag, every store to _state, the foreign
        # cancel count, the drop count of a stopped poller and _arrivals (see
        # "Threads and shared state" in section 7).  Counted (_Lock): a signal
        # handler may post while its thread holds it.
        self._lock = _Lock()
        self._arrivals: dict = {}           # fd -> handler registered from another thread (see _add)
        # Held by whichever thread runs this poller's code: its loop thread while
        # _run runs, or the thread that closes a poller that has no loop running
        # (Reactor._join).  ``p._mine._is_owned()`` is the one test of "am I on
        # this poller's thread?": a C call, no Python frame, and exact at any
        # moment (a thread id stored by the loop would stay set after it ends).
        self._mine: Any = _thread.RLock()   # (Any: typeshed lacks the C RLock's _is_owned)
        self._thread: Optional[threading.Thread] = None
        self._sig: Optional[tuple] = None   # (socket read, written, previous fd): see _signals_wake
        self._observer: Optional[_Observer] = None   # trace or watchdog: see section 7's hooks
        self._backend = backend_cls()
        try:
            self._waker = _Waker()
            try:
                self._backend.register(self._waker.fd, self._backend.native[EV_IN])
            except BaseException:
                self._waker.close()
                raise
        except BaseException:
            self._backend.close()
            raise

    def __repr__(self) -> str:
        return "<goev poller %d %s handlers=%d timers=%d>" % (
            self.index, self._backend.name, len(self._handlers), len(self._timers))

    # -- the life cycle and the thread rules ----------------------------------------

    def _advance(self, state: int) -> None:
        """Move the life cycle forward to ``state`` (never back); any thread.

        Under ``_lock``, so two threads cannot interleave their compare and
        store (a stale RUNNING read, then a store of STOPPING over DONE).  The
        lock is reentrant, so a signal handler's stop() on a thread that is
        inside this very compare-and-store also gets in; that outer call may
        then store its older target over the handler's STOPPING.  stop() sets
        ``_stop_asked`` before it advances, and the last test below runs after
        the outer store: whichever of the two finishes last leaves STOPPING."""
        with self._lock:
            if self._state < state:
                self._state = state
            if self._stop_asked and self._state < _STOPPING:
                self._state = _STOPPING

    def _foreign(self) -> bool:
        """Must a control call (close, abort, shutdown_write, event changes)
        made on this thread be posted to this poller?  Yes from any other
        thread from start() until the poller is DONE: while it is CLOSING it
        is closing its handlers itself, so a direct close would race it (a
        late post is drained or dropped; the handler is closed either way).
        Before start() there is no loop to race; once DONE every handler is
        closed and the call finds nothing to do."""
        return not self._mine._is_owned() and _NEW < self._state < _DONE

    def _direct(self) -> bool:
        """May the calling thread touch its handlers' data (the send queue, the
        socket object) itself?  On the poller's thread, or on any while the
        poller is NEW.  Elsewhere, even once the loop has ended, data goes
        through the inbox, whose drops are counted in ``dropped_bytes``."""
        return self._mine._is_owned() or self._state == _NEW

    # -- the read buffer -----------------------------------------------------------
    def _view(self, n: int) -> memoryview:
        """The read buffer's first ``n`` bytes as a view: one per length below
        _VIEW_CACHE, made once and handed out again (a view its user released
        is made anew), and the last long length's (fixed-size messages, a full
        buffer).  IOHandle.read and the loop look the cache up themselves."""
        if n < _VIEW_CACHE:
            v = self._views[n]
            try:
                if v:                           # None: a new length
                    return v
            except ValueError:                  # released by its user
                pass
            v = self._views[n] = self._rview[:n]
            return v
        v = self._long_view
        try:
            if v is not None and len(v) == n:
                return v
        except ValueError:                  # released by its user
            pass
        v = self._long_view = self._rview[:n]
        return v

    # -- cross-thread inbox -------------------------------------------------------
    # No lost wake-up (the Go original can lose one): producers append, *then* test
    # the flag; the consumer clears the flag *before* it drains the inbox.  An
    # item appended after the clear sees the flag down and wakes us; one
    # appended before it is drained by the pass that follows.  Both pairs run
    # under _lock, so "after" and "before" are the order of the two critical
    # sections -- a proof that needs no store/load ordering from the
    # interpreter (free-threaded CPython promises none for plain attributes).  The flag is
    # also cleared right after every read of the waker, because the invariant
    # is "no waker read between the last clear and a blocking poll()": with
    # clear -> a producer's wake -> a read that eats it -> poll(), the flag
    # would stay up with nothing to wake us, and every later post would skip
    # the waker and sleep in the inbox.
    # The loop drains right after poll() returns, before it dispatches: work
    # posted before an I/O event happened (an async_write, then a request the
    # client sends after it) runs before that event's callback.  Once the
    # poller is DONE, the producer that sees it drops what it appended (the
    # same append-then-test order: no item is left unaccounted).

    def _post(self, fn: Callable, *args: Any) -> None:
        """Queue ``fn(*args)`` for this poller's thread; any thread, and signal handlers."""
        with self._lock:
            self._inbox.append((fn, args))
            wake = not self._wake_pending
            self._wake_pending = True
            done = self._state == _DONE
        if done:                                # (see "No lost wake-up")
            self._drop_inbox()
        elif wake:
            if self._observer is not None:      # (first: the poller may print next)
                self._observer.posted(fn)
            self._waker.wake()

    @property
    def wakeups(self) -> int:
        """How many times the waker was written (posts in a burst share one)."""
        return self._waker.writes

    def _drop_inbox(self) -> None:
        """Drop queued work that will never run (the poller has stopped); the bytes
        of dropped async writes are counted in their handler's ``dropped_bytes``
        (datagrams in ``dropped_datagrams``: see _POSTED_SENDS), and a late
        registration is closed.  Any thread; ``_lock`` serializes the counting
        among dropping threads."""
        inbox = self._inbox
        late = []
        with self._lock:
            while True:
                try:
                    fn, args = inbox.popleft()
                except IndexError:
                    break
                f = getattr(fn, "__func__", None)
                count = _POSTED_SENDS.get(f)
                if count is not None:
                    count(fn.__self__, args)
                elif f is _Poller._add_posted:
                    late.append(args[0])
        for h in late:          # a registration that came too late: nobody will own it
            h.poller = None     # type: ignore[assignment]  # so close it here (on_close)
            h._close_now()

    def _drain_inbox(self, limit: int = _INBOX_BATCH) -> None:
        """Run up to ``limit`` posted items, the oldest first (poller thread)."""
        inbox = self._inbox
        with self._lock:                    # the flag down, then the batch: see above
            self._wake_pending = False
            n = min(len(inbox), limit)
            batch = [inbox.popleft() for _ in range(n)]
        obs = self._observer
        if obs is not None and n:
            obs.draining(n)
        for i, (fn, args) in enumerate(batch):
            try:
                if obs is None:
                    fn(*args)
                else:
                    obs.run(fn, args)
            except Exception:
                _log.exception("exception in posted callback %s", _safe_repr(fn))
            except BaseException:           # KeyboardInterrupt/SystemExit: the rest of the
                with self._lock:            # batch goes back, first in line, for the next run
                    inbox.extendleft(reversed(batch[i + 1:]))
                raise

    # -- timers -------------------------------------------------------------------
    # The heap belongs to the poller thread.  Other threads post their pushes
    # through the inbox (a cancel only clears the Timer and counts it); before
    # the reactor has started no loop runs, so any thread may push directly.

    def _call_at(self, when: float, interval: float, fn: Callable, args: tuple) -> Timer:
        """A Timer for ``fn(*args)`` at monotonic ``when``, then every ``interval``
        seconds if non-zero (until fn returns False); any thread.  Raises
        RuntimeError once the poller is DONE (nothing would ever run it)."""
        if self._state == _DONE:
            raise RuntimeError("the reactor is stopped: cannot schedule %s" % _safe_repr(fn))
        t = _new_timer(Timer)                  # (Timer() itself refuses: see Timer.__init__)
        if interval:                           # periodic: first deadline and period count
            t += (when, 0, fn, args, self, interval, when, 0)
        else:
            t += (when, 0, fn, args, self, 0.0)
        if self._direct():
            self._push_timer(t)
        else:
            self._post(self._push_timer, t)
        return t

    def _push_timer(self, t: Timer) -> None:
        # Pushed even if cancelled on its way here: its cancel() counted it as a
        # dead entry, and the entry leaves like any other dead one.
        self._seq += 1
        t[1] = self._seq
        _heap_push(self._timers, t)

    @property
    def _timers_dead(self) -> int:
        """Cancelled entries in the heap (or posted on their way to it): cancels
        counted minus cancelled entries gone (popped, skipped or compacted).
        Exact, except that a cancel from another thread racing the very firing of
        a one-shot counts a timer that never stays in the heap (harmless: the
        next compaction comes a little early)."""
        return self._cancels + self._cancels_elsewhere - self._timers_gone

    def call_later(self, delay_s: float, fn: Callable, *args: Any) -> Timer:
        """Run ``fn(*args)`` on this poller's thread after ``delay_s`` seconds (>= 0;
        inf: never); any thread.  Returns a Timer.  ValueError/TypeError name a bad
        delay or a non-callable; RuntimeError once the reactor is stopped (while
        it is stopping the Timer is accepted and cancelled with the others)."""
        delay_s = _check_delay("delay_s", delay_s)
        if not callable(fn):
            raise TypeError("fn must be callable, got %r" % (fn,))
        return self._call_at(_monotonic() + delay_s, 0.0, fn, args)

    def _run_timers(self, now: float) -> None:
        """Run the timers due at ``now`` (poller thread).  Every due entry is
        collected before any callback runs, so a timer scheduled by a callback
        (even with delay 0) waits for the next pass, and one cancelled by an
        earlier callback of this pass does not run."""
        heap = self._timers
        due = []
        pops = 0
        while heap and heap[0][0] <= now:
            pops += 1
            if not pops & 31 and self._burst(now, pops):
                # Many due at once: split the heap in two (list comprehensions),
                # sort the due part (C timsort: by seq, then stably by deadline,
                # which is (deadline, seq) order) and re-heapify the rest.
                split = [e for e in heap if e[0] <= now]
                heap[:] = [e for e in heap if e[0] > now]
                _heapify(heap)
                split.sort(key=_SEQ)
                split.sort(key=_WHEN)
                due += split
                break
            due.append(_heap_pop(heap))
        obs = self._observer
        if obs is not None:
            obs.timers_due(due)
        it = iter(due)
        t = None
        try:
            for t in it:
                fn = t[2]
                args = t[3]
                # Cancelled (perhaps by an earlier timer, or right now on another
                # thread, which clears both: seeing either cleared is enough).
                if fn is None or args is None:
                    self._timers_gone += 1
                    continue
                periodic = t[5]
                if not periodic:
                    t[2] = t[3] = None         # one-shot: release the callback before running it
                try:
                    keep = fn(*args) if obs is None else obs.run(fn, args)
                except Exception:
                    _log.exception("exception in timer callback %s", _safe_repr(fn))
                    keep = False
                if periodic:
                    self._rearm(t, now, keep)
                t = None                       # done: an interrupt from here on spares it
        except BaseException:
            # KeyboardInterrupt/SystemExit from a callback: keep the periodic timer
            # that raised, put back the due ones that have not run yet, so that
            # run() can resume with no timer lost.
            if t is not None and t[5]:
                self._rearm(t, now, True)
            for e in it:
                _heap_push(heap, e)
            raise

    def _burst(self, now: float, pops: int) -> bool:
        """Checked every 32 pops while due timers remain: is splitting the heap
        (O(n) at C-ish speed, then a Python heapify of the rest) now cheaper than
        popping on (O(log n) Python steps each)?  Yes when a sample of the heap
        says over 1/16 of it is due (the sample undercounts: due entries sit
        near the top), and in any case once the pops made cost about as much as
        a split (ski rental: at worst about twice the better choice)."""
        heap = self._timers
        n = len(heap)
        if pops * 16 >= n:
            return True
        step = n >> 6
        if step < 2:                           # a small heap: popping is cheap enough
            return False
        sample = heap[::step]
        return sum([e[0] <= now for e in sample]) * 16 >= len(sample)

    def _rearm(self, t: Timer, now: float, keep: Any) -> None:
        """Re-schedule periodic ``t`` after it ran, unless it was cancelled or
        returned False.  Deadlines stay on the grid first + k * interval (computed,
        not accumulated: no drift); after a stall the missed periods are skipped,
        not fired in a burst."""
        if t[2] is None:                       # cancelled by its own callback (out of the heap)
            self._timers_gone += 1
            return
        if keep is False:
            t[2] = t[3] = None
            return
        cur = _monotonic()                     # the pass's clock may be stale: earlier
        if cur > now:                          # callbacks of this pass may have run long
            now = cur
        iv = t[5]
        first = t[6]
        k = t[7] + 1
        nxt = first + k * iv
        if nxt <= now:                         # a stall: jump to the first deadline after now
            k = int((now - first) // iv) + 1
            nxt = first + k * iv
            if nxt <= now:                     # float rounding at the boundary
                k += 1
                nxt = first + k * iv
        self._seq += 1
        t[0], t[1], t[7] = nxt, self._seq, k
        _heap_push(self._timers, t)

    def _compact(self) -> None:
        """Drop the cancelled entries: O(n), paid for by the n/2 cancels since the
        last compaction, so schedule/cancel churn cannot grow memory."""
        heap = self._timers
        n = len(heap)
        heap[:] = [t for t in heap if t[2] is not None]
        _heapify(heap)
        # Not a reset to 0: timers cancelled on their way here (a posted push)
        # are counted already and still to come.
        self._timers_gone += n - len(heap)

    def _timeout(self) -> float:
        """Seconds until the next live timer, 0 if work is queued, -1 for none.
        Once per pass, on the poller thread: also where the heap is compacted."""
        heap = self._timers
        dead = self._timers_dead
        if dead > _COMPACT_MIN and dead * 2 > len(heap):
            self._compact()
        gone = self._timers_gone
        if gone > _CANCEL_LOG_TRIM:              # keep the counts small: subtract what
            self._cancels -= gone                # both sides have counted
            self._timers_gone = 0
        if self._inbox or self._closing:
            return 0.0
        while heap and heap[0][2] is None:       # cancelled heads must not wake us
            _heap_pop(heap)
            self._timers_gone += 1
        if not heap:
            return -1.0
        when = heap[0][0]
        if when == math.inf:                     # call_later(inf): never, so sleep until woken
            return -1.0
        # epoll/select round a float timeout *up* to their resolution (epoll:
        # ceiling ms; PollSelector: math.ceil(timeout * 1e3)), and a timer runs
        # only once its deadline has passed, so none fires early.  A far deadline
        # is clamped (epoll takes an int of ms): the loop wakes once a day.
        delay = when - _monotonic()
        return 0.0 if delay <= 0 else min(delay, _MAX_POLL_TIMEOUT)

    # -- handlers -------------------------------------------------------------------

    def _add(self, h: IOHandle, fd: int, events: int) -> None:
        """Register ``h`` for ``events`` (EV_IN/EV_OUT/EV_ET).  Thread: see Reactor.add_handler.

        On this poller's thread (or before start) ``h`` goes into _handlers at
        once.  From another thread (epoll: the epoll_ctl is made here, so its
        errors reach the caller) only this poller writes _handlers: ``h``
        waits in _arrivals, under the lock, until the poller takes it -- in
        _arrived, posted here, or at its first event (_unowned), whichever
        comes first; the state test is under the same lock, so no handler
        arrives after _close_all took the arrivals."""
        here = self._mine._is_owned() or self._state == _NEW
        if here:
            self._claim(h, fd, events, self._handlers.get(fd))
            self._handlers[fd] = h
        else:
            with self._lock:
                # (a lock-free read of the poller's dict: at worst stale, and
                # then epoll refuses an fd still registered: EEXIST)
                self._claim(h, fd, events, self._arrivals.get(fd) or self._handlers.get(fd))
                self._arrivals[fd] = h
        if self._observer is not None:
            self._observer.added(h, fd, events)
        try:
            # fast path: the usual registration (EV_IN on a fresh handler whose
            # class keeps IOHandle._update) without _update's frame, the mask
            # published first as there (see _input_ended for the gain).
            if events == EV_IN and type(h)._update is IOHandle._update and \
                    not (h._wq or h._eof or h._paused or h._state):
                h._mask = EV_IN
                b = self._backend
                b.register(fd, b.native[EV_IN])
            else:
                h._mask = 0
                h._update()
        except BaseException:
            h._mask = 0
            if here:
                del self._handlers[fd]
            else:
                with self._lock:
                    if self._arrivals.get(fd) is h:
                        del self._arrivals[fd]
            h.poller = None                   # type: ignore[assignment]  # registered nowhere again
            raise
        if not here:
            self._post(self._arrived, fd)
        if h.error is not None:               # a write in on_open already failed: peer gone
            self._post(h.abort)

    def _claim(self, h: IOHandle, fd: int, events: int, old: Optional[IOHandle]) -> None:
        """_add's checks, then ``h`` belongs to this poller (``old``: the handler
        already on ``fd``, if any)."""
        if self._state >= _STOPPING:
            raise RuntimeError("the reactor is stopping; cannot add %s" % _safe_repr(h))
        if old is not None and old is not h:
            raise ValueError("fd %d is already registered to %s" % (fd, _safe_repr(old)))
        h.poller = self
        h._user = events & _EV_ALL

    def _arrived(self, fd: int) -> Optional[IOHandle]:
        """Take the handler registered on ``fd`` from another thread into
        _handlers, if it is still waiting (see _add); returns it (poller thread)."""
        with self._lock:
            h = self._arrivals.pop(fd, None)
        if h is not None:
            self._handlers[fd] = h
        return h

    def _add_posted(self, h: IOHandle, fd: int, events: int) -> None:
        try:
            self._add(h, fd, events)
        except Exception:
            if self._state < _STOPPING:
                _log.exception("could not register %s", _safe_repr(h))
            h.poller = None                   # type: ignore[assignment]  # registered nowhere again
            h._close_now()

    def _unowned(self, fd: int) -> Optional[IOHandle]:
        """An event for an fd no handler owns.  The waker: drain it.  The signal
        wakeup socket: drain it (see _signals_wake).  A handler registered from
        another thread and not yet taken: take it and return it (the loop then
        dispatches the event to it).  Normally the fd's handler
        was closed earlier in this batch (already unregistered; the event was
        collected before): drop it.  Otherwise the fd was closed behind goev's
        back and the kernel may report it forever: make the backend forget it."""
        sig = self._sig
        if fd == self._waker.fd:
            self._waker.drain()
            with self._lock:                # after the drain: see "No lost wake-up"
                self._wake_pending = False
            what = "waker readable (drained)"
        elif sig is not None and fd == sig[0].fileno():
            try:
                while sig[0].recv(_DRAIN_CHUNK):
                    pass
            except OSError:                 # (BlockingIOError: drained)
                pass
            what = "a signal arrived (wakeup fd): its Python handler has run, or runs now"
        elif self._arrived(fd) is not None:
            return self._handlers[fd]
        elif any(h.fd == fd for h in self._closing):
            what = "no handler any more (closed earlier in this batch): dropped"
        else:
            self._backend.drop_stale(fd, self._registrations)
            what = "closed behind goev's back: the backend forgets it"
        if self._observer is not None:
            self._observer.say("fd %d: %s" % (fd, what))
        return None

    def _registrations(self) -> list:
        """(fd, events) of everything this poller watches (for drop_stale)."""
        own = [(self._waker.fd, EV_IN)] + ([(self._sig[0].fileno(), EV_IN)] if self._sig else [])
        with self._lock:
            arriving = list(self._arrivals.items())
        return own + [(fd, h._mask) for fd, h in list(self._handlers.items()) + arriving if h._mask]

    def _fault(self, h: IOHandle, where: str) -> None:
        """A callback raised: log with the handler's repr, close that handler only.
        The stored error keeps no traceback: a traceback holds the frames that
        hold the handler, which would then live until a full garbage collection."""
        e = sys.exc_info()[1]
        _log.exception("exception in %s of %s", where, _safe_repr(h))
        if self._observer is not None:
            self._observer.say("fd %d: %s raised -> logged, handler closed" % (h.fd, type(h).__name__))
        if h.error is None and e is not None:
            h.error = _bare(e)
        if h._state != _CLOSED:
            h._close_now()

    def _finish_closes(self) -> None:
        """on_close, then the real close(fd), of the handlers closed this step."""
        closing = self._closing
        obs = self._observer
        while closing:
            batch = closing[:]
            del closing[:]
            if obs is not None:
                for h in batch:
                    obs.say("fd %d: closed -> on_close of %s" % (h.fd, type(h).__name__))
            for i, h in enumerate(batch):
                try:
                    if obs is None:
                        h._finish_close()
                    else:
                        obs.run(h._finish_close, ())
                except BaseException:       # KeyboardInterrupt from an on_close: the rest
                    closing[:0] = batch[i + 1:]     # of the batch still gets theirs later
                    raise

    # -- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        """Run the loop on the calling thread, which holds ``_mine``, until the
        reactor stops (then close everything) or a callback raises
        KeyboardInterrupt/SystemExit (then leave the state as it is: run() may
        be called again)."""
        try:
            self._signals_wake()
            self._loop()
            if self._observer is not None:
                self._observer.say("loop ends (stop requested)")
        finally:
            try:
                self._signals_unwake()
            finally:
                if self._state >= _STOPPING:
                    self._close_all()

    # A poller that runs on the main thread (run()) must wake for a signal.
    # CPython runs a Python signal handler on the main thread, between two
    # bytecodes.  A signal that lands just before poll() enters epoll_wait (the
    # C handler runs, nothing interrupts the syscall), or on another thread that
    # does not block it, would wait for the next I/O event: forever on an idle
    # server, a SIGTERM seemingly ignored.  With
    # signal.set_wakeup_fd the C handler also writes the signal number into a
    # socket this loop polls; poll() returns and the handler runs.  A
    # socketpair, not the eventfd waker, which takes only 8-byte writes.

    def _signals_wake(self) -> None:
        """On the main thread: point the signal wakeup fd at this loop."""
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            r, w = socket.socketpair()
        except OSError:                     # out of fds: run without it
            return
        r.setblocking(False)
        w.setblocking(False)
        try:
            old = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        except ValueError:                  # not the main interpreter
            r.close()
            w.close()
            return
        self._sig = (r, w, old)
        if self._observer is not None:
            self._observer.say("fd %d: signal wake-up socket (signal.set_wakeup_fd)" % r.fileno())
        self._backend.register(r.fileno(), self._backend.native[EV_IN])

    def _signals_unwake(self) -> None:
        """Give the previous wakeup fd back (run() may be called again)."""
        sig, self._sig = self._sig, None
        if sig is None:
            return
        r, w, old = sig
        signal.set_wakeup_fd(old)           # first: the C handler must not write to a closed fd
        try:
            self._backend.unregister(r.fileno())
        except OSError:
            pass
        r.close()
        w.close()

    def _loop(self) -> None:
        """The reactor itself.  One pass: wait for events (or the next timer),
        run posted work, dispatch each event to its handler, finish the closes,
        run the due timers.  Until the life cycle leaves RUNNING."""
        poll = self._backend.poll
        handlers = self._handlers
        closing = self._closing
        timers = self._timers
        inbox = self._inbox
        obs = self._observer            # trace or watchdog (section 7's hooks); None: neither
        readv = self._readv
        rlist = self._rlist
        views = self._views
        now = 0.0       # read only on passes that start with timers: a timer scheduled
        #                 during a pass has a deadline after any earlier pass's clock
        while self._state == _RUNNING:
            # With no timer, no posted work and nothing closing, sleep until an
            # event (skip _timeout: the common case of a busy I/O server).
            events = poll(self._timeout() if timers or inbox or closing else -1.0)
            if timers:
                now = _monotonic()              # the pass's clock: now_ms, and which timers are due
                self.now_ms = int(now * 1000)
            if inbox:                           # first: posted before these events happened
                self._drain_inbox()             # (bounded; its closes finish after the batch)
            for fd, ev in events:
                try:                            # (a subscript is cheaper than .get())
                    h = handlers[fd]
                except KeyError:                # the waker, removed earlier in this batch, or
                    h = self._unowned(fd)       # registered from another thread (returned)
                    if h is None:               # (let go of the last handler: it may be closed)
                        continue
                try:
                    # Reading only, the usual state: whatever the kernel reports
                    # (IN, RDHUP, HUP, ERR) means "go and read": bytes that came
                    # before a FIN or a reset are delivered first.  The general
                    # rules below (after "the general rules") give the same
                    # answer; trace and the watchdog (obs) take the plain calls.
                    # fast path: one int compare instead of the bit tests below:
                    # 9 % of an echo's instructions, 3.8 % of an accept's
                    # (each gain: bench/icount.py, CPython 3.11, this path removed).
                    if h._mask == EV_IN:
                        if h._feeds and obs is None:
                            # The handler has on_data: its on_read is _feed (read,
                            # then on_data or on_eof).  fast path: _feed and read's
                            # common case written out, two frames fewer: 17.6 %
                            # of an echo's instructions (bench/icount.py).
                            try:
                                n = readv(fd, rlist)
                            except BlockingIOError:
                                continue
                            except OSError as e:        # a reset: the end of stream
                                h.error = _bare(e)
                                n = 0
                            if not n:
                                h._input_ended()
                                h.on_eof()
                                continue
                            v = views[n] if n < _VIEW_CACHE else None
                            try:
                                if not v:
                                    v = self._view(n)
                            except ValueError:          # a view its user released
                                v = self._view(n)
                            h.on_data(v)
                            continue
                        keep = h.on_read() if obs is None else obs.call(h, "on_read")
                        if not keep and (keep is False or keep is None and h._eof):   # _closes
                            h.close()
                        continue
                    # -- the general rules (every mask; EV_ET, queued writes) --
                    # Readable (or hung up) while reading: read first -- the bytes
                    # that came before a FIN or a reset are delivered before a
                    # flush can fail on that reset.  Then writable: a connect
                    # completing, a queue to flush.
                    reading = h._mask & EV_IN
                    if reading and ev & _IN_ANY:
                        if _closes(h, h.on_read() if obs is None else obs.call(h, "on_read")):
                            h.close()
                    if ev & EV_OUT and h._state != _CLOSED:
                        if _closes(h, h.on_write() if obs is None else obs.call(h, "on_write")):
                            h.close()
                        if h._state == _CLOSING and ev & _HUP_ERR:
                            h.abort()           # the flush cannot complete
                    if ev & _HUP_ERR and not reading and h._state == _OPEN:
                        if obs is not None:     # neither reading nor flushing: gone
                            obs.say("fd %d: hang-up while not reading -> abort" % fd)
                        h.error = h.error or ConnectionResetError(errno.ECONNRESET, "connection reset")
                        h.abort()
                except Exception:
                    self._fault(h, "callback")
            h = v = None                        # the batch's last handler may be closed: let it go
            if closing:
                self._finish_closes()
            if timers and timers[0][0] <= now:  # due at this pass's clock (later ones: the next)
                self._run_timers(now)
                if closing:
                    self._finish_closes()

    def _close_all(self) -> None:
        """Shut down (CLOSING, then DONE): every handler gets on_close once,
        every fd is closed.  Idempotent.  On the poller's thread, or on a thread
        holding ``_mine`` while no loop runs (Reactor._join)."""
        with self._lock:
            if self._state >= _CLOSING_ALL:
                return
            self._state = _CLOSING_ALL
        # A KeyboardInterrupt/SystemExit from an on_close (or posted work) comes
        # out once the shutdown is complete: the steps run again -- handlers
        # already closed are skipped, so each pass gets past the one that raised.
        interrupted: Optional[BaseException] = None
        while True:
            try:
                self._close_all_steps()
                break
            except BaseException as e:
                interrupted = interrupted or e
        if interrupted is not None:
            raise interrupted

    def _close_all_steps(self) -> None:
        with self._lock:                        # (CLOSING: no more arrive; see _add)
            arrivals, self._arrivals = self._arrivals, {}
        self._handlers.update(arrivals)
        self._drain_for_stop()
        for h in list(self._handlers.values()):
            if h._state != _CLOSED:
                if h._wq and h.error is None:
                    try:
                        h._flush()              # one last non-blocking attempt
                    except Exception:
                        pass
                h._abandon()
        self._finish_closes()
        # Work posted while the handlers closed (a registration, a connect, a
        # write racing stop()) runs once more: _add refuses now, so such a
        # handler is closed properly (on_close, fd closed) instead of leaking.
        self._drain_for_stop()
        self._finish_closes()
        for t in self._timers:
            t[2] = t[3] = None
        self._timers.clear()
        self._cancels = self._timers_gone = 0
        with self._lock:
            self._cancels_elsewhere = 0
        self._backend.close()
        self._waker.close()
        self._handlers.clear()
        # DONE: from here on producers drop what they post (see _post); what
        # was posted since the drain above is dropped now, async writes counted.
        with self._lock:
            self._state = _DONE
        self._drop_inbox()

    def _drain_for_stop(self) -> None:
        """Posted work still runs at shutdown (a registration, a final write), and
        what it posts in turn runs once more; anything later is dropped, so the
        shutdown always terminates."""
        for _ in range(2):
            self._drain_inbox(len(self._inbox))
        self._drop_inbox()


# =============================================================================
# 8. Reactor: N pollers, placement, start/stop, cross-thread posts
# =============================================================================
# The Reactor is a thin manager: it creates the pollers, places each fd on
# poller[fd % N], runs the loops (run() on the calling thread for poller 0,
# threads for the rest; start() all in threads) and stops them.  Invariant:
# after stop() returns (from a non-poller thread) every fd goev opened is
# closed and every poller thread is joined.

class Reactor:
    """N pollers (event loops on threads) and the handlers placed on them.

    Parameters: ``pollers`` (>= 1, and at most what the fd limit and the
    cores make sensible: see _check_pollers; ``"auto"``: one per core when
    the GIL is off, 1 under the GIL), ``backend`` ("auto", "epoll", "selectors";
    auto honours the GOEV_BACKEND environment variable), ``read_buffer_size``
    (bytes of each poller's shared read buffer, 1 .. 0x7ffff000),
    ``trace`` (print every loop step to stderr; None: on if the GOEV_TRACE
    environment variable is 1, true, yes or on; 0, false, no, off, empty or
    unset is off, and any other value a ValueError), ``slow_callback_ms``
    (log a WARNING on the "goev" logger naming any handler callback, timer or
    posted function that holds its poller longer than this many
    milliseconds; None: off).  Raises ValueError/TypeError on bad arguments;
    a failed construction leaves no fd behind.  Use as a context manager to
    be sure it is stopped.
    """

    def __init__(self, pollers: Union[int, str] = 1, *, backend: str = "auto",
                 read_buffer_size: int = DEFAULT_READ_BUFFER, trace: Optional[bool] = None,
                 slow_callback_ms: Optional[float] = None) -> None:
        pollers = _check_pollers(pollers)
        _check_int("read_buffer_size", read_buffer_size, 1, _MAX_READ)
        backend_cls = _pick_backend(backend)
        if trace is None:
            trace = _env_flag("GOEV_TRACE")
        slow = None
        if slow_callback_ms is not None:
            slow = _check_delay("slow_callback_ms", slow_callback_ms) / 1000.0
        # The observer of every poller's loop, chosen once here (section 7's
        # hooks): none (the plain loop), the watchdog, or trace mode.
        observer: Optional[Callable[..., _Observer]] = None
        if trace:
            observer = _extra("tracer")
        elif slow is not None:
            observer = _Observer
        self.trace = bool(trace)
        self.slow_callback_ms = slow_callback_ms
        self.backend: str = backend_cls.name
        self.pollers: list = []
        self._lock = _Lock()
        self._drained: set = set()        # indexes of the pollers a shutdown() has emptied
        self._fatal: list = []            # a KeyboardInterrupt/SystemExit from a background poller
        try:
            for i in range(pollers):
                p = _Poller(self, i, backend_cls, read_buffer_size)
                self.pollers.append(p)
                if observer is not None:
                    observer(p, slow)
        except BaseException:
            for p in self.pollers:
                p._advance(_STOPPING)
                p._close_all()
            raise

    def __repr__(self) -> str:
        state = _STATE_NAMES[self.pollers[0]._state]
        return "<goev.Reactor %s pollers=%d %s>" % (self.backend, len(self.pollers), state)

    def __enter__(self) -> "Reactor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- handlers -------------------------------------------------------------------

    def _poller_for(self, fd: int) -> _Poller:
        return self.pollers[fd % len(self.pollers)]

    def add_handler(self, handler: IOHandle, fd: int, events: int, *, poller: Optional[int] = None) -> None:
        """Register ``handler`` for ``events`` (EV_IN, EV_OUT, optionally | EV_ET) on
        poller[fd % N] -- or on poller[``poller``] to pin it (REUSEPORT acceptors).
        From any thread; takes effect at once (with epoll) or as soon as the poller
        wakes.  Raises TypeError/ValueError on bad arguments, RuntimeError once stopped.

        ``fd`` may be any pollable fd, not only a socket: ``read()``/``write()``
        work on a pipe.  Make a bare fd non-blocking first (``os.set_blocking``);
        it stays yours to close after on_close (goev closes the sockets it holds)."""
        if not isinstance(handler, IOHandle):
            raise TypeError("handler must be an IOHandle, got %r" % (handler,))
        if type(fd) is not int or fd < 0:   # (the common case without a call: once per accept)
            _check_int("fd", fd, 0)
        if not isinstance(events, int) or events not in _EVENT_MASKS:
            raise ValueError("events must combine EV_IN/EV_OUT (and EV_ET), got %r" % (events,))
        if handler.poller is not None and handler._state != _CLOSED:
            raise ValueError("%s is already registered" % _safe_repr(handler))
        if poller is None:
            pollers = self.pollers
            p = pollers[fd % len(pollers)]
        else:
            _check_int("poller", poller, 0)
            if poller >= len(self.pollers):
                raise ValueError("poller %d out of range (reactor has %d)" % (poller, len(self.pollers)))
            p = self.pollers[poller]
        if p._state >= _STOPPING:
            raise RuntimeError("reactor is stopped")
        handler.reactor = self
        if handler.fd != fd:
            handler.fd = fd
        # Direct unless another thread's poller may already sleep in select(): a
        # selector does not see a registration made meanwhile, so post it.
        # (epoll from another thread: _add's lock; the poller sees the fd's
        # events only after the epoll_ctl that follows the insert.)
        if p._backend.threadsafe_ctl or p._direct():
            p._add(handler, fd, events)
        else:
            handler.poller = p
            p._post(p._add_posted, handler, fd, events)

    def append_event(self, fd: int, events: int) -> None:
        """Add ``events`` to the handler registered on ``fd``.  Poller thread (or any
        thread: then applied by the poller)."""
        self._change_events(fd, events, True)

    def remove_event(self, fd: int, events: int) -> None:
        """Remove ``events`` from the handler on ``fd`` (removing all of them stops
        polling the fd; the handler stays owned until closed)."""
        self._change_events(fd, events, False)

    def _change_events(self, fd: int, events: int, add: bool) -> None:
        _check_int("fd", fd, 0)
        if not isinstance(events, int) or not events or events & ~_EV_ALL:
            raise ValueError("events must combine EV_IN/EV_OUT/EV_ET, got %r" % (events,))
        p = self._poller_for(fd)
        if fd not in p._handlers:               # pinned elsewhere (poller=...)?
            p = next((q for q in self.pollers if fd in q._handlers), p)
        if p._foreign():
            p._post(self._change_events, fd, events, add)
            return
        h = p._handlers.get(fd)
        if h is None:
            raise ValueError("fd %d is not registered" % fd)
        h._user = h._user | events if add else h._user & ~events
        h._update()

    def current_poller(self) -> Optional[_Poller]:
        """The poller whose thread is calling (so ``.index``, ``.cache``), or None.
        Lets an Acceptor's ``on_open`` keep a connection on the poller that
        accepted it: ``add_handler(h, h.fd, EV_IN, poller=r.current_poller().index)``."""
        for p in self.pollers:
            if p._mine._is_owned():
                return p
        return None

    # -- cross-thread work -------------------------------------------------------------

    def post(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` once on every poller thread.  Returns at once; safe from
        any thread and from a signal handler.  Dropped once the reactor stopped."""
        if not callable(fn):
            raise TypeError("fn must be callable, got %r" % (fn,))
        for p in self.pollers:
            p._post(fn, *args)

    def post_to(self, handler: IOHandle, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the poller that owns ``handler``; any thread."""
        if not callable(fn):
            raise TypeError("fn must be callable, got %r" % (fn,))
        if not isinstance(handler, IOHandle) or handler.poller is None:
            raise ValueError("post_to needs a registered IOHandle, got %r" % (handler,))
        handler.poller._post(fn, *args)

    def sync_cache(self, key: Any, value: Any) -> None:
        """Set ``cache[key] = value`` on every poller, each on its own thread; any thread."""
        hash(key)               # an unhashable key fails here, at the call, not on a poller
        for p in self.pollers:
            p._post(p.cache.__setitem__, key, value)

    def init_cache(self, key: Any, value: Any) -> None:
        """Set ``cache[key] = value`` on every poller now; before start()/run() only."""
        if self.pollers[0]._state != _NEW:
            raise RuntimeError("init_cache is for before start(); use sync_cache")
        for p in self.pollers:
            p.cache[key] = value

    def call_later(self, delay_s: float, fn: Callable, *args: Any) -> Timer:
        """Run ``fn(*args)`` on poller 0 after ``delay_s`` seconds; safe from any thread.
        Returns a Timer (``cancel()`` from any thread)."""
        return self.pollers[0].call_later(delay_s, fn, *args)

    # -- running ----------------------------------------------------------------------

    def _begin(self, pollers: list) -> None:
        """NEW -> RUNNING for every poller (under the reactor lock), then a
        thread for each of ``pollers``.  RuntimeError if a stop came first."""
        for p in self.pollers:
            p._advance(_RUNNING)
        if self.pollers[0]._state != _RUNNING:
            raise RuntimeError("reactor is stopped")
        for p in pollers:
            t = threading.Thread(target=self._thread_main, args=(p,),
                                 name="goev-poller-%d" % p.index, daemon=True)
            p._thread = t
            t.start()

    def _thread_main(self, p: _Poller) -> None:
        # Process-directed signals go to any thread that does not block them;
        # Python runs handlers on the main thread only, so a SIGTERM landing
        # here would not interrupt the main thread's epoll_wait.  Block them.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, _THREAD_BLOCKED_SIGNALS)
        with p._mine:
            try:
                p._run()
            except BaseException as e:
                # KeyboardInterrupt/SystemExit from a callback (or a bug): nobody
                # can catch it on this thread.  Stop the reactor and hand it to
                # the thread that waits for it: run(), or stop() after start().
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    with self._lock:
                        self._fatal.append(e)
                else:
                    _log.critical("poller %d died", p.index, exc_info=True)
                self.stop()
                p._close_all()

    def run(self, *, drain_timeout: float = 10.0) -> None:
        """Run poller 0 on the calling thread (the others on threads) until ``stop()``.

        On the main thread, Ctrl-C (SIGINT) and SIGTERM stop the reactor
        gracefully while run() runs -- ``shutdown(drain_timeout)``: stop
        accepting, flush and close every connection (on_close for each), at
        most ``drain_timeout`` seconds -- and run() then returns normally; a
        second signal stops at once (``stop()``).  Only for a signal whose
        handler is Python's default: a program that installed its own keeps it.
        The previous handlers come back when run() returns.

        KeyboardInterrupt/SystemExit raised in a callback propagate out of run(),
        also when raised on another poller's thread (the reactor then stops);
        after one raised on this thread the reactor stays consistent and run()
        may be called again (or stop() called to close everything).  On the
        main thread run() owns ``signal.set_wakeup_fd`` while it runs (the
        previous one comes back after), so a Python signal handler runs at once
        even when the signal lands on another thread or just before the loop
        sleeps.  Raises RuntimeError("reactor is already running") after
        start() or while another run() is running, and once stopped."""
        _check_delay("drain_timeout", drain_timeout)
        p0 = self.pollers[0]
        with self._lock:
            if p0._state >= _STOPPING:
                raise RuntimeError("reactor is stopped")
            if p0._thread is not None or p0._mine._is_owned() or not p0._mine.acquire(blocking=False):
                raise RuntimeError("reactor is already running")
            try:
                if p0._state == _NEW:
                    self._begin(self.pollers[1:])
            except BaseException:
                p0._mine.release()
                raise
        previous = self._stop_on_signals(drain_timeout)
        try:
            p0._run()
        finally:
            p0._mine.release()
            for signo, handler in previous.items():
                signal.signal(signo, handler)
        if p0._state >= _STOPPING:
            self._join(None)
            self._raise_fatal()

    def _stop_on_signals(self, drain_timeout: float) -> dict:
        """run()'s SIGINT/SIGTERM handlers (see run()), installed on the main
        thread for each of the two that has Python's default handler; returns
        {signal: previous handler} to put back."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        signalled: list = []

        def on_signal(signo: int, frame: Any) -> None:
            signalled.append(signo)
            if len(signalled) == 1:
                _log.info("%s: shutting down (drain up to %g s; again to stop at once)",
                          signal.Signals(signo).name, drain_timeout)
                self.shutdown(drain_timeout)
            else:
                self.stop()
        previous = {}
        for signo, default in defaults.items():
            if signal.getsignal(signo) is default:
                previous[signo] = signal.signal(signo, on_signal)
        return previous

    def start(self) -> None:
        """Run every poller on a background thread and return at once.  RuntimeError
        if the reactor is already running (start() or run()) or stopped."""
        with self._lock:
            p0 = self.pollers[0]
            if p0._state != _NEW or not p0._mine.acquire(blocking=False):
                raise RuntimeError("reactor is %s" % ("stopped" if p0._state >= _STOPPING
                                                      else "already running"))
            p0._mine.release()
            self._begin(self.pollers)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop every poller: each handler gets on_close, every fd is closed.

        Safe from any thread, from a signal handler, before start() and twice.
        From a poller's own callback it returns at once (the loops end after
        the current step), and so it does from a signal handler that interrupted
        this thread inside one of goev's locks (see _Lock); otherwise it waits up
        to ``timeout`` seconds (None: as long as it takes) for every poller to
        finish, and raises a KeyboardInterrupt/SystemExit that a background
        poller's callback raised."""
        # The STOPPING transition takes the reactor lock, which orders it with
        # start()'s NEW -> RUNNING (which must not overwrite it).  A signal
        # handler that interrupted a goev lock on this thread cannot take it;
        # there the interrupted code is on this very thread, between bytecodes.
        for p in self.pollers:
            p._stop_asked = True          # first: see _Poller._advance
        if _locks_held():
            for p in self.pollers:
                p._advance(_STOPPING)
        else:
            with self._lock:
                for p in self.pollers:
                    p._advance(_STOPPING)
        for p in self.pollers:
            p._waker.wake()
        if _locks_held() or any(p._mine._is_owned() for p in self.pollers):
            return          # a poller's own callback, or a signal handler that interrupted
        self._join(timeout)  # this thread inside a goev lock: the pollers end by themselves
        self._raise_fatal()

    def _raise_fatal(self) -> None:
        """Re-raise (once) a KeyboardInterrupt/SystemExit from a background poller
        (the first one, if several pollers raised)."""
        if self._fatal:
            e = self._fatal[0]
            del self._fatal[:]
            raise e

    def shutdown(self, drain_timeout: float = 10.0) -> None:
        """Graceful stop: stop accepting, close every connection once its queued
        writes are flushed (``close()``), then ``stop()`` -- at the latest after
        ``drain_timeout`` seconds.  Returns at once; safe from any thread and from
        a signal handler.  ``run()`` returns when the drain is over."""
        timeout = _check_delay("drain_timeout", drain_timeout)
        deadline = _monotonic() + timeout
        self.post(self._drain_step, deadline)

    def _drain_step(self, deadline: float) -> None:
        """On each poller: close listeners and connections (flush first), then
        poll until this poller is empty; the last poller to empty stops all."""
        p = self.current_poller()
        assert p is not None
        for h in list(p._handlers.values()):
            h._wind_down()
        if p._handlers and _monotonic() < deadline:
            p._call_at(min(deadline, _monotonic() + _DRAIN_POLL), 0.0, self._drain_step, (deadline,))
            return
        with self._lock:                  # (every poller's thread adds its own)
            self._drained.add(p.index)
            last = len(self._drained) == len(self.pollers)
        if last or _monotonic() >= deadline:
            self.stop()

    def _join(self, timeout: Optional[float]) -> None:
        """Wait up to ``timeout`` seconds for every poller to be DONE: join each
        poller thread; a poller without one (poller 0 of run(), or a reactor
        never started) is closed here, holding its ``_mine`` -- which waits for
        a run() still looping on another thread to return first."""
        deadline = None if timeout is None else _monotonic() + timeout
        for p in self.pollers:
            left = -1.0 if deadline is None else max(0.0, deadline - _monotonic())
            t = p._thread
            if t is not None:
                if t is not threading.current_thread():
                    t.join(None if left < 0 else left)
            elif p._mine.acquire(timeout=left):
                try:
                    p._close_all()
                finally:
                    p._mine.release()

    @property
    def stopped(self) -> bool:
        """True once every poller has shut down."""
        return all(p._state == _DONE for p in self.pollers)


# =============================================================================
# 9. Acceptor: listening sockets and the accept pipeline
# =============================================================================
# An Acceptor is an IOHandle whose "read" is accept().  It accepts a bounded
# batch per readiness, makes each connection non-blocking (TCP_NODELAY on
# TCP: on Linux inherited from the listener), builds a handler with the
# factory and calls its on_open.  When the process runs out of fds (EMFILE
# & co.) it stops polling the listener and retries on a timer instead of
# spinning on a listener that stays readable.  The helpers first: calling a
# factory, and the two outcomes of every accept or connect (section 10 and
# Part II's stages use them too).

def _new_handler(factory: Callable[[], IOHandle], who: Any) -> Optional[IOHandle]:
    """Call a handler factory; None (logged, naming ``who``) if it raises or
    returns something that is not an IOHandle."""
    try:
        h = factory()
        if not isinstance(h, IOHandle):
            raise TypeError("factory returned %r, not an IOHandle" % (h,))
        return h
    except Exception:
        _log.exception("%s: handler factory failed", _safe_repr(who))
        return None


def _open_failed(h: IOHandle, e: Exception, what: str) -> None:
    """Log why a new handler could not open.  A stop that came first -- a
    signal handler calling stop() while a batch of accepts is being opened --
    is no error: add_handler's "reactor is stopped" is logged at DEBUG."""
    if isinstance(e, RuntimeError) and h.reactor is not None and h.reactor.pollers[0]._state >= _STOPPING:
        _log.debug(what + ": the reactor is stopping", _safe_repr(h))
    else:
        _log.exception(what, _safe_repr(h))


def _open_handler(h: IOHandle) -> None:
    """Call on_open; on False or an exception the handler is closed (on_close
    once).  A handler that on_open left open and registered nowhere is
    registered for EV_IN (see IOHandle.on_open).  The watchdog counts on_open
    in the callback that accepted or connected (Acceptor.on_read, say)."""
    try:
        ok = h.on_open()
    except Exception as e:
        _open_failed(h, e, "exception in on_open of %s")
        ok = False
    if ok is not False and h.poller is None and h._state == _OPEN:
        try:
            h.reactor.add_handler(h, h.fd, EV_IN)
        except Exception as e:
            _open_failed(h, e, "cannot register %s after its on_open")
            ok = False
    if ok is False:
        if h._state != _CLOSED:
            if h.poller is None:
                h._close_now()
            else:
                h.close()
    elif h._watcher is not None:
        h._watcher._handler_opened(h)


def _connect_failed(h: IOHandle, err: BaseException) -> None:
    """The other outcome of a connect (or of a client's TLS handshake): the
    handler gets ``on_connect_fail(err)``, once, and never an fd."""
    h.fd = -1
    h.error = _bare(err)
    try:
        h.on_connect_fail(h.error)    # type: ignore[arg-type]  # an OSError, unless a bug raised
    except Exception:
        _log.exception("exception in on_connect_fail of %s", _safe_repr(h))
    if h._watcher is not None:
        h._watcher._handler_failed(h, err)


def _take_socket(h: IOHandle, sock: Any, peer: Any, prepare: Optional[Callable]) -> bool:
    """``h`` takes ``sock`` (``prepare(h)`` first, if given: a TLS handler's
    class swap), and ``peer`` as its address unless None.  False, logged and
    the socket closed, if prepare raised."""
    if prepare is not None:
        try:
            prepare(h)
        except Exception:
            _log.exception("%s: cannot take the connection", _safe_repr(h))
            sock.close()
            return False
    h._sock = sock
    h.fd = sock.fileno()
    if peer is not None:
        h.peer = peer
    return True


def _open_connected(h: IOHandle, sock: Any, peer: Any, prepare: Optional[Callable] = None) -> None:
    """The good outcome of a connect (after its connect stage, if any): ``h``
    takes ``sock`` and its on_open runs; if ``prepare`` raised, it fails instead."""
    if _take_socket(h, sock, peer, prepare):
        _open_handler(h)
    else:
        _connect_failed(h, ConnectionAbortedError(errno.ECONNABORTED, "the handler could not take the socket"))


def _unix_path_free(path: str, kind: int = socket.SOCK_STREAM) -> None:
    """Remove a stale unix socket file at ``path``; anything else there is an
    error.  ``kind``: the type of socket that would be live there (a datagram
    server's file is probed with a datagram socket: a stream connect to it fails
    as if stale)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "not a socket, refusing to replace", path)
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(path)
    except ConnectionRefusedError:            # nobody listens: stale, replace it
        os.unlink(path)
        return
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a server is listening on unix socket", path)


def _bound_listener(family: int, sockaddr: Any, backlog: int, reuse_addr: bool, reuse_port: bool,
                    rcvbuf: int) -> socket.socket:
    """A new listening socket on ``sockaddr`` (blocking; the caller sets the mode).
    Used by Acceptor and by serve()'s supervisor, which listens once for all workers."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            if not sockaddr.startswith("\0"):
                _unix_path_free(sockaddr)
        else:
            if reuse_addr:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if rcvbuf:                  # before listen(), so accepted sockets inherit it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _adopt_listener(fd: Any) -> socket.socket:
    """Wrap ``fd``, an existing listening SOCK_STREAM socket (systemd socket
    activation, a parent process), in a socket object.  ValueError naming the fd
    if it is anything else -- and then the fd is left open, it is not ours."""
    _check_int("fd", fd, 0)
    try:
        sock = socket.socket(fileno=fd)          # family and type are read from the fd
    except OSError as e:
        raise ValueError("fd %d is not a socket (%s)" % (fd, e.strerror or e)) from None
    try:
        ok = sock.type == socket.SOCK_STREAM and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        ok = False
    if not ok:
        sock.detach()
        raise ValueError("fd %d is not a listening SOCK_STREAM socket" % fd)
    return sock


class Acceptor(IOHandle):
    """Listen on ``addr`` and hand each connection to ``factory()``'s handler.

    ``factory`` is any zero-argument callable returning an IOHandle.  Accepted
    handlers get ``reactor = conn_reactor or reactor`` and their ``on_open`` runs
    on the acceptor's poller thread.  Port 0 picks a free port: see ``address``.
    ``poller=i`` pins the listening socket to poller i (one REUSEPORT acceptor
    per poller: the kernel then spreads connections over the pollers).
    ``ssl=context`` (an ``ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)`` with its
    certificate loaded) serves TLS: on_open runs once the handshake is done;
    a handshake that fails or takes over ``ssl_handshake_timeout`` seconds is
    closed and logged at DEBUG only (section 13).

    ``fd=N`` (with ``addr`` None) adopts an existing listening socket instead of
    binding one -- systemd socket activation, a parent process; see also
    ``from_socket``.  The bind options (reuse_addr, reuse_port) do not apply to it.

    ``proxy_protocol=True``: every connection must start with a PROXY protocol
    header (v1 or v2, as HAProxy's ``send-proxy``/``send-proxy-v2`` send); it is
    read before the handler exists (and before a TLS handshake), ``peer`` is then
    the client it names and ``sock_peer`` the balancer.  A connection with a
    malformed, oversized or missing header, or none within
    ``proxy_header_timeout`` seconds, is closed (logged at DEBUG) and never
    reaches the factory.  Off by default: a server reachable without the
    balancer would believe any client's header.

    Raises ValueError/TypeError for bad arguments, OSError (e.g. EADDRINUSE)
    when the address cannot be bound.  ``close()`` stops listening (any thread).
    """
    __slots__ = ("factory", "conn_reactor", "backlog", "_family", "_unix_path", "_retry",
                 "_stages", "proxy_protocol", "_nodelay", "_episode")

    def __init__(self, reactor: Reactor, addr: Union[str, tuple, None], factory: Callable[[], IOHandle], *,
                 conn_reactor: Optional[Reactor] = None, backlog: int = 512, reuse_addr: bool = True,
                 reuse_port: bool = False, rcvbuf: int = 0, poller: Optional[int] = None,
                 ssl: Any = None, ssl_handshake_timeout: float = _TLS_HANDSHAKE_TIMEOUT,
                 fd: Optional[int] = None, proxy_protocol: bool = False,
                 proxy_header_timeout: float = _PROXY_TIMEOUT) -> None:
        if not isinstance(reactor, Reactor):
            raise TypeError("reactor must be a Reactor, got %r" % (reactor,))
        if conn_reactor is not None and not isinstance(conn_reactor, Reactor):
            raise TypeError("conn_reactor must be a Reactor, got %r" % (conn_reactor,))
        if not callable(factory):
            raise TypeError("factory must be callable, got %r" % (factory,))
        _check_int("backlog", backlog, 1, _INT_MAX)
        _check_int("rcvbuf", rcvbuf, 0, _INT_MAX)
        # The accept pipeline (section 7's hooks): the PROXY header first, then TLS.
        self._stages: list = []
        if proxy_protocol:
            self._stages.append(_extra("proxy")(proxy_header_timeout))
        if ssl is not None:
            self._stages.append(_extra("tls_server")(ssl, ssl_handshake_timeout))
        if fd is not None:
            if addr is not None:
                raise ValueError("give addr or fd, not both (addr=%r, fd=%r)" % (addr, fd))
            sock = _adopt_listener(fd)
            family = sock.family
        else:
            family, sockaddr = parse_address(addr)    # type: ignore[arg-type]  # None: its TypeError
            sock = _bound_listener(family, sockaddr, backlog, reuse_addr, reuse_port, rcvbuf)
        self.factory = factory
        self.conn_reactor = conn_reactor or reactor
        self.backlog = backlog
        self.proxy_protocol = bool(proxy_protocol)
        self._family = family
        self._unix_path = None
        self._retry = False
        self._episode: Optional[list] = None     # [errno, failures, since] while accept() keeps failing
        try:
            if fd is not None and rcvbuf and family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            # TCP_NODELAY on every connection.  Linux copies it from the listener
            # to each accepted socket (TCP clones the listener's options), so one
            # setsockopt here saves a syscall per accept; elsewhere, per accept.
            self._nodelay = family != socket.AF_UNIX
            if self._nodelay and sys.platform.startswith("linux"):
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._nodelay = False
                except OSError:
                    pass
            sock.setblocking(False)
            self._sock = sock
            self.peer = None
            reactor.add_handler(self, sock.fileno(), EV_IN, poller=poller)
        except BaseException:
            self._sock = None
            if fd is not None:
                sock.detach()                 # not ours to close: the caller still owns fd
            else:
                sock.close()
            raise
        if fd is None and family == socket.AF_UNIX and not sockaddr.startswith("\0"):
            self._unix_path = sockaddr        # ours: unlinked on close

    @classmethod
    def from_socket(cls, reactor: Reactor, sock: socket.socket, factory: Callable[[], IOHandle],
                    **kw: Any) -> "Acceptor":
        """An Acceptor on ``sock``, a socket that is already listening (SOCK_STREAM).
        The Acceptor takes it over: ``sock`` is detached (its ``fileno()`` becomes
        -1) and the Acceptor's ``close()`` closes the listening socket.  Keywords as
        for Acceptor.  ValueError if ``sock`` is not a listening stream socket."""
        if not isinstance(sock, socket.socket):
            raise TypeError("sock must be a socket.socket, got %r" % (sock,))
        a = cls(reactor, None, factory, fd=sock.fileno(), **kw)
        sock.detach()
        return a

    @property
    def address(self) -> Any:
        """The bound address as getsockname() gives it: ``(host, port)`` for IPv4,
        ``(host, port, flow, scope)`` for IPv6, the path for unix sockets, and
        ``"@name"`` for a Linux abstract name (as ``"unix:@name"`` is written)."""
        if self._sock is None:
            return None
        a = self._sock.getsockname()
        if isinstance(a, bytes):
            a = a.decode(errors="replace")
        if isinstance(a, str) and a.startswith("\0"):
            a = "@" + a[1:]
        return a

    def on_read(self) -> bool:
        """Accept a bounded batch of connections; each gets a handler from the
        factory (after the accept stages, if any) and its on_open runs."""
        accept = self._sock._accept             # (fd, address): see the fast path below
        family = int(self._family)
        stages = self._stages
        nodelay = self._nodelay
        set_blocking = os.set_blocking
        factory = self.factory
        conn_reactor = self.conn_reactor
        for _ in range(min(self.backlog, _ACCEPT_BATCH)):
            try:
                fd, addr = accept()
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in _ACCEPT_SKIP:      # that connection is gone: the next one
                    continue
                if e.errno in _ACCEPT_FATAL:     # the listener itself is unusable
                    _log.error("%s: accept failed (%s): the listener is unusable and is closed",
                               _safe_repr(self), e)
                    self.error = _bare(e)
                    return False
                self._accept_failing(e)          # EMFILE & co., or unexpected: pause, retry
                break
            if self._episode is not None:
                self._episode_ends("accepting again")
            if stages or nodelay:
                # A socket object: socket.socket's C base class, without its
                # Python-level __init__ and close() (the stages close it themselves).
                conn = _CSocket(family, socket.SOCK_STREAM, 0, fd)
                conn.setblocking(False)
                if nodelay:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._proceed(0, conn, addr if stages else None)
                continue
            # fast path: a plain connection needs no socket object at all (its I/O is
            # fd-level): the bare fd (see _BareFd), made non-blocking by one ioctl.
            # 8.1 % of an accept's instructions (against a socket object per
            # connection, as above).
            set_blocking(fd, False)
            h = _new_handler(factory, self)
            if h is None:
                os.close(fd)
                continue
            h._sock = _BARE
            h.fd = fd                          # (peer: asked of the socket when read)
            h.reactor = conn_reactor
            _open_handler(h)
        return True

    def _accept_failing(self, e: OSError) -> None:
        """accept() failed and will fail again at once (EMFILE: Linux keeps the
        listener readable, so retrying now would spin): stop polling the
        listener for _ACCEPT_RETRY_MS and retry.  Two log lines per episode, not
        one per retry: the first failure, then (_episode_ends) the count and
        the duration when accepting works again or the listener closes."""
        if self._episode is None:
            self._episode = [e.errno or 0, 0, _monotonic()]
            level = logging.WARNING if e.errno in _ACCEPT_TRANSIENT else logging.ERROR
            _log.log(level, "%s: accept failed (%s); pausing %d ms between retries until it works "
                     "(logged again when it ends)", _safe_repr(self), e, _ACCEPT_RETRY_MS)
        self._episode[1] += 1
        self._retry = True
        self._paused = True
        self._update()
        self.schedule_timer(_ACCEPT_RETRY_MS)

    def _episode_ends(self, how: str) -> None:
        """The end of an accept-failure episode: one WARNING with its count and length."""
        episode, self._episode = self._episode, None
        if episode is None:
            return
        code, failures, since = episode
        _log.warning("%s: %s after %d failed accept() calls over %.1f s (%s)", _safe_repr(self), how,
                     failures, _monotonic() - since, os.strerror(code))

    def _proceed(self, i: int, conn: Any, peer: Any, prepare: Optional[Callable] = None) -> None:
        """Hand the accepted socket ``conn`` to accept stage ``i``; after the last
        one, make the handler (``prepare(h)`` first, if the last stage gave one)
        and call its on_open.  ``peer``: the client address to announce (None:
        the socket's own peer).  See section 7's hooks."""
        if i < len(self._stages):
            self._stages[i](self, conn, peer, lambda c, pr, prep=None: self._proceed(i + 1, c, pr, prep))
            return
        h = _new_handler(self.factory, self)
        if h is None:
            conn.close()
            return
        h.reactor = self.conn_reactor
        if _take_socket(h, conn, peer, prepare):
            _open_handler(h)

    def on_timeout(self, now_ms: int) -> bool:
        """The retry timer of an accept episode (_accept_failing): poll the
        listener again.  Poller thread; ``now_ms`` is monotonic ms."""
        if self._retry:
            self._retry = False
            self._paused = False
            self._update()
        return False

    def close(self) -> None:
        """Stop listening and close the socket (unlinks a unix socket path); any
        thread.  From a thread that is not a poller's, it returns once the socket
        is closed (or its poller is shutting down, which closes it).  From
        another poller's callback it returns at once, the close posted: two
        pollers waiting for each other would wait forever."""
        p = self.poller
        if p is not None and p._foreign():
            if self.reactor.current_poller() is not None:
                p._post(self.close)
                return
            if p._mine.acquire(blocking=False):     # no loop runs that poller now: as its thread
                try:
                    IOHandle.close(self)
                    p._finish_closes()
                finally:
                    p._mine.release()
                return
            done = threading.Event()

            def close_there() -> None:
                try:
                    IOHandle.close(self)
                    p._finish_closes()
                finally:
                    done.set()
            p._post(close_there)
            while not done.wait(_CLOSE_WAIT_POLL) and p._state < _CLOSING_ALL:
                pass                                # (a poller shutting down closes it too)
            return
        IOHandle.close(self)
        if p is not None and not p._mine._is_owned():
            p._finish_closes()                      # no loop step will: now

    def on_close(self) -> None:
        """The listener is closed: end a running accept episode's log, unlink
        a unix socket path.  Poller thread (or the closing thread once stopped)."""
        if self._episode is not None:
            self._episode_ends("stopped listening")
        self.destroy()
        if self._unix_path:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass
            self._unix_path = None


# =============================================================================
# 10. Connector: non-blocking connects
# =============================================================================
# connect() starts a non-blocking connect and hands the socket to a small
# internal _Connecting handler on poller[fd % N].  Exactly one of on_open or
# on_connect_fail(err) follows, on that poller's thread: writable + SO_ERROR
# == 0 is success; a SO_ERROR, a hang-up or the timer is failure.  A refused
# connect reports IN|OUT|ERR|HUP at once, which the dispatch (a handler not reading) routes
# to on_write, where SO_ERROR tells the reason; ERR/HUP without OUT (or an
# exception) closes the _Connecting, and its on_close reports the failure.
# The outcome is always delivered from the poller's inbox or loop, never from
# inside connect(), even when connect_ex() already knew it.  The target's
# fd >= 0 marks it "connecting", so it cannot be connected twice at once.

def _take_once(ticket: Any) -> bool:
    """True for exactly one caller, whichever thread: ``ticket`` is a fresh
    lock (_new_ticket) and a non-blocking acquire -- what a lock is for --
    succeeds once (nobody releases it)."""
    return ticket.acquire(False)


_new_ticket = _thread.allocate_lock


class _Connecting(IOHandle):
    __slots__ = ("target", "addr", "_ticket", "_stage")
    target: Any                   # the user's handler (an IOHandle); None once settled
    addr: Any                     # what connect() was given, for error messages
    _ticket: Any
    _stage: Optional[Callable]

    def on_write(self) -> bool:
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            try:                          # writable without an error, yet not connected
                self._sock.getpeername()  # (a bare hang-up under poll()): not a success
            except OSError as e:
                err = e.errno or errno.ENOTCONN
        if err:
            self._fail(_oserror(err, str(self.addr)))
        else:
            self._succeed()
        return True

    def on_timeout(self, now_ms: int) -> bool:
        self._fail(_oserror(errno.ETIMEDOUT, "connect to %s" % (self.addr,)))
        return False

    def on_close(self) -> None:
        # Closed by the poller before the connect settled: ERR/HUP without OUT
        # (the dispatcher aborts a handler that does not read) or an exception.
        # The target still gets its one on_connect_fail.
        if self.target is None:
            return
        err = 0
        if self._sock is not None:
            try:
                err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError:
                pass
        e = self.error if isinstance(self.error, OSError) and not err else None
        self._fail(e or _oserror(err or errno.ECONNABORTED, str(self.addr)))

    def _abandon(self) -> None:
        self._fail(ConnectionAbortedError(errno.ECONNABORTED, "reactor stopped"))

    def _wind_down(self) -> None:
        pass                              # let it settle: the handler it opens is drained next

    def _take(self) -> bool:
        """True exactly once: the start of the connect is claimed either by the
        poller (``_start``) or by ``connect()`` when that poller has shut down."""
        return _take_once(self._ticket)


    def _succeed(self) -> None:
        if self.poller._state >= _STOPPING:   # on_open could not register any more
            self._fail(ConnectionAbortedError(errno.ECONNABORTED, "reactor stopped"))
            return
        sock = self._detach()
        h, self.target = self.target, None
        if sock.family != socket.AF_UNIX:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:                # already reset: on_open's first I/O will say so
                pass
        if self._stage is not None:        # e.g. the TLS handshake, then on_open
            self._stage(h, sock, self.addr)
            return
        _open_connected(h, sock, self.addr)

    def _fail(self, err: OSError) -> None:
        h, self.target = self.target, None
        if h is None:                      # already settled: exactly one outcome
            return
        if self._state != _CLOSED:
            self._detach().close()
        else:
            self.destroy()
        self.fd = -1
        _connect_failed(h, err)


_RESOLVING = -2                 # handler.fd while its host name is being looked up
_RESOLVER_THREADS = 4           # lookups at once (more wait their turn): one stuck
                                # lookup holds one thread, not the others
_RESOLVER_IDLE = 1.0            # seconds an idle resolver thread waits before it exits


class _Resolver:
    """getaddrinfo() on threads of its own, so that a slow DNS server never
    blocks a poller.  Threads start when there is work and exit after
    _RESOLVER_IDLE seconds without any: none lingers after the last lookup,
    and a forked child (serve()'s workers) starts with a fresh resolver."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._jobs: collections.deque = collections.deque()
        self._threads = 0               # running
        self._idle = 0                  # ... of which waiting for a job

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job()`` on a resolver thread; any thread."""
        with self._cond:
            self._jobs.append(job)
            if self._idle:
                self._cond.notify()
            elif self._threads < _RESOLVER_THREADS:
                self._threads += 1
                threading.Thread(target=self._work, name="goev-resolver", daemon=True).start()

    def _work(self) -> None:
        if hasattr(signal, "pthread_sigmask"):        # as a poller thread: see _thread_main
            signal.pthread_sigmask(signal.SIG_BLOCK, _THREAD_BLOCKED_SIGNALS)
        while True:
            with self._cond:
                while not self._jobs:
                    self._idle += 1
                    woken = self._cond.wait(_RESOLVER_IDLE)
                    self._idle -= 1
                    if not woken and not self._jobs:
                        self._threads -= 1
                        return
                job = self._jobs.popleft()
            job()


_resolver = _Resolver()


def _fresh_resolver() -> None:
    global _resolver
    _resolver = _Resolver()          # the parent's threads do not exist in a forked child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_resolver)


class Connector:
    """Makes outgoing connections for handlers on ``reactor``.

    ``rcvbuf`` sets SO_RCVBUF on each new socket (0 leaves it alone).
    """

    def __init__(self, reactor: Reactor, *, rcvbuf: int = 0) -> None:
        if not isinstance(reactor, Reactor):
            raise TypeError("reactor must be a Reactor, got %r" % (reactor,))
        self.reactor = reactor
        self.rcvbuf = _check_int("rcvbuf", rcvbuf, 0, _INT_MAX)

    def __repr__(self) -> str:
        return "<goev.Connector on %r>" % (self.reactor,)

    def connect(self, addr: Union[str, tuple], handler: IOHandle, timeout_ms: float, *, ssl: Any = None,
                server_hostname: Optional[str] = None,
                ssl_handshake_timeout_ms: float = _TLS_HANDSHAKE_TIMEOUT * 1000) -> None:
        """Connect ``handler`` to ``addr`` without blocking; any thread.  A host
        name is looked up on a resolver thread, never on a poller; the lookup
        counts in ``timeout_ms``, and its failure (socket.gaierror naming the
        host) reaches ``on_connect_fail``.

        Exactly one of ``handler.on_open()`` or ``handler.on_connect_fail(err)``
        follows on the poller thread, always after connect() has returned (even
        when the outcome is known at once, e.g. a unix path that does not exist:
        FileNotFoundError); ``err`` is ConnectionRefusedError, TimeoutError (after
        ``timeout_ms``; 0 means no timeout), an unreachable error, another OSError,
        or ConnectionAbortedError if the reactor stops first.  Raises
        ValueError/TypeError at the call for a malformed address, a negative
        timeout or a handler already open or connecting; RuntimeError once the
        reactor is stopped.  A handler whose connect failed may be connected again.

        ``ssl=context`` (e.g. ``ssl.create_default_context()``) runs a TLS
        handshake after the connect, before on_open; ``server_hostname`` is the
        name the certificate must match (default: the host part of ``addr``).
        A handshake failure reaches ``on_connect_fail``: ssl.SSLCertVerificationError,
        ssl.SSLError, TimeoutError after ``ssl_handshake_timeout_ms`` milliseconds.
        TLS is a Part II extra: without it ``ssl=`` raises RuntimeError.
        """
        if not isinstance(handler, IOHandle):
            raise TypeError("handler must be an IOHandle, got %r" % (handler,))
        if handler._sock is not None or handler.poller is not None or handler.fd != -1:
            raise ValueError("%s is already open, connecting or registered" % _safe_repr(handler))
        timeout = _check_delay("timeout_ms", timeout_ms)
        if self.reactor.pollers[0]._state >= _STOPPING:
            raise RuntimeError("reactor is stopped")
        family, sockaddr = parse_address(addr, resolve=False)
        if family != socket.AF_UNIX and sockaddr[1] == 0:
            raise ValueError("cannot connect to port 0 in %r" % (addr,))
        stage = None
        if ssl is not None:
            if server_hostname is None and family != socket.AF_UNIX:
                server_hostname = _host_of(addr) or None
            stage = _extra("tls_client")(ssl, server_hostname, ssl_handshake_timeout_ms)
        handler._reset_transport()
        handler.reactor = self.reactor
        handler.error = None                  # from a failed attempt: _add would abort on it
        if family == socket.AF_UNSPEC:        # a host name: look it up first
            self._resolve(addr, sockaddr, handler, timeout, stage)
        else:
            self._connect_to(family, sockaddr, addr, handler, timeout, stage)

    def _resolve(self, addr: Any, hostport: tuple, handler: IOHandle, timeout: float, stage: Any) -> None:
        """Look ``hostport`` up on a resolver thread; then, on poller 0, connect
        with what is left of ``timeout`` (ms), or report the failure."""
        p = self.reactor.pollers[0]
        handler.fd = _RESOLVING
        ticket = _new_ticket()                # one outcome: the lookup's, or the timeout's
        deadline = _monotonic() + timeout / 1000.0 if timeout else math.inf
        timer: list = []

        def lookup() -> None:                 # a resolver thread
            host, port = hostport
            try:
                info = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
                result: Any = (info[0][0], info[0][4])
            except OSError as e:
                result = socket.gaierror(e.errno, "%s: %r" % (e.strerror, host))
            p._post(resolved, result)
            if p._state >= _CLOSING_ALL and _take_once(ticket):   # nobody will run resolved
                _connect_failed(handler, ConnectionAbortedError(errno.ECONNABORTED, "reactor stopped"))

        def resolved(result: Any) -> None:    # poller 0
            if not _take_once(ticket):
                return
            if timer:
                timer[0].cancel()
            handler.fd = -1
            if isinstance(result, BaseException):
                _connect_failed(handler, result)
                return
            left = 0.0 if not timeout else max(1.0, (deadline - _monotonic()) * 1000.0)
            try:
                self._connect_to(result[0], result[1], addr, handler, left, stage)
            except Exception as e:
                _connect_failed(handler, e)

        def timed_out() -> None:              # poller 0: the lookup is still running
            if _take_once(ticket):
                _connect_failed(handler, _oserror(errno.ETIMEDOUT, "looking up %s" % (hostport[0],)))

        if deadline != math.inf:
            timer.append(p._call_at(deadline, 0.0, timed_out, ()))
        _resolver.submit(lookup)

    def _connect_to(self, family: int, sockaddr: Any, addr: Any, handler: IOHandle, timeout: float,
                    stage: Any) -> None:
        """Start the connect to a resolved ``sockaddr``; the outcome follows on
        the poller that will own the socket.  Raises RuntimeError if that poller
        has shut down."""
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if self.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            err = sock.connect_ex(sockaddr)
        except BaseException:
            sock.close()
            raise
        c = _Connecting()
        c.target = handler
        c.addr = addr if isinstance(addr, str) else sockaddr
        c._sock = sock
        c.fd = handler.fd = sock.fileno()     # handler.fd >= 0 marks it "connecting"
        c._ticket = _new_ticket()
        c._stage = stage
        p = self.reactor._poller_for(c.fd)
        # Always posted, even from p's own thread: on_open/on_connect_fail must
        # never run inside connect() (the caller's state may be half updated).
        p._post(self._start, c, err, timeout)
        if p._state >= _CLOSING_ALL and c._take():   # p shut down: nobody will run _start
            handler.fd = -1
            sock.close()
            raise RuntimeError("reactor is stopped")

    @staticmethod
    def _start(c: _Connecting, err: int, timeout: float) -> None:
        if not c._take():
            return
        p = c.target.reactor._poller_for(c.fd)
        c.reactor = c.target.reactor
        c.poller = p
        c._state = _OPEN
        if p._state >= _STOPPING:
            c._fail(ConnectionAbortedError(errno.ECONNABORTED, "reactor stopped"))
        elif err == 0:                    # immediate success (common on unix sockets)
            c._succeed()
        elif err == errno.EINPROGRESS or err == getattr(errno, "WSAEWOULDBLOCK", -1):
            # (EAGAIN is *not* in progress: on a unix socket it means the backlog
            # is full and nothing was started; on TCP, no route cache entries.)
            try:
                p._add(c, c.fd, EV_OUT)
            except Exception as e:
                c._fail(e if isinstance(e, OSError) else _oserror(errno.ECONNABORTED, str(e)))
                return
            if timeout and timeout != math.inf:
                c.schedule_timer(timeout)
        else:
            c._fail(_oserror(err, str(c.addr)))


# =============================================================================
# 11. Datagrams: UDP and unix datagram sockets
# =============================================================================
# A DatagramHandle is an IOHandle whose socket carries datagrams: it owns its
# socket (bound, or connected to one peer) and registers itself; nothing is
# accepted.  Three rules differ from streams, and each has its reason:
# - Reads come in bounded batches (_DGRAM_BATCH per readiness, like the accept
#   batch): level-triggered epoll reports the socket again while datagrams
#   remain, so a flooded socket shares the poller with everything else.  A
#   datagram larger than the poller's buffer is counted and skipped, never
#   delivered cut short: Linux's recv(MSG_TRUNC) returns the datagram's real
#   length; elsewhere a datagram that fills the buffer counts as cut.
# - A send the kernel refuses (EAGAIN) queues the whole datagram with its
#   address in a queue of its own (the stream queue is gathered into one
#   writev, which would merge datagrams), up to queue_limit bytes; beyond it a
#   datagram is dropped and counted (``dropped_datagrams``), as the network
#   itself would.
# - An error is news, not an end.  ICMP "port unreachable" (ECONNREFUSED on a
#   connected socket), EMSGSIZE, EHOSTUNREACH ... reach ``on_error`` and the
#   socket stays open.  On a datagram socket an error event (EPOLLERR) is such
#   a pending error, which the next recv returns; so the handler is always
#   registered for EV_IN (see _update), and the loop's "abort on HUP/ERR when
#   not reading" rule for streams never applies to it.
# Cross-thread: sendto from another thread is posted to the owning poller
# (FIFO, as async_write); close likewise.

_RECV_TRUNC = socket.MSG_TRUNC if sys.platform.startswith("linux") else 0   # see above


class DatagramHandle(IOHandle):
    """A UDP (IPv4, IPv6) or unix datagram socket on a reactor.  Subclass it,
    override ``on_datagram`` (and ``on_error``), then ``bind`` (a server) or
    ``connect`` (a client); both register the handler and return it::

        class Echo(goev.DatagramHandle):
            def on_datagram(self, data, addr):
                self.sendto(data, addr)

        Echo().bind(reactor, "127.0.0.1:5353")

    Callbacks run on the owning poller's thread.  ``on_open`` is not called
    (bind and connect return the handler: set it up before or after).
    Counters: ``dropped_datagrams`` (the send queue was full, or the handler
    closed), ``truncated_datagrams`` (larger than the poller's read buffer:
    skipped).  ``error``: the last error reported to ``on_error``.
    ``queue_limit``: bytes of datagrams queued while the kernel refuses them
    (default 256 KiB).  Level-triggered only (EV_ET is not used).
    """
    __slots__ = ("dropped_datagrams", "truncated_datagrams", "queue_limit", "_dq", "_dq_bytes",
                 "_unix_path")
    dropped_datagrams: int
    truncated_datagrams: int
    queue_limit: int
    _dq: Optional[collections.deque]
    _dq_bytes: int
    _unix_path: Optional[str]

    def __new__(cls, *args: Any, **kwargs: Any) -> "DatagramHandle":
        self: Any = IOHandle.__new__(cls)
        self.dropped_datagrams = self.truncated_datagrams = self._dq_bytes = 0
        self.queue_limit = _DGRAM_QUEUE
        self._dq = self._unix_path = None
        return self

    # -- opening --------------------------------------------------------------------

    def bind(self, reactor: Reactor, addr: Union[str, tuple], *, reuse_addr: bool = False,
             reuse_port: bool = False, broadcast: bool = False, rcvbuf: int = 0, sndbuf: int = 0,
             poller: Optional[int] = None) -> "DatagramHandle":
        """Bind to ``addr`` (goev's address forms: ``"127.0.0.1:5353"``,
        ``"[::1]:5353"``, ``":5353"``, ``"unix:/path"``, ``"unix:@name"``; port 0
        picks a free one, see ``address``) and register for reading.
        ``reuse_port``: SO_REUSEPORT (several sockets on one port: the kernel
        spreads datagrams by source address); ``broadcast``: SO_BROADCAST (may
        send to broadcast addresses); ``rcvbuf``/``sndbuf``: socket buffer
        sizes (0: the system's); ``poller=i`` pins the socket to poller i.
        A unix path is unlinked on close (a stale one is replaced; one with a
        live server is EADDRINUSE).  Returns self.  Raises TypeError/ValueError
        for bad arguments, OSError (EADDRINUSE ...) if it cannot bind; then no
        fd is left open."""
        return self._open(reactor, addr, None, reuse_addr, reuse_port, broadcast, rcvbuf, sndbuf, poller)

    def connect(self, reactor: Reactor, addr: Union[str, tuple], *, local: Union[str, tuple, None] = None,
                broadcast: bool = False, rcvbuf: int = 0, sndbuf: int = 0,
                poller: Optional[int] = None) -> "DatagramHandle":
        """The client's mode: connect to ``addr`` (a datagram connect only sets
        the default destination and filters what is received: it never waits),
        optionally bound to ``local`` first, and register for reading.  Then
        ``sendto(data)`` needs no address, ``peer`` is ``addr`` resolved, and
        an ICMP error from the peer (nobody listens: ECONNREFUSED) reaches
        ``on_error``.  A unix client without ``local`` gets an autobound
        abstract name (Linux), so that the server can answer.  Returns self;
        raises as ``bind``."""
        return self._open(reactor, local, addr, False, False, broadcast, rcvbuf, sndbuf, poller)

    def _open(self, reactor: Reactor, local: Any, remote: Any, reuse_addr: bool, reuse_port: bool,
              broadcast: bool, rcvbuf: int, sndbuf: int, poller: Optional[int]) -> "DatagramHandle":
        if not isinstance(reactor, Reactor):
            raise TypeError("reactor must be a Reactor, got %r" % (reactor,))
        if self.fd >= 0 or self._state != _OPEN:
            raise ValueError("%s is already bound or connected (or closed): make a new handler"
                             % _safe_repr(self))
        _check_int("rcvbuf", rcvbuf, 0, _INT_MAX)
        _check_int("sndbuf", sndbuf, 0, _INT_MAX)
        to = parse_address(remote) if remote is not None else None
        at = parse_address(local) if local is not None else None
        family = (to or at or (0, None))[0]
        if to is not None and at is not None and to[0] != at[0]:
            raise ValueError("local address %r and remote %r are of different families" % (local, remote))
        sock = socket.socket(family, socket.SOCK_DGRAM)
        path = None
        try:
            sock.setblocking(False)
            if reuse_addr:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if broadcast:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            if at is not None:
                if family == socket.AF_UNIX and not at[1].startswith("\0"):
                    _unix_path_free(at[1], socket.SOCK_DGRAM)
                    path = at[1]
                sock.bind(at[1])
            elif family == socket.AF_UNIX and sys.platform.startswith("linux"):
                sock.bind("")                     # autobind: an abstract name the server can answer
            if to is not None:
                sock.connect(to[1])
                self.peer = to[1]
            self._sock = sock
            self.fd = sock.fileno()
            reactor.add_handler(self, self.fd, EV_IN, poller=poller)
        except BaseException:
            self._sock = None
            self.fd = -1
            sock.close()
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise
        self._unix_path = path
        return self

    @property
    def address(self) -> Any:
        """The bound address (getsockname()): ``(host, port)``, ``(host, port,
        flow, scope)``, a unix path, or ``"@name"`` for an abstract one."""
        s = self._sock
        if s is None:
            return None
        a = s.getsockname()
        if isinstance(a, bytes):
            a = a.decode(errors="replace")
        if isinstance(a, str) and a.startswith("\0"):
            a = "@" + a[1:]
        return a

    def join_group(self, group: str, interface: str = "") -> None:
        """Join multicast ``group`` ("239.1.2.3", "ff02::1:3") on ``interface``: an
        IPv4 address of the interface (default: the kernel's choice) or, for
        IPv6, an interface name or index ("" or "0": the default).  The socket
        must be bound to the group's port.  Any thread (a setsockopt)."""
        self._membership(group, interface, True)

    def leave_group(self, group: str, interface: str = "") -> None:
        """Leave a group joined with ``join_group``."""
        self._membership(group, interface, False)

    def _membership(self, group: str, interface: str, join: bool) -> None:
        s = self._sock
        if s is None:
            raise RuntimeError("%s is not bound" % _safe_repr(self))
        if ":" in group:
            if interface and not interface.isdigit():
                index = socket.if_nametoindex(interface)
            else:
                index = int(interface or 0)
            mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", index)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP if join else socket.IPV6_LEAVE_GROUP, mreq)
        else:
            mreq = socket.inet_aton(group) + socket.inet_aton(interface or "0.0.0.0")
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP if join else socket.IP_DROP_MEMBERSHIP,
                         mreq)

    # -- callbacks (override these) --------------------------------------------------

    def on_datagram(self, data: memoryview, addr: Any) -> None:
        """A datagram arrived from ``addr`` (as recvfrom gives it: ``(host, port)``,
        a unix path, None for an unnamed unix sender).  ``data`` is a memoryview
        of the poller's shared buffer, valid until this callback returns (copy
        with ``bytes(data)`` to keep it).  Default: drop it."""

    def on_error(self, err: OSError, addr: Any) -> None:
        """A datagram error: ``err`` an OSError (ConnectionRefusedError: the
        connected peer's port is closed, an ICMP answer; EMSGSIZE: too large to
        send; EHOSTUNREACH ...), ``addr`` the destination of the send that
        failed (None for an error reported by a read).  The socket stays open.
        Default: keep it in ``self.error``."""
        self.error = err

    def on_read(self) -> Optional[bool]:
        """Read a bounded batch of datagrams (_DGRAM_BATCH), calling
        ``on_datagram`` for each.  Override ``on_datagram``, not this; a
        handler that overrides this reads with ``recvfrom()`` and should read a
        bounded number per call too (the poller reports it again while
        datagrams remain)."""
        p = self.poller
        s = self._sock
        if s is None:
            return True
        rview = p._rview
        size = len(rview)
        recv = s.recvfrom_into
        for _ in range(_DGRAM_BATCH):
            try:
                n, addr = recv(rview, 0, _RECV_TRUNC)
            except BlockingIOError:
                break
            except OSError as e:
                if self._state != _CLOSED:
                    self.on_error(_bare(e), None)
                break
            if n >= size and self._truncated(n, size, addr):
                continue
            if self._state:                       # closing: flush the queue, read nothing more
                continue
            self.on_datagram(p._view(n), addr)
            if self._state:
                break
        return True

    def recvfrom(self) -> Optional[tuple]:
        """One datagram: ``(data, addr)``, ``data`` a memoryview of the poller's
        shared buffer (valid until the next read on this poller), or None when
        none is ready -- also after an error, which went to ``on_error``.
        Datagrams too large for the buffer are skipped and counted.  Poller
        thread only, in ``on_read``."""
        p = self.poller
        s = self._sock
        if p is None or s is None:
            if self._state == _CLOSED:
                return None
            raise RuntimeError("recvfrom() on %s, which is not bound or connected" % _safe_repr(self))
        rview = p._rview
        size = len(rview)
        for _ in range(_DGRAM_BATCH):
            try:
                n, addr = s.recvfrom_into(rview, 0, _RECV_TRUNC)
            except BlockingIOError:
                return None
            except OSError as e:
                if self._state != _CLOSED:
                    self.on_error(_bare(e), None)
                return None
            if n >= size and self._truncated(n, size, addr):
                continue
            return p._view(n), addr
        return None

    def _truncated(self, n: int, size: int, addr: Any) -> bool:
        """Was a datagram of ``n`` bytes (recv's answer with MSG_TRUNC) cut to the
        ``size``-byte buffer?  Count it (and say so in trace mode) if it was."""
        if n == size and _RECV_TRUNC:
            return False                          # exactly the buffer's size: whole
        self.truncated_datagrams += 1
        obs = self.poller._observer
        if obs is not None:
            obs.say("fd %d: datagram of %s bytes from %r is larger than the %d-byte read buffer: "
                    "dropped, counted" % (self.fd, n if _RECV_TRUNC else ">= %d" % n, addr, size))
        return True

    # -- sending --------------------------------------------------------------------

    def sendto(self, data: Any, address: Any = None) -> None:
        """Send one datagram to ``address`` (as socket.sendto takes it: ``(host,
        port)``, a unix path; None: the connected peer).  Never blocks: if the
        kernel has no room the datagram is queued whole, with its address, and
        sent in order when the socket is writable; above ``queue_limit`` queued
        bytes, or once closed, it is dropped and counted in
        ``dropped_datagrams``.  A failure (EMSGSIZE, ECONNREFUSED, EHOSTUNREACH
        ...) goes to ``on_error``.  From another thread the data is copied and
        sent, in call order, by the owning poller (as ``async_write``).
        RuntimeError if the handler was never bound or connected."""
        p = self.poller
        if p is None:
            if self._state == _CLOSED:
                self.dropped_datagrams += 1
                return
            raise RuntimeError("sendto() on %s, which is not bound or connected" % _safe_repr(self))
        if not (p._mine._is_owned() or p._state == _NEW):
            p._post(self._sendto_posted, data if type(data) is bytes else bytes(memoryview(data)), address)
            return
        if self._state:
            self.dropped_datagrams += 1
            return
        if self._dq:                              # keep the order: behind the queue
            self._queue(bytes(memoryview(data)), address)
            return
        try:
            if address is None:
                self._sock.send(data)
            else:
                self._sock.sendto(data, address)
        except BlockingIOError:
            self._queue(bytes(memoryview(data)), address)
        except OSError as e:
            self.on_error(_bare(e), address)

    def _sendto_posted(self, data: bytes, address: Any) -> None:
        if self._state == _CLOSED:
            self.dropped_datagrams += 1
        else:
            self.sendto(data, address)

    def _queue(self, data: bytes, address: Any) -> None:
        if self._dq_bytes + len(data) > self.queue_limit:
            self.dropped_datagrams += 1
            return
        dq = self._dq
        if dq is None:
            dq = self._dq = collections.deque()
        dq.append((data, address))
        self._dq_bytes += len(data)
        if not self._mask & EV_OUT:
            self._update()

    @property
    def pending_write_bytes(self) -> int:
        """Bytes of queued datagrams."""
        return self._dq_bytes

    def _flush(self) -> bool:
        """Send queued datagrams while the kernel takes them (on_write's default)."""
        dq = self._dq
        if not dq:
            return True
        s = self._sock
        while dq:
            data, address = dq[0]
            try:
                if address is None:
                    s.send(data)
                else:
                    s.sendto(data, address)
            except BlockingIOError:
                return True
            except OSError as e:
                dq.popleft()
                self._dq_bytes -= len(data)
                self.on_error(_bare(e), address)
                if self._state == _CLOSED:
                    return True
                continue
            dq.popleft()
            self._dq_bytes -= len(data)
        self._update()
        if self._state == _CLOSING:
            self._close_now()
        else:
            self.on_write_drained()
        return True

    def _drop_queue(self) -> None:
        if self._dq:
            self.dropped_datagrams += len(self._dq)
            self._dq.clear()
        self._dq_bytes = 0

    def _update(self) -> None:
        """The registered events: EV_IN always while not closed (errors are read:
        see the section's notes), EV_OUT while datagrams are queued or the user
        asked for it."""
        want = 0
        if self._state != _CLOSED:
            want = EV_IN
            if self._dq or self._user & EV_OUT:
                want |= EV_OUT
        have = self._mask
        if want == have or self.poller is None:
            return
        b = self.poller._backend
        self._mask = want                         # published first: see IOHandle._update
        try:
            if not want:
                b.unregister(self.fd)
            elif not have:
                b.register(self.fd, b.native[want])
            else:
                b.modify(self.fd, b.native[want])
        except OSError:
            if want:
                self._mask = have
                raise

    # -- closing --------------------------------------------------------------------

    def close(self) -> None:
        """Send the queued datagrams, then close; idempotent; any thread.  (An
        error event that comes with a writable one while the queue is being
        sent ends the flush: the loop aborts a closing handler then, and the
        rest is counted in ``dropped_datagrams``.)"""
        if self._posted_if_elsewhere(self.close):
            return
        if self._state:
            return
        if self._dq:
            self._state = _CLOSING
        else:
            self._close_now()

    def _abandon(self) -> None:
        """The reactor stops: one last try to send the queue, the rest counted."""
        if self._dq:
            try:
                self._flush()
            except Exception:
                pass
        self._drop_queue()
        self._close_now()

    def destroy(self) -> None:
        """Close the socket (the default on_close); a bound unix path is unlinked."""
        IOHandle.destroy(self)
        self._drop_queue()
        path, self._unix_path = self._unix_path, None
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass

    def __repr__(self) -> str:
        state = ("open", "closing", "closed")[self._state]
        where = "" if self.poller is None else " poller=%d" % self.poller.index
        q = " queued=%d/%dB" % (len(self._dq), self._dq_bytes) if self._dq else ""
        return "<%s fd=%d%s %s%s>" % (type(self).__name__, self.fd, where, state, q)


_POSTED_SENDS[DatagramHandle._sendto_posted] = lambda h, args: setattr(
    h, "dropped_datagrams", h.dropped_datagrams + 1)


###############################################################################
# PART II -- production extras
#
# Everything below attaches to Part I through the hooks declared in section 7
# ("Hooks: where Part II attaches"); Part I names nothing defined here.  A copy
# of goev.py cut at this banner is a complete reactor without trace mode, TLS,
# the PROXY protocol, ConnectPool, serve() and the command line.
###############################################################################


# =============================================================================
# 12. Trace mode: every step of the loop on stderr
# =============================================================================
# Reactor(trace=True), GOEV_TRACE=1 or --trace attach a _Tracer to each
# poller: the loop's observer (section 7's hooks), so what it prints is the
# real loop's order, step for step.  A line on stderr for each step: what the
# kernel reported, which callback ran, every read and write (partial writes
# visible), every epoll_ctl (EV_OUT armed/disarmed), timers, wake-ups,
# accepts and closes.  It wraps the backend, the poller's fd-level I/O and
# each registered socket in printing proxies; with trace off none of this
# code runs.

def _ev_names(ev: int) -> str:
    names = [n for bit, n in ((EV_IN, "IN"), (EV_OUT, "OUT"), (_EPOLLRDHUP, "RDHUP"),
                              (_EPOLLHUP, "HUP"), (_EPOLLERR, "ERR"), (EV_ET, "ET")) if ev & bit]
    return "|".join(names) or "none"


class _TracedBackend:
    """Prints every registration change, then forwards to the real backend."""

    def __init__(self, backend: Any, say: Callable[[str], None]) -> None:
        self._b, self._say, self.name = backend, say, backend.name
        self.threadsafe_ctl, self.native = backend.threadsafe_ctl, backend.native
        self._ev: dict = {}

    def register(self, fd: int, ev: int) -> None:
        self._say("fd %d: watch %s%s" % (fd, _ev_names(ev), " (EV_OUT armed)" if ev & EV_OUT else ""))
        self._b.register(fd, ev)
        self._ev[fd] = ev

    def modify(self, fd: int, ev: int) -> None:
        old = self._ev.get(fd, 0)
        note = " (EV_OUT armed)" if ev & EV_OUT and not old & EV_OUT else \
            " (EV_OUT disarmed)" if old & EV_OUT and not ev & EV_OUT else \
            " (reading paused)" if old & EV_IN and not ev & EV_IN else \
            " (reading resumed)" if ev & EV_IN and not old & EV_IN else ""
        self._say("fd %d: watch %s -> %s%s" % (fd, _ev_names(old), _ev_names(ev), note))
        self._b.modify(fd, ev)
        self._ev[fd] = ev

    def unregister(self, fd: int) -> None:
        self._say("fd %d: stop watching" % fd)
        self._ev.pop(fd, None)
        self._b.unregister(fd)

    def drop_stale(self, fd: int, live: Callable[[], list]) -> None:
        self._say("fd %d: reported but owned by no handler (closed behind goev's back): forgotten" % fd)
        self._ev.pop(fd, None)
        self._b.drop_stale(fd, live)

    def poll(self, timeout: float) -> list:
        events = self._b.poll(timeout)
        what = "%s_wait" % ("epoll" if self.name == "epoll" else "select")
        shown = ", ".join("fd %d %s" % (fd, _ev_names(ev)) for fd, ev in events)
        self._say("%s(timeout=%s) -> %d event%s%s" % (
            what, "none" if timeout < 0 else "%.3fs" % timeout, len(events),
            "" if len(events) == 1 else "s", ": " + shown if shown else ""))
        return events

    def close(self) -> None:
        self._b.close()


class _TracedSocket:
    """A socket whose I/O calls print what they did; everything else forwards."""

    def __init__(self, sock: Any, say: Callable[[str], None]) -> None:
        self._s, self._say = sock, say
        self._fd = sock.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s, name)

    def recv_into(self, buf: Any, *a: Any) -> int:
        try:
            n = self._s.recv_into(buf, *a)
        except BlockingIOError:
            self._say("fd %d: recv -> nothing ready (EAGAIN)" % self._fd)
            raise
        except OSError as e:
            self._say("fd %d: recv -> %s" % (self._fd, e))
            raise
        self._say("fd %d: recv -> %d bytes%s" % (self._fd, n, "" if n else " (end of stream)"))
        return n

    def recvfrom_into(self, buf: Any, *a: Any) -> tuple:    # what DatagramHandle reads with
        try:
            n, addr = self._s.recvfrom_into(buf, *a)
        except BlockingIOError:
            self._say("fd %d: recvfrom -> nothing ready (EAGAIN)" % self._fd)
            raise
        except OSError as e:
            self._say("fd %d: recvfrom -> %s (a pending error: on_error)" % (self._fd, e))
            raise
        self._say("fd %d: recvfrom -> %d bytes from %r" % (self._fd, n, addr))
        return n, addr

    def sendto(self, data: Any, addr: Any) -> int:
        return self._sent("sendto(%r)" % (addr,), self._s.sendto, data, addr)

    def send(self, data: Any, *a: Any) -> int:
        return self._sent("send", self._s.send, data, *a)

    def _sent(self, what: str, fn: Callable, data: Any, *a: Any) -> int:
        try:
            n = fn(data, *a)
        except BlockingIOError:
            self._say("fd %d: %s %d bytes -> no room (EAGAIN)" % (self._fd, what, len(data)))
            raise
        except OSError as e:
            self._say("fd %d: %s %d bytes -> %s" % (self._fd, what, len(data), e))
            raise
        self._say("fd %d: %s %d bytes -> %d sent" % (self._fd, what, len(data), n))
        return n

    def _accept(self) -> tuple:          # what Acceptor.on_read calls
        fd, addr = self._s._accept()
        self._say("fd %d: accept -> new connection fd %d from %r" % (self._fd, fd, addr))
        return fd, addr

    def shutdown(self, how: int) -> None:
        self._say("fd %d: shutdown(SHUT_WR): FIN sent" % self._fd)
        self._s.shutdown(how)

    def close(self) -> None:
        self._say("fd %d: close(fd)" % self._fd)
        self._s.close()


class _Tracer(_Observer):
    """The teaching observer: one stderr line per step of its poller's loop."""
    __slots__ = ()

    def __init__(self, poller: _Poller, slow: Optional[float]) -> None:
        super().__init__(poller, slow)
        poller._backend = _TracedBackend(poller._backend, self.say)
        poller._readv, poller._write, poller._writev = self._readv, self._write, self._writev
        self.say("created: %s backend, waker fd %d" % (poller._backend.name, poller._waker.fd))

    def say(self, msg: str) -> None:
        sys.stderr.write("goev[p%d] %s\n" % (self.poller.index, msg))
        sys.stderr.flush()

    def call(self, h: IOHandle, method: str) -> Any:
        fd = h.fd
        self.say("fd %d: %s()" % (fd, self._label(h, method)))
        keep = super().call(h, method)
        if _closes(h, keep):
            self.say("fd %d: %s returned %r%s -> close (after flushing %d queued bytes)"
                     % (fd, method, keep, " at end of stream" if keep is None else "", h._wq_bytes))
        return keep

    def added(self, h: IOHandle, fd: int, events: int) -> None:
        s = h._socket()                             # (a bare fd: a socket to trace the close of)
        trace = getattr(s, "trace", None)
        if trace is not None:                       # a transport that traces itself (TLS)
            trace(self.say)
        elif s is not None and s is not _BARE and not isinstance(s, _TracedSocket):
            h._sock = _TracedSocket(s, self.say)
        self.say("fd %d: add handler %s for %s" % (fd, type(h).__name__, _ev_names(events)))

    def posted(self, fn: Callable) -> None:
        self.say("posted %s: waker written" % getattr(fn, "__name__", fn))

    def draining(self, n: int) -> None:
        self.say("wake-up: running %d posted item%s" % (n, "s" * (n != 1)))

    def timers_due(self, due: list) -> None:
        self.say("timers: %d due" % sum(1 for t in due if t[2] is not None))

    # The fd-level I/O of IOHandle.read/write/_flush, printing what it did.
    def _readv(self, fd: int, bufs: Any) -> int:
        try:
            n = os.readv(fd, bufs)
        except BlockingIOError:
            self.say("fd %d: readv -> nothing ready (EAGAIN)" % fd)
            raise
        except OSError as e:
            self.say("fd %d: readv -> %s" % (fd, e))
            raise
        self.say("fd %d: readv -> %d bytes%s" % (fd, n, "" if n else " (end of stream)"))
        return n

    def _write(self, fd: int, data: Any) -> int:
        try:
            n = os.write(fd, data)
        except OSError as e:
            self.say("fd %d: write %d bytes -> %s" % (fd, len(data), e))
            raise
        self.say("fd %d: write %d bytes -> %d sent%s" % (
            fd, len(data), n, "" if n == len(data) else " (partial: rest queued)"))
        return n

    def _writev(self, fd: int, bufs: Any) -> int:
        total = sum(map(len, bufs))
        try:
            n = os.writev(fd, bufs)
        except OSError as e:
            self.say("fd %d: writev %d buffers, %d bytes -> %s" % (fd, len(bufs), total, e))
            raise
        self.say("fd %d: writev %d buffers, %d bytes -> %d sent" % (fd, len(bufs), total, n))
        return n


_EXTRAS["tracer"] = _Tracer


# =============================================================================
# 13. TLS: SSLObject over memory BIOs, and the class swap
# =============================================================================
# The standard library's ssl module can run TLS without owning the socket:
# ``context.wrap_bio(incoming, outgoing)`` gives an ``SSLObject`` that reads
# ciphertext from one ``MemoryBIO`` and writes ciphertext to another.  goev
# keeps doing the socket I/O itself, so TLS is non-blocking for free:
#
#   socket --recv--> incoming BIO --sslobj.read()--> plaintext (the shared buffer)
#   plaintext --sslobj.write()--> outgoing BIO --IOHandle.write()--> socket
#
# The ciphertext goes through the ordinary send queue, so EV_OUT arming, the
# water marks, ordering and async_write are the plaintext ones, unchanged.
#
# A connection starts with an internal ``_TLSHandshake`` handler (like
# ``_Connecting``) on the connection's poller: it feeds the BIOs on readable
# and writable events, calls ``do_handshake()`` and keeps a timeout timer.
# On success it leaves the poller without closing the socket and hands it to
# the user's handler, whose class is swapped -- once -- for a cached subclass
# ``TLS<Name>(Name, _TLSMixin)``: same slots (the mixin adds none), so the
# swap is allowed, and the mixin's read/write/close sit *below* the user's
# class in the MRO (a user ``write`` that calls ``super().write`` frames
# plaintext, then the mixin encrypts it).  Plaintext handlers never see any
# of this: their read()/write() contain no TLS test.  The TLS state lives in
# the ``_sock`` slot: a ``_TLSTransport`` whose recv_into/shutdown/... are the
# raw socket's own bound methods, plus the SSLObject and the two BIOs; the
# ciphertext goes out through IOHandle.write, by fd, like any other bytes.  Then
# on_open runs (server: after accept + handshake; client: after connect +
# handshake).  A failed handshake is the peer's problem, not the server's:
# it is logged at DEBUG only and the socket closed; a client gets
# on_connect_fail(err) (ssl.SSLCertVerificationError is an OSError).

class _TLSTransport:
    """Stands in for the socket of a TLS connection: the raw socket's methods
    (ciphertext) plus the SSLObject and its two memory BIOs."""
    __slots__ = ("sock", "sslobj", "incoming", "outgoing", "decrypt", "encrypt", "buffered",
                 "recv_into", "shutdown", "fileno", "getsockopt", "setsockopt",
                 "getpeername", "getsockname", "family", "eof", "notified")
    sock: Any                     # the raw socket, or its _TracedSocket in trace mode
    recv_into: Callable[..., int]

    def __init__(self, sock: socket.socket, context: Any, server_side: bool,
                 server_hostname: Optional[str]) -> None:
        self.incoming = _ssllib.MemoryBIO()
        self.outgoing = _ssllib.MemoryBIO()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                       server_hostname=server_hostname)
        # The C object under SSLObject, where there is one: one Python frame less per call.
        raw = getattr(self.sslobj, "_sslobj", self.sslobj)
        self.decrypt, self.encrypt, self.buffered = raw.read, raw.write, raw.pending
        self.sock = sock
        self.recv_into = sock.recv_into      # (its writes go through IOHandle.write, by fd)
        self.shutdown, self.fileno = sock.shutdown, sock.fileno
        self.getsockopt, self.setsockopt = sock.getsockopt, sock.setsockopt
        self.getpeername, self.getsockname = sock.getpeername, sock.getsockname
        self.family = sock.family
        self.eof = False              # no more ciphertext will come (FIN, reset, close_notify)
        self.notified = False         # our close_notify is on its way

    def close(self) -> None:
        self.sock.close()

    def trace(self, say: Callable[[str], None]) -> None:
        """Trace mode: route the raw socket calls through a printing proxy."""
        if not isinstance(self.sock, _TracedSocket):
            s = self.sock = _TracedSocket(self.sock, say)
            self.recv_into, self.shutdown = s.recv_into, s.shutdown


_TLS_CLASSES: dict = {}           # user class -> its TLS subclass (made once per class)
_TLS_PLAIN: dict = {}             # ... and back (a handler reconnected without TLS)


class _TLSMixin(IOHandle):
    """read/write/close of a TLS connection (see the section comment).  Poller thread."""
    __slots__ = ()

    @property
    def ssl_object(self) -> Any:
        """The connection's ``ssl.SSLObject``: getpeercert(), version(), cipher(),
        selected_alpn_protocol() ..."""
        return None if self._sock is None else self._sock.sslobj

    def read(self) -> Optional[memoryview]:
        """IOHandle.read for TLS: plaintext in the poller's shared buffer, same contract.

        The ciphertext is received into the shared buffer too (the incoming BIO
        copies it), at most the buffer's size minus what the BIO holds: then
        the plaintext, always smaller, fits, and nothing decryptable is ever
        left behind where no readable event would announce it."""
        t = self._sock
        view = self.poller._rview
        size = len(view)
        incoming = t.incoming
        got = 0
        while True:
            if incoming.pending or t.buffered():
                decrypt = t.decrypt
                try:
                    while True:
                        n = decrypt(size - got, view[got:])
                        if not n:                  # the peer's close_notify: clean end
                            t.eof = True
                            break
                        got += n
                        # Stop when nothing is left rather than let the next call
                        # raise SSLWantReadError: building that exception costs
                        # more than the decryption of a small record.
                        if got >= size or not (incoming.pending or t.buffered()):
                            break
                except _ssllib.SSLWantReadError:   # a partial record: wait for more
                    pass
                except _ssllib.SSLZeroReturnError:
                    t.eof = True
                except _ssllib.SSLError as e:      # a ragged EOF (SSLEOFError) or garbage
                    t.eof = True
                    if not isinstance(e, _ssllib.SSLEOFError):
                        t.notified = True          # no close_notify after a fatal error
                        if self.error is None:
                            self.error = _bare(e)
                        _log.debug("%s: TLS error: %s", _safe_repr(self), e)
                if t.outgoing.pending:             # a key update or an alert to answer
                    IOHandle.write(self, t.outgoing.read())
                if got:
                    if got == size:                # a tiny buffer: more may be decryptable
                        self.poller._post(self._tls_kick)
                    return view[:got]
            if t.eof:
                self._eof = True
                if self._mask & EV_IN:
                    self._update()
                return _EMPTY_VIEW
            room = size - incoming.pending
            try:
                n = t.recv_into(view, room if room > 0 else size)
            except BlockingIOError:
                return None
            except OSError as e:
                self.error = _bare(e)
                n = 0
            if n:
                incoming.write(view[:n])
            else:
                t.eof = True
                incoming.write_eof()

    def write(self, data: Any) -> None:
        """IOHandle.write for TLS: encrypt (on the poller thread only), then queue
        the ciphertext exactly as plaintext would be."""
        p = self.poller
        if p is not None and not p._direct():
            self.async_write(data)         # encryption happens on the poller thread
            return
        if self._state or self._shut_wr:
            self.dropped_bytes += len(data)
            return
        if not len(data):
            return
        t = self._sock
        try:
            n = t.encrypt(data)
            if n != len(data):             # memory BIOs take everything, but be sure
                view = memoryview(data).cast("B")
                while n < len(view):
                    n += t.encrypt(view[n:])
        except _ssllib.SSLError as e:
            t.notified = True
            self._write_failed(e)
            return
        IOHandle.write(self, t.outgoing.read())

    def _tls_close_notify(self) -> None:
        """Queue our close_notify (once), ahead of the FIN; on the poller's thread
        only (after the poller stopped there is nobody to flush it)."""
        t = self._sock
        if t is None or t.notified or self.error is not None or self._state or self._shut_wr:
            return
        p = self.poller
        if p is None or not p._mine._is_owned():
            return
        t.notified = True
        try:
            t.sslobj.unwrap()              # writes close_notify; the peer's may come later
        except (_ssllib.SSLError, ValueError):
            pass                           # SSLWantReadError: the usual, nothing to wait for
        if t.outgoing.pending:
            IOHandle.write(self, t.outgoing.read())

    def close(self) -> None:
        """Send close_notify, flush the queue, then close; from any thread."""
        if self._posted_if_elsewhere(self.close):
            return
        self._tls_close_notify()
        IOHandle.close(self)

    def shutdown_write(self) -> None:
        """Send close_notify then FIN once the queue is flushed; reading continues."""
        if self._posted_if_elsewhere(self.shutdown_write):
            return
        self._tls_close_notify()
        IOHandle.shutdown_write(self)

    def _reset_transport(self) -> None:
        self.__class__ = _TLS_PLAIN.get(type(self), type(self))
        self._feeds = type(self)._feeding

    def _abandon(self) -> None:
        """The reactor stops: close_notify too, as close() sends it (one last
        non-blocking flush; a peer that does not read misses it)."""
        self._tls_close_notify()
        if self._wq and self.error is None:
            try:
                self._flush()
            except Exception:
                pass
        IOHandle._abandon(self)

    def _update(self) -> None:
        # Plaintext may be waiting in the BIOs when reading (re)starts -- sent
        # right behind the handshake, or left by a read into a tiny buffer --
        # and no readable event will announce it: post a read.
        had = self._mask
        IOHandle._update(self)
        if self._mask & EV_IN and not had & EV_IN:
            t = self._sock
            if t is not None and (t.incoming.pending or t.buffered()):
                self.poller._post(self._tls_kick)

    def _tls_kick(self) -> None:
        if self._state or not self._mask & EV_IN:
            return
        try:
            if _closes(self, self.on_read()):
                self.close()
        except Exception:
            self.poller._fault(self, "on_read")




def _tls_class(cls: type) -> type:
    """The cached ``TLS<Name>`` subclass of ``cls`` with _TLSMixin under it."""
    tls = _TLS_CLASSES.get(cls)
    if tls is None:
        if issubclass(cls, _TLSMixin):
            return cls
        try:
            bases: tuple = (cls, _TLSMixin)
            meta: Any = type(cls)     # (Any: mypy cannot call a metaclass it only knows as type)
            tls = meta("TLS" + cls.__name__, bases, {"__slots__": (), "__module__": cls.__module__})
        except TypeError:             # no consistent MRO (cls is IOHandle itself): mixin first
            tls = meta("TLS" + cls.__name__, (_TLSMixin, cls),
                            {"__slots__": (), "__module__": cls.__module__})
        tls = _TLS_CLASSES.setdefault(cls, tls)
        _TLS_PLAIN[tls] = cls
    return tls


class _TLSHandshake(IOHandle):
    """Drives one handshake on the connection's poller, then hands the
    transport on: ``done(transport, adopt)`` -- ``adopt(h)`` makes a handler
    take it (the class swap) -- or ``failed(err)``, exactly one of them once."""
    __slots__ = ("_server", "_timeout", "_ticket", "_done", "_failed")
    _server: bool
    _timeout: float
    _ticket: Any
    _done: Optional[Callable[[Any, Callable[[IOHandle], None]], None]]    # None once settled
    _failed: Optional[Callable[[BaseException], None]]

    @classmethod
    def launch(cls, reactor: "Reactor", sock: socket.socket, context: Any, server_side: bool,
               server_hostname: Optional[str], timeout: float, peer: Any,
               done: Callable[[Any, Callable[[IOHandle], None]], None],
               failed: Callable[[BaseException], None]) -> None:
        """Begin the handshake of ``sock``; any thread.  The handshake itself
        runs on poller[fd % N] of ``reactor``, and so do ``done``/``failed``."""
        hs = cls()
        hs._server = server_side
        hs._timeout = timeout
        hs._ticket = _new_ticket()
        hs._done, hs._failed = done, failed
        hs.peer = peer
        hs.reactor = reactor
        hs.fd = sock.fileno()
        try:
            hs._sock = _TLSTransport(sock, context, server_side, server_hostname)
        except Exception as e:             # e.g. ValueError: check_hostname without a name
            hs._sock = sock
            hs._fail(e if isinstance(e, OSError) else _ssllib.SSLError(str(e)))
            return
        p = reactor._poller_for(hs.fd)
        if p._mine._is_owned():
            hs._begin()
            return
        p._post(hs._begin)
        if p._state >= _CLOSING_ALL and hs._take():   # p shut down: nobody will run _begin
            hs._fail(ConnectionAbortedError(errno.ECONNABORTED, "reactor stopped"))

    def _take(self) -> bool:
        """True exactly once: _begin on the poller, or launch() when it shut down."""
        return _take_once(self._ticket)

    def _begin(self) -> None:
        if not self._take():
            return
        p = self.reactor._poller_for(self.fd)
        try:
            p._add(self, self.fd, EV_IN)
        except Exception as e:             # the reactor is stopping
            self._fail(e if isinstance(e, OSError) else ConnectionAbortedError(errno.ECONNABORTED, str(e)))
            return
        if self._timeout != math.inf:
            self.schedule_timer(self._timeout * 1000.0)
        if not self._server:               # the client speaks first: ClientHello
            self._step()

    def on_read(self) -> bool:
        t = self._sock
        view = self.poller._rview
        try:
            n = t.recv_into(view)
        except BlockingIOError:
            return True
        except OSError as e:
            self._fail(e)
            return True
        if n:
            t.incoming.write(view[:n])
        else:
            t.incoming.write_eof()
        self._step()
        if not n and self._done is not None:    # (do_handshake raises at EOF: belt and braces)
            self._fail(ConnectionResetError(errno.ECONNRESET, "EOF during the TLS handshake"))
        return True

    def on_timeout(self, now_ms: int) -> bool:
        self._fail(TimeoutError(errno.ETIMEDOUT, "TLS handshake timed out after %gs" % self._timeout))
        return False

    def _step(self) -> None:
        t = self._sock
        try:
            t.sslobj.do_handshake()
        except _ssllib.SSLWantReadError:
            if t.outgoing.pending:
                IOHandle.write(self, t.outgoing.read())
            return
        except Exception as e:             # SSLError, SSLCertVerificationError, OSError
            if t.outgoing.pending:         # the alert that tells the peer why (best effort)
                IOHandle.write(self, t.outgoing.read())
            self._fail(e if isinstance(e, OSError) else _ssllib.SSLError(str(e)))
            return
        if t.outgoing.pending:
            IOHandle.write(self, t.outgoing.read())
        if self._state != _OPEN:           # writing the last flight failed: peer gone
            return
        self._succeed()

    def _succeed(self) -> None:
        if self.poller._state >= _STOPPING:
            self._fail(ConnectionAbortedError(errno.ECONNABORTED, "reactor stopped"))
            return
        done, self._done, self._failed = self._done, None, None
        # Hand the transport on; ciphertext still queued (the server's session
        # tickets) goes with it, through adopt.
        t = self._detach()
        wq, wq_bytes, self._wq, self._wq_bytes = self._wq, self._wq_bytes, None, 0

        def adopt(h: IOHandle) -> None:
            h.__class__ = _tls_class(type(h))      # TypeError for a layout that cannot swap
            h._feeds = False                        # TLS reads through _TLSMixin.read
            h._wq, h._wq_bytes = wq, wq_bytes
            h.error = None
        assert done is not None
        done(t, adopt)

    def _fail(self, err: BaseException) -> None:
        failed, self._done, self._failed = self._failed, None, None
        if failed is None:                 # already settled: exactly one outcome
            return
        if self._state != _CLOSED:        # (else on_close is running or will run)
            self._close_now()              # on_close (below) releases the socket
        failed(err)

    def on_close(self) -> None:
        # Closed by the poller (reactor stop, shutdown drain, an error): the
        # connection still gets its one outcome.
        self.destroy()
        if self._failed is not None:
            e = self.error if isinstance(self.error, OSError) else None
            self._fail(e or ConnectionAbortedError(errno.ECONNABORTED, "connection closed during the TLS handshake"))


def _check_tls(context: Any, server_side: bool, server_hostname: Optional[str]) -> None:
    """Fail at the call, not per connection: TypeError for something that is not
    an SSLContext, ValueError for one that cannot serve this side (a client
    context on an Acceptor, check_hostname without a server_hostname)."""
    if _ssllib is None:
        raise RuntimeError("this Python has no ssl module")
    if not isinstance(context, _ssllib.SSLContext):
        raise TypeError("ssl must be an ssl.SSLContext, got %r" % (context,))
    wrong = _ssllib.PROTOCOL_TLS_CLIENT if server_side else _ssllib.PROTOCOL_TLS_SERVER
    if context.protocol == wrong:          # (Python 3.9 would only fail at the handshake)
        raise ValueError("ssl context is a %s context; this side needs %s"
                         % (wrong.name, "PROTOCOL_TLS_SERVER" if server_side else "PROTOCOL_TLS_CLIENT"))
    if not server_side and context.check_hostname and not server_hostname:
        raise ValueError("the ssl context checks host names: give server_hostname=")
    try:
        context.wrap_bio(_ssllib.MemoryBIO(), _ssllib.MemoryBIO(), server_side=server_side,
                         server_hostname=server_hostname)
    except _ssllib.SSLError as e:          # "Cannot create a server socket with a PROTOCOL_TLS_CLIENT context"
        raise ValueError("ssl context cannot serve the %s side: %s"
                         % ("server" if server_side else "client", e)) from None


def _tls_server_stage(context: Any, timeout: Any) -> Callable:
    """The accept stage of ``Acceptor(ssl=context)``: a handshake, then the
    handler.  A failed handshake is the peer's problem, not the server's:
    logged at DEBUG, the socket closed, no user code run."""
    timeout = _check_delay("ssl_handshake_timeout", timeout)
    if not timeout > 0:
        raise ValueError("ssl_handshake_timeout must be > 0 seconds, got %r" % (timeout,))
    _check_tls(context, True, None)

    def stage(acceptor: Acceptor, conn: Any, peer: Any, proceed: Callable) -> None:
        def failed(err: BaseException) -> None:
            _log.debug("TLS handshake with %r failed: %s", peer, err)
        _TLSHandshake.launch(acceptor.conn_reactor, conn, context, True, None, timeout, peer,
                             lambda t, adopt: proceed(t, peer, adopt), failed)
    return stage


def _tls_client_stage(context: Any, server_hostname: Optional[str], timeout_ms: Any) -> Callable:
    """The connect stage of ``Connector.connect(ssl=context)``: a handshake, then
    on_open; a failure reaches on_connect_fail."""
    timeout = _check_delay("ssl_handshake_timeout_ms", timeout_ms) / 1000.0
    if not timeout > 0:
        raise ValueError("ssl_handshake_timeout_ms must be > 0 ms, got %r" % (timeout_ms,))
    _check_tls(context, False, server_hostname)

    def stage(h: IOHandle, sock: Any, peer: Any) -> None:
        _TLSHandshake.launch(h.reactor, sock, context, False, server_hostname, timeout, peer,
                             lambda t, adopt: _open_connected(h, t, peer, adopt),
                             lambda err: _connect_failed(h, err))
    return stage


_EXTRAS["tls_server"] = _tls_server_stage
_EXTRAS["tls_client"] = _tls_client_stage


# =============================================================================
# 14. The PROXY protocol: the client's address from a load balancer
# =============================================================================
# HAProxy's v1 text and v2 binary headers.
# Behind a TCP load balancer every connection comes from the balancer; with the
# PROXY protocol the balancer starts each connection with a header naming the
# real client.  Acceptor(proxy_protocol=True) hands each accepted socket to an
# internal _ProxyHeader first (the pattern of the Connector's _Connecting): it
# reads the header, then leaves the poller without closing the socket, builds
# the user's handler with ``peer`` = the client and calls its on_open.  The
# balancer stays available as ``sock_peer`` (getpeername(): no slot added to
# every IOHandle for it).  It never reads a byte past the header: it peeks
# (MSG_PEEK) to find where the header ends and consumes exactly that, so bytes
# that followed the header in the same segment stay in the kernel for the
# user's first read() -- no leftover buffer to hand over, no branch on the hot
# read path.  While the header is incomplete every byte there is header, so it
# is consumed (kept in _buf): the fd then stops being readable and a
# level-triggered poll cannot spin on peeked bytes.  A malformed, oversized or
# missing header, end of stream before it, or no header within
# ``proxy_header_timeout``: the connection is closed with a DEBUG log line, and
# no user code (not even the factory) runs for it.

_PROXY_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
_PROXY_V1_MAX = 107             # the longest v1 line the spec allows, CRLF included
_PROXY_V2_MAX = 16 + 2048       # v2 header + addresses + TLVs accepted (the spec asks for >= 232)


class _ProxyError(ValueError):
    """A PROXY header that cannot be accepted (internal: logged at DEBUG, connection closed)."""


def _proxy_parse(data: bytes) -> Optional[tuple]:
    """Parse the PROXY header at the start of ``data``: None if more bytes are
    needed, else ``(header length, version, client address)``; the address is
    None for "use the socket's own peer" (v2 LOCAL -- the balancer's health
    checks --, UNSPEC, v1 UNKNOWN).  Raises _ProxyError for anything else."""
    n = len(data)
    if data[0] == 0x0D:                                        # v2: binary
        if not _PROXY_V2_SIG.startswith(data[:12]):
            raise _ProxyError("bad PROXY v2 signature")
        if n < 16:
            return None
        ver, cmd, af = data[12] >> 4, data[12] & 0xF, data[13] >> 4
        total = 16 + int.from_bytes(data[14:16], "big")
        if ver != 2 or cmd > 1:
            raise _ProxyError("unsupported PROXY v2 version %d / command %d" % (ver, cmd))
        if total > _PROXY_V2_MAX:
            raise _ProxyError("PROXY v2 header of %d bytes (limit %d)" % (total, _PROXY_V2_MAX))
        if n < total:
            return None
        if cmd == 0 or af == 0:                                # LOCAL, or UNSPEC: the real peer
            return total, 2, None
        body = data[16:total]                                  # addresses, then TLVs (skipped)
        need = {1: 12, 2: 36, 3: 216}.get(af)
        if need is None or len(body) < need:
            raise _ProxyError("PROXY v2 address family %d with %d address bytes" % (af, len(body)))
        if af == 1:
            return total, 2, (socket.inet_ntop(socket.AF_INET, body[:4]), int.from_bytes(body[8:10], "big"))
        if af == 2:
            return total, 2, (socket.inet_ntop(socket.AF_INET6, body[:16]),
                              int.from_bytes(body[32:34], "big"), 0, 0)
        raw = body[:108]                                       # AF_UNIX: as accept() reports it
        return total, 2, (raw.rstrip(b"\0") if raw[:1] == b"\0" else os.fsdecode(raw.split(b"\0", 1)[0]))
    if not b"PROXY ".startswith(data[:6]):                     # v1: one text line
        raise _ProxyError("no PROXY header (starts with %r)" % bytes(data[:16]))
    end = data.find(b"\r\n", 0, _PROXY_V1_MAX)
    if end < 0:
        if n >= _PROXY_V1_MAX:
            raise _ProxyError("PROXY v1 header longer than %d bytes" % _PROXY_V1_MAX)
        return None
    parts = bytes(data[:end]).split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return end + 2, 1, None
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise _ProxyError("malformed PROXY v1 header %r" % bytes(data[:end]))
    family = socket.AF_INET if parts[1] == b"TCP4" else socket.AF_INET6
    try:
        src = socket.inet_ntop(family, socket.inet_pton(family, parts[2].decode("ascii")))
        socket.inet_pton(family, parts[3].decode("ascii"))
        ports = [int(p) for p in parts[4:] if p.isdigit() and len(p) <= 5]
    except (OSError, ValueError):
        ports = []
    if len(ports) != 2 or max(ports) > 65535:
        raise _ProxyError("malformed PROXY v1 header %r" % bytes(data[:end]))
    return end + 2, 1, ((src, ports[0]) if family == socket.AF_INET else (src, ports[0], 0, 0))


class _ProxyHeader(IOHandle):
    """Reads one PROXY header on the acceptor's poller, then hands the socket on."""
    __slots__ = ("_proceed", "_timeout", "_buf")
    _proceed: Callable[[Any, Any], None]    # (socket, client address): the next stage
    _timeout: float
    _buf: bytes

    def on_read(self) -> bool:
        sock, buf = self._sock, self._buf
        try:
            peek = sock.recv(_PROXY_V2_MAX - len(buf), socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError as e:
            return self._reject("read failed (%s)" % e)
        if not peek:
            return self._reject("end of stream before the PROXY header")
        data = buf + peek
        try:
            got = _proxy_parse(data)
        except _ProxyError as e:
            return self._reject(str(e))
        take = len(peek) if got is None else got[0] - len(buf)
        try:
            if len(sock.recv(take)) != take:   # the peeked bytes: cannot come short
                return self._reject("short read")
        except OSError as e:
            return self._reject("read failed (%s)" % e)
        if got is None:
            self._buf = data
            return True
        return self._hand_over(got[1], got[2])

    def on_timeout(self, now_ms: int) -> bool:
        self._reject("no PROXY header within %gs" % self._timeout)
        self.close()
        return False

    def _reject(self, why: str) -> bool:
        _log.debug("%s: %s; connection closed", _safe_repr(self), why)
        return False                            # the loop closes us: on_close = destroy

    def _hand_over(self, version: int, client: Any) -> bool:
        p, fd = self.poller, self.fd
        peer = self.peer if client is None else client
        if p._observer is not None:
            p._observer.say("fd %d: PROXY v%d header: client %r via %r" % (fd, version, peer, self.peer))
        self._proceed(self._detach(), peer)     # the next stage (TLS), or the handler
        return True


def _proxy_stage(timeout: Any) -> Callable:
    """The accept stage of ``Acceptor(proxy_protocol=True)``: read the header
    (within ``timeout`` seconds, > 0; inf: no limit) on the acceptor's poller,
    then go on with the client it names as the peer."""
    if not _check_delay("proxy_header_timeout", timeout) > 0:
        raise ValueError("proxy_header_timeout must be > 0 seconds, got %r" % (timeout,))

    def stage(acceptor: Acceptor, conn: Any, peer: Any, proceed: Callable) -> None:
        ph = _ProxyHeader()
        ph._proceed, ph._timeout, ph._buf = proceed, float(timeout), b""
        ph._sock = conn
        ph.fd = conn.fileno()
        ph.peer = peer
        try:
            acceptor.reactor.add_handler(ph, ph.fd, EV_IN, poller=acceptor.poller.index)
        except Exception:
            _log.exception("%s: cannot watch a new connection", _safe_repr(acceptor))
            ph._close_now()
            return
        if ph._timeout != math.inf:
            ph.schedule_timer(ph._timeout * 1000.0)
    return stage


_EXTRAS["proxy"] = _proxy_stage


# =============================================================================
# 15. ConnectPool: a pool of client connections
# =============================================================================
# The pool keeps at least ``min_idle`` open, idle connections to one address,
# adding ``add_step`` at a time and never more than ``max_live``.  All its
# bookkeeping runs on one poller thread (a periodic timer plus posted work);
# acquire()/release() may be called from any thread and only touch a deque.
# A connection that closes leaves the pool (the watcher hook tells us).
# In-flight connects are a *set* (``_pending``), not a counter: a member can
# leave by "opened", "failed" or -- when its on_open refuses -- "closed"
# alone, and a counter that missed that last case would wedge the refill.
# While connects fail (server down), only the timer retries: acquire() does
# not, so a tight acquire loop cannot turn into a connect storm.

__all__ += ["ConnectPool"]


class ConnectPool:
    """A self-refilling pool of connections made by ``connector`` to ``addr``.

    ``factory()`` builds each handler (an IOHandle; its ``on_open`` must
    register it, as the default does).  ``acquire()`` returns an open idle
    handler or None (and triggers a refill); ``release(h)`` gives it back.
    Maintenance runs every ``keep_interval_ms`` on poller 0 of the connector's
    reactor.  ``close()`` closes every connection and stops maintenance (a
    connect still in flight is closed as soon as it opens).  A host name in
    ``addr`` is looked up on each connect, on a resolver thread (see Connector).
    """

    def __init__(self, connector: Connector, addr: Union[str, tuple], factory: Callable[[], IOHandle],
                 min_idle: int, add_step: int, max_live: int, connect_timeout_ms: float,
                 keep_interval_ms: float) -> None:
        if not isinstance(connector, Connector):
            raise TypeError("connector must be a Connector, got %r" % (connector,))
        if not callable(factory):
            raise TypeError("factory must be callable, got %r" % (factory,))
        _check_int("min_idle", min_idle, 1)
        _check_int("add_step", add_step, 1)
        _check_int("max_live", max_live, 1)
        if min_idle > max_live:
            raise ValueError("min_idle %d is above max_live %d" % (min_idle, max_live))
        _check_delay("connect_timeout_ms", connect_timeout_ms)
        ki = _check_delay("keep_interval_ms", keep_interval_ms)
        if not 0 < ki < math.inf:
            raise ValueError("keep_interval_ms must be > 0 and finite, got %r" % (keep_interval_ms,))
        parse_address(addr, resolve=False)        # fail now on a malformed address
        self.connector = connector
        self.addr = addr
        self.factory = factory
        self.min_idle, self.add_step, self.max_live = min_idle, add_step, max_live
        self.connect_timeout_ms = connect_timeout_ms
        self._idle: collections.deque = collections.deque()
        self._members: set = set()                # every live or connecting handler
        self._pending: set = set()                # members whose connect is in flight
        self._failing = False                     # the last connect failed: timer-only retries
        self._closed = False
        # Guards the three collections above: acquire/release come from any
        # thread, and members report from their own pollers' threads -- also
        # while the reactor shuts down, when poller 0 may be gone already.
        self._lock = _Lock()
        self._poller = connector.reactor.pollers[0]
        self._timer = self._poller._call_at(_monotonic(), ki / 1000.0, self._keep, ())

    def __repr__(self) -> str:
        return "<goev.ConnectPool %s idle=%d live=%d%s>" % (
            self.addr, self.idle, self.live, " closed" if self._closed else "")

    @property
    def idle(self) -> int:
        """Open connections waiting in the pool."""
        return len(self._idle)

    @property
    def live(self) -> int:
        """Open connections owned by the pool (idle or acquired)."""
        return len(self._members) - len(self._pending)

    def acquire(self) -> Optional[IOHandle]:
        """An open idle handler, or None (a refill is then triggered).  Any thread."""
        while True:
            with self._lock:
                h = self._idle.popleft() if self._idle else None
                low = len(self._idle) < self.min_idle
            if h is None:
                break
            if not h.closed:                      # a closed one is dropped (it left _members)
                if low and not self._failing:
                    self._poller._post(self._keep)
                return h
        if not self._closed and not self._failing:
            self._poller._post(self._keep)
        return None

    def release(self, h: IOHandle) -> None:
        """Give ``h`` back; a closed one is dropped (and after ``close()`` it is
        closed).  Raises ValueError for a handler that is not this pool's or is
        already idle.  Any thread."""
        if getattr(h, "_watcher", None) is not self:
            raise ValueError("%s does not belong to %r" % (_safe_repr(h), self))
        with self._lock:
            if not (self._closed or h.closed):
                if h in self._idle:
                    raise ValueError("%s is already released to %r" % (_safe_repr(h), self))
                self._idle.append(h)
                return
        if self._closed:
            h.close()

    def close(self) -> None:
        """Close every pooled connection and stop maintenance.  Any thread."""
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        with self._lock:
            self._idle.clear()
            members = list(self._members)
        for h in members:
            # Only open ones: closing a handler whose connect is in flight would
            # run its on_close before any on_open, and the socket that connects
            # later would be orphaned.  Those are closed on "opened" instead.
            if h.poller is not None:
                h.close()

    def _keep(self) -> bool:
        """Top the pool up (poller 0's thread)."""
        if self._closed:
            return False
        with self._lock:
            live = self.live
            idle = len(self._idle)
            pending = len(self._pending)
        if idle < self.min_idle and not pending:
            n = self.min_idle if live == 0 else self.add_step
            for _ in range(min(n, self.max_live - live)):
                if not self._connect_one():
                    break
        return True

    def _connect_one(self) -> bool:
        h = _new_handler(self.factory, self)     # (logged; must not kill the maintenance timer)
        if h is None:
            return False
        h._watcher = self
        with self._lock:
            self._members.add(h)
            self._pending.add(h)
        try:
            self.connector.connect(self.addr, h, self.connect_timeout_ms)
        except Exception as e:
            self._forget(h)
            self._failing = True
            if isinstance(e, OSError):            # e.g. a host name that stopped resolving
                _log.error("%r: cannot connect: %s", self, e)
            else:
                _log.exception("%r: connect failed", self)
            return False
        return True

    # The watcher hook (section 7): each member tells the pool when it opened,
    # failed to connect or closed, from its own poller's thread; the
    # bookkeeping runs there, under the pool's lock (posting it to poller 0
    # would lose it once that poller has shut down).

    def _handler_opened(self, h: IOHandle) -> None:
        self._failing = False
        with self._lock:
            self._pending.discard(h)
            if not self._closed and not h.closed and h in self._members:  # (a close came first?)
                self._idle.append(h)
                return
        if self._closed:
            h.close()

    def _handler_failed(self, h: IOHandle, err: BaseException) -> None:
        self._failing = True
        self._forget(h)

    def _handler_closed(self, h: IOHandle) -> None:
        self._forget(h)

    def _forget(self, h: IOHandle) -> None:
        with self._lock:
            self._pending.discard(h)
            self._members.discard(h)
            try:
                self._idle.remove(h)
            except ValueError:
                pass


# =============================================================================
# 16. Multi-process serving: serve()
# =============================================================================
# Under the GIL one process runs Python on one core at a time, so a server
# uses every core with processes.  serve() forks N workers; each builds its
# own Reactor *after* the fork (a reactor never crosses a fork: its epoll fd,
# threads and locks would be shared or dead).  The supervisor restarts a
# worker that dies -- with backoff, so a crash loop cannot spin -- and turns
# SIGTERM/SIGINT into a graceful drain of every worker.
#
# Listening sockets belong to the supervisor, one per worker *slot*.  The
# supervisor binds N SO_REUSEPORT listeners on the port before the first fork
# (port 0 resolves once: the others join the port the first got) and never
# accepts; the worker in slot i -- and every later worker in that slot, after
# a crash or a reload -- serves listener i.  So each worker has its own accept
# queue and the kernel spreads connections over the workers (the REUSEPORT
# pattern: no thundering herd), yet no queue is ever closed while the server
# runs.  That matters: when the last holder of a REUSEPORT listener closes it,
# Linux resets the connections waiting in its queue (unless the system-wide
# net.ipv4.tcp_migrate_req=1, Linux 5.14+, moves them), which per-worker
# listeners would do at every crash and every reload.  Here a dead worker's
# connections simply wait in its queue for the replacement, and a retiring
# worker only stops polling a queue its successor already polls.
# ``reuse_port=False`` shares one listener among all workers instead (every
# worker is woken for each connection, one wins the accept); unix sockets
# and the sockets systemd passed (socket activation) are always shared.
#
# Reload (SIGHUP to the supervisor): a new generation of N workers starts, each
# on its slot's listener; once all of them report ready (one 4-byte pid each on a
# pipe), the old workers get SIGQUIT: stop accepting at once, let every open
# connection finish -- closing one now could drop a request already on its
# way -- for at most ``drain_timeout`` seconds, then exit.  The new workers
# run ``setup`` again (re-read a configuration there), but the code is the
# code the supervisor loaded: new code needs a restart (which, with a socket
# held by systemd, refuses nothing either: see "Deploying" in README.md).

_RESTART_BACKOFF_MIN = 0.1   # seconds before restarting a worker that died young ...
_RESTART_BACKOFF_MAX = 5.0   # ... doubling up to this while it keeps dying young
_WORKER_YOUNG = 1.0          # a worker that ran less than this counts as a crash loop
_RETIRE_POLL = 0.05          # a retiring worker checks this often whether its connections are gone
_KILL_GRACE = 5.0            # seconds past drain_timeout before a worker that will not exit is killed
_TICK_BUSY = 0.02            # the supervisor's wait for a signal while a generation starts or retires
_TICK_IDLE = 0.2             # ... and otherwise (it also reads the workers' "ready" pipe then)


def _listen_fds(unset: bool = True) -> list:
    """The listening sockets systemd passed (socket activation, as sd_listen_fds(3)):
    fds 3 .. 3 + LISTEN_FDS - 1, if LISTEN_PID is this process; [] when there are
    none.  The variables are removed from the environment (so that a child does
    not take the fds for its own) and the fds made close-on-exec.  ValueError if
    one of them is not a listening stream socket."""
    env = os.environ
    pid, n = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if unset:
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(k, None)
    if not (pid.isdigit() and n.isdigit()) or int(pid) != os.getpid():
        return []
    socks: list = []
    try:
        for fd in range(3, 3 + int(n)):
            os.set_inheritable(fd, False)
            socks.append(_adopt_listener(fd))
    except BaseException:
        for s in socks:
            s.detach()
        raise
    return socks


def _sock_address(sock: socket.socket) -> Any:
    """What ready() reports: (host, port) for TCP, the path for unix sockets,
    "@name" for an abstract one."""
    a = sock.getsockname()
    if isinstance(a, bytes):
        a = a.decode(errors="replace")
    if isinstance(a, str):
        return "@" + a[1:] if a.startswith("\0") else a
    return tuple(a[:2])


def _listen(reactor: Reactor, addr: Any, factory: Callable[[], IOHandle], reuse_port: bool,
            **kw: Any) -> list:
    """One Acceptor, or one per poller pinned to it (the REUSEPORT pattern)."""
    n = len(reactor.pollers)
    if n == 1:
        return [Acceptor(reactor, addr, factory, reuse_port=reuse_port, **kw)]
    first = Acceptor(reactor, addr, factory, reuse_port=True, poller=0, **kw)
    bound = first.address
    if first._family != socket.AF_UNIX:
        addr = (bound[0], bound[1])           # port 0: the others join the port the first got
    return [first] + [Acceptor(reactor, addr, factory, reuse_port=True, poller=i, **kw)
                      for i in range(1, n)]


def _retire(reactor: Reactor, drain_timeout: float) -> None:
    """SIGQUIT (the old generation of a reload): stop accepting at once, let the
    open connections end by themselves (their peers close them), and stop once
    there are none -- or after ``drain_timeout`` s, with ``shutdown()``'s flush.
    Safe from a signal handler: it only posts."""
    deadline = _monotonic() + drain_timeout

    def close_listeners() -> None:
        p = reactor.current_poller()
        for h in list(p._handlers.values()) if p is not None else ():
            if isinstance(h, Acceptor):
                IOHandle.close(h)

    def check() -> None:                      # on poller 0, every _RETIRE_POLL s
        if any(p._handlers for p in reactor.pollers) and _monotonic() < deadline:
            reactor.call_later(_RETIRE_POLL, check)
        else:
            reactor.shutdown(0.0)
    reactor.post(close_listeners)
    reactor.pollers[0]._post(check)


class _ListenerWatch:
    """The watcher (section 7's hooks) of serve()'s acceptors: a listener that
    closed with an error (accept() said it is unusable) ends the process with
    exit status 1 -- under workers=N the supervisor then starts a new worker."""

    def __init__(self, reactor: Reactor, drain_timeout: float) -> None:
        self.reactor, self.drain_timeout, self.broken = reactor, drain_timeout, False

    def _handler_opened(self, h: IOHandle) -> None:
        pass

    def _handler_failed(self, h: IOHandle, err: BaseException) -> None:
        pass

    def _handler_closed(self, h: IOHandle) -> None:
        if h.error is not None and not self.broken:
            self.broken = True
            _log.error("%s: listener lost (%s); this process stops, exit status 1", _safe_repr(h), h.error)
            self.reactor.shutdown(self.drain_timeout)


def _serve_here(addr: Any, factory: Callable[[], IOHandle], pollers: int, backend: str,
                drain_timeout: float, reuse_port: bool, ready: Optional[Callable], trace: Optional[bool],
                setup: Optional[Callable], kw: dict, socks: Optional[list] = None,
                worker: bool = False, slow_callback_ms: Optional[float] = None) -> int:
    reactor = Reactor(pollers, backend=backend, trace=trace, slow_callback_ms=slow_callback_ms)
    try:
        if socks:        # listening already (systemd's, or the supervisor's): one Acceptor each
            acceptors = [Acceptor.from_socket(reactor, s, factory, **kw) for s in socks]
        else:
            acceptors = _listen(reactor, addr, factory, reuse_port, **kw)
        if setup is not None:
            setup(reactor)
    except BaseException:
        reactor.stop()
        raise
    watch = _ListenerWatch(reactor, drain_timeout)
    for a in acceptors:
        a._watcher = watch

    def hup(*_: Any) -> None:
        _log.warning("SIGHUP ignored: a reload needs supervised workers (serve(workers=N), --workers N)")
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, lambda *_: reactor.shutdown(drain_timeout))
    old[signal.SIGQUIT] = signal.signal(signal.SIGQUIT, lambda *_: _retire(reactor, drain_timeout))
    # In a worker the supervisor handles SIGHUP (a terminal hang-up reaches the
    # whole process group); SIGQUIT/SIGHUP were blocked since the fork, so a
    # retire sent while this worker was starting is delivered now.
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN if worker else hup)
    if worker:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGQUIT, signal.SIGHUP})
    try:
        if ready is not None:
            ready(acceptors[0].address)
        reactor.run()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        reactor.stop()
    return 1 if watch.broken else 0


class _Supervisor:
    """Forks, watches, restarts and reloads the workers of serve(); signal-driven, no threads."""

    def __init__(self, addr: Any, factory: Callable, workers: int, pollers: int, backend: str,
                 drain_timeout: float, trace: Optional[bool], ready: Optional[Callable],
                 setup: Optional[Callable], kw: dict, socks: list, reuse_port: Optional[bool],
                 slow_callback_ms: Optional[float]) -> None:
        self.factory, self.workers, self.pollers, self.backend = factory, workers, pollers, backend
        self.slow_callback_ms = slow_callback_ms
        self.drain_timeout, self.trace, self.ready, self.setup, self.kw = drain_timeout, trace, ready, setup, kw
        self._unix_path = None
        if socks:                                 # systemd's: shared by every slot
            self.slot_socks = [socks] * workers
        else:
            family, sockaddr = parse_address(addr)
            per_slot = reuse_port is not False and family != socket.AF_UNIX
            listen_kw = (kw.get("backlog", 512), kw.get("reuse_addr", True), per_slot, kw.get("rcvbuf", 0))
            first = _bound_listener(family, sockaddr, *listen_kw)
            socks = [first]
            try:
                if per_slot:                      # the others join the port the first got
                    sockaddr = first.getsockname()
                    socks += [_bound_listener(family, sockaddr, *listen_kw) for _ in range(workers - 1)]
            except BaseException:
                for s in socks:
                    s.close()
                raise
            self.slot_socks = [[s] for s in socks] if per_slot else [socks] * workers
            if family == socket.AF_UNIX and not sockaddr.startswith("\0"):
                self._unix_path = sockaddr
        self.addr = _sock_address(self.slot_socks[0][0])
        # Workers write their pid (4 bytes: one atomic pipe write) here once they listen.
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        self._ready_buf = b""
        self._ready: set = set()                  # pids that reported ready
        self._announced = False                   # ready() called (the first generation)
        self.gen = 0                              # the current generation; SIGHUP adds one
        self.children: dict = {}                  # pid -> (slot, start time, generation)
        self._retiring: dict = {}                 # pid -> when to SIGKILL it
        self.backoff = [_RESTART_BACKOFF_MIN] * workers
        self.restart_at: dict = {}                # slot -> monotonic time

    def _spawn(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:                                              # the worker
            code = 1
            try:
                # SIGQUIT (retire) and SIGHUP stay blocked until _serve_here has its handlers.
                signal.pthread_sigmask(signal.SIG_SETMASK,
                                       set(self._oldmask) | {signal.SIGQUIT, signal.SIGHUP})
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                mine = self.slot_socks[slot]
                for other in self.slot_socks:     # other slots' listeners are not ours to poll
                    for s in other:
                        if s not in mine:
                            s.close()
                os.close(self._ready_r)
                me = os.getpid().to_bytes(4, "little")
                code = _serve_here(self.addr, self.factory, self.pollers, self.backend,
                                   self.drain_timeout, True, lambda _: os.write(self._ready_w, me),
                                   self.trace, self.setup, self.kw, mine, worker=True,
                                   slow_callback_ms=self.slow_callback_ms)
            except BaseException:
                _log.critical("worker %d crashed", os.getpid(), exc_info=True)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = (slot, _monotonic(), self.gen)

    def _read_ready(self) -> None:
        try:
            self._ready_buf += os.read(self._ready_r, 4096)
        except BlockingIOError:
            return
        buf = self._ready_buf
        n = len(buf) - len(buf) % 4
        self._ready.update(int.from_bytes(buf[i:i + 4], "little") for i in range(0, n, 4))
        self._ready_buf = buf[n:]

    def _generation_ready(self) -> bool:
        return sum(1 for pid, c in self.children.items() if c[2] == self.gen and pid in self._ready) \
            >= self.workers

    def run(self) -> int:
        sigs = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
        self._oldmask = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        stopping = False
        kill_at = None
        try:
            for slot in range(self.workers):
                self._spawn(slot)
            while self.children or (not stopping and self.restart_at):
                waiting = not self._generation_ready() or any(
                    c[2] < self.gen and pid not in self._retiring for pid, c in self.children.items())
                info = signal.sigtimedwait(sigs, _TICK_BUSY if waiting else _TICK_IDLE)
                self._read_ready()
                if not stopping and self._generation_ready():
                    if not self._announced:
                        self._announced = True
                        if self.ready is not None:
                            self.ready(self.addr)
                    # The new generation listens: the older ones stop accepting and drain.
                    for pid, (_, _, gen) in self.children.items():
                        if gen < self.gen and pid not in self._retiring:
                            os.kill(pid, signal.SIGQUIT)
                            self._retiring[pid] = _monotonic() + self.drain_timeout + _KILL_GRACE
                signo = None if info is None else info.si_signo
                if signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
                    stopping = True
                    kill_at = _monotonic() + self.drain_timeout + _KILL_GRACE
                    self.restart_at.clear()
                    for pid in self.children:
                        os.kill(pid, signal.SIGTERM)
                elif signo == signal.SIGHUP and not stopping:
                    self.gen += 1
                    self.restart_at.clear()           # slots of the old generation: not refilled
                    _log.info("reload: starting worker generation %d", self.gen)
                    for slot in range(self.workers):
                        self._spawn(slot)
                self._reap(stopping)
                now = _monotonic()
                for slot, when in list(self.restart_at.items()):
                    if now >= when:
                        del self.restart_at[slot]
                        self._spawn(slot)
                for pid, when in list(self._retiring.items()):
                    if pid not in self.children:
                        del self._retiring[pid]
                    elif now > when:                  # a connection that never ends
                        os.kill(pid, signal.SIGKILL)
                        del self._retiring[pid]
                if kill_at is not None and now > kill_at:
                    for pid in self.children:
                        os.kill(pid, signal.SIGKILL)
                    kill_at = None
        finally:
            for pid in list(self.children):            # an exception above: leave no orphans
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except OSError:
                    pass
            signal.pthread_sigmask(signal.SIG_SETMASK, self._oldmask)
            for socks in self.slot_socks:
                for s in socks:
                    s.close()
            if self._unix_path:
                try:
                    os.unlink(self._unix_path)
                except OSError:
                    pass
            os.close(self._ready_r)
            os.close(self._ready_w)
        return 0

    def _reap(self, stopping: bool) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid not in self.children:
                continue
            slot, started, gen = self.children.pop(pid)
            self._ready.discard(pid)
            if stopping or gen < self.gen:            # stopping, or retired by a reload
                continue
            lived = _monotonic() - started
            if lived < _WORKER_YOUNG:
                self.backoff[slot] = min(self.backoff[slot] * 2, _RESTART_BACKOFF_MAX)
            else:
                self.backoff[slot] = _RESTART_BACKOFF_MIN
            _log.warning("worker %d exited (status %#x) after %.1fs; restarting in %.1fs",
                         pid, status, lived, self.backoff[slot])
            self.restart_at[slot] = _monotonic() + self.backoff[slot]


__all__ += ["serve"]


def serve(addr: Union[str, tuple, None], factory: Callable[[], IOHandle], *, workers: int = 1,
          pollers: Union[int, str] = 1, backend: str = "auto", drain_timeout: float = 10.0, trace: Optional[bool] = None,
          ready: Optional[Callable[[Any], None]] = None, setup: Optional[Callable[[Reactor], None]] = None,
          slow_callback_ms: Optional[float] = None, **acceptor_kw: Any) -> int:
    """Serve ``factory`` handlers on ``addr`` until SIGTERM/SIGINT; returns the exit code (0).

    ``workers=1`` serves in this process (``pollers`` threads, one REUSEPORT
    acceptor per poller when pollers > 1; ``"auto"`` as for Reactor).  ``workers=N`` forks N supervised
    worker processes, each with its own Reactor and its own SO_REUSEPORT
    listener (held by the supervisor across restarts and reloads, so no
    queued connection is ever reset); a worker that dies is restarted (with
    backoff).
    On SIGTERM/SIGINT every worker stops accepting, lets open connections flush
    their queued writes (``Reactor.shutdown``, at most ``drain_timeout`` s) and
    exits 0.  SIGHUP (workers=N) reloads with zero downtime: a new generation
    of workers starts, then the old one stops accepting and lets its
    connections finish (at most ``drain_timeout`` s); no connection attempt is
    refused meanwhile.  SIGQUIT alone does that retirement (stop accepting,
    finish the connections, exit).
    Socket activation: if systemd passed listening sockets (LISTEN_PID/LISTEN_FDS,
    fds from 3) they are served instead of binding, and ``addr`` is ignored
    (it may be None).
    ``setup(reactor)`` runs in each worker before serving (timers, caches);
    ``ready(address)`` is called once listening (in the supervisor for N > 1).
    ``trace`` and ``slow_callback_ms`` go to each worker's Reactor.
    Other keywords go to Acceptor (``proxy_protocol=True``, ``ssl=``, ...).
    Main thread only (it installs signal handlers).
    """
    _check_int("workers", workers, 1)
    pollers = _check_pollers(pollers)
    _check_delay("drain_timeout", drain_timeout)
    if slow_callback_ms is not None:
        _check_delay("slow_callback_ms", slow_callback_ms)
    _pick_backend(backend)
    if not callable(factory):
        raise TypeError("factory must be callable, got %r" % (factory,))
    socks = _listen_fds()
    if not socks and addr is None:
        raise ValueError("an address is needed, e.g. '127.0.0.1:8080' (accepted: %s); addr may be None "
                         "only under systemd socket activation, which passes the listening sockets "
                         "(LISTEN_FDS: none here)" % _ADDRESS_FORMS)
    reuse_port = acceptor_kw.pop("reuse_port", None)
    if workers == 1:
        return _serve_here(addr, factory, pollers, backend, drain_timeout, bool(reuse_port), ready,
                           trace, setup, acceptor_kw, socks, slow_callback_ms=slow_callback_ms)
    return _Supervisor(addr, factory, workers, pollers, backend, drain_timeout, trace, ready,
                       setup, acceptor_kw, socks, reuse_port, slow_callback_ms).run()


# =============================================================================
# 17. The command line: python -m goev echo|http ADDR, echo --udp ADDR
# =============================================================================
# The CLI is a thin user of the public API and doubles as the worked example
# that closes the tour: an echo handler and a keep-alive HTTP handler with an
# incremental, pipelining parser.  Exit codes: 0 after a clean SIGINT/SIGTERM
# stop, 2 for bad usage (a malformed address, a port in use), with one line on
# stderr and no traceback.

class _EchoHandler(IOHandle):
    """The echo server of the module docstring (the default on_eof closes)."""
    __slots__ = ()

    def on_data(self, data: memoryview) -> None:
        self.write(data)


class _DatagramEcho(DatagramHandle):
    """``echo --udp``: every datagram goes back to its sender."""
    __slots__ = ()

    def on_datagram(self, data: memoryview, addr: Any) -> None:
        self.sendto(data, addr)


def _udp_echo(args: Any, sp: Any) -> int:
    """``python -m goev echo --udp ADDR``: one process, a datagram socket per
    poller sharing the port (SO_REUSEPORT: the kernel spreads senders over
    them; a unix address gets one socket).  Stops on SIGINT/SIGTERM (run())."""
    for opt, bad in (("--workers", args.workers != 1), ("--tls-cert", args.tls_cert),
                     ("--proxy-protocol", args.proxy_protocol)):
        if bad:
            sp.error("%s is for TCP; with --udp use --pollers N for more sockets" % opt)
    if args.addr is None:
        sp.error("ADDR is needed with --udp, e.g. 127.0.0.1:5353")
    try:
        r = Reactor(args.pollers, backend=args.backend, trace=args.trace,
                    slow_callback_ms=args.slow_callback_ms)
    except (TypeError, ValueError) as e:
        print("goev: %s" % e, file=sys.stderr)
        return 2
    with r:
        try:
            first = _DatagramEcho().bind(r, args.addr, reuse_port=args.pollers > 1, poller=0)
            address = first.address
            if first.sock.family != socket.AF_UNIX:
                for i in range(1, args.pollers):
                    _DatagramEcho().bind(r, address[:2], reuse_port=True, poller=i)
        except (TypeError, ValueError) as e:
            print("goev: %s" % e, file=sys.stderr)
            return 2
        except OSError as e:
            print("goev: cannot bind %s: %s" % (args.addr, e), file=sys.stderr)
            return 2
        print("goev %s: echo (UDP) server on %s (%d poller%s, %s)" % (
            __version__, address, args.pollers, "s" * (args.pollers > 1), r.pollers[0]._backend.name),
            file=sys.stderr, flush=True)
        r.run()
    return 0


_HTTP_MAX_HEADER = 8192       # a request head larger than this is refused (400)
_HTTP_MAX_DIGITS = 18         # Content-Length digits (int() refuses above 4300; 10**18 bytes is enough)
_HTTP_MAX_CHUNK_LINE = 4096   # a chunk-size line with its extensions
_HTTP_TIMEOUTS = (10.0, 60.0)  # (head, idle) seconds: see _HttpHandler.on_timeout; None disables one
_HTTP_BODY = b"Hello, World!"
_HTTP_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"))
_HTTP_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _http_error(status: bytes) -> bytes:
    """A complete error response; every one closes the connection, and says so."""
    reason = status.split(b" ", 1)[1]
    return (b"HTTP/1.1 " + status + b"\r\nServer: goev\r\nContent-Length: " + str(len(reason)).encode()
            + b"\r\nConnection: close\r\n\r\n" + reason)


_HTTP_400 = _http_error(b"400 Bad Request")
_HTTP_408 = _http_error(b"408 Request Timeout")
_HTTP_501 = _http_error(b"501 Not Implemented")
_HTTP_505 = _http_error(b"505 HTTP Version Not Supported")
_HTTP_BAD = (_HTTP_400, None, False, 0, False)              # _http_request's error results
_HTTP_NOT_IMPLEMENTED = (_HTTP_501, None, False, 0, False)
_HTTP_BAD_VERSION = (_HTTP_505, None, False, 0, False)

# RFC 9110 §5.6.2 token; field-value bytes are VCHAR, obs-text, SP and HTAB only
# (so no NUL, no bare CR or LF, no other control byte).  A fullmatch of _HTTP_HEAD
# (request line, then "\r\nname: value" lines) also refuses a line without a
# colon, whitespace before the colon (RFC 9112 §5.1) and obs-fold (§5.2).
_HTTP_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_HTTP_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
_HTTP_HEAD = re.compile(b"(" + _HTTP_TCHAR + rb"+) [\x21-\x7e\x80-\xff]+ HTTP/([0-9])\.([0-9])"
                        rb"((?:\r\n" + _HTTP_TCHAR + rb"+:" + _HTTP_VALUE + rb")*)")
_HTTP_NEVER = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")   # in no head: refused at once
_HTTP_FIELD_LINE = re.compile(_HTTP_TCHAR + rb"+:" + _HTTP_VALUE)
# The fields that decide framing and persistence, in a validated, lowercased block.
_HTTP_WANTED = re.compile(rb"\r\n(content-length|transfer-encoding|connection|host|expect):[ \t]*([^\r]*)")
_HTTP_HOST = re.compile(rb"[a-z0-9\-._~!$&'()*+,;=%:\[\]]*")      # uri-host [":" port], lowercased
# chunk-size [chunk-ext] (RFC 9112 §7.1.1): at most 16 hex digits, extensions skipped.
_HTTP_CHUNK_SIZE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*" + _HTTP_TCHAR + rb"+(?:[ \t]*=[ \t]*(?:" + _HTTP_TCHAR
    + rb'+|"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"))?)*')


def _http_date() -> bytes:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()).encode()


def _http_response(date: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nServer: goev\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
            b"Date: " + date + b"\r\n\r\n" + _HTTP_BODY)


def _http_variant(resp: bytes, head: bool, connection: bytes) -> bytes:
    """The canned 200 with a Connection field added and/or without its body (HEAD:
    the same fields, Content-Length 13 included, RFC 9110 §9.3.2)."""
    cut = len(resp) - len(_HTTP_BODY) - 2          # just after the Date field's CRLF
    return resp[:cut] + connection + (b"\r\n" if head else b"\r\n" + _HTTP_BODY)


def _http_setup(reactor: Reactor, header_timeout: Optional[float] = _HTTP_TIMEOUTS[0],
                idle_timeout: Optional[float] = _HTTP_TIMEOUTS[1]) -> None:
    """Keep the Date header (and the whole canned response) in every poller's
    cache, refreshed once a second by a timer on poller 0 (Go: PollSyncCache);
    put the timeouts (seconds; 0 or None: none) there for the handlers."""
    reactor.init_cache("http_response", _http_response(_http_date()))
    reactor.init_cache("http_timeouts", (header_timeout or None, idle_timeout or None))

    def refresh() -> None:
        reactor.sync_cache("http_response", _http_response(_http_date()))
        reactor.call_later(1.0 - time.time() % 1.0 + 0.001, refresh)
    reactor.call_later(1.0 - time.time() % 1.0 + 0.001, refresh)


def _http_request(head: bytes, resp: bytes) -> tuple:
    """Parse one request head (without its final CRLF CRLF).  Returns (error, answer,
    keep, body, expect): ``error`` a complete error response or None; else
    ``answer`` the 200 to send, ``keep`` whether the connection stays open after
    it, ``body`` the Content-Length or -1 for a chunked body, ``expect`` whether
    the client waits for a 100 Continue before sending that body."""
    m = _HTTP_HEAD.fullmatch(head)
    if m is None:
        return _HTTP_BAD
    method, major, minor, fields = m.groups()
    if major != b"1":
        return _HTTP_BAD_VERSION
    http11 = minor != b"0"                         # HTTP/1.x, x >= 1: as 1.1 (RFC 9110 §6.2)
    tokens: Any                                    # Connection's values, then a set of tokens
    lengths, codings, tokens, hosts, expect = [], [], [], 0, False
    if fields:
        for name, value in _HTTP_WANTED.findall(fields.lower()):
            if name == b"host":
                hosts += 1
                if _HTTP_HOST.fullmatch(value.rstrip()) is None:
                    return _HTTP_BAD
            elif name == b"connection":
                tokens += value.split(b",")
            elif name == b"content-length":
                lengths += value.split(b",")
            elif name == b"transfer-encoding":
                codings += value.split(b",")
            else:
                expect = value.strip() == b"100-continue"
    if hosts != 1 and (hosts or http11):           # RFC 9112 §3.2
        return _HTTP_BAD
    body = 0
    if codings:                                    # RFC 9112 §6.1, §6.3
        if lengths or not http11:
            return _HTTP_BAD
        codings = [c for c in (c.strip() for c in codings) if c]
        if any(c != b"chunked" for c in codings):
            return _HTTP_NOT_IMPLEMENTED
        if len(codings) != 1:                      # none, or chunked twice
            return _HTTP_BAD
        body = -1
    elif lengths:                                  # one value, maybe repeated (RFC 9112 §6.3)
        values = {v.strip() for v in lengths}
        v = values.pop()
        if values or not v.isdigit() or len(v) > _HTTP_MAX_DIGITS:
            return _HTTP_BAD
        body = int(v)
    if method not in _HTTP_METHODS:
        return _HTTP_NOT_IMPLEMENTED
    if tokens:
        tokens = {t.strip() for t in tokens}
    if b"close" in tokens:
        keep, connection = False, b"Connection: close\r\n"
    elif http11:
        keep, connection = True, b""
    elif b"keep-alive" in tokens:                  # HTTP/1.0 keep-alive: echoed
        keep, connection = True, b"Connection: keep-alive\r\n"
    else:
        keep, connection = False, b"Connection: close\r\n"
    if connection or method == b"HEAD":
        resp = _http_variant(resp, method == b"HEAD", connection)
    return None, resp, keep, body, expect and http11 and body != 0


class _HttpHandler(IOHandle):
    """Keep-alive "Hello, World!" with an incremental parser: requests may be split
    across reads or pipelined many per read (answered in order, in one write);
    Content-Length and chunked bodies are read and dropped (the answer follows the
    body); ``Connection: close`` and HTTP/1.0 close after the answer; malformed
    input or an oversized head gets an error and a close.  A head not complete
    within the head timeout, and a connection idle for the idle timeout, are
    closed (see on_timeout)."""
    __slots__ = ("_buf", "_skip", "_chunk", "_pend", "_t", "_h")
    _buf: Optional[bytes]
    _skip: int
    _chunk: int
    _pend: Any                           # None or (answer, keep)
    _t: float
    _h: float
    _known = b""                         # see the fast path in on_read (b"": none learned yet)

    def __new__(cls, *a: Any, **kw: Any) -> "_HttpHandler":
        self: Any = IOHandle.__new__(cls)    # (typed IOHandle; Any: the slots below are ours)
        # Unparsed bytes carried to the next read.  None exactly when the connection
        # is between requests with nothing pending (the fast path's condition); b""
        # inside a body or before the first request.
        self._buf = b""
        self._skip = 0                   # body (or chunk-data) bytes still to drop
        self._chunk = 0                  # chunked body: 1 size line, 2 CRLF after data, 3 trailers
        self._pend = None                # (answer, keep) held until the request's body is in
        self._t = 0.0                    # monotonic time of the last read (or of on_open); 0.0:
        #                                  a read since the last timer check (the fast path)
        self._h = 0.0                    # ... at which the head being received began; 0: none
        return self

    def on_open(self) -> bool:
        # The first timer is set before registering: on_open runs on the
        # acceptor's thread, and once registered the handler's own poller may
        # already be running on_read (schedule_timer is for the poller's thread).
        # _call_at is thread-safe, and the placement is add_handler's.
        r = self.reactor
        p = r.pollers[self.fd % len(r.pollers)]
        head, idle = p.cache.get("http_timeouts", _HTTP_TIMEOUTS)
        self._t = self._h = now = _monotonic()
        if head or idle:
            self._timer = p._call_at(now + (head or idle), 0.0, self._fire_timer, ())
        r.add_handler(self, self.fd, EV_IN)
        return True

    def on_timeout(self, now_ms: int) -> bool:
        """One timer per connection, set for the earliest deadline that can apply;
        when it fires early (the connection moved on) it is set again.  While a
        head is being received the deadline is its start + the head timeout (on a
        new connection, from on_open); otherwise, between requests or inside a
        body, the last read + the idle timeout.  A read through the parser costs
        one clock reading and no timer operation, unless a head starts or ends
        (see _arm: the timer moves only if it is set for later than the new
        deadline).  The fast path does not even read the clock: it sets ``_t``
        to 0.0, "active since the last check", and the check counts from its
        own time.  A connection closing with answers still queued (its peer
        does not read them) gets the same time again to take them, then is
        aborted."""
        head, idle = self.poller.cache.get("http_timeouts", _HTTP_TIMEOUTS)
        now = _monotonic()
        if self._state:                        # closing, answers still queued
            limit = idle or head
            if not self._t:
                self._t = now
            if now >= self._t + limit:
                self.abort()
            else:
                self.schedule_timer((self._t + limit - now) * 1000.0)
            return False
        if self._h and head:
            deadline = self._h + head
        elif not idle:
            deadline = math.inf
        elif not self._t:                      # the fast path answered since the last check:
            self._t = now                      # count the idle time from now, and look again
            self.schedule_timer(idle * 250.0)  # in a quarter of the timeout (a close comes
            return False                       # at most idle * 1.25 after the last read)
        else:
            deadline = self._t + idle
        if now >= deadline:
            if self._wq_bytes:                 # it does not even read its answers
                self.abort()
                return False
            if self._h and self._buf:          # a part of a head came: say why
                self.write(_HTTP_408)
            self.close()
            if self._state == _CLOSING:        # the 408 is queued: bound its flush too
                self._t = now
                self.schedule_timer((idle or head) * 1000.0)
            return False
        if deadline == math.inf:
            self._timer = None
        else:
            self.schedule_timer((deadline - now) * 1000.0)
        return False

    def _arm(self, head: bool, now: float) -> None:
        """A head (``head``) or an idle time (not ``head``) began at ``now``: make
        the timer fire by its deadline if it is set for later (or not set)."""
        timeout = self.poller.cache.get("http_timeouts", _HTTP_TIMEOUTS)[0 if head else 1]
        if timeout:
            t = self._timer
            if t is None or t.cancelled or t.when > now + timeout:
                self.schedule_timer(timeout * 1000.0)

    def on_read(self) -> bool:
        view = self.read()
        if view is None:
            return True
        if not view:
            return False
        buf = self._buf
        if buf is None:
            data = bytes(view)
            # Fast path: clients repeat the same request bytes, and the same bytes
            # parse the same way.  ``_known`` is the last head the full parser below
            # accepted as one plain keep-alive GET without a body; a read that is
            # that head, or k copies of it (pipelining), is answered with one
            # comparison.  Anything else goes through the parser.
            known = _HttpHandler._known
            if data == known:
                self._t = 0.0                  # "active": see on_timeout (no clock read here)
                self.write(self.poller.cache["http_response"])
                return True
            if known and len(data) % len(known) == 0 and data == known * (len(data) // len(known)):
                self._t = 0.0
                self.write(self.poller.cache["http_response"] * (len(data) // len(known)))
                return True
        else:
            data = buf + view if buf else bytes(view)
        return self._parse(data, bool(buf))

    def _body_done(self, outs: list) -> bool:
        """A request's body has been read: its held answer joins ``outs``;
        returns whether the connection stays open after it."""
        answer, keep = self._pend
        self._pend = None
        outs.append(answer)
        return keep

    def _parse(self, data: bytes, carried: bool) -> bool:
        """The full parser: ``data`` is every unparsed byte, ``carried`` whether some
        came from an earlier read.  Returns False to close (after the answers)."""
        now = self._t = _monotonic()
        resp = self.poller.cache["http_response"]
        n = len(data)
        pos = 0
        outs: list = []
        keep = True
        err = None
        heads = 0                            # heads completed in this read
        learn = 0                            # end of a leading plain GET: the fast path's
        fresh = not (carried or self._skip or self._chunk or self._pend)
        while pos < n:
            skip = self._skip
            if skip:                         # body bytes (Content-Length, chunk data)
                if n - pos < skip:
                    self._skip = skip - (n - pos)
                    pos = n
                    break
                pos += skip
                self._skip = 0
                if self._chunk:              # now the CRLF after the chunk data
                    continue
                keep = self._body_done(outs)
                if not keep:
                    break
                continue
            chunk = self._chunk
            if chunk == 2:                   # the CRLF after chunk data
                if n - pos < 2:
                    if data[pos] != 13:
                        err = _HTTP_400
                    break                    # (a CR alone: wait for its LF)
                if data[pos] != 13 or data[pos + 1] != 10:
                    err = _HTTP_400
                    break
                pos += 2
                self._chunk = 1
                continue
            if chunk:
                e = data.find(b"\r\n", pos)
                if e < 0:
                    if n - pos > (_HTTP_MAX_CHUNK_LINE if chunk == 1 else _HTTP_MAX_HEADER):
                        err = _HTTP_400
                    break
                if chunk == 1:               # chunk-size [extensions]
                    m = _HTTP_CHUNK_SIZE.fullmatch(data, pos, e)
                    if m is None:
                        err = _HTTP_400
                        break
                    size = int(m.group(1), 16)
                    pos = e + 2
                    if size:
                        self._skip = size
                        self._chunk = 2
                    else:
                        self._chunk = 3      # the last chunk: trailer fields follow
                    continue
                if e > pos:                  # a trailer field: checked, dropped
                    if e - pos > _HTTP_MAX_HEADER or _HTTP_FIELD_LINE.fullmatch(data, pos, e) is None:
                        err = _HTTP_400
                        break
                    pos = e + 2
                    continue
                pos += 2                     # the empty line: the body is complete
                self._chunk = 0
                keep = self._body_done(outs)
                if not keep:
                    break
                continue
            # A request head.  One empty line before it is tolerated (RFC 9112
            # §2.2: some clients send a CRLF after a POST body).
            if data.startswith(b"\r\n", pos):
                pos += 2
                if pos == n:
                    break
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:                      # an incomplete head: wait for more, unless
                if n - pos > _HTTP_MAX_HEADER + 3 or _HTTP_NEVER.search(data, pos):   # it cannot
                    err = _HTTP_400          # become one (binary data, a TLS hello ...)
                break
            if end - pos > _HTTP_MAX_HEADER:
                err = _HTTP_400
                break
            err, answer, keep, body, expect = _http_request(data[pos:end], resp)
            if err is not None:
                break
            if not pos and fresh and keep and not body and answer is resp and data[:4] == b"GET ":
                learn = end + 4              # a plain keep-alive GET starts the read
            heads += 1
            pos = end + 4
            if body:
                if expect:
                    outs.append(_HTTP_CONTINUE)
                self._pend = (answer, keep)
                if body > 0:
                    self._skip = body
                else:
                    self._chunk = 1
                keep = True
                continue
            outs.append(answer)
            if not keep:
                break
        if outs:                             # every answer of this read in one write
            self.write(outs[0] if len(outs) == 1 else b"".join(outs))
        if err is not None:
            self.write(err)
            return False
        if not keep:
            return False
        if learn and learn <= 2048:
            _HttpHandler._known = data[:learn]   # a plain keep-alive GET: remember its bytes
        if pos < n:                          # a part of a head, chunk line or CRLF
            self._buf = data[pos:]
            if not (self._skip or self._chunk or self._pend):   # a head (re)started
                if not (self._h and not heads):
                    self._h = now
                    self._arm(True, now)
                return True
        elif self._skip or self._chunk or self._pend:
            self._buf = b""                  # inside a body
        else:
            self._buf = None                 # between requests: the fast path may answer
        if self._h:                          # the head timeout is over: now the idle one
            self._h = 0.0
            self._arm(False, now)
        return True


def _tls_files_problem(cert: str, key: Optional[str]) -> Optional[str]:
    """What is wrong with the --tls-cert/--tls-key files, in words that say
    what to do, or None if they look usable (ssl then has the last word)."""
    for opt, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as e:
            return "cannot read the %s file %s: %s" % (opt, path, e.strerror or e)
        if opt == "--tls-cert" and b"-----BEGIN CERTIFICATE-----" not in text:
            return "no PEM certificate (-----BEGIN CERTIFICATE-----) in %s" % path
        if (opt == "--tls-key" or key is None) and not re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", text):
            if opt == "--tls-key":
                return "no PEM private key (-----BEGIN ... PRIVATE KEY-----) in %s" % path
            return "no private key in %s; pass --tls-key KEY (the key's PEM file)" % path
    return None


def _pollers_arg(text: str) -> Any:
    """--pollers: a count, or "auto" (see _check_pollers)."""
    return text if text == "auto" else int(text)


def _main(argv: Optional[list] = None) -> int:           # pragma: no cover - run as a process
    import argparse
    parser = argparse.ArgumentParser(prog="python -m goev", description="goev reactor servers")
    parser.add_argument("--version", action="version", version="goev %s" % __version__)
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True
    subs = {}
    for name, helptext in (("echo", "an echo server (TCP, or UDP with --udp)"),
                           ("http", 'a keep-alive HTTP/1.1 "Hello, World!" server (pipelining)')):
        sp = subs[name] = sub.add_parser(name, help=helptext, description="Run %s on ADDR." % helptext)
        sp.add_argument("addr", metavar="ADDR", nargs="?",
                        help='":8080", "127.0.0.1:8080", "[::1]:8080", "unix:/path"; omitted (or '
                             'ignored) when systemd passes the listening socket (socket activation)')
        sp.add_argument("--pollers", type=_pollers_arg, default=1, metavar="N|auto",
                        help="poller threads per process (default 1; auto: one per core when the "
                             "GIL is off, else 1)")
        sp.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (default 1)")
        sp.add_argument("--backend", default="auto", help="auto (default), epoll or selectors")
        sp.add_argument("--trace", action="store_true", default=None,
                        help="print every step of the loop to stderr (teaching)")
        sp.add_argument("--slow-callback-ms", type=float, metavar="N",
                        help="log a WARNING for any callback that holds its poller over N ms")
        sp.add_argument("--tls-cert", metavar="CERT", help="serve TLS with this PEM certificate (chain)")
        sp.add_argument("--tls-key", metavar="KEY", help="its PEM private key (default: in CERT)")
        sp.add_argument("--proxy-protocol", action="store_true",
                        help="expect a PROXY protocol v1/v2 header (HAProxy send-proxy) on every connection")
        sp.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        type=str.upper, metavar="LEVEL",
                        help='the "goev" logger\'s level: DEBUG (also each rejected PROXY header and failed '
                             'TLS handshake), INFO (also reloads), WARNING (default), ERROR')
        if name == "echo":
            sp.add_argument("--udp", action="store_true",
                            help="echo datagrams (UDP, or a unix datagram socket) instead of a stream; "
                                 "--pollers N binds N sockets to the port (SO_REUSEPORT)")
        if name == "http":
            sp.add_argument("--header-timeout", type=float, default=_HTTP_TIMEOUTS[0], metavar="SECONDS",
                            help="close a connection whose request head is not complete within this "
                                 "(default %g; 0: no limit)" % _HTTP_TIMEOUTS[0])
            sp.add_argument("--idle-timeout", type=float, default=_HTTP_TIMEOUTS[1], metavar="SECONDS",
                            help="close a keep-alive connection idle this long (default %g; 0: no limit)"
                                 % _HTTP_TIMEOUTS[1])
        sp.epilog = ("SIGTERM/SIGINT: drain and stop.  With --workers N, SIGHUP reloads with zero "
                     "downtime (a new generation of workers, then the old one drains).")
    # Unknown options are reported by the subcommand's parser, with its usage
    # (argparse reports them from the top-level parser otherwise).
    args, extra = parser.parse_known_args(argv)
    sp = subs[args.cmd]
    if extra:
        sp.error("unrecognized arguments: %s" % " ".join(extra))
    if args.addr is None and not getattr(args, "udp", False) and os.environ.get("LISTEN_PID", "") != str(os.getpid()):
        sp.error("ADDR is needed, e.g. 127.0.0.1:8080 (this machine) or :8080 (every IPv4 interface); "
                 "it may be left out only under systemd socket activation (LISTEN_FDS)")
    log = logging.getLogger("goev")
    log.setLevel(args.log_level)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()      # stderr; the pid tells workers apart
        handler.setFormatter(logging.Formatter("goev[%(process)d] %(levelname)s: %(message)s"))
        log.addHandler(handler)
    if args.pollers == "auto":
        args.pollers = _check_pollers("auto")      # a count from here on (bounds: serve, Reactor)
    if getattr(args, "udp", False):
        return _udp_echo(args, sp)
    factory = _EchoHandler if args.cmd == "echo" else _HttpHandler
    setup: Optional[Callable[[Reactor], None]] = None
    if args.cmd == "http":
        for opt in ("header_timeout", "idle_timeout"):
            value = getattr(args, opt)
            if not 0 <= value < math.inf:            # (NaN fails too)
                sp.error("--%s must be a number of seconds >= 0, got %r" % (opt.replace("_", "-"), value))

        def http_setup(reactor: Reactor) -> None:
            _http_setup(reactor, args.header_timeout, args.idle_timeout)
        setup = http_setup
    kw: dict[str, Any] = {}
    if args.tls_key and not args.tls_cert:
        sp.error("--tls-key needs --tls-cert")
    if args.tls_cert:
        if _ssllib is None:
            sp.error("this Python has no ssl module")
        ctx = _ssllib.SSLContext(_ssllib.PROTOCOL_TLS_SERVER)
        problem = _tls_files_problem(args.tls_cert, args.tls_key)
        if problem is None:
            try:
                ctx.load_cert_chain(args.tls_cert, args.tls_key)
            except (OSError, ValueError) as e:     # ssl.SSLError is an OSError
                problem = "cannot load the TLS certificate %s%s: %s" % (
                    args.tls_cert, " with the key %s" % args.tls_key if args.tls_key else "", e)
        if problem is not None:
            print("goev: %s" % problem, file=sys.stderr)
            return 2
        kw["ssl"] = ctx

    def ready(address: Any) -> None:
        print("goev %s: %s%s server on %s (%d worker%s x %d poller%s, %s)" % (
            __version__, args.cmd, " (TLS)" if "ssl" in kw else "", address, args.workers, "s" * (args.workers > 1),
            args.pollers, "s" * (args.pollers > 1), _pick_backend(args.backend).name), file=sys.stderr, flush=True)
    if args.proxy_protocol:
        kw["proxy_protocol"] = True
    try:
        return serve(args.addr, factory, workers=args.workers, pollers=args.pollers, backend=args.backend,
                     trace=args.trace, ready=ready, setup=setup, slow_callback_ms=args.slow_callback_ms, **kw)
    except (TypeError, ValueError) as e:
        print("goev: %s" % e, file=sys.stderr)
    except OSError as e:
        print("goev: cannot listen on %s: %s" % (args.addr, e), file=sys.stderr)
    return 2


if __name__ == "__main__":                                  # pragma: no cover
    sys.exit(_main())
