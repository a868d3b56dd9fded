// The small guest's virtio-balloon driver (VIRTIO 1.2 section 5.5) over the
// virtio-pci transport (virtio.hpp), and test=balloon.
//
// Memory it manages: every 2 MiB-aligned block of RAM (g_ram in lib.hpp)
// wholly above the guest image and below the PCI hole (0xc0000000). Each
// block is free (owned by the test, which keeps a pattern in every 4 KiB
// page), ballooned, or, for at most one block, partly ballooned. The balloon
// takes whole blocks from the top of RAM down and gives whole blocks back, so
// the host can return whole 2 MiB regions and keep THP for the rest.
//
// Queues (5.5.2): 0 inflateq, 1 deflateq, 2 statsq. Inflate and deflate
// buffers are arrays of le32 PFNs (5.5.6), up to 256 per buffer as Linux
// sends them, up to kBufs per batch; only when the device has used a whole
// batch does the driver write `actual` or reuse the pages, even without
// MUST_TELL_HOST. The stats buffer of (le16 tag, le64 val) pairs (5.5.6.3) is
// refilled and re-added whenever the device returns it.
//
// Waking: MSI-X vectors where the device takes them; a TSC-deadline timer
// bounds every halt (100 ms, the fallback poll of num_pages), and without a
// queue vector waits for used buffers poll every millisecond.
#include "cpu.hpp"
#include "lib.hpp"
#include "pci.hpp"
#include "tests.hpp"
#include "virtio.hpp"

extern "C" char __image_end[];  // guest/linker.ld

