// BalloonTracker: the release policy per backing (4 KiB pages discarded at
// once; THP/hugetlbfs regions only when all 512 pages are in the balloon),
// hostile PFNs (beyond RAM, in the MMIO hole, twice, never inflated), pages
// of plugged virtio-mem blocks taken like RAM and of unplugged ones refused,
// deflate after release and free page reporting, checked against the host's
// view of the mapping through mincore (GuestMemory::resident_bytes).
#include "balloon/tracker.hpp"

#include <cstdint>
#include <cstring>
#include <gtest/gtest.h>
#include <optional>
#include <vector>

namespace kguest {
namespace {

constexpr std::uint64_t kPage = kBalloonPageSize;
constexpr std::uint64_t kRegion = kHugePageSize;

void touch(GuestMemory& mem, std::uint64_t gpa, std::uint64_t len, std::uint8_t fill) {
    auto r = mem.range(Gpa(gpa), len);
    ASSERT_TRUE(r.has_value());
    ASSERT_TRUE(r->fill(0, fill, len));
}

bool all_bytes(const GuestMemory& mem, std::uint64_t gpa, std::uint64_t len, std::uint8_t v) {
    std::vector<std::uint8_t> got(len);
    if (!mem.read(Gpa(gpa), got.data(), len)) return false;
    for (std::uint8_t b : got)
        if (b != v) return false;
    return true;
}

void inflate_one(BalloonTracker& t, std::uint64_t pfn) { t.inflate(std::span<const std::uint64_t>(&pfn, 1)); }
void deflate_one(BalloonTracker& t, std::uint64_t pfn) { t.deflate(std::span<const std::uint64_t>(&pfn, 1)); }

std::vector<std::uint64_t> pfn_range(std::uint64_t gpa, std::uint64_t pages) {
    std::vector<std::uint64_t> v;
    for (std::uint64_t i = 0; i < pages; ++i) v.push_back(gpa / kPage + i);
    return v;
}

TEST(BalloonTracker, FourKiBBackingReleasesEachPageAtOnce) {
    GuestMemory mem(16 << 20, Backing::off);
    BalloonTracker t(mem);
    EXPECT_EQ(t.release_granule(), kPage);
    const std::uint64_t r2 = 2 * kRegion;
    touch(mem, r2, kRegion, 0x5a);
    ASSERT_EQ(mem.resident_bytes(Gpa(r2), kRegion), kRegion);

    inflate_one(t, r2 / kPage);
    EXPECT_TRUE(t.inflated(r2 / kPage));
    EXPECT_EQ(mem.resident_bytes(Gpa(r2), kPage), 0u);
    EXPECT_EQ(mem.resident_bytes(Gpa(r2 + kPage), kRegion - kPage), kRegion - kPage);
    EXPECT_EQ(t.counters().inflated_pages, 1u);
    EXPECT_EQ(t.counters().bytes_released, kPage);
    EXPECT_EQ(t.counters().bytes_discarded, kPage);
    EXPECT_FALSE(t.region_released(Gpa(r2)));

    // A run of 15 more pages, and a scattered one.
    auto run = pfn_range(r2 + kPage, 15);
    run.push_back((r2 + 100 * kPage) / kPage);
    t.inflate(run);
    EXPECT_EQ(mem.resident_bytes(Gpa(r2), 16 * kPage), 0u);
    EXPECT_EQ(mem.resident_bytes(Gpa(r2 + 100 * kPage), kPage), 0u);
    EXPECT_EQ(mem.resident_bytes(Gpa(r2), kRegion), kRegion - 17 * kPage);
    EXPECT_TRUE(all_bytes(mem, r2 + 16 * kPage, 84 * kPage, 0x5a));
    EXPECT_EQ(t.counters().inflated_pages, 17u);
    EXPECT_EQ(t.counters().bytes_released, 17 * kPage);

    // The rest of the region: it counts as released as a whole.
    std::vector<std::uint64_t> rest;
    for (std::uint64_t i = 0; i < kBalloonPagesPerRegion; ++i)
        if (i >= 16 && i != 100) rest.push_back(r2 / kPage + i);
    t.inflate(rest);
    EXPECT_TRUE(t.region_released(Gpa(r2)));
    EXPECT_EQ(t.counters().regions_released, 1u);
    EXPECT_EQ(t.counters().bytes_released, kRegion);
    EXPECT_EQ(mem.resident_bytes(Gpa(r2), kRegion), 0u);
    EXPECT_EQ(t.counters().discard_errors, 0u);
}

TEST(BalloonTracker, ThpBackingReleasesOnlyFullRegions) {
    GuestMemory mem(16 << 20, Backing::thp);
    BalloonTracker t(mem);
    EXPECT_EQ(t.release_granule(), kRegion);
    const std::uint64_t r2 = 2 * kRegion, r3 = 3 * kRegion;
    touch(mem, r2, kRegion, 0x11);
    touch(mem, r3, kRegion, 0x33);
    const std::uint64_t huge_before = mem.huge_backed_bytes();

    // 511 pages: nothing goes back, the huge page (if THP gave one) stays whole.
    t.inflate(pfn_range(r2, kBalloonPagesPerRegion - 1));
    EXPECT_EQ(t.counters().inflated_pages, 511u);
    EXPECT_EQ(t.counters().bytes_discarded, 0u);
    EXPECT_FALSE(t.region_released(Gpa(r2)));
    EXPECT_EQ(mem.resident_bytes(Gpa(r2), kRegion), kRegion);
    EXPECT_EQ(mem.huge_backed_bytes(), huge_before);

    // The 512th: the whole region goes at once.
    inflate_one(t, (r2 + kRegion - kPage) / kPage);
    EXPECT_TRUE(t.region_released(Gpa(r2)));
    EXPECT_EQ(t.counters().regions_released, 1u);
    EXPECT_EQ(t.counters().bytes_released, kRegion);
    EXPECT_EQ(t.counters().bytes_discarded, kRegion);
    EXPECT_EQ(mem.resident_bytes(Gpa(r2), kRegion), 0u);
    if (huge_before >= 2 * kRegion) {
        EXPECT_LE(mem.huge_backed_bytes(), huge_before - kRegion);
    }
    // The neighbour is untouched.
    EXPECT_TRUE(all_bytes(mem, r3, kRegion, 0x33));
    EXPECT_EQ(mem.resident_bytes(Gpa(r3), kRegion), kRegion);

    // A partly inflated region keeps its memory.
    t.inflate(pfn_range(r3, 100));
    EXPECT_EQ(mem.resident_bytes(Gpa(r3), kRegion), kRegion);
    EXPECT_FALSE(t.region_released(Gpa(r3)));
    EXPECT_EQ(t.counters().inflated_pages, 612u);
    EXPECT_EQ(t.counters().bytes_released, kRegion);
}

TEST(BalloonTracker, DoubleInflateAndStrayDeflateAreCountedAndIgnored) {
    GuestMemory mem(16 << 20, Backing::off);
    BalloonTracker t(mem);
    inflate_one(t, 0x400);
    inflate_one(t, 0x400);
    EXPECT_EQ(t.counters().double_inflates, 1u);
    EXPECT_EQ(t.counters().inflated_pages, 1u);
    EXPECT_EQ(t.counters().bytes_discarded, kPage);
    deflate_one(t, 0x401);   // never inflated, region has a bitmap
    deflate_one(t, 0x800);   // never inflated, no bitmap at all
    EXPECT_EQ(t.counters().stray_deflates, 2u);
    EXPECT_EQ(t.counters().inflated_pages, 1u);
    deflate_one(t, 0x400);
    deflate_one(t, 0x400);
    EXPECT_EQ(t.counters().stray_deflates, 3u);
    EXPECT_EQ(t.counters().inflated_pages, 0u);
    EXPECT_EQ(t.counters().bytes_released, 0u);
    EXPECT_FALSE(t.inflated(0x400));
}

TEST(BalloonTracker, PfnsBeyondRamAndInTheHoleAreRejected) {
    // 3 GiB + 4 MiB: 4 MiB above 4 GiB. MAP_NORESERVE, nothing is touched.
    const std::uint64_t size = kMmioHoleStart + 2 * kRegion;
    GuestMemory mem(size, Backing::thp);
    ASSERT_EQ(mem.regions().size(), 2u);
    BalloonTracker t(mem);
    const std::uint64_t hole = kMmioHoleStart / kPage, high = kHighRamStart / kPage;
    const std::uint64_t bad[] = {hole, hole + 1, high - 1, high + 2 * kBalloonPagesPerRegion, UINT32_MAX,
                                 UINT64_MAX, UINT64_MAX >> 12, (UINT64_MAX >> 12) + 1};
    t.inflate(bad);
    t.deflate(bad);
    EXPECT_EQ(t.counters().bad_pfns, 2 * std::size(bad));
    EXPECT_EQ(t.counters().inflated_pages, 0u);
    // The last page below the hole and the first and last above it are RAM.
    inflate_one(t, hole - 1);
    inflate_one(t, high);
    inflate_one(t, high + 2 * kBalloonPagesPerRegion - 1);
    EXPECT_EQ(t.counters().inflated_pages, 3u);
    EXPECT_TRUE(t.inflated(high));
    EXPECT_FALSE(t.inflated(hole));
    // A whole region above 4 GiB releases (high RAM region 1 = host offset 3 GiB + 2 MiB).
    t.inflate(pfn_range(kHighRamStart + kRegion, kBalloonPagesPerRegion));
    EXPECT_TRUE(t.region_released(Gpa(kHighRamStart + kRegion)));
    EXPECT_FALSE(t.region_released(Gpa(kHighRamStart)));
    EXPECT_EQ(t.counters().bytes_discarded, kRegion);
    EXPECT_EQ(t.counters().discard_errors, 0u);
}

// Linux balloons hot-added pages like any other: pages of plugged blocks of
// the hotplug region are tracked and given back, on either backing; pages of
// unplugged blocks are not the guest's and count as bad PFNs.
TEST(BalloonTracker, PagesOfPluggedHotplugBlocksOnly) {
    for (Backing b : {Backing::thp, Backing::off}) {
        SCOPED_TRACE(backing_name(b));
        GuestMemory mem(16 << 20, b, 256 << 20);
        ASSERT_NE(mem.hotplug_region(), nullptr);
        BalloonTracker t(mem);
        const std::uint64_t base = mem.hotplug_region()->gpa.value();
        const std::uint64_t blk = base + 3 * kRegion;   // block 3
        inflate_one(t, blk / kPage);
        EXPECT_FALSE(t.inflated(blk / kPage));
        EXPECT_EQ(t.counters().bad_pfns, 1u);
        EXPECT_EQ(t.counters().inflated_pages, 0u);

        mem.set_hotplug_block_plugged(3, true);
        mem.set_hotplug_block_plugged(4, true);
        touch(mem, blk, 2 * kRegion, 0x6b);
        ASSERT_EQ(mem.resident_bytes(Gpa(blk), 2 * kRegion), 2 * kRegion);
        const auto pfns = pfn_range(blk, kBalloonPagesPerRegion);
        t.inflate(pfns);
        EXPECT_TRUE(t.inflated(blk / kPage));
        EXPECT_TRUE(t.region_released(Gpa(blk)));
        EXPECT_EQ(t.counters().inflated_pages, kBalloonPagesPerRegion);
        EXPECT_EQ(t.counters().bytes_released, kRegion);
        EXPECT_EQ(t.counters().bad_pfns, 1u);
        EXPECT_EQ(t.counters().discard_errors, 0u);
        EXPECT_EQ(mem.resident_bytes(Gpa(blk), kRegion), 0u);
        EXPECT_EQ(mem.resident_bytes(Gpa(blk + kRegion), kRegion), kRegion);   // block 4 untouched
        EXPECT_TRUE(all_bytes(mem, blk + kRegion, kRegion, 0x6b));
        // One page of block 4: with 4 KiB backing it goes back at once, with
        // THP it waits for the rest of its region.
        inflate_one(t, (blk + kRegion) / kPage);
        EXPECT_TRUE(t.inflated((blk + kRegion) / kPage));
        EXPECT_FALSE(t.region_released(Gpa(blk + kRegion)));
        EXPECT_EQ(mem.resident_bytes(Gpa(blk + kRegion), kPage), b == Backing::off ? 0u : kPage);

        t.deflate(pfns);
        EXPECT_FALSE(t.inflated(blk / kPage));
        EXPECT_FALSE(t.region_released(Gpa(blk)));
        EXPECT_EQ(t.counters().inflated_pages, 1u);
        EXPECT_EQ(t.counters().stray_deflates, 0u);
        EXPECT_TRUE(all_bytes(mem, blk, kRegion, 0));   // discarded: refaults as zeroes

        // Block 4 unplugged behind the balloon's back: its page is no longer
        // the guest's to deflate.
        mem.set_hotplug_block_plugged(4, false);
        deflate_one(t, (blk + kRegion) / kPage);
        EXPECT_EQ(t.counters().bad_pfns, 2u);
        EXPECT_FALSE(t.inflated((blk + kRegion) / kPage));
        // Past the region's end: not RAM.
        inflate_one(t, (base + mem.hotplug_region()->size) / kPage);
        EXPECT_EQ(t.counters().bad_pfns, 3u);
    }
}

TEST(BalloonTracker, DeflateAfterReleaseMakesPagesUsable) {
    GuestMemory mem(16 << 20, Backing::thp);
    BalloonTracker t(mem);
    const std::uint64_t r4 = 4 * kRegion;
    touch(mem, r4, kRegion, 0x77);
    t.inflate(pfn_range(r4, kBalloonPagesPerRegion));
    ASSERT_TRUE(t.region_released(Gpa(r4)));
    ASSERT_EQ(mem.resident_bytes(Gpa(r4), kRegion), 0u);

    t.deflate(pfn_range(r4 + 10 * kPage, 2));
    EXPECT_FALSE(t.region_released(Gpa(r4)));
    EXPECT_EQ(t.counters().regions_released, 0u);
    EXPECT_EQ(t.counters().bytes_released, 0u);
    EXPECT_EQ(t.counters().inflated_pages, 510u);
    // The guest uses the pages again: they come back as zeroes, then hold data.
    EXPECT_TRUE(all_bytes(mem, r4 + 10 * kPage, 2 * kPage, 0));
    ASSERT_TRUE(mem.write_obj<std::uint64_t>(Gpa(r4 + 10 * kPage + 8), 0x1122334455667788));
    EXPECT_EQ(mem.read_obj<std::uint64_t>(Gpa(r4 + 10 * kPage + 8)), 0x1122334455667788u);

    // Inflating them again releases the region once more.
    t.inflate(pfn_range(r4 + 10 * kPage, 2));
    EXPECT_TRUE(t.region_released(Gpa(r4)));
    EXPECT_EQ(t.counters().bytes_discarded, 2 * kRegion);
    EXPECT_EQ(mem.resident_bytes(Gpa(r4), kRegion), 0u);

    // Deflating everything frees the bitmap.
    t.deflate(pfn_range(r4, kBalloonPagesPerRegion));
    EXPECT_EQ(t.counters().inflated_pages, 0u);
    EXPECT_FALSE(t.inflated(r4 / kPage));
    inflate_one(t, r4 / kPage);
    EXPECT_EQ(t.counters().double_inflates, 0u);
}

TEST(BalloonTracker, FreePageReportingFollowsTheBacking) {
    {
        GuestMemory mem(16 << 20, Backing::thp);
        BalloonTracker t(mem);
        const std::uint64_t r4 = 4 * kRegion;
        touch(mem, r4, 3 * kRegion, 0x44);
        // 4 KiB inside a huge page: kept.
        EXPECT_EQ(t.report_free(Gpa(r4 + kPage), kPage), 0u);
        EXPECT_EQ(mem.resident_bytes(Gpa(r4), kRegion), kRegion);
        // 4 MiB starting 4 KiB into region 4: only region 5 is whole.
        EXPECT_EQ(t.report_free(Gpa(r4 + kPage), 2 * kRegion), kRegion);
        EXPECT_EQ(mem.resident_bytes(Gpa(r4), kRegion), kRegion);
        EXPECT_EQ(mem.resident_bytes(Gpa(r4 + kRegion), kRegion), 0u);
        EXPECT_EQ(mem.resident_bytes(Gpa(r4 + 2 * kRegion), kRegion), kRegion);
        EXPECT_EQ(t.counters().reported_bytes, kRegion);
        EXPECT_EQ(t.counters().reported_kept_bytes, kPage + kRegion);
        EXPECT_EQ(t.counters().inflated_pages, 0u);   // not ballooned
        EXPECT_FALSE(t.inflated((r4 + kRegion) / kPage));
        // Outside RAM: counted, nothing done.
        EXPECT_EQ(t.report_free(Gpa(mem.size() - kPage), 2 * kPage), 0u);
        EXPECT_EQ(t.report_free(Gpa(UINT64_MAX - kPage), 2 * kPage), 0u);
        EXPECT_EQ(t.counters().bad_pfns, 4u);
    }
    {
        GuestMemory mem(16 << 20, Backing::off);
        BalloonTracker t(mem);
        touch(mem, 0x800000, 4 * kPage, 0x44);
        EXPECT_EQ(t.report_free(Gpa(0x800000 + kPage), kPage), kPage);
        EXPECT_EQ(mem.resident_bytes(Gpa(0x800000), 4 * kPage), 3 * kPage);
        // Unaligned edges are rounded inwards.
        EXPECT_EQ(t.report_free(Gpa(0x800000 + 2 * kPage + 1), kPage), 0u);
        EXPECT_EQ(t.report_free(Gpa(0x800000 + 2 * kPage - 8), kPage + 16), kPage);
        EXPECT_EQ(mem.resident_bytes(Gpa(0x800000), 4 * kPage), 2 * kPage);
    }
}

TEST(BalloonTracker, HugetlbfsBackingWhenAvailable) {
    std::optional<GuestMemory> mem;
    try {
        mem.emplace(8 << 20, Backing::hugetlbfs);
    } catch (const std::exception& e) {
        GTEST_SKIP() << "no hugetlbfs pages: " << e.what();
    }
    BalloonTracker t(*mem);
    touch(*mem, kRegion, kRegion, 1);
    t.inflate(pfn_range(kRegion, kBalloonPagesPerRegion - 1));
    EXPECT_EQ(t.counters().bytes_discarded, 0u);
    inflate_one(t, (2 * kRegion - kPage) / kPage);
    // MADV_DONTNEED on hugetlb needs Linux 5.18; older kernels count an error.
    EXPECT_EQ(t.counters().bytes_discarded + t.counters().discard_errors * kRegion, kRegion);
    if (t.counters().discard_errors == 0) {
        EXPECT_EQ(mem->resident_bytes(Gpa(kRegion), kRegion), 0u);
    }
}

} // namespace
} // namespace kguest
