// The hardware-reduced ACPI sleep and reset registers (see acpi_pm.hpp).
#include "devices/acpi_pm.hpp"

namespace kguest {

// Byte lanes: byte i of an access is register offset + i; bytes outside
// [0, kLen) (or an offset that would wrap) are ignored.
static bool in_range(std::uint64_t offset, std::size_t i) {
    return offset < AcpiPm::kLen && i < AcpiPm::kLen - offset;
}

void AcpiPm::read(std::uint64_t offset, std::span<std::uint8_t> data) {
    // The sleep status register reads back, the GED event register reads and
    // clears; the control and reset registers are write-only (§4.8.3.6,
    // §4.8.3.7) and read 0.
    for (std::size_t i = 0; i < data.size(); ++i) {
        data[i] = 0;
        if (!in_range(offset, i)) continue;
        if (offset + i == kSleepStatus) data[i] = status_.load(std::memory_order_relaxed);
        if (offset + i == kGedEvent) data[i] = ged_events_.exchange(0, std::memory_order_acq_rel);
    }
}

void AcpiPm::press_power_button() {
    // The bit before the interrupt: _EVT must find it when it runs.
    ged_events_.fetch_or(GED_POWER_BUTTON, std::memory_order_acq_rel);
    if (ged_interrupt_) ged_interrupt_();
}

void AcpiPm::write(std::uint64_t offset, std::span<const std::uint8_t> data) {
    for (std::size_t i = 0; i < data.size() && in_range(offset, i); ++i) write_reg(offset + i, data[i]);
}

void AcpiPm::write_reg(std::uint64_t reg, std::uint8_t v) {
    switch (reg) {
    case kSleepControl: {
        if ((v & SLP_EN) == 0) return;  // SLP_TYP alone does nothing until SLP_EN
        unsigned typ = (v & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if (typ == kSlpTypS5) {
            if (power_off_) power_off_();
            return;
        }
        // Only \_S5_ is offered; anything else "wakes" at once: WAK_STS ends
        // acpi_hw_extended_sleep's wait instead of hanging a vCPU.
        KGUEST_LOG_LIMITED(log_limit_, "acpi: ignoring sleep request SLP_TYP=%u (only S5 is supported)", typ);
        status_.fetch_or(WAK_STS, std::memory_order_relaxed);
        return;
    }
    case kSleepStatus:
        status_.fetch_and(static_cast<std::uint8_t>(~(v & WAK_STS)), std::memory_order_relaxed);
        return;
    case kReset:
        if (v == kResetValue) {
            if (reset_) reset_();
        } else {
            KGUEST_LOG_LIMITED(log_limit_, "acpi: ignoring reset register write 0x%02x", v);
        }
        return;
    default:
        return;
    }
}

} // namespace kguest
