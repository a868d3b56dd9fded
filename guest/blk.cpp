// The small guest's virtio-blk driver (VIRTIO 1.2 section 5.2) over the
// virtio-pci transport (virtio.hpp), and its test modes:
//   test=blk        the whole disk written with a pattern (sector number and
//                   blk.seed in every sector) in multi-sector requests, a
//                   FLUSH, everything read back and checked, GET_ID; with
//                   VIRTIO_BLK_F_RO instead: one write must fail with IOERR
//                   and the whole disk must still read.
//   test=blk-bench  4 KiB random reads at queue depth 1 and 32, 64 KiB
//                   sequential writes and reads: IOPS and MB/s by kvmclock;
//                   with blk.go=1 each phase waits for the host's go (see
//                   wait_go), the disk's last 4 KiB left to that marker.
//   test=blk-log    crash-consistency writer: record n in sector n, each
//                   followed by a FLUSH, `RECORD n` printed once the flush
//                   completed, until the disk is full (or blk.records=N).
//
// One request queue (5.2.2: requestq1). Request slot s owns descriptors 3s,
// 3s+1, 3s+2: the header (device-readable), the data buffer of slot s and
// the status byte (device-writable); a FLUSH uses just the header and the
// status. A used entry names the chain's head, so id / 3 is the slot; ids
// that are not a busy slot's head are counted and ignored. Single-threaded:
// everything runs on the CPU that called the test; waits halt with MSI-X
// plus a TSC-deadline timer that bounds every halt (5 ms).
#include "cpu.hpp"
#include "lib.hpp"
#include "pci.hpp"
#include "tests.hpp"
#include "virtio.hpp"

