// virtio-balloon (VIRTIO 1.2 section 5.5), the device half: the host raises
// num_pages in the configuration space; the driver puts pages' PFNs on the
// inflate queue and the device returns their host memory (BalloonTracker
// decides when, never splitting THP or hugetlbfs backing); deflating hands
// pages back. The device also collects the guest's memory statistics
// (5.5.6.3) and discards the free page ranges the guest reports (5.5.6.4).
//
// Not offered: MUST_TELL_HOST (deflate is a notification only), FREE_PAGE_HINT
// (migration only) and PAGE_POISON.
//
// Queues (5.5.2): the spec gives fixed indexes (0 inflateq, 1 deflateq,
// 2 statsq, 3 free_page_vq, 4 reporting_vq), but Linux and QEMU number the
// queues of negotiated features consecutively. The device offers five queues
// and assigns their roles at DRIVER_OK from the negotiated features:
//   0 inflateq, 1 deflateq,
//   2 statsq if STATS_VQ was negotiated, else reporting_vq if REPORTING was,
//   3 reporting_vq if STATS_VQ and REPORTING were (Linux's layout),
//   4 reporting_vq if REPORTING was (the spec's fixed layout).
//
// Threading: the device runs on its own EventLoop (devices/base/event_loop.hpp).
// Only the loop thread touches the queues and the tracker (madvise included);
// a kick only flags the queue, and each pass handles at most kBudget chains.
// The host-side calls (set_target_pages ... counters) may come from any
// thread and never wait for the loop: they use a short lock (mu_) that the
// loop takes only to publish counters and samples.
//
// Without DMA (the transport's dma_enabled(): PCI bus mastering off) the
// loop touches no queue; a stats request waits for the next pass.
//
// Reset (2.4) forgets the queues and the stats buffer and sets `actual` to 0
// but keeps the tracker: inflated pages stay released until deflated.
//
// The guest is hostile: bad PFNs are counted and skipped, odd buffer lengths
// are truncated to whole entries, chains are capped in what is read from
// them, and a malformed chain sets DEVICE_NEEDS_RESET (logged, rate-limited).
#pragma once

#include "balloon/tracker.hpp"
#include "devices/virtio.hpp"
#include "devices/virtqueue.hpp"
#include "devices/base/event_loop.hpp"
#include "devices/base/log.hpp"

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

namespace kguest {

// 5.5.3: feature bits.
inline constexpr unsigned VIRTIO_BALLOON_F_MUST_TELL_HOST = 0, VIRTIO_BALLOON_F_STATS_VQ = 1,
                          VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2, VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3,
                          VIRTIO_BALLOON_F_PAGE_POISON = 4, VIRTIO_BALLOON_F_REPORTING = 5;

// 5.5.6.3: statistics tags.
inline constexpr std::uint16_t VIRTIO_BALLOON_S_SWAP_IN = 0, VIRTIO_BALLOON_S_SWAP_OUT = 1,
                               VIRTIO_BALLOON_S_MAJFLT = 2, VIRTIO_BALLOON_S_MINFLT = 3,
                               VIRTIO_BALLOON_S_MEMFREE = 4, VIRTIO_BALLOON_S_MEMTOT = 5,
                               VIRTIO_BALLOON_S_AVAIL = 6, VIRTIO_BALLOON_S_CACHES = 7,
                               VIRTIO_BALLOON_S_HTLB_PGALLOC = 8, VIRTIO_BALLOON_S_HTLB_PGFAIL = 9,
                               VIRTIO_BALLOON_S_NR = 10;

// The queue roles (see the layout above).
enum class BalloonQueue { none, inflate, deflate, stats, reporting };

// One statistic as libvirt names it (see kStatNames in balloon.cpp).
struct BalloonStat {
    std::uint16_t tag;          // virtio tag (5.5.6.3)
    int libvirt_tag;            // VIR_DOMAIN_MEMORY_STAT_*
    const char* name;           // libvirt's name ("swap_in", "available", ...)
    std::uint64_t value;        // as the guest sent it (bytes for memory sizes, counts for faults)
    std::uint64_t libvirt_value;   // in libvirt's unit: KiB for sizes, counts as they are
};

struct BalloonStats {
    std::vector<BalloonStat> values;   // the last sample, known tags only, in tag order
    bool valid = false;                // a sample has arrived since construction
    std::chrono::steady_clock::duration age{};   // since the last sample (when valid)
    std::int64_t last_update_unix_s = 0;         // wall-clock time of it (libvirt LAST_UPDATE)
    std::uint64_t samples = 0;                   // samples received so far
    bool request_pending = false;      // request_stats() sent, answer not yet back
};

// Device counters, tracker counters included.
struct BalloonCounters {
    BalloonTrackerCounters tracker;
    std::uint64_t inflate_buffers = 0, deflate_buffers = 0;
    std::uint64_t report_buffers = 0;        // reporting_vq chains
    std::uint64_t odd_buffers = 0;           // length not a whole number of entries
    std::uint64_t truncated_buffers = 0;     // more PFNs than kMaxPfnsPerChain
    std::uint64_t unknown_stat_tags = 0;
    std::uint64_t bad_chains = 0;            // malformed rings: DEVICE_NEEDS_RESET
};

struct BalloonOptions {
    bool stats = true;             // VIRTIO_BALLOON_F_STATS_VQ
    bool deflate_on_oom = true;    // VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    bool reporting = true;         // VIRTIO_BALLOON_F_REPORTING
};

class VirtioBalloon : public LoopDevice {
public:
    static constexpr std::uint16_t kNumQueues = 5;
    static constexpr std::uint16_t kQueueSize = 256;   // reporting needs >= 32 (Linux)
    static constexpr std::size_t kConfigSize = 16;
    // Linux sends at most 256 PFNs per buffer; a longer chain is cut (counted).
    static constexpr std::uint64_t kMaxPfnsPerChain = 1u << 16;
    static constexpr std::size_t kMaxStatsEntries = 64;
    static constexpr int kBudget = 4;   // chains per service pass

