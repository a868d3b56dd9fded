// The ACPI tables (vmm/acpi.cpp), read back the way Linux reads them: find the
// RSDP, check both its checksums, follow RsdtAddress-less XSDT pointers in
// guest memory to the FADT and MADT and from the FADT to the DSDT; every
// table's checksum, the MADT's entries for 1..254 vCPUs, the FADT's flags and
// register addresses, and the AML bytes of \_S5_ and \_SB.PCI0 in the DSDT;
// the whole DSDT through ACPICA's disassembler (iasl -d, Debian's
// acpica-tools, which scripts/lib.sh installs), which must parse it without
// an error and show the power button's Generic Event Device.
#include "devices/acpi_pm.hpp"
#include "vmm/acpi.hpp"
#include "tests/support/bytes.hpp"
#include "tests/support/process.hpp"
#include "devices/base/guest_memory.hpp"

#include <algorithm>
#include <fstream>
#include <sys/stat.h>
#include <unistd.h>
#include <cstdint>
#include <cstring>
#include <gtest/gtest.h>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace kguest {
namespace {

std::uint8_t sum(const std::uint8_t* p, std::size_t n) {
    std::uint8_t s = 0;
    for (std::size_t i = 0; i < n; ++i) s = static_cast<std::uint8_t>(s + p[i]);
    return s;
}

// The tables of one VM, reached through guest memory from the RSDP only.
struct Tables {
    std::uint64_t rsdp_gpa = 0;
    Bytes rsdp;
    std::map<std::string, Bytes> by_sig;  // XSDT, FACP, APIC, DSDT
    std::map<std::string, std::uint64_t> gpa;
};

// Reads a whole table at `gpa`: the header's length, then that many bytes.
Bytes read_table(const GuestMemory& mem, std::uint64_t gpa) {
    auto len = mem.read_obj<std::uint32_t>(Gpa(gpa + 4));
    EXPECT_TRUE(len.has_value());
    if (!len || *len < 36 || *len > 0x10000) return {};
    Bytes t(*len);
    EXPECT_TRUE(mem.read(Gpa(gpa), t.data(), t.size()));
    return t;
}

Tables load(const AcpiConfig& cfg) {
    GuestMemory mem(16 << 20, Backing::off);
    Tables t;
    t.rsdp_gpa = write_acpi_tables(mem, cfg);
    t.rsdp.resize(36);
    EXPECT_TRUE(mem.read(Gpa(t.rsdp_gpa), t.rsdp.data(), 36));
    std::uint64_t xsdt = le(&t.rsdp[24], 8);
    t.by_sig["XSDT"] = read_table(mem, xsdt);
    t.gpa["XSDT"] = xsdt;
    const Bytes& x = t.by_sig["XSDT"];
    for (std::size_t off = 36; off + 8 <= x.size(); off += 8) {
        std::uint64_t gpa = le(&x[off], 8);
        Bytes tab = read_table(mem, gpa);
        std::string sig(tab.begin(), tab.begin() + 4);
        t.gpa[sig] = gpa;
        t.by_sig[sig] = std::move(tab);
    }
    if (t.by_sig.count("FACP")) {
        std::uint64_t dsdt = le(&t.by_sig["FACP"][140], 8);
        t.gpa["DSDT"] = dsdt;
        t.by_sig["DSDT"] = read_table(mem, dsdt);
    }
    return t;
}

bool contains(const Bytes& hay, const Bytes& needle) {
    return std::search(hay.begin(), hay.end(), needle.begin(), needle.end()) != hay.end();
}

TEST(AcpiTables, RsdpIsVersion2WithBothChecksums) {
    Tables t = load({});
    EXPECT_EQ(t.rsdp_gpa, kAcpiBase);
    EXPECT_EQ(t.rsdp_gpa % 16, 0u);  // Linux scans 16-byte boundaries
    EXPECT_GE(t.rsdp_gpa, 0xe0000u);
    EXPECT_LE(t.rsdp_gpa + 36, 0x100000u);
    EXPECT_EQ(std::memcmp(t.rsdp.data(), "RSD PTR ", 8), 0);
    EXPECT_EQ(t.rsdp[15], 2);                       // revision
    EXPECT_EQ(le(&t.rsdp[20], 4), 36u);             // length
    EXPECT_EQ(sum(t.rsdp.data(), 20), 0);           // ACPI 1.0 checksum
    EXPECT_EQ(sum(t.rsdp.data(), 36), 0);           // extended checksum
    EXPECT_EQ(std::memcmp(&t.rsdp[9], "KGUEST", 6), 0);
}

TEST(AcpiTables, XsdtLinksFadtAndMadtAndFadtLinksDsdt) {
    Tables t = load({});
    ASSERT_EQ(t.by_sig["XSDT"].size(), 36u + 16u);
    for (const char* sig : {"XSDT", "FACP", "APIC", "DSDT"}) {
        ASSERT_TRUE(t.by_sig.count(sig)) << sig;
        const Bytes& tab = t.by_sig[sig];
        ASSERT_GE(tab.size(), 36u) << sig;
        EXPECT_EQ(std::string(tab.begin(), tab.begin() + 4), sig);
        EXPECT_EQ(le(&tab[4], 4), tab.size()) << sig;
        EXPECT_EQ(sum(tab.data(), tab.size()), 0) << sig;
        EXPECT_EQ(std::memcmp(&tab[10], "KGUEST", 6), 0) << sig;
        // Inside the reserved region, no overlap with the RSDP.
        EXPECT_GE(t.gpa[sig], kAcpiBase + 36) << sig;
        EXPECT_LE(t.gpa[sig] + tab.size(), kAcpiBase + kAcpiSize) << sig;
    }
    EXPECT_EQ(le(&t.by_sig["FACP"][40], 4), 0u);  // 32-bit DSDT: 0 when X_DSDT is used
    EXPECT_EQ(t.by_sig["DSDT"][8], 2);             // 64-bit AML integers
}

TEST(AcpiTables, FadtIsHardwareReducedWithSleepAndResetRegisters) {
    AcpiConfig cfg;
    cfg.pm_port = 0x1234;
    Tables t = load(cfg);
    const Bytes& f = t.by_sig["FACP"];
    ASSERT_EQ(f.size(), 276u);
    EXPECT_EQ(f[8], 6);                                  // revision
    std::uint32_t flags = static_cast<std::uint32_t>(le(&f[112], 4));
    EXPECT_TRUE(flags & (1u << 20));                     // HW_REDUCED_ACPI
    EXPECT_TRUE(flags & (1u << 10));                     // RESET_REG_SUP
    std::uint16_t boot = static_cast<std::uint16_t>(le(&f[109], 2));
    EXPECT_FALSE(boot & (1u << 1));                      // no 8042
    EXPECT_TRUE(boot & (1u << 2));                       // VGA not present
    EXPECT_FALSE(boot & (1u << 3));                      // MSI supported
    EXPECT_FALSE(boot & (1u << 5));                      // CMOS RTC present
    EXPECT_EQ(f[108], 0x32);                             // CMOS century byte
    EXPECT_EQ(le(&f[46], 2), 0u);                        // no SCI
    EXPECT_EQ(le(&f[36], 4), 0u);                        // no FACS
    EXPECT_EQ(le(&f[132], 8), 0u);
    // RESET_REG, SLEEP_CONTROL_REG, SLEEP_STATUS_REG: byte registers in
    // system I/O space at the AcpiPm ports.
    auto check_gas = [&](std::size_t off, std::uint64_t port) {
        EXPECT_EQ(f[off], 1) << off;      // System I/O
        EXPECT_EQ(f[off + 1], 8) << off;  // bit width
        EXPECT_EQ(f[off + 2], 0) << off;  // bit offset
        EXPECT_EQ(f[off + 3], 1) << off;  // byte access
        EXPECT_EQ(le(&f[off + 4], 8), port) << off;
    };
    check_gas(116, 0x1234 + AcpiPm::kReset);
    check_gas(244, 0x1234 + AcpiPm::kSleepControl);
    check_gas(256, 0x1234 + AcpiPm::kSleepStatus);
    EXPECT_EQ(f[128], AcpiPm::kResetValue);
    EXPECT_EQ(std::string(f.begin() + 268, f.begin() + 276), "KGUEST  ");
    // No legacy PM blocks at all.
    for (std::size_t off = 48; off < 96; ++off) EXPECT_EQ(f[off], 0) << off;
    for (std::size_t off = 148; off < 244; ++off) EXPECT_EQ(f[off], 0) << off;
}

TEST(AcpiTables, MadtHasOneLocalApicPerCpuAndTheIoApic) {
    for (unsigned cpus : {1u, 2u, 64u, 254u}) {
        AcpiConfig cfg;
        cfg.cpus = cpus;
        Tables t = load(cfg);
        const Bytes& m = t.by_sig["APIC"];
        ASSERT_GE(m.size(), 44u);
        EXPECT_EQ(sum(m.data(), m.size()), 0) << cpus;
        EXPECT_EQ(le(&m[36], 4), 0xfee00000u);
        std::map<int, unsigned> count;
        unsigned entries = 0, next_cpu = 0;
        std::size_t off = 44;
        while (off + 2 <= m.size()) {
            std::uint8_t type = m[off], len = m[off + 1];
            ASSERT_GE(len, 2u);
            ASSERT_LE(off + len, m.size());
            ++entries;
            ++count[type];
            const std::uint8_t* e = &m[off];
            switch (type) {
            case 0:  // Processor Local APIC
                ASSERT_EQ(len, 8);
                EXPECT_EQ(e[2], next_cpu);  // ACPI processor UID
                EXPECT_EQ(e[3], next_cpu);  // APIC ID
                EXPECT_EQ(le(e + 4, 4), 1u);  // enabled
                ++next_cpu;
                break;
            case 1:  // I/O APIC
                ASSERT_EQ(len, 12);
                EXPECT_EQ(e[2], 0);
                EXPECT_EQ(le(e + 4, 4), 0xfec00000u);
                EXPECT_EQ(le(e + 8, 4), 0u);
                break;
            case 2:  // Interrupt Source Override
                ASSERT_EQ(len, 10);
                EXPECT_EQ(e[2], 0);         // ISA
                EXPECT_EQ(e[3], 0);         // IRQ 0
                EXPECT_EQ(le(e + 4, 4), 2u);  // GSI 2
                break;
            case 4:  // Local APIC NMI
                ASSERT_EQ(len, 6);
                EXPECT_EQ(e[2], 0xff);
                EXPECT_EQ(e[5], 1);         // LINT1
                break;
            default:
                ADD_FAILURE() << "unexpected MADT entry type " << int(type);
            }
            off += len;
        }
        EXPECT_EQ(off, m.size());
        EXPECT_EQ(entries, cpus + 3) << cpus;
        EXPECT_EQ(count[0], cpus);
        EXPECT_EQ(count[1], 1u);
        EXPECT_EQ(count[2], 1u);
        EXPECT_EQ(count[4], 1u);
    }
}

TEST(AcpiTables, DsdtHasS5ThePciRootBridgeAndTheIsaDevices) {
    Tables t = load({});
    const Bytes& d = t.by_sig["DSDT"];
    // Name(\_S5_, Package(4){5, Zero, Zero, Zero})
    EXPECT_TRUE(contains(d, {0x08, '\\', '_', 'S', '5', '_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0x00, 0x00, 0x00}));
    // Device(PCI0) inside Scope(\_SB_), with _HID EisaId("PNP0A03").
    EXPECT_TRUE(contains(d, {'P', 'C', 'I', '0', 0x08, '_', 'H', 'I', 'D', 0x0c, 0x41, 0xd0, 0x0a, 0x03}));
    // COM1 (PNP0501) with IO 0x3f8/8 and IRQNoFlags{4}; the RTC (PNP0B00)
    // with IO 0x70/2 and IRQNoFlags{8}: Linux maps no ISA IRQ without them.
    EXPECT_TRUE(contains(d, {'C', 'O', 'M', '1', 0x08, '_', 'H', 'I', 'D', 0x0c, 0x41, 0xd0, 0x05, 0x01}));
    EXPECT_TRUE(contains(d, {0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, 0x22, 0x10, 0x00, 0x79, 0x00}));
    EXPECT_TRUE(contains(d, {'R', 'T', 'C', '_', 0x08, '_', 'H', 'I', 'D', 0x0c, 0x41, 0xd0, 0x0b, 0x00}));
    EXPECT_TRUE(contains(d, {0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02, 0x22, 0x00, 0x01, 0x79, 0x00}));
    // _PRT: slot 1's INTA# to GSI 16, slot 8's to 23, slot 9's to 16 again
    // (Package(4){0xSSSSFFFF, Zero, Zero, GSI}), as pci::intx_gsi wires them.
    EXPECT_TRUE(contains(d, {0x08, '_', 'P', 'R', 'T', 0x12}));
    EXPECT_TRUE(contains(d, {0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x0a, 0x10}));
    EXPECT_TRUE(contains(d, {0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x08, 0x00, 0x00, 0x00, 0x0a, 0x17}));
    EXPECT_TRUE(contains(d, {0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x09, 0x00, 0x00, 0x00, 0x0a, 0x10}));
    for (const char* n : {"_SEG", "_BBN", "_UID"})
        EXPECT_TRUE(contains(d, {0x08, Bytes::value_type(n[0]), Bytes::value_type(n[1]), Bytes::value_type(n[2]),
                                 Bytes::value_type(n[3]), 0x00}))
            << n;

    // The Scope's multi-byte PkgLength reaches exactly to the table's end
    // (it holds everything after \_S5_).
    const Bytes sb{'\\', '_', 'S', 'B', '_'};
    auto name = std::search(d.begin(), d.end(), sb.begin(), sb.end());
    ASSERT_NE(name, d.end());
    std::size_t name_pos = static_cast<std::size_t>(name - d.begin()), op = 0;
    for (std::size_t n = 1; n <= 4 && n + 1 <= name_pos; ++n)  // ScopeOp, then an n-byte PkgLength
        if (d[name_pos - n - 1] == 0x10 && (d[name_pos - n] >> 6) + 1u == n) op = name_pos - n - 1;
    ASSERT_NE(op, 0u);
    std::size_t pos = op + 1;
    unsigned extra = d[pos] >> 6;
    EXPECT_GE(extra, 1u);  // more than 63 bytes
    std::size_t len = d[pos] & 0x0f;
    for (unsigned i = 0; i < extra; ++i) len |= std::size_t{d[pos + 1 + i]} << (4 + 8 * i);
    EXPECT_EQ(pos + len, d.size());

    // The _CRS memory window: DWord Address Space Descriptor, memory,
    // covering [0xc0000000, 0xfec00000).
    Bytes mem{0x87, 23, 0, 0, 0x0c, 0x01, 0, 0, 0, 0, 0x00, 0x00, 0x00, 0xc0, 0xff, 0xff, 0xbf, 0xfe};
    EXPECT_TRUE(contains(d, mem));
    // I/O 0xcf8-0xcff and the two WordIO windows around it.
    EXPECT_TRUE(contains(d, {0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08}));
    EXPECT_TRUE(contains(d, {0x88, 13, 0, 1, 0x0c, 0x03, 0, 0, 0x00, 0x00, 0xf7, 0x0c, 0, 0, 0xf8, 0x0c}));
    EXPECT_TRUE(contains(d, {0x88, 13, 0, 1, 0x0c, 0x03, 0, 0, 0x00, 0x0d, 0xff, 0xff, 0, 0, 0x00, 0xf3}));
    EXPECT_TRUE(contains(d, {0x88, 13, 0, 2, 0x0c, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00}));  // bus 0..0
}

TEST(AcpiTables, DsdtHasTheGedAndThePowerButton) {
    Tables t = load({});
    const Bytes& d = t.by_sig["DSDT"];
    // Device (GED_) { Name (_HID, "ACPI0013") ... }
    EXPECT_TRUE(contains(d, {'G', 'E', 'D', '_', 0x08, '_', 'H', 'I', 'D', 0x0d, 'A', 'C', 'P', 'I', '0', '0', '1', '3', 0}));
    // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { kGedIrq }, then the End Tag.
    EXPECT_TRUE(contains(d, {0x89, 0x06, 0x00, 0x03, 0x01, static_cast<std::uint8_t>(kGedIrq), 0, 0, 0, 0x79, 0x00}));
    // OperationRegion (GDST, SystemIO, 0x603, One): the GED register of AcpiPm.
    const std::uint16_t port = AcpiPm::kBase + AcpiPm::kGedEvent;
    EXPECT_TRUE(contains(d, {0x5b, 0x80, 'G', 'D', 'S', 'T', 0x01, 0x0b, static_cast<std::uint8_t>(port),
                             static_cast<std::uint8_t>(port >> 8), 0x01}));
    // Notify (\_SB_.PWRB, 0x80) and Device (PWRB) with _HID EisaId ("PNP0C0C").
    EXPECT_TRUE(contains(d, {0x86, '\\', 0x2e, '_', 'S', 'B', '_', 'P', 'W', 'R', 'B', 0x0a, 0x80}));
    EXPECT_TRUE(contains(d, {'P', 'W', 'R', 'B', 0x08, '_', 'H', 'I', 'D', 0x0c, 0x41, 0xd0, 0x0c, 0x0c}));
}

TEST(AcpiTables, DsdtDisassemblesCleanlyWithIasl) {
    const std::string dir = "/tmp/kguest-acpi-test-" + std::to_string(::getpid());
    ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0) << dir;
    const Bytes d = load({}).by_sig["DSDT"];
    {
        std::ofstream f(dir + "/dsdt.dat", std::ios::binary);
        f.write(reinterpret_cast<const char*>(d.data()), static_cast<std::streamsize>(d.size()));
    }
    const test::ProcResult r = test::run_process({"iasl", "-d", dir + "/dsdt.dat"}, 30);
    const std::string dsl = test::slurp(dir + "/dsdt.dsl");
    ::unlink((dir + "/dsdt.dat").c_str());
    ::unlink((dir + "/dsdt.dsl").c_str());
    ::rmdir(dir.c_str());
    ASSERT_EQ(r.status, 0) << "iasl -d (Debian's acpica-tools; scripts/lib.sh installs it): " << r.out << r.err;
    EXPECT_EQ(r.out.find("Error"), std::string::npos) << r.out;
    EXPECT_EQ(r.err.find("Error"), std::string::npos) << r.err;
    // ASL as ACPICA prints it back.
    for (const char* want : {"Name (_HID, \"ACPI0013\"", "Name (_HID, EisaId (\"PNP0C0C\")",
                             "OperationRegion (GDST, SystemIO, 0x0603, One)", "GDAT,   8",
                             "Method (_EVT, 1, Serialized)", "Notify (\\_SB.PWRB, 0x80)",
                             "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
                             "Device (PCI0)", "_S5, Package (0x04)"})
        EXPECT_NE(dsl.find(want), std::string::npos) << want << "\n" << dsl;
}

TEST(AcpiTables, DsdtFollowsTheConfiguredMmioWindow) {
    AcpiConfig cfg;
    cfg.pci_mmio_base = 0xd0000000;
    cfg.pci_mmio_size = 0x10000000;
    Bytes all = build_acpi_tables(cfg);
    EXPECT_TRUE(contains(all, {0x87, 23, 0, 0, 0x0c, 0x01, 0, 0, 0, 0, 0x00, 0x00, 0x00, 0xd0, 0xff, 0xff, 0xff,
                               0xdf, 0, 0, 0, 0, 0x00, 0x00, 0x00, 0x10}));
}

TEST(AcpiTables, BuildIsDeterministicAndFitsTheRegion) {
    AcpiConfig cfg;
    cfg.cpus = 254;
    Bytes a = build_acpi_tables(cfg), b = build_acpi_tables(cfg);
    EXPECT_EQ(a, b);
    EXPECT_LE(a.size(), kAcpiSize);
    EXPECT_LE(kAcpiBase + kAcpiSize, 0x100000u);
}

TEST(AcpiTables, RejectsConfigsOutsideTheLimits) {
    AcpiConfig cfg;
    cfg.cpus = 0;
    EXPECT_THROW(build_acpi_tables(cfg), std::invalid_argument);
    cfg.cpus = 255;
    EXPECT_THROW(build_acpi_tables(cfg), std::invalid_argument);
    cfg = {};
    cfg.pci_mmio_size = 0xfec00000 - 0xc0000000 + 1;  // runs into the IOAPIC
    EXPECT_THROW(build_acpi_tables(cfg), std::invalid_argument);
    cfg = {};
    cfg.pci_mmio_size = 0;
    EXPECT_THROW(build_acpi_tables(cfg), std::invalid_argument);
}

TEST(AcpiTables, WritesExactlyTheBuiltBytes) {
    GuestMemory mem(2 << 20, Backing::off);
    AcpiConfig cfg;
    cfg.cpus = 4;
    ASSERT_EQ(write_acpi_tables(mem, cfg), kAcpiBase);
    Bytes built = build_acpi_tables(cfg), in_guest(built.size());
    ASSERT_TRUE(mem.read(Gpa(kAcpiBase), in_guest.data(), in_guest.size()));
    EXPECT_EQ(built, in_guest);
}

} // namespace
} // namespace kguest