namespace {

// 4.1.2.1: 0x1040 + device ID 2; 0x1001 is the transitional ID, whose
// modern interface this driver uses all the same.
constexpr u16 kVirtioVendor = 0x1af4, kBlkDevice = 0x1042, kBlkTransitional = 0x1001;
// 5.2.3 feature bits.
constexpr u64 BLK_F_SIZE_MAX = 1ull << 1, BLK_F_SEG_MAX = 1ull << 2, BLK_F_RO = 1ull << 5,
              BLK_F_BLK_SIZE = 1ull << 6, BLK_F_FLUSH = 1ull << 9;
constexpr u64 kWantedFeatures = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | BLK_F_SIZE_MAX | BLK_F_SEG_MAX |
                                BLK_F_RO | BLK_F_BLK_SIZE | BLK_F_FLUSH;
// 5.2.4 struct virtio_blk_config offsets.
constexpr u32 CFG_CAPACITY = 0, CFG_SIZE_MAX = 8, CFG_SEG_MAX = 12, CFG_BLK_SIZE = 20;
// 5.2.6 request types and status values.
enum : u32 { VIRTIO_BLK_T_IN = 0, VIRTIO_BLK_T_OUT = 1, VIRTIO_BLK_T_FLUSH = 4, VIRTIO_BLK_T_GET_ID = 8 };
enum : u8 { VIRTIO_BLK_S_OK = 0, VIRTIO_BLK_S_IOERR = 1, VIRTIO_BLK_S_UNSUPP = 2 };
constexpr u32 VIRTIO_BLK_ID_BYTES = 20;
struct BlkReqHdr { u32 type, reserved; u64 sector; };  // 5.2.6: le32 type, le32 reserved, le64 sector
static_assert(sizeof(BlkReqHdr) == 16);

constexpr u32 kSector = 512;  // 5.2.6: sector numbers and capacity count 512-byte units
constexpr u32 kMaxReqBytes = 64 * 1024;
constexpr u32 kMaxSlots = 32;
constexpr u16 kRequestQ = 0;
// IDT vectors (net.cpp uses 0x50-0x53, balloon.cpp 0x58-0x5c) and MSI-X entries.
constexpr u8 kVecConfig = 0x60, kVecQueue = 0x61, kVecTimer = 0x62;
constexpr u16 kEntryConfig = 0, kEntryQueue = 1;
constexpr u64 kHaltCapNs = 5000000ull;              // a lost interrupt costs at most this
constexpr u64 kReqTimeoutNs = 30000000000ull;       // a request the device keeps 30 s: a device error

alignas(4096) u8 q_mem[kQueueMemSize];
alignas(4096) u8 data[kMaxSlots][kMaxReqBytes];
alignas(64) BlkReqHdr hdrs[kMaxSlots];
alignas(64) volatile u8 statuses[kMaxSlots];

// Zero-initialised .bss (no constructors run in this guest): blk_bringup() sets the rest.
struct BlkDev {
    VirtioPci vp;
    Virtq q;
    u64 capacity;     // sectors
    u32 blk_size;     // bytes (5.2.4: the optimal unit; 512 when not offered)
    u32 req_max;      // data bytes per request: 64 KiB, or less by size_max
    u32 slots;        // requests in flight at most
    bool ro, flush, msix, tsc_deadline, busy_poll;
    u64 tsc_hz;
    volatile u64 irq_queue, irq_config;
    u64 halts, bad_used;
    // Slot bookkeeping.
    bool busy[kMaxSlots];
    u64 issued_ns[kMaxSlots];
    u32 bytes[kMaxSlots];
    u16 free_slots[kMaxSlots];
    u32 nfree;
};
BlkDev dev;

void irq_queue(Frame*) { dev.irq_queue = dev.irq_queue + 1; lapic_eoi(); }
void irq_config(Frame*) { dev.irq_config = dev.irq_config + 1; lapic_eoi(); }
void irq_timer(Frame*) { lapic_eoi(); }

u64 ns_to_tsc(u64 ns) { return u64((unsigned __int128)ns * dev.tsc_hz / 1000000000ull); }

bool blk_bringup() {
    dev = BlkDev{};
    PciAddr a;
    if (!pci_find(kVirtioVendor, kBlkDevice, &a) && !pci_find(kVirtioVendor, kBlkTransitional, &a)) {
        print("blk: no virtio-blk (1af4:1042) on bus 0\n");
        return false;
    }
    VirtioPci& vp = dev.vp;
    if (!vp.probe(a)) { print("blk: %02x:%02x.%x lacks the virtio common/notify capabilities\n", a.bus, a.slot, a.func); return false; }
    if (!vp.negotiate(kWantedFeatures)) { print("blk: feature negotiation failed (VERSION_1 or FEATURES_OK)\n"); return false; }
    dev.ro = (vp.features & BLK_F_RO) != 0;
    dev.flush = (vp.features & BLK_F_FLUSH) != 0;
    dev.capacity = vp.cfg_read64(CFG_CAPACITY);
    dev.blk_size = (vp.features & BLK_F_BLK_SIZE) ? vp.cfg_read32(CFG_BLK_SIZE) : kSector;
    if (dev.blk_size < kSector || (dev.blk_size & (dev.blk_size - 1))) dev.blk_size = kSector;
    // 5.2.4: size_max bounds any single segment; ours have one data segment,
    // so seg_max (at least 1 by definition) never binds.
    dev.req_max = kMaxReqBytes;
    if (vp.features & BLK_F_SIZE_MAX) {
        u32 sm = vp.cfg_read32(CFG_SIZE_MAX) & ~(kSector - 1);
        if (sm >= kSector && sm < dev.req_max) dev.req_max = sm;
    }
    // MSI-X: entry 0 configuration changes, 1 the request queue; with a
    // one-entry table both share entry 0.
    set_irq_handler(kVecConfig, irq_config);
    set_irq_handler(kVecQueue, irq_queue);
    set_irq_handler(kVecTimer, irq_timer);
    u16 e_q = VIRTIO_NO_VECTOR, e_cfg = VIRTIO_NO_VECTOR;
    if (vp.msix_size >= 2) {
        vp.msix_route(kEntryConfig, kVecConfig);
        vp.msix_route(kEntryQueue, kVecQueue);
        e_cfg = kEntryConfig;
        e_q = kEntryQueue;
    } else if (vp.msix_size >= 1) {
        vp.msix_route(0, kVecQueue);
        e_cfg = e_q = 0;
    }
    if (e_q != VIRTIO_NO_VECTOR) vp.msix_enable();
    if (e_cfg != VIRTIO_NO_VECTOR) vp.set_config_vector(e_cfg);
    bool q_vec = false;
    if (!vp.setup_queue(kRequestQ, &dev.q, q_mem, e_q, &q_vec) || dev.q.size < 3) {
        print("blk: request queue setup failed\n");
        vp.reset();
        return false;
    }
    dev.msix = q_vec;
    if (e_q != VIRTIO_NO_VECTOR && !q_vec) print("blk: device refused the queue's MSI-X vector: polling\n");
    dev.slots = dev.q.size / 3 < kMaxSlots ? dev.q.size / 3 : kMaxSlots;
    for (u32 s = 0; s < dev.slots; ++s) dev.free_slots[s] = u16(dev.slots - 1 - s);
    dev.nfree = dev.slots;
    dev.q.disable_interrupts();
    vp.driver_ok();  // 3.1.1 step 8
    dev.tsc_hz = tsc_hz();
    dev.tsc_deadline = (cpuid(1).c & (1u << 24)) != 0;
    if (dev.tsc_deadline) lapic_write(LAPIC_LVTT, (2u << 17) | kVecTimer);  // TSC-deadline mode
    print("RESULT blk-init capacity=%lu blk_size=%u req_max=%u slots=%u queue_size=%u ro=%d flush=%d msix=%d "
          "event_idx=%d features=%#lx pci=%02x:%02x.%x\n",
          dev.capacity, dev.blk_size, dev.req_max, dev.slots, dev.q.size, dev.ro ? 1 : 0, dev.flush ? 1 : 0,
          dev.msix ? 1 : 0, dev.q.event_idx ? 1 : 0, vp.features, a.bus, a.slot, a.func);
    return true;
}

void blk_shutdown() {
    dev.vp.reset();  // the device stops touching our memory (4.1.4.3.2)
    if (dev.tsc_deadline) { wrmsr(MSR_IA32_TSC_DEADLINE, 0); lapic_write(LAPIC_LVTT, 1u << 16); }
}

// Queues one request in a free slot (the caller has checked nfree) and
// returns the slot; not yet visible to the device: publish().
u32 submit(u32 type, u64 sector, u32 bytes) {
    u32 s = dev.free_slots[--dev.nfree];
    dev.busy[s] = true;
    hdrs[s] = BlkReqHdr{type, 0, sector};
    statuses[s] = 0xff;  // not a status the device can write: shows an untouched byte
    u16 d = u16(3 * s);
    dev.q.set_desc(d, &hdrs[s], sizeof(BlkReqHdr), VIRTQ_DESC_F_NEXT, u16(d + 1));
    if (bytes) {
        // IN and GET_ID: the device writes the data; OUT: it reads it (5.2.6).
        u16 w = (type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID) ? VIRTQ_DESC_F_WRITE : 0;
        dev.q.set_desc(u16(d + 1), data[s], bytes, u16(w | VIRTQ_DESC_F_NEXT), u16(d + 2));
        dev.q.set_desc(u16(d + 2), &statuses[s], 1, VIRTQ_DESC_F_WRITE, 0);
    } else {
        dev.q.set_desc(u16(d + 1), &statuses[s], 1, VIRTQ_DESC_F_WRITE, 0);
    }
    dev.issued_ns[s] = kvmclock_ns();
    dev.bytes[s] = bytes;
    dev.q.push(d);
    return s;
}

// The next completed slot, or -1. Used entries that are not a busy slot's
// head (a device bug) are counted and skipped.
int reap() {
    u16 id;
    u32 len;
    while (dev.q.pop(&id, &len)) {
        u32 s = id / 3u;
        if (id % 3 != 0 || s >= dev.slots || !dev.busy[s]) { ++dev.bad_used; continue; }
        dev.busy[s] = false;
        dev.free_slots[dev.nfree++] = u16(s);
        return int(s);
    }
    return -1;
}

// Halts until an interrupt or until_ns (at most kHaltCapNs from now while
// requests are in flight); may return early. Spins where nothing can bound a
// halt (no TSC-deadline timer) or with blk_poll=1.
void wait_event(u64 until_ns) {
    u64 now = kvmclock_ns();
    if (now >= until_ns) return;
    if (!dev.tsc_deadline || dev.busy_poll) { cpu_relax(); return; }
    bool inflight = dev.nfree != dev.slots;
    if (inflight && !dev.msix) { cpu_relax(); return; }  // nothing tells us of a completion
    if (inflight && until_ns - now > kHaltCapNs) until_ns = now + kHaltCapNs;
    cli();
    // 2.7.10: ask for an interrupt at the next used buffer, then re-check.
    if (!dev.q.enable_interrupts()) {
        u64 ticks = ns_to_tsc(until_ns - now);
        wrmsr(MSR_IA32_TSC_DEADLINE, rdtsc() + (ticks ? ticks : 1));
        ++dev.halts;
        sti_hlt();  // any interrupt ends it: the caller re-checks everything
        cli();
        wrmsr(MSR_IA32_TSC_DEADLINE, 0);
    }
    dev.q.disable_interrupts();
    sti();
}

void idle_ms(u64 ms) {
    u64 end = kvmclock_ns() + ms * 1000000ull;
    while (kvmclock_ns() < end) wait_event(end);
}

// Keeps up to `depth` requests in flight. issue() queues the next request
// (through submit()) and returns false when there is none; done(slot, status)
// sees each completion. False when a request stayed with the device for
// kReqTimeoutNs (a message names it).
template <typename Issue, typename Done> bool pipeline(u32 depth, Issue issue, Done done) {
    if (depth > dev.slots) depth = dev.slots;
    if (depth == 0) depth = 1;
    bool more = true;
    for (;;) {
        bool queued = false;
        while (more && dev.slots - dev.nfree < depth) {
            if (!issue()) { more = false; break; }
            queued = true;
        }
        if (queued) dev.q.publish();
        if (!more && dev.nfree == dev.slots) return true;
        int s = reap();
        if (s >= 0) {
            done(u32(s), statuses[s]);
            continue;
        }
        u64 now = kvmclock_ns(), oldest = ~0ull;
        for (u32 i = 0; i < dev.slots; ++i)
            if (dev.busy[i] && dev.issued_ns[i] < oldest) oldest = dev.issued_ns[i];
        if (now - oldest > kReqTimeoutNs) {
            for (u32 i = 0; i < dev.slots; ++i)
                if (dev.busy[i] && dev.issued_ns[i] == oldest)
                    print("blk: request type %u sector %lu not completed in %lu s (device status %#x)\n", hdrs[i].type,
                          hdrs[i].sector, u64(kReqTimeoutNs / 1000000000ull), dev.vp.status());
            return false;
        }
        wait_event(oldest + kReqTimeoutNs);
    }
}

// One request, waited for; its status (0x100 when it timed out).
u32 one_request(u32 type, u64 sector, u32 bytes, u32* slot_out = nullptr) {
    u32 status = 0x100, slot = 0;
    bool issued = false;
    bool ok = pipeline(1, [&] {
        if (issued) return false;
        issued = true;
        slot = submit(type, sector, bytes);
        return true;
    }, [&](u32, u8 st) { status = st; });
    if (slot_out) *slot_out = slot;
    return ok ? status : 0x100;
}

const char* status_name(u32 st) {
    switch (st) {
    case VIRTIO_BLK_S_OK: return "ok";
    case VIRTIO_BLK_S_IOERR: return "ioerr";
    case VIRTIO_BLK_S_UNSUPP: return "unsupp";
    case 0x100: return "timeout";
    default: return "bad";
    }
}

// ---- the pattern ---------------------------------------------------------------------

// Sector `sector`'s 64 words: its number, the seed, then a sequence both determine.
void fill_sector(u64* p, u64 sector, u64 seed) {
    p[0] = sector;
    p[1] = seed;
    u64 x = sector * 0x9e3779b97f4a7c15ull ^ seed;
    for (u32 i = 2; i < kSector / 8; ++i) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;  // Knuth's MMIX LCG
        p[i] = x ^ (x >> 29);
    }
}

