# =============================================================================
# Timers: the 4-ary heap, Timer, call_later, schedule_timer (issue 3)
# =============================================================================
# The heap functions and the poller's timer code are checked against simple
# references (a sorted list; a dict of live timers) in seeded randomised model
# tests; the semantics (order, FIFO ties, never early, period without drift,
# skip-not-burst, cancel/reschedule in callbacks, release of arguments, huge
# delays, closed handlers, bad input, cross-thread use) through real reactors
# on both backends.  No timing asserts beyond generous timeouts: "never early"
# compares time.monotonic() read inside the callback with the deadline.

from test_goev import *  # noqa: F401,F403
from test_goev import WAIT, backend, hygiene, make_reactor, goev_log, wait_until  # noqa: F401

import gc
import math
import random
import socket
import threading
import time
import weakref

import pytest

import goev


def _assert_4ary_heap(heap):
    for i in range(1, len(heap)):
        assert not heap[i] < heap[(i - 1) >> 2], "heap property broken at %d" % i


def _on_poller(r, fn, *args, index=0, timeout=WAIT):
    """Run fn(*args) on poller ``index``'s thread and return its result."""
    out = []
    done = threading.Event()

    def run():
        try:
            out.append(("ok", fn(*args)))
        except BaseException as e:          # hand it to the test thread
            out.append(("err", e))
        done.set()
    r.pollers[index]._post(run)
    assert done.wait(timeout), "poller %d did not run a posted call" % index
    kind, val = out[0]
    if kind == "err":
        raise val
    return val


def _dead_entries(p):
    return sum(1 for t in p._timers if t.cancelled)


# -- the heap functions alone -------------------------------------------------------

def test_heap_functions_model_random():
    """_heap_push/_heap_pop/_heapify against a sorted list: 6000 seeded random
    operations, many equal deadlines (the seq breaks ties), heapify of arbitrary
    lists and of filtered heaps (what compaction does)."""
    rnd = random.Random(31337)
    heap, ref, seq = [], [], 0
    for step in range(6000):
        op = rnd.random()
        if op < 0.5 or not heap:
            seq += 1
            item = (rnd.randint(0, 50) / 4.0, seq)     # few distinct deadlines: many ties
            goev._heap_push(heap, item)
            ref.append(item)
        elif op < 0.85:
            got = goev._heap_pop(heap)
            ref.sort()
            assert got == ref.pop(0)
        elif op < 0.95:                                  # compaction: drop some, re-heapify
            keep = [e for e in heap if rnd.random() < 0.7]
            heap[:] = keep
            goev._heapify(heap)
            ref = list(keep)
        else:                                            # heapify an arbitrary list
            heap = [(rnd.randint(0, 50) / 4.0, seq + k) for k in range(1, rnd.randint(0, 300))]
            seq += len(heap) + 1
            rnd.shuffle(heap)
            ref = list(heap)
            goev._heapify(heap)
        if step % 25 == 0:
            _assert_4ary_heap(heap)
            assert sorted(heap) == sorted(ref)
    out = [goev._heap_pop(heap) for _ in range(len(heap))]
    assert out == sorted(ref)
    for n in range(0, 70):                               # every small size, all orders
        items = [(float(rnd.randint(0, 5)), k) for k in range(n)]
        h = list(items)
        goev._heapify(h)
        _assert_4ary_heap(h)
        assert [goev._heap_pop(h) for _ in range(n)] == sorted(items)


# -- the poller's timer code, driven directly ---------------------------------------

def test_poller_timers_model_random():
    """A never-started reactor's poller, driven by hand with a synthetic clock:
    4000 seeded random schedule / periodic / burst / cancel / advance / compact
    operations, callbacks that cancel other timers and schedule new ones (also in
    the past: they must wait for the next pass), checked against a reference: the
    firing order ((deadline, FIFO)) of every pass; every 20 steps the live set and
    deadlines, periodic deadlines on their grid, the dead-entry count and the heap
    property.  Bursts take both sides of the split-or-pop choice.  No poll()
    happens, so the backend does not matter.  Exact binary fractions keep the
    float maths exact; the synthetic clock runs far ahead of time.monotonic() (a
    periodic re-arm also consults the real clock, which must never be the later)."""
    r = goev.Reactor(1)              # never started: this thread may drive the heap
    try:
        _poller_model(r.pollers[0])
    finally:
        r.stop()


