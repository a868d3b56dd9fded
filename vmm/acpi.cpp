// ACPI table builder (see acpi.hpp). Section numbers are ACPI 6.5. Tables are
// assembled byte by byte in little-endian order, so no packed structs; the
// DSDT's AML is hand-encoded with the few opcodes it needs (§20).
#include "vmm/acpi.hpp"
#include "devices/base/guest_memory.hpp"

#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>

namespace kguest {

namespace {

using Bytes = std::vector<std::uint8_t>;

constexpr char kOemId[] = "KGUEST";        // 6 bytes, every header and the RSDP

void put_le(Bytes& b, std::uint64_t v, unsigned n) {
    for (unsigned i = 0; i < n; ++i) b.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
void set_le(Bytes& b, std::size_t off, std::uint64_t v, unsigned n) {
    for (unsigned i = 0; i < n; ++i) b[off + i] = static_cast<std::uint8_t>(v >> (8 * i));
}
void put_str(Bytes& b, std::string_view s, std::size_t n) {  // space-padded
    for (std::size_t i = 0; i < n; ++i) b.push_back(i < s.size() ? static_cast<std::uint8_t>(s[i]) : ' ');
}
void append(Bytes& b, const Bytes& x) { b.insert(b.end(), x.begin(), x.end()); }

// The byte that makes [p, p+n) sum to zero with it.
std::uint8_t checksum(const std::uint8_t* p, std::size_t n) {
    std::uint8_t sum = 0;
    for (std::size_t i = 0; i < n; ++i) sum = static_cast<std::uint8_t>(sum + p[i]);
    return static_cast<std::uint8_t>(-sum);
}

// §5.2.6 System Description Table Header (36 bytes); finish() fills in the
// length and checksum once the body is appended.
Bytes header(std::string_view signature, std::uint8_t revision, std::string_view table_id) {
    Bytes t;
    put_str(t, signature, 4);
    put_le(t, 0, 4);            // Length
    t.push_back(revision);
    t.push_back(0);             // Checksum
    put_str(t, kOemId, 6);
    put_str(t, table_id, 8);    // OEM Table ID
    put_le(t, 1, 4);            // OEM Revision
    put_str(t, "KGST", 4);      // Creator ID
    put_le(t, 1, 4);            // Creator Revision
    return t;
}
void finish(Bytes& t) {
    set_le(t, 4, t.size(), 4);
    t[9] = 0;
    t[9] = checksum(t.data(), t.size());
}

// §5.2.3.2 Generic Address Structure for a byte register in system I/O space.
void set_gas_io(Bytes& t, std::size_t off, std::uint16_t port) {
    t[off] = 1;       // Address Space ID: System I/O
    t[off + 1] = 8;   // Register Bit Width
    t[off + 2] = 0;   // Register Bit Offset
    t[off + 3] = 1;   // Access Size: byte
    set_le(t, off + 4, port, 8);
}

// --- AML (§20) -----------------------------------------------------------

// §20.2.4 PkgLength, which counts its own bytes plus the `len` that follow:
// one byte up to 63, else a lead byte (bits 7:6 = extra bytes, bits 3:0 the
// low nibble) and 1-3 bytes holding the rest.
Bytes pkg_length(std::size_t len) {
    if (len + 1 < 0x40) return {static_cast<std::uint8_t>(len + 1)};
    for (unsigned n = 1; n <= 3; ++n) {
        std::size_t total = len + 1 + n;
        if (total < (std::size_t{1} << (4 + 8 * n))) {
            Bytes b{static_cast<std::uint8_t>((n << 6) | (total & 0x0f))};
            for (unsigned i = 0; i < n; ++i) b.push_back(static_cast<std::uint8_t>(total >> (4 + 8 * i)));
            return b;
        }
    }
    throw std::length_error("AML package too large");
}
// opcode(s), PkgLength, body: the shape of Scope, Device, Package, Buffer.
Bytes with_pkg(std::initializer_list<std::uint8_t> op, const Bytes& body) {
    Bytes b(op);
    append(b, pkg_length(body.size()));
    append(b, body);
    return b;
}
// §20.2.2 NameString: an optional root prefix '\' and one 4-character NameSeg.
Bytes name_string(std::string_view name) {
    Bytes b;
    if (!name.empty() && name[0] == '\\') {
        b.push_back('\\');
        name.remove_prefix(1);
    }
    if (name.size() != 4) throw std::logic_error("AML NameSeg must have 4 characters");
    for (char c : name) b.push_back(static_cast<std::uint8_t>(c));
    return b;
}
// §20.2.3 integers: ZeroOp, OneOp, then Byte/Word/DWord/QWordPrefix.
Bytes aml_int(std::uint64_t v) {
    if (v == 0) return {0x00};
    if (v == 1) return {0x01};
    Bytes b;
    unsigned n = v <= 0xff ? 1 : v <= 0xffff ? 2 : v <= 0xffffffff ? 4 : 8;
    b.push_back(n == 1 ? 0x0a : n == 2 ? 0x0b : n == 4 ? 0x0c : 0x0e);
    put_le(b, v, n);
    return b;
}
// ASL EisaId("PNP0A03") (§19.6): three letters in 5 bits each and four
// hex digits, stored as the big-endian EISA ID, a DWord in AML.
Bytes eisa_id(std::string_view id) {
    auto hex = [&](std::size_t i) -> std::uint32_t {
        char c = id[i];
        return static_cast<std::uint32_t>(c <= '9' ? c - '0' : c - 'A' + 10);
    };
    std::uint32_t v = ((id[0] & 0x1fu) << 26) | ((id[1] & 0x1fu) << 21) | ((id[2] & 0x1fu) << 16) |
                      (hex(3) << 12) | (hex(4) << 8) | (hex(5) << 4) | hex(6);
    return {0x0c, static_cast<std::uint8_t>(v >> 24), static_cast<std::uint8_t>(v >> 16),
            static_cast<std::uint8_t>(v >> 8), static_cast<std::uint8_t>(v)};
}
// §20.2.5.1 DefName := NameOp NameString DataRefObject
Bytes aml_name(std::string_view name, const Bytes& value) {
    Bytes b{0x08};
    append(b, name_string(name));
    append(b, value);
    return b;
}
// §20.2.5.4 DefPackage := PackageOp PkgLength NumElements PackageElementList
Bytes aml_package(const std::vector<Bytes>& elements) {
    Bytes body{static_cast<std::uint8_t>(elements.size())};
    for (const auto& e : elements) append(body, e);
    return with_pkg({0x12}, body);
}
// §20.2.5.4 DefBuffer := BufferOp PkgLength BufferSize ByteList
Bytes aml_buffer(const Bytes& data) {
    Bytes body = aml_int(data.size());
    append(body, data);
    return with_pkg({0x11}, body);
}
// §20.2.5.1 DefScope := ScopeOp PkgLength NameString TermList
// §20.2.5.2 DefDevice := ExtOpPrefix DeviceOp PkgLength NameString TermList
constexpr std::initializer_list<std::uint8_t> kScopeOp = {0x10}, kDeviceOp = {0x5b, 0x82};
Bytes aml_named(std::initializer_list<std::uint8_t> op, std::string_view name, const Bytes& terms) {
    Bytes body = name_string(name);
    append(body, terms);
    return with_pkg(op, body);
}

// §20.2.3 String := StringPrefix AsciiCharList NullChar
Bytes aml_string(std::string_view s) {
    Bytes b{0x0d};
    for (char c : s) b.push_back(static_cast<std::uint8_t>(c));
    b.push_back(0x00);
    return b;
}
// §20.2.2 a two-segment path from the root: '\' DualNamePrefix Seg Seg.
Bytes root_path2(std::string_view seg1, std::string_view seg2) {
    Bytes b{'\\', 0x2e};
    append(b, name_string(seg1));
    append(b, name_string(seg2));
    return b;
}
// §20.2.5.2 DefOpRegion := ExtOpPrefix OpRegionOp NameString RegionSpace RegionOffset RegionLen
Bytes aml_io_region(std::string_view name, std::uint16_t port, std::uint8_t len) {
    Bytes b{0x5b, 0x80};
    append(b, name_string(name));
    b.push_back(0x01);   // SystemIO
    append(b, aml_int(port));
    append(b, aml_int(len));
    return b;
}
// §20.2.5.2 DefField := ExtOpPrefix FieldOp PkgLength NameString FieldFlags FieldList,
// one NamedField (NameSeg, then its width in bits as a PkgLength-style count).
Bytes aml_byte_field(std::string_view region, std::string_view field) {
    Bytes body = name_string(region);
    body.push_back(0x01);   // ByteAcc, NoLock, Preserve
    append(body, name_string(field));
    body.push_back(8);      // 8 bits
    return with_pkg({0x5b, 0x81}, body);
}

// --- Resource descriptors (§6.4) ------------------------------------------

// General flags of a bridge window: producer, positive decode, _MIF and _MAF
// set (a fixed aperture, §6.4.3.5 Table 6.44).
constexpr std::uint8_t kWindowFlags = 0x0c;

// §6.4.3.5.3 Word (n = 2) and §6.4.3.5.2 DWord (n = 4) Address Space
// Descriptors. type: 0 memory, 1 I/O, 2 bus number range.
void window(Bytes& b, unsigned n, std::uint8_t type, std::uint8_t type_flags, std::uint32_t min,
            std::uint32_t max) {
    const std::uint8_t tag = n == 4 ? 0x87 : 0x88, len = n == 4 ? 23 : 13;
    b.insert(b.end(), {tag, len, 0, type, kWindowFlags, type_flags});
    for (std::uint32_t v : {0u, min, max, 0u, max - min + 1u}) put_le(b, v, n);  // _GRA _MIN _MAX _TRA _LEN
}
// §6.4.2.5 I/O Port Descriptor, 16-bit decode.
void io_port(Bytes& b, std::uint16_t port, std::uint8_t len) {
    b.insert(b.end(), {0x47, 0x01});
    put_le(b, port, 2);
    put_le(b, port, 2);
    b.insert(b.end(), {0x01, len});
}

// §6.4.2.1 IRQ Descriptor without the information byte (IRQNoFlags):
// edge-triggered, active-high, as ISA interrupts are.
void irq_no_flags(Bytes& b, unsigned irq) {
    b.push_back(0x22);
    put_le(b, 1u << irq, 2);
}

// §6.4.3.6 Extended Interrupt Descriptor: one interrupt, consumer,
// edge-triggered, active-high, exclusive.
void ext_irq_edge(Bytes& b, unsigned gsi) {
    b.insert(b.end(), {0x89, 6, 0, 0x03, 1});
    put_le(b, gsi, 4);
}

// The Generic Event Device (§5.6.9) and the power button it notifies, as
// Cloud Hypervisor's DSDT has them (devices/acpi_pm.hpp has the register):
//   Device (GED_) {
//     Name (_HID, "ACPI0013") Name (_UID, Zero)
//     Name (_CRS, ResourceTemplate () { Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { kGedIrq } })
//     OperationRegion (GDST, SystemIO, pm_port + 3, 1)
//     Field (GDST, ByteAcc, NoLock, Preserve) { GDAT, 8 }
//     Method (_EVT, 1, Serialized) { Local0 = GDAT  If (Local0 & One) { Notify (\_SB_.PWRB, 0x80) } }
//   }
//   Device (PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, Zero) }
// Linux's GED driver (drivers/acpi/evged.c) runs _EVT on the interrupt; 0x80
// on a PNP0C0C device is "button pressed" (§4.8.3.1.1.2), which Linux's ACPI
// button driver reports as KEY_POWER.
Bytes ged_and_power_button(const AcpiConfig& cfg) {
    Bytes crs;
    ext_irq_edge(crs, kGedIrq);
    crs.insert(crs.end(), {0x79, 0x00});
    Bytes notify{0x86};                        // NotifyOp
    append(notify, root_path2("_SB_", "PWRB"));
    append(notify, aml_int(0x80));
    Bytes pred{0x7b, 0x60, 0x01, 0x00};        // And (Local0, One, ) with no target
    Bytes if_body = pred;
    append(if_body, notify);
    Bytes method = name_string("_EVT");
    method.push_back(0x09);                    // one argument, Serialized
    append(method, Bytes{0x70});               // Store (GDAT, Local0)
    append(method, name_string("GDAT"));
    method.push_back(0x60);
    append(method, with_pkg({0xa0}, if_body)); // If
    Bytes ged;
    append(ged, aml_name("_HID", aml_string("ACPI0013")));
    append(ged, aml_name("_UID", aml_int(0)));
    append(ged, aml_name("_CRS", aml_buffer(crs)));
    append(ged, aml_io_region("GDST", static_cast<std::uint16_t>(cfg.pm_port + AcpiPm::kGedEvent), 1));
    append(ged, aml_byte_field("GDST", "GDAT"));
    append(ged, with_pkg({0x14}, method));     // MethodOp
    Bytes out = aml_named(kDeviceOp, "GED_", ged);
    Bytes pwrb;
    append(pwrb, aml_name("_HID", eisa_id("PNP0C0C")));
    append(pwrb, aml_name("_UID", aml_int(0)));
    append(out, aml_named(kDeviceOp, "PWRB", pwrb));
    return out;
}

Bytes build_dsdt(const AcpiConfig& cfg) {
    Bytes t = header("DSDT", 2, "KGDSDT");  // revision 2: 64-bit AML integers (§5.2.11.1)
    // \_S5_ (§7.4.2): SLP_TYPa = 5 is what AcpiPm takes as soft-off; the rest
    // are SLP_TYPb and reserved. Linux registers ACPI poweroff only when \_S5_
    // exists and the FADT has both sleep registers (acpi_sleep_state_supported).
    append(t, aml_name("\\_S5_", aml_package({aml_int(AcpiPm::kSlpTypS5), aml_int(0), aml_int(0), aml_int(0)})));

    // The PCI root bridge (§6.1.5 _HID, §6.5.5 _BBN, §6.5.6 _SEG, §6.2.2 _CRS).
    // Linux with ACPI scans PCI only under a PNP0A03/PNP0A08 device and only
    // inside its _CRS windows, which must cover the BARs kguest assigns.
    Bytes crs;
    window(crs, 2, 2, 0, 0, 0);                      // WordBusNumber: bus 0 only
    const PioDevice& config = pio_device(PioId::pci_config);   // mechanism #1, the bridge's own
    io_port(crs, config.port, static_cast<std::uint8_t>(config.len));
    window(crs, 2, 1, 0x03, 0x0000, 0x0cf7);         // WordIO, _RNG = entire range
    window(crs, 2, 1, 0x03, 0x0d00, 0xffff);
    window(crs, 4, 0, 0x01 /* _RW, non-cacheable */, static_cast<std::uint32_t>(cfg.pci_mmio_base),
           static_cast<std::uint32_t>(cfg.pci_mmio_base + cfg.pci_mmio_size - 1));
    crs.insert(crs.end(), {0x79, 0x00});             // §6.4.2.9 End Tag, checksum 0 = ignored

    // _HID PNP0A03 (conventional PCI) rather than PNP0A08: a PCIe root
    // would make Linux ask for _OSC and MMCONFIG, which we do not have.
    Bytes pci0;
    append(pci0, aml_name("_HID", eisa_id("PNP0A03")));
    append(pci0, aml_name("_SEG", aml_int(0)));
    append(pci0, aml_name("_BBN", aml_int(0)));
    append(pci0, aml_name("_UID", aml_int(0)));
    append(pci0, aml_name("_CRS", aml_buffer(crs)));
    // _PRT (§6.2.13): INTA# of every slot straight to its GSI (Source Zero), as
    // pci::intx_gsi wires it, for drivers without MSI-X (Linux with pci=nomsi).
    std::vector<Bytes> prt;
    for (unsigned slot = 1; slot < PciHostBridge::kSlots; ++slot)
        prt.push_back(aml_package({aml_int((std::uint64_t{slot} << 16) | 0xffff), aml_int(0), aml_int(0),
                                   aml_int(pci::intx_gsi(slot))}));
    append(pci0, aml_name("_PRT", aml_package(prt)));
    Bytes sb = aml_named(kDeviceOp, "PCI0", pci0);

    // The ISA devices with interrupts, from the board table (vmm/board.hpp
    // says why Linux needs them here).
    for (const PioDevice& dev : kPioDevices) {
        if (dev.acpi_name == nullptr) continue;
        Bytes res;
        io_port(res, dev.port, static_cast<std::uint8_t>(dev.len));
        if (dev.irq >= 0) irq_no_flags(res, static_cast<unsigned>(dev.irq));
        res.insert(res.end(), {0x79, 0x00});
        Bytes d;
        append(d, aml_name("_HID", eisa_id(dev.acpi_hid)));
        append(d, aml_name("_UID", aml_int(dev.acpi_uid)));
        append(d, aml_name("_CRS", aml_buffer(res)));
        append(sb, aml_named(kDeviceOp, dev.acpi_name, d));
    }
    append(sb, ged_and_power_button(cfg));
    append(t, aml_named(kScopeOp, "\\_SB_", sb));
    finish(t);
    return t;
}

// §5.2.9 FADT, revision 6 (276 bytes), hardware-reduced.
Bytes build_fadt(const AcpiConfig& cfg, std::uint64_t dsdt_gpa) {
    Bytes t = header("FACP", 6, "KGFACP");
    t.resize(276, 0);
    // IA-PC Boot Architecture Flags (§5.2.9.3): only VGA Not Present (bit 2);
    // 8042 clear (Linux skips probing it), NO_CMOS_RTC clear (the RTC is at
    // 0x70), MSI Not Supported clear.
    set_le(t, 109, 1u << 2, 2);
    // CENTURY: the CMOS index of the RTC's century byte (devices/rtc.cpp keeps
    // it at 0x32, as QEMU does); Linux's mc146818_get_time reads it from here.
    t[108] = 0x32;
    // Fixed Feature Flags (§5.2.9 Table 5.10): WBINVD (0), PWR_BUTTON and
    // SLP_BUTTON (4, 5: no fixed-feature buttons), RESET_REG_SUP (10),
    // HW_REDUCED_ACPI (20). SCI_INT, SMI_CMD and all PM blocks stay 0, as a
    // hardware-reduced platform has none (§4.1); no FACS either.
    set_le(t, 112, (1u << 0) | (1u << 4) | (1u << 5) | (1u << 10) | (1u << 20), 4);
    set_gas_io(t, 116, static_cast<std::uint16_t>(cfg.pm_port + AcpiPm::kReset));  // RESET_REG
    t[128] = AcpiPm::kResetValue;                                                    // RESET_VALUE
    t[131] = 5;                                                   // FADT Minor Version (6.5)
    set_le(t, 140, dsdt_gpa, 8);                                  // X_DSDT (DSDT stays 0)
    set_gas_io(t, 244, static_cast<std::uint16_t>(cfg.pm_port + AcpiPm::kSleepControl));
    set_gas_io(t, 256, static_cast<std::uint16_t>(cfg.pm_port + AcpiPm::kSleepStatus));
    std::memcpy(&t[268], "KGUEST  ", 8);                          // Hypervisor Vendor Identity
    finish(t);
    return t;
}

// §5.2.12 MADT, revision 5 (ACPI 6.3+).
Bytes build_madt(const AcpiConfig& cfg) {
    Bytes t = header("APIC", 5, "KGMADT");
    put_le(t, kLocalApicAddress, 4);
    put_le(t, 1, 4);  // PCAT_COMPAT: KVM_CREATE_IRQCHIP does create the two 8259s
    for (unsigned i = 0; i < cfg.cpus; ++i) {
        // §5.2.12.2 Processor Local APIC: UID = APIC ID = vCPU index, Enabled.
        t.insert(t.end(), {0, 8, static_cast<std::uint8_t>(i), static_cast<std::uint8_t>(i)});
        put_le(t, 1, 4);
    }
    // §5.2.12.3 I/O APIC, GSIs 0-23 (KVM's has 24 pins). ID 0, as QEMU and
    // Firecracker use: KVM's reset value; 64-bit Linux only wants IOAPIC IDs
    // unique among IOAPICs, so sharing 0 with the BSP's APIC ID is harmless.
    t.insert(t.end(), {1, 12, 0, 0});
    put_le(t, kIoApicAddress, 4);
    put_le(t, 0, 4);  // Global System Interrupt Base
    // §5.2.12.5 Interrupt Source Override: ISA IRQ 0 (PIT) is IOAPIC pin 2
    // in KVM, as on a PC. Flags 0: conforms to the ISA bus (edge, high).
    t.insert(t.end(), {2, 10, 0 /* ISA */, 0 /* IRQ 0 */});
    put_le(t, 2, 4);
    put_le(t, 0, 2);
    // §5.2.12.7 Local APIC NMI: all processors (UID 0xff), LINT1, the PC wiring.
    t.insert(t.end(), {4, 6, 0xff, 0, 0, 1});
    finish(t);
    return t;
}

std::size_t align16(std::size_t n) { return (n + 15) & ~std::size_t{15}; }

} // namespace

std::vector<std::uint8_t> build_acpi_tables(const AcpiConfig& cfg) {
    if (cfg.cpus < 1 || cfg.cpus > kMaxCpus)
        throw std::invalid_argument("ACPI: cpus must be 1.." + std::to_string(kMaxCpus));
    if (cfg.pci_mmio_size == 0 || cfg.pci_mmio_base + cfg.pci_mmio_size > kIoApicAddress ||
        cfg.pci_mmio_base + cfg.pci_mmio_size < cfg.pci_mmio_base)
        throw std::invalid_argument("ACPI: the PCI MMIO window must be non-empty and end below the IOAPIC");
    if (cfg.pm_port > 0xffff - AcpiPm::kLen + 1) throw std::invalid_argument("ACPI: bad PM port");

    // Offsets from kAcpiBase; RSDP first (36 bytes, §5.2.5.3).
    const std::size_t xsdt_off = align16(36);
    const std::size_t fadt_off = align16(xsdt_off + 36 + 2 * 8);
    const std::size_t madt_off = align16(fadt_off + 276);
    Bytes madt = build_madt(cfg);
    const std::size_t dsdt_off = align16(madt_off + madt.size());
    Bytes dsdt = build_dsdt(cfg);
    Bytes fadt = build_fadt(cfg, kAcpiBase + dsdt_off);

    // §5.2.8 XSDT: the FADT and the MADT (the DSDT hangs off the FADT).
    Bytes xsdt = header("XSDT", 1, "KGXSDT");
    put_le(xsdt, kAcpiBase + fadt_off, 8);
    put_le(xsdt, kAcpiBase + madt_off, 8);
    finish(xsdt);

    // §5.2.5.3 RSDP, revision 2: no RSDT, the XSDT only.
    Bytes rsdp;
    put_str(rsdp, "RSD PTR ", 8);
    rsdp.push_back(0);          // Checksum of the first 20 bytes
    put_str(rsdp, kOemId, 6);
    rsdp.push_back(2);          // Revision
    put_le(rsdp, 0, 4);         // RsdtAddress
    put_le(rsdp, 36, 4);        // Length
    put_le(rsdp, kAcpiBase + xsdt_off, 8);
    rsdp.push_back(0);          // Extended Checksum, whole structure
    put_le(rsdp, 0, 3);
    rsdp[8] = checksum(rsdp.data(), 20);
    rsdp[32] = checksum(rsdp.data(), 36);

    Bytes out(dsdt_off + dsdt.size(), 0);
    auto place = [&](std::size_t off, const Bytes& b) { std::memcpy(&out[off], b.data(), b.size()); };
    place(0, rsdp);
    place(xsdt_off, xsdt);
    place(fadt_off, fadt);
    place(madt_off, madt);
    place(dsdt_off, dsdt);
    if (out.size() > kAcpiSize) throw std::logic_error("ACPI tables overflow their region");
    return out;
}

std::uint64_t write_acpi_tables(GuestMemory& mem, const AcpiConfig& cfg) {
    Bytes t = build_acpi_tables(cfg);
    if (!mem.write(Gpa(kAcpiBase), t.data(), t.size()))
        throw std::runtime_error("ACPI tables do not fit in guest RAM at 0xe0000");
    return kAcpiBase;
}

} // namespace kguest
