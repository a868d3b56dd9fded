// virtio-balloon device (VIRTIO 1.2 section 5.5) without KVM, on its event
// loop: the fake transport (support/fake_virtio.hpp) records interrupts and
// NEEDS_RESET, and the fake driver lays out split rings in a real 16 MiB
// GuestMemory (THP and 4 KiB backing) and plays Linux's virtio_balloon: inflate and deflate PFN arrays, the stats buffer
// round trip, free page reporting, the configuration space; then malformed
// chains, hostile buffers, the queue layouts, reset, concurrent API calls and
// a fixed-seed fuzz run over the rings.
#include "balloon/balloon.hpp"

#include "tests/support/fake_virtio.hpp"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <gtest/gtest.h>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace kguest {
namespace {

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kRegion = kHugePageSize;
constexpr std::uint16_t kRingSize = 64;

using fake::Buf;
using Ring = fake::Driver;

// A 16 MiB guest with the balloon active. Rings live at 0x10000 + q * 0x2000
// and driver buffers from 0x100000, both in region 0; the tests use regions
// 1 and up for data.
class Rig {
public:
    GuestMemory mem;
    fake::Transport tr;
    VirtioBalloon dev;
    std::vector<Virtqueue> vqs;
    std::vector<Ring> rings;

    explicit Rig(Backing b, std::uint64_t balloon_features = virtio_bit(VIRTIO_BALLOON_F_STATS_VQ) |
                                                             virtio_bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) |
                                                             virtio_bit(VIRTIO_BALLOON_F_REPORTING),
                 bool active = true)
        : mem(16 << 20, b), dev(mem) {
        dev.attach(&tr);
        vqs.reserve(dev.num_queues());
        tr.features = balloon_features | virtio_bit(VIRTIO_F_VERSION_1);
        for (std::uint16_t q = 0; q < dev.num_queues(); ++q) vqs.emplace_back(mem);
        lay_out_rings();
        if (active) activate();
    }
    // Fresh rings on every queue (the transport resets the queues after a
    // device reset; the driver then sets them up again).
    void lay_out_rings() {
        rings.clear();
        for (std::uint16_t q = 0; q < dev.num_queues(); ++q) {
            vqs[q].reset();
            rings.emplace_back(mem, kRingSize, 0x10000 + q * 0x2000ull);
            EXPECT_TRUE(rings.back().configure(vqs[q])) << vqs[q].error().reason;
        }
    }
    ~Rig() { dev.reset(); }
    void activate() { dev.activate(vqs, mem); }   // DRIVER_OK
    // The guest's kick; then waits until the device's loop has serviced it.
    void kick(std::uint16_t q) {
        dev.queue_notify(q);
        EXPECT_TRUE(dev.settle());
    }

    std::uint64_t alloc(std::uint64_t len) {
        const std::uint64_t a = next_;
        next_ += (len + 15) & ~15ull;
        EXPECT_LE(next_, kRegion);
        return a;
    }
    // An array of le32 PFNs in one device-readable buffer.
    Buf pfn_buf(const std::vector<std::uint32_t>& pfns) {
        const std::uint64_t a = alloc(4 * pfns.size());
        EXPECT_TRUE(mem.write(Gpa(a), pfns.data(), 4 * pfns.size()));
        return {a, static_cast<std::uint32_t>(4 * pfns.size())};
    }
    // Sends `pfns` on queue q in buffers of at most 256 (Linux's
    // VIRTIO_BALLOON_ARRAY_PFNS_MAX) and kicks once per buffer.
    void send_pfns(std::uint16_t q, const std::vector<std::uint32_t>& pfns) {
        for (std::size_t i = 0; i < pfns.size(); i += 256) {
            std::vector<std::uint32_t> part(pfns.begin() + i, pfns.begin() + std::min(pfns.size(), i + 256));
            const std::uint16_t head = rings[q].add_chain({pfn_buf(part)});
            kick(q);
            std::uint32_t id = 0, len = 1;
            EXPECT_TRUE(rings[q].take_used(id, len));
            EXPECT_EQ(id, head);
            EXPECT_EQ(len, 0u);
        }
    }
    void touch(std::uint64_t gpa, std::uint64_t len, std::uint8_t v) {
        auto r = mem.range(Gpa(gpa), len);
        ASSERT_TRUE(r && r->fill(0, v, len));
    }
    bool all_bytes(std::uint64_t gpa, std::uint64_t len, std::uint8_t v) const {
        std::vector<std::uint8_t> got(len);
        return mem.read(Gpa(gpa), got.data(), len) &&
               std::all_of(got.begin(), got.end(), [v](std::uint8_t b) { return b == v; });
    }

private:
    std::uint64_t next_ = 0x100000;
};

std::vector<std::uint32_t> pfns_of(std::uint64_t gpa, std::uint64_t pages) {
    std::vector<std::uint32_t> v;
    for (std::uint64_t i = 0; i < pages; ++i) v.push_back(static_cast<std::uint32_t>(gpa / kPage + i));
    return v;
}

