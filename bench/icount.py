#!/usr/bin/env python3
"""Instructions per request: the servers' user-space work, counted by callgrind.

    python bench/icount.py [--servers goev,epoll_floor,uvloop,asyncio]
                           [--only echo,http,accept] [--seconds 3]
                           [--goev-dir DIR | --goev-rev REV] [--runs N]
    python bench/icount.py --gate bench/icount-baseline.json      # CI: exit 1 when >3 % worse
    python bench/icount.py --write-baseline bench/icount-baseline.json --goev-rev REV --runs 3

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

Which goev.py is counted: the repository's (default), the one in ``--goev-dir
DIR`` (the server runs as ``python -m goev`` with DIR as its working directory,
which is sys.path[0] under -m; a ``python -c`` in the same directory and
environment checks that DIR/goev.py is the file imported, and the server's
/proc/PID/cwd is checked too), or the one at git revision ``--goev-rev REV``
(extracted with ``git show REV:goev.py`` into a temporary directory).

The gate (``--gate BASELINE.json``, run by .ci/run) counts goev's echo and
accept for the chosen goev.py (the working tree by default) on the baseline's
Python minor version (it re-executes itself under python3.X when started by
another one), prints the table, and exits 1 with a loud message when a count is
above baseline x limit (1.03).  A count over the limit is measured twice more
and the lowest of the three is the one judged, so a single unlucky run does not
fail CI.  ``--write-baseline FILE`` measures ``--runs`` times and writes the
median, every run and what was measured into FILE.

It installs valgrind (apt-get) when missing and reuses bench/run.py's helpers
for wrk, uvloop (bench/.venv) and the load generator.  Loopback only.
"""
import argparse
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as harness   # noqa: E402  (bench/run.py: tools, paths, Server.warm)

SCENARIOS = ("echo", "echo16k", "http", "accept")
GATE_SCENARIOS = ("echo", "accept")
DEFAULT_LIMIT = 1.03


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


def server_env():
    """The servers' environment: no PYTHONSAFEPATH (it would drop the working
    directory, and so DIR/goev.py, from sys.path under -m)."""
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)
    return env


def check_goev_dir(goev_dir):
    """The goev.py that ``python -m goev`` imports with ``goev_dir`` as its working
    directory; raises unless it is goev_dir/goev.py."""
    want = os.path.realpath(os.path.join(goev_dir, "goev.py"))
    if not os.path.isfile(want):
        raise RuntimeError("no goev.py in %s" % goev_dir)
    r = subprocess.run([sys.executable, "-c", "import os, goev; print(os.path.realpath(goev.__file__))"],
                       cwd=goev_dir, env=server_env(), capture_output=True, text=True, timeout=120)
    got = r.stdout.strip()
    if r.returncode != 0 or got != want:
        raise RuntimeError("python in %s imports goev from %r, not %s: %s"
                           % (goev_dir, got, want, r.stderr.strip()[-500:]))
    return want


def count(name, scenario, seconds, tmp, goev_dir=None):
    """(requests, instructions) for one server and scenario; goev runs the
    goev.py in goev_dir (default: the repository's)."""
    kind = "http" if scenario == "http" else "echo"
    port = harness.free_port()
    addr = "%s:%d" % (harness.HOST, port)
    out = os.path.join(tmp, "%s-%s.cg" % (name, scenario))
    cwd = goev_dir if (name == "goev" and goev_dir) else harness.ROOT
    errfile = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(["taskset", "-c", "0", "valgrind", "-q", "--tool=callgrind",
                             "--callgrind-out-file=" + out] + server_cmd(name, kind, addr),
                            cwd=cwd, env=server_env(), stdout=subprocess.DEVNULL, stderr=errfile)
    try:
        srv = harness.Server.__new__(harness.Server)   # only its readiness wait and warm-up
        srv.name, srv.kind, srv.port, srv.proc, srv.errfile = name, kind, port, proc, errfile
        srv._wait_ready(timeout=120.0)
        if name == "goev":                 # the server itself runs where `python -c` was checked
            pcwd = os.path.realpath("/proc/%d/cwd" % proc.pid)
            if pcwd != os.path.realpath(cwd):
                raise RuntimeError("goev server's working directory is %s, not %s" % (pcwd, cwd))
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


