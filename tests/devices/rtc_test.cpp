// The CMOS RTC model: time registers in BCD and binary, 12-hour mode, leap
// days and the century, Linux's SET-protected write sequence moving the clock,
// status registers (UIP never stuck), the memory-size bytes, CMOS RAM, odd
// widths, and random hostile accesses.
#include "devices/rtc.hpp"

#include <cstdint>
#include <gtest/gtest.h>
#include <memory>
#include <random>
#include <thread>
#include <vector>

namespace kguest {
namespace {

constexpr std::uint64_t MiB = 1ull << 20, GiB = 1ull << 30;
enum : unsigned { SEC = 0x00, MIN = 0x02, HOUR = 0x04, WDAY = 0x06, MDAY = 0x07, MON = 0x08,
                  YEAR = 0x09, REG_A = 0x0a, REG_B = 0x0b, REG_C = 0x0c, REG_D = 0x0d, CENTURY = 0x32 };
constexpr std::int64_t k2026_11_25_184609 = 1795632369;  // a Wednesday
constexpr std::int64_t k2024_02_29_120000 = 1709208000;  // a Thursday
constexpr std::int64_t k2099_12_31_235959 = 4102444799;  // a Thursday; 2100-01-01 is a Friday
constexpr std::int64_t k2030_01_02_030405 = 1893553445;  // a Wednesday

class RtcClock : public ::testing::Test {
protected:
    void out(std::uint64_t port, std::uint8_t v) { rtc_.write(port, std::span<const std::uint8_t>(&v, 1)); }
    std::uint8_t in(std::uint64_t port) {
        std::uint8_t v = 0xaa;
        rtc_.read(port, {&v, 1});
        return v;
    }
    std::uint8_t cmos(unsigned reg) { out(0, static_cast<std::uint8_t>(reg)); return in(1); }
    void set_cmos(unsigned reg, std::uint8_t v) { out(0, static_cast<std::uint8_t>(reg)); out(1, v); }
    // {sec, min, hour, wday, mday, mon, year, century} as the registers hold them.
    std::vector<std::uint8_t> time_regs() {
        return {cmos(SEC), cmos(MIN), cmos(HOUR), cmos(WDAY), cmos(MDAY), cmos(MON), cmos(YEAR), cmos(CENTURY)};
    }

