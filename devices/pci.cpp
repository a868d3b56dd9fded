// PCI configuration space and the conf1 host bridge (see pci.hpp).
#include "devices/pci.hpp"

#include <algorithm>
#include <bit>
#include <stdexcept>
#include <string>

namespace kguest {

namespace {
constexpr std::uint32_t kConf1Enable = 0x80000000u;
// Linux's PCI_CONF1_EXT_ADDRESS register bits 11:8 (AMD's IO ECS): no such
// space here, so such accesses read all-ones instead of aliasing the header.
constexpr std::uint32_t kConf1ExtReg = 0x0f000000u;

unsigned bar_offset(unsigned index) { return pci::kBar0 + 4 * index; }
} // namespace

PciFunction::PciFunction() {
    // Command: the decode enables become writable with a BAR of that kind
    // (spec §6.2.2).
    set_writable(pci::kCommand, 2, pci::kCommandMaster | pci::kCommandIntxDisable);
    set_writable(pci::kCacheLine, 1, 0xff);
    set_writable(pci::kInterruptLine, 1, 0xff);
}

void PciFunction::set_ids(std::uint16_t vendor, std::uint16_t device) {
    set_config(pci::kVendorId, 2, vendor);
    set_config(pci::kDeviceId, 2, device);
}

void PciFunction::set_class(std::uint32_t class_code, std::uint8_t revision) {
    set_config(pci::kRevision, 1, revision);
    set_config(pci::kClassProg, 1, class_code & 0xff);
    set_config(pci::kClassProg + 1, 2, (class_code >> 8) & 0xffff);
}

std::uint8_t PciFunction::add_capability(std::uint8_t id, std::span<const std::uint8_t> body,
                                         std::span<const std::uint8_t> writable) {
    if (!writable.empty() && writable.size() != body.size())
        throw std::invalid_argument("pci: capability write mask length differs from its body");
    const unsigned off = cap_end_;
    if (off + 2 + body.size() > pci::kConfigSize)
        throw std::invalid_argument("pci: capability " + std::to_string(id) + " does not fit");
    config_[off] = id;
    config_[off + 1] = 0;
    std::copy(body.begin(), body.end(), config_.begin() + off + 2);
    std::copy(writable.begin(), writable.end(), wmask_.begin() + off + 2);
    config_[last_cap_ == 0 ? pci::kCapPtr : last_cap_ + 1u] = static_cast<std::uint8_t>(off);
    set_config(pci::kStatus, 2, config_read(pci::kStatus, 2) | pci::kStatusCapList);
    last_cap_ = static_cast<std::uint8_t>(off);
    cap_end_ = (off + 2 + static_cast<unsigned>(body.size()) + 3) & ~3u;   // dword aligned (§6.7)
    return last_cap_;
}

void PciFunction::set_bar(unsigned index, std::uint64_t size, BarKind kind, bool prefetchable) {
    const bool is64 = kind == BarKind::kMem64;
    auto slot_free = [this](unsigned i) { return bars_[i].kind == BarKind::kNone && !bars_[i].upper; };
    const bool ok = index < pci::kNumBars && (!is64 || index + 1 < pci::kNumBars) &&
                    std::has_single_bit(size) &&
                    (kind == BarKind::kIo      ? size >= 4 && size <= 256
                     : kind == BarKind::kMem32 ? size >= 16 && size <= (1ull << 31)
                     : is64                    ? size >= 16 && size <= (1ull << 63)
                                               : false) &&
                    slot_free(index) && (!is64 || slot_free(index + 1));
    if (!ok) throw std::invalid_argument("pci: bad BAR " + std::to_string(index));
    // Spec §6.2.5.1: the type bits and the address bits below the size are
    // read-only, so sizing reads back ~(size-1) | type.
    const std::uint64_t mask = ~(size - 1);
    std::uint32_t type = 0;
    if (kind == BarKind::kIo) {
        type = 0x1;
        set_writable(bar_offset(index), 4, static_cast<std::uint32_t>(mask) & 0xfffcu);
        wmask_[pci::kCommand] |= pci::kCommandIo;
    } else {
        type = (is64 ? 0x4u : 0x0u) | (prefetchable ? 0x8u : 0x0u);
        set_writable(bar_offset(index), 4, static_cast<std::uint32_t>(mask) & ~0xfu);
        if (is64) set_writable(bar_offset(index + 1), 4, static_cast<std::uint32_t>(mask >> 32));
        wmask_[pci::kCommand] |= pci::kCommandMemory;
    }
    set_config(bar_offset(index), 4, type);
    bars_[index] = Bar{kind, size, false};
    if (is64) bars_[index + 1] = Bar{BarKind::kNone, 0, true};
}

std::uint64_t PciFunction::raw_bar_address(unsigned index) const {
    const Bar& b = bars_[index];
    const std::uint32_t lo = config_read(bar_offset(index), 4);
    switch (b.kind) {
    case BarKind::kIo: return lo & ~0x3u;
    case BarKind::kMem32: return lo & ~0xfu;
    case BarKind::kMem64:
        return (lo & ~0xfu) | (static_cast<std::uint64_t>(config_read(bar_offset(index + 1), 4)) << 32);
    case BarKind::kNone: break;
    }
    return 0;
}

PciFunction::BarAddress PciFunction::bar_address(unsigned index) const {
    if (index >= pci::kNumBars || bars_[index].kind == BarKind::kNone) return {};
    const std::uint16_t enable = bars_[index].kind == BarKind::kIo ? pci::kCommandIo : pci::kCommandMemory;
    return {raw_bar_address(index), (command() & enable) != 0};
}

std::uint32_t PciFunction::config_read(unsigned offset, unsigned size) const {
    std::uint32_t v = 0;
    for (unsigned i = 0; i < std::min(size, 4u); ++i) {
        const std::uint8_t b = offset + i < pci::kConfigSize ? config_[offset + i] : 0xff;
        v |= static_cast<std::uint32_t>(b) << (8 * i);
    }
    return v;
}

void PciFunction::set_config(unsigned offset, unsigned size, std::uint32_t value) {
    for (unsigned i = 0; i < std::min(size, 4u) && offset + i < pci::kConfigSize; ++i)
        config_[offset + i] = static_cast<std::uint8_t>(value >> (8 * i));
}

void PciFunction::set_writable(unsigned offset, unsigned size, std::uint32_t mask) {
    for (unsigned i = 0; i < std::min(size, 4u) && offset + i < pci::kConfigSize; ++i)
        wmask_[offset + i] = static_cast<std::uint8_t>(mask >> (8 * i));
}

void PciFunction::config_write(unsigned offset, unsigned size, std::uint32_t value) {
    size = std::min(size, 4u);
    if (offset >= pci::kConfigSize || size == 0) return;
    const unsigned end = std::min(offset + size, pci::kConfigSize);
    const std::uint16_t old_cmd = command();
    std::array<std::uint64_t, pci::kNumBars> old_bar{};
    for (unsigned i = 0; i < pci::kNumBars; ++i) old_bar[i] = raw_bar_address(i);

    for (unsigned a = offset; a < end; ++a) {
        const auto v = static_cast<std::uint8_t>(value >> (8 * (a - offset)));
        config_[a] = static_cast<std::uint8_t>((config_[a] & ~wmask_[a]) | (v & wmask_[a]));
    }

    if (offset < pci::kCommand + 2 && end > pci::kCommand) on_command_write(old_cmd, command());
    if (offset < bar_offset(pci::kNumBars) && end > pci::kBar0) {
        for (unsigned i = 0; i < pci::kNumBars; ++i) {
            const std::uint64_t now = raw_bar_address(i);
            if (bars_[i].kind != BarKind::kNone && now != old_bar[i]) on_bar_moved(i, old_bar[i], now);
        }
    }
    on_config_write(offset, end - offset);
}

PciHostBridge::PciHostBridge() {
    // 00:00.0: an i440FX host bridge (as QEMU's pc), which Linux's
    // pci_sanity_check (direct.c) wants before it trusts conf1.
    auto host = std::make_shared<PciFunction>();
    host->set_ids(0x8086, 0x1237);
    host->set_class(0x060000, 0x02);
    slots_[0] = std::move(host);
}

void PciHostBridge::add_function(unsigned slot, std::shared_ptr<PciFunction> fn) {
    std::lock_guard lock(mu_);
    if (slot == 0 || slot >= kSlots || !fn || slots_[slot])
        throw std::invalid_argument("pci: cannot place a function at 00:" + std::to_string(slot) + ".0");
    slots_[slot] = std::move(fn);
}

PciFunction* PciHostBridge::selected(unsigned& reg) const {
    // Spec §3.2.2.3.2: bit 31 enable, 23:16 bus, 15:11 device, 10:8 function,
    // 7:2 register. Only bus 0, function 0 exists here.
    const std::uint32_t a = address_;
    if ((a & kConf1Enable) == 0 || (a & kConf1ExtReg) != 0) return nullptr;
    if (((a >> 16) & 0xff) != 0 || ((a >> 8) & 0x7) != 0) return nullptr;
    reg = a & 0xfc;
    return slots_[(a >> 11) & 0x1f].get();
}

void PciHostBridge::read(std::uint64_t offset, std::span<std::uint8_t> data) {
    std::fill(data.begin(), data.end(), 0xff);
    const std::size_t n = data.size();
    std::lock_guard lock(mu_);
    std::uint32_t v = 0;
    if (offset == 0 && n == 4) {
        // Linux's pci_check_type1 writes 0x80000000 and expects it back.
        v = address_;
    } else if (offset >= 4 && offset < kLen && (n == 1 || n == 2 || n == 4) && offset - 4 + n <= 4) {
        unsigned reg = 0;
        PciFunction* fn = selected(reg);
        if (fn == nullptr) return;  // master abort: all-ones
        v = fn->config_read(reg + static_cast<unsigned>(offset - 4), static_cast<unsigned>(n));
    } else {
        return;  // byte/word reads of 0xcf8-0xcfb, straddling or odd widths
    }
    for (std::size_t i = 0; i < n; ++i) data[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

void PciHostBridge::write(std::uint64_t offset, std::span<const std::uint8_t> data) {
    const std::size_t n = data.size();
    if (n != 1 && n != 2 && n != 4) return;
    std::uint32_t v = 0;
    for (std::size_t i = 0; i < n; ++i) v |= static_cast<std::uint32_t>(data[i]) << (8 * i);
    std::lock_guard lock(mu_);
    if (offset == 0 && n == 4) {
        address_ = v;  // only dword writes latch (direct.c: outl to 0xcf8)
    } else if (offset >= 4 && offset < kLen && offset - 4 + n <= 4) {
        unsigned reg = 0;
        if (PciFunction* fn = selected(reg))
            fn->config_write(reg + static_cast<unsigned>(offset - 4), static_cast<unsigned>(n), v);
    }
    // Byte/word writes to 0xcf8-0xcfb (pci_check_type1's outb(0x01, 0xcfb),
    // 0xcf9 reset control on a PIIX) are ignored.
}

int IntxLines::set(unsigned slot, bool level) {
    const unsigned gsi = pci::intx_gsi(slot);
    std::lock_guard lock(mu_);
    std::set<unsigned>& slots = asserted_[gsi];
    const bool was = !slots.empty();
    if (level) slots.insert(slot); else slots.erase(slot);
    const bool now = !slots.empty();
    return was == now ? 0 : set_line_(gsi, now);
}

} // namespace kguest
