"""Soak test: N clients for M minutes against ``python -m goev echo``.

    python bench/soak.py --minutes 10 --clients 50 [--pollers 1] [--backend auto]

Starts the echo server of the CLI on a free loopback port (a child process,
its stderr captured to a temporary file) and runs N client threads until the
time is up.  Each client loops over random sessions:

  normal      a few messages of 1 B..256 KiB, each sent while the echo is read
              back (non-blocking, both directions interleaved), then close;
  slow        the same, but the client reads 1-4 KiB at a time with pauses, so
              the server's queue fills and its backpressure engages;
  rst         sends part of a message, reads a little, then closes with
              SO_LINGER(1, 0): an abrupt reset in the middle of the stream;
  half-close  sends a message, shutdown(SHUT_WR), reads until EOF.

Every byte that comes back is compared with what was sent.  Every few seconds
the server's RSS (VmRSS), open fds (/proc/PID/fd) and threads are sampled and
printed.  It fails (exit 1) on any corrupted or missing byte, on a client
error outside the rst sessions, if RSS grows by more than 20 % *and* 5 MiB
between the first and the last third of the run (after warm-up), if the
thread count changes, or if the fd count is not back to its idle baseline
once the clients have stopped.  Loopback only.  stdlib only.
"""

import argparse
import os
import random
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MAX_MSG = 256 * 1024

# A random block; each message is a slice of it at a random offset, so a byte
# that comes back misplaced (wrong offset, another client's data) is caught.
_BLOCK = random.Random(12345).getrandbits(8 * 2 * MAX_MSG).to_bytes(2 * MAX_MSG, "little")


def proc_stats(pid):
    """(RSS KiB, open fds, threads) of a process, from /proc."""
    rss = threads = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, len(os.listdir("/proc/%d/fd" % pid)), threads


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.sessions = {"normal": 0, "slow": 0, "rst": 0, "half-close": 0}
        self.bytes_verified = 0
        self.failures = []

    def add(self, kind, nbytes):
        with self.lock:
            self.sessions[kind] += 1
            self.bytes_verified += nbytes

    def fail(self, msg):
        with self.lock:
            if len(self.failures) < 20:
                self.failures.append(msg)


def exchange(sock, payload, slow, rnd, deadline):
    """Send ``payload`` while reading its echo back (non-blocking, interleaved);
    returns the number of bytes verified.  Raises AssertionError on a mismatch."""
    view = memoryview(payload)
    sent = got = 0
    n = len(payload)
    while got < n:
        if time.monotonic() > deadline:
            raise TimeoutError("echo stalled: %d/%d bytes back" % (got, n))
        want_w = [sock] if sent < n else []
        r, w, _ = select.select([sock], want_w, [], 5.0)
        if w:
            try:
                sent += sock.send(view[sent:sent + 65536])
            except BlockingIOError:
                pass
        if r:
            try:
                chunk = sock.recv(rnd.randint(1024, 4096) if slow else 262144)
            except BlockingIOError:
                continue
            if not chunk:
                raise ConnectionError("EOF after %d/%d bytes" % (got, n))
            if chunk != payload[got:got + len(chunk)]:
                raise AssertionError("corrupted echo at byte %d of %d" % (got, n))
            got += len(chunk)
            if slow:
                time.sleep(rnd.uniform(0.0005, 0.003))
    return got


def message(rnd):
    size = int(min(MAX_MSG, max(1, rnd.expovariate(1 / 16384)))) if rnd.random() < 0.8 \
        else rnd.randint(1, MAX_MSG)
    off = rnd.randrange(0, len(_BLOCK) - size)
    return _BLOCK[off:off + size]