bool check_sector(const u64* p, u64 sector, u64 seed) {
    u64 want[kSector / 8];
    fill_sector(want, sector, seed);
    for (u32 i = 0; i < kSector / 8; ++i)
        if (p[i] != want[i]) return false;
    return true;
}

u64 xorshift(u64* s) {
    u64 x = *s;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    return *s = x;
}

// The serial from GET_ID (5.2.6: up to 20 bytes, NUL-padded), printable
// characters only, "-" when empty; false when the request failed.
bool get_id(char out[VIRTIO_BLK_ID_BYTES + 1], u32* status) {
    u32 slot;
    for (u32 s = 0; s < dev.slots; ++s) memset(data[s], 0, VIRTIO_BLK_ID_BYTES);
    *status = one_request(VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES, &slot);
    u32 n = 0;
    if (*status == VIRTIO_BLK_S_OK)
        for (; n < VIRTIO_BLK_ID_BYTES && data[slot][n]; ++n) {
            u8 c = data[slot][n];
            out[n] = c > ' ' && c < 0x7f ? char(c) : '?';
        }
    if (n == 0) out[n++] = '-';
    out[n] = 0;
    return *status == VIRTIO_BLK_S_OK;
}

// Reads sectors [0, count) in req_max requests, depth `depth`; per_sector(p, n) for each.
template <typename PerSector> bool read_all(u64 count, u32 depth, u64* io_errors, PerSector per_sector) {
    u64 next = 0;
    u32 per_req = dev.req_max / kSector;
    return pipeline(depth, [&] {
        if (next >= count) return false;
        u32 n = count - next < per_req ? u32(count - next) : per_req;
        submit(VIRTIO_BLK_T_IN, next, n * kSector);
        next += n;
        return true;
    }, [&](u32 s, u8 st) {
        if (st != VIRTIO_BLK_S_OK) { *io_errors += 1; return; }
        for (u32 i = 0; i < dev.bytes[s] / kSector; ++i) per_sector(reinterpret_cast<const u64*>(data[s] + i * kSector), hdrs[s].sector + i);
    });
}

