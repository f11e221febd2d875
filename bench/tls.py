#!/usr/bin/env python3
"""TLS benchmark: goev's TLS echo server against asyncio's, handshakes and echo.

    python bench/tls.py [--seconds 3] [--conns 50] [--repeat 3] [--no-write]

Two servers, each a separate process pinned to CPU 0, both on one thread with
the same certificate (a self-signed ECDSA P-256 certificate made at start
with the openssl command) and the same server context:

  goev      python -m goev echo 127.0.0.1:PORT --tls-cert CERT --tls-key KEY
  asyncio   asyncio.Protocol echo, loop.create_server(..., ssl=context)

Two workloads, the load generator pinned to CPU 1:

  handshakes   openssl s_time -new: one connection after another, a full
               handshake each (no session reuse), no payload -- handshakes/s;
  echo64_c50   50 TLS connections, each sending 64 B and waiting for the echo
               before sending again (ping-pong) -- messages/s.  The load
               generator is this script in --loadgen mode: a goev TLS client
               (the same client for both servers).

For each: the rate, and the server process's CPU time (user + system, from
/proc/PID/stat) per handshake or per message, which does not depend on how
fast the load generator is.  Medians of --repeat runs; "goev / asyncio" is
goev's number divided by asyncio's (rate: > 1 is better; µs: < 1 is better).
Standard library only (plus the openssl command).  Unless --no-write, the
table is written as the "TLS" section of bench/RESULTS.md (that section only).
"""
import argparse
import asyncio
import os
import platform
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as harness   # noqa: E402  (bench/run.py: replace_section, reap)

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
TICK = os.sysconf("SC_CLK_TCK")
SERVER_CPU, LOAD_CPU = {0}, {1}
SECTION = "## TLS"


# --------------------------------------------------------------------------- servers

class _AsyncioEcho(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


def asyncio_server(port, cert, key):
    """The asyncio TLS echo server (run as a child: --asyncio-server)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(_AsyncioEcho, "127.0.0.1", port, ssl=ctx, backlog=512)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with srv:
            await stop.wait()
    asyncio.run(main())
    return 0


def start_server(name, port, cert, key):
    if name == "goev":
        args = [sys.executable, "-m", "goev", "echo", "127.0.0.1:%d" % port, "--tls-cert", cert, "--tls-key", key]
    else:
        args = [sys.executable, os.path.abspath(__file__), "--asyncio-server", str(port), cert, key]
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=lambda: os.sched_setaffinity(0, SERVER_CPU))
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("%s server did not start: %s" % (name, p.stderr.read().decode()))
            time.sleep(0.05)
    return p


def stop_server(p):
    harness.reap(p, timeout=20)
    p.stderr.close()


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK        # utime + stime (fields 14, 15)


def warm_up(port, ctx):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as c:
            c.sendall(b"warm")
            c.recv(4)


# --------------------------------------------------------------------------- load

def handshakes(port, seconds, cafile):
    """openssl s_time -new: full handshakes per second, sequential."""
    out = subprocess.run(["openssl", "s_time", "-connect", "127.0.0.1:%d" % port, "-new",
                          "-time", str(int(seconds)), "-CAfile", cafile],
                         capture_output=True, text=True, timeout=seconds + 60,
                         preexec_fn=lambda: os.sched_setaffinity(0, LOAD_CPU))
    m = re.search(r"(\d+) connections in ([\d.]+)s", out.stdout)
    if not m:
        raise RuntimeError("s_time: %s %s" % (out.stdout, out.stderr))
    return int(m.group(1)), float(m.group(2))


def loadgen(port, conns, seconds, cafile):
    """The echo load generator (run as a child: --loadgen): goev TLS clients."""
    sys.path.insert(0, ROOT)
    import goev
    ctx = ssl.create_default_context(cafile=cafile)
    msg = b"x" * 64
    counts = []

    class Ping(goev.IOHandle):
        def __init__(self):
            self.n = 0
            self.have = 0
            counts.append(self)

        def on_open(self):
            self.reactor.add_handler(self, self.fd, goev.EV_IN)
            self.write(msg)
            return True

        def on_read(self):
            data = self.read()
            if data is None:
                return True
            if not data:
                return False
            self.have += len(data)
            while self.have >= 64:
                self.have -= 64
                self.n += 1
                self.write(msg)
            return True

        def on_connect_fail(self, err):
            print("connect failed: %s" % err, file=sys.stderr)

    r = goev.Reactor(1)
    c = goev.Connector(r)
    for _ in range(conns):
        c.connect(("127.0.0.1", port), Ping(), 10000, ssl=ctx, server_hostname="localhost")
    start = [0.0, 0]

    def begin():
        start[0] = time.monotonic()
        start[1] = sum(h.n for h in counts)
        print("begin", flush=True)        # the parent samples the server's CPU now ...
        r.call_later(seconds, end)

    def end():
        print("%d %.6f" % (sum(h.n for h in counts) - start[1], time.monotonic() - start[0]), flush=True)
        r.stop()
    r.call_later(0.5, begin)          # let every handshake finish first
    r.run()
    r.stop()
    return 0


def echo(port, conns, seconds, cafile, server_pid):
    """Returns (messages, seconds, server CPU seconds), all over the same window."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--loadgen", str(port), str(conns),
                          str(seconds), cafile], stdout=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: os.sched_setaffinity(0, LOAD_CPU))
    try:
        line = p.stdout.readline()
        c0 = cpu_seconds(server_pid)
        if line.strip() != "begin":
            raise RuntimeError("loadgen: %r" % line)
        line = p.stdout.readline()
        c1 = cpu_seconds(server_pid)     # ... and again when the window ends
        n, dt = line.split()
    finally:
        p.stdout.close()
        if p.wait(60) != 0:
            raise RuntimeError("loadgen failed")
    return int(n), float(dt), c1 - c0


