# =============================================================================
# Reliability: the fault and edge cases trusted event loops test
# (reference/style-reliability.md, Part B2, cases 1-60), plus the 10 000
# connection scale test.
# =============================================================================
# Every test here runs on both backends; each docstring starts with the
# catalogue numbers it covers.  Coverage of the whole catalogue, in one place
# (core: = tests_wip/test_core.py, timers:, threads:, connector:, serve: alike):
#
#  #  | covered by
# ----+------------------------------------------------------------------------
#  1  | test_unregister_after_fd_close_and_dup2_reuse
#  2  | test_unregister_after_fd_close_and_dup2_reuse
#  3  | test_event_for_handler_closed_earlier_in_batch_is_dropped
#  4  | test_fd_closed_behind_the_loops_back_no_busy_loop
#  5  | test_stale_close_of_a_finished_handler_spares_the_new_owner
#  6  | test_register_regular_file
#  7  | test_empty_reactor_runs_and_stops
#  8  | test_fds_above_fd_setsize; test_10k_connections (slow)
#  9  | test_read_only_handler_never_sees_write
# 10  | test_spurious_readiness_and_idempotent_removal
# 11  | test_event_for_handler_closed_earlier_in_batch_is_dropped
# 12  | test_spurious_readiness_and_idempotent_removal; test_add_close_churn_same_fd
# 13  | n/a: goev registers int fds and never calls fileno(); the closed-socket
#     |      case is test_fd_closed_behind_the_loops_back_no_busy_loop (#4)
# 14  | n/a as written: goev rejects a negative delay with ValueError naming it
#     |      (timers: test_bad_delays_name_the_value); ordering: timers: test_order_and_fifo_ties
# 15  | timers: test_never_early
# 16  | timers: test_cancel_releases_callback_and_args, test_huge_delays_never_fire_nor_wake
# 17  | timers: test_churn_does_not_grow_the_heap, test_cross_thread_cancel_bookkeeping
# 18  | timers: test_reschedule_and_cancel_inside_callbacks
# 19  | timers: test_huge_delays_never_fire_nor_wake
# 20  | timers: test_cancel_releases_callback_and_args
# 21  | threads: test_lost_wakeup_8_threads_x_10k, test_write_async_write_post_to_order_from_thread
# 22  | test_post_from_poller_inside_timer_wakes_next_pass
# 23  | test_posts_interleaved_with_timer_churn_exact_count
# 24  | threads: test_lost_wakeup_8_threads_x_10k (FIFO), test_post_flood_does_not_starve_io
# 25  | test_async_writes_racing_handler_close_account_every_byte;
#     | threads: test_posts_racing_stop, test_after_stop_posts_dropped_and_counted
# 26  | test_exception_in_posted_callback_is_logged; timers: test_exception_in_callback_is_logged_and_others_run
# 27  | test_broken_repr_in_error_path_is_contained (goev has no user exception handler:
#     |      the error reporter's own hazard is the handler's __repr__)
# 28  | test_keyboard_interrupt_from_callbacks_reactor_reusable; timers: test_system_exit_in_a_timer_loses_no_timer
# 29  | test_keyboard_interrupt_from_callbacks_reactor_reusable (no event redelivered);
#     | "stop() before run()": core: test_stop_before_start (goev: stop() is final)
# 30  | test_after_stop_apis_refuse_or_drop
# 31  | test_internal_fds_counted_and_released
# 32  | test_after_stop_apis_refuse_or_drop (start twice); core: test_stop_with_live_connections;
#     | test_callbacks_raising_during_stop
# 33  | test_accept_batches_a_full_backlog
# 34  | core: test_emfile_pauses_accepting_and_recovers
# 35  | test_eaddrinuse_and_reuse_port
# 36  | core: test_acceptor_close_stops_listening
# 37  | test_listener_kept_alive_without_user_reference
# 38  | connector: test_connect_refused
# 39  | test_connect_refused_then_same_handler_connects
# 40  | connector: test_connect_timeout (bind failure: n/a, Connector has no bind option)
# 41  | test_add_handler_with_closed_fd
# 42  | test_abort_variants_leave_reactor_clean (abort in on_open);
#     | core: test_on_open_refusing_closes_once; connector: test_connect_on_open_false_or_raising
# 43  | core: test_peer_half_close_server_keeps_writing
# 44  | test_double_half_close
# 45  | core: test_bytes_before_fin_or_rst_are_delivered
# 46  | test_close_while_reading_paused_is_not_lost
# 47  | test_peer_reset_mid_write_is_on_close_not_error (RST on recv, no error log)
# 48  | n/a as written (the read buffer is goev's own, no get_buffer hook);
#     | exception in on_read: core: test_exception_in_on_read_closes_only_that_connection
# 49  | test_server_closes_mid_read_100_clients
# 50  | core: test_echo_random_chunks_tiny_buffers; test_random_chunks_both_ways_tiny_sndbuf
# 51  | test_write_after_send_error_dropped_and_counted; core: test_write_after_close_is_dropped
# 52  | test_peer_reset_mid_write_is_on_close_not_error; test_close_while_reading_paused_is_not_lost
# 53  | core: test_shutdown_write_flushes_then_fin_and_keeps_reading; test_double_half_close (twice)
# 54  | test_water_marks_validated_and_drained_writes_elsewhere
# 55  | core: test_slow_reader_is_paced_and_paused, test_echo_backpressure_bounds_memory
# 56  | test_60mib_single_write; test_10000_writes_of_100kib; test_random_chunks_both_ways_tiny_sndbuf
# 57  | test_abort_variants_leave_reactor_clean; test_rst_during_connect_loop_survives
# 58  | test_closed_handler_releases_fd_and_references
# 59  | core: test_ipv6_echo_and_address, test_unix_socket_path, test_unix_socket_abstract;
#     | connector: test_connect_ipv6, test_connect_unix_*; test_dual_stack_listener
# 60  | test_setitimer_storm_no_eintr; test_wakeup_fd_left_alone;
#     | test_fork_child_builds_its_own_reactor
# -----------------------------------------------------------------------------

from test_goev import *                                   # noqa: F401,F403
from test_goev import (backend, npollers, hygiene, make_reactor, goev_log,   # noqa: F401
                       wait_until, recv_exact, recv_all, Echo, WAIT, echo_server, spawn_py,
                       stop_child, free_port, HERE)

for _n in [n for n in list(globals()) if n.startswith("test_")]:
    del globals()[_n]

import errno
import gc
import hashlib
import logging
import os
import queue
import random
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref

import pytest

import goev


# -- helpers ------------------------------------------------------------------

def _on_poller(poller, fn, *args):
    """Run fn(*args) on ``poller``'s thread and return its result (or raise)."""
    box = queue.Queue()

    def run():
        try:
            box.put((True, fn(*args)))
        except BaseException as e:            # handed to the test thread
            box.put((False, e))
    poller._post(run)
    ok, val = box.get(timeout=WAIT)
    if not ok:
        raise val
    return val


def _close_on(poller, h, how="close"):
    """Close ``h`` on its poller and return once its on_close ran (end of pass)."""
    _on_poller(poller, getattr(h, how))
    _on_poller(poller, lambda: None)          # runs in a later pass: closes are finished


def _park(poller):
    """Block ``poller``'s thread until the returned Event is set: I/O that happens
    meanwhile is reported to it in one batch when it polls again."""
    started, release = threading.Event(), threading.Event()

    def block():
        started.set()
        release.wait(WAIT)
    poller._post(block)
    assert started.wait(WAIT)
    return release


def _thread_cpu(thread):
    """CPU seconds (user + system) used so far by a thread of this process."""
    with open("/proc/self/task/%d/stat" % thread.native_id) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle_cpu(poller, seconds=0.6):
    """CPU the poller thread burns over ``seconds`` while nothing should happen."""
    t = poller._thread
    c0 = _thread_cpu(t)
    time.sleep(seconds)                       # measuring an interval, not waiting for an event
    return _thread_cpu(t) - c0