    // `mem`: the guest RAM the tracker releases. Starts the loop; throws SysError.
    explicit VirtioBalloon(GuestMemory& mem, BalloonOptions options = {});
    ~VirtioBalloon() override;

    // 5.5.4: num_pages (4 KiB pages the guest should give up; setting it
    // sends a configuration change notification) and the driver's `actual`.
    void set_target_pages(std::uint32_t pages);
    std::uint32_t target_pages() const;
    std::uint32_t actual_pages() const;

    // 5.5.6.3: hands the stats buffer back (on the loop) so the driver
    // refills it; false when the device holds none (none yet, or unanswered).
    bool request_stats();
    BalloonStats stats() const;

    BalloonCounters counters() const;
    // For tests (they ask the loop): queue q's role (none while inactive),
    // whether page `pfn` is in the balloon (settle(), from LoopDevice, waits for the loop).
    BalloonQueue queue_role(std::uint16_t q) const;
    bool page_inflated(std::uint64_t pfn) const;

    // VirtioDevice.
    std::uint16_t device_id() const override { return 5; }
    std::uint64_t device_features() const override;
    std::uint16_t num_queues() const override { return kNumQueues; }
    std::uint16_t max_queue_size(std::uint16_t q) const override { return q < kNumQueues ? kQueueSize : 0; }
    std::size_t config_size() const override { return kConfigSize; }
    void read_config(std::uint64_t offset, std::span<std::uint8_t> data) override;
    void write_config(std::uint64_t offset, std::span<const std::uint8_t> data) override;
    void activate(std::span<Virtqueue> queues, GuestMemory& mem) override;
    void reset() override;

private:
    static BalloonQueue role_of(std::uint16_t q, std::uint64_t features);
    // On the loop.
    bool service(std::uint16_t q);
    void take_pfns(Virtqueue& vq, const DescChain& chain, bool inflate);
    void take_report(Virtqueue& vq, const DescChain& chain);
    void take_stats(Virtqueue& vq, std::uint16_t q, const DescChain& chain);
    void parse_stats(const DescChain& chain);
    void give_back_stats();
    void fail_queue(const char* what, GuestError e);
    void publish();   // the tracker's counters, for counters()

    GuestMemory& mem_;
    BalloonOptions options_;

    // Shared with the API threads (mu_, never held across guest-driven work).
    mutable std::mutex mu_;
    std::uint32_t num_pages_ = 0;
    std::uint32_t actual_ = 0;
    bool stats_held_ = false;       // the loop holds a stats buffer
    bool stats_requested_ = false;
    // The last sample, indexed by virtio tag; has_[tag] says it was sent.
    std::array<std::uint64_t, VIRTIO_BALLOON_S_NR> stat_val_{};
    std::array<bool, VIRTIO_BALLOON_S_NR> stat_has_{};
    std::uint64_t samples_ = 0;
    std::chrono::steady_clock::time_point sample_time_{};
    std::int64_t sample_unix_s_ = 0;
    BalloonCounters counters_;

    // Loop thread only.
    BalloonTracker tracker_;
    std::span<Virtqueue> queues_;   // empty while not active
    std::uint64_t features_ = 0;    // negotiated, at activate()
    std::optional<std::uint16_t> stats_head_;      // the stats buffer the device holds
    std::uint16_t stats_queue_ = 0;
    bool give_back_deferred_ = false;   // request_stats() came while DMA was off
    std::vector<std::uint64_t> pfn_buf_;
    RateLimit log_limit_{5};
};

} // namespace kguest
