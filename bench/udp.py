"""bench/udp.py -- UDP echo: datagrams per second and server CPU per datagram,
goev (``python -m goev echo --udp``) against asyncio's DatagramProtocol and
uvloop, in one run on this machine.

Each server runs alone, pinned to CPU 0; bench/udpgen.c (built into
bench/.build/udpgen) is pinned to CPU 1 and keeps SOCKETS x INFLIGHT
datagrams in flight (each echo sends the next one).  The server's user and
system CPU come from /proc/PID/stat (fields 14 and 15) at the START and END
of the measured window, so the per-datagram figures do not depend on how
fast the load generator is.  uvloop runs from bench/.venv (made with pip if
missing).  ``--write`` puts the table into bench/RESULTS.md (section "UDP echo").

    python3.11 bench/udp.py [--seconds 5] [--sockets 50] [--inflight 1 8] [--size 64] [--write]
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as harness   # noqa: E402  (bench/run.py: replace_section, reap)

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
BUILD = os.path.join(BENCH, ".build")
UDPGEN = os.path.join(BUILD, "udpgen")
VENV_PY = os.path.join(BENCH, ".venv", "bin", "python")
TICK = os.sysconf("SC_CLK_TCK")


def build_udpgen():
    src = os.path.join(BENCH, "udpgen.c")
    if not os.path.exists(UDPGEN) or os.path.getmtime(UDPGEN) < os.path.getmtime(src):
        os.makedirs(BUILD, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", UDPGEN, src], check=True)


def ensure_uvloop():
    ok = lambda: os.path.exists(VENV_PY) and subprocess.run(   # noqa: E731
        [VENV_PY, "-c", "import uvloop"], capture_output=True).returncode == 0
    if not ok():
        subprocess.run([sys.executable, "-m", "venv", os.path.join(BENCH, ".venv")], check=True)
        subprocess.run([VENV_PY, "-m", "pip", "install", "-q", "uvloop"], check=False)
    return ok()


def cpu(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK      # utime, stime (fields 14, 15)


def pin(n):
    def fn():
        try:
            os.sched_setaffinity(0, {n % os.cpu_count()})
        except OSError:
            pass
    return fn


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_echo(port, proc, timeout=20.0):
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("server exited: %s" % proc.stderr.read())
            s.sendto(b"ping", ("127.0.0.1", port))
            try:
                if s.recv(100) == b"ping":
                    return
            except OSError:
                pass
    raise RuntimeError("no echo from the server on port %d" % port)


def measure(name, cmd, args, inflight):
    port = free_udp_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    srv = subprocess.Popen([c.format(port=port) for c in cmd], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=env, preexec_fn=pin(0))
    try:
        wait_echo(port, srv)
        gen = subprocess.Popen([UDPGEN, str(port), str(args.sockets), str(inflight), str(args.size),
                                str(args.seconds)], stdout=subprocess.PIPE, text=True, preexec_fn=pin(1))
        assert gen.stdout.readline().strip() == "START"
        u0, s0 = cpu(srv.pid)
        line = gen.stdout.readline().split()
        u1, s1 = cpu(srv.pid)
        gen.wait()
        kv = dict(w.split("=") for w in line[1:])
        msgs, elapsed = int(kv["msgs"]), float(kv["elapsed"])
        return dict(name=name, inflight=inflight, rate=msgs / elapsed, user_us=(u1 - u0) / msgs * 1e6,
                    sys_us=(s1 - s0) / msgs * 1e6, lost=int(kv["lost"]), msgs=msgs)
    finally:
        harness.reap(srv, timeout=10, sig=signal.SIGINT)


def table(results, args):
    base = {(r["name"], r["inflight"]): r for r in results}
    lines = ["| server | in flight | datagrams/s | user µs/datagram | system µs/datagram | user CPU ÷ asyncio's |",
             "|---|---|---|---|---|---|"]
    for r in results:
        a = base.get(("asyncio", r["inflight"]))
        ratio = r["user_us"] / a["user_us"] if a else float("nan")
        lines.append("| %s | %d x %d | %.1fk | %.2f | %.2f | %.2f |" % (
            r["name"], args.sockets, r["inflight"], r["rate"] / 1000, r["user_us"], r["sys_us"], ratio))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description="UDP echo: goev vs asyncio vs uvloop")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per server (default 5)")
    ap.add_argument("--sockets", type=int, default=50, help="client sockets (default 50)")
    ap.add_argument("--inflight", type=int, nargs="+", default=[1, 8],
                    help="datagrams in flight per socket, one measurement each (default 1 8)")
    ap.add_argument("--size", type=int, default=64, help="datagram bytes (default 64)")
    ap.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    args = ap.parse_args()
    build_udpgen()
    py = sys.executable
    servers = [("goev", [py, "-m", "goev", "echo", "--udp", "127.0.0.1:{port}"]),
               ("asyncio", [py, os.path.join(BENCH, "servers", "asyncio_udp.py"), "{port}"])]
    if ensure_uvloop():
        servers.append(("uvloop", [VENV_PY, os.path.join(BENCH, "servers", "asyncio_udp.py"), "{port}", "uvloop"]))
    results = [measure(name, cmd, args, n) for n in args.inflight for name, cmd in servers]
    text = table(results, args)
    head = ("UDP echo, %d-byte datagrams, %d sockets x %s in flight, %g s per server, one run; CPython %s; "
            "servers pinned to CPU 0, bench/udpgen.c to CPU 1; µs per datagram = the server's CPU "
            "(/proc/PID/stat) over the window / datagrams echoed.  `python3.11 bench/udp.py`"
            % (args.size, args.sockets, " or ".join(map(str, args.inflight)), args.seconds, sys.version.split()[0]))
    print(head + "\n\n" + text)
    if args.write:
        harness.replace_section(os.path.join(BENCH, "RESULTS.md"), "## UDP echo\n\n%s\n\n%s\n" % (head, text))


if __name__ == "__main__":
    main()
