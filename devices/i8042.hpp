// A minimal 8042 keyboard controller: just enough for a guest to reset the
// machine the PC/AT way (IBM PC AT Technical Reference, "Keyboard Controller").
// Linux's reboot=k (arch/x86/kernel/reboot.c, BOOT_KBD) writes 0xFE (pulse
// reset) to port 0x64; others write the output port (0xD1) with bit 0 clear.
// Both call `reset`. It also answers self-test (0xAA → 0x55) and keeps its
// command byte (0x20 / 0x60), so a probing driver sees a controller. No
// keyboard or mouse is behind it and it raises no IRQ.
//
// Ports 0x60 and 0x64 are not contiguous (0x61 is the in-kernel PIT's), so
// the controller is two bus devices, data_port() and command_port().
#pragma once

#include "devices/base/bus.hpp"
#include "devices/base/log.hpp"

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

namespace kguest {

class I8042 : public std::enable_shared_from_this<I8042> {
public:
    static constexpr std::uint16_t kDataPort = 0x60;
    static constexpr std::uint16_t kCommandPort = 0x64;  // status on read, command on write
    static constexpr std::uint64_t kPortLen = 1;

    // `reset` runs on the requesting vCPU thread, unlocked, once per request:
    // Linux sends 0xFE up to ten times, so it must be idempotent.
    explicit I8042(std::function<void()> reset) : reset_(std::move(reset)) {}
    I8042(const I8042&) = delete;
    I8042& operator=(const I8042&) = delete;

    // They share the controller's ownership when it is owned by a shared_ptr.
    std::shared_ptr<BusDevice> data_port() { return share(data_); }
    std::shared_ptr<BusDevice> command_port() { return share(command_); }

private:
    // One port; a wider access uses its first byte, other bytes read all ones.
    class PortDevice : public BusDevice {
    public:
        PortDevice(I8042& ctl, bool command) : ctl_(ctl), command_(command) {}
        void read(std::uint64_t offset, std::span<std::uint8_t> data) override;
        void write(std::uint64_t offset, std::span<const std::uint8_t> data) override;

    private:
        I8042& ctl_;
        bool command_;
    };

    std::shared_ptr<BusDevice> share(PortDevice& port) {
        return std::shared_ptr<BusDevice>(weak_from_this().lock(), &port);  // aliasing
    }
    std::uint8_t read_port(bool command);
    void write_port(bool command, std::uint8_t v);

    PortDevice data_{*this, false}, command_{*this, true};
    mutable std::mutex mu_;
    std::function<void()> reset_;
    std::uint8_t command_byte_ = 0x05;  // keyboard interrupt enabled, system flag (POST passed)
    std::uint8_t out_ = 0;              // output buffer: the last byte produced
    bool out_full_ = false;
    std::uint8_t pending_ = 0;          // command waiting for its data byte on 0x60 (0: none)
    RateLimit log_limit_;
};

} // namespace kguest
