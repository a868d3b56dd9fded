// test=tlb: TLB-miss cost as a function of the working-set size.
//
// For each working-set size S (tlb_min, 2*tlb_min, ... up to tlb_max; with
// tlb_mid=1 also the midpoints 1.5*2^k) the test links one 64-byte slot per
// 4 KiB page of [base, base + S), at a pseudo-random line offset (so the slots
// spread over every cache set), into one random cycle (Sattolo's algorithm,
// xorshift64*). Each load of the pointer chase lands on another page and
// depends on the last, so the CPU can neither overlap nor predict them: once
// the pages outnumber the TLB's entries, every access pays a miss and a walk.
//
// After tlb_warmup passes over the cycle (at least 64Ki accesses), the chase
// is timed with rdtsc in 4 rounds of tlb_accesses / 4 loads; the fastest round
// is reported (the host may preempt the vCPU), converted to ns by kvmclock:
//
//   RESULT tlb size=<bytes> accesses=N ns_per_access=X.XXX cycles_per_access=Y.Y pages=2m|4k
//
// pages= is read back from the page tables. With pages=4k the test splits the
// 2 MiB mappings of its working set past the first GiB, with page tables from
// RAM above it. The working set starts at the first 2 MiB boundary above the
// image and must end in RAM below 0xc0000000; sizes that do not fit get a
// `RESULT tlb_skipped size=<bytes> room=<bytes>` line.
//
// Knobs: tlb_min= (default 16K), tlb_max= (default 1G), tlb_accesses= (per
// size, default 2M), tlb_warmup= (passes, default 2), tlb_mid=1, tlb_seed=.
// Sizes take K/M/G suffixes (powers of 1024).
#include "cpu.hpp"
#include "lib.hpp"
#include "tests.hpp"

extern "C" char __image_end[];    // linker.ld

