// libFuzzer target: the split virtqueue (devices/virtqueue.*, VIRTIO 1.2
// section 2.7) on rings the input writes into a small guest. The input's
// first bytes choose the queue size, the negotiated features and where the
// three rings lie (anywhere in or past guest RAM); the next 64 KiB (or less)
// are guest RAM from 0, i.e. descriptor tables, rings and buffers as the
// fuzzer likes them; the rest is a script of device actions: pop chains and
// gather/scatter at chosen offsets, return them with chosen lengths, rewrite
// a byte of guest RAM (a guest racing the device), toggle notifications,
// reset. Whatever the guest wrote, nothing may read or write outside guest
// RAM (ASan), hit UB (UBSan) or loop (libFuzzer's -timeout).
// Single-threaded: libFuzzer calls LLVMFuzzerTestOneInput on one thread.
#include "devices/virtqueue.hpp"
#include "devices/base/guest_memory.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <fuzzer/FuzzedDataProvider.h>
#include <vector>

using namespace kguest;

namespace {

constexpr std::uint64_t kRamWindow = 64 * 1024;   // what the input may fill

GuestMemory& memory() {
    static GuestMemory mem(kHugePageSize, Backing::off);   // one 2 MiB region at 0
    return mem;
}

// A ring address: mostly inside the window the input fills, sometimes a
// hostile one (end of RAM, past it, near 2^64), chosen by the input.
std::uint64_t ring_address(FuzzedDataProvider& in) {
    switch (in.ConsumeIntegralInRange<int>(0, 7)) {
    case 0: return kHugePageSize - in.ConsumeIntegralInRange<std::uint64_t>(0, 4096);
    case 1: return UINT64_MAX - in.ConsumeIntegralInRange<std::uint64_t>(0, 4096);
    case 2: return in.ConsumeIntegral<std::uint64_t>();
    default: return in.ConsumeIntegralInRange<std::uint64_t>(0, kRamWindow);
    }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider in(data, size);
    GuestMemory& mem = memory();

    const int size_log2 = in.ConsumeIntegralInRange<int>(0, 16);
    // Sizes that are no power of two, and 0, must be refused by configure().
    const auto qsize = in.ConsumeBool() ? static_cast<std::uint16_t>(1u << std::min(size_log2, 15))
                                        : in.ConsumeIntegral<std::uint16_t>();
    const bool event_idx = in.ConsumeBool(), indirect = in.ConsumeBool();
    const std::uint64_t desc = ring_address(in), avail = ring_address(in), used = ring_address(in);

    // Guest RAM: the window from the input, zero past its end.
    std::vector<std::uint8_t> ram = in.ConsumeBytes<std::uint8_t>(in.ConsumeIntegralInRange<std::size_t>(0, kRamWindow));
    ram.resize(kRamWindow, 0);
    if (!mem.write(Gpa(0), ram.data(), ram.size())) __builtin_trap();

    Virtqueue q(mem);
    q.set_event_idx(event_idx);
    q.set_indirect(indirect);
    if (!q.configure(qsize, desc, avail, used)) return 0;

    DescChain chain;
    std::array<std::uint8_t, 512> scratch{};
    // Bounded: at most 4096 actions an input, each bounded by the queue size.
    for (int step = 0; step < 4096 && in.remaining_bytes() > 0; ++step) {
        switch (in.ConsumeIntegralInRange<int>(0, 7)) {
        case 0:
        case 1: {   // pop one chain, touch its buffers, hand it back
            const PopStatus st = q.pop(chain);
            if (st != PopStatus::ok) break;
            const auto off = in.ConsumeIntegral<std::uint32_t>();
            const auto len = in.ConsumeIntegralInRange<std::size_t>(0, scratch.size());
            (void)chain.read(mem, off, scratch.data(), len);
            (void)chain.read(mem, chain.readable_len() - std::min<std::uint64_t>(chain.readable_len(), len),
                             scratch.data(), len);
            (void)chain.write(mem, in.ConsumeIntegral<std::uint32_t>(), scratch.data(), len);
            (void)chain.write(mem, chain.writable_len() - std::min<std::uint64_t>(chain.writable_len(), len),
                              scratch.data(), len);
            if (in.ConsumeBool()) (void)q.push_used(chain.head(), in.ConsumeIntegral<std::uint32_t>());
            break;
        }
        case 2: {   // one service pass, as the devices run it
            const int budget = in.ConsumeIntegralInRange<int>(1, 64);
            (void)q.service(budget, [&](DescChain& c) {
                (void)c.write(mem, 0, scratch.data(), std::min<std::uint64_t>(c.writable_len(), scratch.size()));
                return q.push_used(c.head(), static_cast<std::uint32_t>(std::min<std::uint64_t>(c.writable_len(), 64)));
            });
            break;
        }
        case 3:   // the device returns an arbitrary head (a device bug, but must not corrupt memory)
            (void)q.push_used(in.ConsumeIntegral<std::uint16_t>(), in.ConsumeIntegral<std::uint32_t>());
            break;
        case 4:
            (void)q.needs_notification();
            if (event_idx) q.set_avail_event();
            break;
        case 5:
            if (in.ConsumeBool()) q.disable_notifications();
            else (void)q.enable_notifications();
            break;
        case 6: {   // the guest changes a byte of RAM under the device
            const auto at = in.ConsumeIntegralInRange<std::uint64_t>(0, kRamWindow - 1);
            const auto v = in.ConsumeIntegral<std::uint8_t>();
            (void)mem.write(Gpa(at), &v, 1);
            break;
        }
        default:   // reset and set up again (a queue reset or device reset)
            q.reset();
            q.set_event_idx(event_idx);
            q.set_indirect(indirect);
            if (!q.configure(qsize, desc, avail, used)) return 0;
            break;
        }
    }
    return 0;
}
