// The board table (vmm/board.hpp) against what a guest sees, without KVM:
// every device the DSDT names, read back from the AML bytes, sits on a PIO
// bus built the way the machine builds it, at its port range and raising its
// IRQ; the MADT's APIC addresses are the board's; and nothing on the buses
// (legacy ports, virtio BARs, the MMIO windows) overlaps another or guest RAM.
#include "vmm/acpi.hpp"
#include "tests/support/bytes.hpp"
#include "vmm/board.hpp"
#include "devices/base/bus.hpp"
#include "devices/base/error.hpp"
#include "devices/base/guest_memory.hpp"
#include "devices/virtio_pci.hpp"

#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace kguest {
namespace {

// A table from build_acpi_tables' output, found through RSDP -> XSDT.
Bytes table(const Bytes& all, const char* sig) {
    const std::uint64_t xsdt = le(&all[24], 8) - kAcpiBase;
    const std::uint64_t xsdt_len = le(&all[xsdt + 4], 4);
    for (std::uint64_t e = xsdt + 36; e + 8 <= xsdt + xsdt_len; e += 8) {
        const std::uint64_t off = le(&all[e], 8) - kAcpiBase;
        if (std::string(reinterpret_cast<const char*>(&all[off]), 4) == sig)
            return Bytes(all.begin() + static_cast<long>(off), all.begin() + static_cast<long>(off + le(&all[off + 4], 4)));
        if (std::string(sig) == "DSDT" && std::string(reinterpret_cast<const char*>(&all[off]), 4) == "FACP") {
            const std::uint64_t dsdt = le(&all[off + 140], 8) - kAcpiBase;  // X_DSDT
            return Bytes(all.begin() + static_cast<long>(dsdt),
                         all.begin() + static_cast<long>(dsdt + le(&all[dsdt + 4], 4)));
        }
    }
    ADD_FAILURE() << "no " << sig;
    return {};
}

// A Device of the DSDT: its name, _HID (EisaId decoded) and the I/O port and
// IRQ descriptors of its _CRS (ACPI 6.5 §6.4.2.1, §6.4.2.5).
struct AmlDevice {
    std::string name, hid;
    std::vector<std::pair<std::uint16_t, std::uint8_t>> io;   // base, length
    std::vector<unsigned> irqs;
};

// Reads the few AML constructs kguest's DSDT uses (§20.2): Scope, Device,
// Name with an integer, string, Package or Buffer, an OperationRegion (one in
// SystemIO counts as the device's I/O ports), and a Field or Method (skipped).
// Anything else fails the test.
class AmlReader {
public:
    explicit AmlReader(const Bytes& dsdt) : p_(dsdt) {}
    std::vector<AmlDevice> devices() {
        std::vector<AmlDevice> out;
        terms(36, p_.size(), nullptr, out);
        return out;
    }

private:
    // §20.2.4: returns the end of the package that starts at i.
    std::size_t package_end(std::size_t& i) {
        const std::size_t start = i;
        const unsigned extra = p_.at(i) >> 6;
        std::size_t len = extra == 0 ? p_[i] & 0x3fu : p_[i] & 0x0fu;
        for (unsigned k = 1; k <= extra; ++k) len |= std::size_t{p_.at(i + k)} << (4 + 8 * (k - 1));
        i += 1 + extra;
        return start + len;
    }
    std::string name(std::size_t& i) {
        std::string s;
        if (p_.at(i) == '\\') s += static_cast<char>(p_[i++]);
        for (int k = 0; k < 4; ++k) s += static_cast<char>(p_.at(i++));
        return s;
    }
    std::uint64_t integer(std::size_t& i) {
        const std::uint8_t op = p_.at(i++);
        if (op == 0x00 || op == 0x01) return op;
        const unsigned n = op == 0x0a ? 1 : op == 0x0b ? 2 : op == 0x0c ? 4 : op == 0x0e ? 8 : 0;
        if (n == 0 || i + n > p_.size()) {
            ADD_FAILURE() << "unexpected AML data opcode 0x" << std::hex << unsigned(op);
            i = p_.size();
            return 0;
        }
        const std::uint64_t v = le(&p_[i], n);
        i += n;
        return v;
    }
    static std::string eisa(std::uint64_t aml_dword) {
        const auto v = __builtin_bswap32(static_cast<std::uint32_t>(aml_dword));   // stored big-endian
        char s[8];
        std::snprintf(s, sizeof s, "%c%c%c%04X", '@' + ((v >> 26) & 0x1f), '@' + ((v >> 21) & 0x1f),
                      '@' + ((v >> 16) & 0x1f), v & 0xffff);
        return s;
    }
    void resources(const Bytes& r, AmlDevice& d) {
        for (std::size_t i = 0; i < r.size();) {
            const std::uint8_t tag = r[i];
            if (tag & 0x80) {   // large item: 16-bit length
                if (tag == 0x89 && r.at(i + 4) == 1)   // Extended Interrupt, one: its number
                    d.irqs.push_back(static_cast<unsigned>(le(&r.at(i + 5), 4)));
                i += 3 + le(&r.at(i + 1), 2);
                continue;
            }
            const std::size_t len = tag & 7u;
            ASSERT_LE(i + 1 + len, r.size());
            if ((tag >> 3) == 0x08 && len == 7) {          // I/O port: info, min, max, align, length
                d.io.emplace_back(static_cast<std::uint16_t>(le(&r[i + 2], 2)), r[i + 7]);
            } else if ((tag >> 3) == 0x04 && len >= 2) {   // IRQ: a 16-bit mask
                for (unsigned b = 0; b < 16; ++b)
                    if (le(&r[i + 1], 2) & (1u << b)) d.irqs.push_back(b);
            } else if ((tag >> 3) == 0x0f) {               // end tag
                return;
            }
            i += 1 + len;
        }
    }
    void terms(std::size_t i, std::size_t end, AmlDevice* dev, std::vector<AmlDevice>& out) {
        while (i < end) {
            const std::uint8_t op = p_[i++];
            if (op == 0x08) {   // Name
                const std::string n = name(i);
                if (p_.at(i) == 0x11) {   // Buffer: PkgLength, size, bytes
                    ++i;
                    const std::size_t e = package_end(i);
                    const std::size_t size = integer(i);
                    if (dev && n == "_CRS") resources(Bytes(p_.begin() + static_cast<long>(i),
                                                            p_.begin() + static_cast<long>(i + size)), *dev);
                    i = e;
                } else if (p_[i] == 0x12) {   // Package: skipped
                    ++i;
                    i = package_end(i);
                } else if (p_[i] == 0x0d) {   // String
                    std::string v;
                    for (++i; p_.at(i) != 0; ++i) v += static_cast<char>(p_[i]);
                    ++i;
                    if (dev && n == "_HID") dev->hid = v;
                } else {
                    const std::uint64_t v = integer(i);
                    if (dev && n == "_HID") dev->hid = eisa(v);
                }
            } else if (op == 0x5b && p_.at(i) == 0x80) {   // OperationRegion
                ++i;
                name(i);
                const std::uint8_t space = p_.at(i++);
                const std::uint64_t base = integer(i), len = integer(i);
                if (dev && space == 1) dev->io.emplace_back(static_cast<std::uint16_t>(base), static_cast<std::uint8_t>(len));
            } else if ((op == 0x5b && p_.at(i) == 0x81) || op == 0x14) {   // Field, Method: skipped
                if (op == 0x5b) ++i;
                i = package_end(i);
            } else if (op == 0x10 || (op == 0x5b && p_.at(i) == 0x82)) {   // Scope, Device
                if (op == 0x5b) ++i;
                const std::size_t e = package_end(i);
                const std::string n = name(i);
                if (op == 0x10) {
                    terms(i, e, nullptr, out);
                } else {
                    AmlDevice d;
                    d.name = n;
                    terms(i, e, &d, out);
                    out.push_back(d);
                }
                i = e;
            } else {
                ADD_FAILURE() << "unexpected AML opcode 0x" << std::hex << unsigned(op) << " at " << std::dec << i - 1;
                return;
            }
        }
    }
    const Bytes& p_;
};

const PioDevice* board_entry_at(std::uint16_t port) {
    for (const auto& d : kPioDevices)
        if (d.port == port) return &d;
    return nullptr;
}

// The PIO bus as the machine builds it, with the IRQ line recorded.
struct Board {
    Board() {
        LegacyWiring w;
        w.irq_line = [this](unsigned irq, bool level) {
            irqs.emplace_back(irq, level);
            return 0;
        };
        w.stop = [](int) {};
        w.power_off = [] {};
        w.reset = [] {};
        w.ram_below_4g = 256ull << 20;
        legacy = make_legacy_devices(w);
        insert_pio_devices(pio, legacy);
    }
    std::vector<std::pair<unsigned, bool>> irqs;
    LegacyDevices legacy;
    Bus pio{"PIO"};
};

TEST(Board, EveryDsdtDeviceSitsOnTheBusAtItsPortAndIrq) {
    const std::vector<AmlDevice> devs = AmlReader(table(build_acpi_tables(AcpiConfig{}), "DSDT")).devices();
    Board board;
    unsigned named = 0;
    bool ged = false, pwrb = false;
    for (const AmlDevice& d : devs) {
        SCOPED_TRACE(d.name);
        if (d.name == "PWRB") {   // the power button: a _HID only, the GED notifies it
            pwrb = true;
            EXPECT_EQ(d.hid, "PNP0C0C");
            EXPECT_TRUE(d.io.empty());
            continue;
        }
        if (d.name == "GED_") {   // its event register: AcpiPm's last byte, and its own IRQ
            ged = true;
            EXPECT_EQ(d.hid, "ACPI0013");
            ASSERT_EQ(d.io.size(), 1u);
            EXPECT_EQ(d.io[0].first, AcpiPm::kBase + AcpiPm::kGedEvent);
            EXPECT_EQ(d.io[0].second, 1u);
            EXPECT_EQ(d.irqs, std::vector<unsigned>{kGedIrq});
            std::uint8_t b = 0;
            EXPECT_TRUE(board.pio.read(d.io[0].first, {&b, 1}));
            for (const auto& e : kPioDevices) EXPECT_NE(e.irq, static_cast<int>(kGedIrq)) << e.name;
            continue;
        }
        ASSERT_FALSE(d.io.empty()) << "every other DSDT device here has I/O ports";
        for (auto [port, len] : d.io) {
            const PioDevice* e = board_entry_at(port);
            ASSERT_NE(e, nullptr) << "port 0x" << std::hex << port << " is not on the board";
            EXPECT_EQ(e->len, len);
            if (d.name == "PCI0") {
                EXPECT_EQ(e->id, PioId::pci_config);
                EXPECT_EQ(d.hid, "PNP0A03");
            } else {
                ++named;
                ASSERT_NE(e->acpi_name, nullptr);
                EXPECT_EQ(d.name, e->acpi_name);
                EXPECT_EQ(d.hid, e->acpi_hid);
                ASSERT_EQ(d.irqs.size(), e->irq < 0 ? 0u : 1u);
                if (e->irq >= 0) {
                    EXPECT_EQ(d.irqs[0], static_cast<unsigned>(e->irq));
                }
            }
            std::uint8_t b = 0;
            for (unsigned p = port; p < port + len; ++p)
                EXPECT_TRUE(board.pio.read(p, {&b, 1})) << "port 0x" << std::hex << p << " unclaimed";
        }
    }
    unsigned in_table = 0;
    for (const auto& e : kPioDevices) in_table += e.acpi_name != nullptr;
    EXPECT_EQ(named, in_table) << "a board device meant for the DSDT is missing from it";
    EXPECT_EQ(named, 2u);   // COM1 and the RTC
    EXPECT_TRUE(ged && pwrb) << "the power button's GED and PNP0C0C device";

    // A press latches the event and pulses the GED's IRQ (an edge).
    board.legacy.acpi_pm->press_power_button();
    EXPECT_EQ(board.irqs, (std::vector<std::pair<unsigned, bool>>{{kGedIrq, true}, {kGedIrq, false}}));
    std::uint8_t ev = 0;
    ASSERT_TRUE(board.pio.read(AcpiPm::kBase + AcpiPm::kGedEvent, {&ev, 1}));
    EXPECT_EQ(ev, AcpiPm::GED_POWER_BUTTON);

    // The ports reach the right models: COM1's scratch register and the
    // RTC's index register, written through the bus, read back directly.
    const std::uint16_t com1 = pio_device(PioId::com1).port, rtc = pio_device(PioId::rtc).port;
    std::uint8_t v = 0x5a;
    ASSERT_TRUE(board.pio.write(com1 + 7u, {&v, 1}));
    v = 0;
    board.legacy.serial->read(7, {&v, 1});
    EXPECT_EQ(v, 0x5a);
    v = 0x32;
    ASSERT_TRUE(board.pio.write(rtc, {&v, 1}));
    v = 0;
    board.legacy.rtc->read(0, {&v, 1});
    EXPECT_EQ(v, 0x32);

    // COM1 raises the IRQ the DSDT names: enable the transmitter-empty
    // interrupt (IER bit 1) through the bus.
    v = 0x02;
    ASSERT_TRUE(board.pio.write(com1 + 1u, {&v, 1}));
    ASSERT_FALSE(board.irqs.empty());
    EXPECT_EQ(board.irqs.back(), std::make_pair(4u, true));
}

TEST(Board, MadtNamesTheBoardsApics) {
    const Bytes madt = table(build_acpi_tables(AcpiConfig{}), "APIC");
    ASSERT_GE(madt.size(), 44u);
    EXPECT_EQ(le(&madt[36], 4), kLocalApicAddress);
    bool ioapic = false;
    for (std::size_t i = 44; i + 2 <= madt.size() && madt[i + 1] >= 2; i += madt[i + 1])
        if (madt[i] == 1) {   // I/O APIC structure
            ioapic = true;
            EXPECT_EQ(le(&madt[i + 4], 4), kIoApicAddress);
        }
    EXPECT_TRUE(ioapic);
}

bool overlap(std::uint64_t a, std::uint64_t alen, std::uint64_t b, std::uint64_t blen) {
    return a < b + blen && b < a + alen;
}

TEST(Board, NothingOnTheBusesOverlapsTheMemoryMap) {
    // The MMIO windows lie in the 32-bit hole, apart from one another.
    for (const auto& w : kMmioWindows) {
        SCOPED_TRACE(w.name);
        EXPECT_GE(w.base, kMmioHoleStart);
        EXPECT_LE(w.base + w.size, kHighRamStart);
        for (const auto& o : kMmioWindows)
            if (&o != &w) {
                EXPECT_FALSE(overlap(w.base, w.size, o.base, o.size)) << o.name;
            }
    }
    // Every PCI slot's BAR fits in the BAR window, and they all fit on one bus.
    struct Nothing : BusDevice {
        void read(std::uint64_t, std::span<std::uint8_t>) override {}
        void write(std::uint64_t, std::span<const std::uint8_t>) override {}
    };
    auto nothing = std::make_shared<Nothing>();
    Bus mmio("MMIO");
    const MmioWindow& bars = kMmioWindows[0];
    for (unsigned slot = 1; slot < PciHostBridge::kSlots; ++slot) {
        const std::uint64_t bar = virtio_bar(slot);
        EXPECT_GE(bar, bars.base);
        EXPECT_LE(bar + VirtioPciDevice::kBarSize, bars.base + bars.size);
        EXPECT_NO_THROW(mmio.insert(bar, VirtioPciDevice::kBarSize, nothing)) << slot;
    }
    EXPECT_THROW(virtio_bar(PciHostBridge::kSlots), UsageError);
    EXPECT_THROW(virtio_bar(0), UsageError);

    // The legacy ports do not overlap (insert_pio_devices would throw).
    EXPECT_NO_THROW(Board{});

    // Guest RAM, small and reaching above 4 GiB, stays out of every window;
    // the ACPI tables' area is RAM below 1 MiB.
    for (std::uint64_t size : {8ull << 20, 256ull << 20, (3ull << 30) + (64ull << 20)}) {
        GuestMemory mem(size, Backing::off);
        for (const auto& r : mem.regions())
            for (const auto& w : kMmioWindows)
                EXPECT_FALSE(overlap(r.gpa.value(), r.size, w.base, w.size)) << w.name << " vs RAM at 0x" << std::hex << r.gpa.value();
        EXPECT_TRUE(mem.contains(Gpa(kAcpiBase), kAcpiSize)) << size;
    }
    EXPECT_LE(kAcpiBase + kAcpiSize, 0x100000u);
}

} // namespace
} // namespace kguest
