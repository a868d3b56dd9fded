// virtio-pci modern transport (VIRTIO 1.2 section 4.1). A fake VirtioDevice
// and the fake interrupt sink (support/fake_virtio.hpp) stand in for
// virtio-net and the VMM's irqfds; a fake driver plays Linux's
// virtio_pci_modern: it walks the capability list through config space,
// sizes and programs BAR 4 (the test's BAR hook maps it on a real MMIO Bus),
// negotiates features and sets up queues over rings in a real GuestMemory,
// kicks, and checks the interrupts. Then the refusals of
// the status machine, reset, NEEDS_RESET, MSI-X masking, odd accesses, the
// PCI_CFG window, and a fixed-seed hostile run over BAR and config space.
#include "devices/virtio_pci.hpp"

#include "tests/support/fake_virtio.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <gtest/gtest.h>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <vector>

namespace kguest {
namespace {

class FakeDevice : public VirtioDevice {
public:
    std::uint64_t features = virtio_bit(0) | virtio_bit(5) | virtio_bit(VIRTIO_F_INDIRECT_DESC) |
                             virtio_bit(VIRTIO_F_EVENT_IDX) | virtio_bit(VIRTIO_F_RING_PACKED);
    std::array<std::uint8_t, 8> config{1, 2, 3, 4, 5, 6, 7, 8};
    int activations = 0, resets = 0;
    bool refuse = false;
    std::vector<std::uint16_t> notifies;
    std::span<Virtqueue> queues;

    std::uint16_t device_id() const override { return 1; }
    std::uint64_t device_features() const override { return features; }
    bool accept_features(std::uint64_t) override { return !refuse; }
    std::uint16_t num_queues() const override { return 2; }
    std::uint16_t max_queue_size(std::uint16_t q) const override { return q == 0 ? 256 : 128; }
    std::size_t config_size() const override { return config.size(); }
    void read_config(std::uint64_t offset, std::span<std::uint8_t> data) override {
        std::memcpy(data.data(), config.data() + offset, data.size());
    }
    void write_config(std::uint64_t offset, std::span<const std::uint8_t> data) override {
        std::memcpy(config.data() + offset, data.data(), data.size());
    }
    void activate(std::span<Virtqueue> q, GuestMemory&) override {
        ++activations;
        queues = q;
    }
    void reset() override {
        ++resets;
        queues = {};
    }
    // Completes every available chain with 0 bytes written.
    void queue_notify(std::uint16_t q) override {
        notifies.push_back(q);
        if (q >= queues.size() || !queues[q].ready()) return;
        Virtqueue& vq = queues[q];
        DescChain chain;
        PopStatus st;
        while ((st = vq.pop_or_enable_notifications(chain)) == PopStatus::ok) vq.push_used(chain.head(), 0);
        if (st == PopStatus::error) {
            fail();
            return;
        }
        if (vq.needs_notification()) notify_used(q);
    }
    void change_config() {
        ++config[0];
        notify_config_changed();
    }
    void fail_now() { fail(); }
};

using Sink = fake::Interrupts;

constexpr std::uint64_t kBarGpa = 0x800000000;   // above 4 GiB: both BAR halves used
constexpr std::uint64_t kDataGpa = 0x100000;

struct Cap {
    std::uint8_t pos = 0, bar = 0xff;
    std::uint32_t offset = 0, length = 0, extra = 0;
};

class VirtioPciTest : public ::testing::Test {
protected:
    GuestMemory mem{4 << 20, Backing::off};
    std::shared_ptr<FakeDevice> dev = std::make_shared<FakeDevice>();
    std::shared_ptr<Sink> sink = std::make_shared<Sink>();
    std::shared_ptr<VirtioPciDevice> pci = std::make_shared<VirtioPciDevice>(dev, mem, sink, 0x020000);
    Bus mmio{"mmio"};
    std::uint64_t mapped = 0;
    int bar_hook_calls = 0;
    std::map<std::uint8_t, Cap> caps;   // by cfg_type
    std::uint8_t msix_pos = 0;

    VirtioPciTest() {
        // What the VMM will do: keep the BAR mapped on the MMIO bus.
        pci->set_bar_hook([this](std::uint64_t gpa, bool decode) {
            ++bar_hook_calls;
            if (mapped != 0) mmio.remove(mapped);
            mapped = 0;
            if (decode && gpa != 0 && gpa <= std::numeric_limits<std::uint64_t>::max() - 2 * VirtioPciDevice::kBarSize) {
                mmio.insert(gpa, VirtioPciDevice::kBarSize, pci->bar_device());
                mapped = gpa;
            }
        });
    }

    // ---- config space ----
    std::uint32_t cfg(unsigned off, unsigned size) const { return pci->config_read(off, size); }
    void cfg_w(unsigned off, unsigned size, std::uint32_t v) { pci->config_write(off, size, v); }