def _poller_model(p):
    rnd = random.Random(4242)
    Q = 0.125
    now = [2.0 ** math.ceil(math.log2(time.monotonic() + 10 ** 6))]
    fired, timers, ref, plan = [], {}, {}, {}   # ref: the *live* timers only
    ids = {}                          # Timer -> id (Timers hash by identity)
    next_id = [0]
    ref_seq = [0]                     # the reference's FIFO counter

    def callback(i):
        fired.append(i)
        target, spawn, keep = plan[i]
        if target is not None:
            timers[target].cancel()
        if spawn is not None:
            schedule(now[0] + spawn, 0.0)
        return keep

    def schedule(when, interval):
        i = next_id[0]
        next_id[0] += 1
        target = rnd.randrange(i + 1) if rnd.random() < 0.1 else None
        spawn = Q * rnd.randint(-4, 10) if rnd.random() < 0.1 else None
        plan[i] = (target, spawn, rnd.random() < 0.9)
        t = p._call_at(when, interval, callback, (i,))
        timers[i] = t
        ids[t] = i
        return i

    def ref_add(i, when, interval):
        ref_seq[0] += 1
        ref[i] = {"when": when, "seq": ref_seq[0], "iv": interval, "first": when}

    def ref_pass(t_now, first_spawn_id):
        """What one _run_timers(t_now) must fire, applying the callbacks' effects."""
        expected = []
        spawned = first_spawn_id
        due = sorted((e["when"], e["seq"], i) for i, e in ref.items() if e["when"] <= t_now)
        for _, _, i in due:
            e = ref.get(i)
            if e is None:
                continue                      # cancelled by an earlier callback of this pass
            expected.append(i)
            if not e["iv"]:
                del ref[i]
            target, spawn, keep = plan[i]
            ref.pop(target, None)
            if spawn is not None:
                ref_add(spawned, t_now + spawn, 0.0)
                spawned += 1
            if e["iv"] and i in ref:
                if not keep:
                    del ref[i]
                    continue
                k = round((e["when"] - e["first"]) / e["iv"]) + 1
                while e["first"] + k * e["iv"] <= t_now:   # skip missed periods
                    k += 1
                ref_seq[0] += 1
                e["when"], e["seq"] = e["first"] + k * e["iv"], ref_seq[0]
        return expected

    bursts = 0
    n_fired = 0
    for step in range(4000):
        op = rnd.random()
        if op < 0.35:
            when = now[0] + Q * rnd.randint(-2, 40)
            ref_add(schedule(when, 0.0), when, 0.0)
        elif op < 0.40:
            when, iv = now[0] + Q * rnd.randint(0, 20), Q * rnd.randint(1, 16)
            ref_add(schedule(when, iv), when, iv)
        elif op < 0.41:                                   # a burst that will be due together
            bursts += 1
            for _ in range(rnd.randint(100, 400)):
                when = now[0] + Q * rnd.randint(0, 8)
                ref_add(schedule(when, 0.0), when, 0.0)
        elif op < 0.413:                                  # a big far-off crowd: bursts are a small share
            for _ in range(1000):
                when = now[0] + Q * rnd.randint(2000, 6000)
                ref_add(schedule(when, 0.0), when, 0.0)
        elif op < 0.62:
            live = list(ref)
            if live:
                i = rnd.choice(live)
                timers[i].cancel()
                del ref[i]
            else:                                         # cancel of a finished timer: a no-op
                if timers:
                    timers[rnd.choice(list(timers))].cancel()
        elif op < 0.95:
            now[0] += Q * (rnd.randint(0, 30) if rnd.random() < 0.97 else rnd.randint(100, 2000))
            del fired[:]
            expected = ref_pass(now[0], next_id[0])
            heap = p._timers
            if heap and heap[0][0] <= now[0]:             # what the loop does
                p._run_timers(now[0])
            assert fired == expected, "step %d" % step
            n_fired += len(fired)
        else:
            p._timeout()                                  # compaction and dead heads
        # -- invariants after every operation
        heap = p._timers
        if step % 10 == 0 or op >= 0.95:
            _assert_4ary_heap(heap)
        if step % 20 and op < 0.95:
            continue                                      # (the full comparison is O(n): not every step)
        live_real = {ids[t]: t.when for t in heap if not t.cancelled}
        live_ref = {i: e["when"] for i, e in ref.items()}
        assert live_real == live_ref, "step %d" % step
        for i, e in ref.items():
            if e["iv"]:
                k = (e["when"] - e["first"]) / e["iv"]
                assert k == int(k), "periodic deadline off its grid"
        assert p._timers_dead == _dead_entries(p), "dead-entry count drifted at step %d" % step
    assert bursts >= 20 and next_id[0] > 5000 and n_fired > 4000


