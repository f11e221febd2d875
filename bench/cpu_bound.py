#!/usr/bin/env python3
"""A CPU-bound handler: do pollers scale on free-threaded Python, and workers under the GIL?

    python bench/cpu_bound.py [--seconds 5] [--runs 3] [--work-us 100] [--no-write]

Each 64 B message costs the handler about ``--work-us`` microseconds of pure
Python (a loop over local integers, calibrated once on the GIL interpreter
and then the same loop count everywhere, so a slower interpreter pays more
per message), then it is echoed.  ``bench/.build/loadgen echo`` keeps 50
connections with one message in flight each (bench/README.md); a probe
connection in this process sends one message every 5 ms and records the
round trips, whose p50/p99 are the latency columns (the load generator
itself reports only counts).  The configurations, in one run, interleaved
run by run so that a burst of foreign load hits them all alike:

    3.11 pollers=1 / pollers=2     serve(pollers=N) under the GIL
    3.11 workers=2                 serve(workers=2): two processes
    3.13t pollers=1 / pollers=2    the free-threaded build, PYTHON_GIL=0

The ratios -- 2 pollers over 1 on each interpreter, workers=2 over one
poller -- are the point; the absolute rates depend on the machine and its
load.  Loopback only; every process is stopped by its pid; each measurement
lasts ``--seconds``.  Results: printed, and (unless --no-write) the section
"CPU-bound handlers" of bench/RESULTS.md is replaced.
"""
import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
LOADGEN = os.path.join(BENCH, ".build", "loadgen")
RESULTS = os.path.join(BENCH, "RESULTS.md")
HOST = "127.0.0.1"
sys.path.insert(0, BENCH)
import run as harness   # noqa: E402  (bench/run.py: free_port, reap)
FT_PYTHON = os.path.expanduser("~/.cache/goev-ci/python3.13t/bin/python3.13t")
CONNS = 50
SIZE = 64


def spin(n):
    """The handler's work: ``n`` iterations of integer arithmetic on locals only
    (nothing shared between threads, so free-threaded pollers do not contend)."""
    x = 0
    for i in range(n):
        x = (x + i * 7) & 0xFFFF
    return x


def calibrate(work_us):
    """Loop count for ``work_us`` microseconds on this interpreter (best of 5)."""
    n = 20000
    best = min(_timed(n) for _ in range(5))
    return max(1, int(n * work_us / (best * 1e6)))


def _timed(n):
    t = time.perf_counter()
    spin(n)
    return time.perf_counter() - t


# -- the server (a child process) ------------------------------------------------

def serve_main(port, pollers, workers, loops):
    sys.path.insert(0, ROOT)
    import goev

    class Work(goev.IOHandle):
        def on_open(self):
            self.acc = 0
            super().on_open()

        def on_data(self, data):
            self.acc += len(data)
            k, self.acc = divmod(self.acc, SIZE)
            for _ in range(k):
                spin(loops)
            self.write(data)

    gil = getattr(sys, "_is_gil_enabled", lambda: True)()

    def ready(addr):
        print("READY gil=%d" % gil, flush=True)
    return goev.serve("%s:%d" % (HOST, port), Work, pollers=pollers, workers=workers, ready=ready)


# -- the driver -------------------------------------------------------------------

