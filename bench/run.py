#!/usr/bin/env python3
"""Benchmark harness for goev.py: goev against asyncio, uvloop, Twisted, tornado, gevent,
threads and a bare epoll loop.

    python bench/run.py [--quick] [--duration S] [--runs N] [--only SCENARIO,...]
                        [--servers goev,asyncio,uvloop,twisted,tornado,gevent,threads,epoll_floor]

Everything runs on this machine over 127.0.0.1: the server is pinned to CPU 0,
the load generator (bench/loadgen.c or wrk) to CPU 1.  Servers are measured
round robin inside each run, every measurement on a freshly started server that
has first served one warm-up connection.  For each measurement the harness
reads the server's user and system CPU time from /proc/PID/stat before and after
the load window, so the result is throughput *and* CPU per request; the load
generator reports the p50 and p99 latency of the requests it completed.

It installs what it needs when missing: wrk (apt-get), uvloop, Twisted, tornado
and gevent (pip, into bench/.venv), and bench/.build/loadgen (gcc).  Results: bench/RESULTS.md, bench/results.svg,
bench/results.json, and the same tables on stdout.

The runner itself uses only the Python standard library (3.9+).
"""
import argparse
import datetime
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
VENV = os.path.join(BENCH, ".venv")
VENV_PY = os.path.join(VENV, "bin", "python")
BUILD = os.path.join(BENCH, ".build")
LOADGEN = os.path.join(BUILD, "loadgen")
LOADGEN_SRC = os.path.join(BENCH, "loadgen.c")
SERVERS_DIR = os.path.join(BENCH, "servers")
HOST = "127.0.0.1"  # loopback only, always
TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

ALL_SERVERS = ["goev", "asyncio", "uvloop", "twisted", "tornado", "gevent", "threads", "epoll_floor"]
EXTRA_SERVERS = ["epoll_min"]   # echo only, a lower bound: run when named in --servers
# Servers that run from bench/.venv, by the pip package (and module) they need.
VENV_PACKAGES = {"uvloop": "uvloop", "twisted": "twisted", "tornado": "tornado", "gevent": "gevent"}
# The frameworks a user would pick instead of goev: measured in the echo and HTTP
# scenarios (the accept and idle ones are left to the servers above, to keep a run short).
FRAMEWORKS = ("twisted", "tornado", "gevent")
SERVER_TITLES = {
    "goev": "goev",
    "asyncio": "asyncio (Protocol)",
    "uvloop": "uvloop (Protocol)",
    "twisted": "Twisted (epoll)",
    "tornado": "tornado (IOStream)",
    "gevent": "gevent (StreamServer)",
    "threads": "thread per conn",
    "epoll_floor": "epoll floor",
    "epoll_min": "epoll minimum",
}
COLORS = {
    "goev": "#2b7bba",
    "asyncio": "#8c8c8c",
    "uvloop": "#e08a2c",
    "twisted": "#d4a017",
    "tornado": "#17a2b8",
    "gevent": "#8d6e63",
    "threads": "#9b59b6",
    "epoll_floor": "#3aa655",
    "epoll_min": "#c0392b",
}

# Scenario table: name -> what to run.  "unit" names the thing counted.
SCENARIOS = [
    dict(name="echo64_c50", kind="echo", tool="loadgen", conns=50, inflight=1, size=64,
         unit="msg", title="echo 64 B ping-pong, 50 connections"),
    dict(name="echo64_c1000", kind="echo", tool="loadgen", conns=1000, inflight=1, size=64,
         unit="msg", title="echo 64 B ping-pong, 1000 connections"),
    dict(name="echo64_inflight16", kind="echo", tool="loadgen", conns=50, inflight=16, size=64,
         unit="msg", title="echo 64 B, 16 messages in flight per connection, 50 connections",
         short="echo 64 B, 16 in flight per connection, 50 conns"),
    dict(name="echo16k_c50", kind="echo", tool="loadgen", conns=50, inflight=1, size=16384,
         unit="msg", title="echo 16 KiB ping-pong, 50 connections"),
    dict(name="http_c50", kind="http", tool="wrk", conns=50, pipeline=0,
         unit="req", title="HTTP keep-alive, wrk -t1 -c50"),
    dict(name="http_pipeline16", kind="http", tool="wrk", conns=50, pipeline=16,
         unit="req", title="HTTP pipelined, 16 requests per write, wrk -t1 -c50",
         short="HTTP pipelined, 16 per write, wrk -t1 -c50"),
    dict(name="accept", kind="echo", tool="connect", concurrency=16,
         unit="conn", title="connections accepted per second (connect, 64 B echo, close; 16 at a time)",
         short="connections accepted per second (16 at a time)"),
    dict(name="idle_1000", kind="echo", tool="idle", conns=1000,
         unit="conn", title="RSS per idle connection, 1000 connections"),
    dict(name="idle_10000", kind="echo", tool="idle", conns=10000,
         unit="conn", title="RSS per idle connection, 10000 connections"),
]
SCENARIO_BY_NAME = {s["name"]: s for s in SCENARIOS}

_live = []  # Popen objects this harness started and has not reaped yet


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- setup

def _run(cmd, timeout=600, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=timeout, **kw)


def apt_install(command, package):
    """Make ``command`` available, installing Debian's ``package`` if needed:
    None when it is there, else why it could not be installed."""
    if shutil.which(command):
        return None
    log("%s not found: installing it with apt-get" % command)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "%s is missing and cannot be installed here (need root and apt-get)" % command
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = _run(["apt-get", "install", "-y", package], env=env)
    if r.returncode != 0:
        _run(["apt-get", "update"], env=env)
        r = _run(["apt-get", "install", "-y", package], env=env)
    if shutil.which(command):
        return None
    log(r.stdout[-2000:])
    return "%s could not be installed (apt-get failed)" % command


def split_checked(ap, value, known, what):
    """A comma-separated option as a list; an item not in ``known`` is a usage error."""
    items = [v for v in value.split(",") if v]
    for v in items:
        if v not in known:
            ap.error("unknown %s %r (known: %s)" % (what, v, ", ".join(known)))
    return items