namespace {

constexpr u64 kPage = 4096;
constexpr u64 kHuge = 2ull << 20;
constexpr u64 kMmioHole = 0xc0000000;
constexpr u64 kPresent = 1, kWrite = 2, kPs = 0x80;
constexpr u64 kAddrMask = 0x000ffffffffff000ull;

// A size with an optional K/M/G suffix; false when malformed or zero.
bool parse_size(const char* s, u64* out) {
    u64 v = 0;
    usize i = 0;
    if (s[0] < '0' || s[0] > '9') return false;
    for (; s[i] >= '0' && s[i] <= '9'; ++i) {
        if (v > (~0ull - 9) / 10) return false;
        v = v * 10 + u64(s[i] - '0');
    }
    unsigned shift = 0;
    switch (s[i]) {
    case 0: break;
    case 'k': case 'K': shift = 10; ++i; break;
    case 'm': case 'M': shift = 20; ++i; break;
    case 'g': case 'G': shift = 30; ++i; break;
    default: return false;
    }
    if (s[i] != 0 || v == 0 || (v << shift) >> shift != v) return false;
    *out = v << shift;
    return true;
}

u64 knob_size(const char* cmdline, const char* key, u64 def) {
    char buf[32];
    u64 v;
    if (!cmdline_get(cmdline, key, buf, sizeof buf)) return def;
    if (!parse_size(buf, &v)) {
        print("tlb: ignoring bad %s=%s (using %lu)\n", key, buf, def);
        return def;
    }
    return v;
}

// "16K", "2M", "1G" or plain bytes, for the human-readable lines.
const char* size_str(u64 v, char* buf) {
    static const char* const units[] = {"", "K", "M", "G"};
    unsigned u = 0;
    while (u < 3 && v >= 1024 && (v & 1023) == 0) { v >>= 10; ++u; }
    format(buf, 24, "%lu%s", v, units[u]);
    return buf;
}

u64 rng_state;
u64 rng() {  // xorshift64*
    u64 x = rng_state;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    rng_state = x;
    return x * 0x2545f4914f6cdd1dull;
}

// The slot of page i: a 64-byte line at a pseudo-random offset in the page.
inline u64 slot_addr(u64 base, u64 i) { return base + i * kPage + (((i * 0x9e3779b97f4a7c15ull) >> 58) << 6); }

// Links the slots of [base, base + pages * 4 KiB) into one random cycle (Sattolo's
// algorithm), first as page indices, then as addresses. Returns the first slot.
u64 build_ring(u64 base, u64 pages) {
    auto word = [base](u64 i) { return reinterpret_cast<volatile u64*>(slot_addr(base, i)); };
    for (u64 i = 0; i < pages; ++i) *word(i) = i;
    for (u64 i = pages - 1; i > 0; --i) {
        u64 j = rng() % i;  // j < i: a single cycle, never a fixed point
        u64 a = *word(i), b = *word(j);
        *word(i) = b;
        *word(j) = a;
    }
    for (u64 i = 0; i < pages; ++i) *word(i) = slot_addr(base, *word(i));
    return slot_addr(base, 0);
}

// n dependent loads starting at p; returns where it stopped.
inline u64 chase(u64 p, u64 n) {
    for (; n >= 8; n -= 8) {
        asm volatile("mov (%0), %0\n\tmov (%0), %0\n\tmov (%0), %0\n\tmov (%0), %0\n\t"
                     "mov (%0), %0\n\tmov (%0), %0\n\tmov (%0), %0\n\tmov (%0), %0" : "+r"(p) :: "memory");
    }
    for (; n; --n) asm volatile("mov (%0), %0" : "+r"(p) :: "memory");
    return p;
}

u64* table_of(u64 entry) { return reinterpret_cast<u64*>(entry & kAddrMask); }

// The size of the page mapping va (4 KiB, 2 MiB or 1 GiB); 0 when unmapped.
u64 page_size_at(u64 va) {
    u64 cr3;
    asm volatile("mov %%cr3, %0" : "=r"(cr3));
    u64 e = table_of(cr3)[(va >> 39) & 511];
    if (!(e & kPresent)) return 0;
    e = table_of(e)[(va >> 30) & 511];
    if (!(e & kPresent)) return 0;
    if (e & kPs) return 1ull << 30;
    e = table_of(e)[(va >> 21) & 511];
    if (!(e & kPresent)) return 0;
    if (e & kPs) return kHuge;
    e = table_of(e)[(va >> 12) & 511];
    return (e & kPresent) ? kPage : 0;
}

// Splits every 2 MiB mapping of [lo, hi) into 4 KiB ones, with page tables
// from `tables` on (identity-mapped RAM). Returns the page tables used.
u64 split_to_4k(u64 lo, u64 hi, u64 tables) {
    u64 cr3;
    asm volatile("mov %%cr3, %0" : "=r"(cr3));
    u64 used = 0;
    for (u64 va = lo & ~(kHuge - 1); va < hi; va += kHuge) {
        u64 e = table_of(cr3)[(va >> 39) & 511];
        if (!(e & kPresent)) panic("tlb: %#lx has no PDPT", va);
        e = table_of(e)[(va >> 30) & 511];
        if (!(e & kPresent) || (e & kPs)) panic("tlb: %#lx has no page directory", va);
        u64* pde = &table_of(e)[(va >> 21) & 511];
        if (!(*pde & kPs)) continue;  // already 4 KiB pages (the first GiB after paging_use_4k)
        u64* pt = reinterpret_cast<u64*>(tables + used * kPage);
        u64 phys = *pde & ~(kHuge - 1) & kAddrMask;
        for (u64 i = 0; i < 512; ++i) pt[i] = (phys + i * kPage) | kPresent | kWrite;
        *pde = u64(pt) | kPresent | kWrite;
        ++used;
    }
    asm volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) :: "memory");  // flush the TLB
    return used;
}

// Page tables needed to map S bytes at a 2 MiB boundary with 4 KiB pages.
inline u64 tables_for(u64 s) { return (s + kHuge - 1) / kHuge; }

}  // namespace