def _collecting(cls):
    """A factory for ``cls`` that also puts each handler on a queue when it opens."""
    got = queue.Queue()

    class H(cls):
        def on_open(self):
            ok = super().on_open()
            got.put(self)
            return ok
    H.__name__ = cls.__name__
    return H, got


def _registered(h):
    return h.poller is not None and h.poller._handlers.get(h.fd) is h


def _connect_pair(a, got):
    """A client socket and its server-side handler, registered."""
    c = socket.create_connection(a.address, timeout=WAIT)
    h = got.get(timeout=WAIT)
    wait_until(lambda: _registered(h), what="registration")
    return c, h


def _pattern(n, seed):
    rnd = random.Random(seed)
    if hasattr(rnd, "randbytes"):
        return rnd.randbytes(n)
    return bytes(rnd.getrandbits(8) for _ in range(n))          # pragma: no cover (3.8)


class _RawReader(goev.IOHandle):
    """A handler on a raw fd (a pipe or socket end the test owns): reads with os.read."""

    def __init__(self, close_fd_on_read=False):
        self.got = bytearray()
        self.reads = 0
        self.closes = 0
        self.close_fd_on_read = close_fd_on_read

    def on_read(self):
        self.reads += 1
        if self.close_fd_on_read:
            os.close(self.fd)                 # behind the loop's back
            self.close_fd_on_read = False
            return False
        try:
            d = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        self.got += d
        return bool(d)

    def on_close(self):
        self.closes += 1                      # the fd belongs to the test: not closed here


class _Counting(Echo):
    """Echo that counts its callbacks."""

    def on_open(self):
        self.n_read = self.n_write = self.n_close = 0
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        return True

    def on_read(self):
        self.n_read += 1
        return super().on_read()

    def on_write(self):
        self.n_write += 1
        return super().on_write()

    def on_close(self):
        self.n_close += 1
        self.destroy()


def _echo_ok(a, payload=b"ping"):
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(payload)
        return recv_exact(c, len(payload)) == payload


# =============================================================================
# Poller and registration (catalogue 1-13)
# =============================================================================

def test_unregister_after_fd_close_and_dup2_reuse(make_reactor):
    """Catalogue #1, #2: a handler whose fd was closed behind the loop's back is
    still closed cleanly (unregister does not raise, on_close once); and when the
    fd number is replaced with dup2 while registered, closing the old handler
    succeeds and a new handler on the same number gets only the new file's data."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    # 1: close behind the back, then let goev close the handler
    rd, wr = os.pipe()
    a = _RawReader()
    r.add_handler(a, rd, goev.EV_IN)
    wait_until(lambda: _registered(a))
    os.close(rd)
    os.close(wr)
    _close_on(p, a)
    assert a.closes == 1 and rd not in p._handlers
    # 2: dup2 a new pipe onto a registered number
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        b = _RawReader()
        r.add_handler(b, r1, goev.EV_IN)
        wait_until(lambda: _registered(b))
        os.dup2(r2, r1)                      # r1 now names pipe 2; pipe 1's read end is gone
        _close_on(p, b)
        assert b.closes == 1 and r1 not in p._handlers
        c = _RawReader()
        r.add_handler(c, r1, goev.EV_IN)
        os.write(w2, b"new owner")
        wait_until(lambda: bytes(c.got) == b"new owner", what="data for the new owner")
        assert not b.got and b.reads == 0
        _close_on(p, c)
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    assert _echo_ok(goev.Acceptor(r, "127.0.0.1:0", Echo))


def test_event_for_handler_closed_earlier_in_batch_is_dropped(make_reactor):
    """Catalogue #3, #11 (fd reuse within one batch): two connections become
    readable in one batch; whichever runs first closes the other and opens a new
    socket.  The closed one never gets its pending event, the new socket cannot
    get the closed one's fd number during the batch (the real close(fd) waits
    for the batch end), and the closed handler gets on_close exactly once."""
    H, got = _collecting(_Counting)
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c1, h1 = _connect_pair(a, got)
    c2, h2 = _connect_pair(a, got)
    seen = {}

    def killer(self_h, other):
        def on_read():
            if "first" in seen:
                seen.setdefault("late", []).append(self_h)
                return True
            seen["first"] = self_h
            seen["other_fd"] = other.fd
            other.close()
            s = socket.socket()
            seen["new_fd"] = s.fileno()
            seen["other_fd_open"] = _fd_open(other.fd)
            s.close()
            return Echo.on_read(self_h)
        return on_read
    h1.on_read = killer(h1, h2)
    h2.on_read = killer(h2, h1)
    release = _park(r.pollers[0])
    c1.sendall(b"x")
    c2.sendall(b"y")
    time.sleep(0.05)                          # let loopback deliver both before the poller looks
    release.set()
    wait_until(lambda: "first" in seen, what="the first on_read")
    first = seen["first"]
    other = h2 if first is h1 else h1
    wait_until(lambda: other.n_close == 1, what="on_close of the closed one")
    _on_poller(r.pollers[0], lambda: None)    # one more pass
    assert "late" not in seen, "event delivered to a handler closed earlier in the batch"
    assert seen["new_fd"] != seen["other_fd"] and seen["other_fd_open"]
    assert other.n_close == 1
    (c1 if first is h1 else c2).settimeout(WAIT)
    assert (c1 if first is h1 else c2).recv(10) in (b"x", b"y")
    assert _eof_or_reset(c2 if first is h1 else c1)   # closed with "y" unread: RST
    c1.close()
    c2.close()


def _eof_or_reset(sock):
    """True when the peer closed: EOF, or a reset (it closed with data unread)."""
    try:
        return recv_all(sock) == b""
    except ConnectionResetError:
        return True


def _fd_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("how", ["returns_false", "dup_then_reuse"])
def test_fd_closed_behind_the_loops_back_no_busy_loop(make_reactor, goev_log, how):
    """Catalogue #4, #13: a handler closes its own fd with os.close() behind the
    loop's back while a dup() keeps the file description alive (so epoll still
    holds a registration goev can no longer remove by number), and the peer keeps
    sending.  The loop must not wedge or busy-loop (poller CPU stays low), the
    handler gets on_close once, and a new handler later given the same fd number
    (dup2) receives exactly its own data."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    s1, s2 = socket.socketpair()
    keep = os.dup(s1.fileno())               # the dup that keeps the description alive
    num = os.dup(s1.fileno())
    s1.close()
    h = _RawReader(close_fd_on_read=True)
    r.add_handler(h, num, goev.EV_IN)
    wait_until(lambda: _registered(h))
    s2.sendall(b"a")
    wait_until(lambda: h.closes == 1, what="on_close")
    s2.sendall(b"more data nobody reads" * 100)   # level-triggered: reported forever if registered
    time.sleep(0.05)
    burnt = _idle_cpu(p)
    assert burnt < 0.15, "poller burnt %.2fs of CPU in 0.6s: busy loop on a stale fd" % burnt
    if how == "dup_then_reuse":
        n1, n2 = socket.socketpair()         # (may itself get the freed number)
        if n2.fileno() == num:
            n1, n2 = n2, n1
        if n1.fileno() == num:
            n1.detach()
        else:
            os.dup2(n1.fileno(), num)        # the old number now names a new socket
            n1.close()
        c = _RawReader()
        r.add_handler(c, num, goev.EV_IN)
        n2.sendall(b"mine")
        wait_until(lambda: bytes(c.got) == b"mine", what="the new owner's data")
        time.sleep(0.05)
        assert bytes(c.got) == b"mine"
        burnt = _idle_cpu(p)
        assert burnt < 0.15, "poller burnt %.2fs: stale registration fires for the new owner" % burnt
        _close_on(p, c)
        os.close(num)
        n2.close()
    assert h.closes == 1 and h.reads == 1
    assert not [rec for rec in goev_log.errors() if "callback" in rec.getMessage()]
    os.close(keep)
    s2.close()
    assert _echo_ok(goev.Acceptor(r, "127.0.0.1:0", Echo))


