// The x86 board kguest presents, in one place: the legacy devices on the I/O
// port bus (ports, ISA IRQ, DSDT name), the MMIO windows of the 32-bit hole,
// the ACPI tables' home in RAM and the vCPU limit. The machine inserts the
// legacy devices from kPioDevices and vmm/acpi.cpp writes the DSDT from the
// same table, so the two cannot drift apart. The RAM layout is GuestMemory's.
//
// Constants and pure functions only; make_legacy_devices builds device models
// that need no KVM (the caller passes the IRQ line), so tests can use it.
#pragma once

#include "devices/acpi_pm.hpp"
#include "devices/base/guest_memory.hpp"
#include "devices/exit_port.hpp"
#include "devices/i8042.hpp"
#include "devices/pci.hpp"
#include "devices/port80.hpp"
#include "devices/rtc.hpp"
#include "devices/serial.hpp"

#include <cstdint>
#include <functional>
#include <memory>

namespace kguest {

class Bus;

// xAPIC IDs are 8 bits and 0xff is broadcast.
inline constexpr unsigned kMaxCpus = 254;

// The 32-bit MMIO hole [kMmioHoleStart, 4 GiB), bottom to top.
struct MmioWindow {
    const char* name;
    std::uint64_t base, size;
};
// virtio-pci BARs are assigned from the bottom of the hole, one per slot.
inline constexpr std::uint64_t kPciMmioBase = kMmioHoleStart;
inline constexpr std::uint64_t kIoApicAddress = 0xfec00000;
inline constexpr std::uint64_t kLocalApicAddress = 0xfee00000;
// Pages KVM needs on Intel (the real-mode TSS, three pages, and the identity
// page table without unrestricted guest), where QEMU and Firecracker put them.
inline constexpr std::uint64_t kIdentityMapAddr = 0xfffbc000;
inline constexpr std::uint64_t kTssAddr = 0xfffbd000;
inline constexpr MmioWindow kMmioWindows[] = {
    {"PCI BARs", kPciMmioBase, kIoApicAddress - kPciMmioBase},  // the root bridge's _CRS aperture
    {"IOAPIC", kIoApicAddress, 0x1000},
    {"LAPIC", kLocalApicAddress, 0x1000},
    {"KVM identity map", kIdentityMapAddr, 0x1000},
    {"KVM TSS", kTssAddr, 0x3000},
};

// [0xe0000, 1 MiB): the RSDP on a 16-byte boundary in the BIOS read-only area
// for a guest that scans for it (ACPI 6.5 §5.2.5.1); reserved in E820.
inline constexpr std::uint64_t kAcpiBase = 0xe0000;
inline constexpr std::uint64_t kAcpiSize = 0x20000;

// The devices on the I/O port bus.
enum class PioId { com1, port80, exit_port, rtc, i8042_data, i8042_command, acpi_pm, pci_config };
struct PioDevice {
    PioId id;
    std::uint16_t port, len;
    int irq;               // ISA IRQ (= IOAPIC pin), -1 for none
    const char* acpi_name; // its Device in the DSDT's \_SB_, nullptr when not there
    const char* acpi_hid;  // EisaId _HID
    unsigned acpi_uid;
    const char* name;      // its bus range's name, which exit statistics show
};
// In hardware-reduced ACPI Linux maps no ISA IRQ by itself (nr_legacy_irqs()
// is 0): COM1's IRQ 4 and the RTC's IRQ 8 work only because the DSDT names
// them. The PCI host bridge's ports are in PCI0's _CRS instead.
inline constexpr PioDevice kPioDevices[] = {
    {PioId::com1, Serial::kCom1Base, 8, Serial::kCom1Irq, "COM1", "PNP0501", 1, "serial COM1"},  // 16550A
    {PioId::port80, Port80::kPort, Port80::kLen, -1, nullptr, nullptr, 0, "port80"},
    {PioId::exit_port, ExitPort::kPort, ExitPort::kLen, -1, nullptr, nullptr, 0, "exit port"},
    {PioId::rtc, Rtc::kBase, Rtc::kLen, 8, "RTC_", "PNP0B00", 0, "rtc"},  // CMOS clock; IRQ 8 never raised
    {PioId::i8042_data, I8042::kDataPort, I8042::kPortLen, -1, nullptr, nullptr, 0, "i8042 data"},
    {PioId::i8042_command, I8042::kCommandPort, I8042::kPortLen, -1, nullptr, nullptr, 0, "i8042 command"},
    {PioId::acpi_pm, AcpiPm::kBase, AcpiPm::kLen, -1, nullptr, nullptr, 0, "acpi pm"},  // FADT sleep, reset
    {PioId::pci_config, PciHostBridge::kBase, PciHostBridge::kLen, -1, nullptr, nullptr, 0, "pci config"},
};
constexpr const PioDevice& pio_device(PioId id) {
    for (const auto& d : kPioDevices)
        if (d.id == id) return d;
    return kPioDevices[0];  // unreachable: every PioId has an entry
}

// The Generic Event Device's interrupt (ACPI power button, devices/acpi_pm.hpp):
// an ISA line no legacy device uses (COM1 has 4, the RTC 8; the PCI slots'
// INTx go to 16-23), edge-triggered and active-high as the DSDT declares it.
inline constexpr unsigned kGedIrq = 5;

// The MMIO BAR of the virtio-pci device in slot 1..31, kBarSize (a power of two) apart.
std::uint64_t virtio_bar(unsigned slot);

// The legacy device models and how they reach the rest of the machine.
struct LegacyWiring {
    int console_fd = -1;                                   // the serial's output
    std::function<int(unsigned irq, bool level)> irq_line;  // returns an errno, 0 on success
    std::function<void(int status)> stop;                   // the exit port
    std::function<void()> power_off, reset;                 // ACPI S5; i8042 / ACPI reset
    std::uint64_t ram_below_4g = 0, ram_above_4g = 0;       // for the CMOS memory bytes
};
struct LegacyDevices {
    std::shared_ptr<Serial> serial;
    std::shared_ptr<Port80> port80;
    std::shared_ptr<ExitPort> exit_port;
    std::shared_ptr<Rtc> rtc;
    std::shared_ptr<I8042> i8042;
    std::shared_ptr<AcpiPm> acpi_pm;
    std::shared_ptr<PciHostBridge> pci;

    std::shared_ptr<BusDevice> at(PioId id) const;
};
LegacyDevices make_legacy_devices(const LegacyWiring& w);
// Inserts every kPioDevices entry at its port range. Throws on overlap.
void insert_pio_devices(Bus& pio, const LegacyDevices& d);

} // namespace kguest