    // Linux's virtio_pci_find_capability + pci_find_capability, BAR setup
    // as the PCI core does it, memory decode and bus master on.
    void probe() {
        unsigned pos = cfg(pci::kCapPtr, 1) & 0xfc;
        for (int guard = 0; pos != 0 && guard < 48; ++guard) {
            const std::uint8_t id = static_cast<std::uint8_t>(cfg(pos, 1));
            if (id == PCI_CAP_ID_VNDR) {
                const auto type = static_cast<std::uint8_t>(cfg(pos + 3, 1));
                if (!caps.count(type))
                    caps[type] = Cap{static_cast<std::uint8_t>(pos), static_cast<std::uint8_t>(cfg(pos + 4, 1)),
                                     cfg(pos + 8, 4), cfg(pos + 12, 4), cfg(pos + 16, 4)};
            } else if (id == PCI_CAP_ID_MSIX) {
                msix_pos = static_cast<std::uint8_t>(pos);
            }
            pos = cfg(pos + 1, 1) & 0xfc;
        }
        ASSERT_EQ(caps.size(), 5u);
        ASSERT_NE(msix_pos, 0);
        const unsigned bar_reg = pci::kBar0 + 4 * caps[VIRTIO_PCI_CAP_COMMON_CFG].bar;
        cfg_w(bar_reg, 4, 0xffffffff);
        cfg_w(bar_reg + 4, 4, 0xffffffff);
        const std::uint64_t sz = ~((std::uint64_t{cfg(bar_reg + 4, 4)} << 32) | (cfg(bar_reg, 4) & ~0xfu)) + 1;
        EXPECT_EQ(sz, VirtioPciDevice::kBarSize);
        EXPECT_EQ(cfg(bar_reg, 4) & 0xf, 0x4u);   // 64-bit memory, not prefetchable
        cfg_w(bar_reg, 4, static_cast<std::uint32_t>(kBarGpa));
        cfg_w(bar_reg + 4, 4, static_cast<std::uint32_t>(kBarGpa >> 32));
        cfg_w(pci::kCommand, 2, cfg(pci::kCommand, 2) | pci::kCommandMemory | pci::kCommandMaster);
        ASSERT_EQ(mapped, kBarGpa);
    }

    // ---- BAR through the MMIO bus ----
    std::uint64_t rd(std::uint64_t off, std::size_t n) {
        std::array<std::uint8_t, 8> b{};
        mmio.read(kBarGpa + off, std::span(b.data(), n));
        std::uint64_t v = 0;
        for (std::size_t i = 0; i < n; ++i) v |= std::uint64_t{b[i]} << (8 * i);
        return v;
    }
    void wr(std::uint64_t off, std::size_t n, std::uint64_t v) {
        std::array<std::uint8_t, 8> b{};
        for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<std::uint8_t>(v >> (8 * i));
        mmio.write(kBarGpa + off, std::span<const std::uint8_t>(b.data(), n));
    }
    std::uint64_t common(unsigned off, std::size_t n) { return rd(caps[VIRTIO_PCI_CAP_COMMON_CFG].offset + off, n); }
    void common_w(unsigned off, std::size_t n, std::uint64_t v) { wr(caps[VIRTIO_PCI_CAP_COMMON_CFG].offset + off, n, v); }
    std::uint8_t status() { return static_cast<std::uint8_t>(common(VIRTIO_PCI_COMMON_STATUS, 1)); }
    void add_status(std::uint8_t s) { common_w(VIRTIO_PCI_COMMON_STATUS, 1, status() | s); }
    // device_status straight from the BAR, wherever the guest moved it.
    std::uint8_t raw_status() {
        std::array<std::uint8_t, 1> b{};
        pci->read(VirtioPciDevice::kCommonOffset + VIRTIO_PCI_COMMON_STATUS, b);
        return b[0];
    }
    std::uint8_t isr() { return static_cast<std::uint8_t>(rd(caps[VIRTIO_PCI_CAP_ISR_CFG].offset, 1)); }
    // MSI-X table entry v's mask bit and PBA bit v, as the guest reads them.
    bool entry_masked(unsigned v) { return (rd(VirtioPciDevice::kMsixTableOffset + 16 * v + 12, 4) & 1) != 0; }
    bool pending(unsigned v) { return (rd(VirtioPciDevice::kMsixPbaOffset, 8) >> v & 1) != 0; }

    std::uint64_t device_features() {
        common_w(VIRTIO_PCI_COMMON_DFSELECT, 4, 0);
        std::uint64_t f = common(VIRTIO_PCI_COMMON_DF, 4);
        common_w(VIRTIO_PCI_COMMON_DFSELECT, 4, 1);
        return f | common(VIRTIO_PCI_COMMON_DF, 4) << 32;
    }
    void set_driver_features(std::uint64_t f) {
        common_w(VIRTIO_PCI_COMMON_GFSELECT, 4, 0);
        common_w(VIRTIO_PCI_COMMON_GF, 4, f & 0xffffffff);
        common_w(VIRTIO_PCI_COMMON_GFSELECT, 4, 1);
        common_w(VIRTIO_PCI_COMMON_GF, 4, f >> 32);
    }

    // virtio_dev_probe up to FEATURES_OK; returns the read-back status.
    std::uint8_t negotiate(std::uint64_t want) {
        common_w(VIRTIO_PCI_COMMON_STATUS, 1, 0);
        EXPECT_EQ(status(), 0);
        add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
        add_status(VIRTIO_CONFIG_S_DRIVER);
        set_driver_features(want);
        add_status(VIRTIO_CONFIG_S_FEATURES_OK);
        return status();
    }

