/* udpping ADDR PORT COUNT SIZE WINDOW: the host side of scripts/net-bench.
 *
 * Sends COUNT UDP datagrams of SIZE bytes to an echo server (the small guest
 * in test=net-echo) keeping at most WINDOW of them in flight, checks every
 * echo byte for byte, and prints one line:
 *   sent=N received=N bad=N p50_us=X p99_us=X pps=X
 * WINDOW 1 measures round-trip latency; a larger window measures throughput.
 * A datagram not echoed within 200 ms is counted lost and its slot reused.
 * Then it sends "kguest-stop" when the 6th argument is "stop".
 */
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char** argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: udpping ADDR PORT COUNT SIZE WINDOW [stop]\n");
        return 2;
    }
    unsigned count = (unsigned)atoi(argv[3]), size = (unsigned)atoi(argv[4]), window = (unsigned)atoi(argv[5]);
    if (count == 0 || size < 8 || size > 1472 || window == 0 || window > 1024) {
        fprintf(stderr, "udpping: bad COUNT, SIZE (8..1472) or WINDOW (1..1024)\n");
        return 2;
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) { perror("udpping: socket"); return 1; }
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) { fprintf(stderr, "udpping: bad address\n"); return 2; }
    if (connect(s, (struct sockaddr*)&sa, sizeof sa) != 0) { perror("udpping: connect"); return 1; }

    double* sent_at = calloc(count, sizeof(double));
    double* rtt = calloc(count, sizeof(double));
    unsigned char buf[1500], back[1500];
    unsigned next = 0, received = 0, bad = 0, lost = 0, inflight = 0;
    double t0 = now_us(), last_progress = t0;
    while (received + lost < count) {
        while (inflight < window && next < count) {
            /* Payload: the sequence number, then a pattern derived from it. */
            memcpy(buf, &next, 4);
            for (unsigned k = 4; k < size; ++k) buf[k] = (unsigned char)(next * 31 + k * 7);
            sent_at[next] = now_us();
            if (send(s, buf, size, 0) != (ssize_t)size) { perror("udpping: send"); return 1; }
            ++next;
            ++inflight;
        }
        struct pollfd p = {s, POLLIN, 0};
        int n = poll(&p, 1, 200);
        if (n > 0) {
            ssize_t got = recv(s, back, sizeof back, 0);
            if (got < 4) continue;
            unsigned seq;
            memcpy(&seq, back, 4);
            if (seq >= next || rtt[seq] != 0) continue;  /* stray or duplicate */
            rtt[seq] = now_us() - sent_at[seq];
            memcpy(buf, &seq, 4);
            for (unsigned k = 4; k < size; ++k) buf[k] = (unsigned char)(seq * 31 + k * 7);
            if ((unsigned)got != size || memcmp(buf, back, size) != 0) ++bad;
            ++received;
            --inflight;
            last_progress = now_us();
        } else if (now_us() - last_progress > 200000) {
            /* Nothing for 200 ms: everything in flight is lost. */
            lost += inflight;
            inflight = 0;
            last_progress = now_us();
        }
    }
    double elapsed = (now_us() - t0) / 1e6;
    unsigned m = 0;
    for (unsigned i = 0; i < count; ++i) if (rtt[i] > 0) rtt[m++] = rtt[i];
    qsort(rtt, m, sizeof(double), cmp);
    double p50 = m ? rtt[m / 2] : 0, p99 = m ? rtt[(m * 99) / 100 < m ? (m * 99) / 100 : m - 1] : 0;
    printf("sent=%u received=%u bad=%u p50_us=%.1f p99_us=%.1f pps=%.0f\n", next, received, bad, p50, p99,
           received / elapsed);
    if (argc > 6 && strcmp(argv[6], "stop") == 0)
        for (int i = 0; i < 3; ++i) send(s, "kguest-stop", 11, 0);
    return received == count && bad == 0 ? 0 : 1;
}