def ensure_tools(servers, need_wrk):
    """For the side tools (icount.py, syscalls.py): build the load generator,
    install wrk if asked, drop uvloop from ``servers`` if it cannot be had.
    Prints the notes; False if the measurement cannot run."""
    notes = []
    if not ensure_loadgen(notes) or (need_wrk and not ensure_wrk(notes)):
        print("\n".join(notes), file=sys.stderr)
        return False
    missing = set(s for s in servers if s in VENV_PACKAGES) - ensure_venv(servers, notes)
    for s in missing:
        servers.remove(s)
    for n in notes:
        print("note:", n, file=sys.stderr)
    return True


def ensure_wrk(notes):
    why = apt_install("wrk", "wrk")
    if why:
        notes.append(why + ": HTTP scenarios skipped.")
    return not why


def ensure_venv(servers, notes):
    """Install the pip packages of ``servers`` (see VENV_PACKAGES) into bench/.venv,
    creating it if needed; returns the set of those servers whose package imports.
    A package pip cannot install is skipped with a note."""
    want = [s for s in servers if s in VENV_PACKAGES]

    def importable(s):
        return os.path.exists(VENV_PY) and _run([VENV_PY, "-c", "import " + VENV_PACKAGES[s]],
                                                timeout=60).returncode == 0

    have = set(s for s in want if importable(s))
    todo = [s for s in want if s not in have]
    if not todo:
        return have
    log("installing %s into bench/.venv" % ", ".join(VENV_PACKAGES[s] for s in todo))
    if not os.path.exists(VENV_PY):
        r = _run([sys.executable, "-m", "venv", VENV])
        if r.returncode != 0:
            notes.append("python -m venv failed: %s skipped (%s)" % (", ".join(todo), r.stdout.strip()[-300:]))
            return have
    # one pip call for all; if one package fails, pip installs none: then one at a time
    r = _run([VENV_PY, "-m", "pip", "install", "-q"] + [VENV_PACKAGES[s] for s in todo])
    for s in todo:
        if importable(s):
            have.add(s)
            continue
        if r.returncode != 0:
            r1 = _run([VENV_PY, "-m", "pip", "install", "-q", VENV_PACKAGES[s]])
            if importable(s):
                have.add(s)
                continue
            r = r1
        notes.append("pip install %s failed: %s skipped (%s)" % (VENV_PACKAGES[s], s, r.stdout.strip()[-300:]))
    return have


def ensure_uvloop(notes):
    """uvloop in bench/.venv (see ensure_venv): True if it imports."""
    return "uvloop" in ensure_venv(["uvloop"], notes)