def read_line(f, timeout):
    """One line of a child's stdout within ``timeout`` seconds (select + os.read)."""
    import select
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([f], [], [], left)[0]:
            raise TimeoutError("no line within %.0f s (got %r)" % (timeout, buf))
        chunk = os.read(f.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def stop(p):
    """Stop a child we started, by its pid: SIGTERM (serve drains), then SIGKILL."""
    harness.reap(p, timeout=15)


def probe(port, stop_at, out):
    """One connection: a 64 B message every 5 ms, each round trip timed."""
    s = socket.create_connection((HOST, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(10)
    msg = b"p" * SIZE
    try:
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < SIZE:
                chunk = s.recv(SIZE - got)
                if not chunk:
                    return
                got += len(chunk)
            out.append(time.perf_counter() - t)
            time.sleep(0.005)
    finally:
        s.close()


def measure(python, pollers, workers, loops, seconds, gil_off):
    port = harness.free_port()
    env = dict(os.environ)
    env.pop("PYTHON_GIL", None)
    if gil_off:
        env["PYTHON_GIL"] = "0"
    cmd = [python, os.path.abspath(__file__), "--serve", str(port), str(pollers), str(workers), str(loops)]
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    lg = None
    try:
        line = read_line(srv.stdout, 30)
        m = re.match(r"READY gil=(\d)", line)
        if not m:
            raise RuntimeError("server: %r" % line)
        gil = m.group(1) == "1"
        if gil_off and gil:
            raise RuntimeError("%s still has the GIL enabled" % python)
        lg = subprocess.Popen([LOADGEN, "echo", HOST, str(port), str(CONNS), "1", str(SIZE), str(seconds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        if not read_line(lg.stdout, 60).startswith("START"):
            raise RuntimeError("loadgen did not start")
        rtts: list = []
        th = threading.Thread(target=probe, args=(port, time.monotonic() + seconds - 0.2, rtts))
        th.start()
        end = read_line(lg.stdout, seconds + 60)
        th.join(30)
        lg.wait(30)
        kv = dict(x.split("=") for x in end.split()[1:])
        rtts.sort()
        return dict(rate=int(kv["msgs"]) / float(kv["elapsed"]), errors=int(kv["errors"]),
                    p50=rtts[len(rtts) // 2] * 1e3 if rtts else float("nan"),
                    p99=rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1e3 if rtts else float("nan"),
                    gil=gil)
    finally:
        if lg is not None and lg.poll() is None:
            lg.kill()
            lg.wait()
        stop(srv)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work-us", type=float, default=100.0)
    ap.add_argument("--gil-python", default="python3.11")
    ap.add_argument("--ft-python", default=FT_PYTHON)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    if not os.path.exists(LOADGEN):
        os.makedirs(os.path.dirname(LOADGEN), exist_ok=True)
        subprocess.check_call(["gcc", "-O2", "-Wall", "-o", LOADGEN, os.path.join(BENCH, "loadgen.c")])
    loops = int(subprocess.check_output([a.gil_python, os.path.abspath(__file__), "--calibrate",
                                         str(a.work_us)]).decode())
    gv = subprocess.check_output([a.gil_python, "-c", "import sys; print(sys.version.split()[0])"]).decode().strip()
    fv = subprocess.check_output([a.ft_python, "-c", "import sys; print(sys.version.split()[0])"]).decode().strip()
    configs = [
        ("gil", "%s pollers=1" % gv, a.gil_python, 1, 1, False),
        ("gil", "%s pollers=2" % gv, a.gil_python, 2, 1, False),
        ("gil", "%s workers=2" % gv, a.gil_python, 1, 2, False),
        ("ft", "%st pollers=1 (GIL off)" % fv, a.ft_python, 1, 1, True),
        ("ft", "%st pollers=2 (GIL off)" % fv, a.ft_python, 2, 1, True),
    ]
    print("loop count %d (about %g us on %s); %d x %g s per configuration; load: %s"
          % (loops, a.work_us, gv, a.runs, a.seconds, os.getloadavg()), flush=True)
    res: dict = {c[1]: [] for c in configs}
    load0 = os.getloadavg()[0]
    for run in range(a.runs):
        for _, name, py, pollers, workers, ft in configs:
            r = measure(py, pollers, workers, loops, a.seconds, ft)
            res[name].append(r)
            print("run %d  %-28s %8.0f msg/s  p50 %6.2f ms  p99 %6.2f ms%s"
                  % (run + 1, name, r["rate"], r["p50"], r["p99"],
                     "  errors=%d" % r["errors"] if r["errors"] else ""), flush=True)
    load1 = os.getloadavg()[0]
    med = {n: dict(rate=statistics.median(x["rate"] for x in v),
                   p50=statistics.median(x["p50"] for x in v),
                   p99=statistics.median(x["p99"] for x in v)) for n, v in res.items()}
    names = [c[1] for c in configs]
    base = {"gil": names[0], "ft": names[3]}
    rows = ["| configuration | msg/s (median) | vs 1 poller, same Python: median (range) | probe p50 | probe p99 |",
            "|---|---:|---:|---:|---:|"]
    for kind, name, *_ in configs:
        m = med[name]
        # Each run's ratio pairs two measurements taken back to back (foreign
        # load hits both alike); the median of those is the ratio reported.
        ratios = sorted(x["rate"] / b["rate"] for x, b in zip(res[name], res[base[kind]]))
        rows.append("| %s | %.0f | %.2fx (%.2f-%.2f) | %.2f ms | %.2f ms |"
                    % (name, m["rate"], statistics.median(ratios), ratios[0], ratios[-1], m["p50"], m["p99"]))
    cpus = os.cpu_count()
    text = ("## CPU-bound handlers\n\n"
            "`python bench/cpu_bound.py --runs %d --seconds %g` on %d cores (load average %.1f before, "
            "%.1f after; the machine is shared): each 64 B message costs the handler %d loop "
            "iterations of pure Python (about %g us on %s), then it is echoed; loadgen keeps %d "
            "connections with one message in flight each, and a probe connection measures round "
            "trips every 5 ms (its p50/p99 below).  Medians of %d interleaved runs; a ratio "
            "is the median of the runs' ratios to the same run's one-poller measurement on the same Python.\n\n"
            % (a.runs, a.seconds, cpus, load0, load1, loops, a.work_us, gv, CONNS, a.runs)
            + "\n".join(rows) + "\n")
    print()
    print(text)
    if not a.no_write:
        write_section(text)


def write_section(text):
    """Replace (or append) the "## CPU-bound handlers" section of RESULTS.md."""
    harness.replace_section(RESULTS, text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        sys.exit(serve_main(*(int(x) for x in sys.argv[2:6])))
    if len(sys.argv) > 1 and sys.argv[1] == "--calibrate":
        print(calibrate(float(sys.argv[2])))
        sys.exit(0)
    main()