bool test_blk_ro(u64 seed, const char* serial) {
    // 5.2.6.1: with VIRTIO_BLK_F_RO offered, a write must fail with
    // VIRTIO_BLK_S_IOERR and change nothing.
    u32 slot = dev.free_slots[dev.nfree - 1];
    fill_sector(reinterpret_cast<u64*>(data[slot]), 0, seed);
    u32 wst = one_request(VIRTIO_BLK_T_OUT, 0, kSector);
    u64 io_errors = 0, sectors = 0;
    bool read_ok = read_all(dev.capacity, kMaxSlots, &io_errors, [&](const u64*, u64) { ++sectors; });
    bool ok = wst == VIRTIO_BLK_S_IOERR && read_ok && io_errors == 0 && sectors == dev.capacity;
    print("RESULT blk ro=1 write_status=%s sectors=%lu read_errors=%lu serial=%s ok=%d\n", status_name(wst), sectors,
          io_errors, serial, ok ? 1 : 0);
    return ok;
}

// blk.go=1: waits until the disk's last 4 KiB start with "go NAME\n",
// which the host writes there once it has read the VMM's CPU time: a
// handshake that no delay on the host side can break. Polls every 50 ms
// (halted in between), for up to 10 minutes.
bool wait_go(const char* name) {
    char want[40];
    format(want, sizeof want, "go %s\n", name);
    usize n = strlen(want);
    u64 give_up = kvmclock_ns() + 600000000000ull;
    while (kvmclock_ns() < give_up) {
        u32 slot;
        u32 st = one_request(VIRTIO_BLK_T_IN, dev.capacity - 8, 4096, &slot);
        if (st != VIRTIO_BLK_S_OK) { print("blk-bench: reading the go marker: %s\n", status_name(st)); return false; }
        if (memcmp(data[slot], want, n) == 0) return true;
        idle_ms(50);
    }
    print("blk-bench: no go for phase %s in 10 minutes\n", name);
    return false;
}

}  // namespace

