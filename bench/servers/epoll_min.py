"""The cheapest echo loop CPython can run: a lower bound, not a server.

    python bench/servers/epoll_min.py echo 127.0.0.1:PORT

Where epoll_floor.py is the plain minimal loop (socket methods), this one uses
every trick goev uses on its hot path and nothing else: fd-level os.readv /
os.write (positional arguments, no format-string parsing), one memoryview per
read length made once, no per-event allocation, no handler objects, no
function call per event.  It does not queue partial writes (the load
generator's 64 B messages always fit), so it is only a yardstick: the user CPU
per request that no pure-Python reactor on this interpreter can go below.
`bench/run.py --servers goev,uvloop,epoll_min` and `bench/icount.py --servers
goev,epoll_min,uvloop` measure it; it is not in their default server sets.
"""
import os, select, signal, socket, sys


def main(kind, addr):
    if kind != "echo":
        sys.exit("epoll_min: echo only")
    host, _, port = addr.rpartition(":")
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # inherited by accepted sockets
    ls.bind((host, int(port))); ls.listen(1024); ls.setblocking(False)
    lfd = ls.fileno()
    ep = select.epoll(); ep.register(lfd, select.EPOLLIN)
    poll, register, unregister = ep.poll, ep.register, ep.unregister
    readv, write, close, set_blocking = os.readv, os.write, os.close, os.set_blocking
    buf = bytearray(65536); rlist = [buf]; view = memoryview(buf)
    views = [view[:n] for n in range(2048)]
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        for fd, ev in poll():
            if fd == lfd:
                while True:
                    try: c, _ = ls._accept()
                    except BlockingIOError: break
                    set_blocking(c, False); register(c, select.EPOLLIN)
                continue
            try: n = readv(fd, rlist)
            except BlockingIOError: continue
            except OSError: n = 0
            if not n:
                unregister(fd); close(fd); continue
            try: write(fd, views[n] if n < 2048 else view[:n])
            except OSError: pass


if __name__ == "__main__":
    try: main(*sys.argv[1:3])
    except KeyboardInterrupt: pass
