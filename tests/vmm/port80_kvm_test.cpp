// Port 0x80's in-kernel path without KVM: a made-up coalesced-PIO ring page,
// filled the way KVM fills it, drained into the device's counters.
#include "devices/port80.hpp"
#include "vmm/port80_kvm.hpp"

#include <cstdint>
#include <cstring>
#include <gtest/gtest.h>

namespace kguest {
namespace {

// A made-up coalesced MMIO ring page, filled the way KVM fills it.
struct FakeRing {
    alignas(4096) std::uint8_t page[4096] = {};
    kvm_coalesced_mmio_ring* ring() { return reinterpret_cast<kvm_coalesced_mmio_ring*>(page); }
    static constexpr std::uint32_t kMax = (4096 - sizeof(kvm_coalesced_mmio_ring)) / sizeof(kvm_coalesced_mmio);
    void push(std::uint64_t port, std::uint32_t len, std::uint32_t value) {
        // (By byte offset: GCC flags indexing the zero-length array.)
        auto& e = *reinterpret_cast<kvm_coalesced_mmio*>(page + sizeof(kvm_coalesced_mmio_ring) +
                                                         ring()->last * sizeof(kvm_coalesced_mmio));
        e.phys_addr = port;
        e.len = len;
        e.pio = 1;
        std::memcpy(e.data, &value, sizeof value);
        ring()->last = (ring()->last + 1) % kMax;
    }
};

TEST(Port80, CoalescedRingIsDrainedInOrderAcrossTheWrap) {
    Port80 p;
    FakeRing r;
    Port80Absorber a(p);
    a.attach_ring(r.ring());
    EXPECT_TRUE(p.absorbed());
    // Three times around the ring: counts and the last code stay exact, and
    // writes that start at 0x81-0x83 (inside the zone) are not POST codes.
    std::uint64_t want = 0;
    for (std::uint32_t round = 0; round < 3 * FakeRing::kMax; round += 100) {
        for (std::uint32_t i = 0; i < 100; ++i) {
            r.push(0x80, 1 + (i % 3), round + i);
            ++want;
            if (i % 10 == 0) r.push(0x82, 1, 0xee);
        }
        a.drain();
        EXPECT_EQ(r.ring()->first, r.ring()->last);
        EXPECT_EQ(p.last_code(), static_cast<std::uint8_t>(round + 99));
    }
    EXPECT_EQ(p.writes(), want);
    // Userspace writes add to the same counter.
    const std::uint8_t b[1] = {0x42};
    p.write(0, b);
    EXPECT_EQ(p.writes(), want + 1);
    EXPECT_EQ(p.last_code(), 0x42);
}

TEST(Port80, CorruptRingIndexesAreIgnored) {
    Port80 p;
    FakeRing r;
    Port80Absorber a(p);
    a.attach_ring(r.ring());
    r.ring()->first = 0;
    r.ring()->last = FakeRing::kMax + 5;  // out of range: not from a sane KVM
    a.drain();
    EXPECT_EQ(p.writes(), 0u);
}

} // namespace
} // namespace kguest