    void enable_msix() {
        cfg_w(msix_pos + 2, 2, PCI_MSIX_FLAGS_ENABLE);
        const std::uint64_t table = VirtioPciDevice::kMsixTableOffset;
        for (unsigned v = 0; v < 3; ++v) {
            wr(table + 16 * v, 4, 0xfee00000 + v);
            wr(table + 16 * v + 4, 4, 0);
            wr(table + 16 * v + 8, 4, 0x40 + v);
            wr(table + 16 * v + 12, 4, 0);   // unmask
        }
    }

    static std::uint64_t desc_gpa(unsigned q) { return 0x10000 + 0x10000ull * q; }
    static std::uint64_t avail_gpa(unsigned q) { return desc_gpa(q) + 0x4000; }
    static std::uint64_t used_gpa(unsigned q) { return desc_gpa(q) + 0x8000; }

    // vp_modern setup_vq for queue q: returns queue_enable read back.
    std::uint64_t setup_queue(std::uint16_t q, std::uint16_t size, std::uint16_t vector,
                              std::uint64_t desc = 0) {
        common_w(VIRTIO_PCI_COMMON_Q_SELECT, 2, q);
        EXPECT_NE(common(VIRTIO_PCI_COMMON_Q_SIZE, 2), 0u);
        EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_ENABLE, 2), 0u);
        common_w(VIRTIO_PCI_COMMON_Q_SIZE, 2, size);
        const std::uint64_t d = desc != 0 ? desc : desc_gpa(q);
        common_w(VIRTIO_PCI_COMMON_Q_DESCLO, 4, d & 0xffffffff);
        common_w(VIRTIO_PCI_COMMON_Q_DESCHI, 4, d >> 32);
        common_w(VIRTIO_PCI_COMMON_Q_AVAILLO, 4, avail_gpa(q));
        common_w(VIRTIO_PCI_COMMON_Q_AVAILHI, 4, 0);
        common_w(VIRTIO_PCI_COMMON_Q_USEDLO, 4, used_gpa(q));
        common_w(VIRTIO_PCI_COMMON_Q_USEDHI, 4, 0);
        common_w(VIRTIO_PCI_COMMON_Q_MSIX, 2, vector);
        EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_MSIX, 2), vector);
        EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_NOFF, 2), q);
        common_w(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1);
        return common(VIRTIO_PCI_COMMON_Q_ENABLE, 2);
    }

    // The whole Linux bring-up; MSI-X when `msix`.
    void bring_up(bool msix) {
        const int activations = dev->activations;
        probe();
        const std::uint64_t want = device_features() & ~virtio_bit(5);
        ASSERT_NE(negotiate(want) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        if (msix) {
            enable_msix();
            common_w(VIRTIO_PCI_COMMON_MSIX, 2, 0);
            ASSERT_EQ(common(VIRTIO_PCI_COMMON_MSIX, 2), 0u);
        }
        ASSERT_EQ(common(VIRTIO_PCI_COMMON_NUMQ, 2), 2u);
        ASSERT_EQ(setup_queue(0, 256, msix ? 1 : VIRTIO_MSI_NO_VECTOR), 1u);
        ASSERT_EQ(setup_queue(1, 64, msix ? 2 : VIRTIO_MSI_NO_VECTOR), 1u);
        add_status(VIRTIO_CONFIG_S_DRIVER_OK);
        ASSERT_EQ(status(), VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK |
                                VIRTIO_CONFIG_S_DRIVER_OK);
        ASSERT_EQ(dev->activations, activations + 1);
    }

    // Makes one device-writable buffer available on queue q (ring slot n).
    void offer(unsigned q, std::uint16_t n) {
        const Descriptor d{kDataGpa, 64, kVirtqDescFWrite, 0};
        ASSERT_TRUE(mem.write_obj(Gpa(desc_gpa(q) + 16ull * n), d));
        ASSERT_TRUE(mem.write_obj<std::uint16_t>(Gpa(avail_gpa(q) + 4 + 2ull * n), n));
        ASSERT_TRUE(mem.write_obj<std::uint16_t>(Gpa(avail_gpa(q) + 2), static_cast<std::uint16_t>(n + 1)));
    }
    void kick(std::uint16_t q) {
        const Cap& n = caps[VIRTIO_PCI_CAP_NOTIFY_CFG];
        common_w(VIRTIO_PCI_COMMON_Q_SELECT, 2, q);
        const auto off = common(VIRTIO_PCI_COMMON_Q_NOFF, 2);
        wr(n.offset + off * n.extra, 2, q);
    }
    std::uint16_t used_idx(unsigned q) { return mem.read_obj<std::uint16_t>(Gpa(used_gpa(q) + 2)).value_or(0xffff); }
};