// 5.5.6.3: struct virtio_balloon_stat, packed.
std::vector<std::uint8_t> stats_bytes(const std::vector<std::pair<std::uint16_t, std::uint64_t>>& entries) {
    std::vector<std::uint8_t> b;
    for (auto [tag, val] : entries) {
        b.push_back(static_cast<std::uint8_t>(tag));
        b.push_back(static_cast<std::uint8_t>(tag >> 8));
        for (int i = 0; i < 8; ++i) b.push_back(static_cast<std::uint8_t>(val >> (8 * i)));
    }
    return b;
}

const BalloonStat* find_stat(const BalloonStats& s, const std::string& name) {
    for (const auto& v : s.values)
        if (name == v.name) return &v;
    return nullptr;
}

TEST(BalloonDevice, IdentityFeaturesAndQueues) {
    GuestMemory mem(4 << 20, Backing::off);
    VirtioBalloon dev(mem);
    EXPECT_EQ(dev.device_id(), 5);
    const std::uint64_t f = dev.device_features();
    EXPECT_NE(f & virtio_bit(VIRTIO_BALLOON_F_STATS_VQ), 0u);
    EXPECT_NE(f & virtio_bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM), 0u);
    EXPECT_NE(f & virtio_bit(VIRTIO_BALLOON_F_REPORTING), 0u);
    EXPECT_EQ(f & (virtio_bit(VIRTIO_BALLOON_F_MUST_TELL_HOST) | virtio_bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT) |
                   virtio_bit(VIRTIO_BALLOON_F_PAGE_POISON)),
              0u);
    EXPECT_EQ(dev.num_queues(), 5);
    EXPECT_GE(dev.max_queue_size(3), 32);   // Linux's page reporting needs 32
    EXPECT_EQ(dev.max_queue_size(5), 0);
    EXPECT_EQ(dev.config_size(), 16u);
    VirtioBalloon bare(mem, BalloonOptions{false, false, false});
    EXPECT_EQ(bare.device_features() & 0xffffff, 0u);
    EXPECT_EQ(dev.queue_role(0), BalloonQueue::none);   // not active
}

TEST(BalloonDevice, QueueLayoutFollowsNegotiatedFeatures) {
    {
        Rig rig(Backing::off);   // Linux with STATS_VQ + REPORTING: 0 1 2 3
        EXPECT_EQ(rig.dev.queue_role(0), BalloonQueue::inflate);
        EXPECT_EQ(rig.dev.queue_role(1), BalloonQueue::deflate);
        EXPECT_EQ(rig.dev.queue_role(2), BalloonQueue::stats);
        EXPECT_EQ(rig.dev.queue_role(3), BalloonQueue::reporting);
        EXPECT_EQ(rig.dev.queue_role(4), BalloonQueue::reporting);   // the spec's fixed index
        EXPECT_EQ(rig.dev.queue_role(5), BalloonQueue::none);
    }
    {
        Rig rig(Backing::off, virtio_bit(VIRTIO_BALLOON_F_REPORTING));   // no stats: compacted to 2
        EXPECT_EQ(rig.dev.queue_role(2), BalloonQueue::reporting);
        EXPECT_EQ(rig.dev.queue_role(3), BalloonQueue::none);
    }
    {
        Rig rig(Backing::off, 0);
        EXPECT_EQ(rig.dev.queue_role(2), BalloonQueue::none);
        EXPECT_EQ(rig.dev.queue_role(4), BalloonQueue::none);
        const std::uint16_t head = rig.rings[2].add_chain({{0x100000, 10}});
        rig.kick(2);   // not negotiated: ignored, buffer left alone
        EXPECT_EQ(rig.rings[2].used_idx(), 0);
        (void)head;
    }
}

