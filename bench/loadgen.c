/* loadgen.c - a small epoll load generator for the goev.py benchmark harness.
 *
 * Loopback only: the harness passes 127.0.0.1, and this program refuses any
 * address outside 127.0.0.0/8.
 *
 *   loadgen echo    HOST PORT CONNS INFLIGHT SIZE SECONDS
 *       Ping-pong: CONNS connections, each keeps INFLIGHT messages of SIZE bytes
 *       in flight (send, wait for the full echo of one message, send the next).
 *       Echoed bytes are checked against the pattern that was sent.
 *   loadgen connect HOST PORT CONCURRENCY SECONDS
 *       Connection rate: connect, send one 64 B message, read the echo, close;
 *       repeat, with CONCURRENCY connections in progress at any time.
 *   loadgen idle    HOST PORT CONNS
 *       Open CONNS connections, do one 64 B echo on each, print READY, then hold
 *       them idle until a line (or EOF) arrives on stdin; then close all.
 *
 * Output protocol (one line each, flushed): "START" when the measured window
 * begins, then "END msgs=N bytes=N errors=N elapsed=S cpu=S p50_us=U p99_us=U"
 * when it ends (echo, connect; cpu is this program's own user+system time in
 * the window) or "READY conns=N errors=N" (idle).  Errors go to stderr.
 *
 * Latency (p50_us, p99_us: percentiles over every message or connection
 * completed in the window, in microseconds, to about 1 %): echo mode times each
 * message from the moment it joins its connection's send queue to the moment
 * its last byte is echoed back (with INFLIGHT > 1 that includes the wait behind
 * the messages ahead of it); connect mode times connect() to the verified echo.
 *
 * Source addresses: connect and idle mode spread connections over
 * 127.0.0.1..127.0.0.16 (IP_BIND_ADDRESS_NO_PORT) so that TIME_WAIT sockets
 * and many idle connections never exhaust the ephemeral port range.
 *
 * Build: gcc -O2 -Wall -o loadgen loadgen.c -lm
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define PAT 251 /* pattern period: byte at stream offset p is (p % PAT) */
#define NSRC 16 /* source addresses 127.0.0.1 .. 127.0.0.NSRC */
#define MAXEV 1024

typedef struct {
    int fd;
    int state;          /* 0 = connecting, 1 = running, 2 = dead/closed */
    uint64_t sent;      /* bytes handed to the kernel */
    uint64_t want;      /* bytes we intend to have sent (sent <= want) */
    uint64_t recvd;     /* bytes echoed back and verified */
    double t_start;     /* connect mode: when connect() was called */
    double *queued;     /* echo mode: ring of INFLIGHT times a message was queued */
    unsigned q_head;    /* index of the oldest queued message in the ring */
} conn_t;

static struct sockaddr_in g_dst;
static int g_ep;
static unsigned char *g_pat;     /* pattern, long enough for any single write */
static size_t g_patlen;
static unsigned char g_rbuf[1 << 18];
static uint64_t g_errors;
static unsigned g_src_next;
static int g_spread_src;

/* Latency histogram: bucket i holds latencies in [e^((i-1)/LAT_RES), e^(i/LAT_RES)) µs
 * (bucket 0: under 1 µs), so a percentile is exact to about 1/LAT_RES. */
#define LAT_RES 100
#define LAT_BUCKETS 2000 /* up to e^20 µs: far beyond any run */
static uint64_t g_lat[LAT_BUCKETS];
static uint64_t g_lat_n;

static void lat_record(double secs) {
    double us = secs * 1e6;
    int i = us < 1.0 ? 0 : 1 + (int)(log(us) * LAT_RES);
    if (i >= LAT_BUCKETS) i = LAT_BUCKETS - 1;
    g_lat[i]++;
    g_lat_n++;
}

/* The q-quantile (0 < q < 1) in µs: the geometric middle of its bucket; 0 if nothing was recorded. */
static double lat_quantile(double q) {
    if (g_lat_n == 0) return 0.0;
    uint64_t rank = (uint64_t)ceil(q * (double)g_lat_n), seen = 0;
    if (rank < 1) rank = 1;
    for (int i = 0; i < LAT_BUCKETS; i++) {
        seen += g_lat[i];
        if (seen >= rank) return i == 0 ? 0.5 : exp((i - 0.5) / LAT_RES);
    }
    return exp((LAT_BUCKETS - 0.5) / LAT_RES);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_self(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *msg) {
    perror(msg);
    exit(2);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* Start a non-blocking connect; returns fd or -1. */
static int start_connect(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        g_errors++;
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (g_spread_src) {
        struct sockaddr_in src;
        memset(&src, 0, sizeof src);
        src.sin_family = AF_INET;
        src.sin_addr.s_addr = htonl(0x7f000001u + (g_src_next++ % NSRC));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            /* fall back to the default source address */
        }
    }
    if (connect(fd, (struct sockaddr *)&g_dst, sizeof g_dst) < 0 && errno != EINPROGRESS) {
        g_errors++;
        close(fd);
        return -1;
    }
    return fd;
}

static int conn_error(int fd) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return errno;
    return err;
}

