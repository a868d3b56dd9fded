// The PC's CMOS real-time clock, a minimal MC146818 at ports 0x70 (index) and
// 0x71 (data). Linux reads it at boot for the wall clock (mach_get_cmos_time,
// drivers/rtc/rtc-cmos.c) and `hwclock -w` writes it. The time registers come
// from the host's CLOCK_REALTIME (UTC) plus an offset the guest moves by
// writing them; status B's DM (binary/BCD), 24/12h and SET bits are honoured.
// Status A never shows UIP, so a reader waiting for an update to end never
// waits. No interrupts: alarm, periodic and update-ended interrupts are not
// emulated and IRQ 8 is never raised (status C reads 0). The other bytes are
// CMOS RAM, filled at construction with the memory sizes QEMU's pc machine
// stores there (hw/i386/pc.c pc_cmos_init), which some firmware and tools read.
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

    // `ram_below_4g` / `ram_above_4g`: guest RAM below and above 4 GiB, in
    // bytes, for the CMOS memory-size bytes. `now_unix_seconds` is the host
    // clock (default: CLOCK_REALTIME); tests pass a fake one.
    Rtc(std::uint64_t ram_below_4g, std::uint64_t ram_above_4g,
        std::function<std::int64_t()> now_unix_seconds = {});

    // A multi-byte access is split into byte accesses at consecutive ports,
    // as the ISA bus does (an `outw` to 0x70 writes the index, then the data).
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