def table(res, servers, scenarios, title):
    """The markdown table of instructions per request (res[scenario, server])."""
    lines = ["", "**User-space instructions per request (callgrind; `python %s`)%s**" % (sys.version.split()[0], title), ""]
    others = [s for s in servers if s != "goev"] if "goev" in servers else []
    head = ["scenario"] + servers + ["goev ÷ %s" % s for s in others]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|" + "---:|" * (len(head) - 1))
    for sc in scenarios:
        cells = ["%.0f" % res[sc, s] if (sc, s) in res else "" for s in servers]
        ratios = ["%.2f" % (res[sc, "goev"] / res[sc, s]) if (sc, s) in res and (sc, "goev") in res else ""
                  for s in others]
        lines.append("| " + " | ".join([sc] + cells + ratios) + " |")
    return "\n".join(lines)


def measure(name, sc, seconds, tmp, goev_dir):
    t0 = time.monotonic()
    reqs, total = count(name, sc, seconds, tmp, goev_dir)
    per = total / max(reqs, 1)
    print("%-7s %-12s %7d requests  %9.0f instructions/request  (%.0f s)"
          % (sc, name, reqs, per, time.monotonic() - t0), file=sys.stderr, flush=True)
    return per


def minor(version):
    return ".".join(version.split(".")[:2])


def reexec_under(version):
    """Run this script again under CPython ``version`` (\"3.11\") when the current
    interpreter is another one; returns only when it already is that version."""
    if minor(sys.version.split()[0]) == version:
        return
    if os.environ.get("GOEV_ICOUNT_REEXEC"):
        raise SystemExit("icount: re-executed, but still not on Python %s" % version)
    cands = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/%s.*/bin/python%s" % (version, version))))
    cands += ["/usr/bin/python" + version, "/usr/local/bin/python" + version, shutil.which("python" + version)]
    for c in cands:
        if c and os.access(c, os.X_OK):
            print("icount: the baseline is for Python %s: re-running under %s" % (version, c), file=sys.stderr)
            os.environ["GOEV_ICOUNT_REEXEC"] = "1"
            os.execv(c, [c, os.path.abspath(__file__)] + sys.argv[1:])
    raise SystemExit("!! icount: the baseline is for CPython %s and there is none here "
                     "(looked in ~/.pyenv/versions, /usr/bin, /usr/local/bin, PATH)" % version)


