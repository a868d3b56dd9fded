// decode_exit/handle_exit on made-up kvm_run pages: port I/O (with rep
// batches), MMIO, unclaimed reads, malformed I/O fields, and the exit reasons
// that halt or stop the VM. Then the exit statistics: ExitCounter fed those
// pages, and parse_kvm_stats on a made-up KVM_GET_STATS_FD file.
#include "vmm/exit.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <gtest/gtest.h>
#include <map>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

namespace kguest {
namespace {

constexpr std::size_t kPage = 4096;
constexpr std::uint64_t kDataOff = 2560;  // past sizeof(kvm_run), inside the page
static_assert(sizeof(kvm_run) <= kDataOff);

struct RunPage {
    alignas(4096) std::uint8_t bytes[kPage];
    kvm_run& run() { return *reinterpret_cast<kvm_run*>(bytes); }
};

std::unique_ptr<RunPage> io_page(bool out, std::uint16_t port, std::uint8_t size, std::uint32_t count,
                                 std::uint64_t data_offset = kDataOff) {
    auto p = std::make_unique<RunPage>();
    std::memset(p->bytes, 0xa5, kPage);
    kvm_run& r = p->run();
    std::memset(&r, 0, sizeof r);
    r.exit_reason = KVM_EXIT_IO;
    r.io.direction = out ? KVM_EXIT_IO_OUT : KVM_EXIT_IO_IN;
    r.io.port = port;
    r.io.size = size;
    r.io.count = count;
    r.io.data_offset = data_offset;
    return p;
}

// Records writes; each read returns the next value of a counter in every byte.
struct Recorder : BusDevice {
    std::vector<std::pair<std::uint64_t, std::vector<std::uint8_t>>> writes;
    std::vector<std::uint64_t> read_offsets;
    std::uint8_t next = 0x10;
    void read(std::uint64_t offset, std::span<std::uint8_t> data) override {
        read_offsets.push_back(offset);
        for (auto& b : data) b = next;
        ++next;
    }
    void write(std::uint64_t offset, std::span<const std::uint8_t> data) override {
        writes.push_back({offset, {data.begin(), data.end()}});
    }
};

struct Buses {
    Bus pio{"pio"}, mmio{"mmio"};
    std::shared_ptr<Recorder> port_dev = std::make_shared<Recorder>();
    std::shared_ptr<Recorder> mmio_dev = std::make_shared<Recorder>();
    Buses() {
        pio.insert(0x60, 4, port_dev);
        mmio.insert(0xd0000000, 0x1000, mmio_dev);
    }
};

TEST(Exit, IoOutRepDeliversEveryElement) {
    Buses b;
    auto p = io_page(true, 0x62, 2, 3);
    const std::uint8_t payload[6] = {0x11, 0x22, 0x33, 0x44, 0x55, 0x66};
    std::memcpy(p->bytes + kDataOff, payload, sizeof payload);
    DecodedExit e = decode_exit(p->run(), kPage);
    ASSERT_EQ(e.kind, ExitKind::io);
    EXPECT_TRUE(e.write);
    EXPECT_EQ(e.addr, 0x62u);
    EXPECT_EQ(e.size, 2u);
    EXPECT_EQ(e.count, 3u);
    EXPECT_EQ(e.data, p->bytes + kDataOff);
    ExitOutcome o = handle_exit(e, b.pio, b.mmio, 0);
    EXPECT_EQ(o.what, ExitOutcome::resume);
    ASSERT_EQ(b.port_dev->writes.size(), 3u);
    for (std::size_t i = 0; i < 3; ++i) {
        EXPECT_EQ(b.port_dev->writes[i].first, 2u);
        EXPECT_EQ(b.port_dev->writes[i].second,
                  (std::vector<std::uint8_t>{payload[2 * i], payload[2 * i + 1]}));
    }
}

TEST(Exit, IoInFillsDataFromDevice) {
    Buses b;
    auto p = io_page(false, 0x61, 1, 3);
    DecodedExit e = decode_exit(p->run(), kPage);
    ASSERT_EQ(e.kind, ExitKind::io);
    EXPECT_FALSE(e.write);
    EXPECT_EQ(handle_exit(e, b.pio, b.mmio, 0).what, ExitOutcome::resume);
    EXPECT_EQ(b.port_dev->read_offsets, (std::vector<std::uint64_t>{1, 1, 1}));
    EXPECT_EQ(p->bytes[kDataOff + 0], 0x10);
    EXPECT_EQ(p->bytes[kDataOff + 1], 0x11);
    EXPECT_EQ(p->bytes[kDataOff + 2], 0x12);
    EXPECT_EQ(p->bytes[kDataOff + 3], 0xa5);  // past the batch: untouched
}

TEST(Exit, IoDataMayEndExactlyAtThePageEnd) {
    Buses b;
    auto p = io_page(false, 0x60, 4, 2, kPage - 8);
    DecodedExit e = decode_exit(p->run(), kPage);
    ASSERT_EQ(e.kind, ExitKind::io);
    handle_exit(e, b.pio, b.mmio, 0);
    EXPECT_EQ(p->bytes[kPage - 8], 0x10);
    EXPECT_EQ(p->bytes[kPage - 1], 0x11);
}

TEST(Exit, UnclaimedInReadsAllOnes) {
    Buses b;
    auto p = io_page(false, 0x70, 2, 4);
    std::memset(p->bytes + kDataOff, 0, 8);
    DecodedExit e = decode_exit(p->run(), kPage);
    ASSERT_EQ(e.kind, ExitKind::io);
    EXPECT_EQ(handle_exit(e, b.pio, b.mmio, 0).what, ExitOutcome::resume);
    for (std::size_t i = 0; i < 8; ++i) EXPECT_EQ(p->bytes[kDataOff + i], 0xff) << i;
    EXPECT_EQ(p->bytes[kDataOff + 8], 0xa5);
    // Straddling the device's end (0x63..0x64) is unclaimed too.
    auto q = io_page(false, 0x63, 2, 2);
    std::memset(q->bytes + kDataOff, 0, 4);
    handle_exit(decode_exit(q->run(), kPage), b.pio, b.mmio, 0);
    for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(q->bytes[kDataOff + i], 0xff) << i;
    EXPECT_TRUE(b.port_dev->read_offsets.empty());
}

TEST(Exit, MalformedIoIsIgnored) {
    struct Case {
        const char* what;
        std::uint8_t size;
        std::uint32_t count;
        std::uint64_t data_offset;
    };
    const Case cases[] = {
        {"size 3", 3, 1, kDataOff},
        {"size 0", 0, 1, kDataOff},
        {"size 8", 8, 1, kDataOff},
        {"data_offset beyond the page", 1, 1, kPage + 1},
        {"data_offset far beyond", 1, 1, UINT64_MAX},
        {"batch runs off the page", 4, 25, kPage - 96},
        {"count*size past the page", 4, 0xffffffffu, kDataOff},
    };
    for (const Case& c : cases) {
        for (bool out : {false, true}) {
            Buses b;
            auto p = io_page(out, 0x60, c.size, c.count, c.data_offset);
            std::vector<std::uint8_t> before(p->bytes, p->bytes + kPage);
            DecodedExit e = decode_exit(p->run(), kPage);
            EXPECT_EQ(e.kind, ExitKind::malformed) << c.what;
            EXPECT_EQ(e.data, nullptr) << c.what;
            EXPECT_EQ(handle_exit(e, b.pio, b.mmio, 0).what, ExitOutcome::resume) << c.what;
            EXPECT_TRUE(std::equal(before.begin(), before.end(), p->bytes)) << c.what;
            EXPECT_TRUE(b.port_dev->writes.empty() && b.port_dev->read_offsets.empty()) << c.what;
        }
    }
}

TEST(Exit, MmioDispatch) {
    Buses b;
    RunPage page{};
    kvm_run& r = page.run();
    r.exit_reason = KVM_EXIT_MMIO;
    r.mmio.phys_addr = 0xd0000010;
    r.mmio.len = 4;
    r.mmio.is_write = 1;
    const std::uint8_t v[4] = {1, 2, 3, 4};
    std::memcpy(r.mmio.data, v, 4);
    DecodedExit e = decode_exit(r, kPage);
    ASSERT_EQ(e.kind, ExitKind::mmio);
    EXPECT_EQ(handle_exit(e, b.pio, b.mmio, 0).what, ExitOutcome::resume);
    ASSERT_EQ(b.mmio_dev->writes.size(), 1u);
    EXPECT_EQ(b.mmio_dev->writes[0].first, 0x10u);
    EXPECT_EQ(b.mmio_dev->writes[0].second, (std::vector<std::uint8_t>{1, 2, 3, 4}));

    r.mmio.is_write = 0;
    r.mmio.len = 8;
    r.mmio.phys_addr = 0xd0000ff8;
    handle_exit(decode_exit(r, kPage), b.pio, b.mmio, 0);
    EXPECT_EQ(b.mmio_dev->read_offsets, (std::vector<std::uint64_t>{0xff8}));
    for (std::uint8_t x : r.mmio.data) EXPECT_EQ(x, 0x10);

    r.mmio.phys_addr = 0xe0000000;  // unclaimed
    handle_exit(decode_exit(r, kPage), b.pio, b.mmio, 0);
    for (std::uint8_t x : r.mmio.data) EXPECT_EQ(x, 0xff);

    for (std::uint32_t len : {0u, 9u}) {
        r.mmio.len = len;
        EXPECT_EQ(decode_exit(r, kPage).kind, ExitKind::malformed) << len;
    }
    EXPECT_EQ(b.mmio_dev->read_offsets.size(), 1u);
}

ExitOutcome outcome_of(std::uint32_t reason, std::uint32_t event_type = 0) {
    Bus pio("pio"), mmio("mmio");
    RunPage page{};
    page.run().exit_reason = reason;
    page.run().system_event.type = event_type;
    return handle_exit(decode_exit(page.run(), kPage), pio, mmio, 0);
}

TEST(Exit, Outcomes) {
    ExitOutcome o = outcome_of(KVM_EXIT_SHUTDOWN);
    EXPECT_EQ(o.what, ExitOutcome::stop);
    EXPECT_EQ(o.status, 1);
    o = outcome_of(KVM_EXIT_SYSTEM_EVENT, KVM_SYSTEM_EVENT_SHUTDOWN);
    EXPECT_EQ(o.what, ExitOutcome::stop);
    EXPECT_EQ(o.status, 0);
    o = outcome_of(KVM_EXIT_SYSTEM_EVENT, KVM_SYSTEM_EVENT_RESET);
    EXPECT_EQ(o.what, ExitOutcome::stop);
    EXPECT_EQ(o.status, 0);
    o = outcome_of(KVM_EXIT_SYSTEM_EVENT, KVM_SYSTEM_EVENT_CRASH);
    EXPECT_EQ(o.what, ExitOutcome::stop);
    EXPECT_EQ(o.status, 1);
    EXPECT_EQ(outcome_of(KVM_EXIT_HLT).what, ExitOutcome::halt);
    EXPECT_EQ(outcome_of(KVM_EXIT_INTR).what, ExitOutcome::resume);
    EXPECT_EQ(outcome_of(KVM_EXIT_INTERNAL_ERROR).what, ExitOutcome::stop);
    EXPECT_EQ(outcome_of(KVM_EXIT_FAIL_ENTRY).what, ExitOutcome::stop);
    o = outcome_of(0xdead);
    EXPECT_EQ(o.what, ExitOutcome::stop);
    EXPECT_EQ(o.status, 1);
}

TEST(Exit, DecodeFields) {
    RunPage page{};
    kvm_run& r = page.run();
    r.exit_reason = KVM_EXIT_HLT;
    EXPECT_EQ(decode_exit(r, kPage).kind, ExitKind::hlt);
    r.exit_reason = KVM_EXIT_SHUTDOWN;
    EXPECT_EQ(decode_exit(r, kPage).kind, ExitKind::shutdown);
    r.exit_reason = KVM_EXIT_SYSTEM_EVENT;
    r.system_event.type = KVM_SYSTEM_EVENT_CRASH;
    DecodedExit e = decode_exit(r, kPage);
    EXPECT_EQ(e.kind, ExitKind::system_event);
    EXPECT_EQ(e.detail, std::uint64_t(KVM_SYSTEM_EVENT_CRASH));
    r.exit_reason = 0xdead;
    e = decode_exit(r, kPage);
    EXPECT_EQ(e.kind, ExitKind::unknown);
    EXPECT_EQ(e.reason, 0xdeadu);
}

// Userspace exits by reason: a device by the name it was inserted with (or
// the bus's default), each unclaimed port on its own, unclaimed MMIO and the
// other kinds by theirs; summed over vCPUs, most frequent first.
TEST(Exit, CounterNamesReasonsAndSumsVcpus) {
    using namespace std::chrono_literals;
    Bus pio("PIO"), mmio("MMIO");
    auto dev = std::make_shared<Recorder>();
    pio.insert(0x3f8, 8, dev, "serial COM1");
    pio.insert(0x60, 1, dev);
    mmio.insert(0xc0000000, 0x1000, dev, "virtio-net 00:01.0");
    std::deque<ExitCounter> vcpus(2);
    // Handling times in ticks; sum() below turns them into ns at 2 ns a tick.
    auto take = [&](ExitCounter& c, kvm_run& r, std::chrono::nanoseconds ns) {
        DecodedExit e = decode_exit(r, kPage);
        c.record(e, handle_exit(e, pio, mmio, 0), static_cast<std::uint64_t>(ns.count()));
    };
    for (int i = 0; i < 4; ++i) take(vcpus[i % 2], io_page(true, 0x3fd, 1, 1)->run(), 100ns);
    take(vcpus[1], io_page(true, 0x3f8, 1, 16)->run(), 1000ns);   // a rep batch is one exit
    for (int i = 0; i < 3; ++i) take(vcpus[0], io_page(false, 0x70, 1, 1)->run(), 10ns);
    take(vcpus[1], io_page(false, 0x71, 2, 1)->run(), 10ns);
    take(vcpus[1], io_page(false, 0x60, 1, 1)->run(), 10ns);
    RunPage page{};
    kvm_run& r = page.run();
    r.exit_reason = KVM_EXIT_MMIO;
    r.mmio.len = 4;
    r.mmio.phys_addr = 0xc0000010;
    take(vcpus[0], r, 50ns);
    take(vcpus[1], r, 50ns);
    r.mmio.phys_addr = 0xd0000000;
    take(vcpus[1], r, 5ns);
    const std::uint32_t reasons[] = {KVM_EXIT_SHUTDOWN, KVM_EXIT_INTR, 0xdead};
    for (std::uint32_t reason : reasons) {
        r.exit_reason = reason;
        take(vcpus[0], r, 1ns);
    }

    const std::vector<ExitCount> sum = ExitCounter::sum(vcpus, pio, mmio, 2.0);
    std::map<std::string, std::pair<std::uint64_t, std::uint64_t>> got;
    for (const ExitCount& x : sum) got[x.reason] = {x.count, x.handling_ns};
    const std::map<std::string, std::pair<std::uint64_t, std::uint64_t>> want = {
        {"serial COM1", {5, 2800}},   {"unclaimed port 0x70", {3, 60}}, {"virtio-net 00:01.0", {2, 200}},
        {"unclaimed port 0x71", {1, 20}}, {"PIO 0x60", {1, 20}},    {"unclaimed MMIO", {1, 10}},
        {"shutdown", {1, 2}},         {"intr", {1, 2}},                 {"exit reason 57005", {1, 2}}};
    EXPECT_EQ(got, want);
    ASSERT_EQ(sum.size(), want.size());
    for (std::size_t i = 1; i < sum.size(); ++i) EXPECT_GE(sum[i - 1].count, sum[i].count) << i;
    EXPECT_EQ(sum[0].reason, "serial COM1");
    EXPECT_EQ(sum[1].reason, "unclaimed port 0x70");

    // A range moved (a PCI BAR) keeps its name, so its counts go on.
    ASSERT_TRUE(mmio.remove(0xc0000000));
    mmio.insert(0xc1000000, 0x1000, dev, "virtio-net 00:01.0");
    r.exit_reason = KVM_EXIT_MMIO;
    r.mmio.phys_addr = 0xc1000000;
    take(vcpus[0], r, 50ns);
    std::uint64_t bar_exits = 0;
    for (const ExitCount& x : ExitCounter::sum(vcpus, pio, mmio, 1.0))
        if (x.reason == "virtio-net 00:01.0") bar_exits = x.count;
    EXPECT_EQ(bar_exits, 3u);
    EXPECT_TRUE(ExitCounter::sum(std::deque<ExitCounter>(3), pio, mmio, 1.0).empty());
}

// A made-up KVM_GET_STATS_FD file: header, id string, descriptors each
// followed by its name (48 bytes), then the data block.
struct FakeStat {
    std::string name;
    std::uint32_t flags;
    std::uint16_t size;   // u64 items
    std::uint64_t value;  // every item
};
std::vector<std::uint8_t> stats_file(const std::vector<FakeStat>& stats) {
    constexpr std::uint32_t kName = 48, kDesc = offsetof(kvm_stats_desc, name) + kName;
    kvm_stats_header h{};
    h.name_size = kName;
    h.num_desc = static_cast<std::uint32_t>(stats.size());
    h.id_offset = sizeof h;
    h.desc_offset = h.id_offset + kName;
    h.data_offset = h.desc_offset + h.num_desc * kDesc;
    std::vector<std::uint8_t> f(h.data_offset);
    std::memcpy(f.data(), &h, sizeof h);
    std::memcpy(f.data() + h.id_offset, "kvm-42/vcpu-0", 13);
    std::uint32_t offset = 0;
    for (std::size_t i = 0; i < stats.size(); ++i) {
        kvm_stats_desc d{};
        d.flags = stats[i].flags;
        d.size = stats[i].size;
        d.offset = offset;
        std::uint8_t* at = f.data() + h.desc_offset + i * kDesc;
        std::memcpy(at, &d, offsetof(kvm_stats_desc, name));
        const std::string& name = stats[i].name;
        std::memcpy(at + offsetof(kvm_stats_desc, name), name.data(), std::min<std::size_t>(kName, name.size()));
        for (unsigned k = 0; k < d.size; ++k) {
            f.resize(f.size() + 8);
            std::memcpy(f.data() + h.data_offset + offset + 8 * k, &stats[i].value, 8);
        }
        offset += 8u * d.size;
    }
    return f;
}

// Only cumulative single counters, by their KVM names in KVM's order; a name
// that fills its whole field still reads right; a file cut anywhere throws.
TEST(Exit, KvmStatsParserTakesCumulativeCounters) {
    const std::string long_name(48, 'n');
    const auto f = stats_file({
        {"exits", KVM_STATS_TYPE_CUMULATIVE | KVM_STATS_UNIT_NONE, 1, 1234},
        {"blocking", KVM_STATS_TYPE_INSTANT | KVM_STATS_UNIT_BOOLEAN, 1, 1},
        {"halt_wait_hist", KVM_STATS_TYPE_LOG_HIST | KVM_STATS_UNIT_SECONDS, 4, 9},
        {"halt_exits", KVM_STATS_TYPE_CUMULATIVE, 1, 56},
        {"max_mmu_page_hash_collisions", KVM_STATS_TYPE_PEAK, 1, 3},
        {long_name, KVM_STATS_TYPE_CUMULATIVE, 1, 7},
        {"halt_poll_success_ns", KVM_STATS_TYPE_CUMULATIVE | KVM_STATS_UNIT_SECONDS, 1, 789},
    });
    const std::vector<KvmStat> got = parse_kvm_stats(f);
    std::vector<std::pair<std::string, std::uint64_t>> pairs;
    for (const KvmStat& st : got) pairs.emplace_back(st.name, st.value);
    EXPECT_EQ(pairs, (std::vector<std::pair<std::string, std::uint64_t>>{
                         {"exits", 1234}, {"halt_exits", 56}, {long_name, 7}, {"halt_poll_success_ns", 789}}));
    for (std::size_t n = 0; n < f.size(); n += 5)
        EXPECT_THROW(parse_kvm_stats({f.data(), n}), std::runtime_error) << n;
    EXPECT_THROW(parse_kvm_stats({f.data(), f.size() - 1}), std::runtime_error);
    EXPECT_TRUE(parse_kvm_stats(stats_file({})).empty());

    // Two vCPUs summed by name; a counter only one of them has goes last.
    std::vector<KvmStat> sum;
    add_kvm_stats(sum, got);
    add_kvm_stats(sum, {{"halt_exits", 4}, {"hypercalls", 2}, {"exits", 6}});
    ASSERT_EQ(sum.size(), 5u);
    EXPECT_EQ(sum[0].value, 1240u);
    EXPECT_EQ(sum[1].value, 60u);
    EXPECT_EQ(sum[4].name, "hypercalls");
    EXPECT_EQ(sum[4].value, 2u);
}

} // namespace
} // namespace kguest
