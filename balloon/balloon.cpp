// virtio-balloon device model (VIRTIO 1.2 section 5.5): configuration
// space, the inflate/deflate/stats/reporting queue services its EventLoop
// runs, and the statistics naming shared with libvirt (see balloon.hpp).
#include "balloon/balloon.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <ctime>

namespace kguest {

namespace {

struct StatName {
    int libvirt_tag;       // virDomainMemoryStatTags (libvirt-domain.h; stable ABI)
    const char* name;      // as virsh dommemstat / virDomainMemoryStats users know it
    std::uint64_t divisor; // virtio unit → libvirt unit (bytes → KiB for sizes)
};

// Indexed by virtio tag (5.5.6.3). MEMTOT → AVAILABLE and AVAIL → USABLE as
// in libvirt's qemuMonitorJSONGetMemoryStats ("stat-total-memory" →
// VIR_DOMAIN_MEMORY_STAT_AVAILABLE, "stat-available-memory" → _USABLE).
constexpr StatName kStatNames[VIRTIO_BALLOON_S_NR] = {
    {0, "swap_in", 1024},           // VIRTIO_BALLOON_S_SWAP_IN (bytes)
    {1, "swap_out", 1024},          // VIRTIO_BALLOON_S_SWAP_OUT (bytes)
    {2, "major_fault", 1},          // VIRTIO_BALLOON_S_MAJFLT
    {3, "minor_fault", 1},          // VIRTIO_BALLOON_S_MINFLT
    {4, "unused", 1024},            // VIRTIO_BALLOON_S_MEMFREE
    {5, "available", 1024},         // VIRTIO_BALLOON_S_MEMTOT
    {8, "usable", 1024},            // VIRTIO_BALLOON_S_AVAIL
    {10, "disk_caches", 1024},      // VIRTIO_BALLOON_S_CACHES
    {11, "hugetlb_pgalloc", 1},     // VIRTIO_BALLOON_S_HTLB_PGALLOC
    {12, "hugetlb_pgfail", 1},      // VIRTIO_BALLOON_S_HTLB_PGFAIL
};

// Indexed by BalloonQueue.
constexpr const char* kRoleNames[] = {"unused queue", "inflateq", "deflateq", "statsq", "reporting_vq"};

} // namespace

VirtioBalloon::VirtioBalloon(GuestMemory& mem, BalloonOptions options)
    : mem_(mem), options_(options), tracker_(mem) {
    loop_ = std::make_unique<EventLoop>("virtio-balloon", kNumQueues, [this](std::uint16_t q) { return service(q); });
}

VirtioBalloon::~VirtioBalloon() { loop_->stop(); }

std::uint64_t VirtioBalloon::device_features() const {
    std::uint64_t f = virtio_bit(VIRTIO_F_INDIRECT_DESC) | virtio_bit(VIRTIO_F_EVENT_IDX);
    if (options_.stats) f |= virtio_bit(VIRTIO_BALLOON_F_STATS_VQ);
    if (options_.deflate_on_oom) f |= virtio_bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
    if (options_.reporting) f |= virtio_bit(VIRTIO_BALLOON_F_REPORTING);
    return f;
}

// ---- Configuration space (5.5.4): le32 num_pages, le32 actual, then
// free_page_hint_cmd_id and poison_val (features not offered: read 0) ----

void VirtioBalloon::read_config(std::uint64_t offset, std::span<std::uint8_t> data) {
    std::array<std::uint8_t, kConfigSize> img{};
    {
        std::lock_guard lock(mu_);
        std::memcpy(img.data(), &num_pages_, 4);   // le32 fields: the host is little-endian
        std::memcpy(img.data() + 4, &actual_, 4);
    }
    for (std::size_t i = 0; i < data.size(); ++i)
        data[i] = offset + i < img.size() ? img[offset + i] : 0xff;
}

void VirtioBalloon::write_config(std::uint64_t offset, std::span<const std::uint8_t> data) {
    // 5.5.4: only `actual` is driver-writable (PAGE_POISON is not offered).
    std::lock_guard lock(mu_);
    for (std::size_t i = 0; i < data.size(); ++i) {
        const std::uint64_t o = offset + i;
        if (o >= 4 && o < 8) reinterpret_cast<std::uint8_t*>(&actual_)[o - 4] = data[i];
    }
}

void VirtioBalloon::set_target_pages(std::uint32_t pages) {
    {
        std::lock_guard lock(mu_);
        num_pages_ = pages;
    }
    notify_config_changed();   // 2.5.1
}

std::uint32_t VirtioBalloon::target_pages() const {
    std::lock_guard lock(mu_);
    return num_pages_;
}

std::uint32_t VirtioBalloon::actual_pages() const {
    std::lock_guard lock(mu_);
    return actual_;
}

// ---- Lifecycle ----

void VirtioBalloon::activate(std::span<Virtqueue> queues, GuestMemory& /*mem*/) {
    const std::uint64_t features = transport() != nullptr ? transport()->driver_features() : device_features();
    loop_->run_and_wait([this, queues, features] {
        {
            std::lock_guard lock(mu_);
            stats_held_ = stats_requested_ = false;
        }
        queues_ = queues;
        features_ = features;
        stats_head_.reset();
        give_back_deferred_ = false;
        stats_queue_ = 0;
        for (std::uint16_t q = 0; q < queues_.size(); ++q)
            if (role_of(q, features) == BalloonQueue::stats) stats_queue_ = q;
        // Linux adds and kicks the first stats buffer before DRIVER_OK, and
        // the transport drops that kick: pick it up now.
        if (!queues_.empty() && role_of(stats_queue_, features) == BalloonQueue::stats && service(stats_queue_))
            loop_->mark(stats_queue_);
    });
}

void VirtioBalloon::reset() {
    // 2.4: stop touching the queues; the stats buffer goes without a push.
    loop_->run_and_wait([this] {
        queues_ = {};
        features_ = 0;
        stats_head_.reset();
        give_back_deferred_ = false;
        std::lock_guard lock(mu_);
        stats_held_ = stats_requested_ = false;
        actual_ = 0;
    });
}

BalloonQueue VirtioBalloon::role_of(std::uint16_t q, std::uint64_t features) {
    const bool stats = (features & virtio_bit(VIRTIO_BALLOON_F_STATS_VQ)) != 0;
    const bool reporting = (features & virtio_bit(VIRTIO_BALLOON_F_REPORTING)) != 0;
    switch (q) {
    case 0: return BalloonQueue::inflate;
    case 1: return BalloonQueue::deflate;
    case 2: return stats ? BalloonQueue::stats : reporting ? BalloonQueue::reporting : BalloonQueue::none;
    case 3: return stats && reporting ? BalloonQueue::reporting : BalloonQueue::none;
    case 4: return reporting ? BalloonQueue::reporting : BalloonQueue::none;
    default: return BalloonQueue::none;
    }
}

BalloonQueue VirtioBalloon::queue_role(std::uint16_t q) const {
    auto role = std::make_shared<std::atomic<BalloonQueue>>(BalloonQueue::none);
    loop_->run_and_wait(
        [this, role, q] { role->store(queues_.empty() ? BalloonQueue::none : role_of(q, features_)); });
    return role->load();
}

bool VirtioBalloon::page_inflated(std::uint64_t pfn) const {
    auto in = std::make_shared<std::atomic<bool>>(false);
    loop_->run_and_wait([this, in, pfn] { in->store(tracker_.inflated(pfn)); });
    return in->load();
}

// ---- Queues, on the loop ----

bool VirtioBalloon::service(std::uint16_t q) {
    // Without DMA (bus mastering off) nothing is touched; the transport
    // kicks every queue again once it is back.
    if (q >= queues_.size() || !queues_[q].ready() || !dma_enabled()) return false;
    Virtqueue& vq = queues_[q];
    const BalloonQueue role = role_of(q, features_);
    if (role == BalloonQueue::none) return false;   // feature not negotiated: buffers stay
    if (role == BalloonQueue::stats && give_back_deferred_) give_back_stats();
    const Virtqueue::Pass pass = vq.service(kBudget, [&](const DescChain& chain) {
        if (role == BalloonQueue::stats)
            take_stats(vq, q, chain);
        else if (role == BalloonQueue::reporting)
            take_report(vq, chain);
        else
            take_pfns(vq, chain, role == BalloonQueue::inflate);
        return true;
    });
    if (pass == Virtqueue::Pass::error) {
        if (role == BalloonQueue::stats) {
            stats_head_.reset();
            std::lock_guard lock(mu_);
            stats_held_ = false;
        }
        fail_queue(kRoleNames[static_cast<int>(role)], vq.error());
    }
    if (role != BalloonQueue::stats) {   // the stats buffer is used on request only
        publish();
        if (!vq.failed() && vq.needs_notification()) notify_used(q);
    }
    return pass == Virtqueue::Pass::more;
}

void VirtioBalloon::publish() {
    std::lock_guard lock(mu_);
    counters_.tracker = tracker_.counters();
}

void VirtioBalloon::fail_queue(const char* what, GuestError e) {
    {
        std::lock_guard lock(mu_);
        ++counters_.bad_chains;
    }
    KGUEST_LOG_LIMITED(log_limit_, "virtio-balloon: %s: %s; device needs reset", what, e.reason);
    fail();
}

void VirtioBalloon::take_pfns(Virtqueue& vq, const DescChain& chain, bool inflate) {
    // 5.5.6.1: device-readable le32 PFNs (4 KiB frames); used length 0.
    constexpr std::uint64_t kChunk = 1024;   // PFNs read at a time
    std::uint32_t raw[kChunk];
    std::uint64_t n_pfns = chain.readable_len() / 4;
    const bool odd = chain.readable_len() % 4 != 0, truncated = n_pfns > kMaxPfnsPerChain;
    if (truncated) n_pfns = kMaxPfnsPerChain;
    for (std::uint64_t done = 0; done < n_pfns;) {
        const std::uint64_t k = std::min(kChunk, n_pfns - done);
        if (!chain.read(mem_, done * 4, raw, k * 4)) break;   // cannot happen: n_pfns fits
        pfn_buf_.assign(raw, raw + k);   // le32, and so is the host
        if (inflate)
            tracker_.inflate(pfn_buf_);
        else
            tracker_.deflate(pfn_buf_);
        done += k;
    }
    vq.push_used(chain.head(), 0);
    std::lock_guard lock(mu_);
    ++(inflate ? counters_.inflate_buffers : counters_.deflate_buffers);
    counters_.odd_buffers += odd;
    counters_.truncated_buffers += truncated;
}

void VirtioBalloon::take_report(Virtqueue& vq, const DescChain& chain) {
    // 5.5.6.4: each device-writable buffer is a free range the device may
    // discard; used length 0.
    for (const DescChainElem& e : chain.elems())
        if (e.write) tracker_.report_free(e.addr, e.len);
    vq.push_used(chain.head(), 0);
    std::lock_guard lock(mu_);
    ++counters_.report_buffers;
}

void VirtioBalloon::take_stats(Virtqueue& vq, std::uint16_t q, const DescChain& chain) {
    // 5.5.6.3: the device keeps the one stats buffer until it wants fresh
    // values, then uses it (length 0) and the driver refills and re-adds it.
    if (stats_head_) {
        // A second buffer while we hold one breaks the protocol: give the old
        // one back and keep the newest.
        vq.push_used(*stats_head_, 0);
        if (vq.needs_notification()) notify_used(q);
    }
    stats_head_ = chain.head();
    parse_stats(chain);
}

void VirtioBalloon::parse_stats(const DescChain& chain) {
    // 5.5.6.3: packed { le16 tag; le64 val; } entries; a partial entry and
    // what lies past kMaxStatsEntries are ignored.
    constexpr std::size_t kEntry = 10;
    std::uint64_t n = chain.readable_len() / kEntry;
    const bool odd = chain.readable_len() % kEntry != 0, truncated = n > kMaxStatsEntries;
    if (truncated) n = kMaxStatsEntries;
    std::array<std::uint8_t, kMaxStatsEntries * kEntry> buf{};
    if (n != 0 && !chain.read(mem_, 0, buf.data(), n * kEntry)) n = 0;
    std::lock_guard lock(mu_);
    counters_.odd_buffers += odd;
    counters_.truncated_buffers += truncated;
    stat_has_ = {};   // a sample replaces the previous one as a whole
    for (std::uint64_t i = 0; i < n; ++i) {
        const std::uint8_t* e = buf.data() + i * kEntry;
        const std::uint16_t tag = static_cast<std::uint16_t>(e[0] | e[1] << 8);
        std::uint64_t val = 0;
        for (int b = 7; b >= 0; --b) val = val << 8 | e[2 + b];
        if (tag >= VIRTIO_BALLOON_S_NR) {
            ++counters_.unknown_stat_tags;
            continue;
        }
        stat_val_[tag] = val;
        stat_has_[tag] = true;
    }
    ++samples_;
    sample_time_ = std::chrono::steady_clock::now();
    sample_unix_s_ = static_cast<std::int64_t>(std::time(nullptr));
    stats_held_ = true;
    stats_requested_ = false;
}

void VirtioBalloon::give_back_stats() {
    give_back_deferred_ = !dma_enabled();   // done on the stats queue's next pass
    if (give_back_deferred_ || !stats_head_ || stats_queue_ >= queues_.size()) return;
    Virtqueue& vq = queues_[stats_queue_];
    if (!vq.ready() || vq.failed()) return;
    vq.push_used(*stats_head_, 0);
    stats_head_.reset();
    if (vq.needs_notification()) notify_used(stats_queue_);
}

// ---- The API's side: never waits for the loop ----

bool VirtioBalloon::request_stats() {
    {
        std::lock_guard lock(mu_);
        if (!stats_held_) return false;
        stats_held_ = false;
        stats_requested_ = true;
    }
    loop_->post([this] { give_back_stats(); });
    return true;
}

BalloonStats VirtioBalloon::stats() const {
    std::lock_guard lock(mu_);
    BalloonStats s;
    s.samples = samples_;
    s.valid = samples_ != 0;
    s.request_pending = stats_requested_;
    if (!s.valid) return s;
    s.age = std::chrono::steady_clock::now() - sample_time_;
    s.last_update_unix_s = sample_unix_s_;
    for (std::uint16_t tag = 0; tag < VIRTIO_BALLOON_S_NR; ++tag) {
        if (!stat_has_[tag]) continue;
        const StatName& n = kStatNames[tag];
        s.values.push_back({tag, n.libvirt_tag, n.name, stat_val_[tag], stat_val_[tag] / n.divisor});
    }
    return s;
}

BalloonCounters VirtioBalloon::counters() const {
    std::lock_guard lock(mu_);
    return counters_;
}

} // namespace kguest