TEST_F(VirtioPciTest, IdentityAndCapabilities) {
    EXPECT_EQ(cfg(pci::kVendorId, 2), 0x1af4u);
    EXPECT_EQ(cfg(pci::kDeviceId, 2), 0x1041u);
    EXPECT_EQ(cfg(pci::kRevision, 1), 1u);
    EXPECT_EQ(cfg(pci::kRevision, 4) >> 8, 0x020000u);
    EXPECT_EQ(cfg(pci::kSubsystemVendor, 2), 0x1af4u);
    EXPECT_EQ(cfg(pci::kInterruptPin, 1), 1u);
    probe();
    for (const auto& [type, c] : caps)
        if (type != VIRTIO_PCI_CAP_PCI_CFG) {
            EXPECT_EQ(c.bar, VirtioPciDevice::kBar) << int(type);
        }
    EXPECT_EQ(caps[VIRTIO_PCI_CAP_NOTIFY_CFG].extra, VirtioPciDevice::kNotifyOffMultiplier);
    EXPECT_EQ(cfg(caps[VIRTIO_PCI_CAP_NOTIFY_CFG].pos + 2, 1), 20u);   // cap_len
    EXPECT_EQ(caps[VIRTIO_PCI_CAP_DEVICE_CFG].length, 8u);
    EXPECT_EQ(cfg(msix_pos + 2, 2) & 0x7ff, 2u);   // table size 3 = queues + 1
    EXPECT_EQ(cfg(msix_pos + 4, 4), VirtioPciDevice::kMsixTableOffset | VirtioPciDevice::kBar);
    EXPECT_EQ(cfg(msix_pos + 8, 4), VirtioPciDevice::kMsixPbaOffset | VirtioPciDevice::kBar);
    // The table size is read-only; enable and function mask are writable.
    cfg_w(msix_pos + 2, 2, 0xffff);
    EXPECT_EQ(cfg(msix_pos + 2, 2), 0xc002u);
    // VERSION_1 added, PACKED removed.
    const std::uint64_t f = device_features();
    EXPECT_NE(f & virtio_bit(VIRTIO_F_VERSION_1), 0u);
    EXPECT_EQ(f & virtio_bit(VIRTIO_F_RING_PACKED), 0u);
    EXPECT_NE(f & virtio_bit(0), 0u);
}

TEST_F(VirtioPciTest, LinuxInitSequenceWithMsix) {
    bring_up(true);
    EXPECT_EQ(pci->driver_features() & virtio_bit(5), 0u);
    EXPECT_NE(pci->driver_features() & virtio_bit(VIRTIO_F_EVENT_IDX), 0u);
    ASSERT_EQ(dev->queues.size(), 2u);
    EXPECT_TRUE(dev->queues[0].ready());
    EXPECT_EQ(dev->queues[1].size(), 64);
    EXPECT_EQ(rd(VirtioPciDevice::kMsixTableOffset + 16, 8), 0xfee00001u);
    EXPECT_EQ(rd(VirtioPciDevice::kMsixTableOffset + 24, 4), 0x41u);
    EXPECT_FALSE(entry_masked(1));

    offer(0, 0);
    kick(0);
    ASSERT_EQ(dev->notifies, std::vector<std::uint16_t>{0});
    EXPECT_EQ(used_idx(0), 1);
    EXPECT_EQ(sink->vectors, std::vector<std::uint16_t>{1});
    EXPECT_TRUE(sink->levels.empty());
    EXPECT_EQ(isr(), 0);

    offer(1, 0);
    kick(1);
    EXPECT_EQ(sink->vectors, (std::vector<std::uint16_t>{1, 2}));

    // Config change: generation bumps, config vector fires.
    const auto gen = common(VIRTIO_PCI_COMMON_CFGGENERATION, 1);
    dev->change_config();
    EXPECT_NE(common(VIRTIO_PCI_COMMON_CFGGENERATION, 1), gen);
    EXPECT_EQ(sink->vectors.back(), 0);
    EXPECT_EQ(rd(caps[VIRTIO_PCI_CAP_DEVICE_CFG].offset, 1), 2u);
}

TEST_F(VirtioPciTest, IntxFallbackWhenMsixDisabled) {
    bring_up(false);
    offer(0, 0);
    kick(0);
    EXPECT_TRUE(sink->vectors.empty());
    EXPECT_TRUE(sink->level);
    EXPECT_EQ(isr(), VIRTIO_PCI_ISR_QUEUE);   // read to clear
    EXPECT_FALSE(sink->level);
    EXPECT_EQ(isr(), 0);
    dev->change_config();
    EXPECT_TRUE(sink->level);
    EXPECT_EQ(isr(), VIRTIO_PCI_ISR_CONFIG);
    EXPECT_FALSE(sink->level);
    // Command bit 10 masks the line but keeps the ISR.
    cfg_w(pci::kCommand, 2, cfg(pci::kCommand, 2) | pci::kCommandIntxDisable);
    dev->change_config();
    EXPECT_FALSE(sink->level);
    cfg_w(pci::kCommand, 2, cfg(pci::kCommand, 2) & ~pci::kCommandIntxDisable);
    EXPECT_TRUE(sink->level);
    EXPECT_EQ(isr(), VIRTIO_PCI_ISR_CONFIG);
    EXPECT_FALSE(sink->level);
}