bool test_blk(const char* cmdline) {
    u64 seed = cmdline_u64(cmdline, "blk.seed", 0x6b67, "blk");
    u32 depth = u32(cmdline_u64(cmdline, "blk.qd", kMaxSlots, "blk"));
    if (!blk_bringup()) {
        print("RESULT blk sectors=0 errors=0 ok=0\n");
        return false;
    }
    char serial[VIRTIO_BLK_ID_BYTES + 1];
    u32 id_status;
    get_id(serial, &id_status);
    if (dev.ro) {
        bool ok = test_blk_ro(seed, serial);
        blk_shutdown();
        return ok;
    }
    u64 t0 = kvmclock_ns();
    // Write: every sector, req_max bytes per request, `depth` in flight.
    u32 per_req = dev.req_max / kSector;
    u64 next = 0, write_errors = 0;
    bool ok = pipeline(depth, [&] {
        if (next >= dev.capacity) return false;
        u32 n = dev.capacity - next < per_req ? u32(dev.capacity - next) : per_req;
        u32 s = dev.free_slots[dev.nfree - 1];  // the slot submit() takes
        for (u32 i = 0; i < n; ++i) fill_sector(reinterpret_cast<u64*>(data[s] + i * kSector), next + i, seed);
        submit(VIRTIO_BLK_T_OUT, next, n * kSector);
        next += n;
        return true;
    }, [&](u32, u8 st) { if (st != VIRTIO_BLK_S_OK) ++write_errors; });
    u64 t1 = kvmclock_ns();
    u32 flush_status = dev.flush ? one_request(VIRTIO_BLK_T_FLUSH, 0, 0) : u32(VIRTIO_BLK_S_OK);
    // Read back and check.
    u64 read_errors = 0, bad = 0, checked = 0;
    ok = ok && read_all(dev.capacity, depth, &read_errors, [&](const u64* p, u64 sector) {
        ++checked;
        if (check_sector(p, sector, seed)) return;
        if (bad < 4) print("blk: sector %lu holds sector %lu seed %#lx, not seed %#lx\n", sector, p[0], p[1], seed);
        ++bad;
    });
    u64 t2 = kvmclock_ns();
    u64 errors = write_errors + read_errors + bad + (flush_status != VIRTIO_BLK_S_OK) + (checked != dev.capacity);
    ok = ok && errors == 0 && dev.bad_used == 0 && id_status == VIRTIO_BLK_S_OK;
    print("blk: wrote %lu sectors in %lu ms, read and checked them in %lu ms; %lu halts, %lu queue interrupts, %lu kicks\n",
          dev.capacity, (t1 - t0) / 1000000, (t2 - t1) / 1000000, dev.halts, u64(dev.irq_queue), dev.q.kicks);
    print("RESULT blk ro=0 sectors=%lu checked=%lu errors=%lu write_errors=%lu read_errors=%lu bad_sectors=%lu "
          "flush=%s id_status=%s bad_used=%lu serial=%s ok=%d\n",
          dev.capacity, checked, errors, write_errors, read_errors, bad, dev.flush ? status_name(flush_status) : "none",
          status_name(id_status), dev.bad_used, serial, ok ? 1 : 0);
    blk_shutdown();
    return ok;
}

