// virtio-mem device (VIRTIO 1.2 section 5.15) without KVM, on its event loop:
// a 16 MiB guest with a 256 MiB hotplug region at 4 GiB, the fake driver
// (support/fake_virtio.hpp) sending requests on the guest-request queue as
// Linux's virtio_mem does (a 24-byte request, a 10-byte writable response).
// Covers the configuration space, plug/unplug/state with the memory's
// contents, the hostile requests the spec answers with ERROR or NACK, broken
// chains (DEVICE_NEEDS_RESET), reset keeping the blocks (5.15.5), and a
// fixed-seed random run checked against a model of the spec.
#include "devices/virtio_mem.hpp"

#include "tests/support/fake_virtio.hpp"

#include <cstdint>
#include <cstring>
#include <gtest/gtest.h>
#include <optional>
#include <random>
#include <vector>

namespace kguest {
namespace {

constexpr std::uint64_t MiB = 1ull << 20;
constexpr std::uint64_t kBlock = VirtioMem::kBlockSize;
constexpr std::uint64_t kRegion = 256 * MiB;
constexpr std::uint64_t kBase = kHighRamStart;   // 16 MiB of RAM: the region starts at 4 GiB

struct Resp {
    std::uint16_t type = 0xffff, state = 0xffff;
};

class Rig {
public:
    GuestMemory mem{16 * MiB, Backing::thp, kRegion};
    fake::Transport tr;
    VirtioMem dev{mem};
    std::vector<Virtqueue> vqs;
    std::optional<fake::Driver> ring;

    Rig() {
        dev.attach(&tr);
        tr.features = dev.device_features() | virtio_bit(VIRTIO_F_VERSION_1);
        vqs.emplace_back(mem);
        ring.emplace(mem, 64);
        EXPECT_TRUE(ring->configure(vqs[0])) << vqs[0].error().reason;
        dev.activate(vqs, mem);
    }
    ~Rig() { dev.reset(); }

    // One request, answered: returns the response (type 0xffff: none came).
    Resp request(std::uint16_t type, std::uint64_t addr = 0, std::uint16_t nb = 0, std::uint8_t pad = 0) {
        std::uint8_t req[24];
        std::memset(req, pad, sizeof req);   // 5.15.6: the padding MUST be ignored
        req[0] = static_cast<std::uint8_t>(type);
        req[1] = static_cast<std::uint8_t>(type >> 8);
        std::memcpy(req + 8, &addr, 8);
        req[16] = static_cast<std::uint8_t>(nb);
        req[17] = static_cast<std::uint8_t>(nb >> 8);
        const std::uint64_t in = ring->alloc_bytes(std::vector<std::uint8_t>(req, req + sizeof req));
        const std::uint64_t out = ring->alloc(10, 0xee);
        const std::uint16_t head = ring->add_chain({{in, 24}, {out, 10, true}});
        dev.queue_notify(0);
        EXPECT_TRUE(dev.settle());
        Resp r;
        std::uint32_t id = 0, len = 0;
        if (!ring->take_used(id, len)) return r;
        EXPECT_EQ(id, head);
        EXPECT_EQ(len, 10u);
        std::uint8_t b[10] = {};
        EXPECT_TRUE(mem.read(Gpa(out), b, sizeof b));
        r.type = static_cast<std::uint16_t>(b[0] | b[1] << 8);
        r.state = static_cast<std::uint16_t>(b[8] | b[9] << 8);
        return r;
    }
    std::uint16_t plug(std::uint64_t addr, std::uint16_t nb) { return request(VIRTIO_MEM_REQ_PLUG, addr, nb).type; }
    std::uint16_t unplug(std::uint64_t addr, std::uint16_t nb) { return request(VIRTIO_MEM_REQ_UNPLUG, addr, nb).type; }
    Resp state(std::uint64_t addr, std::uint16_t nb) { return request(VIRTIO_MEM_REQ_STATE, addr, nb); }