static void ep_ctl(int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev;
    ev.events = events;
    ev.data.u64 = data;
    if (epoll_ctl(g_ep, op, fd, &ev) < 0) die("epoll_ctl");
}

/* Push bytes [sent, want) of the pattern stream; returns -1 on error. */
static int flush_out(conn_t *c, int idx) {
    while (c->sent < c->want) {
        size_t off = c->sent % PAT;
        size_t n = c->want - c->sent;
        if (n > g_patlen - off) n = g_patlen - off;
        ssize_t w = send(c->fd, g_pat + off, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) {
                ep_ctl(EPOLL_CTL_MOD, c->fd, EPOLLIN | EPOLLOUT, (uint64_t)idx);
                return 0;
            }
            return -1;
        }
        c->sent += (uint64_t)w;
    }
    return 0;
}

/* Read and verify what is available; returns bytes read, 0 on EOF, -1 on error/mismatch. */
static ssize_t read_verify(conn_t *c) {
    ssize_t total = 0;
    for (;;) {
        ssize_t r = recv(c->fd, g_rbuf, sizeof g_rbuf, 0);
        if (r < 0) {
            if (errno == EAGAIN) return total > 0 ? total : -2; /* -2: nothing now */
            return -1;
        }
        if (r == 0) return total > 0 ? total : 0;
        if (c->recvd + (uint64_t)r > c->sent) {
            fprintf(stderr, "loadgen: received more than sent\n");
            return -1;
        }
        if (memcmp(g_rbuf, g_pat + c->recvd % PAT, (size_t)r) != 0) {
            fprintf(stderr, "loadgen: echoed bytes differ from those sent, near offset %llu\n",
                    (unsigned long long)c->recvd);
            return -1;
        }
        c->recvd += (uint64_t)r;
        total += r;
        if ((size_t)r < sizeof g_rbuf) return total;
    }
}

