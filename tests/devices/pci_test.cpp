// PCI conf1 host bridge and function config space, driven the way a guest
// does: 32-bit address writes to 0xcf8, data accesses at 0xcfc-0xcff (device
// offsets 0..7). Covers Linux's type-1 probe, identity, empty slots, BAR
// sizing and moves, command decode bits, the capability list, the write mask
// at every width and offset, and a seeded hostile-access run.
#include "devices/pci.hpp"

#include <array>
#include <cstdint>
#include <gtest/gtest.h>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

namespace kguest {
namespace {

using Kind = PciFunction::BarKind;

// Port I/O against the bridge; `port` is absolute (0xcf8..0xcff).
struct Guest {
    PciHostBridge& b;

    std::uint32_t in(std::uint16_t port, unsigned size) {
        std::array<std::uint8_t, 8> buf{};
        b.read(port - PciHostBridge::kBase, std::span(buf.data(), size));
        std::uint32_t v = 0;
        for (unsigned i = 0; i < size && i < 4; ++i) v |= std::uint32_t{buf[i]} << (8 * i);
        return v;
    }
    void out(std::uint16_t port, unsigned size, std::uint32_t v) {
        std::array<std::uint8_t, 8> buf{};
        for (unsigned i = 0; i < size && i < 4; ++i) buf[i] = static_cast<std::uint8_t>(v >> (8 * i));
        b.write(port - PciHostBridge::kBase, std::span<const std::uint8_t>(buf.data(), size));
    }
    static std::uint32_t addr(unsigned slot, unsigned reg, unsigned bus = 0, unsigned fn = 0) {
        return 0x80000000u | bus << 16 | slot << 11 | fn << 8 | (reg & 0xfc);
    }
    // As Linux's pci_conf1_read/write: latch, then access 0xcfc + (reg & 3).
    std::uint32_t cfg_read(unsigned slot, unsigned reg, unsigned size = 4) {
        out(0xcf8, 4, addr(slot, reg));
        return in(static_cast<std::uint16_t>(0xcfc + (reg & 3)), size);
    }
    void cfg_write(unsigned slot, unsigned reg, unsigned size, std::uint32_t v) {
        out(0xcf8, 4, addr(slot, reg));
        out(static_cast<std::uint16_t>(0xcfc + (reg & 3)), size, v);
    }
};

struct TestFn : PciFunction {
    std::vector<std::tuple<unsigned, std::uint64_t, std::uint64_t>> moves;
    std::vector<std::pair<std::uint16_t, std::uint16_t>> cmds;
    unsigned config_writes = 0;

