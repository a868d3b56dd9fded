/* memfill MIB [SEED [HOLD_S]]: fills MIB MiB of fresh anonymous memory with a
 * per-page pattern and reads it all back, in the Linux test guest
 * (scripts/linux-initramfs builds it with gcc -static into the initramfs as
 * /bin/memfill; scripts/linux-init's kguest.test=mem runs it once the guest
 * grew). Every 8-byte word of page i holds mix(i, word, SEED), so a page that
 * reads back zeroes (lost host backing), another page's contents (a wrong
 * mapping) or stale data from an earlier SEED is caught. Prints one line:
 *   RESULT memfill_mib=N seed=S bad_pages=B fill_ms=F check_ms=C
 * then keeps the memory HOLD_S seconds (default 0: the host may look at it
 * meanwhile) and exits 0 when B is 0, 1 when not, 2 when the memory could
 * not be had.
 * MAP_POPULATE is not used: the write loop faults each page in, as a program
 * would; MADV_HUGEPAGE (Debian's kernels default THP to madvise) makes that
 * one fault per 2 MiB instead of 512, which under the nested, emulated
 * sandbox is the difference between seconds and minutes. The mapping is
 * left to exit(2) to free. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t mix(uint64_t page, uint64_t word, uint64_t seed) {
    uint64_t x = (page << 9 | word) ^ (seed * 0x9e3779b97f4a7c15ull);
    x ^= x >> 31;
    x *= 0xbf58476d1ce4e5b9ull;
    return x ^ (x >> 29);
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: memfill MIB [SEED [HOLD_S]]\n");
        return 2;
    }
    const uint64_t mib = strtoull(argv[1], NULL, 0), seed = argc > 2 ? strtoull(argv[2], NULL, 0) : 1;
    const unsigned hold = argc > 3 ? (unsigned)strtoul(argv[3], NULL, 0) : 0;
    const uint64_t pages = mib << 8, words = 4096 / 8;
    uint64_t* p = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("memfill: mmap");
        return 2;
    }
    madvise(p, mib << 20, MADV_HUGEPAGE);   /* best effort: without THP it is only slower */
    const double t0 = now_ms();
    for (uint64_t i = 0; i < pages; ++i)
        for (uint64_t w = 0; w < words; ++w) p[i * words + w] = mix(i, w, seed);
    const double t1 = now_ms();
    uint64_t bad = 0;
    for (uint64_t i = 0; i < pages; ++i)
        for (uint64_t w = 0; w < words; ++w)
            if (p[i * words + w] != mix(i, w, seed)) {
                ++bad;
                break;
            }
    const double t2 = now_ms();
    printf("RESULT memfill_mib=%llu seed=%llu bad_pages=%llu fill_ms=%.0f check_ms=%.0f\n", (unsigned long long)mib,
           (unsigned long long)seed, (unsigned long long)bad, t1 - t0, t2 - t1);
    fflush(stdout);
    sleep(hold);
    return bad == 0 ? 0 : 1;
}