TEST_F(VirtioPciTest, FeaturesOkRefusedForUnofferedFeatures) {
    probe();
    const std::uint64_t offered = device_features();
    EXPECT_EQ(negotiate(offered | virtio_bit(3)) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    EXPECT_EQ(negotiate(offered | virtio_bit(VIRTIO_F_RING_PACKED)) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK is refused too.
    add_status(VIRTIO_CONFIG_S_DRIVER_OK);
    EXPECT_EQ(status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    EXPECT_EQ(dev->activations, 0);
    // The device can veto as well.
    dev->refuse = true;
    EXPECT_EQ(negotiate(offered) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    dev->refuse = false;
    EXPECT_NE(negotiate(offered) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // Features are frozen after FEATURES_OK.
    set_driver_features(virtio_bit(VIRTIO_F_VERSION_1));
    EXPECT_EQ(pci->driver_features(), offered);
}

TEST_F(VirtioPciTest, FeaturesOkRefusedWithoutVersion1) {
    probe();
    EXPECT_EQ(negotiate(virtio_bit(0)) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    EXPECT_NE(negotiate(virtio_bit(0) | virtio_bit(VIRTIO_F_VERSION_1)) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
}

TEST_F(VirtioPciTest, QueueSetupBeforeFeaturesOkAndAfterDriverOkIgnored) {
    probe();
    add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    common_w(VIRTIO_PCI_COMMON_Q_SELECT, 2, 0);
    common_w(VIRTIO_PCI_COMMON_Q_SIZE, 2, 16);
    common_w(VIRTIO_PCI_COMMON_Q_DESCLO, 4, 0x10000);
    common_w(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_SIZE, 2), 256u);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_DESCLO, 4), 0u);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_ENABLE, 2), 0u);
    EXPECT_FALSE(raw_status() & VIRTIO_CONFIG_S_NEEDS_RESET);

    common_w(VIRTIO_PCI_COMMON_STATUS, 1, 0);
    bring_up(false);
    common_w(VIRTIO_PCI_COMMON_Q_SELECT, 2, 1);
    common_w(VIRTIO_PCI_COMMON_Q_DESCLO, 4, 0x30000);
    common_w(VIRTIO_PCI_COMMON_Q_SIZE, 2, 8);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_DESCLO, 4), desc_gpa(1));
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_SIZE, 2), 64u);
}

TEST_F(VirtioPciTest, QueueSizeOnlyPowerOfTwoUpToMax) {
    probe();
    ASSERT_NE(negotiate(device_features()) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    common_w(VIRTIO_PCI_COMMON_Q_SELECT, 2, 1);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_SIZE, 2), 128u);
    for (std::uint16_t bad : {0, 3, 100, 256, 0x8000})
        common_w(VIRTIO_PCI_COMMON_Q_SIZE, 2, bad);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_SIZE, 2), 128u);
    common_w(VIRTIO_PCI_COMMON_Q_SIZE, 2, 32);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_SIZE, 2), 32u);
    // 64-bit address written whole.
    common_w(VIRTIO_PCI_COMMON_Q_DESCLO, 8, 0x123456789a0ull);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_DESCLO, 8), 0x123456789a0ull);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_DESCHI, 4), 0x123u);
}

TEST_F(VirtioPciTest, ResetClearsQueuesAndCallsDeviceReset) {
    bring_up(true);
    const int resets = dev->resets;
    common_w(VIRTIO_PCI_COMMON_STATUS, 1, 0);
    EXPECT_EQ(status(), 0);
    EXPECT_EQ(dev->resets, resets + 1);
    EXPECT_TRUE(dev->queues.empty());
    EXPECT_EQ(pci->driver_features(), 0u);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
    for (std::uint16_t q = 0; q < 2; ++q) {
        common_w(VIRTIO_PCI_COMMON_Q_SELECT, 2, q);
        EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_ENABLE, 2), 0u);
        EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_DESCLO, 8), 0u);
        EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_SIZE, 2), q == 0 ? 256u : 128u);
        EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
    }
    // Kicks after reset reach nobody; a second bring-up works.
    kick(0);
    EXPECT_EQ(dev->notifies.size(), 0u);
    ASSERT_NE(negotiate(device_features()) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    EXPECT_EQ(setup_queue(0, 16, VIRTIO_MSI_NO_VECTOR), 1u);
}

