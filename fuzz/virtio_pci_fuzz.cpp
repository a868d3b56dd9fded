// libFuzzer target: the virtio-pci transport and PCI configuration space
// (devices/virtio_pci.*, devices/pci.*; VIRTIO 1.2 section 4.1, PCI 3.0
// section 6) under a random sequence of guest accesses. Each input builds a
// fresh PciHostBridge with one VirtioPciDevice (a small fake device with two
// queues and 8 bytes of configuration space, which completes every chain it
// is kicked for) in slot 1, then plays the input as a script: conf1 address
// and data port accesses of any size and offset, BAR accesses of sizes 1..8
// at any offset (mostly inside the six regions), the device raising queue
// and configuration interrupts or asking for a reset, the guest rewriting
// its RAM, and a well-behaved driver's set-up of both queues (so that the
// fuzzer reaches DRIVER_OK quickly). Nothing may crash, hit UB or loop.
// Single-threaded: libFuzzer calls LLVMFuzzerTestOneInput on one thread.
#include "devices/pci.hpp"
#include "devices/virtio.hpp"
#include "devices/virtio_pci.hpp"
#include "devices/base/guest_memory.hpp"

#include <array>
#include <cstdint>
#include <cstring>
#include <fuzzer/FuzzedDataProvider.h>
#include <memory>
#include <vector>

using namespace kguest;

namespace {

constexpr std::uint64_t kRamWindow = 64 * 1024;

GuestMemory& memory() {
    static GuestMemory mem(kHugePageSize, Backing::off);
    return mem;
}

class Device final : public VirtioDevice {
public:
    std::uint16_t device_id() const override { return 1; }
    std::uint64_t device_features() const override {
        return virtio_bit(0) | virtio_bit(VIRTIO_F_INDIRECT_DESC) | virtio_bit(VIRTIO_F_EVENT_IDX) |
               virtio_bit(VIRTIO_F_RING_RESET);
    }
    std::uint16_t num_queues() const override { return 2; }
    std::uint16_t max_queue_size(std::uint16_t q) const override { return q == 0 ? 256 : 16; }
    std::size_t config_size() const override { return config_.size(); }
    void read_config(std::uint64_t offset, std::span<std::uint8_t> data) override {
        if (offset > config_.size() || data.size() > config_.size() - offset) __builtin_trap();   // the transport's promise
        std::memcpy(data.data(), config_.data() + offset, data.size());
    }
    void write_config(std::uint64_t offset, std::span<const std::uint8_t> data) override {
        if (offset > config_.size() || data.size() > config_.size() - offset) __builtin_trap();
        std::memcpy(config_.data() + offset, data.data(), data.size());
    }
    void activate(std::span<Virtqueue> queues, GuestMemory&) override { queues_ = queues; }
    void reset() override { queues_ = {}; }
    void queue_notify(std::uint16_t q) override {
        if (q >= queues_.size() || !queues_[q].ready()) return;
        Virtqueue& vq = queues_[q];
        const Virtqueue::Pass p = vq.service(64, [&](DescChain& c) { return vq.push_used(c.head(), 0); });
        if (p == Virtqueue::Pass::error) fail();
        else if (vq.needs_notification()) notify_used(q);
    }
    void raise(std::uint16_t q) { notify_used(q); }
    void change_config() { notify_config_changed(); }
    void break_down() { fail(); }

private:
    std::array<std::uint8_t, 8> config_{};
    std::span<Virtqueue> queues_;
};

struct Sink final : VirtioInterrupts {
    std::uint64_t sent = 0;
    void msix(std::uint16_t, std::uint64_t, std::uint32_t) override { ++sent; }
    void intx(bool) override { ++sent; }
};

constexpr std::uint64_t kPortAddr = 0, kPortData = 4;   // offsets on the bridge (0xcf8, 0xcfc)

struct Rig {
    std::shared_ptr<Device> dev = std::make_shared<Device>();
    std::shared_ptr<Sink> sink = std::make_shared<Sink>();
    std::shared_ptr<VirtioPciDevice> pci = std::make_shared<VirtioPciDevice>(dev, memory(), sink, 0x020000);
    PciHostBridge bridge;

