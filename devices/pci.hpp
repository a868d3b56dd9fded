// PCI bus 0 behind configuration mechanism #1 (PCI Local Bus Spec 3.0 §3.2.2.3.2,
// ports 0xcf8 address / 0xcfc-0xcff data), as Linux's arch/x86/pci/direct.c
// uses it. It knows nothing of KVM.
//
// A PciFunction owns a type-0 header (spec §6.1): 256 bytes of configuration
// space plus a per-bit write mask. Every guest write goes bytewise through
// that mask, so identity registers, the capability chain and the BAR
// size/type bits cannot be altered. Nothing on the access path throws; odd
// accesses read all-ones or are dropped. Setup calls throw
// std::invalid_argument on misuse.
//
// Hooks (on_bar_moved, on_command_write, on_config_write) run on the vCPU
// thread that did the config write, under the host bridge's lock and inside
// the PIO bus dispatch: they must not touch the bridge or insert into the PIO
// bus. Outside the hooks, read the config space only before the VM runs.
#pragma once

#include "devices/base/bus.hpp"

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>

namespace kguest {

namespace pci {
// Type-0 header offsets (PCI 3.0 §6.1, figure 6-1).
inline constexpr unsigned kVendorId = 0x00, kDeviceId = 0x02, kCommand = 0x04, kStatus = 0x06,
                          kRevision = 0x08, kClassProg = 0x09, kCacheLine = 0x0c,
                          kHeaderType = 0x0e, kBar0 = 0x10, kSubsystemVendor = 0x2c,
                          kSubsystemId = 0x2e, kCapPtr = 0x34, kInterruptLine = 0x3c,
                          kInterruptPin = 0x3d;
inline constexpr std::uint16_t kCommandIo = 1u << 0, kCommandMemory = 1u << 1,
                               kCommandMaster = 1u << 2, kCommandIntxDisable = 1u << 10;
inline constexpr std::uint16_t kStatusCapList = 1u << 4;
inline constexpr unsigned kConfigSize = 256, kNumBars = 6, kCapStart = 0x40;
// Where INTA# of a bus-0 slot goes: IOAPIC pin 16 + (slot - 1) % 8 (pins
// 16-23 carry no ISA device). The wiring and the ACPI _PRT both use this.
constexpr std::uint32_t intx_gsi(unsigned slot) { return 16 + (slot - 1) % 8; }
} // namespace pci

// The interrupt controller's INTx input lines, each driven by the functions
// routed to it (pci::intx_gsi puts slots 1 and 9, 2 and 10, ... on one line).
// INTx# is open-drain and wire-ORed (PCI 3.0 §2.2.6): a line is asserted
// while any of its slots asserts, so one device lowering it cannot lose
// another's interrupt. `set_line(gsi, level)` is what moves the pin
// (KVM_IRQ_LINE); it returns 0 or an errno. Thread-safe: devices call in
// under their own locks, and the pin moves under this object's lock so that
// the interrupt controller sees the levels in order.
class IntxLines {
public:
    using SetLine = std::function<int(unsigned gsi, bool level)>;
    explicit IntxLines(SetLine set_line) : set_line_(std::move(set_line)) {}
    // Slot `slot` drives its line (pci::intx_gsi(slot)) at `level`; 0 or the
    // errno of moving the pin (nothing to move: 0).
    int set(unsigned slot, bool level);

private:
    SetLine set_line_;
    std::mutex mu_;
    std::map<unsigned, std::set<unsigned>> asserted_;   // gsi -> the slots asserting it
};

class PciFunction {
public:
    enum class BarKind : std::uint8_t { kNone, kMem32, kMem64, kIo };
    struct BarAddress {
        std::uint64_t address = 0;  // 0 when unprogrammed (or not a BAR)
        bool decode = false;        // Command bit 0 (io) / 1 (memory) set
    };

