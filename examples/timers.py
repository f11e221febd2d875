"""timers.py -- goev's timers: one-shot, periodic, cancel, return False, from another thread.

Lesson: a reactor is also a scheduler.  Each poller keeps a heap of timers
and sleeps in epoll_wait exactly until the next one is due, so timers cost
nothing while they wait and run on the poller thread, between I/O events.

  * ``reactor.call_later(delay_s, fn, *args)`` -- a one-shot call; returns a
    ``Timer`` whose ``cancel()`` works from any thread, even from a callback.
  * ``handler.schedule_timer(delay_ms, interval_ms)`` -- a handler's own
    (periodic) timer: ``on_timeout(now_ms)`` runs on the same thread as the
    handler's I/O, so it needs no locks; returning False stops it.
  * From another thread, ``call_later`` is handed to the poller through its
    inbox and wakes it: that is how a worker thread gives a result back.

Timers never fire early (each line shows when it ran and when it was due)
and the program stops itself after about one second.

Try it:

    python3 examples/timers.py
"""

import argparse
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import goev  # noqa: E402  (imported from the repo root, see the line above)

T0 = time.monotonic()


def ms():
    return (time.monotonic() - T0) * 1000.0


def say(due_ms, what):
    # The due time is computed before the timer is scheduled, so "ran" >= "due" always.
    print("%7.1f ms  due %4d ms  %s" % (ms(), due_ms, what), flush=True)


class Heartbeat(goev.IOHandle):
    """A handler with a periodic timer.  goev timers belong to a handler (as in Go
    goev) so that they run on the handler's poller; this one has no other job."""

    def __init__(self):
        self.beats = 0

    def on_timeout(self, now_ms):
        self.beats += 1
        say(200 * self.beats, "periodic: beat %d of 3 (on_timeout)" % self.beats)
        return self.beats < 3        # the third returns False: the timer stops


def main(argv=None):
    # No options: argparse gives --help and refuses stray arguments (exit 2).
    argparse.ArgumentParser(prog="python3 examples/timers.py",
                            description="goev's timers, shown on a one-second timeline.").parse_args(argv)
    reactor = goev.Reactor()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: reactor.stop())

    # 1. A one-shot call.
    reactor.call_later(0.1, say, 100, "one-shot: call_later(0.1, ...)")

    # 2. A periodic timer on a handler: first after 200 ms, then every 200 ms.
    #    A handler needs an fd to be placed on a poller; the read end of a pipe
    #    nobody writes to is the cheapest one.
    rfd, wfd = os.pipe()
    heartbeat = Heartbeat()
    reactor.add_handler(heartbeat, rfd, goev.EV_IN)
    heartbeat.schedule_timer(200, 200)

    # 3. Cancel: this timer is due at 500 ms, but is cancelled at 250 ms.
    doomed = reactor.call_later(0.5, say, 500, "BUG: a cancelled timer ran")

    def cancel_it():
        doomed.cancel()
        say(250, "cancel: the 500 ms timer is cancelled (cancelled=%s)" % doomed.cancelled)
    reactor.call_later(0.25, cancel_it)

    # 4. call_later from another thread: a worker does blocking work (sleep),
    #    then hands its result to the reactor thread.  The worker is started
    #    from a callback, i.e. once the reactor is running.
    def report(sender, due):
        say(due, "from a thread: call_later posted by %r, ran on %r"
            % (sender, threading.current_thread().name))

    def worker():
        time.sleep(0.3)                              # the "blocking work"
        due = int(ms()) + 50
        reactor.call_later(0.05, report, threading.current_thread().name, due)
    threads = []

    def start_worker():
        t = threading.Thread(target=worker, name="worker")
        threads.append(t)
        t.start()
    reactor.call_later(0, start_worker)

    # 5. Stop after about a second (stop() from inside a callback returns at once;
    #    run() returns when the loop has finished its current pass).
    def finish():
        say(1000, "stop: heartbeat beat %d times, then stayed quiet" % heartbeat.beats)
        reactor.stop()
    reactor.call_later(1.0, finish)

    try:
        reactor.run()
    finally:
        reactor.stop()
        for t in threads:
            t.join()
        os.close(rfd)       # goev never owned these fds: the handler had no socket
        os.close(wfd)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