    TestFn() {
        set_ids(0x1af4, 0x1041);  // virtio-net, modern (VIRTIO 1.2 §4.1.2.1)
        set_class(0x020000, 0x01);
        set_config(pci::kSubsystemVendor, 2, 0x1af4);
        set_config(pci::kSubsystemId, 2, 0x1100);
        set_config(pci::kInterruptPin, 1, 1);
    }
    void on_bar_moved(unsigned i, std::uint64_t o, std::uint64_t n) override { moves.emplace_back(i, o, n); }
    void on_command_write(std::uint16_t o, std::uint16_t n) override { cmds.emplace_back(o, n); }
    void on_config_write(unsigned, unsigned) override { ++config_writes; }
};

struct Fixture {
    PciHostBridge bridge;
    std::shared_ptr<TestFn> fn = std::make_shared<TestFn>();
    Guest g{bridge};
    Fixture() { bridge.add_function(3, fn); }
};

TEST(PciHostBridge, LinuxType1Probe) {
    Fixture f;
    // pci_check_type1: outb(0x01, 0xcfb); save inl(0xcf8); outl(0x80000000); inl back.
    f.g.out(0xcfb, 1, 0x01);
    EXPECT_EQ(f.g.in(0xcf8, 4), 0u);
    f.g.out(0xcf8, 4, 0x80000000u);
    EXPECT_EQ(f.g.in(0xcf8, 4), 0x80000000u);
    // pci_sanity_check: some slot 0..31 has a host-bridge/VGA class or Intel/Compaq vendor.
    bool sane = false;
    for (unsigned slot = 0; slot < 32; ++slot) {
        const auto cls = f.g.cfg_read(slot, 0x0a, 2), vendor = f.g.cfg_read(slot, 0x00, 2);
        if (cls == 0x0600 || cls == 0x0300 || vendor == 0x8086 || vendor == 0x0e11) sane = true;
    }
    EXPECT_TRUE(sane);
}

TEST(PciHostBridge, HostBridgeAtSlotZero) {
    Fixture f;
    EXPECT_EQ(f.g.cfg_read(0, 0x00), 0x12378086u);
    EXPECT_EQ(f.g.cfg_read(0, 0x08), 0x06000002u);  // class 06/00/00, revision 2
    EXPECT_EQ(f.g.cfg_read(0, 0x0e, 1), 0x00u);     // type-0 header, single function
    EXPECT_EQ(f.g.cfg_read(0, 0x10), 0u);           // no BARs
}

TEST(PciHostBridge, AddedFunctionIdentity) {
    Fixture f;
    EXPECT_EQ(f.g.cfg_read(3, 0x00), 0x10411af4u);
    EXPECT_EQ(f.g.cfg_read(3, 0x02, 2), 0x1041u);
    EXPECT_EQ(f.g.cfg_read(3, 0x08), 0x02000001u);
    EXPECT_EQ(f.g.cfg_read(3, 0x2c), 0x11001af4u);
    EXPECT_EQ(f.g.cfg_read(3, 0x3d, 1), 1u);
}

TEST(PciHostBridge, AddFunctionRefusals) {
    PciHostBridge b;
    auto fn = std::make_shared<TestFn>();
    EXPECT_THROW(b.add_function(0, fn), std::invalid_argument);
    EXPECT_THROW(b.add_function(32, fn), std::invalid_argument);
    EXPECT_THROW(b.add_function(4, nullptr), std::invalid_argument);
    b.add_function(4, fn);
    EXPECT_THROW(b.add_function(4, std::make_shared<TestFn>()), std::invalid_argument);
}

TEST(PciHostBridge, UnreachableFunctionsReadAllOnes) {
    Fixture f;
    EXPECT_EQ(f.g.cfg_read(5, 0x00), 0xffffffffu);  // empty slot
    EXPECT_EQ(f.g.cfg_read(31, 0x3c, 1), 0xffu);
    for (std::uint32_t a : {Guest::addr(3, 0, 1), Guest::addr(3, 0, 0, 1), Guest::addr(3, 0, 0xff, 7),
                            Guest::addr(3, 0) & ~0x80000000u, Guest::addr(3, 0) | 0x01000000u}) {
        f.g.out(0xcf8, 4, a);
        EXPECT_EQ(f.g.in(0xcfc, 4), 0xffffffffu) << std::hex << a;
        EXPECT_EQ(f.g.in(0xcfe, 2), 0xffffu) << std::hex << a;
        f.g.out(0xcf8, 4, a | 0x3c);
        f.g.out(0xcfc, 1, 0x42);  // dropped: must not reach 00:03.0
    }
    EXPECT_EQ(f.g.cfg_read(3, 0x3c, 1), 0u);
    f.g.cfg_write(5, 0x3c, 1, 0x42);  // empty slot: dropped, no crash
}

TEST(PciHostBridge, AddressPortIgnoresByteAndWordWrites) {
    Fixture f;
    f.g.out(0xcf8, 4, 0x80001810u);
    for (std::uint16_t p = 0xcf8; p < 0xcfc; ++p) f.g.out(p, 1, 0);
    f.g.out(0xcf8, 2, 0);
    f.g.out(0xcfa, 2, 0);
    EXPECT_EQ(f.g.in(0xcf8, 4), 0x80001810u);
    EXPECT_EQ(f.g.in(0xcf8, 1), 0xffu);
    EXPECT_EQ(f.g.in(0xcf9, 1), 0xffu);
    EXPECT_EQ(f.g.in(0xcf8, 2), 0xffffu);
}

TEST(PciHostBridge, OddWidthsAndStraddlingAccesses) {
    Fixture f;
    f.fn->set_config(0x40, 4, 0x44332211);
    f.g.out(0xcf8, 4, Guest::addr(3, 0x40));
    std::array<std::uint8_t, 8> buf{};
    for (std::size_t n : {0u, 3u, 5u, 8u}) {
        buf.fill(0);
        f.bridge.read(4, std::span(buf.data(), n));
        for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(buf[i], 0xff);
        f.bridge.write(4, std::span<const std::uint8_t>(buf.data(), n));
    }
    EXPECT_EQ(f.g.in(0xcff, 2), 0xffffu);      // would cross into the next dword
    EXPECT_EQ(f.g.in(0xcfd, 4), 0xffffffffu);
    EXPECT_EQ(f.g.in(0xcfb, 4), 0xffffffffu);  // address/data straddle
    f.bridge.read(100, std::span(buf.data(), 4));  // outside the range entirely
    f.bridge.write(100, std::span<const std::uint8_t>(buf.data(), 4));
    EXPECT_EQ(f.g.in(0xcfc, 4), 0x44332211u);
}

TEST(PciBar, Mem32Sizing) {
    Fixture f;
    f.fn->set_bar(0, 0x1000, Kind::kMem32);
    f.fn->set_bar(1, 0x100000, Kind::kMem32, true);
    EXPECT_EQ(f.g.cfg_read(3, 0x10), 0u);
    f.g.cfg_write(3, 0x10, 4, 0xffffffff);
    EXPECT_EQ(f.g.cfg_read(3, 0x10), 0xfffff000u);
    f.g.cfg_write(3, 0x14, 4, 0xffffffff);
    EXPECT_EQ(f.g.cfg_read(3, 0x14), 0xfff00008u);  // prefetchable
    EXPECT_THROW(f.fn->set_bar(0, 0x1000, Kind::kMem32), std::invalid_argument);  // taken
    EXPECT_THROW(f.fn->set_bar(2, 8, Kind::kMem32), std::invalid_argument);
    EXPECT_THROW(f.fn->set_bar(2, 0x3000, Kind::kMem32), std::invalid_argument);
    EXPECT_THROW(f.fn->set_bar(5, 0x1000, Kind::kMem64), std::invalid_argument);
    EXPECT_THROW(f.fn->set_bar(6, 0x1000, Kind::kMem32), std::invalid_argument);
}

TEST(PciBar, Mem64SizingUsesTwoSlots) {
    Fixture f;
    f.fn->set_bar(0, 0x4000, Kind::kMem64, true);
    f.fn->set_bar(2, 1ull << 33, Kind::kMem64);
    EXPECT_EQ(f.g.cfg_read(3, 0x10), 0x0000000cu);
    EXPECT_THROW(f.fn->set_bar(1, 0x1000, Kind::kMem32), std::invalid_argument);  // upper half
    for (unsigned reg = 0x10; reg < 0x20; reg += 4) f.g.cfg_write(3, reg, 4, 0xffffffff);
    EXPECT_EQ(f.g.cfg_read(3, 0x10), 0xffffc00cu);
    EXPECT_EQ(f.g.cfg_read(3, 0x14), 0xffffffffu);
    EXPECT_EQ(f.g.cfg_read(3, 0x18), 0x00000004u);
    EXPECT_EQ(f.g.cfg_read(3, 0x1c), 0xfffffffeu);
    EXPECT_EQ(f.fn->bar_address(1).address, 0u);  // upper slot is not a BAR of its own
}

TEST(PciBar, IoSizing) {
    Fixture f;
    f.fn->set_bar(4, 0x40, Kind::kIo);
    EXPECT_EQ(f.g.cfg_read(3, 0x20), 0x1u);
    f.g.cfg_write(3, 0x20, 4, 0xffffffff);
    EXPECT_EQ(f.g.cfg_read(3, 0x20), 0x0000ffc1u);  // 16-bit port decode
    EXPECT_THROW(f.fn->set_bar(5, 512, Kind::kIo), std::invalid_argument);
    EXPECT_THROW(f.fn->set_bar(5, 2, Kind::kIo), std::invalid_argument);
}

TEST(PciBar, ProgrammingFiresMoveHook) {
    Fixture f;
    f.fn->set_bar(0, 0x1000, Kind::kMem32);
    f.fn->set_bar(2, 0x4000, Kind::kMem64);
    f.fn->set_bar(4, 0x20, Kind::kIo);
    EXPECT_EQ(f.fn->bar_address(0).address, 0u);
    f.g.cfg_write(3, 0x10, 4, 0xfebf1234);  // low bits forced to the alignment
    EXPECT_EQ(f.g.cfg_read(3, 0x10), 0xfebf1000u);
    ASSERT_EQ(f.fn->moves.size(), 1u);
    EXPECT_EQ(f.fn->moves[0], std::make_tuple(0u, std::uint64_t{0}, std::uint64_t{0xfebf1000}));
    f.g.cfg_write(3, 0x10, 4, 0xfebf1000);  // same address: no event
    EXPECT_EQ(f.fn->moves.size(), 1u);
    f.g.cfg_write(3, 0x18, 4, 0xc0000000);
    f.g.cfg_write(3, 0x1c, 4, 0x1);
    ASSERT_EQ(f.fn->moves.size(), 3u);
    EXPECT_EQ(f.fn->moves[1], std::make_tuple(2u, std::uint64_t{0}, std::uint64_t{0xc0000000}));
    EXPECT_EQ(f.fn->moves[2], std::make_tuple(2u, std::uint64_t{0xc0000000}, std::uint64_t{0x1c0000000}));
    f.g.cfg_write(3, 0x20, 2, 0xc05f);
    EXPECT_EQ(f.fn->bar_address(4).address, 0xc040u);
    EXPECT_EQ(f.g.cfg_read(3, 0x20), 0xc041u);
    EXPECT_FALSE(f.fn->bar_address(0).decode);
    EXPECT_EQ(f.fn->bar_address(2).address, 0x1c0000000u);
}

TEST(PciFunction, CommandDecodeBits) {
    Fixture f;
    f.g.cfg_write(3, 0x04, 2, 0xffff);
    EXPECT_EQ(f.g.cfg_read(3, 0x04, 2), 0x0404u);  // no BARs: only master + INTx disable
    f.fn->set_bar(0, 0x1000, Kind::kMem32);
    f.fn->set_bar(1, 0x100, Kind::kIo);
    f.g.cfg_write(3, 0x10, 4, 0xfe000000);
    f.g.cfg_write(3, 0x14, 4, 0x1000);
    f.g.cfg_write(3, 0x04, 2, 0x0002);
    EXPECT_TRUE(f.fn->bar_address(0).decode);
    EXPECT_FALSE(f.fn->bar_address(1).decode);
    EXPECT_EQ(f.fn->bar_address(0).address, 0xfe000000u);
    f.g.cfg_write(3, 0x04, 4, 0xffffffff);  // dword write also hits Status (read-only here)
    EXPECT_EQ(f.g.cfg_read(3, 0x04), 0x00000407u);
    EXPECT_TRUE(f.fn->bar_address(1).decode);
    ASSERT_EQ(f.fn->cmds.size(), 3u);
    EXPECT_EQ(f.fn->cmds[1], std::make_pair(std::uint16_t{0x0404}, std::uint16_t{0x0002}));
    EXPECT_EQ(f.fn->cmds[2], std::make_pair(std::uint16_t{0x0002}, std::uint16_t{0x0407}));
    f.g.cfg_write(3, 0x06, 1, 0xff);  // no command event for a Status-only write
    EXPECT_EQ(f.fn->cmds.size(), 3u);
}

TEST(PciFunction, CapabilityListWalk) {
    Fixture f;
    EXPECT_EQ(f.g.cfg_read(3, 0x06, 2) & pci::kStatusCapList, 0u);
    const std::vector<std::uint8_t> vendor(14, 0xaa), msix(10, 0x00);
    std::vector<std::uint8_t> msix_mask(10, 0);
    msix_mask[1] = 0xc0;  // Message Control: MSI-X enable + function mask
    const std::vector<std::uint8_t> tiny = {0x5a};
    EXPECT_EQ(f.fn->add_capability(0x09, vendor), 0x40);
    EXPECT_EQ(f.fn->add_capability(0x11, msix, msix_mask), 0x50);
    EXPECT_EQ(f.fn->add_capability(0x09, tiny), 0x5c);
    EXPECT_THROW(f.fn->add_capability(0x11, msix, tiny), std::invalid_argument);
    EXPECT_THROW(f.fn->add_capability(0x09, std::vector<std::uint8_t>(200)), std::invalid_argument);
    EXPECT_NE(f.g.cfg_read(3, 0x06, 2) & pci::kStatusCapList, 0u);

    std::vector<std::pair<unsigned, unsigned>> walk;  // (offset, id), as pci_find_capability does
    unsigned pos = f.g.cfg_read(3, 0x34, 1);
    for (int ttl = 48; pos >= 0x40 && ttl > 0; --ttl) {
        EXPECT_EQ(pos & 3, 0u);
        walk.emplace_back(pos, f.g.cfg_read(3, pos, 1));
        pos = f.g.cfg_read(3, pos + 1, 1);
    }
    const std::vector<std::pair<unsigned, unsigned>> want = {{0x40, 0x09}, {0x50, 0x11}, {0x5c, 0x09}};
    EXPECT_EQ(walk, want);
    EXPECT_EQ(f.g.cfg_read(3, 0x5e, 1), 0x5au);

    f.g.cfg_write(3, 0x34, 1, 0x80);
    f.g.cfg_write(3, 0x50, 4, 0xffffffff);  // ID, Next, Message Control
    EXPECT_EQ(f.g.cfg_read(3, 0x34, 1), 0x40u);
    EXPECT_EQ(f.g.cfg_read(3, 0x50), 0xc0005c11u);
    EXPECT_EQ(f.g.cfg_read(3, 0x40), 0xaaaa5009u);
    const unsigned before = f.fn->config_writes;
    f.g.cfg_write(3, 0x53, 1, 0x00);
    EXPECT_EQ(f.g.cfg_read(3, 0x50), 0x00005c11u);
    EXPECT_EQ(f.fn->config_writes, before + 1);
}

// Identity registers plus everything at 0x00..0x3f that must never change.
std::array<std::uint32_t, 6> identity(Guest& g, unsigned slot) {
    return {g.cfg_read(slot, 0x00), g.cfg_read(slot, 0x08), g.cfg_read(slot, 0x0c) & 0xffff0000u,
            g.cfg_read(slot, 0x2c), g.cfg_read(slot, 0x34), g.cfg_read(slot, 0x3c) & 0xffffff00u};
}

TEST(PciFunction, ReadOnlyRegistersSurviveEveryWidth) {
    Fixture f;
    f.fn->add_capability(0x09, std::vector<std::uint8_t>(6, 0x11));
    const auto want = identity(f.g, 3);
    const auto status = f.g.cfg_read(3, 0x06, 2);
    for (std::uint32_t value : {0xffffffffu, 0u, 0x5a5a5a5au}) {
        for (unsigned reg = 0; reg < 0x48; ++reg) {
            for (unsigned size : {1u, 2u, 4u}) {
                if ((reg & 3) + size > 4) continue;
                f.g.cfg_write(3, reg, size, value);
            }
        }
        EXPECT_EQ(identity(f.g, 3), want);
        EXPECT_EQ(f.g.cfg_read(3, 0x06, 2), status);
        EXPECT_EQ(f.g.cfg_read(3, 0x40), 0x11110009u);
        EXPECT_EQ(f.g.cfg_read(3, 0x10), 0u);  // no BAR declared: hardwired 0
    }
}

TEST(PciFunction, EveryWidthAtEveryOffsetInADword) {
    Fixture f;
    f.fn->set_config(0x40, 4, 0x44332211);
    f.fn->set_writable(0x40, 4, 0x0ff0ff0f);  // nibble-level mask, applied per byte
    EXPECT_EQ(f.g.cfg_read(3, 0x40, 4), 0x44332211u);
    for (unsigned o = 0; o < 4; ++o) EXPECT_EQ(f.g.cfg_read(3, 0x40 + o, 1), 0x11u * (o + 1)) << o;
    for (unsigned o = 0; o < 3; ++o)
        EXPECT_EQ(f.g.cfg_read(3, 0x40 + o, 2), (0x11u * (o + 1)) | (0x11u * (o + 2)) << 8) << o;
    for (unsigned o = 0; o < 4; ++o) {
        f.fn->set_config(0x40, 4, 0);
        f.g.cfg_write(3, 0x40 + o, 1, 0xff);
        EXPECT_EQ(f.g.cfg_read(3, 0x40), (0x0ff0ff0fu & (0xffu << (8 * o)))) << o;
    }
    for (unsigned o = 0; o < 3; ++o) {
        f.fn->set_config(0x40, 4, 0);
        f.g.cfg_write(3, 0x40 + o, 2, 0xffff);
        EXPECT_EQ(f.g.cfg_read(3, 0x40), (0x0ff0ff0fu & (0xffffu << (8 * o)))) << o;
    }
    f.fn->set_config(0x40, 4, 0);
    f.g.cfg_write(3, 0x40, 4, 0xffffffff);
    EXPECT_EQ(f.g.cfg_read(3, 0x40), 0x0ff0ff0fu);
    // The last dword of the space, at every width.
    f.fn->set_writable(0xfc, 4, 0xffffffff);
    f.g.cfg_write(3, 0xff, 1, 0xab);
    f.g.cfg_write(3, 0xfe, 2, 0xcdab);
    EXPECT_EQ(f.g.cfg_read(3, 0xfc), 0xcdab0000u);
    EXPECT_EQ(f.fn->config_read(0xfe, 4), 0xffffcdabu);  // past 0xff reads 0xff
    f.fn->config_write(0xff, 4, 0);                      // clipped at 0xff
    f.fn->config_write(0x100, 4, 0);                     // dropped
    EXPECT_EQ(f.g.cfg_read(3, 0xfc), 0x00ab0000u);
}

TEST(PciHostBridge, HostileRandomAccesses) {
    Fixture f;
    f.fn->set_bar(0, 0x1000, Kind::kMem32);
    f.fn->set_bar(1, 0x4000, Kind::kMem64, true);
    f.fn->set_bar(3, 0x40, Kind::kIo);
    f.fn->add_capability(0x09, std::vector<std::uint8_t>(14, 0x22));
    const auto want0 = identity(f.g, 0), want3 = identity(f.g, 3);
    const auto status3 = f.g.cfg_read(3, 0x06, 2);

    std::mt19937 rng(20240611);
    std::array<std::uint8_t, 8> buf{};
    const std::array<unsigned, 3> slots = {0, 3, 7};
    for (int i = 0; i < 20000; ++i) {
        const unsigned offset = rng() % 8, size = 1 + rng() % 8;
        const std::uint32_t v = rng();
        for (auto& b : buf) b = static_cast<std::uint8_t>(rng());
        if (rng() % 4 == 0) {  // aim at a real function most of the time
            const std::uint32_t a = rng() % 8 == 0 ? v : Guest::addr(slots[rng() % 3], v & 0xff, 0, (v >> 8) % 2);
            f.g.out(0xcf8, 4, a);
        } else if (rng() % 2 == 0) {
            f.bridge.write(offset, std::span<const std::uint8_t>(buf.data(), size));
        } else {
            f.bridge.read(offset, std::span(buf.data(), size));
        }
    }
    EXPECT_EQ(identity(f.g, 0), want0);
    EXPECT_EQ(identity(f.g, 3), want3);
    EXPECT_EQ(f.g.cfg_read(3, 0x06, 2), status3);
    EXPECT_EQ(f.g.cfg_read(3, 0x40), 0x22220009u);
    // BAR type bits and size alignment survived.
    for (unsigned reg = 0x10; reg <= 0x1c; reg += 4) f.g.cfg_write(3, reg, 4, 0xffffffff);
    EXPECT_EQ(f.g.cfg_read(3, 0x10), 0xfffff000u);
    EXPECT_EQ(f.g.cfg_read(3, 0x14), 0xffffc00cu);
    EXPECT_EQ(f.g.cfg_read(3, 0x18), 0xffffffffu);
    EXPECT_EQ(f.g.cfg_read(3, 0x1c), 0x0000ffc1u);
    EXPECT_FALSE(f.fn->moves.empty());
}

} // namespace
} // namespace kguest