TEST(BalloonDevice, InflateFullRegionWithThpReleasesItAndKeepsTheRest) {
    Rig rig(Backing::thp);
    const std::uint64_t r1 = kRegion, r2 = 2 * kRegion, r3 = 3 * kRegion;
    rig.touch(r1, kRegion, 0x11);
    rig.touch(r2, kRegion, 0x22);
    rig.touch(r3, kRegion, 0x33);
    const std::uint64_t resident = rig.mem.resident_bytes(Gpa(kRegion), 7 * kRegion);
    ASSERT_EQ(rig.mem.resident_bytes(Gpa(r2), kRegion), kRegion);
    const std::uint64_t huge = rig.mem.huge_backed_bytes();   // 0 where THP gave no huge pages

    auto pfns = pfns_of(r2, kBalloonPagesPerRegion);
    std::vector<std::uint32_t> first(pfns.begin(), pfns.end() - 1);
    rig.send_pfns(0, first);
    EXPECT_EQ(rig.mem.resident_bytes(Gpa(r2), kRegion), kRegion);   // partial: kept whole
    EXPECT_EQ(rig.mem.huge_backed_bytes(), huge);               // and not split
    EXPECT_EQ(rig.dev.counters().tracker.bytes_discarded, 0u);
    rig.send_pfns(0, {pfns.back()});
    EXPECT_EQ(rig.mem.resident_bytes(Gpa(r2), kRegion), 0u);
    EXPECT_EQ(rig.mem.resident_bytes(Gpa(kRegion), 7 * kRegion), resident - kRegion);
    EXPECT_TRUE(rig.all_bytes(r1, kRegion, 0x11));
    EXPECT_TRUE(rig.all_bytes(r3, kRegion, 0x33));
    BalloonCounters c = rig.dev.counters();
    EXPECT_EQ(c.tracker.inflated_pages, 512u);
    EXPECT_EQ(c.tracker.regions_released, 1u);
    EXPECT_EQ(c.tracker.bytes_released, kRegion);
    EXPECT_EQ(c.inflate_buffers, 3u);
    EXPECT_TRUE(rig.dev.page_inflated(r2 / kPage + 7));
    // One used-buffer interrupt per kick (no EVENT_IDX, no NO_INTERRUPT).
    EXPECT_EQ(rig.tr.queue_irqs(), std::vector<std::uint16_t>(3, 0));

    // Deflate: the pages are the guest's again.
    rig.send_pfns(1, pfns);
    c = rig.dev.counters();
    EXPECT_EQ(c.tracker.inflated_pages, 0u);
    EXPECT_EQ(c.tracker.regions_released, 0u);
    EXPECT_EQ(c.deflate_buffers, 2u);
    EXPECT_TRUE(rig.all_bytes(r2, kRegion, 0));   // refaulted as zeroes
    rig.touch(r2, kRegion, 0x5e);
    EXPECT_TRUE(rig.all_bytes(r2, kRegion, 0x5e));
    EXPECT_FALSE(rig.dev.page_inflated(r2 / kPage + 7));
}

TEST(BalloonDevice, InflateWithFourKiBBackingReleasesEachPage) {
    Rig rig(Backing::off);
    const std::uint64_t r2 = 2 * kRegion;
    rig.touch(r2, kRegion, 0x22);
    rig.send_pfns(0, pfns_of(r2 + 8 * kPage, 3));
    EXPECT_EQ(rig.mem.resident_bytes(Gpa(r2), kRegion), kRegion - 3 * kPage);
    EXPECT_EQ(rig.mem.resident_bytes(Gpa(r2 + 8 * kPage), 3 * kPage), 0u);
    EXPECT_TRUE(rig.all_bytes(r2, 8 * kPage, 0x22));
    EXPECT_TRUE(rig.all_bytes(r2 + 11 * kPage, kRegion - 11 * kPage, 0x22));
    EXPECT_EQ(rig.dev.counters().tracker.bytes_released, 3 * kPage);
    rig.send_pfns(1, pfns_of(r2 + 9 * kPage, 1));
    ASSERT_TRUE(rig.mem.write_obj<std::uint32_t>(Gpa(r2 + 9 * kPage), 0xfeedf00d));
    EXPECT_EQ(rig.mem.read_obj<std::uint32_t>(Gpa(r2 + 9 * kPage)), 0xfeedf00du);
    EXPECT_EQ(rig.dev.counters().tracker.inflated_pages, 2u);
}

TEST(BalloonDevice, HostileInflateBuffers) {
    Rig rig(Backing::off);
    // Bad PFNs (beyond 16 MiB, in the hole, garbage) among good ones.
    rig.send_pfns(0, {0x400, 0x1000, 0xc0000, 0xffffffff, 0x401, 0x400});
    BalloonCounters c = rig.dev.counters();
    EXPECT_EQ(c.tracker.inflated_pages, 2u);
    EXPECT_EQ(c.tracker.bad_pfns, 3u);
    EXPECT_EQ(c.tracker.double_inflates, 1u);
    // Odd length: 6 bytes = one PFN and a stray half.
    const std::uint32_t two[2] = {0x402, 0x403};
    const std::uint64_t a = rig.alloc(8);
    ASSERT_TRUE(rig.mem.write(Gpa(a), two, 8));
    std::uint16_t head = rig.rings[0].add_chain({{a, 6}});
    rig.kick(0);
    std::uint32_t id = 0, len = 1;
    ASSERT_TRUE(rig.rings[0].take_used(id, len));
    EXPECT_EQ(id, head);
    EXPECT_EQ(len, 0u);
    EXPECT_TRUE(rig.dev.page_inflated(0x402));
    EXPECT_FALSE(rig.dev.page_inflated(0x403));
    EXPECT_EQ(rig.dev.counters().odd_buffers, 1u);
    // A PFN split across two descriptors, plus a device-writable tail that is ignored.
    const std::uint64_t b = rig.alloc(16);
    ASSERT_TRUE(rig.mem.write_obj<std::uint32_t>(Gpa(b), 0x404));
    ASSERT_TRUE(rig.mem.write_obj<std::uint32_t>(Gpa(b + 4), 0x405));
    head = rig.rings[0].add_chain({{b, 2}, {b + 2, 6}, {rig.alloc(64), 64, true}});
    rig.kick(0);
    ASSERT_TRUE(rig.rings[0].take_used(id, len));
    EXPECT_EQ(len, 0u);
    EXPECT_TRUE(rig.dev.page_inflated(0x404));
    EXPECT_TRUE(rig.dev.page_inflated(0x405));
    // An empty and a writable-only chain complete harmlessly.
    rig.rings[0].add_chain({{rig.alloc(64), 64, true}});
    rig.kick(0);
    ASSERT_TRUE(rig.rings[0].take_used(id, len));
    // A huge buffer (4 MiB of zeroes: PFN 0 once, then double inflates) is capped.
    rig.rings[0].add_chain({{4 * kRegion, static_cast<std::uint32_t>(2 * kRegion)}, {6 * kRegion, static_cast<std::uint32_t>(2 * kRegion)}});
    rig.kick(0);
    ASSERT_TRUE(rig.rings[0].take_used(id, len));
    c = rig.dev.counters();
    EXPECT_EQ(c.truncated_buffers, 1u);
    EXPECT_EQ(c.tracker.double_inflates, 1u + VirtioBalloon::kMaxPfnsPerChain - 1);
    EXPECT_EQ(rig.tr.needs_reset_calls, 0);
    // Deflate of pages never inflated.
    rig.send_pfns(1, {0x500, 0x501, 0xc0001});
    c = rig.dev.counters();
    EXPECT_EQ(c.tracker.stray_deflates, 2u);
}

