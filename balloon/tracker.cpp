// BalloonTracker: per-2 MiB-region bitmaps of ballooned pages and the
// backing-aware release policy (see tracker.hpp).
#include "balloon/tracker.hpp"

namespace kguest {

BalloonTracker::BalloonTracker(GuestMemory& mem)
    : mem_(mem), per_page_(mem.backing() == Backing::off), ram_regions_(mem.size() / kHugePageSize),
      regions_(ram_regions_ + mem.hotplug_blocks()) {}

std::optional<BalloonTracker::Page> BalloonTracker::locate(std::uint64_t pfn) const {
    if (pfn > (UINT64_MAX >> kBalloonPfnShift)) return std::nullopt;
    const Gpa gpa(pfn << kBalloonPfnShift);
    for (const MemoryRegion& r : mem_.regions()) {
        if (gpa >= r.gpa && gpa.value() - r.gpa.value() < r.size) {
            const std::uint64_t off = r.offset + (gpa.value() - r.gpa.value());
            const std::uint64_t page = (off % kHugePageSize) >> kBalloonPfnShift;
            return Page{gpa, off / kHugePageSize, page / 64, std::uint64_t{1} << (page % 64)};
        }
    }
    // Hot-added memory is the guest's while its block is plugged.
    if (const MemoryRegion* h = mem_.hotplug_region(); h != nullptr && gpa >= h->gpa && gpa.value() - h->gpa.value() < h->size) {
        const std::uint64_t off = gpa.value() - h->gpa.value();
        if (!mem_.hotplug_block_plugged(off / kHugePageSize)) return std::nullopt;
        const std::uint64_t page = (off % kHugePageSize) >> kBalloonPfnShift;
        return Page{gpa, ram_regions_ + off / kHugePageSize, page / 64, std::uint64_t{1} << (page % 64)};
    }
    return std::nullopt;   // beyond RAM, in the MMIO hole [kMmioHoleStart, 4 GiB) or in an unplugged block
}

void BalloonTracker::discard(Gpa gpa, std::uint64_t len) {
    if (mem_.discard(gpa, len))
        counters_.bytes_discarded += len;
    else
        ++counters_.discard_errors;
}

void BalloonTracker::flush_run() {
    if (run_len_ != 0) discard(run_gpa_, run_len_);
    run_len_ = 0;
}

void BalloonTracker::inflate(std::span<const std::uint64_t> pfns) {
    for (std::uint64_t pfn : pfns) {
        const std::optional<Page> p = locate(pfn);
        if (!p) {
            ++counters_.bad_pfns;
            continue;
        }
        auto& slot = regions_[p->region];
        if (!slot) slot = std::make_unique<Region>();
        Region& r = *slot;
        std::uint64_t& word = r.bits[p->word];
        const std::uint64_t bit = p->bit;
        if ((word & bit) != 0) {
            ++counters_.double_inflates;
            continue;
        }
        word |= bit;
        ++r.count;
        ++counters_.inflated_pages;
        if (per_page_) {
            // 4 KiB backing: give the page back now, coalescing runs (within
            // one host mapping: the hotplug region may follow RAM directly).
            if (run_len_ != 0 && run_gpa_ + run_len_ == p->gpa && mem_.contains(run_gpa_, run_len_ + kBalloonPageSize)) {
                run_len_ += kBalloonPageSize;
            } else {
                flush_run();
                run_gpa_ = p->gpa;
                run_len_ = kBalloonPageSize;
            }
            counters_.bytes_released += kBalloonPageSize;
        }
        if (r.count == kBalloonPagesPerRegion) {
            r.released = true;
            ++counters_.regions_released;
            if (!per_page_) {
                // THP / hugetlbfs: the whole huge page goes at once.
                discard(Gpa(p->gpa.value() & ~(kHugePageSize - 1)), kHugePageSize);
                counters_.bytes_released += kHugePageSize;
            }
        }
    }
    flush_run();
}

void BalloonTracker::deflate(std::span<const std::uint64_t> pfns) {
    // 5.5.6.2: without MUST_TELL_HOST the guest may already use the pages:
    // bookkeeping only (a discarded page refaults as zeroes).
    for (std::uint64_t pfn : pfns) {
        const std::optional<Page> p = locate(pfn);
        if (!p) {
            ++counters_.bad_pfns;
            continue;
        }
        auto& slot = regions_[p->region];
        if (!slot || (slot->bits[p->word] & p->bit) == 0) {
            ++counters_.stray_deflates;
            continue;
        }
        Region& r = *slot;
        r.bits[p->word] &= ~p->bit;
        --r.count;
        --counters_.inflated_pages;
        if (per_page_) counters_.bytes_released -= kBalloonPageSize;
        if (r.released) {
            r.released = false;
            --counters_.regions_released;
            if (!per_page_) counters_.bytes_released -= kHugePageSize;
        }
        if (r.count == 0) slot.reset();
    }
}

std::uint64_t BalloonTracker::report_free(Gpa gpa, std::uint64_t len) {
    if (len == 0) return 0;
    if (gpa.value() > UINT64_MAX - len || !mem_.contains(gpa, len)) {
        // The virtqueue checked it already: the last line of defence.
        counters_.bad_pfns += (len + kBalloonPageSize - 1) / kBalloonPageSize;
        return 0;
    }
    const std::uint64_t grain = release_granule();
    const std::uint64_t start = (gpa.value() + grain - 1) & ~(grain - 1);
    const std::uint64_t end = (gpa.value() + len) & ~(grain - 1);
    if (start >= end) {
        counters_.reported_kept_bytes += len;
        return 0;
    }
    const std::uint64_t before = counters_.bytes_discarded;
    discard(Gpa(start), end - start);
    const std::uint64_t done = counters_.bytes_discarded - before;
    counters_.reported_bytes += done;
    counters_.reported_kept_bytes += len - done;
    return done;
}

bool BalloonTracker::inflated(std::uint64_t pfn) const {
    const std::optional<Page> p = locate(pfn);
    return p && regions_[p->region] && (regions_[p->region]->bits[p->word] & p->bit) != 0;
}

bool BalloonTracker::region_released(Gpa gpa) const {
    const std::optional<Page> p = locate(gpa.value() >> kBalloonPfnShift);
    return p && regions_[p->region] && regions_[p->region]->released;
}

} // namespace kguest
