"""The pure-Python floor: the least code an epoll echo / HTTP server can be.

    python bench/servers/epoll_floor.py echo|http 127.0.0.1:PORT

One select.epoll, a dict fd -> socket, recv_into one shared buffer, send.
No timers, no cross-thread wake-ups, no error reporting: no library can be
cheaper per request in CPython, so this is the yardstick for goev's overhead.
"""
import select, signal, socket, sys, time
from email.utils import formatdate

IN, OUT = select.EPOLLIN, select.EPOLLOUT


def main(kind, addr):
    host, _, port = addr.rpartition(":")
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, int(port))); ls.listen(1024); ls.setblocking(False)
    ep = select.epoll(); ep.register(ls.fileno(), IN)
    socks, out, pend = {}, {}, {}          # fd -> socket, unsent bytes, partial request
    buf = bytearray(65536); view = memoryview(buf)
    date, resp = 0, b""
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        for fd, ev in ep.poll():
            if fd == ls.fileno():
                while True:
                    try: c, _ = ls.accept()
                    except BlockingIOError: break
                    c.setblocking(False); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    socks[c.fileno()] = c; ep.register(c.fileno(), IN)
                continue
            s = socks[fd]
            if ev & OUT:                    # flush what the kernel did not take before
                data = out.pop(fd); n = s.send(data)
                if n < len(data): out[fd] = data[n:]; continue
                ep.modify(fd, IN)
            try: n = s.recv_into(buf)
            except BlockingIOError: continue
            except OSError: n = 0
            if not n:
                ep.unregister(fd); s.close(); del socks[fd]; out.pop(fd, None); pend.pop(fd, None); continue
            if kind == "echo":
                data = view[:n]
            else:
                req = pend.pop(fd, b"") + buf[:n]; k = req.count(b"\r\n\r\n")  # pipelining: k requests
                if k: req = req[req.rfind(b"\r\n\r\n") + 4:]
                if req: pend[fd] = req      # keep an incomplete request for the next read
                if not k: continue
                now = int(time.time())
                if now != date:
                    date = now; resp = (b"HTTP/1.1 200 OK\r\nServer: floor\r\nContent-Type: text/plain\r\n"
                            b"Content-Length: 13\r\nDate: " + formatdate(now, usegmt=True).encode() + b"\r\n\r\nHello, World!")
                data = resp * k
            if fd in out: out[fd] += bytes(data); continue
            try: sent = s.send(data)
            except OSError: sent = len(data)
            if sent < len(data): out[fd] = bytes(data[sent:]); ep.modify(fd, IN | OUT)


if __name__ == "__main__":
    try: main(*sys.argv[1:3])
    except KeyboardInterrupt: pass