static void kill_conn(conn_t *c) {
    if (c->fd >= 0) {
        epoll_ctl(g_ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->state = 2;
}

static void make_pattern(size_t maxwrite) {
    if (maxwrite < sizeof g_rbuf) maxwrite = sizeof g_rbuf; /* read_verify compares whole reads */
    g_patlen = maxwrite + PAT;
    g_pat = malloc(g_patlen);
    if (!g_pat) die("malloc");
    for (size_t i = 0; i < g_patlen; i++) g_pat[i] = (unsigned char)(i % PAT);
}

/* Open n connections with at most `window` connects in progress; each does
 * `echo_bytes` of echo (0: none) before it counts as open. Returns opened. */
static int open_conns(conn_t *cs, int n, int window, uint64_t echo_bytes, double deadline) {
    int next = 0, pending = 0, opened = 0;
    struct epoll_event evs[MAXEV];
    while ((next < n || pending > 0) && now() < deadline) {
        while (next < n && pending < window) {
            conn_t *c = &cs[next];
            memset(c, 0, sizeof *c);
            c->fd = start_connect();
            if (c->fd < 0) {
                c->state = 2;
                next++;
                continue;
            }
            c->state = 0;
            ep_ctl(EPOLL_CTL_ADD, c->fd, EPOLLOUT, (uint64_t)next);
            next++;
            pending++;
        }
        int k = epoll_wait(g_ep, evs, MAXEV, 100);
        for (int i = 0; i < k; i++) {
            int idx = (int)evs[i].data.u64;
            conn_t *c = &cs[idx];
            if (c->state == 2) continue;
            if (c->state == 0) {
                if (conn_error(c->fd) != 0) {
                    g_errors++;
                    kill_conn(c);
                    pending--;
                    continue;
                }
                c->state = 1;
                if (echo_bytes == 0) {
                    ep_ctl(EPOLL_CTL_MOD, c->fd, EPOLLIN, (uint64_t)idx);
                    pending--;
                    opened++;
                    continue;
                }
                c->want = echo_bytes;
                ep_ctl(EPOLL_CTL_MOD, c->fd, EPOLLIN, (uint64_t)idx);
                if (flush_out(c, idx) < 0) {
                    g_errors++;
                    kill_conn(c);
                    pending--;
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) {
                ep_ctl(EPOLL_CTL_MOD, c->fd, EPOLLIN, (uint64_t)idx);
                if (flush_out(c, idx) < 0) {
                    g_errors++;
                    kill_conn(c);
                    pending--;
                    continue;
                }
            }
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                ssize_t r = read_verify(c);
                if (r == -2) continue;
                if (r <= 0) {
                    g_errors++;
                    kill_conn(c);
                    pending--;
                    continue;
                }
                if (c->recvd == echo_bytes) {
                    pending--;
                    opened++;
                }
            }
        }
    }
    return opened;
}

static int mode_echo(int nconn, int inflight, int size, double secs) {
    uint64_t batch = (uint64_t)inflight * (uint64_t)size;
    make_pattern(batch > 65536 ? batch : 65536);
    conn_t *cs = calloc((size_t)nconn, sizeof *cs);
    if (!cs) die("calloc");
    int opened = open_conns(cs, nconn, 256, 0, now() + 60);
    if (opened < nconn) fprintf(stderr, "loadgen: only %d of %d connections opened\n", opened, nconn);
    if (opened == 0) {
        printf("END msgs=0 bytes=0 errors=%llu elapsed=0\n", (unsigned long long)g_errors);
        return 1;
    }
    double *rings = calloc((size_t)nconn * (size_t)inflight, sizeof *rings);
    if (!rings) die("calloc");
    printf("START\n");
    fflush(stdout);
    double cpu0 = cpu_self();
    double t0 = now(), deadline = t0 + secs;
    for (int i = 0; i < nconn; i++) {
        conn_t *c = &cs[i];
        if (c->state != 1) continue;
        c->queued = rings + (size_t)i * (size_t)inflight;
        for (int j = 0; j < inflight; j++) c->queued[j] = t0;
        c->want = batch;
        if (flush_out(c, i) < 0) {
            g_errors++;
            kill_conn(c);
        }
    }
    struct epoll_event evs[MAXEV];
    int alive = opened;
    double t = t0;
    while (alive > 0 && (t = now()) < deadline) {
        int ms = (int)((deadline - t) * 1000) + 1;
        int k = epoll_wait(g_ep, evs, MAXEV, ms > 100 ? 100 : ms);
        for (int i = 0; i < k; i++) {
            int idx = (int)evs[i].data.u64;
            conn_t *c = &cs[idx];
            if (c->state != 1) continue;
            if (evs[i].events & EPOLLOUT) {
                ep_ctl(EPOLL_CTL_MOD, c->fd, EPOLLIN, (uint64_t)idx);
                if (flush_out(c, idx) < 0) {
                    g_errors++;
                    kill_conn(c);
                    alive--;
                    continue;
                }
            }
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                uint64_t before = c->recvd / (uint64_t)size;
                ssize_t r = read_verify(c);
                if (r == -2) continue;
                if (r <= 0) {
                    g_errors++;
                    kill_conn(c);
                    alive--;
                    continue;
                }
                uint64_t done = c->recvd / (uint64_t)size - before;
                if (done) {
                    /* each completed message leaves the ring; its successor takes the slot */
                    double tn = now();
                    for (uint64_t j = 0; j < done; j++) {
                        lat_record(tn - c->queued[c->q_head]);
                        c->queued[c->q_head] = tn;
                        c->q_head = (c->q_head + 1) % (unsigned)inflight;
                    }
                    /* one new message per completed message: keep INFLIGHT in flight */
                    int was_idle = c->sent == c->want;
                    c->want += done * (uint64_t)size;
                    if (was_idle && flush_out(c, idx) < 0) {
                        g_errors++;
                        kill_conn(c);
                        alive--;
                    }
                }
            }
        }
    }
    double elapsed = now() - t0;
    uint64_t msgs = 0, bytes = 0;
    for (int i = 0; i < nconn; i++) {
        msgs += cs[i].recvd / (uint64_t)size;
        bytes += cs[i].recvd;
    }
    printf("END msgs=%llu bytes=%llu errors=%llu elapsed=%.4f cpu=%.3f p50_us=%.1f p99_us=%.1f\n",
           (unsigned long long)msgs, (unsigned long long)bytes, (unsigned long long)g_errors, elapsed,
           cpu_self() - cpu0, lat_quantile(0.50), lat_quantile(0.99));
    fflush(stdout);
    for (int i = 0; i < nconn; i++)
        if (cs[i].fd >= 0) close(cs[i].fd);
    return 0;
}

static int mode_connect(int conc, double secs) {
    const uint64_t msg = 64;
    make_pattern(65536);
    conn_t *cs = calloc((size_t)conc, sizeof *cs);
    if (!cs) die("calloc");
    uint64_t done = 0;
    printf("START\n");
    fflush(stdout);
    double cpu0 = cpu_self();
    double t0 = now(), deadline = t0 + secs, t = t0;
    for (int i = 0; i < conc; i++) cs[i].state = 2, cs[i].fd = -1;
    struct epoll_event evs[MAXEV];
    while ((t = now()) < deadline) {
        for (int i = 0; i < conc; i++) {
            conn_t *c = &cs[i];
            if (c->state != 2) continue;
            memset(c, 0, sizeof *c);
            c->t_start = now();
            c->fd = start_connect();
            if (c->fd < 0) {
                c->state = 2;
                continue;
            }
            c->state = 0;
            ep_ctl(EPOLL_CTL_ADD, c->fd, EPOLLOUT, (uint64_t)i);
        }
        int ms = (int)((deadline - t) * 1000) + 1;
        int k = epoll_wait(g_ep, evs, MAXEV, ms > 100 ? 100 : ms);
        for (int j = 0; j < k; j++) {
            int i = (int)evs[j].data.u64;
            conn_t *c = &cs[i];
            if (c->state == 2) continue;
            if (c->state == 0) {
                if (conn_error(c->fd) != 0) {
                    g_errors++;
                    kill_conn(c);
                    continue;
                }
                c->state = 1;
                c->want = msg;
                ep_ctl(EPOLL_CTL_MOD, c->fd, EPOLLIN, (uint64_t)i);
                if (flush_out(c, i) < 0) {
                    g_errors++;
                    kill_conn(c);
                }
                continue;
            }
            if (evs[j].events & EPOLLOUT) {
                ep_ctl(EPOLL_CTL_MOD, c->fd, EPOLLIN, (uint64_t)i);
                if (flush_out(c, i) < 0) {
                    g_errors++;
                    kill_conn(c);
                    continue;
                }
            }
            ssize_t r = read_verify(c);
            if (r == -2) continue;
            if (r <= 0) {
                g_errors++;
                kill_conn(c);
                continue;
            }
            if (c->recvd == msg) {
                done++;
                lat_record(now() - c->t_start);
                kill_conn(c); /* close: the next pass opens a new one */
            }
        }
    }
    double elapsed = now() - t0;
    printf("END msgs=%llu bytes=%llu errors=%llu elapsed=%.4f cpu=%.3f p50_us=%.1f p99_us=%.1f\n",
           (unsigned long long)done, (unsigned long long)(done * msg), (unsigned long long)g_errors, elapsed,
           cpu_self() - cpu0, lat_quantile(0.50), lat_quantile(0.99));
    fflush(stdout);
    for (int i = 0; i < conc; i++)
        if (cs[i].fd >= 0) close(cs[i].fd);
    return 0;
}

static int mode_idle(int nconn) {
    make_pattern(65536);
    conn_t *cs = calloc((size_t)nconn, sizeof *cs);
    if (!cs) die("calloc");
    int opened = open_conns(cs, nconn, 200, 64, now() + 120);
    printf("READY conns=%d errors=%llu\n", opened, (unsigned long long)g_errors);
    fflush(stdout);
    /* hold the connections idle until a line or EOF on stdin (or 10 minutes) */
    struct pollfd pfd = {.fd = 0, .events = POLLIN};
    poll(&pfd, 1, 600 * 1000);
    for (int i = 0; i < nconn; i++)
        if (cs[i].state != 2 && cs[i].fd >= 0) close(cs[i].fd);
    return 0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen echo HOST PORT CONNS INFLIGHT SIZE SECONDS\n"
            "       loadgen connect HOST PORT CONCURRENCY SECONDS\n"
            "       loadgen idle HOST PORT CONNS\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 4) usage();
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    raise_nofile();
    memset(&g_dst, 0, sizeof g_dst);
    g_dst.sin_family = AF_INET;
    if (inet_pton(AF_INET, argv[2], &g_dst.sin_addr) != 1) usage();
    if ((ntohl(g_dst.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "loadgen: loopback (127.0.0.0/8) targets only\n");
        return 2;
    }
    g_dst.sin_port = htons((uint16_t)atoi(argv[3]));
    g_ep = epoll_create1(EPOLL_CLOEXEC);
    if (g_ep < 0) die("epoll_create1");
    if (strcmp(argv[1], "echo") == 0 && argc == 8) {
        int n = atoi(argv[4]), k = atoi(argv[5]), s = atoi(argv[6]);
        double d = atof(argv[7]);
        if (n < 1 || k < 1 || s < 1 || d <= 0) usage();
        return mode_echo(n, k, s, d);
    }
    if (strcmp(argv[1], "connect") == 0 && argc == 6) {
        int c = atoi(argv[4]);
        double d = atof(argv[5]);
        if (c < 1 || c > MAXEV || d <= 0) usage();
        g_spread_src = 1;
        return mode_connect(c, d);
    }
    if (strcmp(argv[1], "idle") == 0 && argc == 5) {
        int n = atoi(argv[4]);
        if (n < 1) usage();
        g_spread_src = 1;
        return mode_idle(n);
    }
    usage();
    return 2;
}
