// The small guest's virtio-mem driver (VIRTIO 1.2 section 5.15) over the
// virtio-pci transport (virtio.hpp), and test=mem.
//
// The test waits (polling the configuration, no interrupts) until
// requested_size is non-zero, then plugs blocks of block_size from the start
// of the device region up to requested_size (at most kMaxBlocks), one PLUG
// request each, writes a pattern into every 4 KiB page of every plugged
// block and checks it, unplugs every other block and checks that the blocks
// it kept still hold their pattern, checks the device's answers to requests
// the spec says are errors (plugging past requested_size: NACK; unplugging an
// unplugged block: ERROR), and ends with UNPLUG_ALL. The region lies above
// 4 GiB, outside the boot identity map, so the test maps it first with 2 MiB
// pages (PDPT entries of its own, up to kMaxGiB GiB).
//
// One request at a time: descriptor 0 the 24-byte request, descriptor 1 the
// 10-byte response (5.15.6). Waits are bounded by a spin count, not a clock,
// so the test also runs where there is no kvmclock (QEMU's TCG).
#include "cpu.hpp"
#include "lib.hpp"
#include "pci.hpp"
#include "tests.hpp"
#include "virtio.hpp"

namespace {

constexpr u16 kVirtioVendor = 0x1af4, kMemDevice = 0x1058;   // 4.1.2.1: 0x1040 + 24
constexpr u64 MEM_F_UNPLUGGED_INACCESSIBLE = 1ull << 1;      // 5.15.3
// 5.15.4: struct virtio_mem_config offsets.
constexpr u32 CFG_BLOCK_SIZE = 0, CFG_ADDR = 16, CFG_REGION_SIZE = 24, CFG_PLUGGED = 40, CFG_REQUESTED = 48;
// 5.15.6.
constexpr u16 REQ_PLUG = 0, REQ_UNPLUG = 1, REQ_UNPLUG_ALL = 2, REQ_STATE = 3;
constexpr u16 RESP_ACK = 0, RESP_NACK = 1, RESP_ERROR = 3, RESP_NONE = 0xffff;
constexpr u16 STATE_PLUGGED = 0, STATE_MIXED = 2;

constexpr u32 kMaxBlocks = 64;
constexpr u64 kMaxGiB = 4;
constexpr u64 kPage = 4096, kHuge = 2ull << 20;
constexpr u64 kPresent = 1, kWrite = 2, kPs = 1u << 7;

alignas(4096) u8 q_mem[kQueueMemSize];
alignas(4096) u64 region_pd[kMaxGiB][512];
alignas(64) u8 req_buf[24];
alignas(64) u8 resp_buf[16];

VirtioPci vp;
Virtq vq;

u64 cfg64(u32 off) {
    // 64-bit fields as two 32-bit reads, re-read if the generation changed (2.5.1).
    for (;;) {
        u8 gen = vp.config_generation();
        u64 v = mmio_read<u32>(vp.device_cfg + off) | u64(mmio_read<u32>(vp.device_cfg + off + 4)) << 32;
        if (vp.config_generation() == gen) return v;
    }
}

// One request; the response type (RESP_NONE: no answer within the spin bound).
u16 request(u16 type, u64 addr, u16 nb, u16* state) {
    memset(req_buf, 0, sizeof req_buf);
    memcpy(req_buf, &type, 2);
    memcpy(req_buf + 8, &addr, 8);
    memcpy(req_buf + 16, &nb, 2);
    memset(resp_buf, 0xee, sizeof resp_buf);
    vq.set_buffer(0, req_buf, 24, false);
    vq.set_buffer(1, resp_buf, 10, true);
    vq.desc[0].flags = VIRTQ_DESC_F_NEXT;
    vq.desc[0].next = 1;
    vq.push(0);
    vq.publish();
    u16 id = 0;
    u32 len = 0;
    for (u64 spins = 0; !vq.pop(&id, &len); ++spins) {
        if (spins > 2000000000ull) return RESP_NONE;
        cpu_relax();
    }
    if (id != 0 || len < 2) return RESP_NONE;
    u16 resp = 0;
    memcpy(&resp, resp_buf, 2);
    if (state != nullptr) memcpy(state, resp_buf + 8, 2);
    return resp;
}

// Identity-maps [addr, addr + len) with 2 MiB pages; false past kMaxGiB GiB.
bool map_region(u64 addr, u64 len) {
    u64 cr3;
    asm volatile("mov %%cr3, %0" : "=r"(cr3));
    u64* pml4 = reinterpret_cast<u64*>(cr3 & ~0xfffull);
    u64* pdpt = reinterpret_cast<u64*>(pml4[0] & 0x000ffffffffff000ull);
    const u64 first = addr >> 30, last = (addr + len - 1) >> 30;
    if (last >= 512 || last - first >= kMaxGiB) return false;
    for (u64 g = first; g <= last; ++g) {
        if (pdpt[g] & kPresent) continue;   // mapped already (the boot map's first 4 GiB)
        u64* pd = region_pd[g - first];
        for (u64 j = 0; j < 512; ++j) pd[j] = ((g << 30) + j * kHuge) | kPresent | kWrite | kPs;
        pdpt[g] = u64(pd) | kPresent | kWrite;
    }
    asm volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) :: "memory");   // flush the TLB
    return true;
}