namespace {

// 4.1.2.1: 0x1040 + device ID 5; 0x1002 is the transitional ID (QEMU's
// default on a PCI bus), whose modern interface this driver uses all the same.
constexpr u16 kVirtioVendor = 0x1af4, kBalloonDevice = 0x1045, kBalloonTransitional = 0x1002;
// 5.5.3 feature bits.
constexpr u64 BAL_F_MUST_TELL_HOST = 1ull << 0, BAL_F_STATS_VQ = 1ull << 1, BAL_F_DEFLATE_ON_OOM = 1ull << 2;
constexpr u64 kWantedFeatures = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | BAL_F_MUST_TELL_HOST | BAL_F_STATS_VQ |
                                BAL_F_DEFLATE_ON_OOM;
// 5.5.4 struct virtio_balloon_config: num_pages (device writes), actual (driver writes).
constexpr u32 CFG_NUM_PAGES = 0, CFG_ACTUAL = 4;
constexpr u16 kInflateQ = 0, kDeflateQ = 1, kStatsQ = 2;
// IDT vectors (net.cpp uses 0x50-0x53) and MSI-X table entries.
constexpr u8 kVecConfig = 0x58, kVecInflate = 0x59, kVecDeflate = 0x5a, kVecStats = 0x5b, kVecTimer = 0x5c;

constexpr u32 kPfnsPerBuf = 256;  // VIRTIO_BALLOON_ARRAY_PFNS_MAX in Linux
constexpr u32 kBufs = 64;         // buffers per batch: 16384 pages, 64 MiB
constexpr u64 kPage = 4096, kBlock = 2ull << 20;
constexpr u32 kPagesPerBlock = 512;
constexpr u64 kRamLimit = 0xc0000000ull;  // the 32-bit PCI hole starts here
constexpr u32 kMaxBlocks = u32(kRamLimit / kBlock);
constexpr u64 kQueueTimeoutNs = 10000000000ull;  // a batch the device keeps 10 s: a device error
constexpr u64 kPollNs = 100000000ull;            // num_pages re-read at least this often

// 5.5.6.3 statistics tags.
enum : u16 { STAT_SWAP_IN = 0, STAT_SWAP_OUT = 1, STAT_MAJFLT = 2, STAT_MINFLT = 3, STAT_MEMFREE = 4,
             STAT_MEMTOT = 5, STAT_AVAIL = 6, STAT_CACHES = 7, kNumStats = 8 };
struct __attribute__((packed)) BalStat { u16 tag; u64 val; };
static_assert(sizeof(BalStat) == 10);

enum : u8 { BLK_NONE = 0, BLK_FREE, BLK_FULL, BLK_PARTIAL };

alignas(4096) u8 infq_mem[kQueueMemSize];
alignas(4096) u8 defq_mem[kQueueMemSize];
alignas(4096) u8 statq_mem[kQueueMemSize];
alignas(4096) u32 pfn_bufs[kBufs][kPfnsPerBuf];
alignas(64) BalStat stat_buf[kNumStats];

// A run of pages handed back by a deflate batch, re-touched once acknowledged.
struct Run { u32 block, first, count; };

// Zero-initialised .bss; balloon_bringup() sets the rest.
struct Balloon {
    VirtioPci vp;
    Virtq inf, def, stats;
    bool has_stats, inf_irq, def_irq, cfg_irq, tsc_deadline;
    u64 tsc_hz;
    volatile u64 irq_config, irq_queue, irq_timer;
    u64 halts;
    // Blocks, indexed by address / 2 MiB.
    u8 state[kMaxBlocks];
    u32 lo_block, hi_block;  // managed blocks lie in [lo_block, hi_block)
    u32 managed_blocks;
    i64 partial;             // the partly ballooned block, -1 if none
    u32 partial_pages;       // its ballooned pages: [0, partial_pages)
    u32 pages;               // pages in the balloon (acknowledged by the device)
    u32 full_blocks;
    // The batch being built.
    u32 max_bufs;            // buffers per batch: kBufs, or fewer with small queues
    u32 nbuf, npfn;          // buffers used, PFNs in the last one
    Run runs[kBufs * 2 + 4];
    u32 nruns;
    // Counters.
    u64 stats_sent, stats_requests;
    u64 inflated_pages_total, deflated_pages_total, deflated_zero;
    u64 batches;
    u64 inflate_ns, deflate_ns, touch_ns, verify_ns;  // time in device round trips, re-touching, verifying
    bool error;
};
Balloon b;

void irq_config(Frame*) { b.irq_config = b.irq_config + 1; lapic_eoi(); }
void irq_queue(Frame*) { b.irq_queue = b.irq_queue + 1; lapic_eoi(); }
void irq_timer(Frame*) { b.irq_timer = b.irq_timer + 1; lapic_eoi(); }

u64 block_addr(u32 blk) { return u64(blk) * kBlock; }
u32 block_pfn(u32 blk) { return u32(block_addr(blk) / kPage); }

u32 read_target() { return mmio_read<u32>(b.vp.device_cfg + CFG_NUM_PAGES); }
void write_actual(u32 pages) { mmio_write<u32>(b.vp.device_cfg + CFG_ACTUAL, pages); }
bool device_broken() {
    u8 s = b.vp.status();
    return (s & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) != 0 || b.inf.bad_used || b.def.bad_used ||
           b.stats.bad_used;
}

// Halts until an interrupt or until_ns (at most cap_ns from now); may return early.
void wait_event(u64 until_ns, u64 cap_ns) {
    u64 now = kvmclock_ns();
    if (now >= until_ns) return;
    if (!b.tsc_deadline) { cpu_relax(); return; }  // nothing bounds a halt: poll
    if (until_ns - now > cap_ns) until_ns = now + cap_ns;
    cli();
    // 2.7.10: interrupts on at the next used buffer, then re-check.
    bool pending = b.inf.enable_interrupts();
    pending |= b.def.enable_interrupts();
    if (b.has_stats) pending |= b.stats.enable_interrupts();
    if (!pending) {
        u64 ticks = u64((unsigned __int128)(until_ns - now) * b.tsc_hz / 1000000000ull);
        wrmsr(MSR_IA32_TSC_DEADLINE, rdtsc() + (ticks ? ticks : 1));
        ++b.halts;
        sti_hlt();
        cli();
        wrmsr(MSR_IA32_TSC_DEADLINE, 0);
    }
    b.inf.disable_interrupts();
    b.def.disable_interrupts();
    if (b.has_stats) b.stats.disable_interrupts();
    sti();
}

// ---- statistics (5.5.6.3) --------------------------------------------------------------------

u64 free_pages() { return u64(b.managed_blocks) * kPagesPerBlock - b.pages; }

void stats_fill() {
    u64 free_bytes = free_pages() * kPage;
    const u64 vals[kNumStats] = {0, 0, 0, 0, free_bytes, g_ram_total, free_bytes, 0};
    for (u16 i = 0; i < kNumStats; ++i) { stat_buf[i].tag = i; stat_buf[i].val = vals[i]; }
}

// Fills the one stats buffer and makes it available (not yet published).
void stats_push() {
    stats_fill();
    b.stats.set_buffer(0, stat_buf, sizeof stat_buf, false);
    b.stats.push(0);
}

// The device returns the buffer when it wants fresh figures.
void stats_service() {
    if (!b.has_stats) return;
    u16 id;
    u32 len;
    bool got = false;
    while (b.stats.pop(&id, &len)) got = true;
    if (got) { ++b.stats_requests; stats_push(); b.stats.publish(); ++b.stats_sent; }
}

void batch_reset() { b.nbuf = 0; b.npfn = 0; b.nruns = 0; }

// Appends `count` PFNs of block `blk` from page `first` (the caller bounds the batch).
void batch_add(u32 blk, u32 first, u32 count) {
    b.runs[b.nruns++] = {blk, first, count};
    u32 pfn = block_pfn(blk) + first;
    for (u32 i = 0; i < count; ++i) {
        if (b.nbuf == 0 || b.npfn == kPfnsPerBuf) { ++b.nbuf; b.npfn = 0; }
        pfn_bufs[b.nbuf - 1][b.npfn++] = pfn + i;
    }
}
u32 batch_pages() { return b.nbuf ? (b.nbuf - 1) * kPfnsPerBuf + b.npfn : 0; }

// Sends the batch on `vq` and waits until the device has used every buffer.
bool batch_send(Virtq& vq, bool have_irq) {
    u32 n = b.nbuf;
    if (n == 0) return true;
    for (u32 i = 0; i < n; ++i) {
        u32 cnt = i + 1 < n ? kPfnsPerBuf : b.npfn;
        vq.set_buffer(u16(i), pfn_bufs[i], cnt * 4, false);
        vq.push(u16(i));
    }
    vq.publish();
    ++b.batches;
    u64 give_up = kvmclock_ns() + kQueueTimeoutNs;
    u32 done = 0;
    while (done < n) {
        u16 id;
        u32 len;
        while (done < n && vq.pop(&id, &len)) ++done;
        if (done == n) break;
        stats_service();
        if (kvmclock_ns() >= give_up || device_broken()) {
            print("balloon: queue %u: the device used %u of %u buffers in 10 s (status %#x)\n", vq.index, done, n,
                  b.vp.status());
            b.error = true;
            return false;
        }
        wait_event(give_up, have_irq ? kPollNs : 1000000ull);
    }
    return true;
}

constexpr u64 kPatternKey = 0x6b6775657374ba11ull;
inline void touch_page(u64 addr) {
    volatile u64* p = reinterpret_cast<volatile u64*>(addr);
    p[0] = addr;
    p[kPage / 8 - 1] = ~addr ^ kPatternKey;
}
inline bool page_ok(u64 addr) {
    volatile u64* p = reinterpret_cast<volatile u64*>(addr);
    return p[0] == addr && p[kPage / 8 - 1] == (~addr ^ kPatternKey);
}
void touch_pages(u32 blk, u32 first, u32 count) {
    for (u32 i = first; i < first + count; ++i) touch_page(block_addr(blk) + i * kPage);
}
// Counts the pages outside the balloon that lost their pattern (printing the first few).
u64 verify_all() {
    u64 bad = 0;
    for (u32 blk = b.lo_block; blk < b.hi_block; ++blk) {
        u32 first;
        if (b.state[blk] == BLK_FREE) first = 0;
        else if (b.state[blk] == BLK_PARTIAL) first = b.partial_pages;
        else continue;
        stats_service();  // a pass over 1 GiB can take seconds: keep answering the host
        for (u32 i = first; i < kPagesPerBlock; ++i) {
            u64 a = block_addr(blk) + i * kPage;
            if (!page_ok(a)) {
                if (bad < 4) {
                    volatile u64* p = reinterpret_cast<volatile u64*>(a);
                    print("balloon: page %#lx lost its pattern (%#lx %#lx)\n", a, u64(p[0]), u64(p[kPage / 8 - 1]));
                }
                ++bad;
            }
        }
    }
    return bad;
}

// Block `blk` now has its first `n` pages in the balloon: free, partial or full.
void set_ballooned(u32 blk, u32 n) {
    if (b.state[blk] == BLK_FULL) --b.full_blocks;
    b.state[blk] = n == 0 ? BLK_FREE : n == kPagesPerBlock ? BLK_FULL : BLK_PARTIAL;
    if (n == kPagesPerBlock) ++b.full_blocks;
    if (b.state[blk] == BLK_PARTIAL) { b.partial = blk; b.partial_pages = n; }
    else if (b.partial == i64(blk)) { b.partial = -1; b.partial_pages = 0; }
}

// One batch toward `target`; returns the pages moved (0: nothing possible).
u32 inflate_batch(u32 target) {
    batch_reset();
    u32 cur = b.pages;
    u32 cap = b.max_bufs * kPfnsPerBuf;
    // Plan the batch; the blocks change state only once the device has them.
    i64 partial = b.partial;
    u32 pp = b.partial_pages;
    u32 next_free = b.hi_block;  // search downward from here
    u32 planned = 0;
    // Blocks that become full, and a new partial one, recorded in runs[].
    while (cur + planned < target && batch_pages() + kPagesPerBlock <= cap) {
        u32 need = target - (cur + planned);
        if (partial >= 0) {
            u32 n = kPagesPerBlock - pp < need ? kPagesPerBlock - pp : need;
            batch_add(u32(partial), pp, n);
            planned += n;
            pp += n;
            if (pp == kPagesPerBlock) { partial = -1; pp = 0; }
            continue;
        }
        u32 blk = next_free;
        while (blk > b.lo_block && b.state[blk - 1] != BLK_FREE) --blk;
        if (blk == b.lo_block) break;  // nothing left to give
        --blk;
        next_free = blk;
        u32 n = need >= kPagesPerBlock ? kPagesPerBlock : need;
        batch_add(blk, 0, n);
        planned += n;
        if (n < kPagesPerBlock) { partial = blk; pp = n; }
    }
    if (planned == 0) return 0;
    u64 t0 = kvmclock_ns();
    bool sent = batch_send(b.inf, b.inf_irq);
    b.inflate_ns += kvmclock_ns() - t0;
    if (!sent) return 0;
    // Acknowledged: the runs now belong to the balloon.
    for (u32 r = 0; r < b.nruns; ++r) set_ballooned(b.runs[r].block, b.runs[r].first + b.runs[r].count);
    b.pages += planned;
    b.inflated_pages_total += planned;
    return planned;
}

u32 deflate_batch(u32 target) {
    batch_reset();
    u32 cur = b.pages;
    u32 cap = b.max_bufs * kPfnsPerBuf;
    i64 partial = b.partial;
    u32 pp = b.partial_pages;
    u32 next_full = b.lo_block;  // search upward from here: the lowest ballooned block goes first
    u32 planned = 0;
    while (cur - planned > target && batch_pages() + kPagesPerBlock <= cap) {
        u32 excess = cur - planned - target;
        if (partial >= 0) {
            u32 n = pp < excess ? pp : excess;
            batch_add(u32(partial), pp - n, n);
            planned += n;
            pp -= n;
            if (pp == 0) partial = -1;
            continue;
        }
        u32 blk = next_full;
        while (blk < b.hi_block && b.state[blk] != BLK_FULL) ++blk;
        if (blk == b.hi_block) break;  // bookkeeping says the balloon is empty
        next_full = blk + 1;
        u32 n = excess >= kPagesPerBlock ? kPagesPerBlock : excess;
        batch_add(blk, kPagesPerBlock - n, n);
        planned += n;
        if (n < kPagesPerBlock) { partial = blk; pp = kPagesPerBlock - n; }
    }
    if (planned == 0) return 0;
    u64 t0 = kvmclock_ns();
    bool sent = batch_send(b.def, b.def_irq);
    u64 t1 = kvmclock_ns();
    b.deflate_ns += t1 - t0;
    if (!sent) return 0;
    // Acknowledged: the pages are ours again. See whether the host dropped
    // them (a discarded page reads back as zeros), then re-touch them.
    for (u32 r = 0; r < b.nruns; ++r) {
        const Run& run = b.runs[r];
        set_ballooned(run.block, run.first);
        for (u32 i = run.first; i < run.first + run.count; ++i)
            if (*reinterpret_cast<volatile u64*>(block_addr(run.block) + i * kPage) == 0) ++b.deflated_zero;
        touch_pages(run.block, run.first, run.count);
        stats_service();
    }
    b.touch_ns += kvmclock_ns() - t1;
    b.pages -= planned;
    b.deflated_pages_total += planned;
    return planned;
}

// ---- bring-up (3.1.1, 4.1.5, 5.5.5) -------------------------------------------------------------------

bool blocks_init() {
    u64 lo = (u64(__image_end) + kBlock - 1) & ~(kBlock - 1);
    b.lo_block = kMaxBlocks;
    b.hi_block = 0;
    for (u32 r = 0; r < g_nram; ++r) {
        u64 s = g_ram[r].addr, e = g_ram[r].addr + g_ram[r].size;
        if (s < lo) s = lo;
        if (e > kRamLimit) e = kRamLimit;
        s = (s + kBlock - 1) & ~(kBlock - 1);
        e &= ~(kBlock - 1);
        for (u64 a = s; a < e; a += kBlock) {
            u32 blk = u32(a / kBlock);
            if (b.state[blk] != BLK_NONE) continue;  // overlapping map entries
            b.state[blk] = BLK_FREE;
            ++b.managed_blocks;
            if (blk < b.lo_block) b.lo_block = blk;
            if (blk + 1 > b.hi_block) b.hi_block = blk + 1;
        }
    }
    if (!b.managed_blocks) { b.lo_block = b.hi_block = 0; return false; }
    b.partial = -1;
    return true;
}

bool balloon_bringup() {
    PciAddr a;
    if (!pci_find(kVirtioVendor, kBalloonDevice, &a) && !pci_find(kVirtioVendor, kBalloonTransitional, &a)) {
        print("balloon: no virtio-balloon (1af4:1045 or transitional 1af4:1002) on bus 0\n");
        return false;
    }
    VirtioPci& vp = b.vp;
    if (!vp.probe(a)) { print("balloon: %02x:%02x.%x lacks the virtio common/notify capabilities\n", a.bus, a.slot, a.func); return false; }
    if (!vp.device_cfg || vp.device_cfg_len < 8) { print("balloon: no device configuration structure\n"); return false; }
    if (!vp.negotiate(kWantedFeatures)) { print("balloon: feature negotiation failed (VERSION_1 or FEATURES_OK)\n"); return false; }
    b.has_stats = (vp.features & BAL_F_STATS_VQ) != 0;
    set_irq_handler(kVecConfig, irq_config);
    set_irq_handler(kVecInflate, irq_queue);
    set_irq_handler(kVecDeflate, irq_queue);
    set_irq_handler(kVecStats, irq_queue);
    set_irq_handler(kVecTimer, irq_timer);
    // MSI-X: entry 0 configuration changes, 1 inflateq, 2 deflateq, 3 statsq;
    // with a smaller table, everything on entry 0.
    u16 e_cfg = VIRTIO_NO_VECTOR, e_inf = VIRTIO_NO_VECTOR, e_def = VIRTIO_NO_VECTOR, e_st = VIRTIO_NO_VECTOR;
    u32 want = b.has_stats ? 4 : 3;
    if (vp.msix_size >= want) {
        vp.msix_route(0, kVecConfig); vp.msix_route(1, kVecInflate); vp.msix_route(2, kVecDeflate);
        if (b.has_stats) vp.msix_route(3, kVecStats);
        e_cfg = 0; e_inf = 1; e_def = 2; e_st = b.has_stats ? 3 : VIRTIO_NO_VECTOR;
    } else if (vp.msix_size >= 1) {
        vp.msix_route(0, kVecConfig);  // irq_config: any interrupt wakes the loop
        e_cfg = e_inf = e_def = 0;
        e_st = b.has_stats ? 0 : VIRTIO_NO_VECTOR;
    }
    if (e_cfg != VIRTIO_NO_VECTOR) vp.msix_enable();
    b.cfg_irq = e_cfg != VIRTIO_NO_VECTOR && vp.set_config_vector(e_cfg) == e_cfg;
    bool st_vec = false;
    if (!vp.setup_queue(kInflateQ, &b.inf, infq_mem, e_inf, &b.inf_irq) ||
        !vp.setup_queue(kDeflateQ, &b.def, defq_mem, e_def, &b.def_irq) ||
        (b.has_stats && !vp.setup_queue(kStatsQ, &b.stats, statq_mem, e_st, &st_vec))) {
        print("balloon: queue setup failed\n");
        vp.reset();
        return false;
    }
    // A batch binds descriptor i to buffer i, so it has at most one buffer
    // per descriptor; a 2 MiB block takes two.
    b.max_bufs = kBufs;
    if (b.inf.size < b.max_bufs) b.max_bufs = b.inf.size;
    if (b.def.size < b.max_bufs) b.max_bufs = b.def.size;
    if (b.max_bufs < 2) {
        print("balloon: queues of %u/%u descriptors, need at least 2\n", b.inf.size, b.def.size);
        vp.reset();
        return false;
    }
    if (e_cfg != VIRTIO_NO_VECTOR && !(b.cfg_irq && b.inf_irq && b.def_irq))
        print("balloon: device refused MSI-X vectors (config %d inflate %d deflate %d): polling\n", b.cfg_irq,
              b.inf_irq, b.def_irq);
    b.inf.disable_interrupts();
    b.def.disable_interrupts();
    if (b.has_stats) {
        stats_push();  // 5.5.6.3: one buffer on statsq from the start
        b.stats.disable_interrupts();
    }
    b.tsc_hz = tsc_hz();
    b.tsc_deadline = (cpuid(1).c & (1u << 24)) != 0;
    if (b.tsc_deadline) lapic_write(LAPIC_LVTT, (2u << 17) | kVecTimer);
    vp.driver_ok();  // 3.1.1 step 8
    write_actual(0);
    if (b.has_stats) { b.stats.publish(); ++b.stats_sent; }
    return true;
}

void balloon_shutdown() {
    b.vp.reset();
    if (b.tsc_deadline) { wrmsr(MSR_IA32_TSC_DEADLINE, 0); lapic_write(LAPIC_LVTT, 1u << 16); }
}

}  // namespace

