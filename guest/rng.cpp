// The small guest's virtio-rng driver (VIRTIO 1.2 section 5.4) over the
// virtio-pci transport (virtio.hpp), and test=rng.
//
// The test posts rng.n (default 4096) bytes as device-writable buffers of
// rng.chunk bytes (default 512; 5.4.6.1: the device may fill less than a
// buffer, so a buffer comes back as often as it takes) until it has them all,
// then checks that the bytes are not all equal and that most byte values
// occur (a source of zeros or a device that answers without writing fails).
// Polling, no interrupts; waits bounded by a spin count, so it also runs
// under QEMU's TCG (and, unchanged, on QEMU's virtio-rng-pci).
#include "cpu.hpp"
#include "lib.hpp"
#include "pci.hpp"
#include "tests.hpp"
#include "virtio.hpp"

namespace {

constexpr u16 kVirtioVendor = 0x1af4, kRngDevice = 0x1044;   // 4.1.2.1: 0x1040 + 4
constexpr u32 kMaxBytes = 64 * 1024;

alignas(4096) u8 q_mem[kQueueMemSize];
alignas(4096) u8 pool[kMaxBytes];
alignas(64) u8 scratch[kMaxBytes];

VirtioPci vp;
Virtq vq;

} // namespace

bool test_rng(const char* cmdline) {
    u64 want = cmdline_u64(cmdline, "rng.n", 4096, "rng");
    u64 chunk = cmdline_u64(cmdline, "rng.chunk", 512, "rng");
    if (want == 0 || want > kMaxBytes) want = kMaxBytes;
    if (chunk == 0 || chunk > want) chunk = want;
    PciAddr a;
    if (!pci_find(kVirtioVendor, kRngDevice, &a)) { print("rng: no virtio-rng (1af4:1044) on bus 0\n"); return false; }
    if (!vp.probe(a)) { print("rng: %02x:%02x.%x lacks the virtio capabilities\n", a.bus, a.slot, a.func); return false; }
    if (!vp.negotiate(VIRTIO_F_VERSION_1)) { print("rng: feature negotiation failed\n"); return false; }
    bool vec = false;
    if (!vp.setup_queue(0, &vq, q_mem, VIRTIO_NO_VECTOR, &vec) || vq.size < 1) {
        print("rng: queue setup failed\n");
        vp.reset();
        return false;
    }
    vp.driver_ok();   // 3.1.1 step 8

    // One buffer at a time in descriptor 0: scratch, copied to the pool.
    u64 got = 0, requests = 0;
    bool ok = true;
    while (got < want) {
        const u32 len = u32(want - got < chunk ? want - got : chunk);
        memset(scratch, 0, len);
        vq.set_buffer(0, scratch, len, true);
        vq.push(0);
        vq.publish();
        u16 id = 0;
        u32 used = 0;
        u64 spins = 0;
        for (; !vq.pop(&id, &used); ++spins) {
            if (spins > 2000000000ull) break;
            cpu_relax();
        }
        if (spins > 2000000000ull || id != 0 || used == 0 || used > len) {
            print("rng: request %lu: no answer or a bad length (id %u, len %u of %u)\n", requests, id, used, len);
            ok = false;
            break;
        }
        memcpy(pool + got, scratch, used);
        got += used;
        ++requests;
    }
    u32 seen[256] = {};
    for (u64 i = 0; i < got; ++i) ++seen[pool[i]];
    u32 values = 0, top = 0;
    for (u32 v : seen) {
        values += v != 0;
        if (v > top) top = v;
    }
    // 4096 uniform bytes: every value about 16 times; nowhere near 1 in 8 alike.
    const bool random = got >= 256 && values > 128 && top < got / 8;
    ok &= random && got == want;
    print("RESULT rng bytes=%lu requests=%lu distinct=%u most_common=%u pass=%d\n", got, requests, values, top,
          ok ? 1 : 0);
    vp.reset();
    return ok;
}
