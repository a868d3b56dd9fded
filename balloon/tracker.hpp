// Host-side bookkeeping for the virtio balloon (VIRTIO 1.2 section 5.5):
// which 4 KiB guest pages the driver has put into the balloon, and when their
// host memory goes back to the host. Each 2 MiB host region of guest RAM the
// driver has touched gets a 512-bit bitmap, a count and a "released" flag.
//
// The release policy follows the RAM backing:
//  - Backing::off (4 KiB pages): every inflated page is discarded at once
//    (runs of consecutive PFNs in one madvise).
//  - Backing::thp / hugetlbfs: a region is discarded only when all 512 of
//    its pages are inflated: discarding part of a transparent huge page
//    splits it (in the host and KVM's stage-2 map); a hugetlb page cannot split.
// Deflating a page clears its bit (a discarded page refaults as zeroes) and
// un-releases its region. Free page reporting (5.5.6.4, report_free) discards
// too, but tracks nothing: the pages stay the guest's.
//
// Guest RAM here is boot RAM and the plugged blocks of the hotplug region
// (virtio-mem, read through GuestMemory::hotplug_block_plugged(), so the
// balloon need not know that device): Linux puts hot-added pages into the
// balloon like any other, and their host memory goes back the same way.
// A block unplugged while pages of it are in the balloon (Linux migrates
// them out first, so only a broken guest does it) keeps their bits until it
// is plugged again and they are deflated; its pages read as bad PFNs meanwhile.
//
// The guest is hostile: PFNs outside RAM (or in the MMIO hole, or in an
// unplugged block), double inflates and stray deflates are counted and ignored. Not thread-safe:
// VirtioBalloon calls it from its event loop only.
#pragma once

#include "devices/base/guest_memory.hpp"

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

namespace kguest {

// 5.5.6: balloon PFNs are in 4 KiB units whatever the guest's page size.
inline constexpr unsigned kBalloonPfnShift = 12;
inline constexpr std::uint64_t kBalloonPageSize = std::uint64_t{1} << kBalloonPfnShift;
inline constexpr std::uint64_t kBalloonPagesPerRegion = kHugePageSize / kBalloonPageSize;   // 512

struct BalloonTrackerCounters {
    std::uint64_t inflated_pages = 0;     // pages in the balloon now
    std::uint64_t regions_released = 0;   // 2 MiB regions with all 512 pages in the balloon now
    std::uint64_t bytes_released = 0;     // host memory given back now for ballooned pages
    std::uint64_t bytes_discarded = 0;    // total bytes ever discarded (balloon and free page reporting)
    std::uint64_t bad_pfns = 0;           // outside guest RAM, in the MMIO hole or in an unplugged block
    std::uint64_t double_inflates = 0;    // inflate of a page already in the balloon
    std::uint64_t stray_deflates = 0;     // deflate of a page not in the balloon
    std::uint64_t discard_errors = 0;     // GuestMemory::discard failed (e.g. hugetlb before Linux 5.18)
    std::uint64_t reported_bytes = 0;     // free page reporting: bytes discarded
    std::uint64_t reported_kept_bytes = 0;   // free page reporting: bytes kept (would split a huge page)
};

class BalloonTracker {
public:
    explicit BalloonTracker(GuestMemory& mem);

    // 5.5.6.1: the driver put these pages into the balloon / took them out.
    void inflate(std::span<const std::uint64_t> pfns);
    void deflate(std::span<const std::uint64_t> pfns);

    // 5.5.6.4: [gpa, gpa+len) is free in the guest: discards the whole
    // release_granule() units inside it. Returns the bytes discarded.
    std::uint64_t report_free(Gpa gpa, std::uint64_t len);

    bool inflated(std::uint64_t pfn) const;
    bool region_released(Gpa gpa) const;   // all 512 pages of gpa's region inflated
    // The smallest unit given back to the host: 4 KiB or 2 MiB.
    std::uint64_t release_granule() const { return per_page_ ? kBalloonPageSize : kHugePageSize; }
    const BalloonTrackerCounters& counters() const { return counters_; }

private:
    struct Region {
        std::array<std::uint64_t, kBalloonPagesPerRegion / 64> bits{};
        std::uint16_t count = 0;
        bool released = false;
    };
    // Where `pfn`'s page is tracked: regions_[region]->bits[word] & bit.
    struct Page { Gpa gpa; std::size_t region, word; std::uint64_t bit; };
    std::optional<Page> locate(std::uint64_t pfn) const;   // nullopt: not guest RAM
    void discard(Gpa gpa, std::uint64_t len);
    void flush_run();

    GuestMemory& mem_;
    bool per_page_;   // Backing::off: release each page at once
    const std::size_t ram_regions_;   // boot RAM's 2 MiB regions; the hotplug region's follow
    std::vector<std::unique_ptr<Region>> regions_;   // by host offset / 2 MiB, allocated on demand
    BalloonTrackerCounters counters_;
    Gpa run_gpa_;
    std::uint64_t run_len_ = 0;   // pending 4 KiB discards (per_page_), coalesced
};

} // namespace kguest