def measure(name, port, cert, key, ctx, seconds, conns):
    """One run of both workloads on a fresh, warm server: rates and µs/op."""
    p = start_server(name, port, cert, key)
    try:
        warm_up(port, ctx)
        res = {}
        c0 = cpu_seconds(p.pid)
        n, dt = handshakes(port, seconds, cert)
        res["handshakes"] = (n / dt, (cpu_seconds(p.pid) - c0) * 1e6 / max(n, 1))
        n, dt, cpu = echo(port, conns, seconds, cert, p.pid)
        res["echo64_c50"] = (n / dt, cpu * 1e6 / max(n, 1))
        return res
    finally:
        stop_server(p)


# --------------------------------------------------------------------------- report

def fmt_rate(x):
    return "%.2fk" % (x / 1000) if x >= 1000 else "%.0f" % x


def report(results, args):
    rows = []
    for what, label in (("handshakes", "handshakes/s (openssl s_time -new)"),
                        ("echo64_c50", "echo 64 B ping-pong, %d conns (msg/s)" % args.conns)):
        g = [r[what] for r in results["goev"]]
        a = [r[what] for r in results["asyncio"]]
        gr, ar = statistics.median(x[0] for x in g), statistics.median(x[0] for x in a)
        gu, au = statistics.median(x[1] for x in g), statistics.median(x[1] for x in a)
        rows.append((label, gr, ar, gr / ar, gu, au, gu / au))
    lines = ["| workload | goev | asyncio | goev / asyncio | goev server µs/op | asyncio server µs/op | goev / asyncio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, gr, ar, rr, gu, au, ru in rows:
        lines.append("| %s | %s | %s | %.2f | %.1f | %.1f | %.2f |" % (label, fmt_rate(gr), fmt_rate(ar), rr, gu, au, ru))
    return "\n".join(lines)


def write_section(table, args):
    path = os.path.join(BENCH, "RESULTS.md")
    try:
        ssl_ver = ssl.OPENSSL_VERSION
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        rev = "?"
    body = "\n".join([
        SECTION,
        "",
        "Generated by `python bench/tls.py` on %s (%s, CPython %s, %s, goev commit %s); "
        "median of %d runs of %g s.  Servers pinned to CPU 0, load to CPU 1, loopback."
        % (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), platform.machine(), platform.python_version(),
           ssl_ver, rev, args.repeat, args.seconds),
        "",
        "Both servers: one thread, the same self-signed ECDSA P-256 certificate, a default "
        "`SSLContext(PROTOCOL_TLS_SERVER)` (TLS 1.3).  goev is `python -m goev echo --tls-cert/--tls-key` "
        "(SSLObject over memory BIOs, section 13 of goev.py); asyncio is an `asyncio.Protocol` echo on "
        "`loop.create_server(ssl=ctx)` (also SSLObject over memory BIOs, in asyncio/sslproto.py).  "
        "Handshakes come from `openssl s_time -new` (full handshakes, one at a time); the echo load "
        "from a goev TLS client process (the same for both).  µs/op is the server process's user + "
        "system CPU per handshake or per message (independent of the load generator's speed); the "
        "handshake itself (ECDHE + ECDSA signature) is OpenSSL's C code in both servers, so its "
        "ratio shows the Python overhead around it.",
        "",
        table,
        "",
    ])
    harness.replace_section(path, body)      # ours only: a previous run's section is replaced


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--asyncio-server"]:
        return asyncio_server(int(argv[1]), argv[2], argv[3])
    if argv[:1] == ["--loadgen"]:
        return loadgen(int(argv[1]), int(argv[2]), float(argv[3]), argv[4])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        SERVER_CPU.clear(), SERVER_CPU.add(0)
        LOAD_CPU.clear(), LOAD_CPU.add(0)
    with tempfile.TemporaryDirectory() as d:
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert],
                       check=True, capture_output=True)
        ctx = ssl.create_default_context(cafile=cert)
        results = {"goev": [], "asyncio": []}
        for i in range(args.repeat):
            for name in ("goev", "asyncio"):          # round robin: noise hits both
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                res = measure(name, port, cert, key, ctx, args.seconds, args.conns)
                results[name].append(res)
                print("run %d %-8s handshakes %8.1f/s %7.1f µs   echo %9.1f msg/s %6.2f µs" % (
                    i + 1, name, res["handshakes"][0], res["handshakes"][1],
                    res["echo64_c50"][0], res["echo64_c50"][1]), flush=True)
    table = report(results, args)
    print()
    print(table)
    if not args.no_write:
        write_section(table, args)
        print("\nwrote the TLS section of bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