bool test_balloon(const char* cmdline) {
    u64 ms = cmdline_u64(cmdline, "balloon_ms", 60000, "balloon");
    u64 cycles = cmdline_u64(cmdline, "cycles", 1, "balloon");
    if (cycles == 0) cycles = 1;
    u64 stop = cmdline_u64(cmdline, "balloon_stop", 1, "balloon");  // 0: only balloon_ms ends the test
    const bool blocks = blocks_init();
    if (!blocks) print("balloon: no 2 MiB RAM block above the image and below 3 GiB\n");
    if (!blocks || !balloon_bringup()) {
        print("RESULT balloon changes=0 max_pages=0 mismatches=0 stats_sent=0 ok=0\n");
        return false;
    }
    print("balloon: device %02x:%02x.%x features=%#lx stats=%d deflate_on_oom=%d must_tell_host=%d msix=%d "
          "msix_entries=%u queue_size=%u; %u blocks of 2 MiB (%lu MiB) at %#lx-%#lx, RAM %lu MiB\n",
          b.vp.pci.bus, b.vp.pci.slot, b.vp.pci.func, b.vp.features, b.has_stats ? 1 : 0,
          (b.vp.features & BAL_F_DEFLATE_ON_OOM) ? 1 : 0, (b.vp.features & BAL_F_MUST_TELL_HOST) ? 1 : 0,
          b.cfg_irq ? 1 : 0, b.vp.msix_size, b.inf.size, b.managed_blocks, u64(b.managed_blocks) * 2, block_addr(b.lo_block),
          block_addr(b.hi_block), g_ram_total >> 20);
    // 1) Touch every page the test owns.
    u64 t0 = kvmclock_ns();
    for (u32 blk = b.lo_block; blk < b.hi_block; ++blk)
        if (b.state[blk] == BLK_FREE) { touch_pages(blk, 0, kPagesPerBlock); stats_service(); }
    u64 t1 = kvmclock_ns();
    print("balloon: touched %lu pages in %lu ms; following num_pages for up to %lu ms\n",
          u64(b.managed_blocks) * kPagesPerBlock, (t1 - t0) / 1000000, ms);

    // 2) Follow the target.
    u64 deadline = t1 + ms * 1000000ull;
    u64 changes = 0, mismatches = 0, nonzero_sets = 0;
    u32 max_pages = 0, host_target = 0;
    u32 stuck_at = ~0u;  // a target we could not reach (no free block left)
    bool moving = false;
    bool ended_by_host = false;
    for (;;) {
        u64 now = kvmclock_ns();
        if (now >= deadline) break;
        if (device_broken()) {
            print("balloon: device status %#x, bad used entries %lu\n", b.vp.status(),
                  b.inf.bad_used + b.def.bad_used + b.stats.bad_used);
            b.error = true;
            break;
        }
        stats_service();
        u32 t = read_target();
        if (t != host_target) {
            if (host_target == 0 && t != 0) ++nonzero_sets;
            host_target = t;
            stuck_at = ~0u;
        }
        if (t != b.pages && t != stuck_at) {
            u32 moved = t > b.pages ? inflate_batch(t) : deflate_batch(t);
            if (b.error) break;
            if (moved) {
                write_actual(b.pages);
                if (b.pages > max_pages) max_pages = b.pages;
                moving = true;
                continue;
            }
            stuck_at = t;  // no progress possible toward this target
            print("balloon: cannot reach target %u pages: %u ballooned, no free 2 MiB block left\n", t, b.pages);
            moving = true;  // report the change as far as it went
        }
        if (moving) {
            // The change is complete (or as far as it can go): check every page.
            moving = false;
            u64 tv = kvmclock_ns();
            u64 bad = verify_all();
            b.verify_ns += kvmclock_ns() - tv;
            mismatches += bad;
            ++changes;
            print("balloon: target=%u actual=%u inflated_blocks=%u%s\n", t, b.pages, b.full_blocks,
                  bad ? " (pattern mismatches!)" : "");
        }
        if (stop && t == 0 && b.pages == 0 && nonzero_sets >= cycles) { ended_by_host = true; break; }
        wait_event(deadline, kPollNs);
    }
    u64 elapsed = kvmclock_ns() - t1;
    bool ok = !b.error && mismatches == 0;
    print("balloon: %s after %lu ms; %lu pages inflated and %lu deflated in all (%lu of the deflated read back "
          "zeroed), %lu batches, %lu+%lu kicks, %lu stats requests, %lu config / %lu queue interrupts, %lu halts\n",
          ended_by_host ? "host set the target back to 0" : (b.error ? "device error" : "balloon_ms elapsed"),
          elapsed / 1000000, b.inflated_pages_total, b.deflated_pages_total, b.deflated_zero, b.batches,
          b.inf.kicks, b.def.kicks, b.stats_requests, u64(b.irq_config), u64(b.irq_queue), b.halts);
    print("balloon: %lu ms waiting for inflate batches, %lu ms for deflate batches, %lu ms re-touching deflated "
          "pages, %lu ms verifying patterns\n", b.inflate_ns / 1000000, b.deflate_ns / 1000000, b.touch_ns / 1000000,
          b.verify_ns / 1000000);
    print("RESULT balloon changes=%lu max_pages=%u mismatches=%lu stats_sent=%lu ok=%d\n", changes, max_pages,
          mismatches, b.stats_sent, ok ? 1 : 0);
    balloon_shutdown();
    return ok;
}
