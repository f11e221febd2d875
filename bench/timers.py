#!/usr/bin/env python3
"""Timer benchmark: goev's timer heap against asyncio's loop.call_later and stdlib sched.

    python bench/timers.py [--n 100000] [--repeat 3] [--no-write]

Two workloads, each on the thread that owns the timers:

  schedule+fire    schedule N one-shot timers with delays spread over 0-50 ms
                   (the same seeded random delays for every implementation), and
                   run the loop until all N have fired;
  schedule+cancel  schedule N timers 60-120 s out and cancel every one, then let
                   the loop take one more step (so a lazy cancel pays for its
                   clean-up: goev compacts its heap, asyncio rebuilds its heap).

The number reported is the owning thread's CPU time (time.thread_time) per timer,
so the time the loop spends asleep waiting for the last deadline does not count;
wall time is shown too.  Medians of --repeat runs; ratios are goev / other
(below 1: goev is cheaper).  stdlib sched cancels in O(n) per call (list.remove
+ heapify), so its cancel workload uses at most 10,000 timers.

goev's API used: Reactor(pollers=1), start(), post(fn) (runs fn on the poller
thread), reactor.pollers[0].call_later(delay_s, fn, *args) -> Timer, Timer.cancel(),
stop().  If the current interpreter has no uvloop but bench/.venv has, the uvloop
row is measured by running this script there.
"""
import argparse
import asyncio
import json
import os
import platform
import random
import sched
import statistics
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
VENV_PY = os.path.join(BENCH, ".venv", "bin", "python")
SCHED_CANCEL_MAX = 10000


def delays_fire(n, seed=1):
    rnd = random.Random(seed)
    return [rnd.uniform(0.0, 0.05) for _ in range(n)]


def delays_cancel(n, seed=2):
    rnd = random.Random(seed)
    return [rnd.uniform(60.0, 120.0) for _ in range(n)]


# --------------------------------------------------------------------------- goev

def _import_goev():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import goev  # noqa: E402

    return goev


def goev_run(work):
    """Run work(poller, done) on goev's poller thread; done(cpu, wall) ends it."""
    goev = _import_goev()
    r = goev.Reactor(pollers=1)
    out = {}
    finished = threading.Event()

    def done(t_cpu0, t_wall0):
        out["cpu"] = time.thread_time() - t_cpu0
        out["wall"] = time.perf_counter() - t_wall0
        finished.set()

    def on_poller():
        poller = r.pollers[0] if hasattr(r, "pollers") else r
        work(poller, done)

    try:
        r.start()
        if hasattr(r, "post"):
            r.post(on_poller)
        else:  # older API: the reactor-level call_later runs on poller 0
            r.call_later(0, on_poller)
        if not finished.wait(300):
            raise RuntimeError("goev timers did not all fire within 300 s")
    finally:
        r.stop()
    return out


def goev_fire(n):
    delays = delays_fire(n)

    def work(poller, done):
        left = [n]
        call_later = poller.call_later
        t_cpu0, t_wall0 = time.thread_time(), time.perf_counter()

        def cb():
            left[0] -= 1
            if not left[0]:
                done(t_cpu0, t_wall0)

        for d in delays:
            call_later(d, cb)

    return goev_run(work)


def goev_cancel(n):
    delays = delays_cancel(n)

    def work(poller, done):
        call_later = poller.call_later
        t_cpu0, t_wall0 = time.thread_time(), time.perf_counter()

        def cb():
            pass

        timers = [call_later(d, cb) for d in delays]
        for t in timers:
            t.cancel()
        call_later(0, done, t_cpu0, t_wall0)  # one more loop step: clean-up included

    return goev_run(work)


# --------------------------------------------------------------------------- asyncio / uvloop

def _new_loop(impl):
    if impl == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def asyncio_fire(n, impl="asyncio"):
    delays = delays_fire(n)
    loop = _new_loop(impl)
    out = {}
    try:
        fut = loop.create_future()

        def start():
            left = [n]
            call_later = loop.call_later
            t_cpu0, t_wall0 = time.thread_time(), time.perf_counter()

            def cb():
                left[0] -= 1
                if not left[0]:
                    out["cpu"] = time.thread_time() - t_cpu0
                    out["wall"] = time.perf_counter() - t_wall0
                    fut.set_result(None)

            for d in delays:
                call_later(d, cb)

        loop.call_soon(start)
        loop.run_until_complete(fut)
    finally:
        loop.close()
    return out


def asyncio_cancel(n, impl="asyncio"):
    delays = delays_cancel(n)
    loop = _new_loop(impl)
    out = {}
    try:
        fut = loop.create_future()

        def start():
            call_later = loop.call_later
            t_cpu0, t_wall0 = time.thread_time(), time.perf_counter()

            def cb():
                pass

            handles = [call_later(d, cb) for d in delays]
            for h in handles:
                h.cancel()

            def done():
                out["cpu"] = time.thread_time() - t_cpu0
                out["wall"] = time.perf_counter() - t_wall0
                fut.set_result(None)

            call_later(0, done)  # one more loop step: clean-up included

        loop.call_soon(start)
        loop.run_until_complete(fut)
    finally:
        loop.close()
    return out


# --------------------------------------------------------------------------- sched

def sched_fire(n):
    delays = delays_fire(n)
    s = sched.scheduler(time.monotonic, time.sleep)
    left = [n]
    out = {}

    def cb():
        left[0] -= 1

    t_cpu0, t_wall0 = time.thread_time(), time.perf_counter()
    for d in delays:
        s.enter(d, 0, cb)
    s.run()
    out["cpu"] = time.thread_time() - t_cpu0
    out["wall"] = time.perf_counter() - t_wall0
    assert left[0] == 0
    return out