bool test_tlb(const char* cmdline) {
    u64 min = knob_size(cmdline, "tlb_min", 16 << 10);
    u64 max = knob_size(cmdline, "tlb_max", 1ull << 30);
    u64 accesses = knob_size(cmdline, "tlb_accesses", 2ull << 20);
    u64 warmup = 2;
    char buf[32];
    bool ok = true;
    if (cmdline_get(cmdline, "tlb_warmup", buf, sizeof buf)) { u64 v = parse_u64(buf, &ok); if (ok) warmup = v; }
    bool mid = cmdline_get(cmdline, "tlb_mid", buf, sizeof buf) && buf[0] == '1';
    rng_state = 0x9e3779b97f4a7c15ull;
    if (cmdline_get(cmdline, "tlb_seed", buf, sizeof buf)) { u64 v = parse_u64(buf, &ok); if (ok && v) rng_state = v; }
    if (min < kPage) min = kPage;
    min &= ~(kPage - 1);
    if (accesses < 4) accesses = 4;

    // The working set: from the first 2 MiB boundary above the image to the end of its RAM region.
    u64 lo = (u64(__image_end) + kHuge - 1) & ~(kHuge - 1);
    u64 top = 0;
    for (u32 i = 0; i < g_nram; ++i)
        if (g_ram[i].addr <= lo && lo < g_ram[i].addr + g_ram[i].size) top = g_ram[i].addr + g_ram[i].size;
    if (top > kMmioHole) top = kMmioHole;
    top &= ~(kPage - 1);
    u64 room = top > lo ? top - lo : 0;

    // The sizes, and the largest that fits with the page tables a 4 KiB mapping
    // of it needs (with either page size, so both measure the same list).
    u64 sizes[128];
    unsigned nsizes = 0;
    for (u64 s = min; s <= max && nsizes < 126; s <<= 1) {
        sizes[nsizes++] = s;
        if (mid && s >= 2 * kPage && s + s / 2 <= max) sizes[nsizes++] = (s + s / 2) & ~(kPage - 1);
        if (s > (1ull << 62)) break;
    }
    u64 fit_max = 0;
    for (unsigned i = 0; i < nsizes; ++i)
        if (sizes[i] + tables_for(sizes[i]) * kPage <= room && sizes[i] > fit_max) fit_max = sizes[i];

    bool want_4k = page_size_at(lo) == kPage;  // pages=4k mapped the first GiB with 4 KiB pages
    u64 tables_used = 0;
    if (want_4k && fit_max) tables_used = split_to_4k(lo, lo + fit_max, lo + fit_max);
    u64 page = fit_max ? page_size_at(lo) : 0;
    if (fit_max && page_size_at(lo + fit_max - 1) != page) {
        print("tlb: mixed page sizes over the working set (%lu at the start, %lu at the end)\n", page,
              page_size_at(lo + fit_max - 1));
        ok = false;
    }
    const char* pages = page == kPage ? "4k" : page == kHuge ? "2m" : "1g";
    u64 hz = tsc_hz();
    char b1[24], b2[24], b3[24];
    print("tlb: working set at %#lx, room %s below %#lx, sizes %s..%s%s, %s pages (%lu page tables added), "
          "%lu accesses per size, TSC %lu kHz\n",
          lo, size_str(room, b1), top, size_str(min, b2), size_str(max, b3), mid ? " with midpoints" : "", pages,
          tables_used, accesses, hz / 1000);
    print("RESULT tlb_setup base=%#lx room=%lu pages=%s page_tables_added=%lu tsc_khz=%lu\n", lo, room, pages,
          tables_used, hz / 1000);

    unsigned measured = 0;
    for (unsigned k = 0; k < nsizes; ++k) {
        u64 s = sizes[k];
        if (s > fit_max) {
            print("tlb: size %s does not fit (room for %s above the image and below %#lx): skipped\n", size_str(s, b1),
                  size_str(room, b2), top);
            print("RESULT tlb_skipped size=%lu room=%lu\n", s, room);
            continue;
        }
        u64 npages = s / kPage;
        u64 p = build_ring(lo, npages);
        u64 w = warmup * npages;
        if (w < 65536) w = 65536;
        p = chase(p, w);
        const u64 rounds = 4, per = accesses / rounds;
        u64 best_cyc = ~0ull, best_ns = 0;
        for (u64 r = 0; r < rounds; ++r) {
            u64 t0 = rdtsc();
            p = chase(p, per);
            u64 t1 = rdtsc();
            if (t1 - t0 < best_cyc) {
                best_cyc = t1 - t0;
                best_ns = kvmclock_ns_at(t1) - kvmclock_ns_at(t0);
            }
        }
        if (p == 0) ok = false;  // keeps p alive; a broken ring would have faulted long before
        u64 ps = best_ns * 1000 / per;           // picoseconds per access
        u64 dcyc = (best_cyc * 10 + per / 2) / per;  // tenths of a cycle
        print("RESULT tlb size=%lu accesses=%lu ns_per_access=%lu.%03lu cycles_per_access=%lu.%lu pages=%s\n", s,
              per * rounds, ps / 1000, ps % 1000, dcyc / 10, dcyc % 10, pages);
        ++measured;
    }
    if (measured == 0) {
        print("tlb: no working-set size fits (room %s): raise --memory or lower tlb_max/tlb_min\n", size_str(room, b1));
        ok = false;
    }
    return ok;
}
