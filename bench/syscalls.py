#!/usr/bin/env python3
"""The syscall mix: system calls per request, per server, counted by strace.

    python bench/syscalls.py [--servers goev,uvloop,epoll_floor] [--only echo,accept]
                             [--seconds 3]

On loopback most of a request's CPU is the kernel's (bench/RESULTS.md: sys is
3-4x user for echo, 3x for accept).  A server can only lower that share by
making fewer or cheaper system calls, so this counts them: each server runs
pinned to CPU 0 (after its warm-up connection), ``strace -c -f -p PID`` is
attached, the load generator runs on CPU 1 for ``--seconds``, and each
syscall's count is divided by the requests served:

    echo    bench/.build/loadgen echo, 50 connections, 64 B ping-pong
    accept  bench/.build/loadgen connect, 16 at a time (connect, 64 B echo, close)

strace slows the traced server, so it sees bigger event batches than at full
speed (fewer epoll_wait calls per request); the per-request calls of the I/O
itself (read, write, accept, close, epoll_ctl) do not depend on that.  It
installs strace (apt-get) when missing and reuses bench/run.py's helpers.
Loopback only; it ends only the processes it started.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as harness   # noqa: E402  (bench/run.py: tools, Server, spawn)

SCENARIOS = {"echo": ["echo", "50", "1", "64"], "accept": ["connect", "16"]}


def ensure_strace():
    return not harness.apt_install("strace", "strace")


def parse_strace_c(text):
    """{syscall: calls} from ``strace -c`` output."""
    calls = {}
    for line in text.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = calls.get(m.group(2), 0) + int(m.group(1))
    return calls


def count(name, scenario, seconds, cfg, tmp):
    """(requests, {syscall: calls}) for one server under load."""
    srv = harness.Server(name, "echo", cfg, cfg["server_cpu"])
    out = os.path.join(tmp, "%s-%s.txt" % (name, scenario))
    tracer = None
    try:
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(srv.proc.pid)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        # strace says "Process N attached" once it is in: wait for that line
        line = tracer.stderr.readline().decode(errors="replace")
        if "attached" not in line:
            raise RuntimeError("strace did not attach: %r" % line)
        args = SCENARIOS[scenario]
        cmd = [harness.LOADGEN, args[0], harness.HOST, str(srv.port)] + args[1:] + [str(seconds)]
        lg = harness.spawn(cmd, cfg["load_cpu"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, _ = lg.communicate(timeout=seconds + 60)
        reqs = int(re.search(rb"msgs=(\d+)", stdout).group(1))
        tracer.send_signal(signal.SIGINT)       # detach: strace writes its table
        tracer.wait(30)
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        srv.stop()
    with open(out) as f:
        return reqs, parse_strace_c(f.read())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default="goev,uvloop,epoll_floor")
    ap.add_argument("--only", default="echo,accept", help="comma-separated: echo,accept")
    ap.add_argument("--seconds", type=int, default=3, help="load window per measurement (default 3)")
    args = ap.parse_args()
    servers = harness.split_checked(ap, args.servers, harness.ALL_SERVERS + harness.EXTRA_SERVERS, "server")
    scenarios = harness.split_checked(ap, args.only, list(SCENARIOS), "scenario")
    if not ensure_strace():
        print("strace is missing and cannot be installed here", file=sys.stderr)
        return 1
    if not harness.ensure_tools(servers, False):
        return 1
    cpus = sorted(os.sched_getaffinity(0))
    cfg = dict(server_cpu=cpus[0], load_cpu=cpus[-1] if len(cpus) > 1 else None,
               goev_extra=["--pollers", "1"])
    for sc in scenarios:
        res = {}
        with tempfile.TemporaryDirectory(prefix="goev-strace-") as tmp:
            for name in servers:
                reqs, calls = count(name, sc, args.seconds, cfg, tmp)
                res[name] = {k: v / max(reqs, 1) for k, v in calls.items()}
                print("%-7s %-12s %7d requests  %5.2f syscalls/request"
                      % (sc, name, reqs, sum(res[name].values())), file=sys.stderr)
        # the calls that matter: at least 0.01 per request for some server
        names = sorted({k for r in res.values() for k, v in r.items() if v >= 0.01},
                       key=lambda k: -max(r.get(k, 0.0) for r in res.values()))
        print("\n**System calls per request, `%s` (strace -c)**\n" % sc)
        print("| syscall | " + " | ".join(servers) + " |")
        print("|---|" + "---:|" * len(servers))
        for k in names:
            print("| %s | " % k + " | ".join("%.2f" % res[s].get(k, 0.0) for s in servers) + " |")
        print("| **total** | " + " | ".join("**%.2f**" % sum(v for k, v in res[s].items() if k in names)
                                           for s in servers) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
