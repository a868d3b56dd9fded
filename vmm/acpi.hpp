// The ACPI tables kguest hands a stock Linux kernel: RSDP, XSDT, FADT, MADT and
// a DSDT, written into the BIOS area of guest RAM where Linux also scans for
// the RSDP. The platform is hardware-reduced ACPI (ACPI 6.5 §4.1), as Cloud
// Hypervisor and Firecracker do: only the sleep control/status and reset
// registers of devices/acpi_pm.hpp. The tables give Linux the vCPUs and the
// IOAPIC (MADT), poweroff through S5, reset, and a PCI root bridge (DSDT).
//
// Layout at kAcpiBase (vmm/board.hpp): RSDP, XSDT, FADT, MADT, DSDT, each
// 16-byte aligned. The addresses, ports and IRQs come from the board table.
#pragma once

#include "vmm/board.hpp"

#include <cstdint>
#include <vector>

namespace kguest {

class GuestMemory;

struct AcpiConfig {
    unsigned cpus = 1;  // 1..kMaxCpus: APIC IDs 0..cpus-1, xAPIC only
    // The 32-bit window for PCI BARs, the root bridge's memory aperture
    // (must end at or below the IOAPIC).
    std::uint64_t pci_mmio_base = kMmioWindows[0].base;
    std::uint64_t pci_mmio_size = kMmioWindows[0].size;
    std::uint16_t pm_port = pio_device(PioId::acpi_pm).port;
};

// The tables as they lie from kAcpiBase on (the RSDP first). Pure; throws
// std::invalid_argument for a config outside the limits above.
std::vector<std::uint8_t> build_acpi_tables(const AcpiConfig& cfg);

// Writes build_acpi_tables(cfg) at kAcpiBase and returns the RSDP's address.
// Throws std::runtime_error when the region is not guest RAM.
std::uint64_t write_acpi_tables(GuestMemory& mem, const AcpiConfig& cfg);

} // namespace kguest
