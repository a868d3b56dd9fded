// GuestMemory: layout around the MMIO hole and bounds checks on hostile
// addresses and lengths.
#include "vmm/guest_memory.hpp"

#include <cstdint>
#include <gtest/gtest.h>

namespace kguest {
namespace {

TEST(GuestMemory, SmallRamIsOneRegionAligned) {
    GuestMemory m(3 << 20, Backing::off);
    EXPECT_EQ(m.size(), 4u << 20);  // rounded up to 2 MiB
    ASSERT_EQ(m.regions().size(), 1u);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(m.host_base()) % kHugePageSize, 0u);
}

TEST(GuestMemory, LargeRamSplitsAroundTheHole) {
    GuestMemory m(4ull << 30, Backing::thp);  // MAP_NORESERVE: nothing is touched
    ASSERT_EQ(m.regions().size(), 2u);
    EXPECT_EQ(m.regions()[0].size, kMmioHoleStart);
    EXPECT_EQ(m.regions()[1].gpa, kHighRamStart);
    EXPECT_EQ(m.regions()[1].size, (4ull << 30) - kMmioHoleStart);
    EXPECT_EQ(m.ptr(kMmioHoleStart, 1), nullptr);
    EXPECT_EQ(m.ptr(kHighRamStart, 4), m.host_base() + kMmioHoleStart);
    EXPECT_EQ(m.ptr(kMmioHoleStart - 2, 4), nullptr);  // straddles the hole
}

TEST(GuestMemory, BoundsChecks) {
    GuestMemory m(2 << 20, Backing::off);
    std::uint64_t end = m.size();
    EXPECT_NE(m.ptr(end - 8, 8), nullptr);
    EXPECT_EQ(m.ptr(end - 8, 9), nullptr);
    EXPECT_EQ(m.ptr(end, 1), nullptr);
    EXPECT_EQ(m.ptr(UINT64_MAX, 2), nullptr);
    EXPECT_EQ(m.ptr(8, UINT64_MAX), nullptr);       // length overflow
    EXPECT_EQ(m.ptr(UINT64_MAX - 4, 16), nullptr);  // address + length wraps
    std::uint32_t v = 0xdeadbeef;
    EXPECT_TRUE(m.write_obj(0x100, v));
    EXPECT_EQ(m.read_obj<std::uint32_t>(0x100), 0xdeadbeefu);
    EXPECT_FALSE(m.write_obj(end - 2, v));
    EXPECT_FALSE(m.read_obj<std::uint32_t>(end - 2).has_value());
}

TEST(GuestMemory, ParseBacking) {
    EXPECT_EQ(parse_backing("thp"), Backing::thp);
    EXPECT_EQ(parse_backing("hugetlbfs"), Backing::hugetlbfs);
    EXPECT_EQ(parse_backing("off"), Backing::off);
    EXPECT_FALSE(parse_backing("2M").has_value());
}

} // namespace
} // namespace kguest
