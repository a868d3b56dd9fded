// libFuzzer target: the virtio-mem device (devices/virtio_mem.*, VIRTIO 1.2
// section 5.15) on its event loop, driven by the fake driver of the unit
// tests (tests/support/fake_virtio.hpp) on its one guest-request queue, in a
// fresh 16 MiB guest with a 256 MiB hotplug region at 4 GiB per input (no
// plugged block carries over). Each input plays a script: requests (PLUG,
// UNPLUG, UNPLUG_ALL, STATE or any type; addresses mostly on blocks of the
// region, sometimes anywhere; any block count; any padding) in chains of
// any shape (short or long request, response missing, too short or
// readable, indirect), raw hostile descriptors, kicks (each waits for the
// loop to settle), the driver taking used elements, guest writes into the
// region, host calls (requested size, config, counters), config-space reads
// and device resets. Nothing may crash, hit UB or hang (libFuzzer's
// -timeout); and the config space must agree with the device's block map
// (plugged_size = plugged blocks x block_size, never above region_size).
// Threads: libFuzzer's one thread plus the device's loop thread.
#include "devices/virtio_mem.hpp"

#include "tests/support/fake_virtio.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <fuzzer/FuzzedDataProvider.h>
#include <optional>
#include <vector>

using namespace kguest;

namespace {

constexpr std::uint16_t kRing = 64;
constexpr std::uint64_t MiB = 1ull << 20;
constexpr std::uint64_t kRam = 16 * MiB, kRegion = 256 * MiB;
constexpr std::uint64_t kBlock = VirtioMem::kBlockSize;
constexpr std::uint64_t kBlocks = kRegion / kBlock;

std::uint64_t address(FuzzedDataProvider& in) {
    switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 0:
    case 1: return kHighRamStart + kBlock * in.ConsumeIntegralInRange<std::uint64_t>(0, kBlocks + 2);
    case 2: return kHighRamStart + in.ConsumeIntegralInRange<std::uint64_t>(0, kRegion + kBlock);
    default: return in.ConsumeIntegral<std::uint64_t>();
    }
}