TEST_F(VirtioPciTest, BadRingAddressSetsNeedsResetWithConfigInterrupt) {
    probe();
    ASSERT_NE(negotiate(device_features()) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    enable_msix();
    common_w(VIRTIO_PCI_COMMON_MSIX, 2, 0);
    EXPECT_EQ(setup_queue(0, 256, 1, 0x10000000), 0u);   // past the 4 MiB of RAM
    EXPECT_NE(status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    EXPECT_EQ(sink->vectors, std::vector<std::uint16_t>{0});
    // Nothing more until reset: no second interrupt, no DRIVER_OK.
    EXPECT_EQ(setup_queue(1, 16, 2, 0x10000001), 0u);
    EXPECT_EQ(sink->vectors.size(), 1u);
    add_status(VIRTIO_CONFIG_S_DRIVER_OK);
    EXPECT_EQ(status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    common_w(VIRTIO_PCI_COMMON_STATUS, 1, 0);
    EXPECT_EQ(status(), 0);
}

TEST_F(VirtioPciTest, BadRingWithIntxSetsConfigIsr) {
    probe();
    ASSERT_NE(negotiate(device_features()) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    common_w(VIRTIO_PCI_COMMON_Q_SELECT, 2, 0);
    common_w(VIRTIO_PCI_COMMON_Q_AVAILLO, 4, 0x10001);   // misaligned avail ring
    common_w(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1);
    EXPECT_NE(status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    EXPECT_TRUE(sink->level);
    EXPECT_EQ(isr(), VIRTIO_PCI_ISR_CONFIG);
}

TEST_F(VirtioPciTest, DeviceNeedsResetAfterDriverOk) {
    bring_up(true);
    dev->fail_now();
    EXPECT_NE(status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    EXPECT_EQ(sink->vectors, std::vector<std::uint16_t>{0});
    // The driver cannot clear it, and kicks stop.
    common_w(VIRTIO_PCI_COMMON_STATUS, 1, 0x0f);
    EXPECT_NE(status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    kick(0);
    EXPECT_TRUE(dev->notifies.empty());
    // A malformed chain from the device side takes the same path once.
    common_w(VIRTIO_PCI_COMMON_STATUS, 1, 0);
    sink->vectors.clear();
    bring_up(true);
    ASSERT_TRUE(mem.write_obj<std::uint16_t>(Gpa(avail_gpa(0) + 4), 999));   // head out of range
    ASSERT_TRUE(mem.write_obj<std::uint16_t>(Gpa(avail_gpa(0) + 2), 1));
    kick(0);
    EXPECT_NE(status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    EXPECT_EQ(sink->vectors, std::vector<std::uint16_t>{0});
}

TEST_F(VirtioPciTest, MaskedVectorPendsThenDeliversOnUnmask) {
    bring_up(true);
    const std::uint64_t ctl1 = VirtioPciDevice::kMsixTableOffset + 16 + 12;
    wr(ctl1, 4, 1);
    EXPECT_TRUE(entry_masked(1));
    offer(0, 0);
    kick(0);
    EXPECT_TRUE(sink->vectors.empty());
    EXPECT_TRUE(pending(1));
    EXPECT_EQ(rd(VirtioPciDevice::kMsixPbaOffset, 8), 0x2u);
    wr(VirtioPciDevice::kMsixPbaOffset, 8, 0);   // read-only
    EXPECT_EQ(rd(VirtioPciDevice::kMsixPbaOffset, 4), 0x2u);
    wr(ctl1, 4, 0);
    EXPECT_EQ(sink->vectors, std::vector<std::uint16_t>{1});
    EXPECT_FALSE(pending(1));

    // Function mask.
    cfg_w(msix_pos + 2, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
    dev->change_config();
    EXPECT_EQ(sink->vectors.size(), 1u);
    EXPECT_TRUE(pending(0));
    cfg_w(msix_pos + 2, 2, PCI_MSIX_FLAGS_ENABLE);
    EXPECT_EQ(sink->vectors, (std::vector<std::uint16_t>{1, 0}));
}

TEST_F(VirtioPciTest, BusMasterOffHoldsQueueWorkAndMsix) {
    // PCI 3.0 6.2.2, Command register bit 2: without Bus Master Enable the
    // function issues no memory requests, and an MSI-X message is a memory
    // write. With the bit cleared a kick leaves the rings untouched and a
    // device's interrupt waits; setting it again delivers both.
    bring_up(true);
    cfg_w(pci::kCommand, 2, cfg(pci::kCommand, 2) & ~pci::kCommandMaster);
    offer(0, 0);
    kick(0);
    EXPECT_EQ(used_idx(0), 0) << "a buffer was used with bus mastering off";
    dev->change_config();
    EXPECT_TRUE(sink->vectors.empty()) << "an MSI-X message went out with bus mastering off";
    EXPECT_FALSE(pending(0));   // the PBA is for masked vectors only
    cfg_w(pci::kCommand, 2, cfg(pci::kCommand, 2) | pci::kCommandMaster);
    EXPECT_EQ(used_idx(0), 1) << "the held kick was not delivered";
    // The held config interrupt, and queue 0's for the buffer it used (the
    // fake device may interrupt for queue 1 too: every queue is kicked).
    const auto& got = sink->vectors;
    EXPECT_EQ(std::count(got.begin(), got.end(), 0), 1);
    EXPECT_EQ(std::count(got.begin(), got.end(), 1), 1);
}

TEST_F(VirtioPciTest, MsixTableEntries) {
    probe();
    const std::uint64_t t = VirtioPciDevice::kMsixTableOffset;
    EXPECT_TRUE(entry_masked(2));   // masked at reset
    wr(t + 32, 8, 0x00000001fee01000ull);
    wr(t + 40, 4, 0x4242);
    wr(t + 44, 4, 0xfffffffe);   // reserved bits dropped, unmasked
    EXPECT_FALSE(entry_masked(2));
    EXPECT_EQ(rd(t + 44, 4), 0u);
    EXPECT_EQ(rd(t + 32, 8), 0x00000001fee01000ull);
    EXPECT_EQ(rd(t + 40, 8), 0x4242u);
    // Odd widths and entries past the table.
    EXPECT_EQ(rd(t + 33, 4), 0xffffffffu);
    EXPECT_EQ(rd(t + 32, 2), 0xffffu);
    EXPECT_EQ(rd(t + 48, 4), 0xffffffffu);
    wr(t + 48, 4, 0);
    wr(t + 34, 2, 0);
}

TEST_F(VirtioPciTest, OutOfRangeQueueSelectAndVectors) {
    probe();
    ASSERT_NE(negotiate(device_features()) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    common_w(VIRTIO_PCI_COMMON_Q_SELECT, 2, 5);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_SELECT, 2), 5u);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_SIZE, 2), 0u);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
    common_w(VIRTIO_PCI_COMMON_Q_SIZE, 2, 16);
    common_w(VIRTIO_PCI_COMMON_Q_MSIX, 2, 1);
    common_w(VIRTIO_PCI_COMMON_Q_DESCLO, 4, 0x1000);
    common_w(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_SIZE, 2), 0u);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_DESCLO, 4), 0u);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_ENABLE, 2), 0u);
    EXPECT_EQ(status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);

    common_w(VIRTIO_PCI_COMMON_Q_SELECT, 2, 0);
    common_w(VIRTIO_PCI_COMMON_Q_MSIX, 2, 3);   // table has 0..2
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
    common_w(VIRTIO_PCI_COMMON_Q_MSIX, 2, 2);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_MSIX, 2), 2u);
    common_w(VIRTIO_PCI_COMMON_MSIX, 2, 100);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_MSIX, 2), VIRTIO_MSI_NO_VECTOR);
    common_w(VIRTIO_PCI_COMMON_DFSELECT, 4, 7);
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_DF, 4), 0u);
    // Notify for a queue that does not exist, or unaligned: ignored.
    wr(VirtioPciDevice::kNotifyOffset + 4 * 7, 2, 7);
    wr(VirtioPciDevice::kNotifyOffset + 1, 1, 0);
    EXPECT_TRUE(dev->notifies.empty());
}