bool test_blk_bench(const char* cmdline) {
    u64 ms = cmdline_u64(cmdline, "blk.ms", 2000, "blk");
    u64 idle = cmdline_u64(cmdline, "blk.idle_ms", 0, "blk");
    bool go = cmdline_u64(cmdline, "blk.go", 0, "blk") != 0;
    u32 seq_qd = u32(cmdline_u64(cmdline, "blk.seq_qd", 8, "blk"));
    char which[64] = "seqwrite,seqread,randread1,randread32";
    cmdline_get(cmdline, "blk.phases", which, sizeof which);
    if (!blk_bringup()) {
        print("RESULT blk-bench ok=0\n");
        return false;
    }
    dev.busy_poll = cmdline_u64(cmdline, "blk_poll", 0, "blk") != 0;
    u64 rng = 0x2545f4914f6cdd1dull ^ rdtsc();
    const u32 seq_bytes = dev.req_max < kMaxReqBytes ? dev.req_max : kMaxReqBytes;
    bool all_ok = true;
    struct Phase { const char* name; u32 type, bytes, qd; bool random; };
    const Phase phases[] = {
        {"seqwrite", VIRTIO_BLK_T_OUT, seq_bytes, seq_qd, false},
        {"seqread", VIRTIO_BLK_T_IN, seq_bytes, seq_qd, false},
        {"randread1", VIRTIO_BLK_T_IN, 4096, 1, true},
        {"randread32", VIRTIO_BLK_T_IN, 4096, 32, true},
    };
    for (const Phase& ph : phases) {
        if (!list_has(which, ph.name)) continue;
        if (dev.ro && ph.type == VIRTIO_BLK_T_OUT) continue;
        // Request-sized units on the disk, less its last 4 KiB (the go marker).
        u64 span = dev.capacity > 8 ? (dev.capacity - 8) / (ph.bytes / kSector) : 0;
        if (span == 0) { print("blk-bench: disk smaller than one %u-byte request\n", ph.bytes); all_ok = false; break; }
        // The host reads the VMM's CPU time while the guest waits before a
        // phase and idles after it: "phase X ready", wait for the go, run,
        // RESULT, idle.
        print("blk-bench: phase %s ready\n", ph.name);
        if (go && !wait_go(ph.name)) { all_ok = false; break; }
        u64 ios = 0, errors = 0, unit = 0;
        u64 t0 = kvmclock_ns(), stop = t0 + ms * 1000000ull;
        bool ok = pipeline(ph.qd, [&] {
            if (kvmclock_ns() >= stop) return false;
            u64 u = ph.random ? xorshift(&rng) % span : unit++ % span;
            submit(ph.type, u * (ph.bytes / kSector), ph.bytes);
            return true;
        }, [&](u32, u8 st) { ++ios; if (st != VIRTIO_BLK_S_OK) ++errors; });
        u64 el = kvmclock_ns() - t0;
        u64 iops = el ? ios * 1000000000ull / el : 0;
        // kB/s (bytes * 1e9 / ns / 1000): MB/s with three decimals.
        u64 kbps = el ? u64((unsigned __int128)ios * ph.bytes * 1000000ull / el) : 0;
        ok = ok && errors == 0;
        all_ok &= ok;
        print("RESULT blk-bench phase=%s bs=%u qd=%u ios=%lu ms=%lu iops=%lu mbps=%lu.%03lu errors=%lu ok=%d\n", ph.name,
              ph.bytes, ph.qd, ios, el / 1000000, iops, kbps / 1000, kbps % 1000, errors, ok ? 1 : 0);
        idle_ms(idle);
        if (!ok) break;
    }
    print("blk-bench: %lu halts, %lu queue interrupts, %lu kicks, %lu bad used entries\n", dev.halts,
          u64(dev.irq_queue), dev.q.kicks, dev.bad_used);
    blk_shutdown();
    return all_ok && dev.bad_used == 0;
}