def test_stale_close_of_a_finished_handler_spares_the_new_owner(make_reactor):
    """Catalogue #5: once a handler is closed, every late call on it (close, abort,
    destroy, shutdown_write, write, async_write) is a no-op even after its fd
    number went to a new connection: the new owner keeps echoing and receives
    nothing of the old one's.  Also: destroy() on a *registered* handler (the
    public "release the socket" call) first takes it off the poller, so its
    number can be reused and no stale entry blocks the next registration."""
    H, got = _collecting(Echo)
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c1, old = _connect_pair(a, got)
    old_fd = old.fd
    c1.close()
    wait_until(lambda: old.closed and old.fd == -1, what="old handler closed")
    for _ in range(20):                       # the lowest free number: the old one, normally
        c2, new = _connect_pair(a, got)
        if new.fd == old_fd:
            break
        c2.close()
    else:
        pytest.skip("fd number %d was not reused" % old_fd)
    for call in (old.close, old.abort, old.destroy, old.shutdown_write,
                 lambda: old.write(b"STALE"), lambda: old.async_write(b"STALE")):
        call()
        _on_poller(r.pollers[0], call)
    c2.sendall(b"hello")
    assert recv_exact(c2, 5) == b"hello"
    c2.settimeout(0.2)
    with pytest.raises(socket.timeout):
        c2.recv(10)                           # nothing stale arrives
    # destroy() while registered: leaves the poller first
    _on_poller(r.pollers[0], new.destroy)
    assert recv_all(c2) == b""
    assert old_fd not in r.pollers[0]._handlers
    c2.close()
    for _ in range(20):
        c3, h3 = _connect_pair(a, got)
        ok = recv_exact(c3, 0) == b"" and (c3.sendall(b"z") or recv_exact(c3, 1) == b"z")
        c3.close()
        assert ok
        if h3.fd == old_fd:
            break


def test_register_regular_file(make_reactor, tmp_path):
    """Catalogue #6: registering a regular file: epoll refuses it (PermissionError
    at the call) and the bookkeeping is rolled back, so the fd can be registered
    again later; the selectors backend (poll) accepts it as always readable."""
    r = make_reactor(1)
    r.start()
    path = tmp_path / "f"
    path.write_bytes(b"file data")
    fd = os.open(str(path), os.O_RDONLY)
    try:
        h = _RawReader()
        if r.backend == "epoll":
            with pytest.raises(PermissionError):
                r.add_handler(h, fd, goev.EV_IN)
            assert fd not in r.pollers[0]._handlers and h.poller is None
        else:
            r.add_handler(h, fd, goev.EV_IN)
            wait_until(lambda: h.closes == 1, what="EOF of the file")
            assert bytes(h.got) == b"file data"
            assert fd not in r.pollers[0]._handlers
    finally:
        os.close(fd)
    assert _echo_ok(goev.Acceptor(r, "127.0.0.1:0", Echo))


def test_empty_reactor_runs_and_stops(make_reactor):
    """Catalogue #7: a reactor with nothing registered neither spins nor blocks
    stop(): run() on this thread returns after a timer stops it, and start()
    then stop() with nothing registered returns promptly."""
    r = make_reactor(2)
    r.call_later(0.05, r.stop)
    t0 = time.monotonic()
    r.run()
    assert r.stopped and time.monotonic() - t0 < WAIT
    r2 = make_reactor(3)
    r2.start()
    burnt = _idle_cpu(r2.pollers[1], 0.3)
    assert burnt < 0.15, "idle poller burnt %.2fs" % burnt
    r2.stop(timeout=WAIT)
    assert r2.stopped


def _raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return soft, hard, max(new, soft)


def test_fds_above_fd_setsize(make_reactor):
    """Catalogue #8: fds numbered far above FD_SETSIZE (1024) are registered and
    served (select() could not; epoll and poll() can): 1500 socketpairs on one
    reactor with 2 pollers, every one echoes its own bytes."""
    soft, hard, now = _raise_nofile(4200)
    if now < 3300:
        pytest.skip("RLIMIT_NOFILE hard limit %d too low" % hard)
    pairs, handlers = [], []
    try:
        r = make_reactor(2)
        r.start()

        class E(Echo):
            pass
        for i in range(1500):
            a, b = socket.socketpair()
            a.setblocking(False)
            h = E()
            h._sock = a                        # a socket goev did not create: hand it over
            h.fd = a.fileno()
            h.reactor = r
            r.add_handler(h, a.fileno(), goev.EV_IN)
            pairs.append((a, b))
            handlers.append(h)
        assert max(a.fileno() for a, _ in pairs) > 1024
        for i, (_, b) in enumerate(pairs):
            b.sendall(b"%d;" % i)
        for i, (_, b) in enumerate(pairs):
            want = b"%d;" % i
            assert recv_exact(b, len(want)) == want
    finally:
        r.stop(timeout=WAIT)
        for a, b in pairs:
            a.close()
            b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_read_only_handler_never_sees_write(make_reactor):
    """Catalogue #9: a handler registered for EV_IN only is never called with
    on_write, although its socket is writable the whole time."""
    H, got = _collecting(_Counting)
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c, h = _connect_pair(a, got)
    for i in range(50):
        c.sendall(b"m%d" % i)
        recv_exact(c, len(b"m%d" % i))
    _on_poller(h.poller, lambda: None)
    assert h.n_write == 0 and h.n_read >= 1
    c.close()


def test_spurious_readiness_and_idempotent_removal(make_reactor):
    """Catalogue #10, #12: read() with nothing ready returns None (the handler
    stays open); remove_event twice is harmless, append_event restores reading;
    a second add_handler of a live handler is refused; closing twice is one close."""
    H, got = _collecting(_Counting)
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c, h = _connect_pair(a, got)
    p = h.poller
    assert _on_poller(p, h.read) is None and not h.closed
    r.remove_event(h.fd, goev.EV_IN)
    r.remove_event(h.fd, goev.EV_IN)
    _on_poller(p, lambda: None)
    c.sendall(b"held")
    time.sleep(0.05)
    assert h.n_read == 0                      # not polled for reading any more
    r.append_event(h.fd, goev.EV_IN)
    assert recv_exact(c, 4) == b"held"
    with pytest.raises(ValueError):
        r.add_handler(h, h.fd, goev.EV_IN)
    _on_poller(p, h.close)
    _on_poller(p, h.close)
    assert recv_all(c) == b""
    assert h.n_close == 1
    with pytest.raises(ValueError):
        _on_poller(p, r.remove_event, 10 ** 6, goev.EV_IN)
    c.close()


def test_add_close_churn_same_fd(make_reactor):
    """Catalogue #12: 300 rounds of register, close at once (on the poller and
    from this thread), reusing fd numbers: every handler gets on_close once and
    the table ends empty; the next connection on a reused number is served."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    hs = []
    for i in range(300):
        a, b = socket.socketpair()
        a.setblocking(False)
        h = _Counting()
        h.n_read = h.n_write = h.n_close = 0
        h._sock = a
        h.fd = a.fileno()
        h.reactor = r
        r.add_handler(h, a.fileno(), goev.EV_IN | (goev.EV_OUT if i % 2 else 0))
        if i % 3:
            h.close()
        else:
            _on_poller(p, h.close)
        b.close()
        hs.append(h)
    _on_poller(p, lambda: None)
    wait_until(lambda: all(h.n_close == 1 for h in hs), what="every on_close")
    assert not [fd for fd in p._handlers if fd != -1 and not isinstance(p._handlers[fd], goev.Acceptor)]
    assert _echo_ok(goev.Acceptor(r, "127.0.0.1:0", Echo))


# =============================================================================
# Cross-thread posts, exceptions, lifecycle (catalogue 22-32)
# =============================================================================

def test_post_from_poller_inside_timer_wakes_next_pass(make_reactor):
    """Catalogue #22: a post made on the poller's own thread from inside a timer
    callback (the waker is not needed there, but the loop must not sleep on it)
    runs promptly in the next pass, even with no I/O and no other timer."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    done = threading.Event()
    ran_on = []

    def in_timer():
        p._post(lambda: (ran_on.append(threading.get_ident()), done.set()))
        r.post(lambda: None)
    r.call_later(0.01, in_timer)
    assert done.wait(5.0), "a post from inside a timer waited for an unrelated wake-up"
    assert ran_on == [p._tid]