    void fill(std::uint64_t gpa, std::uint64_t len, std::uint8_t v) {
        auto r = mem.range(Gpa(gpa), len);
        ASSERT_TRUE(r && r->fill(0, v, len));
    }
    bool all_bytes(std::uint64_t gpa, std::uint64_t len, std::uint8_t v) {
        std::vector<std::uint8_t> got(len);
        if (!mem.read(Gpa(gpa), got.data(), len)) return false;
        for (std::uint8_t b : got)
            if (b != v) return false;
        return true;
    }
};

TEST(VirtioMemRegion, HotplugRegionIsMappedButNotRam) {
    GuestMemory m(16 * MiB, Backing::thp, 100 * MiB);
    ASSERT_NE(m.hotplug_region(), nullptr);
    EXPECT_EQ(m.hotplug_region()->gpa.value(), kHighRamStart);
    EXPECT_EQ(m.hotplug_region()->size, 128 * MiB);   // rounded up to a Linux memory block
    EXPECT_EQ(m.regions().size(), 1u);                // E820 sees RAM only
    EXPECT_EQ(m.size(), 16 * MiB);
    EXPECT_TRUE(m.contains(Gpa(kHighRamStart), 128 * MiB));
    EXPECT_FALSE(m.contains(Gpa(kHighRamStart), 128 * MiB + 1));
    EXPECT_FALSE(m.contains(Gpa(kHighRamStart - 4096), 8192));   // never across regions
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(m.host_address_for_kvm(*m.hotplug_region())) % kHugePageSize, 0u);

    // With high RAM the region starts above it, on a 128 MiB boundary.
    GuestMemory big(kMmioHoleStart + 130 * MiB, Backing::off, 128 * MiB);
    ASSERT_NE(big.hotplug_region(), nullptr);
    EXPECT_EQ(big.hotplug_region()->gpa.value(), kHighRamStart + 256 * MiB);
    EXPECT_EQ(big.regions().size(), 2u);