def client(addr, stop_at, stats, seed):
    rnd = random.Random(seed)
    while time.monotonic() < stop_at:
        kind = rnd.choices(["normal", "slow", "rst", "half-close"], [50, 15, 15, 20])[0]
        try:
            s = socket.create_connection(addr, timeout=10)
        except OSError as e:
            stats.fail("connect: %r" % e)
            time.sleep(0.1)
            continue
        try:
            s.setblocking(False)
            deadline = time.monotonic() + 60
            if kind in ("normal", "slow"):
                total = 0
                for _ in range(rnd.randint(1, 5)):
                    total += exchange(s, message(rnd), kind == "slow", rnd, deadline)
                stats.add(kind, total)
            elif kind == "rst":
                msg = message(rnd)
                part = msg[:max(1, len(msg) // 2)]
                s.setblocking(True)
                s.settimeout(10)
                s.sendall(part)
                got = s.recv(min(len(part), 1024))
                if got != part[:len(got)]:
                    raise AssertionError("corrupted echo before the reset")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                stats.add(kind, len(got))
            else:                                   # half-close
                msg = message(rnd)
                s.setblocking(True)
                s.settimeout(30)
                t = threading.Thread(target=lambda: (s.sendall(msg), s.shutdown(socket.SHUT_WR)))
                t.start()
                buf = bytearray()
                while True:
                    chunk = s.recv(262144)
                    if not chunk:
                        break
                    buf += chunk
                t.join()
                if bytes(buf) != msg:
                    raise AssertionError("half-close: %d bytes back of %d, or corrupted"
                                         % (len(buf), len(msg)))
                stats.add(kind, len(buf))
        except Exception as e:
            stats.fail("%s session: %r" % (kind, e))
        finally:
            s.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--pollers", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--interval", type=float, default=0, help="seconds between samples (default: run/30, 2..20)")
    args = ap.parse_args(argv)
    duration = args.minutes * 60.0
    interval = args.interval or min(20.0, max(2.0, duration / 30))

    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    errf = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen([sys.executable, "-m", "goev", "echo", "127.0.0.1:%d" % port,
                               "--pollers", str(args.pollers), "--backend", args.backend],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errf)
    addr = ("127.0.0.1", port)
    ok = True
    try:
        t0 = time.monotonic()
        while True:
            try:
                socket.create_connection(addr, timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() - t0 > 20:
                    errf.seek(0)
                    print("server did not start:\n" + errf.read(), file=sys.stderr)
                    return 1
                time.sleep(0.05)
        time.sleep(0.2)
        base = proc_stats(server.pid)
        print("soak: %d clients x %.1f min against python -m goev echo (pid %d, %d poller%s, backend %s)"
              % (args.clients, args.minutes, server.pid, args.pollers, "s" * (args.pollers > 1), args.backend))
        print("idle baseline: RSS %.1f MiB, %d fds, %d threads" % (base[0] / 1024, base[1], base[2]))
        print("%8s %9s %6s %8s %10s %12s %8s" % ("t (s)", "RSS MiB", "fds", "threads", "sessions", "MiB verified", "errors"))
        stats = Stats()
        start = time.monotonic()
        stop_at = start + duration
        threads = [threading.Thread(target=client, args=(addr, stop_at, stats, i), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        samples = []
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            time.sleep(min(interval, stop_at - now))
            rss, fds, nthreads = proc_stats(server.pid)
            samples.append((time.monotonic() - start, rss, fds, nthreads))
            print("%8.0f %9.1f %6d %8d %10d %12.1f %8d" % (
                samples[-1][0], rss / 1024, fds, nthreads, sum(stats.sessions.values()),
                stats.bytes_verified / 2 ** 20, len(stats.failures)), flush=True)
        for t in threads:
            t.join(90)
        # fds back to baseline once every client is gone (closes are asynchronous)
        settle = time.monotonic() + 15
        while True:
            end = proc_stats(server.pid)
            if end[1] <= base[1] or time.monotonic() > settle:
                break
            time.sleep(0.2)
        print("after the clients stopped: RSS %.1f MiB, %d fds, %d threads" % (end[0] / 1024, end[1], end[2]))
        print("sessions: %s; %.1f MiB verified" % (
            ", ".join("%s %d" % kv for kv in stats.sessions.items()), stats.bytes_verified / 2 ** 20))

        # -- verdict ----------------------------------------------------------
        if stats.failures:
            ok = False
            print("FAIL: %d client errors, first ones:" % len(stats.failures))
            for f in stats.failures[:10]:
                print("   ", f)
        if any(t.is_alive() for t in threads):
            ok = False
            print("FAIL: a client thread is stuck")
        warm = [s for s in samples if s[0] >= min(60.0, duration * 0.1)] or samples
        third = max(1, len(warm) // 3)
        first = statistics.median(s[1] for s in warm[:third])
        last = statistics.median(s[1] for s in warm[-third:])
        growth = last - first
        print("RSS after warm-up: first third %.1f MiB, last third %.1f MiB (%+.1f MiB, %+.0f%%)"
              % (first / 1024, last / 1024, growth / 1024, 100.0 * growth / first))
        if growth > 0.2 * first and growth > 5 * 1024:
            ok = False
            print("FAIL: RSS grows")
        if any(s[3] != base[2] for s in samples) or end[2] != base[2]:
            ok = False
            print("FAIL: thread count changed (baseline %d, seen %s)"
                  % (base[2], sorted({s[3] for s in samples} | {end[2]})))
        if end[1] > base[1]:
            ok = False
            print("FAIL: %d fds open after the clients stopped (baseline %d)" % (end[1], base[1]))
        if server.poll() is not None:
            ok = False
            print("FAIL: the server died (exit %s)" % server.returncode)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                rc = server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                rc = server.wait()
            if rc != 0:
                ok = False
                print("FAIL: server exit code %s after SIGTERM" % rc)
        errf.seek(0)
        err = errf.read()
        errf.close()
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("goev ")]
        if lines:
            print("server stderr (%d lines):" % len(lines))
            for ln in lines[:20]:
                print("   ", ln)
            if any("Traceback" in ln or "ERROR" in ln or "CRITICAL" in ln for ln in lines):
                ok = False
                print("FAIL: the server logged errors")
    print("soak: %s" % ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