TEST(BalloonDevice, MalformedChainNeedsReset) {
    Rig rig(Backing::off);
    // A descriptor pointing outside guest RAM.
    rig.rings[0].add_chain({{rig.mem.size() - 2, 4}});
    rig.kick(0);
    EXPECT_EQ(rig.tr.needs_reset_calls, 1);
    EXPECT_EQ(rig.dev.counters().bad_chains, 1u);
    EXPECT_TRUE(rig.vqs[0].failed());
    rig.kick(0);   // still broken: no crash, no used buffers
    EXPECT_EQ(rig.rings[0].used_idx(), 0);
    // A loop in the deflate queue.
    rig.rings[1].set_desc(0, {0x100000, 4, kVirtqDescFNext, 0});
    rig.rings[1].publish(0);
    rig.kick(1);
    EXPECT_GE(rig.tr.needs_reset_calls, 2);
    // Reset brings the device back: the tracker survives, the queues do not.
    rig.dev.reset();
    EXPECT_EQ(rig.dev.queue_role(0), BalloonQueue::none);
    rig.kick(0);
}

TEST(BalloonDevice, StatsRoundTrip) {
    Rig rig(Backing::off);
    EXPECT_FALSE(rig.dev.stats().valid);
    EXPECT_FALSE(rig.dev.request_stats());   // no buffer yet
    // The driver primes statsq with a filled buffer (Linux's init_vqs).
    auto bytes = stats_bytes({{VIRTIO_BALLOON_S_SWAP_IN, 8192},
                              {VIRTIO_BALLOON_S_MAJFLT, 7},
                              {VIRTIO_BALLOON_S_MEMFREE, 1000 * kPage},
                              {VIRTIO_BALLOON_S_MEMTOT, 16 << 20},
                              {VIRTIO_BALLOON_S_AVAIL, 2000 * kPage},
                              {VIRTIO_BALLOON_S_CACHES, 3 << 20},
                              {VIRTIO_BALLOON_S_HTLB_PGALLOC, 3},
                              {VIRTIO_BALLOON_S_HTLB_PGFAIL, 2},
                              {VIRTIO_BALLOON_S_NR, 1},   // the first tag libvirt has no name for
                              {42, 1}});
    const std::uint64_t buf = rig.alloc(bytes.size());
    ASSERT_TRUE(rig.mem.write(Gpa(buf), bytes.data(), bytes.size()));
    const std::uint16_t head = rig.rings[2].add_chain({{buf, static_cast<std::uint32_t>(bytes.size())}});
    rig.kick(2);
    EXPECT_EQ(rig.rings[2].used_idx(), 0);   // the device keeps it
    BalloonStats s = rig.dev.stats();
    ASSERT_TRUE(s.valid);
    EXPECT_EQ(s.samples, 1u);
    EXPECT_LT(s.age, std::chrono::seconds(10));
    EXPECT_GT(s.last_update_unix_s, 0);
    EXPECT_EQ(s.values.size(), 8u);
    EXPECT_EQ(rig.dev.counters().unknown_stat_tags, 2u);
    const BalloonStat* st = find_stat(s, "unused");
    ASSERT_NE(st, nullptr);
    EXPECT_EQ(st->tag, VIRTIO_BALLOON_S_MEMFREE);
    EXPECT_EQ(st->libvirt_tag, 4);   // VIR_DOMAIN_MEMORY_STAT_UNUSED
    EXPECT_EQ(st->value, 1000 * kPage);
    EXPECT_EQ(st->libvirt_value, 4000u);   // KiB
    ASSERT_NE(st = find_stat(s, "available"), nullptr);   // MEMTOT
    EXPECT_EQ(st->libvirt_tag, 5);
    EXPECT_EQ(st->libvirt_value, 16384u);
    ASSERT_NE(st = find_stat(s, "usable"), nullptr);      // AVAIL
    EXPECT_EQ(st->libvirt_tag, 8);
    ASSERT_NE(st = find_stat(s, "major_fault"), nullptr);
    EXPECT_EQ(st->libvirt_value, 7u);
    ASSERT_NE(st = find_stat(s, "disk_caches"), nullptr);
    EXPECT_EQ(st->libvirt_tag, 10);
    ASSERT_NE(st = find_stat(s, "hugetlb_pgalloc"), nullptr);
    EXPECT_EQ(st->libvirt_tag, 11);
    EXPECT_EQ(st->libvirt_value, 3u);
    ASSERT_NE(st = find_stat(s, "hugetlb_pgfail"), nullptr);
    EXPECT_EQ(st->libvirt_tag, 12);
    ASSERT_NE(st = find_stat(s, "swap_in"), nullptr);
    EXPECT_EQ(st->libvirt_value, 8u);
    EXPECT_EQ(find_stat(s, "swap_out"), nullptr);   // not sent

    // The host asks for fresh values: the buffer comes back used, with an interrupt.
    rig.tr.clear_irqs();
    ASSERT_TRUE(rig.dev.request_stats());
    EXPECT_TRUE(rig.dev.stats().request_pending);
    EXPECT_FALSE(rig.dev.request_stats());   // nothing to send until the driver answers
    ASSERT_TRUE(rig.dev.settle());           // the loop hands the buffer back
    std::uint32_t id = 0, len = 1;
    ASSERT_TRUE(rig.rings[2].take_used(id, len));
    EXPECT_EQ(id, head);
    EXPECT_EQ(len, 0u);
    EXPECT_EQ(rig.tr.queue_irqs(), std::vector<std::uint16_t>{2});

    // The driver refills the same buffer and re-adds it.
    bytes = stats_bytes({{VIRTIO_BALLOON_S_MEMFREE, 500 * kPage}, {VIRTIO_BALLOON_S_SWAP_OUT, 4096}});
    ASSERT_TRUE(rig.mem.write(Gpa(buf), bytes.data(), bytes.size()));
    rig.rings[2].add_chain({{buf, static_cast<std::uint32_t>(bytes.size())}});
    rig.kick(2);
    s = rig.dev.stats();
    EXPECT_EQ(s.samples, 2u);
    EXPECT_FALSE(s.request_pending);
    ASSERT_EQ(s.values.size(), 2u);   // a sample replaces the previous one
    EXPECT_EQ(find_stat(s, "unused")->libvirt_value, 2000u);
    EXPECT_EQ(find_stat(s, "swap_out")->value, 4096u);
    EXPECT_EQ(find_stat(s, "available"), nullptr);
    EXPECT_TRUE(rig.dev.request_stats());
}