bool test_blk_log(const char* cmdline) {
    u64 seed = cmdline_u64(cmdline, "blk.seed", 0x6b67, "blk");
    u64 limit = cmdline_u64(cmdline, "blk.records", ~0ull, "blk");
    if (!blk_bringup()) {
        print("RESULT blk-log records=0 ok=0\n");
        return false;
    }
    if (dev.ro) {
        print("blk-log: the disk is read-only\nRESULT blk-log records=0 ok=0\n");
        blk_shutdown();
        return false;
    }
    if (!dev.flush) print("blk-log: no VIRTIO_BLK_F_FLUSH: each write is complete when used (write-through)\n");
    u64 n = 0, count = dev.capacity < limit ? dev.capacity : limit;
    bool ok = true;
    for (; n < count; ++n) {
        // Record n: the pattern of sector n with the seed (magic, n, seed,
        // payload), its last word replaced by a checksum of the others.
        u32 s = dev.free_slots[dev.nfree - 1];
        u64* p = reinterpret_cast<u64*>(data[s]);
        fill_sector(p, n, seed);
        p[0] = 0x474f4c4b4c42474bull;  // "KGBLKLOG" read as little-endian bytes
        p[1] = n;
        p[2] = seed;
        u64 sum = 0xcbf29ce484222325ull;
        for (u32 i = 0; i < kSector / 8 - 1; ++i) sum = (sum ^ p[i]) * 0x100000001b3ull;  // FNV-1a over words
        p[kSector / 8 - 1] = sum;
        u32 st = one_request(VIRTIO_BLK_T_OUT, n, kSector);
        if (st != VIRTIO_BLK_S_OK) { print("blk-log: write of record %lu: %s\n", n, status_name(st)); ok = false; break; }
        if (dev.flush && (st = one_request(VIRTIO_BLK_T_FLUSH, 0, 0)) != VIRTIO_BLK_S_OK) {
            print("blk-log: flush after record %lu: %s\n", n, status_name(st));
            ok = false;
            break;
        }
        print("RECORD %lu\n", n);
    }
    print("RESULT blk-log records=%lu flush=%d ok=%d\n", n, dev.flush ? 1 : 0, ok ? 1 : 0);
    blk_shutdown();
    return ok;
}