def sched_cancel(n):
    n = min(n, SCHED_CANCEL_MAX)
    delays = delays_cancel(n)
    s = sched.scheduler(time.monotonic, time.sleep)

    def cb():
        pass

    t_cpu0, t_wall0 = time.thread_time(), time.perf_counter()
    evs = [s.enter(d, 0, cb) for d in delays]
    for e in evs:
        s.cancel(e)
    s.run(blocking=False)
    return {"cpu": time.thread_time() - t_cpu0, "wall": time.perf_counter() - t_wall0, "n": n}


# --------------------------------------------------------------------------- driver

def measure(impl, n, repeat):
    """{workload: {"cpu_us": median µs per timer, "wall_us": ..., "n": timers}}"""
    fns = {
        "goev": (goev_fire, goev_cancel),
        "asyncio": (asyncio_fire, asyncio_cancel),
        "uvloop": (lambda k: asyncio_fire(k, "uvloop"), lambda k: asyncio_cancel(k, "uvloop")),
        "sched": (sched_fire, sched_cancel),
    }[impl]
    res = {}
    for name, fn in zip(("schedule+fire", "schedule+cancel"), fns):
        cpu, wall, count = [], [], n
        for _ in range(repeat):
            o = fn(n)
            count = o.get("n", n)
            cpu.append(o["cpu"] * 1e6 / count)
            wall.append(o["wall"] * 1e6 / count)
        res[name] = {"cpu_us": statistics.median(cpu), "wall_us": statistics.median(wall),
                     "cpu_min": min(cpu), "cpu_max": max(cpu), "n": count}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100000, help="timers per workload (default 100000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per workload; medians reported (default 3)")
    ap.add_argument("--impl", help="measure one implementation and print JSON (internal)")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/TIMERS.md")
    a = ap.parse_args(argv)
    if a.n < 1 or a.n > 10000000 or a.repeat < 1:
        ap.error("--n must be in [1, 10000000] and --repeat >= 1")
    if a.impl:
        print(json.dumps(measure(a.impl, a.n, a.repeat)))
        return 0

    impls, notes = [], []
    try:
        _import_goev()
        impls.append("goev")
    except Exception as e:  # goev.py missing or broken: say so, measure the rest
        notes.append("goev not measured: import failed (%s: %s)" % (type(e).__name__, e))
    impls.append("asyncio")
    try:
        import uvloop  # noqa: F401

        have_uvloop = "here"
    except ImportError:
        have_uvloop = "venv" if os.path.exists(VENV_PY) else None
    if have_uvloop:
        impls.append("uvloop")
    impls.append("sched")

    results = {}
    for impl in impls:
        print("measuring %s ..." % impl, file=sys.stderr, flush=True)
        try:
            if impl == "uvloop" and have_uvloop == "venv":
                r = subprocess.run([VENV_PY, os.path.abspath(__file__), "--impl", "uvloop", "--n", str(a.n),
                                    "--repeat", str(a.repeat)], stdout=subprocess.PIPE, timeout=600,
                                   universal_newlines=True, cwd=ROOT)
                if r.returncode != 0:
                    raise RuntimeError("uvloop run in bench/.venv failed (rc %d)" % r.returncode)
                results[impl] = json.loads(r.stdout.strip().splitlines()[-1])
            else:
                results[impl] = measure(impl, a.n, a.repeat)
        except Exception as e:
            notes.append("%s failed: %s: %s" % (impl, type(e).__name__, e))

    lines = ["| workload | implementation | timers | CPU µs/timer (median) | min–max | wall µs/timer | goev ÷ this (CPU) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for w in ("schedule+fire", "schedule+cancel"):
        g = results.get("goev", {}).get(w)
        for impl in impls:
            r = results.get(impl, {}).get(w)
            if not r:
                continue
            ratio = "%.2f" % (g["cpu_us"] / r["cpu_us"]) if g and r["cpu_us"] else "-"
            lines.append("| %s | %s | %d | %.2f | %.2f–%.2f | %.2f | %s |" % (
                w, impl, r["n"], r["cpu_us"], r["cpu_min"], r["cpu_max"], r["wall_us"], ratio))
    table = "\n".join(lines)
    head = ("Timers: %s %s on %s, Linux %s; %d timers per workload, median of %d; "
            "generated by `python bench/timers.py%s` on %s." % (
                platform.python_implementation(), platform.python_version(), platform.machine(),
                platform.release(), a.n, a.repeat,
                "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv),
                time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    print(head)
    print()
    print(table)
    for n in notes:
        print("note: " + n)
    if not a.no_write:
        doc = ["# goev.py timer benchmark", "", head, "",
               "schedule+fire: N one-shot timers, delays spread over 0–50 ms, run until all fired. "
               "schedule+cancel: N timers 60–120 s out, all cancelled, then one more loop step "
               "(clean-up of lazily cancelled entries included). CPU time of the thread that owns "
               "the timers, per timer; `goev ÷ this` below 1 means goev is cheaper. stdlib sched "
               "cancels in O(n) per call, so its cancel workload uses at most %d timers." % SCHED_CANCEL_MAX,
               "", table, ""]
        doc += ["- " + n for n in notes]
        with open(os.path.join(BENCH, "TIMERS.md"), "w") as f:
            f.write("\n".join(doc) + "\n")
        print("wrote bench/TIMERS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