def ensure_loadgen(notes):
    os.makedirs(BUILD, exist_ok=True)
    if os.path.exists(LOADGEN) and os.path.getmtime(LOADGEN) >= os.path.getmtime(LOADGEN_SRC):
        return True
    if not shutil.which("gcc") and os.geteuid() == 0 and shutil.which("apt-get"):
        log("gcc not found: installing it with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if _run(["apt-get", "install", "-y", "gcc", "libc6-dev"], env=env).returncode != 0:
            _run(["apt-get", "update"], env=env)
            _run(["apt-get", "install", "-y", "gcc", "libc6-dev"], env=env)
    log("compiling bench/loadgen.c")
    r = _run(["gcc", "-O2", "-Wall", "-o", LOADGEN, LOADGEN_SRC, "-lm"])
    if r.returncode != 0:
        notes.append("gcc failed to build loadgen: echo, accept and idle scenarios skipped:\n" + r.stdout)
        return False
    return True


def goev_support(notes):
    """Which goev subcommands exist: returns (echo_ok, http_ok, extra_args)."""
    if not os.path.exists(os.path.join(ROOT, "goev.py")):
        notes.append("goev.py not found at the repository root: goev skipped.")
        return False, False, []
    res = {}
    helptext = ""
    for kind in ("echo", "http"):
        try:
            r = _run([sys.executable, "-m", "goev", kind, "--help"], timeout=30, cwd=ROOT)
            res[kind] = r.returncode == 0
            if r.returncode == 0:
                helptext += r.stdout
        except subprocess.TimeoutExpired:
            res[kind] = False
    if not res["echo"]:
        notes.append("`python -m goev echo --help` failed: goev echo rows skipped.")
    if not res["http"]:
        notes.append("`python -m goev http --help` failed (no http subcommand yet?): goev HTTP rows skipped.")
    extra = ["--pollers", "1"] if "--pollers" in helptext else []
    return res["echo"], res["http"], extra


# --------------------------------------------------------------------------- /proc

def _stat_fields(pid):
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    return s[s.rindex(")") + 2:].split()  # fields from 3 (state) on


def descendants(pid):
    """pid and every live descendant (a server with worker processes)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_times(pids):
    """(user seconds, system seconds) summed over pids: /proc/PID/stat fields 14 and 15."""
    u = s = 0
    for p in pids:
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        u += int(f[11])
        s += int(f[12])
    return u / TCK, s / TCK


def cpu_busy():
    """Task-busy seconds of every CPU (user + nice + system + steal), from /proc/stat.

    irq and softirq time are left out: on loopback most of it is the packet
    work of our own server and load generator, not another process."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                v = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
                out[int(parts[0][3:])] = (v[0] + v[1] + v[2] + v[7]) / TCK
    return out


def foreign_load(b0, b1, cfg, server_cpu_s, load_cpu_s, secs):
    """Share of CPU 0 / CPU 1 used by anything but the server / load generator in the window."""
    res = {}
    for key, cpu, own in (("other_cpu0", cfg["server_cpu"], server_cpu_s), ("other_cpu1", cfg["load_cpu"], load_cpu_s)):
        if cpu is None or cpu not in b0 or cpu not in b1 or not secs or own is None:
            continue
        res[key] = max(0.0, (b1[cpu] - b0[cpu] - own) / secs)
    return res


def rss_bytes(pids):
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/statm" % p) as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            continue
    return total


# --------------------------------------------------------------------------- processes

def _pin(cpu):
    def fn():
        if cpu is not None:
            try:
                os.sched_setaffinity(0, {cpu})
            except OSError:
                pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
    return fn


def spawn(cmd, cpu, **kw):
    p = subprocess.Popen(cmd, preexec_fn=_pin(cpu), **kw)
    _live.append(p)
    return p


def reap(p, timeout=5.0, sig=signal.SIGTERM):
    """Stop a process we started (by its pid) and any descendants it left behind."""
    try:
        kids = [k for k in descendants(p.pid) if k != p.pid] if p.poll() is None else []
    except OSError:
        kids = []
    if p.poll() is None:
        try:
            p.send_signal(sig)
        except OSError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for k in kids:
        try:
            os.kill(k, signal.SIGKILL)
        except OSError:
            pass
    if p in _live:
        _live.remove(p)
    return p.returncode


def reap_all():
    for p in list(_live):
        reap(p, timeout=2.0)


class LineReader:
    """Read lines from a child's stdout with a timeout (select + os.read)."""

    def __init__(self, f):
        self.fd = f.fileno()
        self.buf = b""

    def readline(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no line from child within %.0f s" % timeout)
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    line, self.buf = self.buf, b""
                    return line.decode(errors="replace")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")


def replace_section(path, body):
    """Put ``body``, a markdown section that starts with its "## " heading line,
    into the file at ``path``: in place of the section with that heading if
    there is one (up to the next "## " heading), else at the end."""
    heading = body.split("\n", 1)[0]
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# goev.py benchmark results\n"
    pat = re.compile(r"^%s\n.*?(?=^## |\Z)" % re.escape(heading), re.S | re.M)
    if pat.search(text):
        text = pat.sub(lambda m: body.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n")


def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, name, kind, cfg, server_cpu):
        self.name, self.kind = name, kind
        self.port = free_port()
        addr = "%s:%d" % (HOST, self.port)
        if name == "goev":
            cmd = [sys.executable, "-m", "goev", kind, addr] + cfg["goev_extra"]
        elif name == "asyncio":
            cmd = [sys.executable, os.path.join(SERVERS_DIR, "asyncio_server.py"), kind, addr]
        elif name == "uvloop":
            cmd = [VENV_PY, os.path.join(SERVERS_DIR, "asyncio_server.py"), "--uvloop", kind, addr]
        elif name in FRAMEWORKS:
            cmd = [VENV_PY, os.path.join(SERVERS_DIR, name + "_server.py"), kind, addr]
        elif name == "threads":
            cmd = [sys.executable, os.path.join(SERVERS_DIR, "threads_server.py"), kind, addr]
        elif name in ("epoll_floor", "epoll_min"):
            cmd = [sys.executable, os.path.join(SERVERS_DIR, name + ".py"), kind, addr]
        else:
            raise ValueError(name)
        self.cmd = cmd
        self.errfile = open(os.path.join(BUILD, "server-%s.log" % name), "w+")
        self.proc = spawn(cmd, server_cpu, cwd=ROOT, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=self.errfile,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        self._wait_ready()
        self.warm()

    def stderr_tail(self):
        self.errfile.flush()
        self.errfile.seek(0)
        return self.errfile.read()[-1500:]

    def _wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s at startup: %s"
                                   % (self.name, self.proc.returncode, self.stderr_tail()))
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("%s did not listen on port %d within %.0f s" % (self.name, self.port, timeout))

    def warm(self):
        """Open and close one connection before measuring (asyncio's speed depends on malloc state)."""
        with socket.create_connection((HOST, self.port), timeout=5) as s:
            if self.kind == "echo":
                msg = bytes(range(64))
                s.sendall(msg)
                got = b""
                while len(got) < 64:
                    d = s.recv(64 - len(got))
                    if not d:
                        break
                    got += d
                if got != msg:
                    raise RuntimeError("%s: warm-up echo returned %r" % (self.name, got))
            else:
                s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                got = b""
                while b"Hello, World!" not in got:
                    d = s.recv(4096)
                    if not d:
                        break
                    got += d
                if not got.startswith(b"HTTP/1.1 200") or b"Hello, World!" not in got:
                    raise RuntimeError("%s: warm-up HTTP answer %r" % (self.name, got[:200]))

    def pids(self):
        return descendants(self.proc.pid)

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=5.0):
        rc = reap(self.proc, timeout=timeout)
        self.errfile.close()
        return rc


# --------------------------------------------------------------------------- measurements

def _parse_kv(line):
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}


