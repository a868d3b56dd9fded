// PCI for the small guest: configuration mechanism #1 (PCI Local Bus Spec 3.0
// §3.2.2.3.2) on bus 0, finding a function by ID, walking its capability list
// (§6.7) and making its memory BARs usable (§6.2.5.1): a BAR already
// programmed (by SeaBIOS, or pre-assigned by kguest) is kept; an unprogrammed
// one is sized and placed, size-aligned, above every BAR in use (0xd0000000 at
// the lowest) and below 4 GiB, where the identity map reaches it.
#pragma once

#include "arch.hpp"

struct PciAddr { u8 bus, slot, func; };

// Type-0 header offsets and Command bits (PCI 3.0 §6.1, §6.2.2).
enum : u32 { PCI_VENDOR = 0x00, PCI_COMMAND = 0x04, PCI_STATUS = 0x06, PCI_CLASS_REV = 0x08,
             PCI_HEADER_TYPE = 0x0e, PCI_BAR0 = 0x10, PCI_CAP_PTR = 0x34 };
enum : u16 { PCI_CMD_MEMORY = 1u << 1, PCI_CMD_MASTER = 1u << 2, PCI_CMD_INTX_DISABLE = 1u << 10 };
constexpr u16 PCI_STATUS_CAP_LIST = 1u << 4;
constexpr u8 PCI_CAP_ID_MSIX = 0x11, PCI_CAP_ID_VNDR = 0x09;

u32 pci_read32(PciAddr a, u32 reg);
u16 pci_read16(PciAddr a, u32 reg);
u8 pci_read8(PciAddr a, u32 reg);
void pci_write32(PciAddr a, u32 reg, u32 v);
void pci_write16(PciAddr a, u32 reg, u16 v);
// Function 0 of a slot, the form test=pci uses.
u32 pci_conf_read32(u32 bus, u32 slot, u32 reg);

// The first function on bus 0 with this vendor/device ID; false if none.
bool pci_find(u16 vendor, u16 device, PciAddr* out);
// Capability offsets (§6.7): pass 0 for the first, then the previous offset;
// 0 at the end. Callers bound the walk (48 steps) against loops.
u8 pci_cap_next(PciAddr a, u8 prev);

struct PciBar {
    u64 addr;  // 0: not a usable memory BAR
    u64 size;
};
// Makes every memory BAR usable (kept or assigned, see above) and turns on
// memory space and bus master. bars[i] is BAR i (a 64-bit BAR's upper half: 0).
void pci_setup_bars(PciAddr a, PciBar bars[6]);
