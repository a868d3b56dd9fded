// The board's legacy devices and BAR layout (see board.hpp). Runs at machine
// set-up only; the device models it builds keep their own threading rules.
#include "vmm/board.hpp"
#include "devices/base/bus.hpp"
#include "devices/base/error.hpp"
#include "devices/base/log.hpp"
#include "devices/virtio_pci.hpp"

#include <cstring>

namespace kguest {

std::uint64_t virtio_bar(unsigned slot) {
    if (slot < 1 || slot >= PciHostBridge::kSlots) throw UsageError("too many PCI devices (at most 31)");
    return kPciMmioBase + (slot - 1) * VirtioPciDevice::kBarSize;
}

LegacyDevices make_legacy_devices(const LegacyWiring& w) {
    LegacyDevices d;
    d.serial = std::make_shared<Serial>(w.console_fd, [irq_line = w.irq_line](bool level) {
        if (int err = irq_line(static_cast<unsigned>(pio_device(PioId::com1).irq), level)) {
            static RateLimit limit;
            KGUEST_LOG_LIMITED(limit, "serial: KVM_IRQ_LINE: %s (errno %d)", std::strerror(err), err);
        }
    });
    d.port80 = std::make_shared<Port80>();
    d.exit_port = std::make_shared<ExitPort>(w.stop);
    // What Linux needs without a BIOS: the CMOS clock, reset lines, ACPI sleep.
    d.rtc = std::make_shared<Rtc>(w.ram_below_4g, w.ram_above_4g);
    d.i8042 = std::make_shared<I8042>(w.reset);
    d.acpi_pm = std::make_shared<AcpiPm>(w.power_off, w.reset, [irq_line = w.irq_line] {
        // An edge: KVM's IOAPIC latches the rising edge of KVM_IRQ_LINE 1, then 0.
        int err = irq_line(kGedIrq, true);
        if (err == 0) err = irq_line(kGedIrq, false);
        if (err != 0) {
            static RateLimit limit;
            KGUEST_LOG_LIMITED(limit, "acpi: GED interrupt: KVM_IRQ_LINE: %s (errno %d)", std::strerror(err), err);
        }
    });
    // PCI bus 0 with its host bridge at 00:00.0; virtio-pci devices follow it.
    d.pci = std::make_shared<PciHostBridge>();
    return d;
}

std::shared_ptr<BusDevice> LegacyDevices::at(PioId id) const {
    switch (id) {
    case PioId::com1: return serial;
    case PioId::port80: return port80;
    case PioId::exit_port: return exit_port;
    case PioId::rtc: return rtc;
    case PioId::i8042_data: return i8042->data_port();
    case PioId::i8042_command: return i8042->command_port();
    case PioId::acpi_pm: return acpi_pm;
    case PioId::pci_config: return pci;
    }
    return nullptr;
}

void insert_pio_devices(Bus& pio, const LegacyDevices& d) {
    for (const auto& dev : kPioDevices) pio.insert(dev.port, dev.len, d.at(dev.id), dev.name);
}

} // namespace kguest