    Rig() { bridge.add_function(1, pci); }

    void port_write(std::uint64_t off, std::uint32_t v, std::size_t n) {
        std::array<std::uint8_t, 4> b{};
        std::memcpy(b.data(), &v, 4);
        bridge.write(off, std::span<const std::uint8_t>(b.data(), n));
    }
    std::uint32_t port_read(std::uint64_t off, std::size_t n) {
        std::array<std::uint8_t, 4> b{};
        bridge.read(off, std::span<std::uint8_t>(b.data(), n));
        std::uint32_t v = 0;
        std::memcpy(&v, b.data(), 4);
        return v;
    }
    void cfg_write(unsigned reg, std::uint32_t v, std::size_t n) {
        port_write(kPortAddr, 0x80000000u | (1u << 11) | (reg & 0xfc), 4);
        port_write(kPortData + (reg & 3), v, n);
    }
    void bar_write(std::uint64_t off, std::uint64_t v, std::size_t n) {
        std::array<std::uint8_t, 8> b{};
        std::memcpy(b.data(), &v, 8);
        pci->write(off, std::span<const std::uint8_t>(b.data(), n));
    }
    // A well-behaved driver (3.1.1): memory decode on, status, features,
    // both queues with rings in the fuzzer's RAM window, DRIVER_OK.
    void driver_init(FuzzedDataProvider& in) {
        cfg_write(pci::kCommand, pci::kCommandMemory | pci::kCommandMaster, 2);
        bar_write(VIRTIO_PCI_COMMON_STATUS, 0, 1);
        bar_write(VIRTIO_PCI_COMMON_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER, 1);
        bar_write(VIRTIO_PCI_COMMON_GFSELECT, 0, 4);
        bar_write(VIRTIO_PCI_COMMON_GF, in.ConsumeIntegral<std::uint32_t>() & dev->device_features(), 4);
        bar_write(VIRTIO_PCI_COMMON_GFSELECT, 1, 4);
        bar_write(VIRTIO_PCI_COMMON_GF, 1, 4);   // VERSION_1
        bar_write(VIRTIO_PCI_COMMON_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER |
                                                VIRTIO_CONFIG_S_FEATURES_OK, 1);
        for (std::uint16_t q = 0; q < 2; ++q) {
            bar_write(VIRTIO_PCI_COMMON_Q_SELECT, q, 2);
            const std::uint64_t base = 0x1000 + 0x4000ull * q;
            bar_write(VIRTIO_PCI_COMMON_Q_SIZE, 16, 2);
            bar_write(VIRTIO_PCI_COMMON_Q_MSIX, in.ConsumeIntegralInRange<std::uint16_t>(0, 3), 2);
            bar_write(VIRTIO_PCI_COMMON_Q_DESCLO, base, 8);
            bar_write(VIRTIO_PCI_COMMON_Q_AVAILLO, base + 0x100, 8);
            bar_write(VIRTIO_PCI_COMMON_Q_USEDLO, base + 0x200, 8);
            bar_write(VIRTIO_PCI_COMMON_Q_ENABLE, 1, 2);
        }
        bar_write(VIRTIO_PCI_COMMON_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER |
                                                VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK, 1);
    }
};

std::size_t access_size(FuzzedDataProvider& in, std::size_t max) {
    // Mostly natural sizes; odd ones (3, 5...) must be refused cleanly.
    static constexpr std::size_t natural[] = {1, 2, 4, 8};
    const std::size_t n = in.ConsumeBool() ? natural[in.ConsumeIntegralInRange<int>(0, 3)]
                                           : in.ConsumeIntegralInRange<std::size_t>(0, 8);
    return n > max ? max : n;
}

std::uint64_t bar_offset(FuzzedDataProvider& in) {
    if (in.ConsumeIntegralInRange<int>(0, 7) == 0) return in.ConsumeIntegral<std::uint64_t>();
    // A region (0..5, or 6..7: past them, inside the BAR) and a small offset in it.
    return 0x1000ull * in.ConsumeIntegralInRange<unsigned>(0, 7) + in.ConsumeIntegralInRange<unsigned>(0, 0x40);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider in(data, size);
    GuestMemory& mem = memory();
    std::vector<std::uint8_t> ram = in.ConsumeBytes<std::uint8_t>(in.ConsumeIntegralInRange<std::size_t>(0, 4096));
    ram.resize(kRamWindow, 0);
    if (!mem.write(Gpa(0), ram.data(), ram.size())) __builtin_trap();

    Rig rig;
    for (int step = 0; step < 4096 && in.remaining_bytes() > 0; ++step) {
        switch (in.ConsumeIntegralInRange<int>(0, 9)) {
        case 0: {   // conf1 address: mostly our slot or the bridge, any register
            std::uint32_t a = in.ConsumeIntegral<std::uint32_t>();
            if (in.ConsumeBool()) a = 0x80000000u | (in.ConsumeIntegralInRange<unsigned>(0, 2) << 11) | (a & 0xff);
            rig.port_write(kPortAddr, a, 4);
            break;
        }
        case 1: {   // any port of the eight, any size that fits
            const auto off = in.ConsumeIntegralInRange<std::uint64_t>(0, 7);
            (void)rig.port_read(off, access_size(in, 8 - off > 4 ? 4 : 8 - off));
            break;
        }
        case 2: {
            const auto off = in.ConsumeIntegralInRange<std::uint64_t>(0, 7);
            const auto n = access_size(in, 8 - off > 4 ? 4 : 8 - off);
            rig.port_write(off, in.ConsumeIntegral<std::uint32_t>(), n);
            break;
        }
        case 3: {   // a config register write of our function, through the ports
            const auto reg = in.ConsumeIntegral<std::uint8_t>();
            rig.cfg_write(reg, in.ConsumeIntegral<std::uint32_t>(), access_size(in, 4 - (reg & 3u)));
            break;
        }
        case 4: {
            std::array<std::uint8_t, 8> b{};
            const auto off = bar_offset(in);
            rig.pci->read(off, std::span<std::uint8_t>(b.data(), access_size(in, 8)));
            break;
        }
        case 5: {
            const auto off = bar_offset(in);
            const auto n = access_size(in, 8);
            rig.bar_write(off, in.ConsumeIntegral<std::uint64_t>(), n);
            break;
        }
        case 6:   // the device side, as a device's loop would call it
            switch (in.ConsumeIntegralInRange<int>(0, 2)) {
            case 0: rig.dev->raise(in.ConsumeIntegralInRange<std::uint16_t>(0, 2)); break;
            case 1: rig.dev->change_config(); break;
            default: rig.dev->break_down(); break;
            }
            break;
        case 7: {   // the guest rewrites its rings and buffers
            const auto at = in.ConsumeIntegralInRange<std::uint64_t>(0, kRamWindow - 8);
            const auto v = in.ConsumeIntegral<std::uint64_t>();
            (void)mem.write(Gpa(at), &v, 8);
            break;
        }
        case 8:
            rig.driver_init(in);
            break;
        default: {   // a config-space read of any function through the ports
            rig.port_write(kPortAddr, 0x80000000u | (in.ConsumeIntegralInRange<unsigned>(0, 31) << 11) |
                                          (in.ConsumeIntegral<std::uint8_t>() & 0xfcu), 4);
            (void)rig.port_read(kPortData, access_size(in, 4));
            break;
        }
        }
    }
    return 0;
}