def goev_source(args, tmpdir):
    """(directory holding the goev.py to count, a description of it)."""
    if args.goev_rev:
        d = os.path.join(tmpdir, "goev-rev")
        os.makedirs(d)
        r = subprocess.run(["git", "-C", harness.ROOT, "show", "%s:goev.py" % args.goev_rev],
                           capture_output=True, timeout=60)
        if r.returncode != 0:
            raise SystemExit("icount: git show %s:goev.py failed: %s" % (args.goev_rev, r.stderr.decode()[-500:]))
        with open(os.path.join(d, "goev.py"), "wb") as f:
            f.write(r.stdout)
        full = subprocess.run(["git", "-C", harness.ROOT, "rev-parse", "--short", args.goev_rev],
                              capture_output=True, text=True).stdout.strip()
        return d, "goev.py at commit %s" % (full or args.goev_rev)
    d = os.path.abspath(args.goev_dir or harness.ROOT)
    if d == harness.ROOT:
        return d, "the working tree's goev.py"
    return d, "%s/goev.py" % d


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default="goev,epoll_floor,uvloop,asyncio")
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated: " + ",".join(SCENARIOS))
    ap.add_argument("--seconds", type=int, default=3, help="load window per measurement (default 3)")
    ap.add_argument("--runs", type=int, default=1, help="measurements per server and scenario; "
                    "the table shows the median (default 1)")
    ap.add_argument("--keep", metavar="DIR", help="keep the callgrind dumps in DIR "
                    "(read them with callgrind_annotate)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--goev-dir", metavar="DIR", help="count DIR/goev.py (default: the repository's)")
    src.add_argument("--goev-rev", metavar="REV", help="count goev.py as at git revision REV")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--gate", metavar="BASELINE", help="CI gate: count goev %s and exit 1 when one is "
                      "above the baseline's count x its limit" % "/".join(GATE_SCENARIOS))
    mode.add_argument("--write-baseline", metavar="FILE", help="count goev %s --runs times and write "
                      "the medians to FILE" % "/".join(GATE_SCENARIOS))
    ap.add_argument("--limit", type=float, help="with --gate: the allowed ratio (default: the "
                    "baseline's limit, else %.2f)" % DEFAULT_LIMIT)
    ap.add_argument("--note", help="with --write-baseline: the note stored in the file")
    args = ap.parse_args()
    started = time.monotonic()

    baseline = None
    if args.gate:
        with open(args.gate) as f:
            baseline = json.load(f)
        reexec_under(minor(baseline["python"]))
        args.servers, args.only = "goev", ",".join(baseline["instructions_per_request"])
        args.seconds = baseline.get("seconds", args.seconds)
    elif args.write_baseline:
        args.servers, args.only = "goev", ",".join(GATE_SCENARIOS)
    servers = harness.split_checked(ap, args.servers, ("goev", "epoll_floor", "epoll_min", "uvloop", "asyncio"),
                                    "server")
    scenarios = harness.split_checked(ap, args.only, SCENARIOS, "scenario")
    if not ensure_valgrind():
        print("valgrind is missing and cannot be installed here", file=sys.stderr)
        return 1
    if not harness.ensure_tools(servers, "http" in scenarios):
        return 1
    res, runs = {}, {}
    with tempfile.TemporaryDirectory(prefix="goev-icount-") as tmp:
        goev_dir, what = goev_source(args, tmp)
        if "goev" in servers:
            goev_file = check_goev_dir(goev_dir)
            print("icount: goev = %s (%s), python %s" % (goev_file, what, sys.version.split()[0]), file=sys.stderr)
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            tmp = args.keep
        try:
            for sc in scenarios:
                for name in servers:
                    if name == "epoll_min" and sc == "http":
                        continue                    # (echo only)
                    runs[sc, name] = [measure(name, sc, args.seconds, tmp, goev_dir)
                                      for _ in range(max(args.runs, 1))]
                    res[sc, name] = statistics.median(runs[sc, name])
        except (RuntimeError, OSError, subprocess.SubprocessError, AttributeError) as e:
            if baseline is None:
                raise
            print("\n" + "!" * 78 + "\n!! ICOUNT GATE FAILED: could not measure %s: %s\n" % (what, e) + "!" * 78)
            return 1
        if baseline is not None:
            return gate(baseline, args, res, runs, tmp, goev_dir, what, started)
        if args.write_baseline:
            return write_baseline(args, res, runs, goev_file, what)
    print(table(res, servers, scenarios, ""))
    if args.runs > 1:
        print("\n(median of %d runs; every run: %s)" % (args.runs, "; ".join(
            "%s %s %s" % (sc, n, " ".join("%.0f" % v for v in vs)) for (sc, n), vs in runs.items())))
    return 0