    PciFunction();
    virtual ~PciFunction() = default;
    PciFunction(const PciFunction&) = delete;
    PciFunction& operator=(const PciFunction&) = delete;

    // Identity (read-only to the guest).
    void set_ids(std::uint16_t vendor, std::uint16_t device);
    void set_class(std::uint32_t class_code, std::uint8_t revision = 0);  // 24-bit base/sub/prog-if

    // Appends a capability (spec §6.7): `body` follows the ID and Next bytes;
    // `writable` (same length or empty) is its guest-writable mask. Returns
    // its offset; throws when it does not fit.
    std::uint8_t add_capability(std::uint8_t id, std::span<const std::uint8_t> body,
                                std::span<const std::uint8_t> writable = {});

    // Declares BAR `index` (spec §6.2.5.1): memory >= 16 bytes, I/O 4..256
    // bytes, powers of two. A 64-bit BAR also takes slot index + 1.
    void set_bar(unsigned index, std::uint64_t size, BarKind kind, bool prefetchable = false);
    BarAddress bar_address(unsigned index) const;

    // Guest accesses (little-endian); bytes past 0xff read 0xff / are dropped.
    std::uint32_t config_read(unsigned offset, unsigned size) const;
    void config_write(unsigned offset, unsigned size, std::uint32_t value);

    // Device-side access bypassing the write mask (e.g. to update a capability).
    void set_config(unsigned offset, unsigned size, std::uint32_t value);
    void set_writable(unsigned offset, unsigned size, std::uint32_t mask);
    std::uint16_t command() const { return static_cast<std::uint16_t>(config_read(pci::kCommand, 2)); }

protected:
    // A BAR's address changed (sizing writes included; once per half of a
    // 64-bit BAR).
    virtual void on_bar_moved(unsigned /*index*/, std::uint64_t /*old_addr*/, std::uint64_t /*new_addr*/) {}
    // Any write touching the Command register.
    virtual void on_command_write(std::uint16_t /*old_cmd*/, std::uint16_t /*new_cmd*/) {}
    // Every guest write, after it was applied and after the hooks above.
    virtual void on_config_write(unsigned /*offset*/, unsigned /*size*/) {}

private:
    struct Bar {
        BarKind kind = BarKind::kNone;
        std::uint64_t size = 0;
        bool upper = false;  // high half of the 64-bit BAR in the slot below
    };
    std::uint64_t raw_bar_address(unsigned index) const;

    std::array<std::uint8_t, pci::kConfigSize> config_{};
    std::array<std::uint8_t, pci::kConfigSize> wmask_{};
    std::array<Bar, pci::kNumBars> bars_{};
    std::uint8_t last_cap_ = 0;  // offset of the last capability, 0 if none
    unsigned cap_end_ = pci::kCapStart;
};

// The conf1 ports at kBase..kBase+kLen-1. Slot 0 holds the host bridge itself
// (00:00.0, i440FX IDs). Only function 0 of each slot exists. Port 0xcf9
// (PIIX reset control) is ignored like the other byte ports of 0xcf8.
class PciHostBridge : public BusDevice {
public:
    static constexpr std::uint16_t kBase = 0xcf8;
    static constexpr std::uint64_t kLen = 8;
    static constexpr unsigned kSlots = 32;

    PciHostBridge();

    // Places `fn` at 00:slot.0. Throws on slot 0, slot >= 32, a taken slot or null.
    void add_function(unsigned slot, std::shared_ptr<PciFunction> fn);

    void read(std::uint64_t offset, std::span<std::uint8_t> data) override;
    void write(std::uint64_t offset, std::span<const std::uint8_t> data) override;

private:
    // The function the latched address selects, with the register base, or null.
    PciFunction* selected(unsigned& reg) const;

    mutable std::mutex mu_;
    std::uint32_t address_ = 0;
    std::array<std::shared_ptr<PciFunction>, kSlots> slots_{};
};

} // namespace kguest