def test_posts_interleaved_with_timer_churn_exact_count(make_reactor, npollers):
    """Catalogue #23: 4 threads x 1024 posts interleaved with call_later /
    cancel churn from the same threads: every post runs exactly once, no
    cancelled timer runs, every kept timer runs once."""
    r = make_reactor(npollers)
    r.start()
    lock = threading.Lock()
    counts = {"post": 0, "kept": 0, "cancelled": 0}

    def bump(k):
        with lock:
            counts[k] += 1

    def producer(seed):
        rnd = random.Random(seed)
        for i in range(1024):
            r.post(bump, "post") if npollers == 1 else r.post_to(anchor, bump, "post")
            t = r.call_later(rnd.random() * 0.02, bump, "cancelled" if i % 2 else "kept")
            if i % 2:
                t.cancel()
    anchor = goev.IOHandle()
    if npollers > 1:                          # post_to needs a registered handler
        a, b = socket.socketpair()
        a.setblocking(False)
        anchor._sock, anchor.fd, anchor.reactor = a, a.fileno(), r
        r.add_handler(anchor, a.fileno(), goev.EV_IN)
    threads = [threading.Thread(target=producer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_until(lambda: counts["post"] == 4096 and counts["kept"] == 2048, what="all posts and timers")
    _on_poller(r.pollers[0], lambda: None)
    time.sleep(0.05)                          # cancelled ones had up to 20 ms: give them a chance to misfire
    assert counts == {"post": 4096, "kept": 2048, "cancelled": 0}
    if npollers > 1:
        b.close()


class _SlowSink(goev.IOHandle):
    """Reads nothing: lets the client's unread data pile up (for close races)."""

    def on_open(self):
        self.closes = 0
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        return True

    def on_read(self):
        d = self.read()
        return d is None or bool(d)

    def on_close(self):
        self.closes += 1
        self.destroy()


@pytest.mark.parametrize("how", ["close", "abort"])
def test_async_writes_racing_handler_close_account_every_byte(make_reactor, npollers, goev_log, how):
    """Catalogue #25 (posts racing with close): 4 threads async_write numbered
    records to one handler while another thread closes (or aborts) it.  Nothing
    raises or logs; on_close runs once; with close() every byte is either
    received by the client or counted in dropped_bytes, and what arrived is a
    clean prefix-ordered sequence of whole records per thread."""
    H, got = _collecting(_SlowSink)
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c, h = _connect_pair(a, got)
    written = [0] * 4
    go = threading.Event()

    errors_in_threads = []

    def producer(k):
        go.wait()
        try:
            for i in range(3000):
                rec = struct.pack("!BI", k, i) + b"." * 59
                h.async_write(rec) if i % 2 else h.write(rec)
                written[k] += len(rec)
        except BaseException as e:
            errors_in_threads.append(repr(e))
            raise
    threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    go.set()
    time.sleep(0.005)
    getattr(h, how)()
    for t in threads:
        t.join()
    try:
        data = recv_all(c)
    except ConnectionResetError:
        data = None
    c.close()
    wait_until(lambda: h.closes == 1, what="on_close")
    _on_poller(h.poller, lambda: None)        # FIFO: every posted write has run (or been dropped)
    assert h.closes == 1 and not goev_log.errors() and not errors_in_threads
    if how == "close":
        assert data is not None
        per = [0] * 4
        for off in range(0, len(data), 64):
            per[data[off]] += 1
        assert len(data) + h.dropped_bytes == sum(written), (per, written)
        assert len(data) % 64 == 0
        nxt = [0] * 4
        for off in range(0, len(data), 64):
            k, i = struct.unpack("!BI", data[off:off + 5])
            assert i == nxt[k], "record %d of thread %d out of order" % (i, k)
            nxt[k] += 1
    else:
        assert h.dropped_bytes <= sum(written)


def test_exception_in_posted_callback_is_logged(make_reactor, npollers, goev_log):
    """Catalogue #26: a posted callback that raises is logged on "goev" and
    the loop keeps running; the posts after it still run, in order."""
    r = make_reactor(npollers)
    r.start()
    seen = []

    def boom():
        raise RuntimeError("posted boom")
    for p in r.pollers:
        p._post(seen.append, 1)
        p._post(boom)
        p._post(lambda: seen.append(2) if seen.count(1) else seen.append("out of order"))
    wait_until(lambda: len(seen) == 2 * npollers)
    assert sorted(seen) == [1] * npollers + [2] * npollers
    errs = [rec for rec in goev_log.errors() if "posted" in rec.getMessage()]
    assert len(errs) == npollers and "posted boom" in str(errs[0].exc_info[1])
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    assert _echo_ok(a)


def test_broken_repr_in_error_path_is_contained(make_reactor, goev_log):
    """Catalogue #27: the error path itself hits a user bug -- a handler whose
    __repr__ raises, raising in on_read, then in on_close.  Both are logged (with
    a fallback repr), the handler is closed once, the loop keeps serving."""
    class Bad(goev.IOHandle):
        def __repr__(self):
            raise ValueError("repr is broken too")

        def on_read(self):
            raise RuntimeError("read boom")

        def on_close(self):
            self.destroy()
            raise RuntimeError("close boom")
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Bad)
    b = goev.Acceptor(r, "127.0.0.1:0", Echo)
    r.start()
    with socket.create_connection(a.address, timeout=WAIT) as c:
        c.sendall(b"x")
        assert _eof_or_reset(c)
    wait_until(lambda: len(goev_log.errors()) >= 2, what="two error logs")
    msgs = [rec.getMessage() for rec in goev_log.errors()]
    assert any("Bad object at" in m for m in msgs), msgs
    assert _echo_ok(b)


class _KIHandler(Echo):
    """Raises KeyboardInterrupt from on_read the first time it sees b"!".  Lives on
    poller 0, the one run() drives on the calling thread (a KeyboardInterrupt on a
    background poller thread has nowhere to go: that poller logs and shuts down)."""
    raised = 0

    def on_open(self):
        self.reactor.add_handler(self, self.fd, goev.EV_IN, poller=0)
        return True

    def on_read(self):
        data = self.read()
        if data is None:
            return True
        if not data:
            return False
        data = bytes(data)
        self.write(data.replace(b"!", b""))
        if b"!" in data and not type(self).raised:
            type(self).raised += 1
            raise KeyboardInterrupt
        return True


def test_keyboard_interrupt_from_callbacks_reactor_reusable(make_reactor, npollers):
    """Catalogue #28, #29: KeyboardInterrupt raised in on_read, in a posted
    callback and in a timer, with run() on this thread, propagates out of run()
    each time; run() is then called again and everything keeps working: the
    interrupted connection still echoes, no event is delivered twice (the bytes
    read before the raise come back exactly once), the other posts and timers
    still run, and stop() ends it cleanly."""
    H = type("KI", (_KIHandler,), {"raised": 0})
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    c = socket.create_connection(a.address, timeout=WAIT)
    out = []
    c.sendall(b"abc!")
    with pytest.raises(KeyboardInterrupt):
        r.run()
    assert recv_exact(c, 3) == b"abc"
    # a posted callback raising KeyboardInterrupt; the posts behind it still run
    p0 = r.pollers[0]
    p0._post(_raise_ki)
    p0._post(out.append, "after-post")
    with pytest.raises(KeyboardInterrupt):
        r.run()
    # a timer raising KeyboardInterrupt; a later timer still runs
    r.call_later(0.0, _raise_ki)
    r.call_later(0.01, out.append, "after-timer")
    with pytest.raises(KeyboardInterrupt):
        r.run()
    r.call_later(0.05, out.append, "final")
    r.call_later(0.1, r.stop)

    def client():
        c.sendall(b"more")
        out.append(recv_exact(c, 4))
    t = threading.Thread(target=client)
    t.start()
    r.run()
    t.join()
    assert r.stopped
    assert out[0] == "after-post" and len(out) == 4
    assert "after-post" in out and "after-timer" in out and b"more" in out and "final" in out
    assert _eof_or_reset(c)
    c.close()


def _raise_ki():
    raise KeyboardInterrupt


def test_after_stop_apis_refuse_or_drop(make_reactor, tmp_path):
    """Catalogue #30, #32: after stop(): run()/start() raise RuntimeError,
    add_handler and Acceptor raise RuntimeError (no socket leaked),
    Connector.connect raises RuntimeError, post/post_to/call_later are dropped
    (never run, never raise), remove_event on a gone fd is a ValueError; a
    second start() on a running reactor is a RuntimeError too."""
    r = make_reactor(2)
    r.start()
    with pytest.raises(RuntimeError):
        r.start()
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    port = a.address[1]
    r.stop(timeout=WAIT)
    assert r.stopped
    with pytest.raises(RuntimeError):
        r.run()
    with pytest.raises(RuntimeError):
        r.start()
    s1, s2 = socket.socketpair()
    with pytest.raises(RuntimeError):
        r.add_handler(goev.IOHandle(), s1.fileno(), goev.EV_IN)
    s1.close()
    s2.close()
    with pytest.raises(RuntimeError):
        goev.Acceptor(r, "127.0.0.1:0", Echo)
    with pytest.raises(RuntimeError):
        goev.Connector(r).connect(("127.0.0.1", port), goev.IOHandle(), 1000)
    ran = []
    r.post(ran.append, 1)
    r.call_later(0, ran.append, 2)
    r.pollers[1].call_later(0, ran.append, 3)
    with pytest.raises(ValueError):
        r.remove_event(a.fd if a.fd >= 0 else 10 ** 6, goev.EV_IN)
    time.sleep(0.05)
    assert ran == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_internal_fds_counted_and_released(backend):
    """Catalogue #31: a reactor's own fds are exactly one waker per poller plus,
    with epoll, one epoll fd per poller; all of them are closed by stop()
    (started or not), and by the context manager."""
    per = 2 if backend == "epoll" else 1
    for n in (1, 3):
        before = _fd_count()
        r = goev.Reactor(n, backend=backend)
        assert _fd_count() - before == per * n
        r.start()
        r.stop(timeout=WAIT)
        assert _fd_count() == before
        with goev.Reactor(n, backend=backend):
            assert _fd_count() - before == per * n
        assert _fd_count() == before


class _RaisingClose(Echo):
    def on_open(self):
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        type(self).opened.append(self)
        return True

    def on_close(self):
        type(self).closed.append(self)
        self.destroy()
        raise RuntimeError("on_close boom during stop")


def test_callbacks_raising_during_stop(make_reactor, npollers, goev_log):
    """Catalogue #26, #32 (callbacks raising during stop): every on_close raises
    and a posted callback raises while stop() closes everything: each is logged,
    every handler still gets its on_close once, every client sees the close,
    stop() completes, all threads are joined and no fd is left (hygiene)."""
    H = type("RC", (_RaisingClose,), {"opened": [], "closed": []})
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    clients = [socket.create_connection(a.address, timeout=WAIT) for _ in range(12)]
    wait_until(lambda: len(H.opened) == 12 and all(_registered(h) for h in H.opened))

    def boom():
        raise RuntimeError("posted boom during stop")
    r.post(boom)
    r.stop(timeout=WAIT)
    assert r.stopped
    assert sorted(map(id, H.closed)) == sorted(map(id, H.opened))
    for c in clients:
        assert _eof_or_reset(c)
        c.close()
    msgs = [rec.getMessage() for rec in goev_log.errors()]
    assert sum("on_close" in m for m in msgs) == 12


def test_keyboard_interrupt_in_on_close_during_stop_leaks_nothing(backend):
    """Catalogue #28, #32: on_close raising KeyboardInterrupt while run() stops
    the reactor: the interrupt propagates out of run(), and a second stop()
    finishes the job -- every other handler still gets on_close and every fd
    is closed."""
    r = goev.Reactor(1, backend=backend)
    closed = []

    class K(Echo):
        def on_close(self):
            closed.append(self)
            self.destroy()
            if len(closed) == 2:
                raise KeyboardInterrupt
    a = goev.Acceptor(r, "127.0.0.1:0", K)
    clients = [socket.create_connection(a.address, timeout=WAIT) for _ in range(6)]

    def stop_when_open():
        if len(r.pollers[0]._handlers) == 7:
            r.stop()
        else:
            r.call_later(0.01, stop_when_open)
    r.call_later(0.01, stop_when_open)
    with pytest.raises(KeyboardInterrupt):
        r.run()
    r.stop(timeout=WAIT)
    assert r.stopped and len(closed) == 6
    for c in clients:
        assert _eof_or_reset(c)
        c.close()


# =============================================================================
# Scale: 10 000 concurrent connections on one reactor (slow; run by .ci/run)
# =============================================================================

_SCALE_SERVER = r"""
import signal, sys
import goev
r = goev.Reactor(1, backend=sys.argv[1])
a = goev.Acceptor(r, "127.0.0.1:0", goev._EchoHandler, backlog=4096)
signal.signal(signal.SIGTERM, lambda *_: r.stop())
print(a.address[1], flush=True)
r.run()
"""


def _vmrss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_10k_connections(backend):
    """Catalogue #8 (scale): one reactor (a child process running the CLI's echo
    handler) holds 10 000 concurrent connections from source addresses
    127.0.0.2-5, echoes a distinct message on every one, and its RSS grows by
    less than 8 KiB per connection (measured with /proc/PID/status VmRSS)."""
    n = 10000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 30000 if hard == resource.RLIM_INFINITY else min(hard, 30000)
    if want < n + 500:
        pytest.skip("RLIMIT_NOFILE hard limit %d is below %d" % (hard, n + 500))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    clients = []
    proc = None
    try:
        proc = spawn_py(["-c", _SCALE_SERVER, backend])     # inherits the raised limit
        port = int(proc.stdout.readline())
        pid = proc.pid
        base_fds = len(os.listdir("/proc/%d/fd" % pid))
        rss0 = _vmrss_kib(pid)
        t0 = time.monotonic()
        for i in range(n):
            s = socket.socket()
            s.bind(("127.0.0.%d" % (2 + i % 4), 0))
            s.connect(("127.0.0.1", port))
            clients.append(s)
        wait_until(lambda: len(os.listdir("/proc/%d/fd" % pid)) >= base_fds + n, timeout=60,
                   what="the server to accept all %d connections" % n)
        t_conn = time.monotonic() - t0
        for i, s in enumerate(clients):
            s.sendall(b"%05d" % i)
        for i, s in enumerate(clients):
            assert recv_exact(s, 5) == b"%05d" % i
        t_echo = time.monotonic() - t0 - t_conn
        rss1 = _vmrss_kib(pid)
        per_conn = (rss1 - rss0) * 1024.0 / n
        print("\n10k connections [%s]: RSS %.1f -> %.1f MiB, %.0f bytes per connection; "
              "connect %.1fs, echo %.1fs" % (backend, rss0 / 1024, rss1 / 1024, per_conn, t_conn, t_echo))
        assert per_conn < 8192, "%.0f bytes of RSS per connection" % per_conn
        assert proc.poll() is None
    finally:
        for s in clients:
            s.close()
        if proc is not None:
            assert stop_child(proc) == 0
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# =============================================================================
# Accept and connect (catalogue 33-42)
# =============================================================================

def test_accept_batches_a_full_backlog(make_reactor, goev_log):
    """Catalogue #33: 300 connections queued while the poller is parked are all
    accepted in a few batches (the acceptor's on_read runs far fewer times than
    there are connections; EAGAIN ends a batch quietly), and each one echoes."""
    calls = []

    class CountingAcceptor(goev.Acceptor):
        def on_read(self):
            calls.append(1)
            return super().on_read()
    r = make_reactor(1)
    a = CountingAcceptor(r, "127.0.0.1:0", Echo, backlog=1024)
    r.start()
    release = _park(r.pollers[0])
    clients = [socket.create_connection(a.address, timeout=WAIT) for _ in range(300)]
    release.set()
    for i, c in enumerate(clients):
        c.sendall(b"%d." % i)
    for i, c in enumerate(clients):
        assert recv_exact(c, len(b"%d." % i)) == b"%d." % i
        c.close()
    assert len(calls) <= 30, "%d accept passes for 300 queued connections" % len(calls)
    assert not goev_log.errors()


def test_eaddrinuse_and_reuse_port(make_reactor):
    """Catalogue #35: a second listener on a used port fails with
    OSError(EADDRINUSE) and leaks no socket; SO_REUSEPORT is off by default and,
    when asked for on both, two listeners share the port and both serve."""
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    with pytest.raises(OSError) as ei:
        goev.Acceptor(r, a.address, Echo)
    assert ei.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError) as ei:
        goev.Acceptor(r, a.address, Echo, reuse_port=True)   # the first did not ask for it
    assert ei.value.errno == errno.EADDRINUSE
    b1 = goev.Acceptor(r, "127.0.0.1:0", Echo, reuse_port=True)
    b2 = goev.Acceptor(r, b1.address, Echo, reuse_port=True)
    r.start()
    for _ in range(20):
        assert _echo_ok(b1)
    b1.close()
    assert _echo_ok(b2)                       # the port is still served by the second