def write_baseline(args, res, runs, goev_file, what):
    out = {
        "note": args.note or (
            "Why: a standing gate against hot-path regressions; CPU time on the shared 2-core CI "
            "machines moves 10-30 % between runs, callgrind's instruction count ~1 %. "
            "When to update: after a change that is meant to make goev's echo or accept path more "
            "(or much less) expensive, or a new Python 3.11 patch release / valgrind; re-measure with "
            "`python3.11 bench/icount.py --write-baseline bench/icount-baseline.json --goev-rev HEAD --runs 3` "
            "and commit the file with the change that explains it."),
        "python": sys.version.split()[0],
        "goev": what,
        "goev_sha256": sha256(goev_file),
        "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
        "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": args.seconds,
        "limit": DEFAULT_LIMIT,
        "instructions_per_request": {sc: round(res[sc, "goev"]) for sc in GATE_SCENARIOS},
        "runs": {sc: [round(v) for v in runs[sc, "goev"]] for sc in GATE_SCENARIOS},
    }
    with open(args.write_baseline, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(table(res, ["goev"], list(GATE_SCENARIOS), " -- baseline written to %s" % args.write_baseline))
    for sc in GATE_SCENARIOS:
        vs = runs[sc, "goev"]
        print("%s: runs %s, spread %.2f %%" % (sc, " ".join("%.0f" % v for v in vs),
                                               100.0 * (max(vs) - min(vs)) / min(vs)))
    return 0


def gate(baseline, args, res, runs, tmp, goev_dir, what, started):
    limit = args.limit or baseline.get("limit", DEFAULT_LIMIT)
    base = baseline["instructions_per_request"]
    if sys.version.split()[0] != baseline["python"]:
        print("note: baseline measured on Python %s, this is %s: counts may differ by a little"
              % (baseline["python"], sys.version.split()[0]), file=sys.stderr)
    judged = {}
    for sc in base:
        vals = runs[sc, "goev"]
        while min(vals) > base[sc] * limit and len(vals) < 3:   # confirm before failing CI
            print("icount gate: %s %.0f is over the limit: measuring again" % (sc, min(vals)), file=sys.stderr)
            vals.append(measure("goev", sc, args.seconds, tmp, goev_dir))
        judged[sc] = min(vals)
        res[sc, "goev"] = judged[sc]
    print(table(res, ["goev"], list(base), " -- %s vs baseline (%s, Python %s)"
                % (what, baseline.get("goev", "?"), baseline["python"])))
    print("\n| scenario | baseline | now | now ÷ baseline | limit | runs |")
    print("|---|---:|---:|---:|---:|---|")
    bad = []
    for sc in base:
        ratio = judged[sc] / base[sc]
        verdict = "**OVER**" if ratio > limit else "ok"
        print("| %s | %d | %.0f | %.3f | %.2f %s | %s |" % (sc, base[sc], judged[sc], ratio, limit, verdict,
                                                          " ".join("%.0f" % v for v in runs[sc, "goev"])))
        if ratio > limit:
            bad.append((sc, judged[sc], base[sc], ratio))
    took = time.monotonic() - started
    print("\n(icount gate: %.0f s)" % took)
    if bad:
        print("\n" + "!" * 78)
        for sc, now, b, ratio in bad:
            print("!! ICOUNT GATE FAILED: goev %s costs %.0f instructions/request, baseline %d: "
                  "ratio %.3f > limit %.2f" % (sc, now, b, ratio, limit))
        print("!! (lowest of %d runs; baseline: %s).  If the extra cost is intended, re-measure the baseline:"
              % (len(runs[bad[0][0], "goev"]), args.gate))
        print("!!   python3.11 bench/icount.py --write-baseline %s --goev-rev HEAD --runs 3" % args.gate)
        print("!" * 78)
        return 1
    for sc in base:
        if judged[sc] < base[sc] * 0.95:
            print("note: goev %s is %.1f %% under the baseline: consider re-measuring it to lock the gain in"
                  % (sc, 100.0 * (1 - judged[sc] / base[sc])))
    print("icount gate passed: every count within %.0f %% of the baseline" % (100 * (limit - 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