def measure_loadgen(srv, sc, dur, cfg):
    if sc["tool"] == "echo" or sc["tool"] == "loadgen":
        args = ["echo", HOST, str(srv.port), str(sc["conns"]), str(sc["inflight"]), str(sc["size"]), str(dur)]
    else:  # connect
        args = ["connect", HOST, str(srv.port), str(sc["concurrency"]), str(dur)]
    p = spawn([LOADGEN] + args, cfg["load_cpu"], stdin=subprocess.DEVNULL,
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rd = LineReader(p.stdout)
        line = rd.readline(90)
        if not line.startswith("START"):
            raise RuntimeError("loadgen: %r %s" % (line, p.stderr.read().decode()[-500:] if p.poll() is not None else ""))
        pids = srv.pids()
        u0, s0 = cpu_times(pids)
        b0 = cpu_busy()
        line = rd.readline(dur + 60)
        u1, s1 = cpu_times(pids)
        b1 = cpu_busy()
        if not line.startswith("END"):
            raise RuntimeError("loadgen: no END line (%r)" % line)
        p.wait(30)
        err = p.stderr.read().decode(errors="replace").strip()
    finally:
        reap(p, timeout=5, sig=signal.SIGKILL)
    kv = _parse_kv(line)
    n = kv["msgs"]
    res = dict(count=n, rate=n / kv["elapsed"] if kv["elapsed"] else 0.0,
               user_us=(u1 - u0) * 1e6 / n if n else None,
               sys_us=(s1 - s0) * 1e6 / n if n else None,
               cpu_util=((u1 - u0) + (s1 - s0)) / kv["elapsed"] if kv["elapsed"] else None,
               load_util=kv["cpu"] / kv["elapsed"] if kv.get("cpu") is not None and kv["elapsed"] else None,
               p50_us=kv.get("p50_us") if n else None, p99_us=kv.get("p99_us") if n else None,
               errors=int(kv.get("errors", 0)))
    res.update(foreign_load(b0, b1, cfg, (u1 - u0) + (s1 - s0), kv.get("cpu"), kv["elapsed"]))
    if err:
        res["stderr"] = err[-300:]
    return res


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def wrk_percentile(out, pct):
    """The ``pct`` % latency of wrk --latency's "Latency Distribution", in µs (None if absent).

    wrk times a request from its write to the end of its response; with a
    pipeline script it times each batch (write of 16 to the 16th response)."""
    m = re.search(r"(?m)^\s*%d%%\s+([\d.]+)(us|ms|s|m|h)\s*$" % pct, out)
    return float(m.group(1)) * _UNITS[m.group(2)] * 1e6 if m else None


def measure_wrk(srv, sc, dur, cfg):
    url = "http://%s:%d/" % (HOST, srv.port)
    cmd = ["wrk", "-t1", "-c%d" % sc["conns"], "-d%ds" % max(1, round(dur)), "--timeout", "5s", "--latency"]
    if sc.get("pipeline"):
        cmd += ["-s", os.path.join(BENCH, "pipeline.lua"), url, "--", str(sc["pipeline"])]
    else:
        cmd += [url]
    pids = srv.pids()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped in the window
    u0, s0 = cpu_times(pids)
    b0 = cpu_busy()
    p = spawn(cmd, cfg["load_cpu"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
              stderr=subprocess.STDOUT, universal_newlines=True)
    try:
        out, _ = p.communicate(timeout=dur + 60)
    finally:
        reap(p, timeout=5, sig=signal.SIGKILL)
    u1, s1 = cpu_times(pids)
    b1 = cpu_busy()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not m:
        raise RuntimeError("wrk output not understood:\n" + out[-1000:])
    n = int(m.group(1))
    secs = float(m.group(2)) * _UNITS.get(m.group(3), 1.0)
    errors = 0
    m2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m2:
        errors += int(m2.group(1))
    m3 = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m3:
        errors += sum(int(x) for x in m3.groups())
    res = dict(count=n, rate=n / secs if secs else 0.0,
               user_us=(u1 - u0) * 1e6 / n if n else None,
               sys_us=(s1 - s0) * 1e6 / n if n else None,
               cpu_util=((u1 - u0) + (s1 - s0)) / secs if secs else None,
               load_util=wrk_cpu / secs if secs else None,
               p50_us=wrk_percentile(out, 50), p99_us=wrk_percentile(out, 99),
               errors=errors)
    res.update(foreign_load(b0, b1, cfg, (u1 - u0) + (s1 - s0), wrk_cpu, secs))
    return res


def measure_idle(srv, sc, dur, cfg):
    n = sc["conns"]
    time.sleep(0.2)
    pids = srv.pids()
    r0 = rss_bytes(pids)
    p = spawn([LOADGEN, "idle", HOST, str(srv.port), str(n)], cfg["load_cpu"],
              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        line = LineReader(p.stdout).readline(180)
        t_open = time.monotonic() - t0
        if not line.startswith("READY"):
            raise RuntimeError("loadgen idle: %r" % line)
        time.sleep(0.5)
        pids = srv.pids()
        r1 = rss_bytes(pids)
        kv = _parse_kv(line)
        try:
            p.stdin.write(b"\n")
            p.stdin.flush()
        except OSError:
            pass
        p.wait(30)
    finally:
        reap(p, timeout=5, sig=signal.SIGKILL)
    opened = int(kv.get("conns", 0))
    return dict(count=opened, bytes_per_conn=(r1 - r0) / opened if opened else None,
                rss_before=r0, rss_after=r1, open_secs=t_open,
                errors=int(kv.get("errors", 0)) + (n - opened))


def noise(res):
    """The larger share of a pinned CPU that other processes took during a measurement."""
    return max(res.get("other_cpu0", 0.0), res.get("other_cpu1", 0.0))


def wait_quiet(cfg, max_noise, max_wait):
    """Wait (up to max_wait s) until other processes use at most max_noise of each
    pinned CPU over a 0.5 s sample; returns the seconds waited."""
    cpus = [c for c in (cfg["server_cpu"], cfg["load_cpu"]) if c is not None]
    if not cpus or max_noise >= 1:
        return 0.0
    t0 = time.monotonic()
    while True:
        b0 = cpu_busy()
        time.sleep(0.5)
        b1 = cpu_busy()
        # the harness sleeps here, so everything busy on these CPUs is foreign
        busy = max((b1[c] - b0[c]) / 0.5 for c in cpus if c in b0 and c in b1)
        if busy <= max_noise or time.monotonic() - t0 >= max_wait:
            return time.monotonic() - t0 - 0.5


def measure(name, sc, dur, cfg):
    srv = Server(name, sc["kind"], cfg, cfg["server_cpu"])
    rc = None
    try:
        if sc["tool"] == "wrk":
            res = measure_wrk(srv, sc, dur, cfg)
        elif sc["tool"] == "idle":
            res = measure_idle(srv, sc, dur, cfg)
        else:
            res = measure_loadgen(srv, sc, dur, cfg)
        if not srv.alive():
            res["note"] = "server died during the run (rc=%s): %s" % (srv.proc.returncode, srv.stderr_tail()[-300:])
    finally:
        tail = srv.stderr_tail()
        # (the kernel takes seconds to tear down 10 000 connection threads)
        rc = srv.stop(timeout=20.0 if sc["tool"] == "idle" else 5.0)
    if rc != 0:
        res["exit_note"] = "exit code %s after SIGTERM (expected 0)" % rc
    if re.search(r"traceback|error|exception|warning", tail, re.I):
        res["stderr"] = tail[-500:]
    return res


# --------------------------------------------------------------------------- report

def fmt_rate(x):
    if x is None:
        return "-"
    if x >= 1e6:
        return "%.2fM" % (x / 1e6)
    if x >= 1e4:
        return "%.1fk" % (x / 1e3)
    if x >= 1e3:
        return "%.2fk" % (x / 1e3)
    return "%.0f" % x


def fmt_us(x):
    if x is None:
        return "-"
    return "%.2f" % x if x < 10 else "%.1f" % x


def fmt_lat(us):
    """A latency in µs as text: µs below 1 ms, else ms."""
    if us is None:
        return "-"
    if us < 1000:
        return "%.0f µs" % us
    return "%.2f ms" % (us / 1000) if us < 10000 else "%.1f ms" % (us / 1000)


def fmt_latency(row):
    """ "p50 / p99" of a summary row."""
    if row.get("p50_us") is None and row.get("p99_us") is None:
        return "-"
    return "%s / %s" % (fmt_lat(row.get("p50_us")), fmt_lat(row.get("p99_us")))


def fmt_ratio(a, b):
    if not a or not b:
        return "-"
    return "%.2f" % (a / b)


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(results, servers):
    """results[scenario][server] = [run dicts] -> rows with medians."""
    out = {}
    for sc in SCENARIOS:
        rows = {}
        for srv in servers:
            runs = [r for r in results.get(sc["name"], {}).get(srv, []) if "error" not in r]
            fails = [r for r in results.get(sc["name"], {}).get(srv, []) if "error" in r]
            if not runs and not fails:
                continue
            row = dict(runs=len(runs), failed=len(fails),
                       disturbed=sum(1 for r in runs if noise(r) > 0.3),
                       errors=sum(r.get("errors", 0) for r in runs),
                       notes=sorted({r[k] for r in runs + fails for k in ("note", "error", "exit_note") if r.get(k)}))
            if sc["tool"] == "idle":
                vals = [r["bytes_per_conn"] for r in runs if r.get("bytes_per_conn") is not None]
                row.update(value=med(vals), lo=min(vals) if vals else None, hi=max(vals) if vals else None)
            else:
                vals = [r["rate"] for r in runs]
                row.update(value=med(vals), lo=min(vals) if vals else None, hi=max(vals) if vals else None,
                           user_us=med([r.get("user_us") for r in runs]),
                           sys_us=med([r.get("sys_us") for r in runs]),
                           cpu_util=med([r.get("cpu_util") for r in runs]),
                           load_util=med([r.get("load_util") for r in runs]),
                           p50_us=med([r.get("p50_us") for r in runs]),
                           p99_us=med([r.get("p99_us") for r in runs]),
                           other_cpu0=med([r.get("other_cpu0") for r in runs]),
                           other_cpu1=med([r.get("other_cpu1") for r in runs]))
            rows[srv] = row
        if rows:
            out[sc["name"]] = rows
    return out


def tables_markdown(summary, servers):
    lines = []
    for sc in SCENARIOS:
        rows = summary.get(sc["name"])
        if not rows:
            continue
        g = rows.get("goev")
        lines.append("### %s (`%s`)" % (sc["title"], sc["name"]))
        lines.append("")
        if sc["tool"] == "idle":
            lines.append("| server | KiB per idle conn (median) | min–max | goev ÷ this |")
            lines.append("|---|---:|---:|---:|")
            for srv in servers:
                r = rows.get(srv)
                if not r:
                    continue
                kib = lambda v: "-" if v is None else "%.2f" % (v / 1024)
                lines.append("| %s | %s | %s–%s | %s |" % (
                    SERVER_TITLES[srv], kib(r["value"]), kib(r["lo"]), kib(r["hi"]),
                    fmt_ratio(g and g["value"], r["value"])))
        else:
            u = sc["unit"]
            lines.append("| server | %s/s (median) | min–max | p50 / p99 latency | user µs/%s | sys µs/%s | server CPU | load CPU | other load CPU 0 / 1 | goev ÷ this, %s/s | goev ÷ this, user µs |"
                         % (u, u, u, u))
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for srv in servers:
                r = rows.get(srv)
                if not r:
                    continue
                pct = lambda v: "-" if v is None else "%.0f%%" % (100 * v)
                lines.append("| %s | %s | %s–%s | %s | %s | %s | %s | %s | %s / %s | %s | %s |" % (
                    SERVER_TITLES[srv], fmt_rate(r["value"]), fmt_rate(r["lo"]), fmt_rate(r["hi"]),
                    fmt_latency(r), fmt_us(r.get("user_us")), fmt_us(r.get("sys_us")),
                    pct(r.get("cpu_util")), pct(r.get("load_util")),
                    pct(r.get("other_cpu0")), pct(r.get("other_cpu1")),
                    fmt_ratio(g and g["value"], r["value"]),
                    fmt_ratio(g and g.get("user_us"), r.get("user_us"))))
        notes = []
        dist = ["%s %d/%d" % (srv, rows[srv]["disturbed"], rows[srv]["runs"])
                for srv in servers if srv in rows and rows[srv].get("disturbed")]
        if dist:
            notes.append("disturbed measurements (other processes took > 30%% of a pinned CPU): %s"
                         % ", ".join(dist))
        for srv in servers:
            r = rows.get(srv)
            if not r:
                continue
            if r["failed"]:
                notes.append("%s: %d of %d runs failed" % (srv, r["failed"], r["failed"] + r["runs"]))
            if r["errors"]:
                notes.append("%s: %d client-side errors (failed connections or bad responses)" % (srv, r["errors"]))
            for n in r["notes"]:
                notes.append("%s: %s" % (srv, n.replace("\n", " ")[:300]))
        if notes:
            lines.append("")
            for n in notes:
                lines.append("- " + n)
        lines.append("")
    return "\n".join(lines)


def summary_matrix(summary, servers, key, title, fmt):
    cols = [s for s in servers if any(s in summary.get(sc["name"], {}) for sc in SCENARIOS)]
    lines = ["| scenario | " + " | ".join(SERVER_TITLES[s] for s in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for sc in SCENARIOS:
        rows = summary.get(sc["name"])
        if not rows or (key != "value" and sc["tool"] == "idle"):
            continue
        if key == "value" and sc["tool"] == "idle":
            f = lambda v: "-" if v is None else "%.2f KiB" % (v / 1024)
        else:
            f = fmt
        lines.append("| %s | " % sc["name"] + " | ".join(
            (fmt_latency(rows[s]) if key == "latency" else f(rows[s].get(key))) if s in rows else ""
            for s in cols) + " |")
    return "**%s**\n\n" % title + "\n".join(lines)


def machine_info():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(nproc=os.cpu_count(), cpu=model, kernel=platform.release(),
                python=platform.python_version(), impl=platform.python_implementation())
    for srv, expr in (("uvloop", "uvloop.__version__"), ("twisted", "twisted.__version__"),
                      ("tornado", "tornado.version"), ("gevent", "gevent.__version__")):
        try:
            r = _run([VENV_PY, "-c", "import %s; print(%s)" % (srv, expr)], timeout=30)
            info[srv] = r.stdout.strip() if r.returncode == 0 else "-"
        except Exception:
            info[srv] = "-"
    try:
        info["wrk"] = _run(["wrk", "-v"], timeout=10).stdout.split("\n")[0].strip()
    except Exception:
        info["wrk"] = "-"
    try:
        r = _run([sys.executable, "-c", "import goev; print(goev.__version__)"], timeout=30, cwd=ROOT)
        info["goev"] = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else "-"
    except Exception:
        info["goev"] = "-"
    try:
        info["commit"] = _run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], timeout=10).stdout.strip()
    except Exception:
        info["commit"] = "-"
    return info


def svg_chart(summary, servers, info):
    """Small multiples, one panel per scenario: a bar per server (median, min–max whisker)."""
    panels = [sc for sc in SCENARIOS if sc["name"] in summary]
    cols, pw, bar_h, gap = 2, 480, 18, 6
    label_w, right_pad = 120, 150
    esc = lambda s: s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    heights = []
    for sc in panels:
        n = len(summary[sc["name"]])
        heights.append(40 + n * (bar_h + gap) + 10)
    row_h = [max(heights[i:i + cols]) for i in range(0, len(heights), cols)]
    W = cols * pw + 20
    # legend entries, wrapped onto as many 16 px lines as the width needs
    legend, x, ly = [], 10, 64
    for srv in servers:
        w = 20 + 7 * len(SERVER_TITLES[srv])
        if x > 10 and x + w > W - 10:
            x, ly = 10, ly + 16
        legend.append((srv, x, ly))
        x += w
    y0 = ly + 22
    H = y0 + sum(row_h) + 30
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
           'font-family="Helvetica, Arial, sans-serif" font-size="11">' % (W, H, W, H),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="10" y="22" font-size="16" font-weight="bold">goev.py vs asyncio, uvloop, Twisted, tornado, gevent, threads and a bare epoll loop</text>',
           '<text x="10" y="38" fill="#555">%s · %s CPUs · Linux %s · Python %s · server on CPU 0, load generator on CPU 1, 127.0.0.1</text>'
           % (esc(info.get("cpu", "?"))[:40], info.get("nproc"), esc(info.get("kernel", "")), info.get("python")),
           '<text x="10" y="54" fill="#555">bar = median of %s run(s), whisker = min–max; label: throughput · server user CPU µs per request '
           '(the sharpest number: lower is better)</text>' % info.get("runs")]
    for srv, x, ly in legend:
        out.append('<rect x="%d" y="%d" width="10" height="10" fill="%s"/>' % (x, ly, COLORS[srv]))
        out.append('<text x="%d" y="%d">%s</text>' % (x + 14, ly + 9, esc(SERVER_TITLES[srv])))
    for i, sc in enumerate(panels):
        r, c = divmod(i, cols)
        px, py = 10 + c * pw, y0 + sum(row_h[:r])
        rows = summary[sc["name"]]
        idle = sc["tool"] == "idle"
        vmax = max((v["hi"] or v["value"] or 0) for v in rows.values()) or 1
        unit = "KiB/conn (lower is better)" if idle else "%s/s" % sc["unit"]
        out.append('<text x="%d" y="%d" font-weight="bold">%s</text>' % (px, py + 14, esc(sc.get("short", sc["title"]))))
        out.append('<text x="%d" y="%d" fill="#555">%s</text>' % (px, py + 28, esc(unit)))
        scale = (pw - label_w - right_pad) / vmax
        yy = py + 36
        for srv in servers:
            v = rows.get(srv)
            if not v:
                continue
            val = v["value"] or 0
            out.append('<text x="%d" y="%d" text-anchor="end">%s</text>' % (px + label_w - 6, yy + 13, esc(SERVER_TITLES[srv])))
            out.append('<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>'
                       % (px + label_w, yy, max(1.0, val * scale), bar_h, COLORS[srv]))
            if v.get("lo") is not None and v.get("hi") is not None:
                x1, x2 = px + label_w + v["lo"] * scale, px + label_w + v["hi"] * scale
                ym = yy + bar_h / 2
                out.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#222" stroke-width="1"/>' % (x1, ym, x2, ym))
                for xe in (x1, x2):
                    out.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#222" stroke-width="1"/>' % (xe, ym - 4, xe, ym + 4))
            if idle:
                text = "-" if v["value"] is None else "%.2f KiB" % (v["value"] / 1024)
            else:
                text = fmt_rate(v["value"])
                if v.get("user_us") is not None:
                    text += " · %s µs user" % fmt_us(v["user_us"])
            out.append('<text x="%.1f" y="%d">%s</text>' % (px + label_w + max(val, v.get("hi") or 0) * scale + 6, yy + 13, esc(text)))
            yy += bar_h + gap
    out.append('<text x="10" y="%d" fill="#777">generated by bench/run.py on %s</text>' % (H - 10, esc(info.get("date", ""))))
    out.append("</svg>")
    return "\n".join(out) + "\n"


GENERATED_SECTIONS = ("## Summary", "## Scenarios")


def kept_sections(path):
    """Sections that others added to RESULTS.md (a "## " heading other than the
    ones this harness writes, e.g. a soak report) are carried over unchanged."""
    try:
        with open(path) as f:
            old = f.read()
    except OSError:
        return ""
    parts = re.split(r"(?m)^(?=## )", old)
    kept = [p for p in parts[1:] if not p.startswith(GENERATED_SECTIONS)]
    return ("\n" + "".join(kept).rstrip() + "\n") if kept else ""


def write_report(results, servers, notes, info, args_line, wall, write_files=True):
    summary = summarize(results, servers)
    body = tables_markdown(summary, servers)
    warm = ("Every measurement uses a freshly started server that has first served one warm-up "
            "connection (opened, one echo or one request, closed): asyncio's speed depends on the "
            "state of glibc malloc, so all servers are measured warm.")
    md = ["# goev.py benchmark results", "",
          "Generated by `%s` on %s (wall time %.0f s)." % (args_line, info["date"], wall), "",
          "Machine: %s CPUs, %s, Linux %s, %s %s; uvloop %s, Twisted %s, tornado %s, gevent %s; %s; goev %s (commit %s)." % (
              info["nproc"], info["cpu"], info["kernel"], info["impl"], info["python"],
              info.get("uvloop", "-"), info.get("twisted", "-"), info.get("tornado", "-"), info.get("gevent", "-"),
              info.get("wrk", "-"), info.get("goev", "-"), info.get("commit", "-")), "",
          "Method: server pinned to CPU 0, load generator (bench/loadgen.c or wrk) pinned to CPU 1, "
          "all traffic on 127.0.0.1. Servers run round robin inside each run; each cell is the median "
          "of %d run(s) of %.0f s, with the min–max of the throughput. Twisted, tornado and gevent run the "
          "echo and HTTP scenarios only. Latency p50 / p99 comes from the load generator: bench/loadgen.c "
          "times each echo message from when it joins its connection's send queue to its last echoed byte "
          "(connect mode: connect() to the echo), wrk --latency each request (with the pipeline script "
          "each batch of 16). CPU per request is the server "
          "process's utime/stime (/proc/PID/stat fields 14 and 15, summed over its child processes) over "
          "the load window divided by the requests served. On loopback the kernel's share of a request is "
          "about the same for every server, so **user µs per request is the sharpest comparison**; "
          "req/s also depends on how much of CPU 0 the server can use. `goev ÷ this` > 1 means goev is "
          "higher (better for req/s, worse for µs and KiB). `server CPU` and `load CPU` are the share of "
          "one core the server and the load generator used in the window: when the load generator is "
          "near 100%% the scenario measures the client, not the server, and only the µs columns compare "
          "servers. `other load CPU 0 / 1` is the share of each pinned CPU that other processes on the "
          "machine (or the hypervisor: steal) took during the window, irq/softirq time left out: "
          "high values mean the run was disturbed." % (info["runs"], info["duration"]), "",
          warm, "",
          "The machine is shared and noisy (2 cores); compare ratios within one run rather than "
          "absolute numbers across runs.", ""]
    notes = [n for n in notes if not n.startswith("`epoll minimum`")]
    if "epoll_min" in servers:
        notes.append("`epoll minimum` (bench/servers/epoll_min.py, echo only) is not a server but a "
                     "lower bound: the cheapest echo loop CPython can run (fd-level os.readv/os.write, "
                     "one view per length, no handler objects, no call per event, no write queue).  "
                     "It shows what a pure-Python reactor's abstractions cost on top of the kernel.")
    if notes:
        md.append("Notes:")
        md.append("")
        for n in notes:
            md.append("- " + n)
        md.append("")
    md.append("## Summary")
    md.append("")
    md.append(summary_matrix(summary, servers, "user_us", "User CPU µs per request (median; lower is better)", fmt_us))
    md.append("")
    md.append(summary_matrix(summary, servers, "value", "Throughput per second (median), and KiB per idle connection", fmt_rate))
    md.append("")
    md.append(summary_matrix(summary, servers, "latency", "Latency p50 / p99 (median over runs; lower is better)", None))
    md.append("")
    md.append("![results](results.svg)")
    md.append("")
    md.append("## Scenarios")
    md.append("")
    md.append(body)
    text = "\n".join(md) + "\n"
    log("")
    log(summary_matrix(summary, servers, "user_us", "User CPU µs per request (median; lower is better)", fmt_us))
    log("")
    log(summary_matrix(summary, servers, "latency", "Latency p50 / p99 (median over runs; lower is better)", None))
    log("")
    log(body)
    if write_files:
        path = os.path.join(BENCH, "RESULTS.md")
        text += kept_sections(path)
        with open(path, "w") as f:
            f.write(text)
        with open(os.path.join(BENCH, "results.svg"), "w") as f:
            f.write(svg_chart(summary, servers, info))
        with open(os.path.join(BENCH, "results.json"), "w") as f:
            json.dump(dict(info=info, notes=notes, command=args_line, results=results), f, indent=1, sort_keys=True)
        log("wrote bench/RESULTS.md, bench/results.svg, bench/results.json")


# --------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description="goev.py benchmark harness (loopback only)")
    ap.add_argument("--quick", action="store_true", help="1 run instead of 3")
    ap.add_argument("--duration", type=float, help="seconds per measurement (default 2)")
    ap.add_argument("--runs", type=int, help="runs per server and scenario (default 3, --quick 1)")
    ap.add_argument("--only", help="comma-separated scenarios: " + ",".join(s["name"] for s in SCENARIOS))
    ap.add_argument("--servers", default=",".join(ALL_SERVERS), help="comma-separated subset of " + ",".join(ALL_SERVERS + EXTRA_SERVERS))
    ap.add_argument("--no-write", action="store_true", help="print the tables, do not write RESULTS.md/results.svg")
    ap.add_argument("--max-noise", type=float, default=0.3,
                    help="other processes' share of a pinned CPU above which the harness waits before a "
                         "measurement (up to --quiet-wait s) and repeats a disturbed one once, time "
                         "budget permitting (default 0.3; 1 disables)")
    ap.add_argument("--quiet-wait", type=float, default=4.0, help="seconds to wait for quiet CPUs (default 4)")
    ap.add_argument("--from-json", metavar="PATH",
                    help="measure nothing: rewrite RESULTS.md and results.svg from a results.json")
    a = ap.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            d = json.load(f)
        write_report(d["results"], d["info"]["servers"], d["notes"], d["info"], d["command"],
                     d["info"].get("wall", 0.0), write_files=not a.no_write)
        return 0
    # 8 servers x 9 scenarios x 3 runs: 2 s windows keep a default run near 10 minutes
    dur = a.duration or 2.0
    runs = a.runs or (1 if a.quick else 3)
    if dur <= 0 or dur > 60 or runs < 1 or runs > 20:
        ap.error("--duration must be in (0, 60] and --runs in [1, 20]")
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    bad = [s for s in servers if s not in ALL_SERVERS + EXTRA_SERVERS]
    if bad:
        ap.error("unknown server(s): %s" % ", ".join(bad))
    if a.only:
        names = [s.strip() for s in a.only.split(",") if s.strip()]
        bad = [n for n in names if n not in SCENARIO_BY_NAME]
        if bad:
            ap.error("unknown scenario(s): %s (known: %s)" % (", ".join(bad), ", ".join(SCENARIO_BY_NAME)))
        scenarios = [s for s in SCENARIOS if s["name"] in names]
    else:
        scenarios = list(SCENARIOS)
    args_line = "python bench/run.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv))

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    notes = []
    ncpu = len(os.sched_getaffinity(0))
    if ncpu >= 2:
        cpus = sorted(os.sched_getaffinity(0))
        cfg = dict(server_cpu=cpus[0], load_cpu=cpus[1])
        os.sched_setaffinity(0, {cpus[1]})  # keep the harness off the server's CPU
    else:
        cfg = dict(server_cpu=None, load_cpu=None)
        notes.append("only one CPU available: no pinning, server and load share it.")
    have_wrk = ensure_wrk(notes)
    have_loadgen = ensure_loadgen(notes)
    have_venv = ensure_venv(servers, notes)
    goev_echo, goev_http, extra = goev_support(notes) if "goev" in servers else (False, False, [])
    cfg["goev_extra"] = extra
    if extra:
        notes.append("goev runs with `%s` (one poller, as the other servers use one thread for I/O)." % " ".join(extra))

    def available(srv, sc):
        if sc["tool"] == "wrk" and not have_wrk:
            return False
        if sc["tool"] != "wrk" and not have_loadgen:
            return False
        if srv in VENV_PACKAGES and srv not in have_venv:
            return False
        if srv in FRAMEWORKS:
            return sc["tool"] in ("loadgen", "wrk")
        if srv == "goev":
            return goev_http if sc["kind"] == "http" else goev_echo
        if srv == "epoll_min":
            return sc["kind"] == "echo"
        return True

    info = machine_info()
    info.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                runs=runs, duration=dur, servers=servers, scenarios=[s["name"] for s in scenarios])
    for n in notes:
        log("note: " + n)
    log("servers: %s; scenarios: %s; %d run(s) x %.0f s" % (",".join(servers), ",".join(s["name"] for s in scenarios), runs, dur))
    results = {}
    t_start = time.monotonic()
    # Waits for quiet CPUs and repeats of disturbed measurements stop once they
    # have used this much extra time, so a noisy machine cannot stretch a run.
    nominal = runs * sum(3.0 if sc["tool"] == "idle" else dur + 1.0
                         for sc in scenarios for srv in servers if available(srv, sc))
    budget = 0.25 * nominal  # extra seconds for waits and repeats: at most 1.25x the nominal run
    extra = [0.0]
    budget_note = []
    try:
        for run in range(runs):
            order = servers[run % len(servers):] + servers[:run % len(servers)]
            for sc in scenarios:
                for srv in order:
                    if not available(srv, sc):
                        continue
                    t0 = time.monotonic()
                    res = None
                    for attempt in (1, 2):
                        over = extra[0] > budget  # past it: no waits, no retries
                        if over and not budget_note:
                            budget_note.append("the extra time for noise (%.0f s) ran out during run %d, %s: "
                                               "later measurements were neither delayed nor repeated."
                                               % (budget, run + 1, sc["name"]))
                        waited = 0.0 if over else wait_quiet(cfg, a.max_noise, a.quiet_wait)
                        extra[0] += waited + (0.5 if not over and a.max_noise < 1 else 0.0)
                        t_attempt = time.monotonic()
                        try:
                            r = measure(srv, sc, dur, cfg)
                        except (RuntimeError, OSError, TimeoutError, subprocess.SubprocessError, KeyError, ValueError) as e:
                            r = dict(error="%s: %s" % (type(e).__name__, str(e)[:400]))
                        r["quiet_wait_s"] = round(waited, 1)
                        if attempt == 2:
                            r["retried"] = True
                        if res is None or ("error" in r, noise(r)) < ("error" in res, noise(res)):
                            res = r  # keep the quieter of two tries, a success before a failure
                        if attempt == 2:
                            extra[0] += time.monotonic() - t_attempt  # a repeat is extra time
                        if attempt == 2 or noise(r) <= a.max_noise or extra[0] > budget:
                            break
                        log("   disturbed (other load %.0f%%): measuring again" % (100 * noise(r)))
                    results.setdefault(sc["name"], {}).setdefault(srv, []).append(res)
                    if "error" in res:
                        desc = "FAILED " + res["error"]
                    elif sc["tool"] == "idle":
                        desc = "%s KiB/conn (%d conns, opened in %.1f s)" % (
                            "-" if res["bytes_per_conn"] is None else "%.2f" % (res["bytes_per_conn"] / 1024),
                            res["count"], res["open_secs"])
                    else:
                        desc = "%s %s/s, user %s µs, sys %s µs, server cpu %.0f%%, load cpu %.0f%%" % (
                            fmt_rate(res["rate"]), sc["unit"], fmt_us(res["user_us"]), fmt_us(res["sys_us"]),
                            100 * (res["cpu_util"] or 0), 100 * (res.get("load_util") or 0))
                        if "other_cpu0" in res:
                            desc += ", other load %.0f%%/%.0f%%" % (100 * res["other_cpu0"], 100 * res.get("other_cpu1", 0))
                    if res.get("errors"):
                        desc += ", %d errors" % res["errors"]
                    if res.get("note"):
                        desc += " [%s]" % res["note"][:200]
                    log("run %d/%d  %-18s %-12s %s  (%.1f s)" % (run + 1, runs, sc["name"], srv, desc, time.monotonic() - t0))
    except KeyboardInterrupt:
        log("interrupted: reporting what was measured")
        notes.append("run interrupted before the end.")
    finally:
        reap_all()
    wall = time.monotonic() - t_start
    notes.extend(budget_note)
    info["wall"] = round(wall)
    write_report(results, servers, notes, info, args_line, wall, write_files=not a.no_write)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        reap_all()
