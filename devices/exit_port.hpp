// The test/exit port at 0xf4, laid out like QEMU's isa-debug-exit
// (iobase=0xf4, iosize=4) so the same guest image ends the VM on both: a
// write of value V stops the VM and `kguest run` exits with status V & 0xff
// (QEMU exits with (V << 1) | 1). Reads return 0.
#pragma once

#include "devices/base/bus.hpp"

#include <functional>

namespace kguest {

class ExitPort : public BusDevice {
public:
    static constexpr std::uint16_t kPort = 0xf4;
    static constexpr std::uint64_t kLen = 4;

    explicit ExitPort(std::function<void(int)> stop) : stop_(std::move(stop)) {}

    void read(std::uint64_t, std::span<std::uint8_t> data) override {
        for (auto& b : data) b = 0;
    }
    void write(std::uint64_t offset, std::span<const std::uint8_t> data) override {
        if (offset == 0 && stop_) stop_(data[0]);
    }

private:
    std::function<void(int)> stop_;
};

} // namespace kguest