TEST(BalloonDevice, StatsBufferPrimedBeforeDriverOk) {
    // Linux's init_vqs adds and kicks the first stats buffer before
    // virtio_device_ready(); the transport drops that kick.
    Rig rig(Backing::off,
            virtio_bit(VIRTIO_BALLOON_F_STATS_VQ) | virtio_bit(VIRTIO_BALLOON_F_REPORTING), false);
    auto bytes = stats_bytes({{VIRTIO_BALLOON_S_MEMTOT, 16 << 20}});
    const std::uint64_t buf = rig.alloc(bytes.size());
    ASSERT_TRUE(rig.mem.write(Gpa(buf), bytes.data(), bytes.size()));
    const std::uint16_t head = rig.rings[2].add_chain({{buf, static_cast<std::uint32_t>(bytes.size())}});
    EXPECT_FALSE(rig.dev.stats().valid);
    rig.activate();
    const BalloonStats s = rig.dev.stats();
    ASSERT_TRUE(s.valid);
    ASSERT_NE(find_stat(s, "available"), nullptr);
    EXPECT_EQ(find_stat(s, "available")->libvirt_value, 16384u);
    ASSERT_TRUE(rig.dev.request_stats());
    ASSERT_TRUE(rig.dev.settle());
    std::uint32_t id = 0, len = 1;
    ASSERT_TRUE(rig.rings[2].take_used(id, len));
    EXPECT_EQ(id, head);
}

TEST(BalloonDevice, SecondStatsBufferReturnsTheFirst) {
    Rig rig(Backing::off);
    auto bytes = stats_bytes({{VIRTIO_BALLOON_S_MEMFREE, 1}, {VIRTIO_BALLOON_S_MEMTOT, 2}});
    const std::uint64_t a = rig.alloc(bytes.size()), b = rig.alloc(bytes.size() + 3);
    ASSERT_TRUE(rig.mem.write(Gpa(a), bytes.data(), bytes.size()));
    ASSERT_TRUE(rig.mem.write(Gpa(b), bytes.data(), bytes.size()));
    const std::uint16_t h1 = rig.rings[2].add_chain({{a, static_cast<std::uint32_t>(bytes.size())}});
    rig.kick(2);
    const std::uint16_t h2 = rig.rings[2].add_chain({{b, static_cast<std::uint32_t>(bytes.size() + 3)}});
    rig.kick(2);
    std::uint32_t id = 0, len = 0;
    ASSERT_TRUE(rig.rings[2].take_used(id, len));
    EXPECT_EQ(id, h1);
    EXPECT_EQ(rig.dev.counters().odd_buffers, 1u);
    ASSERT_TRUE(rig.dev.request_stats());
    ASSERT_TRUE(rig.dev.settle());
    ASSERT_TRUE(rig.rings[2].take_used(id, len));
    EXPECT_EQ(id, h2);
    EXPECT_EQ(rig.dev.stats().samples, 2u);
    // After reset the buffer is gone and stats keep their last values.
    rig.rings[2].add_chain({{a, static_cast<std::uint32_t>(bytes.size())}});
    rig.kick(2);
    rig.dev.reset();
    EXPECT_FALSE(rig.dev.request_stats());
    EXPECT_TRUE(rig.dev.stats().valid);
}