def test_listener_kept_alive_without_user_reference(make_reactor):
    """Catalogue #37: an Acceptor the user does not keep a reference to keeps
    serving (the reactor owns it) through garbage collections."""
    r = make_reactor(1)
    port = goev.Acceptor(r, "127.0.0.1:0", Echo).address[1]
    r.start()
    for _ in range(3):
        gc.collect()
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as c:
            c.sendall(b"alive")
            assert recv_exact(c, 5) == b"alive"


class _Client(goev.IOHandle):
    def __init__(self):
        self.events = queue.Queue()

    def on_open(self):
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        self.events.put("open")
        self.write(b"hi")
        return True

    def on_read(self):
        d = self.read()
        if d is None:
            return True
        if d:
            self.events.put(bytes(d))
        return bool(d)

    def on_connect_fail(self, err):
        self.events.put(err)

    def on_close(self):
        self.events.put("close")
        self.destroy()


def test_connect_refused_then_same_handler_connects(make_reactor):
    """Catalogue #39: a connect before anyone listens fails with
    ConnectionRefusedError; once a listener is up, the very same handler object
    connects and talks."""
    r = make_reactor(1)
    r.start()
    port = free_port()
    h = _Client()
    goev.Connector(r).connect(("127.0.0.1", port), h, 5000)
    assert isinstance(h.events.get(timeout=WAIT), ConnectionRefusedError)
    a = goev.Acceptor(r, ("127.0.0.1", port), Echo)
    goev.Connector(r).connect(("127.0.0.1", port), h, 5000)
    assert h.events.get(timeout=WAIT) == "open"
    assert h.events.get(timeout=WAIT) == b"hi"
    h.close()
    assert h.events.get(timeout=WAIT) == "close"
    a.close()