    std::int64_t now_ = k2026_11_25_184609;
    Rtc rtc_{256 * MiB, 0, [this] { return now_; }};
};

TEST_F(RtcClock, DefaultsAreBcd24HourAndValid) {
    EXPECT_EQ(cmos(REG_A), 0x26);
    EXPECT_EQ(cmos(REG_B), 0x02);
    EXPECT_EQ(cmos(REG_C), 0x00);
    EXPECT_EQ(cmos(REG_D), 0x80);
    EXPECT_EQ(rtc_.offset_seconds(), 0);
}

TEST_F(RtcClock, ReadsBcdTime) {
    EXPECT_EQ(time_regs(), (std::vector<std::uint8_t>{0x09, 0x46, 0x18, 0x04, 0x25, 0x11, 0x26, 0x20}));
}

TEST_F(RtcClock, ReadsBinaryTime) {
    set_cmos(REG_B, 0x06);  // DM binary, 24h
    EXPECT_EQ(time_regs(), (std::vector<std::uint8_t>{9, 46, 18, 4, 25, 11, 26, 20}));
}

TEST_F(RtcClock, LeapDayAndCenturyRollOver) {
    now_ = k2024_02_29_120000;
    EXPECT_EQ(time_regs(), (std::vector<std::uint8_t>{0x00, 0x00, 0x12, 0x05, 0x29, 0x02, 0x24, 0x20}));
    now_ += 12 * 3600;  // midnight: 1 March, a Friday
    EXPECT_EQ(time_regs(), (std::vector<std::uint8_t>{0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20}));
    now_ = k2099_12_31_235959;
    EXPECT_EQ(time_regs(), (std::vector<std::uint8_t>{0x59, 0x59, 0x23, 0x05, 0x31, 0x12, 0x99, 0x20}));
    now_ += 1;
    EXPECT_EQ(time_regs(), (std::vector<std::uint8_t>{0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21}));
    set_cmos(REG_B, 0x06);
    EXPECT_EQ(time_regs(), (std::vector<std::uint8_t>{0, 0, 0, 6, 1, 1, 0, 21}));
}

TEST_F(RtcClock, TwelveHourMode) {
    set_cmos(REG_B, 0x00);  // 12h, BCD
    EXPECT_EQ(cmos(HOUR), 0x86);  // 6 PM
    set_cmos(REG_B, 0x04);  // 12h, binary
    EXPECT_EQ(cmos(HOUR), 0x86);
    now_ = k2024_02_29_120000;  // noon
    EXPECT_EQ(cmos(HOUR), 0x8c);
    set_cmos(REG_B, 0x00);
    EXPECT_EQ(cmos(HOUR), 0x92);
    now_ += 12 * 3600;  // midnight is 12 AM
    EXPECT_EQ(cmos(HOUR), 0x12);
    now_ += 3600 + 60;
    EXPECT_EQ(cmos(HOUR), 0x01);
    EXPECT_EQ(cmos(MIN), 0x01);
}

// rtc-mc146818-lib.c mc146818_set_time: SET on, divider reset in status A,
// the time registers, then status B and A restored.
TEST_F(RtcClock, SetProtectedWriteMovesTheClock) {
    std::uint8_t save_b = cmos(REG_B);
    set_cmos(REG_B, save_b | 0x80);
    std::uint8_t save_a = cmos(REG_A);
    set_cmos(REG_A, save_a | 0x70);
    set_cmos(YEAR, 0x30);
    set_cmos(MON, 0x01);
    set_cmos(MDAY, 0x02);
    set_cmos(HOUR, 0x03);
    set_cmos(MIN, 0x04);
    set_cmos(SEC, 0x05);
    now_ += 100;  // frozen while SET: reads show what was written
    EXPECT_EQ(cmos(SEC), 0x05);
    EXPECT_EQ(cmos(YEAR), 0x30);
    set_cmos(REG_B, save_b);
    set_cmos(REG_A, save_a);
    EXPECT_EQ(rtc_.offset_seconds(), k2030_01_02_030405 - now_);
    EXPECT_EQ(time_regs(), (std::vector<std::uint8_t>{0x05, 0x04, 0x03, 0x04, 0x02, 0x01, 0x30, 0x20}));
    now_ += 65;  // the guest's clock runs on with the host's
    EXPECT_EQ(time_regs(), (std::vector<std::uint8_t>{0x10, 0x05, 0x03, 0x04, 0x02, 0x01, 0x30, 0x20}));
    EXPECT_EQ(cmos(REG_A), 0x26);
    EXPECT_EQ(cmos(REG_B), 0x02);
}

TEST_F(RtcClock, SetInBinaryTwelveHourMode) {
    set_cmos(REG_B, 0x84);  // SET, binary, 12h
    set_cmos(HOUR, 0x83);   // 3 PM
    set_cmos(MIN, 0);
    set_cmos(SEC, 0);
    set_cmos(REG_B, 0x06);  // SET off, binary 24h
    EXPECT_EQ(cmos(HOUR), 15);
    EXPECT_EQ(cmos(MDAY), 25);  // the date was kept from the snapshot
    EXPECT_EQ(rtc_.offset_seconds(), (15 - 18) * 3600 - 46 * 60 - 9);
}

TEST_F(RtcClock, WriteWhileRunningSetsAtOnce) {
    set_cmos(MIN, 0x50);
    EXPECT_EQ(rtc_.offset_seconds(), 4 * 60);
    EXPECT_EQ(cmos(MIN), 0x50);
    EXPECT_EQ(cmos(SEC), 0x09);
}

TEST_F(RtcClock, GarbageTimeNeverBreaksTheClock) {
    set_cmos(REG_B, 0x82);
    for (unsigned reg : {SEC, MIN, HOUR, MDAY, MON, YEAR, CENTURY}) set_cmos(reg, 0xff);
    set_cmos(REG_B, 0x02);
    for (std::uint8_t v : time_regs()) EXPECT_NE(v, 0xff);  // a real (far-future) date again
    set_cmos(REG_B, 0x86);
    for (unsigned reg : {SEC, MIN, HOUR, MDAY, MON, YEAR, CENTURY}) set_cmos(reg, 0);
    set_cmos(REG_B, 0x06);
    EXPECT_EQ(cmos(CENTURY), 0);
    EXPECT_EQ(cmos(MON), 1);
}

TEST_F(RtcClock, StatusANeverStaysInUpdate) {
    for (int i = 0; i < 1000; ++i) {
        EXPECT_EQ(cmos(REG_A) & 0x80, 0) << i;
        ++now_;
    }
    set_cmos(REG_A, 0xff);  // UIP is read-only
    EXPECT_EQ(cmos(REG_A), 0x7f);
}

TEST_F(RtcClock, StatusCAndDAreReadOnly) {
    set_cmos(REG_C, 0xff);
    set_cmos(REG_D, 0x00);
    EXPECT_EQ(cmos(REG_C), 0x00);
    EXPECT_EQ(cmos(REG_D), 0x80);
}

TEST_F(RtcClock, IndexAndRam) {
    out(0, 0x8d);  // NMI disabled, register D
    EXPECT_EQ(in(0), 0x8d);
    EXPECT_EQ(in(1), 0x80);
    set_cmos(0x40, 0x5a);
    EXPECT_EQ(cmos(0x40), 0x5a);
    EXPECT_EQ(cmos(0xc0), 0x5a);  // the NMI bit is not part of the index
    set_cmos(0xff, 0x11);
    EXPECT_EQ(cmos(0x7f), 0x11);
    set_cmos(0x01, 0x30);  // alarm seconds: plain RAM here
    EXPECT_EQ(cmos(0x01), 0x30);
}

TEST_F(RtcClock, WideAccessesSplitIntoPorts) {
    const std::uint8_t w[2] = {0x41, 0x77};
    rtc_.write(0, w);
    EXPECT_EQ(cmos(0x41), 0x77);
    std::uint8_t r[4] = {0, 0, 0, 0};
    rtc_.read(0, r);
    EXPECT_EQ(r[0], 0x41);
    EXPECT_EQ(r[1], 0x77);
    EXPECT_EQ(r[2], 0xff);
    EXPECT_EQ(r[3], 0xff);
    rtc_.read(1, std::span<std::uint8_t>(r, 2));
    EXPECT_EQ(r[0], 0x77);
    EXPECT_EQ(r[1], 0xff);
    rtc_.read(2, std::span<std::uint8_t>(r, 1));
    EXPECT_EQ(r[0], 0xff);
}

std::uint8_t cmos_of(Rtc& rtc, unsigned reg) {
    std::uint8_t idx = static_cast<std::uint8_t>(reg), v = 0;
    rtc.write(0, std::span<const std::uint8_t>(&idx, 1));
    rtc.read(1, {&v, 1});
    return v;
}
unsigned word_of(Rtc& rtc, unsigned reg) { return cmos_of(rtc, reg) | cmos_of(rtc, reg + 1) << 8; }

TEST(RtcMemory, Sizes256MiB) {
    Rtc rtc(256 * MiB, 0, [] { return 0; });
    EXPECT_EQ(word_of(rtc, 0x15), 640u);
    EXPECT_EQ(word_of(rtc, 0x17), 0xffffu);  // 255 MiB saturates the 64 MiB field
    EXPECT_EQ(word_of(rtc, 0x30), 0xffffu);
    EXPECT_EQ(word_of(rtc, 0x34), (256u - 16) * 16);
    EXPECT_EQ(cmos_of(rtc, 0x5b) | cmos_of(rtc, 0x5c) << 8 | cmos_of(rtc, 0x5d) << 16, 0u);
    EXPECT_EQ(cmos_of(rtc, YEAR), 0x70);  // 1970
    EXPECT_EQ(cmos_of(rtc, CENTURY), 0x19);
}

TEST(RtcMemory, Sizes5GiB) {
    // kguest's layout: RAM up to the 3 GiB hole start, the rest from 4 GiB.
    Rtc rtc(3 * GiB, 2 * GiB, [] { return 0; });
    EXPECT_EQ(word_of(rtc, 0x15), 640u);
    EXPECT_EQ(word_of(rtc, 0x17), 0xffffu);
    EXPECT_EQ(word_of(rtc, 0x34), 0xbf00u);  // (3 GiB - 16 MiB) / 64 KiB
    EXPECT_EQ(cmos_of(rtc, 0x5b), 0x00);
    EXPECT_EQ(cmos_of(rtc, 0x5c), 0x80);     // 2 GiB / 64 KiB = 0x8000
    EXPECT_EQ(cmos_of(rtc, 0x5d), 0x00);
}

TEST(RtcMemory, SmallAndHuge) {
    Rtc small(8 * MiB, 0, [] { return 0; });
    EXPECT_EQ(word_of(small, 0x17), 7u * 1024);
    EXPECT_EQ(word_of(small, 0x34), 0u);
    Rtc full(4 * GiB, 0, [] { return 0; });
    EXPECT_EQ(word_of(full, 0x34), 0xff00u);
    Rtc huge(64 * GiB, 2048 * GiB, [] { return 0; });  // nonsense sizes saturate
    EXPECT_EQ(word_of(huge, 0x34), 0xffffu);
    EXPECT_EQ(cmos_of(huge, 0x5b) | cmos_of(huge, 0x5c) << 8 | cmos_of(huge, 0x5d) << 16, 0xffffffu);
}

TEST(RtcHostClock, ShowsThisCentury) {
    Rtc rtc(256 * MiB, 0);
    EXPECT_EQ(cmos_of(rtc, CENTURY), 0x20);
    EXPECT_EQ(cmos_of(rtc, 0x0d), 0x80);
}

TEST(RtcHostile, RandomAccessesNeverCrash) {
    std::int64_t now = k2026_11_25_184609;
    Rtc rtc(1 * GiB, 0, [&now] { return now; });
    std::mt19937_64 rng(12345);
    std::vector<std::uint8_t> buf(16);
    const std::uint64_t offsets[] = {0, 1, 2, 3, 0xffff, ~0ull, ~0ull - 1};
    for (int i = 0; i < 200000; ++i) {
        std::uint64_t r = rng();
        std::size_t width = r % 10;  // 0..9 bytes
        std::uint64_t offset = (r >> 8) % 4 == 0 ? offsets[(r >> 16) % 7] : (r >> 16) % 2;
        for (auto& b : buf) b = static_cast<std::uint8_t>(rng());
        std::span<std::uint8_t> data(buf.data(), width);
        if ((r >> 40) & 1)
            rtc.write(offset, data);
        else
            rtc.read(offset, data);
        if (i % 1000 == 0) now += static_cast<std::int64_t>(rng() % 100000);
    }
    EXPECT_EQ(cmos_of(rtc, 0x0d), 0x80);
    EXPECT_EQ(cmos_of(rtc, 0x0a) & 0x80, 0);
}

TEST(RtcHostile, ParallelVcpus) {
    Rtc rtc(256 * MiB, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&rtc, t] {
            std::mt19937 rng(static_cast<unsigned>(t));
            for (int i = 0; i < 20000; ++i) {
                std::uint8_t v[2] = {static_cast<std::uint8_t>(rng()), static_cast<std::uint8_t>(rng())};
                if (i & 1)
                    rtc.write(rng() % 2, std::span<const std::uint8_t>(v, 1 + rng() % 2));
                else
                    rtc.read(0, v);
            }
        });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(cmos_of(rtc, 0x0d), 0x80);
}

} // namespace
} // namespace kguest