    EXPECT_THROW(GuestMemory(16 * MiB, Backing::hugetlbfs, 128 * MiB), std::runtime_error);
    GuestMemory none(16 * MiB, Backing::thp);
    EXPECT_EQ(none.hotplug_region(), nullptr);
    EXPECT_THROW(VirtioMem{none}, std::invalid_argument);
}

TEST(VirtioMemDevice, ConfigurationSpace) {
    Rig r;
    EXPECT_EQ(r.dev.device_id(), 24);
    EXPECT_EQ(r.dev.config_size(), 56u);
    EXPECT_NE(r.dev.device_features() & virtio_bit(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE), 0u);
    EXPECT_EQ(r.dev.device_features() & virtio_bit(VIRTIO_MEM_F_ACPI_PXM), 0u);
    std::uint8_t raw[56];
    r.dev.read_config(0, raw);
    VirtioMemConfig c;
    std::memcpy(&c, raw, sizeof c);
    EXPECT_EQ(c.block_size, kBlock);
    EXPECT_EQ(c.node_id, 0);
    EXPECT_EQ(c.addr, kBase);
    EXPECT_EQ(c.region_size, kRegion);
    EXPECT_EQ(c.usable_region_size, kRegion);
    EXPECT_EQ(c.plugged_size, 0u);
    EXPECT_EQ(c.requested_size, 0u);

    EXPECT_TRUE(r.dev.set_requested_size(64 * MiB));
    EXPECT_EQ(r.tr.config_calls, 1);   // 5.15.4: MUST notify
    EXPECT_EQ(r.dev.config().requested_size, 64 * MiB);
    EXPECT_FALSE(r.dev.set_requested_size(64 * MiB + 4096));   // not a multiple of the block
    EXPECT_FALSE(r.dev.set_requested_size(kRegion + kBlock));  // past the region
    EXPECT_EQ(r.dev.config().requested_size, 64 * MiB);
    EXPECT_EQ(r.tr.config_calls, 1);

    // Read-only (5.15.4): a write changes nothing; reads past the end are all-ones.
    const std::uint8_t junk[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    r.dev.write_config(48, junk);
    EXPECT_EQ(r.dev.config().requested_size, 64 * MiB);
    std::uint8_t tail[4];
    r.dev.read_config(54, tail);
    EXPECT_EQ(tail[2], 0xff);
}

TEST(VirtioMemDevice, PlugWriteUnplugKeepsOtherBlocks) {
    Rig r;
    ASSERT_TRUE(r.dev.set_requested_size(8 * MiB));
    EXPECT_EQ(r.plug(kBase, 2), VIRTIO_MEM_RESP_ACK);
    EXPECT_EQ(r.plug(kBase + 2 * kBlock, 2), VIRTIO_MEM_RESP_ACK);
    EXPECT_EQ(r.dev.config().plugged_size, 8 * MiB);
    for (std::uint64_t i = 0; i < 4; ++i) r.fill(kBase + i * kBlock, kBlock, static_cast<std::uint8_t>(0x10 + i));

    Resp s = r.state(kBase, 4);
    EXPECT_EQ(s.type, VIRTIO_MEM_RESP_ACK);
    EXPECT_EQ(s.state, VIRTIO_MEM_STATE_PLUGGED);
    s = r.state(kBase + 2 * kBlock, 4);
    EXPECT_EQ(s.state, VIRTIO_MEM_STATE_MIXED);
    s = r.state(kBase + 8 * kBlock, 8);
    EXPECT_EQ(s.state, VIRTIO_MEM_STATE_UNPLUGGED);

    // Unplug block 1: it reads zero and its host memory is gone; the others keep theirs.
    EXPECT_EQ(r.unplug(kBase + kBlock, 1), VIRTIO_MEM_RESP_ACK);
    EXPECT_EQ(r.dev.config().plugged_size, 6 * MiB);
    EXPECT_EQ(r.mem.resident_bytes(Gpa(kBase + kBlock), kBlock), 0u);
    EXPECT_TRUE(r.all_bytes(kBase + kBlock, kBlock, 0));
    EXPECT_TRUE(r.all_bytes(kBase, kBlock, 0x10));
    EXPECT_TRUE(r.all_bytes(kBase + 2 * kBlock, kBlock, 0x12));
    EXPECT_TRUE(r.all_bytes(kBase + 3 * kBlock, kBlock, 0x13));
    EXPECT_FALSE(r.dev.block_plugged(1));
    EXPECT_TRUE(r.dev.block_plugged(3));

    EXPECT_EQ(r.request(VIRTIO_MEM_REQ_UNPLUG_ALL).type, VIRTIO_MEM_RESP_ACK);
    EXPECT_EQ(r.dev.config().plugged_size, 0u);
    // (Block 1 is left out: the reads above mapped the zero page there.)
    for (std::uint64_t i : {0, 2, 3}) EXPECT_EQ(r.mem.resident_bytes(Gpa(kBase + i * kBlock), kBlock), 0u) << i;
    EXPECT_TRUE(r.all_bytes(kBase, 4 * kBlock, 0));
    EXPECT_EQ(r.tr.needs_reset_calls, 0);
    const VirtioMemCounters c = r.dev.counters();
    EXPECT_EQ(c.requests, 7u);
    EXPECT_EQ(c.acks, 7u);
}

TEST(VirtioMemDevice, HostileRequestsAnsweredPerSpec) {
    Rig r;
    ASSERT_TRUE(r.dev.set_requested_size(4 * MiB));
    const std::uint64_t end = kBase + kRegion;
    struct Case {
        const char* what;
        std::uint16_t type;
        std::uint64_t addr;
        std::uint16_t nb;
        std::uint16_t want;
    };
    const Case cases[] = {
        {"plug below the region", VIRTIO_MEM_REQ_PLUG, kBase - kBlock, 1, VIRTIO_MEM_RESP_ERROR},
        {"plug at the end", VIRTIO_MEM_REQ_PLUG, end, 1, VIRTIO_MEM_RESP_ERROR},
        {"plug running past the end", VIRTIO_MEM_REQ_PLUG, end - kBlock, 2, VIRTIO_MEM_RESP_ERROR},
        {"plug unaligned", VIRTIO_MEM_REQ_PLUG, kBase + 4096, 1, VIRTIO_MEM_RESP_ERROR},
        {"plug zero blocks", VIRTIO_MEM_REQ_PLUG, kBase, 0, VIRTIO_MEM_RESP_ERROR},
        {"plug wrapping 64 bits", VIRTIO_MEM_REQ_PLUG, ~(kBlock - 1), 0xffff, VIRTIO_MEM_RESP_ERROR},
        {"plug in RAM", VIRTIO_MEM_REQ_PLUG, 0, 1, VIRTIO_MEM_RESP_ERROR},
        {"plug past requested_size", VIRTIO_MEM_REQ_PLUG, kBase, 3, VIRTIO_MEM_RESP_NACK},
        {"plug 65535 blocks", VIRTIO_MEM_REQ_PLUG, kBase, 0xffff, VIRTIO_MEM_RESP_ERROR},
        {"unplug unplugged", VIRTIO_MEM_REQ_UNPLUG, kBase, 1, VIRTIO_MEM_RESP_ERROR},
        {"unplug outside", VIRTIO_MEM_REQ_UNPLUG, end, 1, VIRTIO_MEM_RESP_ERROR},
        {"unplug unaligned", VIRTIO_MEM_REQ_UNPLUG, kBase + 1, 1, VIRTIO_MEM_RESP_ERROR},
        {"state over a huge range", VIRTIO_MEM_REQ_STATE, kBase, 0xffff, VIRTIO_MEM_RESP_ERROR},
        {"state at UINT64_MAX", VIRTIO_MEM_REQ_STATE, UINT64_MAX, 1, VIRTIO_MEM_RESP_ERROR},
        {"state of zero blocks", VIRTIO_MEM_REQ_STATE, kBase, 0, VIRTIO_MEM_RESP_ERROR},
        {"unknown type", 7, kBase, 1, VIRTIO_MEM_RESP_ERROR},
        {"type 0xffff", 0xffff, 0, 0, VIRTIO_MEM_RESP_ERROR},
    };
    for (const Case& c : cases) EXPECT_EQ(r.request(c.type, c.addr, c.nb, 0xa5).type, c.want) << c.what;
    EXPECT_EQ(r.dev.config().plugged_size, 0u);

    // Plugging a plugged block, and a range that is partly plugged.
    EXPECT_EQ(r.plug(kBase, 1), VIRTIO_MEM_RESP_ACK);
    EXPECT_EQ(r.plug(kBase, 1), VIRTIO_MEM_RESP_ERROR);
    EXPECT_EQ(r.unplug(kBase, 2), VIRTIO_MEM_RESP_ERROR);   // block 1 is unplugged: nothing changes
    EXPECT_TRUE(r.dev.block_plugged(0));
    EXPECT_EQ(r.plug(kBase + kBlock, 1), VIRTIO_MEM_RESP_ACK);
    EXPECT_EQ(r.plug(kBase + 2 * kBlock, 1), VIRTIO_MEM_RESP_NACK);   // plugged == requested
    EXPECT_EQ(r.dev.config().plugged_size, 4 * MiB);
    // requested_size below plugged_size: unplugging is still fine, plugging is not.
    ASSERT_TRUE(r.dev.set_requested_size(0));
    EXPECT_EQ(r.plug(kBase + 2 * kBlock, 1), VIRTIO_MEM_RESP_NACK);
    EXPECT_EQ(r.unplug(kBase, 2), VIRTIO_MEM_RESP_ACK);

    EXPECT_EQ(r.tr.needs_reset_calls, 0) << "answered requests never reset the device";
    const VirtioMemCounters k = r.dev.counters();
    EXPECT_EQ(k.nacks, 3u);
    EXPECT_EQ(k.acks, 3u);
    EXPECT_EQ(k.errors, 18u);   // 16 of the table's cases plus the two above
}

TEST(VirtioMemDevice, ShortChainsNeedReset) {
    Rig r;
    // A request with no room for the response: DEVICE_NEEDS_RESET, no used buffer.
    const std::uint64_t in = r.ring->alloc(24);
    r.ring->add_chain({{in, 24}});
    r.dev.queue_notify(0);
    ASSERT_TRUE(r.dev.settle());
    EXPECT_EQ(r.tr.needs_reset_calls, 1);
    EXPECT_EQ(r.dev.counters().bad_chains, 1u);
    std::uint32_t id = 0, len = 0;
    EXPECT_FALSE(r.ring->take_used(id, len));

    // A request shorter than its 24 bytes is broken too.
    Rig r2;
    const std::uint64_t in2 = r2.ring->alloc(8);   // a request shorter than 24 bytes
    const std::uint64_t out2 = r2.ring->alloc(10);
    r2.ring->add_chain({{in2, 8}, {out2, 10, true}});
    r2.dev.queue_notify(0);
    ASSERT_TRUE(r2.dev.settle());
    EXPECT_EQ(r2.tr.needs_reset_calls, 1);
}

TEST(VirtioMemDevice, ResetKeepsBlocks) {
    Rig r;
    ASSERT_TRUE(r.dev.set_requested_size(4 * MiB));
    ASSERT_EQ(r.plug(kBase + 10 * kBlock, 2), VIRTIO_MEM_RESP_ACK);
    r.fill(kBase + 10 * kBlock, 2 * kBlock, 0x77);
    // 5.15.5: "The device MUST NOT change the state of memory blocks during device reset."
    r.dev.reset();
    EXPECT_TRUE(r.dev.block_plugged(10));
    EXPECT_EQ(r.dev.config().plugged_size, 4 * MiB);
    EXPECT_TRUE(r.all_bytes(kBase + 10 * kBlock, 2 * kBlock, 0x77));
    // The driver comes back (fresh rings) and unplugs all, as Linux does when plugged_size > 0.
    r.vqs[0].reset();
    r.ring.emplace(r.mem, 64, 0x20000, 0x200000);
    ASSERT_TRUE(r.ring->configure(r.vqs[0]));
    r.dev.activate(r.vqs, r.mem);
    EXPECT_EQ(r.request(VIRTIO_MEM_REQ_UNPLUG_ALL).type, VIRTIO_MEM_RESP_ACK);
    EXPECT_EQ(r.dev.config().plugged_size, 0u);
    EXPECT_TRUE(r.all_bytes(kBase + 10 * kBlock, 2 * kBlock, 0));
}

// A fixed-seed run of random requests, mostly near the region, with
// requested_size changing under them; every answer is checked against a
// model written from the spec's device requirements.
TEST(VirtioMemDevice, RandomRequestsMatchTheModel) {
    Rig r;
    const std::uint64_t blocks = kRegion / kBlock;
    std::vector<bool> model(blocks, false);
    std::uint64_t plugged = 0, requested = 0;
    std::mt19937_64 rng(20261205);
    for (int n = 0; n < 3000; ++n) {
        if (n % 50 == 0) {
            requested = (rng() % (blocks + 1)) * kBlock;
            ASSERT_TRUE(r.dev.set_requested_size(requested));
        }
        const std::uint16_t type = static_cast<std::uint16_t>(rng() % 9 == 0 ? rng() % 6 : rng() % 4);
        std::uint64_t addr;
        switch (rng() % 8) {
        case 0: addr = rng(); break;                                      // anywhere
        case 1: addr = kBase + (rng() % (kRegion + 4 * kBlock)); break;   // unaligned, in or past
        default: addr = kBase + (rng() % (blocks + 2)) * kBlock; break;   // aligned, in or just past
        }
        const std::uint16_t nb = static_cast<std::uint16_t>(rng() % 7 == 0 ? rng() : rng() % 5);

        // The model.
        std::uint16_t want = VIRTIO_MEM_RESP_ERROR, want_state = 0;
        const bool valid = nb > 0 && addr % kBlock == 0 && addr >= kBase && addr - kBase < kRegion &&
                           std::uint64_t{nb} * kBlock <= kRegion - (addr - kBase);
        const std::uint64_t first = valid ? (addr - kBase) / kBlock : 0;
        std::uint64_t in = 0;
        if (valid)
            for (std::uint64_t i = first; i < first + nb; ++i) in += model[i];
        if (type == VIRTIO_MEM_REQ_PLUG && valid) {
            if (plugged + nb * kBlock > requested) want = VIRTIO_MEM_RESP_NACK;
            else if (in == 0) {
                want = VIRTIO_MEM_RESP_ACK;
                for (std::uint64_t i = first; i < first + nb; ++i) model[i] = true;
                plugged += nb * kBlock;
            }
        } else if (type == VIRTIO_MEM_REQ_UNPLUG && valid && in == nb) {
            want = VIRTIO_MEM_RESP_ACK;
            for (std::uint64_t i = first; i < first + nb; ++i) model[i] = false;
            plugged -= nb * kBlock;
        } else if (type == VIRTIO_MEM_REQ_UNPLUG_ALL) {
            want = VIRTIO_MEM_RESP_ACK;
            model.assign(blocks, false);
            plugged = 0;
        } else if (type == VIRTIO_MEM_REQ_STATE && valid) {
            want = VIRTIO_MEM_RESP_ACK;
            want_state = in == nb ? VIRTIO_MEM_STATE_PLUGGED : in == 0 ? VIRTIO_MEM_STATE_UNPLUGGED : VIRTIO_MEM_STATE_MIXED;
        }

        const Resp got = r.request(type, addr, nb, static_cast<std::uint8_t>(rng()));
        ASSERT_EQ(got.type, want) << "request " << n << " type " << type << " addr 0x" << std::hex << addr
                                  << std::dec << " nb " << nb;
        if (type == VIRTIO_MEM_REQ_STATE && want == VIRTIO_MEM_RESP_ACK) {
            ASSERT_EQ(got.state, want_state) << n;
        }
        ASSERT_EQ(r.dev.config().plugged_size, plugged) << n;
    }
    for (std::uint64_t i = 0; i < blocks; ++i) EXPECT_EQ(r.dev.block_plugged(i), model[i]) << i;
    EXPECT_EQ(r.tr.needs_reset_calls, 0);
}

} // namespace
} // namespace kguest