def test_add_handler_with_closed_fd(make_reactor, goev_log):
    """Catalogue #41: a handler handed an fd that is already closed: epoll
    refuses it at the call (OSError EBADF, nothing registered); poll() reports it
    invalid and the handler is closed (on_close once) without a busy loop.
    Either way the reactor keeps serving."""
    r = make_reactor(1)
    r.start()
    s = socket.socket()
    fd = s.fileno()
    s.close()
    h = _RawReader()
    if r.backend == "epoll":
        with pytest.raises(OSError) as ei:
            r.add_handler(h, fd, goev.EV_IN)
        assert ei.value.errno == errno.EBADF and fd not in r.pollers[0]._handlers
    else:
        r.add_handler(h, fd, goev.EV_IN)
        wait_until(lambda: h.closes == 1, what="on_close of the invalid fd")
        assert _idle_cpu(r.pollers[0]) < 0.15
    assert _echo_ok(goev.Acceptor(r, "127.0.0.1:0", Echo))


# =============================================================================
# Read, EOF, half-close; write, backpressure, close (catalogue 43-58)
# =============================================================================

class _Answer(goev.IOHandle):
    """Collects the request until EOF, answers it reversed, half-closes, and
    closes once the peer's FIN has been seen *and* its own FIN sent."""

    def on_open(self):
        self.buf = bytearray()
        self.closes = 0
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        type(self).opened.put(self)
        return True

    def on_read(self):
        d = self.read()
        if d is None:
            return True
        if d:
            self.buf += d
            return True
        self.write(bytes(self.buf[::-1]))
        self.shutdown_write()
        self.shutdown_write()                 # twice: one FIN
        return True                           # keep the handler: the peer may still say something

    def on_write_drained(self):
        pass

    def on_close(self):
        self.closes += 1
        self.destroy()


def test_double_half_close(make_reactor, npollers):
    """Catalogue #44, #53: the client writes and half-closes; the server answers
    after EOF and half-closes too (shutdown_write twice = one FIN, after the
    flush).  The client gets the whole answer then EOF while its own socket is
    still open; then the server's close() ends it with on_close once."""
    H = type("A", (_Answer,), {"opened": queue.Queue()})
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    body = _pattern(300000, 44)
    with socket.create_connection(a.address, timeout=WAIT) as c:
        h = H.opened.get(timeout=WAIT)
        c.sendall(body)
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == body[::-1]
        assert h.closes == 0 and not h.closed
        h.close()
        wait_until(lambda: h.closes == 1)


class _Pusher(goev.IOHandle):
    """Writes ``total`` bytes as soon as it opens (and echoes nothing)."""
    total = 0

    def on_open(self):
        self.closes = 0
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        type(self).opened.put(self)
        self.write(_pattern(type(self).total, 7))
        return True

    def on_read(self):
        d = self.read()
        return d is None or bool(d)

    def on_close(self):
        self.closes += 1
        self.destroy()


def test_close_while_reading_paused_is_not_lost(make_reactor, goev_log):
    """Catalogue #46, #52: a server handler is paused (queue above high water,
    so it stopped reading) because the client does not read; the client then
    closes with data unread (the kernel sends RST).  The handler gets on_close
    promptly with a ConnectionResetError/BrokenPipeError in ``error``, and no
    error is logged."""
    H = type("P", (_Pusher,), {"opened": queue.Queue(), "total": 16 << 20})
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c = socket.create_connection(a.address, timeout=WAIT)
    h = H.opened.get(timeout=WAIT)
    c.sendall(b"x" * 1000)
    wait_until(lambda: h.pending_write_bytes > 0)
    c.close()
    wait_until(lambda: h.closes == 1, what="on_close after the peer's reset")
    assert isinstance(h.error, (ConnectionResetError, BrokenPipeError)), h.error
    assert h.dropped_bytes > 0
    assert not goev_log.errors()


def test_peer_reset_mid_write_is_on_close_not_error(make_reactor, npollers, goev_log):
    """Catalogue #47, #52: 20 clients each reset (SO_LINGER 0) while the server
    is in the middle of writing megabytes to them and while it reads: every
    handler ends in on_close with the EPIPE/ECONNRESET in ``error``, nothing is
    logged at ERROR, and the reactor keeps serving."""
    H = type("P", (_Pusher,), {"opened": queue.Queue(), "total": 4 << 20})
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    hs = []
    for i in range(20):
        c = socket.create_connection(a.address, timeout=WAIT)
        h = H.opened.get(timeout=WAIT)
        if i % 2:
            recv_exact(c, 100000)             # let the write get going
        c.sendall(b"request")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        hs.append(h)
    wait_until(lambda: all(h.closes == 1 for h in hs), what="every on_close")
    for h in hs:
        assert h.error is None or isinstance(h.error, (ConnectionResetError, BrokenPipeError)), h.error
    assert not goev_log.errors()
    assert _echo_ok(goev.Acceptor(r, "127.0.0.1:0", Echo))


