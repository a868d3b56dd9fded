// PCI configuration mechanism #1, bus 0 (see pci.hpp).
#include "pci.hpp"
#include "lib.hpp"

static u32 conf_addr(PciAddr a, u32 reg) {
    return 0x80000000u | (u32(a.bus) << 16) | (u32(a.slot & 31) << 11) | (u32(a.func & 7) << 8) | (reg & 0xfc);
}
u32 pci_read32(PciAddr a, u32 reg) { outl(0xcf8, conf_addr(a, reg)); return inl(0xcfc); }
u16 pci_read16(PciAddr a, u32 reg) { outl(0xcf8, conf_addr(a, reg)); return inw(u16(0xcfc + (reg & 2))); }
u8 pci_read8(PciAddr a, u32 reg) { outl(0xcf8, conf_addr(a, reg)); return inb(u16(0xcfc + (reg & 3))); }
void pci_write32(PciAddr a, u32 reg, u32 v) { outl(0xcf8, conf_addr(a, reg)); outl(0xcfc, v); }
void pci_write16(PciAddr a, u32 reg, u16 v) { outl(0xcf8, conf_addr(a, reg)); outw(u16(0xcfc + (reg & 2)), v); }
u32 pci_conf_read32(u32 bus, u32 slot, u32 reg) { return pci_read32({u8(bus), u8(slot), 0}, reg); }

// Calls fn(addr) for every present function on bus 0; stops when it returns true.
template <typename Fn> static bool for_each_function(Fn fn) {
    for (u8 slot = 0; slot < 32; ++slot) {
        PciAddr a{0, slot, 0};
        if (pci_read16(a, PCI_VENDOR) == 0xffff) continue;  // empty slot: all-ones
        u8 nfunc = (pci_read8(a, PCI_HEADER_TYPE) & 0x80) ? 8 : 1;  // multi-function bit
        for (u8 f = 0; f < nfunc; ++f) {
            a.func = f;
            if (pci_read16(a, PCI_VENDOR) == 0xffff) continue;
            if (fn(a)) return true;
        }
    }
    return false;
}

bool pci_find(u16 vendor, u16 device, PciAddr* out) {
    return for_each_function([&](PciAddr a) {
        u32 id = pci_read32(a, PCI_VENDOR);
        if ((id & 0xffff) != vendor || (id >> 16) != device) return false;
        *out = a;
        return true;
    });
}

u8 pci_cap_next(PciAddr a, u8 prev) {
    if (prev == 0) {
        if (!(pci_read16(a, PCI_STATUS) & PCI_STATUS_CAP_LIST)) return 0;
        u8 p = pci_read8(a, PCI_CAP_PTR) & 0xfc;
        return p >= 0x40 ? p : 0;
    }
    u8 p = pci_read8(a, prev + 1) & 0xfc;  // the low two bits are reserved
    return p >= 0x40 && p != prev ? p : 0;
}

// Where unprogrammed BARs go: above every BAR in use, in [kWindowBase, kWindowEnd).
constexpr u64 kWindowBase = 0xd0000000, kWindowEnd = 0xfec00000;
static u64 g_window_next;

// Decodes BAR i of a type-0 header (a 64-bit BAR with its upper half).
struct BarRaw { u64 addr; bool mem, is64, ok; };
static BarRaw bar_raw(PciAddr a, unsigned i) {
    u32 lo = pci_read32(a, PCI_BAR0 + 4 * i);
    if (lo & 1) return {lo & ~3ull, false, false, true};  // I/O space
    unsigned type = (lo >> 1) & 3;
    if (type == 2) {
        if (i == 5) return {0, true, true, false};  // a 64-bit BAR cannot start in the last slot
        u32 hi = pci_read32(a, PCI_BAR0 + 4 * (i + 1));
        return {(u64(hi) << 32) | (lo & ~0xfull), true, true, true};
    }
    return {lo & ~0xfull, true, false, type == 0};
}

// Sizes memory BAR i (§6.2.5.1): with memory decode off, write all-ones,
// read back the writable address bits, restore. 0: not implemented.
static u64 bar_size(PciAddr a, unsigned i, bool is64) {
    u16 cmd = pci_read16(a, PCI_COMMAND);
    pci_write16(a, PCI_COMMAND, u16(cmd & ~PCI_CMD_MEMORY));
    u32 reg = PCI_BAR0 + 4 * i;
    u32 old_lo = pci_read32(a, reg), old_hi = is64 ? pci_read32(a, reg + 4) : 0;
    pci_write32(a, reg, 0xffffffffu);
    if (is64) pci_write32(a, reg + 4, 0xffffffffu);
    u64 mask = pci_read32(a, reg) & ~0xfull;
    if (is64) mask |= u64(pci_read32(a, reg + 4)) << 32;
    else if (mask) mask |= 0xffffffff00000000ull;
    pci_write32(a, reg, old_lo);
    if (is64) pci_write32(a, reg + 4, old_hi);
    pci_write16(a, PCI_COMMAND, cmd);
    return mask ? ~mask + 1 : 0;
}

// Starts the window past every memory BAR already programmed in [kWindowBase, kWindowEnd).
static void window_init() {
    if (g_window_next) return;
    g_window_next = kWindowBase;
    for_each_function([](PciAddr a) {
        if ((pci_read8(a, PCI_HEADER_TYPE) & 0x7f) != 0) return false;  // bridges: not ours
        for (unsigned i = 0; i < 6; ++i) {
            BarRaw b = bar_raw(a, i);
            unsigned idx = i;
            if (b.is64) ++i;
            if (!b.ok || !b.mem || b.addr < kWindowBase || b.addr >= kWindowEnd) continue;
            u64 end = b.addr + bar_size(a, idx, b.is64);
            if (end > g_window_next) g_window_next = end;
        }
        return false;
    });
}

void pci_setup_bars(PciAddr a, PciBar bars[6]) {
    window_init();
    for (unsigned i = 0; i < 6; ++i) bars[i] = {0, 0};
    for (unsigned i = 0; i < 6; ++i) {
        BarRaw b = bar_raw(a, i);
        unsigned idx = i;
        if (b.is64) ++i;  // skip the upper half
        if (!b.ok || !b.mem) continue;
        u64 size = bar_size(a, idx, b.is64);
        if (size == 0) continue;  // no writable address bits: not implemented
        // Programmed and reachable through the identity map: keep it.
        if (b.addr != 0 && b.addr + size <= (1ull << 32)) { bars[idx] = {b.addr, size}; continue; }
        u64 base = (g_window_next + size - 1) & ~(size - 1);
        if (size > (1ull << 30) || base + size > kWindowEnd) {
            print("pci: %02x:%02x.%x BAR%u of size %#lx not assigned\n", a.bus, a.slot, a.func, idx, size);
            continue;
        }
        u16 cmd = pci_read16(a, PCI_COMMAND);
        pci_write16(a, PCI_COMMAND, u16(cmd & ~PCI_CMD_MEMORY));
        u32 reg = PCI_BAR0 + 4 * idx;
        pci_write32(a, reg, u32(base));
        if (b.is64) pci_write32(a, reg + 4, 0);
        pci_write16(a, PCI_COMMAND, cmd);
        g_window_next = base + size;
        bars[idx] = {base, size};
        print("pci: %02x:%02x.%x BAR%u assigned %#lx size %#lx\n", a.bus, a.slot, a.func, idx, base, size);
    }
    u16 cmd = pci_read16(a, PCI_COMMAND);
    pci_write16(a, PCI_COMMAND, u16(cmd | PCI_CMD_MEMORY | PCI_CMD_MASTER));
}