namespace kguest {
namespace {

// Slots 1 and 9 share IOAPIC pin 16 (pci::intx_gsi). PCI INTx# lines are
// wired-OR (PCI 3.0 §2.2.6): the pin stays asserted while any function on it
// asserts, so one device lowering its INTx must not drop the other's.
TEST(IntxLines, SharedLineIsTheOrOfItsSlots) {
    std::vector<std::pair<unsigned, bool>> pins;   // what reached the interrupt controller
    std::map<unsigned, bool> level;
    IntxLines lines([&](unsigned gsi, bool l) {
        pins.emplace_back(gsi, l);
        level[gsi] = l;
        return 0;
    });
    ASSERT_EQ(pci::intx_gsi(1), pci::intx_gsi(9));
    const unsigned pin = pci::intx_gsi(1);
    EXPECT_EQ(lines.set(1, true), 0);
    EXPECT_TRUE(level[pin]);
    lines.set(9, true);
    lines.set(9, false);   // slot 9 is served; slot 1 still waits
    EXPECT_TRUE(level[pin]) << "slot 9 lowering the line lost slot 1's interrupt";
    lines.set(1, false);
    EXPECT_FALSE(level[pin]);
    // A slot on another line does not touch pin 16.
    lines.set(2, true);
    EXPECT_TRUE(level[pci::intx_gsi(2)]);
    EXPECT_FALSE(level[pin]);
    // Repeating a level is harmless, and a slot lowering a line it never raised
    // leaves the others' assertion alone.
    lines.set(10, true);
    lines.set(10, true);
    lines.set(2, false);
    EXPECT_TRUE(level[pci::intx_gsi(2)]);
    lines.set(10, false);
    EXPECT_FALSE(level[pci::intx_gsi(2)]);
    lines.set(17, false);
    EXPECT_FALSE(level[pin]);
}

// The pin's errno comes back to the caller.
TEST(IntxLines, ReportsTheLinesErrno) {
    IntxLines lines([](unsigned, bool) { return 5; });
    EXPECT_EQ(lines.set(3, true), 5);
}

} // namespace
} // namespace kguest
