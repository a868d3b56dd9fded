// The ACPI power-management registers of a hardware-reduced ACPI platform
// (ACPI 6.5 §4.1): a sleep control register, a sleep status register
// (§4.8.3.7, §4.8.3.8) and a reset register (§4.8.3.6), byte-wide in I/O
// space, which vmm/acpi.cpp puts in the FADT. Linux's `poweroff` ends in
// acpi_hw_extended_sleep(), writing SLP_TYP (from \_S5_) and SLP_EN to the
// sleep control register (a bare HLT, without ACPI, is invisible to a VMM).
//
// Ports kBase + 0..3 (byte lanes: a wider access touches the next registers):
//   +0 sleep control (write-only): SLP_TYP bits 4:2, SLP_EN bit 5
//   +1 sleep status: WAK_STS bit 7, write 1 to clear
//   +2 reset (write-only): kResetValue resets the VM
//   +3 Generic Event Device (GED) event bits (read-only; a read returns the
//      pending events and clears them, as Cloud Hypervisor's GED register
//      does): bit 0 the power button
//
// The GED (ACPI 6.5 §5.6.9, _HID ACPI0013) is how a hardware-reduced platform
// signals events without fixed hardware: vmm/acpi.cpp's DSDT gives it an
// interrupt and an _EVT method that reads +3 and, for the power button, does
// Notify(\_SB.PWRB, 0x80) on the PNP0C0C device, which Linux's ACPI button
// driver turns into KEY_POWER. press_power_button() latches the bit and pulses
// the interrupt (edge-triggered).
#pragma once

#include "devices/base/bus.hpp"
#include "devices/base/log.hpp"

#include <atomic>
#include <cstdint>
#include <functional>

namespace kguest {

class AcpiPm : public BusDevice {
public:
    static constexpr std::uint16_t kBase = 0x600;
    static constexpr std::uint64_t kLen = 4;
    static constexpr std::uint64_t kSleepControl = 0, kSleepStatus = 1, kReset = 2, kGedEvent = 3;
    static constexpr std::uint8_t GED_POWER_BUTTON = 0x01;
    // The FADT's RESET_VALUE.
    static constexpr std::uint8_t kResetValue = 0x01;
    // The SLP_TYP our DSDT gives for S5 (its \_S5_ package).
    static constexpr std::uint8_t kSlpTypS5 = 5;
    // Register bits (§4.8.3.7, §4.8.3.8; Linux's ACPI_X_* in actbl.h).
    static constexpr std::uint8_t SLP_TYP_MASK = 0x1c, SLP_TYP_SHIFT = 2, SLP_EN = 0x20;
    static constexpr std::uint8_t WAK_STS = 0x80;

    // power_off and reset run on the vCPU thread that did the write;
    // ged_interrupt (pulses the GED's interrupt) on press_power_button's.
    AcpiPm(std::function<void()> power_off, std::function<void()> reset, std::function<void()> ged_interrupt = {})
        : power_off_(std::move(power_off)), reset_(std::move(reset)), ged_interrupt_(std::move(ged_interrupt)) {}

    // The power button was pressed: latch the GED event, raise the interrupt.
    // Any thread (the control API's).
    void press_power_button();

    void read(std::uint64_t offset, std::span<std::uint8_t> data) override;
    void write(std::uint64_t offset, std::span<const std::uint8_t> data) override;

private:
    void write_reg(std::uint64_t reg, std::uint8_t v);

    std::function<void()> power_off_, reset_, ged_interrupt_;
    std::atomic<std::uint8_t> status_{0};
    std::atomic<std::uint8_t> ged_events_{0};
    RateLimit log_limit_;
};

} // namespace kguest
