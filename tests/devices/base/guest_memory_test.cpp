// GuestMemory: layout around the MMIO hole, bounds checks on hostile
// addresses and lengths, the typed views (Gpa, GuestRange and its atomic
// field loads and stores, the iovec builder), and giving memory back to the
// host (discard, resident and huge-page-backed byte counts).
#include "devices/base/guest_memory.hpp"

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <gtest/gtest.h>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace kguest {
namespace {

TEST(GuestMemory, SmallRamIsOneRegionAligned) {
    GuestMemory m(3 << 20, Backing::off);
    EXPECT_EQ(m.size(), 4u << 20);  // rounded up to 2 MiB
    ASSERT_EQ(m.regions().size(), 1u);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(m.host_address_for_kvm(m.regions()[0])) % kHugePageSize, 0u);
}

TEST(GuestMemory, LargeRamSplitsAroundTheHole) {
    GuestMemory m(4ull << 30, Backing::thp);  // MAP_NORESERVE: nothing is touched
    ASSERT_EQ(m.regions().size(), 2u);
    EXPECT_EQ(m.regions()[0].size, kMmioHoleStart);
    EXPECT_EQ(m.regions()[1].gpa.value(), kHighRamStart);
    EXPECT_EQ(m.regions()[1].size, (4ull << 30) - kMmioHoleStart);
    EXPECT_FALSE(m.range(Gpa(kMmioHoleStart), 1).has_value());
    // High RAM follows low RAM in the one host mapping.
    auto* low = static_cast<std::uint8_t*>(m.host_address_for_kvm(m.regions()[0]));
    EXPECT_EQ(m.host_address_for_kvm(m.regions()[1]), low + kMmioHoleStart);
    std::vector<iovec> iov;
    ASSERT_TRUE(m.append_iovec(Gpa(kHighRamStart), 4, iov));
    ASSERT_EQ(iov.size(), 1u);
    EXPECT_EQ(iov[0].iov_base, low + kMmioHoleStart);
    EXPECT_EQ(iov[0].iov_len, 4u);
    EXPECT_FALSE(m.range(Gpa(kMmioHoleStart - 2), 4).has_value());  // straddles the hole
}

TEST(GuestMemory, BoundsChecks) {
    GuestMemory m(2 << 20, Backing::off);
    std::uint64_t end = m.size();
    EXPECT_TRUE(m.range(Gpa(end - 8), 8).has_value());
    EXPECT_FALSE(m.range(Gpa(end - 8), 9).has_value());
    EXPECT_FALSE(m.range(Gpa(end), 1).has_value());
    EXPECT_FALSE(m.range(Gpa(UINT64_MAX), 2).has_value());
    EXPECT_FALSE(m.range(Gpa(8), UINT64_MAX).has_value());       // length overflow
    EXPECT_FALSE(m.range(Gpa(UINT64_MAX - 4), 16).has_value());  // address + length wraps
    EXPECT_TRUE(m.contains(Gpa(end - 1), 0));                    // len 0 is checked as 1 byte
    EXPECT_FALSE(m.contains(Gpa(end), 0));
    std::uint32_t v = 0xdeadbeef;
    EXPECT_TRUE(m.write_obj(Gpa(0x100), v));
    EXPECT_EQ(m.read_obj<std::uint32_t>(Gpa(0x100)), 0xdeadbeefu);
    EXPECT_FALSE(m.write_obj(Gpa(end - 2), v));
    EXPECT_FALSE(m.read_obj<std::uint32_t>(Gpa(end - 2)).has_value());
}

TEST(Gpa, IsExplicitAndSaturates) {
    static_assert(!std::is_convertible_v<std::uint64_t, Gpa>);
    static_assert(!std::is_convertible_v<Gpa, std::uint64_t>);
    EXPECT_EQ((Gpa(0x1000) + 0x10).value(), 0x1010u);
    EXPECT_EQ((Gpa(UINT64_MAX - 4) + 16).value(), UINT64_MAX);   // never wraps back into RAM
    EXPECT_LT(Gpa(1), Gpa(2));
    EXPECT_EQ(Gpa(7), Gpa(3) + 4);
    GuestMemory m(2 << 20, Backing::off);
    EXPECT_FALSE(m.contains(Gpa(UINT64_MAX - 4) + 16, 1));
}

TEST(GuestRange, CopiesStayInsideTheView) {
    GuestMemory m(2 << 20, Backing::off);
    auto r = m.range(Gpa(0x1000), 64);
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->size(), 64u);
    const std::uint8_t src[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    EXPECT_TRUE(r->write(56, src, 8));
    EXPECT_FALSE(r->write(57, src, 8));          // one byte past the end
    EXPECT_FALSE(r->write(UINT64_MAX, src, 2));   // offset + length wraps
    EXPECT_FALSE(r->fill(0, 0xee, 65));
    EXPECT_TRUE(r->write(64, src, 0));            // empty, at the end: fine
    EXPECT_FALSE(r->write(65, src, 0));
    std::uint8_t got[8] = {};
    EXPECT_TRUE(m.read(Gpa(0x1000 + 56), got, 8));
    EXPECT_EQ(std::memcmp(got, src, 8), 0);
    EXPECT_EQ(m.read_obj<std::uint8_t>(Gpa(0x1000 + 64)), 0u);   // nothing spilled past the view
    EXPECT_EQ(m.read_obj<std::uint8_t>(Gpa(0x1000 - 1)), 0u);
    std::memset(got, 0, sizeof got);
    EXPECT_FALSE(r->read(60, got, 8));
    EXPECT_EQ(got[0], 0u);                        // nothing copied on refusal
    EXPECT_TRUE(r->read(56, got, 8));
    EXPECT_EQ(std::memcmp(got, src, 8), 0);
    EXPECT_EQ(r->load_le64(56), 0x0807060504030201u);   // little-endian
    EXPECT_FALSE(r->read(8, got, UINT64_MAX));           // length overflow

    GuestRange empty;
    EXPECT_EQ(empty.size(), 0u);
    EXPECT_FALSE(empty.read(0, got, 1));
    EXPECT_TRUE(empty.read(0, got, 0));
}

TEST(GuestRange, ViewsNeverCrossRegions) {
    GuestMemory m(kMmioHoleStart + (2 << 20), Backing::thp);   // untouched
    EXPECT_TRUE(m.range(Gpa(kMmioHoleStart - 16), 16).has_value());
    EXPECT_FALSE(m.range(Gpa(kMmioHoleStart - 16), 17).has_value());
    EXPECT_FALSE(m.range(Gpa(kHighRamStart - 16), 32).has_value());
    auto high = m.range(Gpa(kHighRamStart), 2 << 20);
    ASSERT_TRUE(high.has_value());
    EXPECT_FALSE(m.range(Gpa(kHighRamStart), (2 << 20) + 1).has_value());
    high->store_le32(16, 0xfeedf00d);
    EXPECT_EQ(m.read_obj<std::uint32_t>(Gpa(kHighRamStart + 16)), 0xfeedf00du);
    EXPECT_FALSE(m.read_obj<std::uint32_t>(Gpa(kMmioHoleStart + 16)).has_value());
}

TEST(GuestRange, LoadsAndStoresAreLittleEndianFields) {
    GuestMemory m(2 << 20, Backing::off);
    auto r = *m.range(Gpa(0x2000), 32);
    r.store_le16(2, 0xbeef, std::memory_order_release);
    r.store_le32(4, 0x11223344);
    r.store_le64(8, 0x0102030405060708, std::memory_order_release);
    const std::uint8_t want[16] = {0, 0, 0xef, 0xbe, 0x44, 0x33, 0x22, 0x11, 8, 7, 6, 5, 4, 3, 2, 1};
    std::uint8_t got[16];
    ASSERT_TRUE(m.read(Gpa(0x2000), got, 16));
    EXPECT_EQ(std::memcmp(got, want, 16), 0);
    EXPECT_EQ(r.load_le16(2, std::memory_order_acquire), 0xbeefu);
    EXPECT_EQ(r.load_le32(4), 0x11223344u);
    EXPECT_EQ(r.load_le64(8, std::memory_order_acquire), 0x0102030405060708u);
    ASSERT_TRUE(m.write_obj(Gpa(0x2000 + 30), std::uint16_t{0x4242}));
    EXPECT_EQ(r.load_le16(30), 0x4242u);   // the last field of the view
}

TEST(GuestRangeDeathTest, OutOfViewOrMisalignedFieldAborts) {
    GuestMemory m(2 << 20, Backing::off);
    auto r = *m.range(Gpa(0x2000), 32);
    EXPECT_DEATH(r.load_le16(31), "outside or misaligned");
    EXPECT_DEATH(r.load_le32(32), "outside or misaligned");
    EXPECT_DEATH(r.store_le64(4, 0), "outside or misaligned");
    EXPECT_DEATH(r.store_le16(UINT64_MAX, 0), "outside or misaligned");
    EXPECT_DEATH(GuestRange().load_le16(0), "outside or misaligned");
}

TEST(GuestRange, ConcurrentIndexUpdatesAreNeverTorn) {
    // A ring index shared with a running guest: the other side sees either
    // the old or the new value, never half of each.
    GuestMemory m(2 << 20, Backing::off);
    auto r = *m.range(Gpa(0x3000), 16);
    std::atomic<bool> stop{false};
    std::thread writer([&] {
        for (std::uint64_t i = 0; !stop.load(std::memory_order_relaxed); ++i) {
            r.store_le64(8, (i & 1) ? ~0ull : 0, std::memory_order_release);
            r.store_le16(0, (i & 1) ? 0xffff : 0, std::memory_order_release);
        }
    });
    bool torn = false;
    for (int i = 0; i < 200000 && !torn; ++i) {
        const std::uint64_t v = r.load_le64(8, std::memory_order_acquire);
        const std::uint16_t idx = r.load_le16(0, std::memory_order_acquire);
        torn = (v != 0 && v != ~0ull) || (idx != 0 && idx != 0xffff);
    }
    stop = true;
    writer.join();
    EXPECT_FALSE(torn);
}

TEST(GuestMemory, IovecBuilderStaysInsideRam) {
    GuestMemory m(kMmioHoleStart + (2 << 20), Backing::thp);   // untouched
    std::vector<iovec> iov;
    ASSERT_TRUE(m.append_iovec(Gpa(0x1000), 100, iov));
    ASSERT_TRUE(m.append_iovec(Gpa(kHighRamStart), 2 << 20, iov));   // all of high RAM
    ASSERT_EQ(iov.size(), 2u);
    EXPECT_EQ(iov[0].iov_len, 100u);
    EXPECT_EQ(iov[1].iov_len, 2u << 20);
    EXPECT_EQ(static_cast<std::uint8_t*>(iov[1].iov_base) - static_cast<std::uint8_t*>(iov[0].iov_base),
              static_cast<std::ptrdiff_t>(kMmioHoleStart - 0x1000));
    // Refused, with nothing appended: across the hole, past the end of RAM,
    // inside the hole, overflowing lengths and wrapping sums.
    EXPECT_FALSE(m.append_iovec(Gpa(kMmioHoleStart - 8), 16, iov));
    EXPECT_FALSE(m.append_iovec(Gpa(kHighRamStart), (2 << 20) + 1, iov));
    EXPECT_FALSE(m.append_iovec(Gpa(kMmioHoleStart), 1, iov));
    EXPECT_FALSE(m.append_iovec(Gpa(8), UINT64_MAX, iov));
    EXPECT_FALSE(m.append_iovec(Gpa(UINT64_MAX - 4), 16, iov));
    EXPECT_FALSE(m.append_iovec(Gpa(kMmioHoleStart), 0, iov));   // an empty buffer must still be RAM
    // An empty buffer in RAM adds nothing to the request.
    EXPECT_TRUE(m.append_iovec(Gpa(0x1000), 0, iov));
    EXPECT_EQ(iov.size(), 2u);
}

TEST(GuestMemory, ParseBacking) {
    EXPECT_EQ(parse_backing("thp"), Backing::thp);
    EXPECT_EQ(parse_backing("hugetlbfs"), Backing::hugetlbfs);
    EXPECT_EQ(parse_backing("off"), Backing::off);
    EXPECT_FALSE(parse_backing("2M").has_value());
}

// vm.info asks for usage() on every request: mincore over all of RAM and a
// parse of smaps. Two quick calls must cost one scan; an older answer is
// refreshed.
TEST(GuestMemory, UsageScansAtMostOncePerSecond) {
    GuestMemory m(8 << 20, Backing::off);
    const GuestMemory::Usage first = m.usage();
    const std::uint64_t scans = m.usage_scans();
    ASSERT_TRUE(m.range(Gpa(0x200000), 1 << 20)->fill(0, 0x5a, 1 << 20));
    const GuestMemory::Usage second = m.usage();
    EXPECT_EQ(m.usage_scans(), scans) << "a second vm.info within a second scanned RAM again";
    EXPECT_EQ(second.resident_bytes, first.resident_bytes);   // the cached answer
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    const GuestMemory::Usage third = m.usage();
    EXPECT_EQ(m.usage_scans(), scans + 1);
    EXPECT_GE(third.resident_bytes, first.resident_bytes + (1 << 20));
}

TEST(GuestMemory, DiscardZeroesAndReleasesPages) {
    GuestMemory m(4 << 20, Backing::off);
    const std::uint64_t base = 0x200000;
    ASSERT_TRUE(m.range(Gpa(base), 4 * 4096)->fill(0, 0xab, 4 * 4096));
    EXPECT_EQ(m.resident_bytes(Gpa(base), 4 * 4096), 4u * 4096);
    ASSERT_TRUE(m.discard(Gpa(base + 4096), 4096));
    EXPECT_EQ(m.resident_bytes(Gpa(base), 4 * 4096), 3u * 4096);
    EXPECT_EQ(m.read_obj<std::uint32_t>(Gpa(base + 4096 + 100)), 0u);   // refaults as zeroes
    EXPECT_EQ(m.read_obj<std::uint32_t>(Gpa(base + 2 * 4096)), 0xababababu);
    EXPECT_EQ(m.read_obj<std::uint32_t>(Gpa(base + 4096 - 4)), 0xababababu);
    // Refused: unaligned, empty, outside RAM, wrapping.
    EXPECT_FALSE(m.discard(Gpa(base + 1), 4096));
    EXPECT_FALSE(m.discard(Gpa(base), 4095));
    EXPECT_FALSE(m.discard(Gpa(base), 0));
    EXPECT_FALSE(m.discard(Gpa(m.size() - 4096), 8192));
    EXPECT_FALSE(m.discard(Gpa(m.size()), 4096));
    EXPECT_FALSE(m.discard(Gpa(UINT64_MAX & ~4095ull), 4096));
    EXPECT_EQ(m.read_obj<std::uint32_t>(Gpa(base + 2 * 4096)), 0xababababu);
    // resident_bytes on odd ranges.
    EXPECT_EQ(m.resident_bytes(Gpa(base + 2 * 4096 + 1), 1), 4096u);
    EXPECT_EQ(m.resident_bytes(Gpa(m.size()), 4096), 0u);
    EXPECT_EQ(m.resident_bytes(Gpa(base), 0), 0u);
    EXPECT_GE(m.resident_bytes(), 3u * 4096);
}

TEST(GuestMemory, DiscardRefusesRangesAcrossTheHole) {
    GuestMemory m(kMmioHoleStart + (2 << 20), Backing::thp);   // untouched
    EXPECT_FALSE(m.discard(Gpa(kMmioHoleStart - 4096), 8192));
    EXPECT_FALSE(m.discard(Gpa(kMmioHoleStart), 4096));
    EXPECT_TRUE(m.discard(Gpa(kHighRamStart), 2 << 20));
    EXPECT_TRUE(m.discard(Gpa(kMmioHoleStart - (2 << 20)), 2 << 20));
}

TEST(GuestMemory, ThpResidentAndHugeBackedBytes) {
    GuestMemory m(8 << 20, Backing::thp);
    const std::uint64_t r = 2 << 20;
    ASSERT_TRUE(m.range(Gpa(r), r)->fill(0, 0x5c, r));
    EXPECT_EQ(m.resident_bytes(Gpa(r), r), r);
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
        ASSERT_TRUE(m.range(Gpa(2 * r), r)->fill(0, 0x5d, r));
        const std::uint64_t before = m.huge_backed_bytes();
        ASSERT_TRUE(m.discard(Gpa(2 * r + 4096), 4096));
        EXPECT_EQ(m.huge_backed_bytes(), before - r);
        EXPECT_EQ(m.resident_bytes(Gpa(2 * r), r), r - 4096);
    }
    ASSERT_TRUE(m.discard(Gpa(r), r));
    EXPECT_EQ(m.resident_bytes(Gpa(r), r), 0u);
    EXPECT_LE(m.huge_backed_bytes(), huge);
    EXPECT_EQ(m.read_obj<std::uint64_t>(Gpa(r + 8)), 0u);
    // 4 KiB backing never reports huge pages.
    GuestMemory small(4 << 20, Backing::off);
    ASSERT_TRUE(small.range(Gpa(0), 4 << 20)->fill(0, 1, 4 << 20));
    EXPECT_EQ(small.huge_backed_bytes(), 0u);
}

TEST(GuestMemory, RamIsLeftOutOfCoreDumps) {
    GuestMemory mem(16ull << 20, Backing::off);
    const auto base = reinterpret_cast<std::uintptr_t>(mem.host_address_for_kvm(mem.regions().front()));
    // The smaps entry holding guest RAM: its VmFlags carry "dd" (VM_DONTDUMP).
    std::ifstream smaps("/proc/self/smaps");
    std::string line;
    bool inside = false, found = false;
    while (std::getline(smaps, line)) {
        unsigned long lo = 0, hi = 0;
        if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2) {   // a mapping's first line
            inside = lo <= base && base < hi;
        } else if (inside && line.rfind("VmFlags:", 0) == 0) {
            EXPECT_NE((line + " ").find(" dd "), std::string::npos) << line;
            found = true;
        }
    }
    EXPECT_TRUE(found) << "no smaps entry for guest RAM at " << std::hex << base;
}

} // namespace
} // namespace kguest