def test_burst_path_keeps_order_and_the_rest(make_reactor):
    """Most of a big heap due at once takes the split path; the due ones fire in
    (deadline, FIFO) order, the rest stay a valid heap and fire later."""
    r = make_reactor(1)
    p = r.pollers[0]
    rnd = random.Random(7)
    base = float(2 ** 20)
    order = []
    whens = {}
    for i in range(5000):
        w = base + rnd.randint(0, 400) / 8.0
        whens[i] = w
        p._call_at(w, 0.0, order.append, (i,))
    cut = base + 30.0                                   # ~60% due
    p._run_timers(cut)
    due = sorted((w, i) for i, w in whens.items() if w <= cut)
    assert order == [i for _, i in due]
    _assert_4ary_heap(p._timers)
    del order[:]
    p._run_timers(base + 1000.0)
    assert order == [i for _, i in sorted((w, i) for i, w in whens.items() if w > cut)]
    assert not p._timers


# -- through running reactors ---------------------------------------------------------

def test_order_and_fifo_ties(make_reactor):
    """Random delays fire in deadline order; equal deadlines in scheduling order."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    order = []
    done = threading.Event()
    n = 2000

    def record(i):
        order.append(i)
        if len(order) == n:
            done.set()

    def schedule():
        rnd = random.Random(99)
        base = time.monotonic() + 0.05
        whens = []
        for i in range(n):
            if i % 2:                                   # exact ties: same deadline
                w = base + rnd.randint(0, 20) / 1000.0
                p._call_at(w, 0.0, record, (i,))
            else:
                w = p.call_later(rnd.uniform(0, 0.02), record, i).when
            whens.append(w)
        return whens
    whens = _on_poller(r, schedule)
    assert done.wait(WAIT)
    assert order == sorted(range(n), key=lambda i: (whens[i], i))


def test_never_early(make_reactor):
    """A timer never runs before its deadline: time.monotonic() read in the
    callback is >= Timer.when and >= scheduling time + delay; so for
    handler timers (on_timeout's now_ms is a floor of the pass's clock)."""
    r = make_reactor(1)
    r.start()
    results = []
    done = threading.Event()
    delays = [0.0, 0.0005, 0.001, 0.0015, 0.003, 0.007, 0.01, 0.02, 0.05] * 4

    def cb(t0, delay, box):
        results.append((time.monotonic(), t0, delay, box[0].when))
        if len(results) == len(delays):
            done.set()

    def schedule():
        for d in delays:
            box = []
            box.append(r.call_later(d, cb, time.monotonic(), d, box))
    _on_poller(r, schedule)
    assert done.wait(WAIT)
    for fired_at, t0, delay, when in results:
        assert fired_at >= when >= t0 + delay - 1e-9

    # handler timers, from on_open on the poller thread
    seen = []
    hdone = threading.Event()

    class H(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.k = 0
            self.t0 = time.monotonic()
            self.timer = self.schedule_timer(3)
            return True

        def on_timeout(self, now_ms):
            seen.append((time.monotonic(), self.t0, self.timer.when, now_ms))
            self.k += 1
            if self.k == 5:
                hdone.set()
                return False
            self.t0 = time.monotonic()
            self.timer = self.schedule_timer([1, 0, 2, 4][self.k - 1])
            return True
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    with socket.create_connection(a.address):
        assert hdone.wait(WAIT)
    assert len(seen) == 5
    for fired_at, t0, when, now_ms in seen:
        assert fired_at >= when >= t0
        assert isinstance(now_ms, int) and int(when * 1000) <= now_ms <= fired_at * 1000


class _Periodic(goev.IOHandle):
    """schedule_timer(interval, interval) from on_open; records every firing."""
    interval_ms = 10
    stop_after = 50
    log = None              # list of (monotonic in callback, deadline, now_ms)
    done = None

    def on_open(self):
        self.reactor.add_handler(self, self.fd, goev.EV_IN)
        self.timer = self.schedule_timer(self.interval_ms, self.interval_ms)
        type(self).instance = self
        return True

    def on_timeout(self, now_ms):
        self.log.append((time.monotonic(), self.timer.when, now_ms))
        if len(self.log) >= self.stop_after:
            self.done.set()
            return False
        return True


def test_period_without_drift(make_reactor):
    """50 periods: every deadline is exactly first + k*interval (computed, not
    accumulated), k strictly increasing, each firing at or after its deadline;
    returning False stops the timer (and releases it)."""
    r = make_reactor(1)
    r.start()

    class P(_Periodic):
        log = []
        done = threading.Event()
    a = goev.Acceptor(r, "127.0.0.1:0", P)
    with socket.create_connection(a.address):
        assert P.done.wait(WAIT)
        h = P.instance
        assert _on_poller(r, lambda: h.timer.cancelled)      # False stopped it
        assert _on_poller(r, lambda: not any(not t.cancelled for t in r.pollers[0]._timers))
    iv = P.interval_ms / 1000.0
    first = P.log[0][1]
    ks = []
    for fired_at, when, now_ms in P.log:
        k = round((when - first) / iv)
        assert when == first + k * iv, "deadline drifted off the grid"
        assert fired_at >= when
        assert now_ms >= int(when * 1000)
        ks.append(k)
    assert len(ks) == 50 and ks[0] == 0
    assert all(b > a for a, b in zip(ks, ks[1:]))     # under load periods may be skipped, never repeated


def test_skip_missed_periods_after_a_stall(make_reactor):
    """The poller thread blocked for 20+ periods: afterwards the timer fires once
    for the missed time (the overdue deadline), not once per missed period, and
    its next deadline is on the grid after the stall."""
    r = make_reactor(1)
    r.start()

    class P(_Periodic):
        log = []
        done = threading.Event()
        stop_after = 10**9
    a = goev.Acceptor(r, "127.0.0.1:0", P)
    stall = {}
    with socket.create_connection(a.address):
        wait_until(lambda: len(P.log) >= 3, what="3 periods")

        def block():
            stall["begin"] = time.monotonic()
            time.sleep(0.25)                  # 25 periods of 10 ms: the stall under test
            stall["end"] = time.monotonic()
        r.pollers[0]._post(block)
        wait_until(lambda: "end" in stall and sum(1 for f, _, _ in list(P.log) if f > stall["end"]) >= 3,
                   what="3 firings after the stall")
        _on_poller(r, P.instance.cancel_timer)
    after = [(f, w) for f, w, _ in P.log if f > stall["end"]]
    overdue = [w for f, w in after if w <= stall["end"]]
    assert len(overdue) <= 1, "missed periods fired as a burst: %d overdue firings" % len(overdue)
    iv = P.interval_ms / 1000.0
    first = P.log[0][1]
    for f, w in after:
        k = round((w - first) / iv)
        assert w == first + k * iv
    assert any(w > stall["end"] for f, w in after)


def test_reschedule_and_cancel_inside_callbacks(make_reactor):
    """on_timeout may reschedule (a chain of one-shots with changing delays),
    replace a periodic timer, and cancel its own timer and return True; a
    call_later callback may cancel another timer due in the same pass (which
    then does not run) and schedule a delay-0 timer (which runs in a later pass)."""
    r = make_reactor(1)
    r.start()
    events = []
    finished = threading.Event()

    class H(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.n = 0
            self.schedule_timer(1, 1)                 # periodic, replaced below
            return True

        def on_timeout(self, now_ms):
            self.n += 1
            events.append(("h", self.n))
            if self.n < 5:
                self.schedule_timer(self.n)          # replace: one-shot chain
                return True
            if self.n == 5:
                self.schedule_timer(2, 2)            # back to periodic
                return True
            if self.n == 8:
                self.cancel_timer()                   # cancel itself, yet return True
                self.reactor.pollers[0].call_later(0.03, finished.set)
                return True
            return True
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    with socket.create_connection(a.address):
        assert finished.wait(WAIT)
    assert [e for e in events if e[0] == "h"] == [("h", i) for i in range(1, 9)]

    # same pass: A cancels B; A schedules C with delay 0 (must not run in A's pass)
    p = r.pollers[0]
    log = []
    done = threading.Event()
    box = {}

    def a_cb():
        log.append(("A",))
        box["B"].cancel()
        box["C"] = p.call_later(0, c_cb)

    def b_cb():
        log.append(("B",))

    def c_cb():
        log.append(("C",))
        done.set()

    def schedule():
        box["A"] = p.call_later(0, a_cb)
        box["B"] = p.call_later(0, b_cb)
        box["D"] = p.call_later(0, log.append, ("D",))
    _on_poller(r, schedule)
    assert done.wait(WAIT)
    names = [e[0] for e in log]
    assert names == ["A", "D", "C"], names               # B never ran; C after D (a later pass)
    assert box["B"].cancelled and box["C"].cancelled
    assert _on_poller(r, lambda: p._timers_dead == _dead_entries(p))


def test_same_pass_timers_share_now_ms(make_reactor):
    """now_ms is the pass's clock, read once: handler timers due in one pass
    receive the same value, and it equals poller.now_ms."""
    r = make_reactor(1)
    r.start()
    got = []
    done = threading.Event()
    hs = []

    class H(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            hs.append(self)
            return True

        def on_timeout(self, now_ms):
            got.append((now_ms, self.poller.now_ms))
            if len(got) == 3:
                done.set()
            return False
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    cs = [socket.create_connection(a.address) for _ in range(3)]
    try:
        wait_until(lambda: len(hs) == 3, what="3 handlers")
        _on_poller(r, lambda: [h.schedule_timer(0) for h in hs])   # one callback: due together
        assert done.wait(WAIT)
    finally:
        for c in cs:
            c.close()
    assert len({g[0] for g in got}) == 1 and all(a == b for a, b in got)


def test_cancel_releases_callback_and_args(make_reactor):
    """A cancelled timer drops fn and args at once (before start, from another
    thread while running, on the poller thread); a fired one-shot drops them too;
    a cancelled timer never runs."""
    r = make_reactor(1)

    class Obj:
        pass
    ran = []

    def make():
        o = Obj()
        return o, weakref.ref(o)

    o1, w1 = make()
    t1 = r.call_later(0.01, ran.append, o1)            # before start
    del o1
    t1.cancel()
    gc.collect()
    assert w1() is None and t1.cancelled
    r.start()
    o2, w2 = make()
    t2 = r.call_later(0.02, ran.append, o2)            # from this (non-poller) thread
    del o2
    t2.cancel()
    gc.collect()
    assert w2() is None
    o3, w3 = make()

    def on_thread(o):
        t = r.pollers[0].call_later(0.01, ran.append, o)
        t.cancel()
        return t
    t3 = _on_poller(r, on_thread, o3)
    del o3
    gc.collect()
    assert w3() is None and t3.cancelled
    o4, w4 = make()
    fired = threading.Event()
    t4 = r.call_later(0, lambda o: fired.set(), o4)
    del o4
    assert fired.wait(WAIT)
    _on_poller(r, lambda: None)                       # the firing pass has finished
    gc.collect()
    assert w4() is None and t4.cancelled
    # the cancelled ones never run: a later deadline fires after theirs
    later = threading.Event()
    r.call_later(0.1, later.set)
    assert later.wait(WAIT)
    assert ran == []


def test_cross_thread_cancel_bookkeeping(make_reactor):
    """Timers scheduled and cancelled from several other threads while the poller
    runs: none runs, the dead-entry count matches the heap, compaction frees them
    (also when it runs while cancelled timers are still on their way in)."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    ran = []
    keep = r.call_later(100, ran.append, "keep")     # a live head: dead entries stay behind it

    def worker(seed):
        rnd = random.Random(seed)
        ts = [r.call_later(rnd.uniform(200, 500), ran.append, seed) for _ in range(500)]
        for t in ts:
            t.cancel()
    ths = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    _on_poller(r, lambda: None)                       # posts are FIFO: all applied now
    # every posted push has landed: the count is exact (nothing fired, so no race)
    assert _on_poller(r, lambda: p._timers_dead == _dead_entries(p))
    # compaction (over half of the heap dead) leaves the live one
    wait_until(lambda: _on_poller(r, lambda: len(p._timers)) == 1, what="compaction")
    assert _on_poller(r, lambda: p._timers_dead) >= 0
    assert ran == [] and not keep.cancelled
    keep.cancel()