u64 pattern(u64 block, u64 page) { return 0x6b67756573740000ull ^ (block << 20) ^ page; }

void fill_block(u64 base, u64 block, u64 bsize) {
    for (u64 p = 0; p < bsize / kPage; ++p) *reinterpret_cast<volatile u64*>(base + p * kPage) = pattern(block, p);
}
bool check_block(u64 base, u64 block, u64 bsize) {
    for (u64 p = 0; p < bsize / kPage; ++p)
        if (*reinterpret_cast<volatile u64*>(base + p * kPage) != pattern(block, p)) return false;
    return true;
}

} // namespace

bool test_mem(const char* cmdline) {
    const u64 wait_polls = cmdline_u64(cmdline, "mem_polls", 4000000000ull, "mem");
    PciAddr a;
    if (!pci_find(kVirtioVendor, kMemDevice, &a)) { print("mem: no virtio-mem (1af4:1058) on bus 0\n"); return false; }
    if (!vp.probe(a)) { print("mem: %02x:%02x.%x lacks the virtio capabilities\n", a.bus, a.slot, a.func); return false; }
    if (!vp.device_cfg || vp.device_cfg_len < 56) { print("mem: no 56-byte device configuration\n"); return false; }
    if (!vp.negotiate(VIRTIO_F_VERSION_1 | MEM_F_UNPLUGGED_INACCESSIBLE)) { print("mem: feature negotiation failed\n"); return false; }
    bool vec = false;
    if (!vp.setup_queue(0, &vq, q_mem, VIRTIO_NO_VECTOR, &vec) || vq.size < 2) {
        print("mem: queue setup failed\n");
        vp.reset();
        return false;
    }
    vp.driver_ok();   // 3.1.1 step 8

    const u64 bsize = cfg64(CFG_BLOCK_SIZE), addr = cfg64(CFG_ADDR), region = cfg64(CFG_REGION_SIZE);
    print("mem: device %02x:%02x.%x region %#lx + %lu MiB, block %lu KiB, plugged %lu MiB\n", a.bus, a.slot, a.func,
          addr, region >> 20, bsize >> 10, cfg64(CFG_PLUGGED) >> 20);
    if (bsize < kPage || (bsize & (bsize - 1)) != 0 || bsize % kHuge != 0 || addr % kHuge != 0 || region < bsize) {
        print("mem: unusable block size or region\n");
        vp.reset();
        return false;
    }
    // 5.15.5: memory still plugged from before is unplugged first.
    if (cfg64(CFG_PLUGGED) != 0 && request(REQ_UNPLUG_ALL, 0, 0, nullptr) != RESP_ACK) {
        print("mem: UNPLUG_ALL at start refused\n");
        vp.reset();
        return false;
    }
    print("mem: waiting for requested_size\n");
    u64 requested = 0;
    for (u64 i = 0; (requested = cfg64(CFG_REQUESTED)) == 0 && i < wait_polls / 1000; ++i)
        for (int k = 0; k < 1000; ++k) cpu_relax();
    if (requested == 0) {
        print("RESULT mem error=no_requested_size\n");
        vp.reset();
        return false;
    }
    u64 n = requested / bsize;
    if (n > kMaxBlocks) n = kMaxBlocks;
    if (n > region / bsize) n = region / bsize;
    if (!map_region(addr, n * bsize + bsize)) {
        print("mem: region at %#lx is beyond what the test maps\n", addr);
        vp.reset();
        return false;
    }

    bool ok = true;
    u32 acks = 0;
    for (u64 i = 0; i < n; ++i) {
        u16 r = request(REQ_PLUG, addr + i * bsize, 1, nullptr);
        if (r != RESP_ACK) { print("mem: PLUG of block %lu: %u\n", i, r); ok = false; break; }
        ++acks;
    }
    const u64 plugged = cfg64(CFG_PLUGGED);
    if (plugged != acks * bsize) { print("mem: plugged_size %lu after %u plugs\n", plugged, acks); ok = false; }
    // Plugging past requested_size is refused with NACK (5.15: plug requests
    // are rejected once plugged_size reaches requested_size).
    const bool full = ok && n * bsize == requested && n < region / bsize;
    const u16 past = full ? request(REQ_PLUG, addr + n * bsize, 1, nullptr) : RESP_NACK;
    if (past != RESP_NACK) { print("mem: PLUG past requested_size answered %u, not NACK\n", past); ok = false; }

    for (u64 i = 0; i < acks; ++i) fill_block(addr + i * bsize, i, bsize);
    u32 bad = 0;
    for (u64 i = 0; i < acks; ++i) bad += !check_block(addr + i * bsize, i, bsize);
    u16 st = 0xffff;
    const u16 sr = acks ? request(REQ_STATE, addr, u16(acks), &st) : RESP_ACK;
    if (acks && (sr != RESP_ACK || st != STATE_PLUGGED)) { print("mem: STATE of the plugged blocks: %u/%u\n", sr, st); ok = false; }

    // Unplug every other block; the rest keep their contents.
    u32 unplugged = 0;
    for (u64 i = 1; i < acks; i += 2) {
        u16 r = request(REQ_UNPLUG, addr + i * bsize, 1, nullptr);
        if (r != RESP_ACK) { print("mem: UNPLUG of block %lu: %u\n", i, r); ok = false; }
        else ++unplugged;
    }
    u32 kept_bad = 0;
    for (u64 i = 0; i < acks; i += 2) kept_bad += !check_block(addr + i * bsize, i, bsize);
    if (acks >= 2) {
        const u16 again = request(REQ_UNPLUG, addr + bsize, 1, nullptr);
        if (again != RESP_ERROR) { print("mem: UNPLUG of an unplugged block answered %u, not ERROR\n", again); ok = false; }
        st = 0xffff;
        if (request(REQ_STATE, addr, u16(acks), &st) != RESP_ACK || st != STATE_MIXED) { print("mem: STATE not MIXED (%u)\n", st); ok = false; }
    }
    const u16 all = request(REQ_UNPLUG_ALL, 0, 0, nullptr);
    const u64 after = cfg64(CFG_PLUGGED);
    if (all != RESP_ACK || after != 0) { print("mem: UNPLUG_ALL %u, plugged_size %lu\n", all, after); ok = false; }
    ok &= bad == 0 && kept_bad == 0 && acks == n;
    print("RESULT mem blocks=%lu block_kib=%lu plugged=%u unplugged=%u pattern_bad=%u kept_bad=%u past_requested=%s "
          "pass=%d\n", n, bsize >> 10, acks, unplugged, bad, kept_bad,
          past == RESP_NACK ? "nack" : "other", ok ? 1 : 0);
    vp.reset();
    return ok;
}