TEST(BalloonDevice, FreePageReporting) {
    {
        Rig rig(Backing::thp);
        const std::uint64_t r4 = 4 * kRegion, r5 = 5 * kRegion;
        rig.touch(r4, 2 * kRegion, 0x44);
        // A 2 MiB block (Linux reports pageblock_order = 2 MiB): released.
        const std::uint16_t head = rig.rings[3].add_chain({{r4, static_cast<std::uint32_t>(kRegion), true}});
        rig.kick(3);
        std::uint32_t id = 0, len = 1;
        ASSERT_TRUE(rig.rings[3].take_used(id, len));
        EXPECT_EQ(id, head);
        EXPECT_EQ(len, 0u);
        EXPECT_EQ(rig.mem.resident_bytes(Gpa(r4), kRegion), 0u);
        // A 4 KiB block with THP backing: kept (no huge page is split).
        rig.rings[3].add_chain({{r5 + kPage, static_cast<std::uint32_t>(kPage), true}});
        rig.kick(3);
        ASSERT_TRUE(rig.rings[3].take_used(id, len));
        EXPECT_EQ(rig.mem.resident_bytes(Gpa(r5), kRegion), kRegion);
        EXPECT_TRUE(rig.all_bytes(r5, kRegion, 0x44));
        BalloonCounters c = rig.dev.counters();
        EXPECT_EQ(c.report_buffers, 2u);
        EXPECT_EQ(c.tracker.reported_bytes, kRegion);
        EXPECT_EQ(c.tracker.reported_kept_bytes, kPage);
        EXPECT_EQ(c.tracker.inflated_pages, 0u);   // reported pages are not ballooned
        EXPECT_FALSE(rig.dev.page_inflated(r4 / kPage));
        // The guest may use reported pages right away.
        ASSERT_TRUE(rig.mem.write_obj<std::uint64_t>(Gpa(r4), 99));
        EXPECT_EQ(rig.mem.read_obj<std::uint64_t>(Gpa(r4)), 99u);
    }
    {
        Rig rig(Backing::off);
        const std::uint64_t r4 = 4 * kRegion;
        rig.touch(r4, 4 * kPage, 0x44);
        // Several ranges in one chain; readable buffers are ignored.
        rig.rings[3].add_chain({{0x100000, 16}, {r4 + kPage, static_cast<std::uint32_t>(kPage), true},
                          {r4 + 3 * kPage, static_cast<std::uint32_t>(kPage), true}});
        rig.kick(3);
        EXPECT_EQ(rig.mem.resident_bytes(Gpa(r4), 4 * kPage), 2 * kPage);
        EXPECT_TRUE(rig.all_bytes(r4, kPage, 0x44));
        EXPECT_TRUE(rig.all_bytes(r4 + kPage, kPage, 0));
        EXPECT_EQ(rig.dev.counters().tracker.reported_bytes, 2 * kPage);
    }
}

TEST(BalloonDevice, ConfigSpaceTargetAndActual) {
    Rig rig(Backing::off);
    rig.dev.set_target_pages(1234);
    EXPECT_EQ(rig.tr.config_calls, 1);
    EXPECT_EQ(rig.dev.target_pages(), 1234u);
    std::uint8_t b[16] = {};
    rig.dev.read_config(0, std::span(b, 16));
    std::uint32_t v = 0;
    std::memcpy(&v, b, 4);
    EXPECT_EQ(v, 1234u);
    for (int i = 4; i < 16; ++i) EXPECT_EQ(b[i], 0) << i;
    std::uint8_t two[2] = {};
    rig.dev.read_config(1, std::span(two, 2));
    EXPECT_EQ(two[0], 1234 >> 8);

    // The driver reports progress in `actual` (4-byte write, then byte-wise).
    const std::uint32_t actual = 1000;
    rig.dev.write_config(4, std::span(reinterpret_cast<const std::uint8_t*>(&actual), 4));
    EXPECT_EQ(rig.dev.actual_pages(), 1000u);
    const std::uint8_t hi = 0x01;
    rig.dev.write_config(6, std::span(&hi, 1));
    EXPECT_EQ(rig.dev.actual_pages(), 1000u + 0x10000);
    // num_pages and the reserved fields are read-only for the driver.
    const std::uint32_t junk = 0xffffffff;
    rig.dev.write_config(0, std::span(reinterpret_cast<const std::uint8_t*>(&junk), 4));
    rig.dev.write_config(8, std::span(reinterpret_cast<const std::uint8_t*>(&junk), 4));
    rig.dev.write_config(12, std::span(reinterpret_cast<const std::uint8_t*>(&junk), 4));
    EXPECT_EQ(rig.dev.target_pages(), 1234u);
    rig.dev.read_config(0, std::span(b, 16));
    std::memcpy(&v, b + 4, 4);
    EXPECT_EQ(v, 1000u + 0x10000);
    std::memcpy(&v, b + 8, 4);
    EXPECT_EQ(v, 0u);
    EXPECT_EQ(rig.tr.config_calls, 1);

    rig.dev.set_target_pages(0);
    EXPECT_EQ(rig.tr.config_calls, 2);
    // Reset: `actual` goes back to 0, the target stays.
    rig.dev.reset();
    EXPECT_EQ(rig.dev.actual_pages(), 0u);
    EXPECT_EQ(rig.dev.target_pages(), 0u);
}

