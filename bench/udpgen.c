/* udpgen.c - a UDP echo load generator for bench/udp.py (loopback only).
 *
 *   udpgen PORT SOCKETS INFLIGHT SIZE SECONDS
 *
 * SOCKETS connected UDP sockets to 127.0.0.1:PORT, each keeping INFLIGHT
 * datagrams of SIZE bytes in flight: every echo received sends the next one.
 * Datagrams can be lost (a full receive buffer): a socket that has heard
 * nothing for 50 ms sends its window again.  Output, one line each, flushed:
 * "START" when the measured window begins (after a 0.5 s warm-up), then
 * "END msgs=N lost=N elapsed=S" (msgs: echoes received in the window).
 *
 * Build: gcc -O2 -Wall -o udpgen udpgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: udpgen PORT SOCKETS INFLIGHT SIZE SECONDS\n");
        return 2;
    }
    int port = atoi(argv[1]), nsock = atoi(argv[2]), inflight = atoi(argv[3]);
    int size = atoi(argv[4]);
    double seconds = atof(argv[5]);
    if (nsock < 1 || nsock > 1024 || inflight < 1 || size < 1 || size > 65507) {
        fprintf(stderr, "udpgen: bad arguments\n");
        return 2;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    int ep = epoll_create1(0);
    int *fds = calloc(nsock, sizeof(int));
    double *last = calloc(nsock, sizeof(double));
    char *buf = malloc(65536);
    memset(buf, 'x', 65536);
    double t0 = now();
    for (int i = 0; i < nsock; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)&to, sizeof to) < 0) {
            perror("udpgen: socket/connect");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
        for (int k = 0; k < inflight; k++)
            send(fds[i], buf, size, 0);
        last[i] = t0;
    }
    long long msgs = 0, lost = 0;
    int started = 0;
    double start = t0 + 0.5, end = start + seconds;
    struct epoll_event evs[256];
    for (;;) {
        double t = now();
        if (!started && t >= start) {
            started = 1;
            msgs = lost = 0;
            printf("START\n");
            fflush(stdout);
        }
        if (t >= end)
            break;
        int n = epoll_wait(ep, evs, 256, 10);
        t = now();
        for (int e = 0; e < n; e++) {
            int i = evs[e].data.u32;
            for (;;) {
                ssize_t r = recv(fds[i], buf, 65536, 0);
                if (r < 0)
                    break;           /* EAGAIN, or ECONNREFUSED before the server is up */
                msgs++;
                last[i] = t;
                send(fds[i], buf, size, 0);
            }
        }
        for (int i = 0; i < nsock; i++) {
            if (t - last[i] > 0.05) {        /* a lost window: send it again */
                for (int k = 0; k < inflight; k++)
                    send(fds[i], buf, size, 0);
                lost += inflight;
                last[i] = t;
            }
        }
    }
    printf("END msgs=%lld lost=%lld elapsed=%.3f\n", msgs, lost, now() - start);
    fflush(stdout);
    return 0;
}
