// GuestMemory: layout around the MMIO hole, bounds checks on hostile
// addresses and lengths, and giving memory back to the host (discard,
// resident and huge-page-backed byte counts).
#include "devices/base/guest_memory.hpp"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <gtest/gtest.h>
#include <string>

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

TEST(GuestMemory, DiscardZeroesAndReleasesPages) {
    GuestMemory m(4 << 20, Backing::off);
    const std::uint64_t base = 0x200000;
    std::memset(m.ptr(base, 4 * 4096), 0xab, 4 * 4096);
    EXPECT_EQ(m.resident_bytes(base, 4 * 4096), 4u * 4096);
    ASSERT_TRUE(m.discard(base + 4096, 4096));
    EXPECT_EQ(m.resident_bytes(base, 4 * 4096), 3u * 4096);
    EXPECT_EQ(m.read_obj<std::uint32_t>(base + 4096 + 100), 0u);   // refaults as zeroes
    EXPECT_EQ(m.read_obj<std::uint32_t>(base + 2 * 4096), 0xababababu);
    EXPECT_EQ(m.read_obj<std::uint32_t>(base + 4096 - 4), 0xababababu);
    // Refused: unaligned, empty, outside RAM, wrapping.
    EXPECT_FALSE(m.discard(base + 1, 4096));
    EXPECT_FALSE(m.discard(base, 4095));
    EXPECT_FALSE(m.discard(base, 0));
    EXPECT_FALSE(m.discard(m.size() - 4096, 8192));
    EXPECT_FALSE(m.discard(m.size(), 4096));
    EXPECT_FALSE(m.discard(UINT64_MAX & ~4095ull, 4096));
    EXPECT_EQ(m.read_obj<std::uint32_t>(base + 2 * 4096), 0xababababu);
    // resident_bytes on odd ranges.
    EXPECT_EQ(m.resident_bytes(base + 2 * 4096 + 1, 1), 4096u);
    EXPECT_EQ(m.resident_bytes(m.size(), 4096), 0u);
    EXPECT_EQ(m.resident_bytes(base, 0), 0u);
    EXPECT_GE(m.resident_bytes(), 3u * 4096);
}

TEST(GuestMemory, DiscardRefusesRangesAcrossTheHole) {
    GuestMemory m(kMmioHoleStart + (2 << 20), Backing::thp);   // untouched
    EXPECT_FALSE(m.discard(kMmioHoleStart - 4096, 8192));
    EXPECT_FALSE(m.discard(kMmioHoleStart, 4096));
    EXPECT_TRUE(m.discard(kHighRamStart, 2 << 20));
    EXPECT_TRUE(m.discard(kMmioHoleStart - (2 << 20), 2 << 20));
}

TEST(GuestMemory, ThpResidentAndHugeBackedBytes) {
    GuestMemory m(8 << 20, Backing::thp);
    const std::uint64_t r = 2 << 20;
    std::memset(m.ptr(r, r), 0x5c, r);
    EXPECT_EQ(m.resident_bytes(r, r), r);
    const std::uint64_t huge = m.huge_backed_bytes();
    EXPECT_LE(huge, m.resident_bytes());
    EXPECT_EQ(huge % (2 << 20), 0u);
    std::ifstream thp("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string mode;
    std::getline(thp, mode);
    if (huge == 0)
        std::printf("note: no THP backing observed (THP mode: %s)\n", mode.c_str());
    if (huge >= 2 * r) {
        // Why the balloon releases whole regions: discarding 4 KiB of a
        // THP-backed region splits its huge page.
        std::memset(m.ptr(2 * r, r), 0x5d, r);
        const std::uint64_t before = m.huge_backed_bytes();
        ASSERT_TRUE(m.discard(2 * r + 4096, 4096));
        EXPECT_EQ(m.huge_backed_bytes(), before - r);
        EXPECT_EQ(m.resident_bytes(2 * r, r), r - 4096);
    }
    ASSERT_TRUE(m.discard(r, r));
    EXPECT_EQ(m.resident_bytes(r, r), 0u);
    EXPECT_LE(m.huge_backed_bytes(), huge);
    EXPECT_EQ(m.read_obj<std::uint64_t>(r + 8), 0u);
    // 4 KiB backing never reports huge pages.
    GuestMemory small(4 << 20, Backing::off);
    std::memset(small.ptr(0, 4 << 20), 1, 4 << 20);
    EXPECT_EQ(small.huge_backed_bytes(), 0u);
}

} // namespace
} // namespace kguest