// 5.15.6: struct virtio_mem_req, 24 bytes (le16 type, 6 padding, le64 addr,
// le16 nb_blocks, 6 padding); some requests are cut short or run long.
std::vector<std::uint8_t> request(FuzzedDataProvider& in) {
    std::vector<std::uint8_t> r(VirtioMem::kRequestSize, in.ConsumeBool() ? 0 : in.ConsumeIntegral<std::uint8_t>());
    const std::uint16_t type = in.ConsumeBool() ? in.ConsumeIntegralInRange<std::uint16_t>(0, 3)
                                                : in.ConsumeIntegral<std::uint16_t>();
    const std::uint64_t addr = address(in);
    const std::uint16_t nb = in.ConsumeBool() ? in.ConsumeIntegralInRange<std::uint16_t>(0, kBlocks + 2)
                                              : in.ConsumeIntegral<std::uint16_t>();
    std::memcpy(r.data(), &type, 2);
    std::memcpy(r.data() + 8, &addr, 8);
    std::memcpy(r.data() + 16, &nb, 2);
    if (in.ConsumeIntegralInRange<int>(0, 7) == 0) r.resize(in.ConsumeIntegralInRange<std::size_t>(0, 40));
    return r;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider in(data, size);
    GuestMemory mem(kRam, in.ConsumeBool() ? Backing::thp : Backing::off, kRegion);
    fake::Transport tr;
    VirtioMem dev(mem);
    dev.attach(&tr);
    const std::uint64_t features =
        (dev.device_features() & in.ConsumeIntegral<std::uint64_t>()) | virtio_bit(VIRTIO_F_VERSION_1);
    tr.features = features;
    std::vector<Virtqueue> vqs;
    vqs.emplace_back(mem);
    std::optional<fake::Driver> ring;
    auto lay_out = [&] {
        vqs[0].reset();
        vqs[0].set_indirect((features & virtio_bit(VIRTIO_F_INDIRECT_DESC)) != 0);
        ring.emplace(mem, kRing);
        if (!ring->configure(vqs[0])) __builtin_trap();
    };
    lay_out();
    dev.activate(vqs, mem);

    // The cheap invariant, after every kick.
    auto sane = [&] {
        const VirtioMemConfig c = dev.config();
        if (c.plugged_size % kBlock != 0 || c.plugged_size > c.region_size || c.block_size != kBlock) __builtin_trap();
    };
    // The block map against the config (a loop round trip per block: once per input).
    auto check = [&] {
        const VirtioMemConfig c = dev.config();
        std::uint64_t plugged = 0;
        for (std::uint64_t i = 0; i < kBlocks; ++i) plugged += dev.block_plugged(i) ? 1 : 0;
        if (c.plugged_size != plugged * kBlock || c.plugged_size > c.region_size || c.block_size != kBlock)
            __builtin_trap();
    };

    for (int step = 0; step < 256 && in.remaining_bytes() > 0; ++step) {
        switch (in.ConsumeIntegralInRange<int>(0, 9)) {
        case 0:
        case 1: {   // a request and its response buffer, in chains of any shape
            const std::vector<std::uint8_t> r = request(in);
            std::vector<fake::Buf> bufs{{ring->alloc_bytes(r.empty() ? std::vector<std::uint8_t>(1) : r),
                                         static_cast<std::uint32_t>(r.size()), in.ConsumeIntegralInRange<int>(0, 15) == 0}};
            switch (in.ConsumeIntegralInRange<int>(0, 7)) {
            case 0: break;   // no response buffer
            case 1: {        // a response of any length and direction, maybe split
                const int n = in.ConsumeIntegralInRange<int>(1, 3);
                for (int i = 0; i < n; ++i) {
                    const auto len = in.ConsumeIntegralInRange<std::uint32_t>(0, 32);
                    bufs.push_back({ring->alloc(len == 0 ? 1 : len, 0xee), len, in.ConsumeBool()});
                }
                break;
            }
            default: bufs.push_back({ring->alloc(VirtioMem::kResponseSize, 0xee), VirtioMem::kResponseSize, true}); break;
            }
            if (in.ConsumeBool() && (features & virtio_bit(VIRTIO_F_INDIRECT_DESC)) != 0)
                ring->add_indirect(bufs, ring->alloc(static_cast<std::uint32_t>(16 * bufs.size())));
            else
                ring->add_chain(bufs);
            break;
        }
        case 2: {   // a raw descriptor, maybe published as a head
            const auto i = in.ConsumeIntegralInRange<std::uint16_t>(0, kRing - 1);
            const std::uint64_t a = in.ConsumeBool() ? in.ConsumeIntegralInRange<std::uint64_t>(0, kRam) : address(in);
            ring->set_desc(i, a, in.ConsumeIntegral<std::uint32_t>(), in.ConsumeIntegral<std::uint16_t>(),
                           in.ConsumeIntegral<std::uint16_t>());
            if (in.ConsumeBool()) ring->publish(i);
            break;
        }
        case 3:
        case 4:
            dev.queue_notify(0);
            if (!dev.settle()) __builtin_trap();
            sane();
            break;
        case 5: {   // the driver takes what the device used
            std::uint32_t id = 0, len = 0;
            while (ring->take_used(id, len)) {
            }
            break;
        }
        case 6: {   // the guest writes into a block it believes plugged
            const std::uint64_t b = in.ConsumeIntegralInRange<std::uint64_t>(0, kBlocks - 1);
            if (dev.block_plugged(b)) {
                auto r = mem.range(Gpa(kHighRamStart + b * kBlock), kBlock);
                if (!r || !r->fill(in.ConsumeIntegralInRange<std::uint64_t>(0, kBlock - 64), 0x5a, 64)) __builtin_trap();
            }
            break;
        }
        case 7:   // the host side, as the API thread calls it
            switch (in.ConsumeIntegralInRange<int>(0, 2)) {
            case 0:
                (void)dev.set_requested_size(in.ConsumeBool() ? kBlock * in.ConsumeIntegralInRange<std::uint64_t>(0, kBlocks + 1)
                                                              : in.ConsumeIntegral<std::uint64_t>());
                break;
            case 1: sane(); break;
            default: (void)dev.counters(); break;
            }
            break;
        case 8: {   // configuration space, any offset and size
            std::array<std::uint8_t, 16> b{};
            const auto off = in.ConsumeIntegralInRange<std::uint64_t>(0, sizeof(VirtioMemConfig) - 1);
            const auto n = in.ConsumeIntegralInRange<std::size_t>(1, std::min<std::size_t>(16, sizeof(VirtioMemConfig) - off));
            if (in.ConsumeBool()) dev.read_config(off, std::span<std::uint8_t>(b.data(), n));
            else dev.write_config(off, std::span<const std::uint8_t>(b.data(), n));
            break;
        }
        default:   // device reset (5.15.5: the blocks stay), then the driver sets up again
            dev.reset();
            lay_out();
            dev.activate(vqs, mem);
            sane();
            break;
        }
    }
    dev.reset();
    check();
    return 0;
}