TEST(BalloonDevice, ResetKeepsTheTracker) {
    Rig rig(Backing::off);
    rig.send_pfns(0, pfns_of(3 * kRegion, 10));
    rig.dev.reset();
    EXPECT_EQ(rig.dev.counters().tracker.inflated_pages, 10u);
    EXPECT_TRUE(rig.dev.page_inflated(3 * kRegion / kPage));
    rig.kick(0);   // inactive: ignored
    // The driver comes back (fresh rings) and deflates what it had inflated.
    rig.lay_out_rings();
    rig.activate();
    rig.send_pfns(1, pfns_of(3 * kRegion, 10));
    EXPECT_EQ(rig.dev.counters().tracker.inflated_pages, 0u);
    EXPECT_EQ(rig.dev.counters().tracker.stray_deflates, 0u);
    EXPECT_EQ(rig.dev.counters().tracker.bytes_discarded, 10 * kPage);
}

// The driver's first stats buffer (5.5.6.3), on the stats queue, kicked.
void post_stats_buffer(Rig& rig) {
    auto bytes = stats_bytes({{VIRTIO_BALLOON_S_MEMFREE, 1}});
    const std::uint64_t sbuf = rig.alloc(bytes.size());
    ASSERT_TRUE(rig.mem.write(Gpa(sbuf), bytes.data(), bytes.size()));
    rig.rings[2].add_chain({{sbuf, static_cast<std::uint32_t>(bytes.size())}});
    rig.kick(2);
}

TEST(BalloonDevice, ApiThreadRacesVcpuKicks) {
    Rig rig(Backing::off);
    ASSERT_NO_FATAL_FAILURE(post_stats_buffer(rig));
    std::atomic<bool> stop{false};
    std::thread api([&] {
        std::uint32_t t = 0;
        while (!stop.load()) {
            rig.dev.set_target_pages(++t);
            (void)rig.dev.stats();
            (void)rig.dev.counters();
            (void)rig.dev.actual_pages();
        }
    });
    const auto pfns = pfns_of(2 * kRegion, 256);
    const Buf b = rig.pfn_buf(pfns);
    for (int i = 0; i < 200; ++i) {
        rig.rings[i % 2].add_chain({b});
        rig.kick(static_cast<std::uint16_t>(i % 2));
    }
    stop = true;
    api.join();
    EXPECT_EQ(rig.dev.counters().tracker.inflated_pages, 0u);
    EXPECT_EQ(rig.dev.counters().inflate_buffers, 100u);
    EXPECT_EQ(rig.tr.needs_reset_calls, 0);
}