def test_write_after_send_error_dropped_and_counted(make_reactor, goev_log):
    """Catalogue #51: after the peer reset the connection and a send failed,
    later write()/async_write() calls neither raise nor log: the bytes are
    dropped and counted in dropped_bytes."""
    H = type("P", (_Pusher,), {"opened": queue.Queue(), "total": 8 << 20})
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c = socket.create_connection(a.address, timeout=WAIT)
    h = H.opened.get(timeout=WAIT)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    wait_until(lambda: h.closes == 1)
    before = h.dropped_bytes
    _on_poller(h.poller, h.write, b"12345")
    h.async_write(b"678")
    h.write(b"90")
    _on_poller(h.poller, lambda: None)
    assert h.dropped_bytes == before + 10
    assert not goev_log.errors()


def test_server_closes_mid_read_100_clients(make_reactor, npollers, goev_log):
    """Catalogue #49: the server closes each of 100 connections after reading
    4 bytes while the client is still sending 256 KiB: every client sees EOF or
    a reset (never a hang), every handler gets on_close once, nothing logged."""
    closes = []

    class Four(goev.IOHandle):
        def on_read(self):
            d = self.read()
            return d is None or len(d) < 4 and bool(d)

        def on_close(self):
            closes.append(self)
            self.destroy()
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", Four)
    r.start()
    payload = b"z" * (256 * 1024)

    def one(results):
        with socket.create_connection(a.address, timeout=WAIT) as c:
            try:
                c.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass
            results.append(_eof_or_reset(c))
    results = []
    threads = [threading.Thread(target=one, args=(results,)) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert len(results) == 100 and all(results)
    wait_until(lambda: len(closes) == 100, what="100 on_close")
    assert len(set(map(id, closes))) == 100
    assert not goev_log.errors()


def test_water_marks_validated_and_drained_writes_elsewhere(make_reactor):
    """Catalogue #54: set_write_buffer_limits rejects low > high and negatives,
    naming the value; with 1 KiB marks and tiny socket buffers a handler pauses
    and resumes, and on_write_drained may write to *another* handler (a relay),
    whose peer receives every byte."""
    h = goev.IOHandle()
    with pytest.raises(ValueError, match="2048"):
        h.set_write_buffer_limits(1024, 2048)
    with pytest.raises(ValueError, match="-1"):
        h.set_write_buffer_limits(-1)
    with pytest.raises(TypeError):
        h.set_write_buffer_limits("1024")
    relay = {}
    total = 512 * 1024
    data = _pattern(total, 54)

    class Src(goev.IOHandle):
        def on_open(self):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            self.set_write_buffer_limits(1024, 256)
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.chunks = [data[i:i + 32768] for i in range(0, total, 32768)]
            self.drained = self.paused_seen = 0
            relay.setdefault("src", []).append(self)
            return True

        def on_read(self):
            d = self.read()
            if d is None:
                return True
            return bool(d)

        def push(self):
            self.write(b"s" * 65536)              # to its own slow peer: queues, pauses
            self.paused_seen += self._paused

        def on_write_drained(self):
            self.drained += 1
            first = relay["src"][0]
            if first is not self and self.chunks:  # relay a chunk to the *other* handler
                first.write(self.chunks.pop(0))
                if self.chunks:
                    self.push()

    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Src)
    r.start()
    c1 = socket.create_connection(a.address, timeout=WAIT)
    wait_until(lambda: len(relay.get("src", ())) == 1)
    c2 = socket.create_connection(a.address, timeout=WAIT)
    wait_until(lambda: len(relay.get("src", ())) == 2)
    first, second = relay["src"]
    n_chunks = len(second.chunks)
    got2 = []
    t = threading.Thread(target=lambda: got2.append(recv_exact(c2, 65536 * (n_chunks - 1))))
    t.start()
    _on_poller(second.poller, second.push)    # start the chain
    got = recv_exact(c1, total)
    t.join(WAIT)
    assert got == data
    assert got2 and got2[0] == b"s" * (65536 * (n_chunks - 1))
    assert second.drained == n_chunks and second.paused_seen >= 1   # it did pause
    c1.close()
    c2.close()


class _Blast(goev.IOHandle):
    """On open, writes ``plan()``'s buffers (each with one write() call)."""

    def on_open(self):
        self.closes = 0
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        for buf in type(self).plan():
            self.write(buf)
        self.close()                          # flush, then close
        return True

    def on_close(self):
        self.closes += 1
        self.destroy()


def _read_verify(sock, expect_chunks, total):
    """Read ``total`` bytes then EOF, comparing with the concatenation of
    ``expect_chunks`` (an iterable of buffers) without building it."""
    sock.settimeout(WAIT * 3)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    it = iter(expect_chunks)
    cur = memoryview(b"")
    got = 0
    while True:
        n = sock.recv_into(view)
        if not n:
            break
        got += n
        off = 0
        while off < n:
            if not len(cur):
                cur = memoryview(next(it))
            k = min(len(cur), n - off)
            if view[off:off + k] != cur[:k]:
                raise AssertionError("stream differs near byte %d" % (got - n + off))
            cur = cur[k:]
            off += k
    return got


def test_60mib_single_write(make_reactor):
    """Catalogue #56: one write() of 60 MiB (most of it queued at once) arrives
    exactly, then EOF; nothing is left queued or dropped."""
    big = _pattern(60 << 20, 56)
    H = type("B", (_Blast,), {"plan": staticmethod(lambda: [big])})
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    with socket.create_connection(a.address, timeout=WAIT) as c:
        assert _read_verify(c, [big], len(big)) == len(big)


def test_10000_writes_of_100kib(make_reactor):
    """Catalogue #56: 10 000 write() calls of 100 KiB each (1000 MiB queued
    behind a socket the client drains at its own pace; the gathered sendmsg
    path): every byte arrives, in order, then EOF."""
    chunks = [bytes([i]) * 1024 + _pattern(100 * 1024 - 1024, i) for i in range(7)]
    H = type("B", (_Blast,), {"plan": staticmethod(lambda: (chunks[i % 7] for i in range(10000)))})
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    with socket.create_connection(a.address, timeout=WAIT) as c:
        got = _read_verify(c, (chunks[i % 7] for i in range(10000)), 10000 * 100 * 1024)
    assert got == 10000 * 100 * 1024


def test_random_chunks_both_ways_tiny_sndbuf(make_reactor, npollers):
    """Catalogue #50, #56: both directions at once with SO_SNDBUF of 10 000 on
    both ends: the server streams 1 MB in seeded random-size write()s while it
    reads and checks the client's own 1 MB (random-size sendall()s), then each
    side half-closes; each side gets the other's exact bytes, then EOF."""
    seed = 2024
    rnd = random.Random(seed)
    down = _pattern(1 << 20, seed)
    up = _pattern(1 << 20, seed + 1)
    res = {}

    class Both(goev.IOHandle):
        def on_open(self):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 10000)
            self.got = bytearray()
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            r2 = random.Random(seed + 2)
            pos = 0
            while pos < len(down):
                n = r2.randint(1, 30000)
                self.write(down[pos:pos + n])
                pos += n
            self.shutdown_write()
            return True

        def on_read(self):
            d = self.read()
            if d is None:
                return True
            if d:
                self.got += d
                return True
            res["up"] = bytes(self.got)
            self.close()
            return True
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", Both)
    r.start()
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 10000)
    c.connect(a.address)

    def sender():
        pos = 0
        while pos < len(up):
            n = rnd.randint(1, 30000)
            c.sendall(up[pos:pos + n])
            pos += n
        c.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=sender)
    t.start()
    got = bytearray()
    c.settimeout(WAIT)
    rr = random.Random(seed + 3)
    while True:
        chunk = c.recv(rr.randint(1, 30000))
        if not chunk:
            break
        got += chunk
    t.join(WAIT)
    c.close()
    assert bytes(got) == down
    wait_until(lambda: "up" in res)
    assert res["up"] == up


