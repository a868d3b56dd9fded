// The PC's CMOS real-time clock, a minimal MC146818 at ports 0x70 (index) and
// 0x71 (data), which Linux reads at boot for the wall clock and `hwclock -w`
// writes. The time registers are the host's CLOCK_REALTIME (UTC) plus an
// offset the guest moves by writing them; status B's DM, 24/12h and SET bits
// are honoured. Status A never shows UIP. No interrupts (status C reads 0).
// The other bytes are CMOS RAM, with the memory sizes QEMU's pc machine
// stores there (hw/i386/pc.c pc_cmos_init).
#pragma once

#include "devices/base/bus.hpp"

#include <array>
#include <cstdint>
#include <functional>
#include <mutex>

namespace kguest {

class Rtc : public BusDevice {
public:
    static constexpr std::uint16_t kBase = 0x70;  // 0x70 index, 0x71 data
    static constexpr std::uint64_t kLen = 2;

    // Guest RAM below and above 4 GiB in bytes; `now_unix_seconds`: the host
    // clock (default: CLOCK_REALTIME).
    Rtc(std::uint64_t ram_below_4g, std::uint64_t ram_above_4g,
        std::function<std::int64_t()> now_unix_seconds = {});

    // A multi-byte access is split into byte accesses at consecutive ports.
    void read(std::uint64_t offset, std::span<std::uint8_t> data) override;
    void write(std::uint64_t offset, std::span<const std::uint8_t> data) override;

    // Seconds the guest's clock runs ahead of the host's (negative: behind).
    std::int64_t offset_seconds() const;

private:
    std::uint8_t read_reg(unsigned reg);
    void write_reg(unsigned reg, std::uint8_t v);
    std::int64_t now() const;
    // Time registers <-> Unix seconds, in the format status B selects.
    void store_time(std::int64_t t);
    std::int64_t load_time() const;

    mutable std::mutex mu_;
    std::function<std::int64_t()> now_;
    std::array<std::uint8_t, 128> cmos_{};  // registers and RAM, by index
    std::uint8_t index_ = 0;                // as written, NMI bit included
    std::int64_t offset_ = 0;
};

} // namespace kguest