TEST_F(VirtioPciTest, OddAccessesToCommonCfg) {
    probe();
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_SELECT, 1), 0xffu);     // wrong width
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_NUMQ + 1, 2), 0xffffu);   // unaligned
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_STATUS, 4), 0xffffffffu);
    EXPECT_EQ(common(0x40, 4), 0xffffffffu);                     // past the structure
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_Q_RESET, 2), 0u);
    common_w(VIRTIO_PCI_COMMON_STATUS, 4, 0x0f);
    common_w(VIRTIO_PCI_COMMON_STATUS - 1, 2, 0x0f00);
    EXPECT_EQ(status(), 0);
    common_w(VIRTIO_PCI_COMMON_NUMQ, 2, 9);   // read-only
    EXPECT_EQ(common(VIRTIO_PCI_COMMON_NUMQ, 2), 2u);
    // Three bytes, sixteen bytes, a straddle into the ISR region.
    std::array<std::uint8_t, 16> b{};
    pci->read(0, std::span(b.data(), 3));
    EXPECT_EQ(b[0], 0xff);
    pci->read(0, std::span(b.data(), 16));
    EXPECT_EQ(b[15], 0xff);
    pci->read(VirtioPciDevice::kIsrOffset - 2, std::span(b.data(), 4));
    EXPECT_EQ(b[3], 0xff);
    // Device config: in range, past the end.
    EXPECT_EQ(rd(VirtioPciDevice::kDeviceOffset + 4, 4), 0x08070605u);
    EXPECT_EQ(rd(VirtioPciDevice::kDeviceOffset + 6, 4), 0xffffffffu);
    wr(VirtioPciDevice::kDeviceOffset + 7, 1, 0xaa);
    EXPECT_EQ(dev->config[7], 0xaa);
    wr(VirtioPciDevice::kDeviceOffset + 7, 2, 0xbbbb);
    EXPECT_EQ(dev->config[7], 0xaa);
}

