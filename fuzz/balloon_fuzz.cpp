// libFuzzer target: the virtio-balloon device (balloon/, VIRTIO 1.2 section
// 5.5) on its event loop, driven by the fake driver of the unit tests
// (tests/support/fake_virtio.hpp) over five real split rings in a 16 MiB
// guest. Each input makes a fresh device with the features it picks, then
// plays a script: inflate and deflate chains of PFNs (mostly inside RAM,
// sometimes anywhere), stats buffers with any tags, free page reports of any
// range, raw hostile descriptors, kicks (each waits for the loop to settle),
// host calls (target, stats request, counters), config-space accesses and
// device resets. Nothing may crash, hit UB, race (the loop thread against
// the host calls, under ASan) or hang (libFuzzer's -timeout).
// Threads: libFuzzer's one thread plus the device's loop thread.
#include "balloon/balloon.hpp"

#include "tests/support/fake_virtio.hpp"

#include <array>
#include <cstdint>
#include <cstring>
#include <fuzzer/FuzzedDataProvider.h>
#include <vector>

using namespace kguest;

namespace {

constexpr std::uint16_t kRing = 64;
constexpr std::uint64_t kRam = 16 << 20;

GuestMemory& memory() {
    static GuestMemory mem(kRam, Backing::off);
    return mem;
}

// A buffer's bytes: PFNs (le32), stats entries (le16 tag, le64 value) or raw.
std::vector<std::uint8_t> payload(FuzzedDataProvider& in) {
    std::vector<std::uint8_t> b;
    const int n = in.ConsumeIntegralInRange<int>(0, 64);
    switch (in.ConsumeIntegralInRange<int>(0, 2)) {
    case 0:
        for (int i = 0; i < n; ++i) {
            std::uint32_t pfn = in.ConsumeBool() ? in.ConsumeIntegralInRange<std::uint32_t>(0, kRam / 4096 + 8)
                                                 : in.ConsumeIntegral<std::uint32_t>();
            b.insert(b.end(), reinterpret_cast<std::uint8_t*>(&pfn), reinterpret_cast<std::uint8_t*>(&pfn) + 4);
        }
        break;
    case 1:
        for (int i = 0; i < n; ++i) {
            const std::uint16_t tag = in.ConsumeIntegralInRange<std::uint16_t>(0, 12);
            const std::uint64_t v = in.ConsumeIntegral<std::uint64_t>();
            b.insert(b.end(), reinterpret_cast<const std::uint8_t*>(&tag), reinterpret_cast<const std::uint8_t*>(&tag) + 2);
            b.insert(b.end(), reinterpret_cast<const std::uint8_t*>(&v), reinterpret_cast<const std::uint8_t*>(&v) + 8);
        }
        break;
    default:
        b = in.ConsumeBytes<std::uint8_t>(in.ConsumeIntegralInRange<std::size_t>(0, 1024));
        break;
    }
    return b;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider in(data, size);
    GuestMemory& mem = memory();
    BalloonOptions opt;
    opt.stats = in.ConsumeBool();
    opt.deflate_on_oom = in.ConsumeBool();
    opt.reporting = in.ConsumeBool();
    fake::Transport tr;
    VirtioBalloon dev(mem, opt);
    dev.attach(&tr);
    // The driver accepts any subset of what is offered.
    tr.features = (dev.device_features() & in.ConsumeIntegral<std::uint64_t>()) | virtio_bit(VIRTIO_F_VERSION_1);

    std::vector<Virtqueue> vqs;
    vqs.reserve(dev.num_queues());
    for (std::uint16_t q = 0; q < dev.num_queues(); ++q) vqs.emplace_back(mem);
    std::vector<fake::Driver> rings;
    auto lay_out = [&] {
        rings.clear();
        for (std::uint16_t q = 0; q < dev.num_queues(); ++q) {
            vqs[q].reset();
            rings.emplace_back(mem, kRing, 0x10000 + q * 0x2000ull, 0x100000 + q * 0x40000ull);
            if (!rings.back().configure(vqs[q])) __builtin_trap();
        }
    };
    lay_out();
    dev.activate(vqs, mem);

    for (int step = 0; step < 256 && in.remaining_bytes() > 0; ++step) {
        const auto q = in.ConsumeIntegralInRange<std::uint16_t>(0, dev.num_queues() - 1);
        fake::Driver& ring = rings[q];
        switch (in.ConsumeIntegralInRange<int>(0, 9)) {
        case 0:
        case 1: {   // a chain of 1..3 buffers the driver fills, readable or writable
            std::vector<fake::Buf> bufs;
            const int n = in.ConsumeIntegralInRange<int>(1, 3);
            for (int i = 0; i < n; ++i) {
                const std::vector<std::uint8_t> bytes = payload(in);
                const std::uint64_t a = ring.alloc_bytes(bytes.empty() ? std::vector<std::uint8_t>(1) : bytes);
                bufs.push_back({a, static_cast<std::uint32_t>(bytes.size()), in.ConsumeBool()});
            }
            ring.add_chain(bufs);
            break;
        }
        case 2: {   // a free page report: one writable range anywhere
            const std::uint64_t a = in.ConsumeBool() ? 4096 * in.ConsumeIntegralInRange<std::uint64_t>(0, kRam / 4096)
                                                     : in.ConsumeIntegral<std::uint64_t>();
            ring.add_chain({{a, in.ConsumeIntegral<std::uint32_t>(), true}});
            break;
        }
        case 3: {   // a raw descriptor, maybe published as a head
            const auto i = in.ConsumeIntegralInRange<std::uint16_t>(0, kRing - 1);
            ring.set_desc(i, in.ConsumeIntegral<std::uint64_t>(), in.ConsumeIntegral<std::uint32_t>(),
                          in.ConsumeIntegral<std::uint16_t>(), in.ConsumeIntegral<std::uint16_t>());
            if (in.ConsumeBool()) ring.publish(i);
            break;
        }
        case 4:
        case 5:
            dev.queue_notify(q);
            if (!dev.settle()) __builtin_trap();
            break;
        case 6: {   // the driver takes what the device used
            std::uint32_t id = 0, len = 0;
            while (ring.take_used(id, len)) {
            }
            break;
        }
        case 7:   // the host side, as the API thread calls it
            switch (in.ConsumeIntegralInRange<int>(0, 3)) {
            case 0: dev.set_target_pages(in.ConsumeIntegral<std::uint32_t>()); break;
            case 1: (void)dev.request_stats(); break;
            case 2: (void)dev.stats(); break;
            default: (void)dev.counters(); break;
            }
            break;
        case 8: {   // configuration space, any offset and size
            std::array<std::uint8_t, 16> b{};
            const auto off = in.ConsumeIntegralInRange<std::uint64_t>(0, VirtioBalloon::kConfigSize - 1);
            const auto n = in.ConsumeIntegralInRange<std::size_t>(1, VirtioBalloon::kConfigSize - off);
            if (in.ConsumeBool()) dev.read_config(off, std::span<std::uint8_t>(b.data(), n));
            else dev.write_config(off, std::span<const std::uint8_t>(b.data(), n));
            break;
        }
        default:   // device reset, then the driver sets everything up again
            dev.reset();
            lay_out();
            dev.activate(vqs, mem);
            break;
        }
    }
    dev.reset();
    return 0;
}