TEST(BalloonDevice, ApiAnswersWhileGuestRepublishesAnInflateBufferForever) {
    // A feeder thread (the guest) republishes one inflate descriptor of
    // kMaxPfnsPerChain PFNs as fast as the device uses it. The calls the
    // control API makes for vm.info (target_pages, actual_pages),
    // vm.counters (request_stats, counters, stats) and vm.resize
    // (set_target_pages) never wait on the loop: each answers within 50 ms.
    Rig rig(Backing::off);
    ASSERT_NO_FATAL_FAILURE(post_stats_buffer(rig));
    const Buf b = rig.pfn_buf(pfns_of(2 * kRegion, VirtioBalloon::kMaxPfnsPerChain));
    Ring& ring = rig.rings[0];
    const std::uint16_t head = ring.add_chain({b});
    rig.dev.queue_notify(0);
    std::atomic<bool> stop{false};
    std::thread guest([&] {
        while (!stop.load()) {
            if (static_cast<std::uint16_t>(ring.avail_idx() - ring.used_idx()) < kRingSize) {
                ring.publish(head);
                rig.dev.queue_notify(0);
            } else {
                std::this_thread::yield();
            }
        }
    });
    ASSERT_TRUE(fake::wait_until([&] { return rig.dev.counters().inflate_buffers > 2 * kRingSize; }));
    const std::uint64_t before = rig.dev.counters().inflate_buffers;
    std::chrono::milliseconds info{0}, counters{0}, resize{0};
    for (int i = 0; i < 100; ++i) {
        info = std::max(info, fake::Stopwatch::time([&] {
                            (void)rig.dev.target_pages();
                            (void)rig.dev.actual_pages();
                        }));
        counters = std::max(counters, fake::Stopwatch::time([&] {
                                (void)rig.dev.request_stats();
                                (void)rig.dev.counters();
                                (void)rig.dev.stats();
                            }));
        resize = std::max(resize, fake::Stopwatch::time([&] { rig.dev.set_target_pages(static_cast<std::uint32_t>(i)); }));
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    const std::uint64_t during = rig.dev.counters().inflate_buffers;
    stop = true;
    guest.join();
    EXPECT_LT(info.count(), 50);
    EXPECT_LT(counters.count(), 50);
    EXPECT_LT(resize.count(), 50);
    EXPECT_GT(during, before);   // the loop kept working meanwhile
    EXPECT_EQ(rig.tr.needs_reset_calls, 0);
    const auto took = fake::Stopwatch::time([&] { rig.dev.reset(); });
    EXPECT_LT(took.count(), 1000);
}

TEST(BalloonDevice, NoQueueWorkWithoutDma) {
    // Bus mastering off (dma_enabled() false): an inflate buffer is not
    // taken, nor is the stats buffer handed back; once DMA is back and the
    // transport kicks every queue, both happen.
    Rig rig(Backing::off);
    ASSERT_NO_FATAL_FAILURE(post_stats_buffer(rig));
    rig.tr.dma = false;
    rig.rings[0].add_chain({rig.pfn_buf(pfns_of(2 * kRegion, 16))});
    rig.kick(0);
    EXPECT_TRUE(rig.dev.request_stats());
    EXPECT_TRUE(rig.dev.settle());
    EXPECT_EQ(rig.rings[0].used_idx(), 0);
    EXPECT_EQ(rig.rings[2].used_idx(), 0);
    EXPECT_EQ(rig.dev.counters().inflate_buffers, 0u);
    rig.tr.dma = true;
    for (std::uint16_t q = 0; q < rig.dev.num_queues(); ++q) rig.kick(q);
    EXPECT_EQ(rig.rings[0].used_idx(), 1);
    EXPECT_EQ(rig.rings[2].used_idx(), 1);
    EXPECT_EQ(rig.dev.counters().inflate_buffers, 1u);
}

TEST(BalloonDevice, FuzzHostileRingsNeverCrash) {
    std::mt19937_64 rng(0xba11007);
    std::uint64_t buffers = 0, bad_chains = 0;
    for (int round = 0; round < 40; ++round) {
        Rig rig(round % 2 == 0 ? Backing::off : Backing::thp);
        for (int step = 0; step < 60; ++step) {
            const std::uint16_t q = static_cast<std::uint16_t>(rng() % 6);
            Ring& ring = rig.rings[q % rig.rings.size()];
            const unsigned what = rng() % 20;
            if (what < 3) {   // random descriptors, mostly plausible flags
                for (int i = 0; i < 4; ++i) {
                    const std::uint64_t addr = rng() % 4 != 0 ? rng() % (rig.mem.size() + 0x10000) : rng();
                    const std::uint16_t flags = static_cast<std::uint16_t>(rng() % 5 == 0 ? rng() % 8 : rng() % 4);
                    ring.set_desc(static_cast<std::uint16_t>(rng() % kRingSize),
                                  {addr, static_cast<std::uint32_t>(rng() % 0x3000), flags,
                                   static_cast<std::uint16_t>(rng() % 70)});
                }
                ring.publish(static_cast<std::uint16_t>(rng() % 70));
            } else if (what < 15) {   // well-formed chains of random PFNs / ranges
                const std::uint64_t a = 0x100000 + (rng() % 0x1000) * 16;
                for (int i = 0; i < 64; ++i) {
                    const std::uint32_t v = rng() % 3 == 0 ? static_cast<std::uint32_t>(rng())
                                                           : static_cast<std::uint32_t>(0x200 + rng() % 0xe00);
                    rig.mem.write_obj(Gpa(a + 4 * i), v);
                }
                const std::uint64_t b = rng() % 2 == 0 ? a : 0x200000 + (rng() % 0xe00) * kPage;
                ring.add_chain({{b, static_cast<std::uint32_t>(rng() % 257), rng() % 2 == 0}});
            } else if (what == 15) {   // a random avail index (hostile driver)
                rig.mem.write_obj<std::uint16_t>(Gpa(ring.avail() + 2), static_cast<std::uint16_t>(rng()));
            } else {
                if (rng() % 2 == 0) (void)rig.dev.request_stats();
                if (rng() % 3 == 0) rig.dev.set_target_pages(static_cast<std::uint32_t>(rng()));
            }
            rig.kick(q);
        }
        const BalloonCounters c = rig.dev.counters();
        EXPECT_LE(c.tracker.inflated_pages, rig.mem.size() / kPage);
        buffers += c.inflate_buffers + c.deflate_buffers + c.report_buffers;
        bad_chains += c.bad_chains;
    }
    // The run reached both the processing paths and the error paths.
    EXPECT_GT(buffers, 100u);
    EXPECT_GT(bad_chains, 5u);
}

} // namespace
} // namespace kguest