def test_compaction_while_cancelled_timers_are_on_their_way(make_reactor):
    """Timers scheduled and cancelled from another thread while the poller is
    busy: their cancels are counted before their (posted) pushes land, and a
    compaction in between must not forget them (regression: the count was
    reset to 0 there, and the dead entries arriving next were never counted)."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    keep = r.call_later(100, lambda: None)
    _on_poller(r, lambda: None)
    release = threading.Event()
    busy = threading.Event()

    def block():
        busy.set()
        release.wait(WAIT)
    p._post(block)
    assert busy.wait(WAIT)
    ts = [r.call_later(200 + i, lambda: None) for i in range(500)]   # posted behind block()
    for t in ts:
        t.cancel()
    release.set()
    _on_poller(r, lambda: None)            # every push has landed (and a compaction ran first)
    assert _on_poller(r, lambda: p._timers_dead == _dead_entries(p))
    wait_until(lambda: _on_poller(r, lambda: len(p._timers)) == 1, what="compaction")
    assert _on_poller(r, lambda: p._timers_dead) == 0
    keep.cancel()


def test_churn_does_not_grow_the_heap(make_reactor):
    """Schedule/cancel churn on the poller thread (one live timer ahead of them, 50 passes
    of 1000 schedule+cancel): compaction keeps the heap near the live size."""
    r = make_reactor(1)
    r.start()
    p = r.pollers[0]
    keep = r.call_later(30, lambda: None)            # a live head: dead entries stay behind it
    sizes = []

    def churn():
        for _ in range(1000):
            p.call_later(60, lambda: None).cancel()
        sizes.append(len(p._timers))
    for _ in range(50):
        _on_poller(r, churn)
    assert max(sizes) <= 2100, sizes
    assert _on_poller(r, lambda: len(p._timers)) <= 1001
    keep.cancel()


def test_huge_delays_never_fire_nor_wake(make_reactor):
    """call_later(inf), call_later(1e9), call_later(10**400) and
    schedule_timer(1e12 ms) are accepted, never run, do not make the poll
    timeout overflow, and do not wake the loop; stop() is not delayed."""
    r = make_reactor(1)
    p = r.pollers[0]
    passes = []
    real_timeout = p._timeout

    def counting_timeout():
        v = real_timeout()
        passes.append(v)
        return v
    p._timeout = counting_timeout               # the loop calls self._timeout() once per pass
    ran = []
    r.start()
    t_inf = _on_poller(r, lambda: p.call_later(math.inf, ran.append, "inf"))
    t_big_int = r.call_later(10 ** 400, ran.append, "int")    # beyond float range: never
    _on_poller(r, lambda: None)
    wait_until(lambda: passes[-1] == -1.0, what="an infinite poll timeout")   # only "never" timers
    t_1e9 = _on_poller(r, lambda: p.call_later(1e9, ran.append, "1e9"))
    wait_until(lambda: passes[-1] == goev._MAX_POLL_TIMEOUT, what="the clamped timeout")   # no overflow
    n = len(passes)
    time.sleep(0.3)                              # a quiet window: nothing may wake the loop
    assert len(passes) == n, "the loop woke %d times for far timers" % (len(passes) - n)
    assert not (t_inf.cancelled or t_1e9.cancelled or t_big_int.cancelled) and ran == []
    t0 = time.monotonic()
    r.stop(timeout=WAIT)
    assert r.stopped and time.monotonic() - t0 < WAIT / 2
    assert ran == [] and t_inf.cancelled and t_1e9.cancelled   # released at stop

    # the handler API with a huge delay
    r2 = make_reactor(1)
    r2.start()
    seen = []

    class H(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.schedule_timer(1e12)
            seen.append(self)
            return True

        def on_timeout(self, now_ms):
            seen.append("fired")
            return False
    a = goev.Acceptor(r2, "127.0.0.1:0", H)
    with socket.create_connection(a.address):
        wait_until(lambda: seen, what="handler")
        assert seen[0]._timer.when > time.monotonic() + 1e8
        _on_poller(r2, lambda: None)
    assert "fired" not in seen


def test_100k_timers_fire_in_order(make_reactor):
    """100,000 timers (scheduled before start, from this thread) all fire, once
    each, in (deadline, FIFO) order."""
    r = make_reactor(1)
    n = 100000
    rnd = random.Random(5)
    order = []
    done = threading.Event()

    def record(i):
        order.append(i)
        if len(order) == n:
            done.set()
    ts = [r.call_later(rnd.uniform(0, 0.05), record, i) for i in range(n)]
    whens = [t.when for t in ts]
    r.start()
    assert done.wait(WAIT * 3)
    assert order == sorted(range(n), key=lambda i: (whens[i], i))
    assert all(t.cancelled for t in ts)           # one-shots are spent
    assert _on_poller(r, lambda: len(r.pollers[0]._timers)) == 0


def test_closed_handler_timers_are_cancelled(make_reactor):
    """Closing a handler cancels its timer (it never fires again); schedule_timer
    on a closed handler raises RuntimeError naming it."""
    r = make_reactor(1)
    r.start()
    fired = []
    hs = []

    class H(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.timer = self.schedule_timer(20, 20)
            hs.append(self)
            return True

        def on_timeout(self, now_ms):
            fired.append(self.closed)
            return True
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    with socket.create_connection(a.address) as c:
        wait_until(lambda: fired, what="a first firing")
        h = hs[0]
        _on_poller(r, h.close)
        assert h.timer.cancelled
        n = len(fired)
        with pytest.raises(RuntimeError, match="not registered"):
            _on_poller(r, h.schedule_timer, 10)
        # peer sees EOF; a later timer on the same poller fires after the old deadline
        c.settimeout(WAIT)
        assert c.recv(10) == b""
        ev = threading.Event()
        r.call_later(0.1, ev.set)
        assert ev.wait(WAIT)
    assert len(fired) == n and not any(fired)


@pytest.mark.parametrize("bad, exc, text", [
    (-1, ValueError, "-1"), (-0.001, ValueError, "-0.001"), (float("nan"), ValueError, "nan"),
    ("1", TypeError, "'1'"), (None, TypeError, "None"), (True, TypeError, "True"),
    (b"\x01", TypeError, "b'\\\\x01'"),
])
def test_bad_delays_name_the_value(make_reactor, bad, exc, text):
    r = make_reactor(1)
    with pytest.raises(exc, match="delay_s.*" + text):
        r.call_later(bad, lambda: None)
    with pytest.raises(exc, match="delay_s.*" + text):
        r.pollers[0].call_later(bad, lambda: None)
    assert not r.pollers[0]._timers


def test_bad_callables_and_handler_timer_args(make_reactor):
    r = make_reactor(1)
    for fn in (5, None, "f"):
        with pytest.raises(TypeError, match="callable.*%s" % repr(fn).replace("'", ".")):
            r.call_later(1, fn)
    assert not r.pollers[0]._timers
    errors = []
    done = threading.Event()

    class H(goev.IOHandle):
        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            for args in ((-5,), (float("nan"),), ("10",), (10, -1), (10, math.inf), (10, float("nan"))):
                try:
                    self.schedule_timer(*args)
                    errors.append(("accepted", args))
                except (ValueError, TypeError) as e:
                    errors.append((type(e).__name__, str(e)))
            done.set()
            return True
    r.start()
    a = goev.Acceptor(r, "127.0.0.1:0", H)
    with socket.create_connection(a.address):
        assert done.wait(WAIT)
    assert [e[0] for e in errors] == ["ValueError", "ValueError", "TypeError", "ValueError",
                                      "ValueError", "ValueError"], errors
    assert "delay_ms" in errors[0][1] and "-5" in errors[0][1]
    assert "nan" in errors[1][1] and "'10'" in errors[2][1]
    assert "interval_ms" in errors[3][1] and "-1" in errors[3][1]
    assert "inf" in errors[4][1] and "nan" in errors[5][1]
    unregistered = goev.IOHandle()
    with pytest.raises(RuntimeError, match="not registered"):
        unregistered.schedule_timer(10)


def test_call_later_right_after_start(make_reactor):
    """Reactor.call_later from another thread just after start() lands on poller 0
    and fires (it is posted, never pushed into a heap the poller is reading)."""
    for _ in range(20):
        r = make_reactor(1)
        r.start()
        ev = threading.Event()
        where = []
        r.call_later(0, lambda: (where.append(threading.current_thread().name), ev.set()))
        assert ev.wait(WAIT)
        assert where == ["goev-poller-0"]
        r.stop(timeout=WAIT)


def test_reactor_call_later_lands_on_poller_0(make_reactor):
    r = make_reactor(3)
    r.start()
    got = []
    done = threading.Event()

    def cb():
        got.append(threading.get_ident() == r.pollers[0]._tid)
        done.set()
    t = _on_poller(r, lambda: r.call_later(0.001, cb), index=2)   # from another poller's thread
    assert done.wait(WAIT) and got == [True] and t.cancelled


def test_exception_in_callback_is_logged_and_others_run(make_reactor, goev_log):
    r = make_reactor(1)
    r.start()
    done = threading.Event()
    order = []

    def boom():
        order.append("boom")
        raise RuntimeError("timer boom")

    def schedule():
        p = r.pollers[0]
        p.call_later(0, boom)
        p.call_later(0, order.append, "after")
        p.call_later(0.001, done.set)
    _on_poller(r, schedule)
    assert done.wait(WAIT)
    assert order == ["boom", "after"]
    assert any("timer boom" in str(rec.exc_info[1]) for rec in goev_log.errors() if rec.exc_info)


def test_system_exit_in_a_timer_loses_no_timer(make_reactor):
    """SystemExit from a timer callback leaves run(): the other timers due in that
    pass are kept (not dropped), a periodic one stays armed, and run() resumes."""
    r = make_reactor(1)
    p = r.pollers[0]
    ran = []
    base = time.monotonic()
    ticks = []

    def tick():
        ticks.append(1)
        return True

    def raiser():
        ran.append("exit")
        raise SystemExit(3)

    def stopper():
        ran.append("c2")
        r.stop()
    p._call_at(base, 0.0, ran.append, ("a",))
    p._call_at(base, 0.0, raiser, ())
    p._call_at(base, 0.0, ran.append, ("c",))
    periodic = p._call_at(base, 0.005, tick, ())
    with pytest.raises(SystemExit):
        r.run()
    assert ran == ["a", "exit"]
    assert not periodic.cancelled
    p._call_at(base, 0.0, stopper, ())                  # due now, but after "c" (FIFO)
    r.run()
    assert ran == ["a", "exit", "c", "c2"]
    assert r.stopped and periodic.cancelled            # released at stop