TEST_F(VirtioPciTest, PciCfgWindow) {
    probe();
    const unsigned p = caps[VIRTIO_PCI_CAP_PCI_CFG].pos;
    // Read num_queues through the window.
    cfg_w(p + 4, 1, VirtioPciDevice::kBar);
    cfg_w(p + 8, 4, VIRTIO_PCI_COMMON_NUMQ);
    cfg_w(p + 12, 4, 2);
    EXPECT_EQ(cfg(p + 16, 2), 2u);
    // Write device_status through it.
    cfg_w(p + 8, 4, VIRTIO_PCI_COMMON_STATUS);
    cfg_w(p + 12, 4, 1);
    cfg_w(p + 16, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    EXPECT_EQ(status(), VIRTIO_CONFIG_S_ACKNOWLEDGE);
    EXPECT_EQ(cfg(p + 16, 1), VIRTIO_CONFIG_S_ACKNOWLEDGE);
    // Bad windows do nothing: wrong BAR, length 3, misaligned.
    cfg_w(p + 4, 1, 0);
    cfg_w(p + 16, 1, 0);
    cfg_w(p + 4, 1, VirtioPciDevice::kBar);
    cfg_w(p + 12, 4, 3);
    cfg_w(p + 16, 1, 0);
    cfg_w(p + 8, 4, VIRTIO_PCI_COMMON_STATUS + 1);
    cfg_w(p + 12, 4, 2);
    cfg_w(p + 16, 1, 0);
    EXPECT_EQ(status(), VIRTIO_CONFIG_S_ACKNOWLEDGE);
}

TEST_F(VirtioPciTest, BarMovesAreTracked) {
    EXPECT_EQ(pci->bar_gpa(), 0u);
    probe();
    EXPECT_EQ(pci->bar_gpa(), kBarGpa);
    EXPECT_EQ(mapped, kBarGpa);   // the hook saw decode on
    EXPECT_GT(bar_hook_calls, 0);
    cfg_w(pci::kCommand, 2, cfg(pci::kCommand, 2) & ~pci::kCommandMemory);
    EXPECT_EQ(mapped, 0u);
    cfg_w(pci::kBar0 + 16, 4, 0xfebf0000);
    cfg_w(pci::kBar0 + 20, 4, 0);
    EXPECT_EQ(pci->bar_gpa(), 0xfebf0000u);
    cfg_w(pci::kCommand, 2, cfg(pci::kCommand, 2) | pci::kCommandMemory);
    EXPECT_EQ(mapped, 0xfebf0000u);
    std::array<std::uint8_t, 2> b{};
    ASSERT_TRUE(mmio.read(0xfebf0000 + VIRTIO_PCI_COMMON_NUMQ, b));
    EXPECT_EQ(b[0], 2);
}

TEST(VirtioPciSetup, RejectsBadDevices) {
    GuestMemory mem(4 << 20, Backing::off);
    auto sink = std::make_shared<Sink>();
    EXPECT_THROW(VirtioPciDevice(nullptr, mem, sink, 0), std::invalid_argument);
    EXPECT_THROW(VirtioPciDevice(std::make_shared<FakeDevice>(), mem, nullptr, 0), std::invalid_argument);
    struct NoQueues : FakeDevice {
        std::uint16_t num_queues() const override { return 0; }
    };
    struct OddSize : FakeDevice {
        std::uint16_t max_queue_size(std::uint16_t) const override { return 100; }
    };
    EXPECT_THROW(VirtioPciDevice(std::make_shared<NoQueues>(), mem, sink, 0), std::invalid_argument);
    EXPECT_THROW(VirtioPciDevice(std::make_shared<OddSize>(), mem, sink, 0), std::invalid_argument);
}

TEST_F(VirtioPciTest, HostileRandomAccessesDoNotCrash) {
    bring_up(true);
    const std::uint64_t offered = device_features();
    std::mt19937_64 rng(20240601);
    const std::array<std::size_t, 8> sizes{0, 1, 2, 3, 4, 5, 8, 16};
    std::array<std::uint8_t, 16> buf{};
    for (int i = 0; i < 20000; ++i) {
        const std::uint64_t r = rng();
        const std::size_t n = sizes[r % sizes.size()];
        for (auto& b : buf) b = static_cast<std::uint8_t>(rng());
        switch ((r >> 8) % 8) {
        case 0:
        case 1: {
            // Mostly the interesting low part of every region.
            const std::uint64_t region = (r >> 16) % 9 * VirtioPciDevice::kRegionSize;
            pci->write(region + (r >> 24) % 0x48, std::span<const std::uint8_t>(buf.data(), n));
            break;
        }
        case 2:
            pci->write(rng() % (VirtioPciDevice::kBarSize + 0x100), std::span<const std::uint8_t>(buf.data(), n));
            break;
        case 3:
            pci->read(rng() % (VirtioPciDevice::kBarSize + 0x100), std::span(buf.data(), n));
            break;
        case 4: {
            // Config space, except the BAR and Command registers half the time.
            const unsigned off = static_cast<unsigned>((r >> 16) % 0x110);
            if ((r >> 40) % 2 == 0 && off >= pci::kCommand && off < pci::kBar0 + 24) break;
            pci->config_write(off, static_cast<unsigned>(n), static_cast<std::uint32_t>(rng()));
            break;
        }
        case 5:
            (void)pci->config_read(static_cast<unsigned>((r >> 16) % 0x110), static_cast<unsigned>(n));
            break;
        case 6:
            // Valid-looking common cfg writes with hostile values.
            common_w((r >> 16) % 0x3c & ~1ull, 2, rng());
            break;
        case 7:
            if ((r >> 16) % 64 == 0) common_w(VIRTIO_PCI_COMMON_STATUS, 1, rng() % 256);
            kick(static_cast<std::uint16_t>((r >> 24) % 3));
            dev->change_config();
            break;
        }
        // Invariants the guest cannot break.
        const std::uint8_t st = raw_status();
        if (st & VIRTIO_CONFIG_S_DRIVER_OK) {
            EXPECT_TRUE(st & VIRTIO_CONFIG_S_FEATURES_OK);
        }
        if (st & VIRTIO_CONFIG_S_FEATURES_OK) {
            EXPECT_EQ(pci->driver_features() & ~offered, 0u);
        }
    }
    // Still drivable afterwards.
    const std::array<std::uint8_t, 1> zero{0};
    pci->write(VIRTIO_PCI_COMMON_STATUS, zero);
    pci->config_write(msix_pos + 2, 2, 0);
    EXPECT_EQ(raw_status(), 0);
    EXPECT_EQ(cfg(msix_pos + 2, 2) & PCI_MSIX_FLAGS_ENABLE, 0u);
}

} // namespace
} // namespace kguest
