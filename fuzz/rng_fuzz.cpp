// libFuzzer target: the virtio-rng device (devices/virtio_rng.*, VIRTIO 1.2
// section 5.4) on its event loop, driven by the fake driver of the unit tests
// (tests/support/fake_virtio.hpp) on its one requestq, in a fresh 16 MiB guest
// per input, reading a 4 KiB temporary file (so a source may run dry) or
// /dev/urandom, with or without a small rate limit. Each input plays a
// script: chains of any shape (writable buffers of any length and number,
// readable ones the spec forbids, indirect), raw hostile descriptors, kicks,
// the driver taking used elements, Bus Master Enable off and on, counters
// and config reads, and device resets. Nothing may crash, hit UB or hang
// (libFuzzer's -timeout); a used element never claims more bytes than its
// chain could hold. Threads: libFuzzer's one thread plus the device's loop.
#include "devices/virtio_rng.hpp"

#include "tests/support/fake_virtio.hpp"

#include <array>
#include <cstdint>
#include <cstdlib>
#include <fcntl.h>
#include <fuzzer/FuzzedDataProvider.h>
#include <map>
#include <optional>
#include <unistd.h>
#include <vector>

using namespace kguest;

namespace {

constexpr std::uint16_t kRing = 64;
constexpr std::uint64_t kRam = 16ull << 20;

Fd source(bool file) {
    if (!file) return Fd(::open("/dev/urandom", O_RDONLY | O_CLOEXEC));
    char path[] = "/tmp/kguest-rng-fuzz-XXXXXX";
    const int fd = ::mkstemp(path);
    if (fd < 0) __builtin_trap();
    ::unlink(path);
    std::array<std::uint8_t, 4096> bytes{};
    for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::uint8_t>(i * 131 + 7);
    if (::write(fd, bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size()) || ::lseek(fd, 0, SEEK_SET) != 0)
        __builtin_trap();
    return Fd(fd);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider in(data, size);
    GuestMemory mem(kRam, Backing::off);
    fake::Transport tr;
    const bool file = in.ConsumeBool();
    const RngLimit limit = in.ConsumeBool() ? RngLimit{} : RngLimit{in.ConsumeIntegralInRange<std::uint64_t>(1, 1 << 20),
                                                                   in.ConsumeIntegralInRange<std::uint64_t>(1, 1 << 16)};
    VirtioRng dev(source(file), limit);
    dev.attach(&tr);
    const std::uint64_t features =
        (dev.device_features() & in.ConsumeIntegral<std::uint64_t>()) | virtio_bit(VIRTIO_F_VERSION_1);
    tr.features = features;
    std::vector<Virtqueue> vqs;
    vqs.emplace_back(mem);
    std::optional<fake::Driver> ring;
    std::map<std::uint32_t, std::uint64_t> room;   // head -> writable bytes of the chain published there
    auto lay_out = [&] {
        vqs[0].reset();
        vqs[0].set_indirect((features & virtio_bit(VIRTIO_F_INDIRECT_DESC)) != 0);
        ring.emplace(mem, kRing);
        room.clear();
        if (!ring->configure(vqs[0])) __builtin_trap();
    };
    lay_out();
    dev.activate(vqs, mem);

    for (int step = 0; step < 128 && in.remaining_bytes() > 0; ++step) {
        switch (in.ConsumeIntegralInRange<int>(0, 8)) {
        case 0:
        case 1: {   // a request: writable buffers, sometimes a readable one
            std::vector<fake::Buf> bufs;
            std::uint64_t writable = 0;
            const int n = in.ConsumeIntegralInRange<int>(1, 4);
            for (int i = 0; i < n; ++i) {
                const auto len = in.ConsumeIntegralInRange<std::uint32_t>(0, 8192);
                const bool w = in.ConsumeIntegralInRange<int>(0, 9) != 0;
                bufs.push_back({ring->alloc(len == 0 ? 1 : len, 0xee), len, w});
                if (w) writable += len;
            }
            std::uint16_t head;
            if (in.ConsumeBool() && (features & virtio_bit(VIRTIO_F_INDIRECT_DESC)) != 0)
                head = ring->add_indirect(bufs, ring->alloc(static_cast<std::uint32_t>(16 * bufs.size())));
            else
                head = ring->add_chain(bufs);
            room[head] = writable;
            break;
        }
        case 2: {   // a raw descriptor, maybe published as a head
            const auto i = in.ConsumeIntegralInRange<std::uint16_t>(0, kRing - 1);
            ring->set_desc(i, in.ConsumeBool() ? in.ConsumeIntegralInRange<std::uint64_t>(0, kRam) : in.ConsumeIntegral<std::uint64_t>(),
                           in.ConsumeIntegral<std::uint32_t>(), in.ConsumeIntegral<std::uint16_t>(),
                           in.ConsumeIntegral<std::uint16_t>());
            if (in.ConsumeBool()) {
                ring->publish(i);
                room[i] = UINT64_MAX;   // unknown shape: no bound to check
            }
            break;
        }
        case 3:
        case 4:
            dev.queue_notify(0);
            if (!dev.settle()) __builtin_trap();
            break;
        case 5: {   // the driver takes what the device used
            std::uint32_t id = 0, len = 0;
            while (ring->take_used(id, len)) {
                auto it = room.find(id);
                if (it != room.end() && len > it->second) __builtin_trap();
                if (len > VirtioRng::kMaxRead) __builtin_trap();
            }
            break;
        }
        case 6:   // Bus Master Enable off or on (the transport kicks when it comes back)
            tr.dma = !tr.dma.load();
            if (tr.dma) dev.queue_notify(0);
            break;
        case 7: {   // the host side and config space (none: reads all-ones)
            (void)dev.counters();
            std::array<std::uint8_t, 8> b{};
            dev.read_config(in.ConsumeIntegralInRange<std::uint64_t>(0, 64), b);
            break;
        }
        default:   // device reset, then the driver sets up again
            dev.reset();
            lay_out();
            dev.activate(vqs, mem);
            break;
        }
    }
    dev.reset();
    return 0;
}
