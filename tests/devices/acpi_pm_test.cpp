// AcpiPm, the hardware-reduced ACPI sleep/reset registers: Linux's poweroff
// sequence (clear WAK_STS, then SLP_TYP 5 | SLP_EN) powers off, other sleep
// types and a bare SLP_TYP do not, the reset value resets, the ports the FADT
// advertises reach the device through a Bus, and random accesses of any width
// and offset never crash and trigger exactly what a byte-lane model predicts.
#include "devices/acpi_pm.hpp"
#include "vmm/acpi.hpp"
#include "devices/base/bus.hpp"

#include <cstdint>
#include <gtest/gtest.h>
#include <memory>
#include <random>
#include <vector>

namespace kguest {
namespace {

struct Counts {
    int power_off = 0, reset = 0;
};

std::shared_ptr<AcpiPm> make(Counts& c) {
    return std::make_shared<AcpiPm>([&c] { ++c.power_off; }, [&c] { ++c.reset; });
}

void out8(AcpiPm& pm, std::uint64_t off, std::uint8_t v) {
    const std::uint8_t b[1] = {v};
    pm.write(off, b);
}
std::uint8_t in8(AcpiPm& pm, std::uint64_t off) {
    std::uint8_t b[1] = {0xaa};
    pm.read(off, b);
    return b[0];
}

constexpr std::uint8_t sleep_value(unsigned slp_typ) {
    // What Linux's acpi_hw_extended_sleep() writes.
    return static_cast<std::uint8_t>(((slp_typ << 2) & 0x1c) | 0x20);
}

TEST(AcpiPm, LinuxPoweroffSequencePowersOff) {
    Counts c;
    auto pm = make(c);
    out8(*pm, AcpiPm::kSleepStatus, AcpiPm::WAK_STS);  // clear wake status
    EXPECT_EQ(c.power_off, 0);
    out8(*pm, AcpiPm::kSleepControl, sleep_value(AcpiPm::kSlpTypS5));
    EXPECT_EQ(c.power_off, 1);
    EXPECT_EQ(c.reset, 0);
    EXPECT_EQ(in8(*pm, AcpiPm::kSleepStatus), 0);  // S5 does not "wake"
}

TEST(AcpiPm, OtherSleepTypesAndBareSlpTypDoNothing) {
    Counts c;
    auto pm = make(c);
    out8(*pm, AcpiPm::kSleepControl, 5 << 2);  // SLP_TYP 5 without SLP_EN
    EXPECT_EQ(in8(*pm, AcpiPm::kSleepStatus), 0);
    for (unsigned typ : {0u, 1u, 2u, 3u, 4u, 6u, 7u}) {
        out8(*pm, AcpiPm::kSleepControl, sleep_value(typ));
        // An ignored request wakes at once, so OSPM's WAK_STS poll ends.
        EXPECT_EQ(in8(*pm, AcpiPm::kSleepStatus), AcpiPm::WAK_STS) << typ;
        out8(*pm, AcpiPm::kSleepStatus, AcpiPm::WAK_STS);  // write 1 to clear
        EXPECT_EQ(in8(*pm, AcpiPm::kSleepStatus), 0) << typ;
    }
    EXPECT_EQ(c.power_off, 0);
    EXPECT_EQ(c.reset, 0);
}

TEST(AcpiPm, ResetValueResets) {
    Counts c;
    auto pm = make(c);
    for (unsigned v = 0; v < 256; ++v)
        if (v != AcpiPm::kResetValue) out8(*pm, AcpiPm::kReset, static_cast<std::uint8_t>(v));
    EXPECT_EQ(c.reset, 0);
    out8(*pm, AcpiPm::kReset, AcpiPm::kResetValue);
    EXPECT_EQ(c.reset, 1);
    EXPECT_EQ(c.power_off, 0);
}

TEST(AcpiPm, WriteOnlyAndUnknownRegistersReadZero) {
    Counts c;
    auto pm = make(c);
    out8(*pm, AcpiPm::kSleepControl, 0xff & ~AcpiPm::SLP_EN);
    for (std::uint64_t off = 0; off < 64; ++off) EXPECT_EQ(in8(*pm, off), 0) << off;
    std::uint8_t wide[8];
    std::fill(std::begin(wide), std::end(wide), 0xaa);
    pm->read(0, wide);
    for (std::uint8_t b : wide) EXPECT_EQ(b, 0);
}

TEST(AcpiPm, FadtPortsReachTheDeviceThroughTheBus) {
    AcpiConfig cfg;
    cfg.pm_port = AcpiPm::kBase;
    std::vector<std::uint8_t> t = build_acpi_tables(cfg);
    // RSDP -> XSDT -> first entry is the FADT.
    auto le = [&](std::size_t off, unsigned n) {
        std::uint64_t v = 0;
        for (unsigned i = 0; i < n; ++i) v |= std::uint64_t{t[off + i]} << (8 * i);
        return v;
    };
    std::size_t xsdt = le(24, 8) - kAcpiBase;
    std::size_t fadt = le(xsdt + 36, 8) - kAcpiBase;
    ASSERT_EQ(std::string(t.begin() + fadt, t.begin() + fadt + 4), "FACP");

    Counts c;
    Bus pio("pio");
    pio.insert(AcpiPm::kBase, AcpiPm::kLen, make(c));
    const std::uint8_t reset[1] = {static_cast<std::uint8_t>(le(fadt + 128, 1))};
    EXPECT_TRUE(pio.write(le(fadt + 116 + 4, 8), reset));
    EXPECT_EQ(c.reset, 1);
    const std::uint8_t s5[1] = {sleep_value(AcpiPm::kSlpTypS5)};
    EXPECT_TRUE(pio.write(le(fadt + 244 + 4, 8), s5));
    EXPECT_EQ(c.power_off, 1);
    std::uint8_t status[1] = {0xaa};
    EXPECT_TRUE(pio.read(le(fadt + 256 + 4, 8), status));
    EXPECT_EQ(status[0], 0);
}

TEST(AcpiPm, HostileAccessesMatchTheByteLaneModel) {
    Counts c;
    auto pm = make(c);
    std::mt19937_64 rng(12345);
    int want_off = 0, want_reset = 0;
    std::uint8_t want_status = 0;
    for (int n = 0; n < 200000; ++n) {
        std::uint64_t off = rng() % 3 == 0 ? rng() : rng() % 3 == 0 ? UINT64_MAX - rng() % 8 : rng() % 8;
        std::size_t width = 1 + rng() % 16;
        std::vector<std::uint8_t> data(width);
        // Bias the bytes towards the interesting values.
        for (auto& b : data) {
            switch (rng() % 4) {
            case 0: b = sleep_value(static_cast<unsigned>(rng() % 8)); break;
            case 1: b = AcpiPm::kResetValue; break;
            case 2: b = AcpiPm::WAK_STS; break;
            default: b = static_cast<std::uint8_t>(rng());
            }
        }
        if (rng() % 2) {
            pm->read(off, data);
            for (std::size_t i = 0; i < width; ++i)
                ASSERT_EQ(data[i], off < AcpiPm::kLen && off + i == AcpiPm::kSleepStatus ? want_status : 0);
            continue;
        }
        pm->write(off, data);
        for (std::size_t i = 0; off < AcpiPm::kLen && i < width && off + i < AcpiPm::kLen; ++i) {
            std::uint8_t v = data[i];
            switch (off + i) {
            case AcpiPm::kSleepControl:
                if (v & AcpiPm::SLP_EN) {
                    if (((v & AcpiPm::SLP_TYP_MASK) >> AcpiPm::SLP_TYP_SHIFT) == AcpiPm::kSlpTypS5)
                        ++want_off;
                    else
                        want_status |= AcpiPm::WAK_STS;
                }
                break;
            case AcpiPm::kSleepStatus: want_status &= static_cast<std::uint8_t>(~(v & AcpiPm::WAK_STS)); break;
            case AcpiPm::kReset: want_reset += v == AcpiPm::kResetValue; break;
            default: break;
            }
        }
        ASSERT_EQ(c.power_off, want_off);
        ASSERT_EQ(c.reset, want_reset);
    }
    EXPECT_GT(want_off, 0);
    EXPECT_GT(want_reset, 0);
}

TEST(AcpiPm, PowerButtonLatchesTheGedEventUntilRead) {
    int interrupts = 0;
    AcpiPm pm(nullptr, nullptr, [&] { ++interrupts; });
    EXPECT_EQ(in8(pm, AcpiPm::kGedEvent), 0);
    pm.press_power_button();
    EXPECT_EQ(interrupts, 1);
    out8(pm, AcpiPm::kGedEvent, 0);   // read-only: a write clears nothing
    EXPECT_EQ(in8(pm, AcpiPm::kGedEvent), AcpiPm::GED_POWER_BUTTON);
    EXPECT_EQ(in8(pm, AcpiPm::kGedEvent), 0);   // a read clears it (_EVT reads it once)
    EXPECT_EQ(in8(pm, AcpiPm::kSleepStatus), 0);
    pm.press_power_button();
    pm.press_power_button();   // two presses before _EVT ran: one event, two edges
    EXPECT_EQ(interrupts, 3);
    std::uint8_t wide[4] = {0xaa, 0xaa, 0xaa, 0xaa};
    pm.read(0, wide);   // a 4-byte read covers the GED lane too
    EXPECT_EQ(wide[3], AcpiPm::GED_POWER_BUTTON);
    EXPECT_EQ(in8(pm, AcpiPm::kGedEvent), 0);
    AcpiPm quiet(nullptr, nullptr);
    quiet.press_power_button();   // no interrupt wired: latched only
    EXPECT_EQ(in8(quiet, AcpiPm::kGedEvent), AcpiPm::GED_POWER_BUTTON);
}

TEST(AcpiPm, NullCallbacksAreTolerated) {
    AcpiPm pm(nullptr, nullptr);
    out8(pm, AcpiPm::kSleepControl, sleep_value(AcpiPm::kSlpTypS5));
    out8(pm, AcpiPm::kReset, AcpiPm::kResetValue);
    std::vector<std::uint8_t> empty;
    pm.write(0, empty);
    pm.read(0, std::span<std::uint8_t>(empty));
}

} // namespace
} // namespace kguest