def test_abort_variants_leave_reactor_clean(make_reactor, goev_log):
    """Catalogue #42, #57: abort twice; abort then close; close then abort; abort
    from inside on_read; abort with a full queue (the peer gets a reset, the
    queue is counted as dropped); abort from on_open; a callback that raises
    after abort.  Each handler gets on_close once, errors only for the raise,
    and afterwards the poller holds no handler and no timer but the listener's."""
    events = []

    class Ab(goev.IOHandle):
        def on_open(self):
            self.n_close = 0
            mode = type(self).modes.pop(0)
            self.mode = mode
            if mode == "in_on_open":
                self.abort()
                return True
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.schedule_timer(60000)
            if mode == "full_queue":              # reading pauses (backpressure): abort from a timer
                self.write(b"q" * (32 << 20))
                self.schedule_timer(20)
            return True

        def on_timeout(self, now_ms):
            if self.mode == "full_queue":
                self.queued_at_abort = self.pending_write_bytes
                self.abort()
            return False

        def on_read(self):
            d = self.read()
            if d is None:
                return True
            m = self.mode
            if m == "twice":
                self.abort()
                self.abort()
            elif m == "abort_close":
                self.abort()
                self.close()
            elif m == "close_abort":
                self.write(b"x" * (4 << 20))
                self.close()
                self.abort()
            elif m == "raise_after":
                self.abort()
                raise RuntimeError("after abort")
            return True

        def on_close(self):
            self.n_close += 1
            events.append(self)
            self.destroy()
    modes = ["twice", "abort_close", "close_abort", "full_queue", "raise_after", "in_on_open"]
    Ab.modes = list(modes)
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Ab)
    r.start()
    for m in modes:
        c = socket.create_connection(a.address, timeout=WAIT)
        if m not in ("in_on_open", "full_queue"):
            c.sendall(b"go")
        if m == "full_queue":                 # read nothing until the abort happened
            wait_until(lambda: any(h.mode == m for h in events), what="the abort")
            with pytest.raises(ConnectionResetError):
                recv_all(c)
        else:
            _eof_or_reset(c)
        c.close()
    wait_until(lambda: len(events) == len(modes), what="every on_close")
    assert all(h.n_close == 1 for h in events)
    full = next(h for h in events if h.mode == "full_queue")
    assert full.queued_at_abort > 0 and full.dropped_bytes == full.queued_at_abort
    p = r.pollers[0]
    _on_poller(p, lambda: None)
    assert list(p._handlers.values()) == [a]
    assert not [t for t in p._timers if t[2] is not None]
    errs = [rec.getMessage() for rec in goev_log.errors()]
    assert len(errs) == 1 and "callback" in errs[0]


def test_rst_during_connect_loop_survives(make_reactor, goev_log):
    """Catalogue #57: 50 clients connect and reset at once (SO_LINGER 0) while
    the listener has not accepted yet: the loop survives, any accepted one is
    closed (on_close once), nothing is logged, and the next client is served."""
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    r.start()
    release = _park(r.pollers[0])
    for _ in range(50):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.connect(a.address)
        c.close()
    release.set()
    assert _echo_ok(a)
    wait_until(lambda: list(r.pollers[0]._handlers.values()) == [a], what="every reset one closed")
    assert not goev_log.errors()


def test_closed_handler_releases_fd_and_references(make_reactor, npollers):
    """Catalogue #58: after a connection ends, its socket is closed (fd -1, the
    number no longer names our socket) and the reactor keeps no reference to the
    handler: a weakref dies after gc (no cycle through the poller's table, the
    closing list, timers or the inbox)."""
    H, got = _collecting(Echo)
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    refs = []
    for i in range(5):
        c, h = _connect_pair(a, got)
        c.sendall(b"abc")
        recv_exact(c, 3)
        sock = h._sock
        refs.append(weakref.ref(h))
        c.close()
        wait_until(lambda: h.fd == -1 and h.closed, what="close")
        assert sock.fileno() == -1
        del h, sock
    for p in r.pollers:
        _on_poller(p, lambda: None)
    while not got.empty():
        got.get()
    gc.collect()
    alive = [w() for w in refs if w() is not None]
    assert not alive, "handlers still referenced: %r" % (gc.get_referrers(alive[0]),)


# =============================================================================
# Address families, signals and fork (catalogue 59-60)
# =============================================================================

def test_dual_stack_listener(make_reactor):
    """Catalogue #59: "[::]:0" is dual-stack where the OS allows: both ::1 and
    127.0.0.1 reach it and echo."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    r = make_reactor(1)
    try:
        a = goev.Acceptor(r, "[::]:0", Echo)
    except OSError as e:
        pytest.skip("no IPv6 listener: %s" % e)
    r.start()
    port = a.address[1]
    for host in ("::1", "127.0.0.1"):
        try:
            c = socket.create_connection((host, port), timeout=WAIT)
        except OSError as e:
            if host == "127.0.0.1":
                pytest.skip("not dual-stack here: %s" % e)
            raise
        with c:
            c.sendall(host.encode())
            assert recv_exact(c, len(host)) == host.encode()


def test_setitimer_storm_no_eintr(make_reactor, goev_log):
    """Catalogue #60: run() on the main thread under a 1 ms SIGALRM storm (each
    signal interrupts epoll_wait/poll and the I/O calls): no InterruptedError
    escapes, echo of 2 MiB and timers work, and the loop ends normally."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals need the main thread")
    r = make_reactor(1)
    a = goev.Acceptor(r, "127.0.0.1:0", Echo)
    hits = [0]
    old = signal.signal(signal.SIGALRM, lambda *_: hits.__setitem__(0, hits[0] + 1))
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    payload = _pattern(2 << 20, 60)
    out = {}

    def client():
        try:
            with socket.create_connection(a.address, timeout=WAIT) as c:
                t = threading.Thread(target=c.sendall, args=(payload,))
                t.start()
                out["got"] = recv_exact(c, len(payload))
                t.join()
        finally:
            r.call_later(0.3, r.stop)
    ticks = []
    r.call_later(0.01, lambda: ticks.append(1))
    t = threading.Thread(target=client)
    try:
        t.start()
        r.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
        t.join(WAIT)
    assert out.get("got") == payload and ticks == [1]
    assert hits[0] > 10
    assert not goev_log.errors()


def test_wakeup_fd_left_alone(backend):
    """Catalogue #60: a reactor's life (create, run, stop) leaves the signal
    wakeup fd as it found it (goev never takes it over)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("set_wakeup_fd needs the main thread")
    a, b = socket.socketpair()
    a.setblocking(False)
    old = signal.set_wakeup_fd(a.fileno())
    try:
        r = goev.Reactor(2, backend=backend)
        r.call_later(0.01, r.stop)
        r.run()
        assert signal.set_wakeup_fd(a.fileno()) == a.fileno()
    finally:
        signal.set_wakeup_fd(old)
        a.close()
        b.close()


_FORK_CHILD_CHECK = 0


def test_fork_child_builds_its_own_reactor(make_reactor, npollers):
    """Catalogue #60: a process with a running reactor (background pollers,
    live connections) forks.  The child does not share the parent's loop: it
    builds its own Reactor and serves on it, and its use of the inherited one
    (stop()) neither touches the parent's epoll set nor its sockets; the parent
    keeps serving its existing connection and new ones during and after the
    child's life."""
    H, got = _collecting(Echo)
    r = make_reactor(npollers)
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    r.start()
    c, h = _connect_pair(a, got)
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:                              # the child: never return into pytest
        code = 1
        try:
            os.close(rd)
            r.stop(timeout=5)                 # the inherited reactor: must do no harm
            mine = goev.Reactor(1, backend=r.backend)
            ca = goev.Acceptor(mine, "127.0.0.1:0", Echo)
            mine.start()
            with socket.create_connection(ca.address, timeout=5) as cc:
                cc.sendall(b"child")
                ok = recv_exact(cc, 5, timeout=5) == b"child"
            mine.stop(timeout=5)
            os.write(wr, b"ok" if ok and mine.stopped else b"no")
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(wr)
    try:
        with os.fdopen(rd, "rb") as f:
            verdict = f.read()
        _, status = os.waitpid(pid, 0)
    finally:
        pass
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and verdict == b"ok"
    for i in range(20):                      # the parent's connection and listener still work
        c.sendall(b"p%d" % i)
        assert recv_exact(c, len(b"p%d" % i)) == b"p%d" % i
    assert _echo_ok(a)
    c.close()
