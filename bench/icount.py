#!/usr/bin/env python3
"""Instructions per request: the servers' user-space work, counted by callgrind.

    python bench/icount.py [--servers goev,epoll_floor,uvloop,asyncio]
                           [--only echo,http,accept] [--seconds 3]

CPU time on a shared two-core machine moves by 10-30 % from run to run; an
instruction count does not.  Each server runs under ``valgrind --tool=callgrind``
(which counts every user-space instruction the process executes, the kernel's
share excluded, exactly the part a reactor controls).  After start-up and one
warm-up connection the counters are zeroed, the load generator runs for
``--seconds``, the counters are dumped, and the total is divided by the
requests served:

    echo    bench/.build/loadgen echo, 50 connections, 64 B ping-pong
    echo16k the same with 16 KiB messages
    http    wrk -t1 -c50 (keep-alive GET)
    accept  bench/.build/loadgen connect, 16 at a time (connect, 64 B echo, close)

Under callgrind a server runs ~50x slower, so it sees bigger event batches
than at full speed; the count is a model of the hot path's cost, repeatable to
about 1 % for the same Python, not a prediction of req/s.  Different Python
versions give different counts (3.11+ specializes; 3.9 does not).

It installs valgrind (apt-get) when missing and reuses bench/run.py's helpers
for wrk, uvloop (bench/.venv) and the load generator.  Loopback only.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as harness   # noqa: E402  (bench/run.py: tools, paths, Server.warm)

SCENARIOS = ("echo", "echo16k", "http", "accept")


def ensure_valgrind():
    return not harness.apt_install("valgrind", "valgrind") and bool(shutil.which("callgrind_control"))


def server_cmd(name, kind, addr):
    py = sys.executable                     # (the interpreter itself, never pyenv's shell shim)
    srv = harness.SERVERS_DIR
    return {"goev": [py, "-m", "goev", kind, addr, "--pollers", "1"],
            "epoll_floor": [py, os.path.join(srv, "epoll_floor.py"), kind, addr],
            "epoll_min": [py, os.path.join(srv, "epoll_min.py"), kind, addr],
            "asyncio": [py, os.path.join(srv, "asyncio_server.py"), kind, addr],
            "uvloop": [harness.VENV_PY, os.path.join(srv, "asyncio_server.py"),
                       "--uvloop", kind, addr]}[name]


def count(name, scenario, seconds, tmp):
    """(requests, instructions) for one server and scenario."""
    kind = "http" if scenario == "http" else "echo"
    port = harness.free_port()
    addr = "%s:%d" % (harness.HOST, port)
    out = os.path.join(tmp, "%s-%s.cg" % (name, scenario))
    errfile = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(["taskset", "-c", "0", "valgrind", "-q", "--tool=callgrind",
                             "--callgrind-out-file=" + out] + server_cmd(name, kind, addr),
                            cwd=harness.ROOT, stdout=subprocess.DEVNULL, stderr=errfile)
    try:
        srv = harness.Server.__new__(harness.Server)   # only its readiness wait and warm-up
        srv.name, srv.kind, srv.port, srv.proc, srv.errfile = name, kind, port, proc, errfile
        srv._wait_ready(timeout=120.0)
        srv.warm()
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, check=True)
        if scenario == "http":
            r = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c50", "-d%ds" % seconds,
                                "http://%s/" % addr], capture_output=True, text=True)
            reqs = int(re.search(r"(\d+) requests in", r.stdout).group(1))
        else:
            args = {"echo": ["echo", harness.HOST, str(port), "50", "1", "64"],
                    "echo16k": ["echo", harness.HOST, str(port), "50", "1", "16384"],
                    "accept": ["connect", harness.HOST, str(port), "16"]}[scenario]
            r = subprocess.run(["taskset", "-c", "1", harness.LOADGEN] + args + [str(seconds)],
                               capture_output=True, text=True)
            reqs = int(re.search(r"msgs=(\d+)", r.stdout).group(1))
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errfile.close()
    total = None
    for path in glob.glob(out + ".*"):        # the dump made by -d (the exit dump is out itself)
        with open(path) as f:
            for line in f:
                if line.startswith("summary:"):
                    total = int(line.split()[1])
    if total is None:
        raise RuntimeError("%s %s: no callgrind dump" % (name, scenario))
    return reqs, total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default="goev,epoll_floor,uvloop,asyncio")
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated: " + ",".join(SCENARIOS))
    ap.add_argument("--seconds", type=int, default=3, help="load window per measurement (default 3)")
    ap.add_argument("--keep", metavar="DIR", help="keep the callgrind dumps in DIR "
                    "(read them with callgrind_annotate)")
    args = ap.parse_args()
    servers = harness.split_checked(ap, args.servers, ("goev", "epoll_floor", "epoll_min", "uvloop", "asyncio"),
                                    "server")
    scenarios = harness.split_checked(ap, args.only, SCENARIOS, "scenario")
    if not ensure_valgrind():
        print("valgrind is missing and cannot be installed here", file=sys.stderr)
        return 1
    if not harness.ensure_tools(servers, "http" in scenarios):
        return 1
    res = {}
    with tempfile.TemporaryDirectory(prefix="goev-icount-") as tmp:
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            tmp = args.keep
        for sc in scenarios:
            for name in servers:
                if name == "epoll_min" and sc == "http":
                    continue                    # (echo only)
                t0 = time.monotonic()
                reqs, total = count(name, sc, args.seconds, tmp)
                res[sc, name] = total / max(reqs, 1)
                print("%-7s %-12s %7d requests  %9.0f instructions/request  (%.0f s)"
                      % (sc, name, reqs, res[sc, name], time.monotonic() - t0), file=sys.stderr)
    print("\n**User-space instructions per request (callgrind; `python %s`)**\n" % sys.version.split()[0])
    others = [s for s in servers if s != "goev"] if "goev" in servers else []
    head = ["scenario"] + servers + ["goev ÷ %s" % s for s in others]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for sc in scenarios:
        cells = ["%.0f" % res[sc, s] if (sc, s) in res else "" for s in servers]
        ratios = ["%.2f" % (res[sc, "goev"] / res[sc, s]) if (sc, s) in res else "" for s in others]
        print("| " + " | ".join([sc] + cells + ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
