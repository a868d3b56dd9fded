// virtio-balloon (VIRTIO 1.2 section 5.5), the device half: the host asks
// the guest to give back memory by raising num_pages in the configuration
// space; the guest's driver allocates pages, puts their PFNs on the inflate
// queue and the device returns their host memory (BalloonTracker decides
// when, so that THP and hugetlbfs backing is never split); deflating hands
// pages back to the guest. The device also collects the guest's memory
// statistics (5.5.6.3) and discards the free page ranges the guest reports
// (5.5.6.4).
//
// Features offered: VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
// VIRTIO_BALLOON_F_REPORTING (each can be turned off in BalloonOptions), plus
// VIRTIO_F_INDIRECT_DESC and VIRTIO_F_EVENT_IDX. Not offered:
// VIRTIO_BALLOON_F_MUST_TELL_HOST (so deflate is a notification only),
// FREE_PAGE_HINT (migration only) and PAGE_POISON.
//
// Queues (5.5.2). The spec gives fixed indexes (0 inflateq, 1 deflateq,
// 2 statsq, 3 free_page_vq, 4 reporting_vq), but Linux (and QEMU, which
// creates only the queues of offered features) number the queues of
// negotiated features consecutively. This device offers five queues and
// assigns their roles at DRIVER_OK from the negotiated features, so both
// layouts work:
//   0 inflateq, 1 deflateq,
//   2 statsq if STATS_VQ was negotiated, else reporting_vq if REPORTING was,
//   3 reporting_vq if STATS_VQ and REPORTING were (Linux's layout),
//   4 reporting_vq if REPORTING was (the spec's fixed layout).
//
// Activation: the statsq buffer Linux adds (and kicks) before DRIVER_OK is
// picked up in activate(), since the transport drops kicks before DRIVER_OK.
//
// Threading: the device runs on its own EventLoop (devices/base/event_loop.hpp
// documents the model). Inflate, deflate, reporting and the stats buffer
// (the madvise calls among them) run on the loop thread, which alone touches
// the queues and the tracker; a vCPU's kick (queue_notify, or the ioeventfds
// the device takes) only flags the queue and wakes the loop, and each pass
// handles at most kBudget chains. set_target_pages, target_pages,
// actual_pages, request_stats, stats and counters may be called from any
// thread (the control API) and never wait for the loop: they read and write
// state under a short lock (mu_) that the loop takes only to publish
// counters and samples, never across guest-driven work. request_stats hands
// the stats buffer back on the loop, after it returns.
//
// Reset (2.4): reset() forgets the queues and the stats buffer and sets
// `actual` to 0, but keeps the tracker: pages inflated before a driver reset
// stay released until deflated (Linux deflates everything before it resets
// the device on unload).
//
// The guest is hostile: bad PFNs are counted and skipped, odd buffer lengths
// are truncated to whole entries, chains are capped in what is read from
// them, and a malformed chain (PopStatus::error) sets DEVICE_NEEDS_RESET,
// logged through a RateLimit. Nothing on these paths throws.
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
inline constexpr unsigned VIRTIO_BALLOON_F_MUST_TELL_HOST = 0;
inline constexpr unsigned VIRTIO_BALLOON_F_STATS_VQ = 1;
inline constexpr unsigned VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2;
inline constexpr unsigned VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3;
inline constexpr unsigned VIRTIO_BALLOON_F_PAGE_POISON = 4;
inline constexpr unsigned VIRTIO_BALLOON_F_REPORTING = 5;

// 5.5.6.3: statistics tags.
inline constexpr std::uint16_t VIRTIO_BALLOON_S_SWAP_IN = 0;
inline constexpr std::uint16_t VIRTIO_BALLOON_S_SWAP_OUT = 1;
inline constexpr std::uint16_t VIRTIO_BALLOON_S_MAJFLT = 2;
inline constexpr std::uint16_t VIRTIO_BALLOON_S_MINFLT = 3;
inline constexpr std::uint16_t VIRTIO_BALLOON_S_MEMFREE = 4;
inline constexpr std::uint16_t VIRTIO_BALLOON_S_MEMTOT = 5;
inline constexpr std::uint16_t VIRTIO_BALLOON_S_AVAIL = 6;
inline constexpr std::uint16_t VIRTIO_BALLOON_S_CACHES = 7;
inline constexpr std::uint16_t VIRTIO_BALLOON_S_HTLB_PGALLOC = 8;
inline constexpr std::uint16_t VIRTIO_BALLOON_S_HTLB_PGFAIL = 9;
inline constexpr std::uint16_t VIRTIO_BALLOON_S_NR = 10;

// The queue roles (see the layout above).
enum class BalloonQueue { none, inflate, deflate, stats, reporting };

// One statistic as libvirt names it. libvirt's QEMU driver maps QEMU's
// "stat-total-memory" (MEMTOT) to VIR_DOMAIN_MEMORY_STAT_AVAILABLE and
// "stat-available-memory" (AVAIL) to VIR_DOMAIN_MEMORY_STAT_USABLE
// (src/qemu/qemu_monitor_json.c, qemuMonitorJSONGetMemoryStats); we do the same.
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

// Looks up the libvirt tag and name of a virtio statistics tag; false for
// tags libvirt has no name for (newer ones, or garbage).
bool balloon_stat_libvirt(std::uint16_t tag, int& libvirt_tag, const char*& name);

class VirtioBalloon : public VirtioDevice {
public:
    static constexpr std::uint16_t kNumQueues = 5;
    static constexpr std::uint16_t kQueueSize = 256;   // reporting needs >= 32 (Linux)
    static constexpr std::size_t kConfigSize = 16;
    // Linux sends at most 256 PFNs per buffer; a chain with more is read up
    // to this many and counted as truncated (bounds the work of one chain).
    static constexpr std::uint64_t kMaxPfnsPerChain = 1u << 16;
    static constexpr std::size_t kMaxStatsEntries = 64;
    // Chains per queue service pass: up to 4 * kMaxPfnsPerChain PFNs (and
    // as many madvise calls at worst) before the loop turns to other work.
    static constexpr int kBudget = 4;

    // `mem` is the guest RAM the tracker releases (the same object the
    // transport hands to activate()). Starts the loop; throws SysError when
    // it cannot be set up.
    explicit VirtioBalloon(GuestMemory& mem, BalloonOptions options = {});
    ~VirtioBalloon() override;

    // The host's side of the configuration space (5.5.4).
    // Sets num_pages (4 KiB pages the guest should give up) and sends a
    // configuration change notification.
    void set_target_pages(std::uint32_t pages);
    std::uint32_t target_pages() const;
    // What the driver last wrote to `actual`.
    std::uint32_t actual_pages() const;

    // 5.5.6.3: hands the stats buffer back to the driver so it refills it.
    // False (nothing sent) when the device holds no buffer: the driver has
    // not given one yet, or a request is still unanswered.
    bool request_stats();
    BalloonStats stats() const;

    BalloonCounters counters() const;
    // Which role queue `q` plays under the negotiated features (none before
    // activation).
    BalloonQueue queue_role(std::uint16_t q) const;
    // Whether page `pfn` is in the balloon (diagnostics, tests; asks the loop).
    bool page_inflated(std::uint64_t pfn) const;
    // Waits until the loop has serviced every kick made so far (tests).
    bool settle() { return loop_->wait_idle(); }

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
    void queue_notify(std::uint16_t q) override { loop_->kick(q); }
    bool take_notify_fds(std::span<const int> fds) override { return loop_->watch_queues(fds); }

private:
    static BalloonQueue role_of(std::uint16_t q, std::uint64_t features, bool active);
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
    bool active_ = false;
    std::uint64_t features_ = 0;    // negotiated, at activate()
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
    std::uint64_t loop_features_ = 0;
    std::optional<std::uint16_t> stats_head_;      // the stats buffer the device holds
    std::uint16_t stats_queue_ = 0;
    std::vector<std::uint64_t> pfn_buf_;
    RateLimit log_limit_{5};

    std::unique_ptr<EventLoop> loop_;   // last: started once the rest exists
};

} // namespace kguest
