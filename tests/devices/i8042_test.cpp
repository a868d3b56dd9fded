// The 8042 reset line: Linux's reboot=k sequence (kb_wait, then 0xFE), the
// output-port reset (0xD1), self-test, the command byte, the two port devices
// on a bus, and random hostile accesses that reset only through those paths.
#include "devices/i8042.hpp"

#include <algorithm>
#include <cstdint>
#include <gtest/gtest.h>
#include <memory>
#include <random>
#include <vector>

namespace kguest {
namespace {

// Stands in for the PIT's speaker port 0x61, between the controller's two.
class Speaker : public BusDevice {
public:
    void read(std::uint64_t, std::span<std::uint8_t> data) override { std::fill(data.begin(), data.end(), 0x20); }
    void write(std::uint64_t, std::span<const std::uint8_t>) override {}
};

class I8042Ctl : public ::testing::Test {
protected:
    void SetUp() override {
        kbc_ = std::make_shared<I8042>([this] { ++resets_; });
        data_ = kbc_->data_port();
        cmd_ = kbc_->command_port();
    }
    static void out(BusDevice& d, std::uint8_t v) { d.write(0, std::span<const std::uint8_t>(&v, 1)); }
    static std::uint8_t in(BusDevice& d) {
        std::uint8_t v = 0xaa;
        d.read(0, {&v, 1});
        return v;
    }
    std::uint8_t status() { return in(*cmd_); }

    int resets_ = 0;
    std::shared_ptr<I8042> kbc_;
    std::shared_ptr<BusDevice> data_, cmd_;
};

TEST_F(I8042Ctl, PulseResetCallsResetOnce) {
    // arch/x86/kernel/reboot.c kb_wait: poll until the input buffer is empty.
    int polls = 0;
    while ((status() & 0x02) != 0 && polls < 0x10000) ++polls;
    EXPECT_EQ(polls, 0);
    EXPECT_EQ(resets_, 0);
    out(*cmd_, 0xfe);
    EXPECT_EQ(resets_, 1);
}

TEST_F(I8042Ctl, StatusShowsSystemFlagAndEmptyBuffers) {
    EXPECT_EQ(status(), 0x04);
    EXPECT_EQ(in(*data_), 0x00);  // nothing was ever queued
}

TEST_F(I8042Ctl, SelfTestAnswers55) {
    out(*cmd_, 0xaa);
    EXPECT_EQ(status(), 0x05);  // output buffer full
    EXPECT_EQ(in(*data_), 0x55);
    EXPECT_EQ(status(), 0x04);
    EXPECT_EQ(in(*data_), 0x55);  // the latch keeps the last byte
}

TEST_F(I8042Ctl, CommandByteRoundTrip) {
    out(*cmd_, 0x20);
    EXPECT_EQ(status() & 0x01, 0x01);
    EXPECT_EQ(in(*data_), 0x05);
    out(*cmd_, 0x60);
    out(*data_, 0x47);
    out(*cmd_, 0x20);
    EXPECT_EQ(in(*data_), 0x47);
    out(*cmd_, 0xad);  // disable keyboard: CTR bit 4
    out(*cmd_, 0x20);
    EXPECT_EQ(in(*data_), 0x57);
    out(*cmd_, 0xae);
    out(*cmd_, 0x20);
    EXPECT_EQ(in(*data_), 0x47);
    EXPECT_EQ(resets_, 0);
}

TEST_F(I8042Ctl, WriteOutputPortResetsWhenBit0IsClear) {
    out(*cmd_, 0xd1);
    out(*data_, 0x03);  // reset line high: nothing happens
    EXPECT_EQ(resets_, 0);
    out(*data_, 0x02);  // no command pending: a keyboard byte, dropped
    EXPECT_EQ(resets_, 0);
    out(*cmd_, 0xd1);
    out(*cmd_, 0xaa);   // a new command abandons the pending 0xD1
    out(*data_, 0x00);
    EXPECT_EQ(resets_, 0);
    out(*cmd_, 0xd1);
    out(*data_, 0xfe);
    EXPECT_EQ(resets_, 1);
}

TEST_F(I8042Ctl, OtherCommandsAndKeyboardBytesAreIgnored) {
    for (unsigned v = 0; v < 256; ++v) {
        if (v == 0xfe || v == 0xd1 || v == 0x60) continue;
        out(*cmd_, static_cast<std::uint8_t>(v));
        out(*data_, static_cast<std::uint8_t>(v));
    }
    EXPECT_EQ(resets_, 0);
}

TEST_F(I8042Ctl, ResetCallbackRunsUnlocked) {
    std::uint8_t seen = 0;
    auto kbc = std::make_shared<I8042>([&] { seen = in(*kbc_->command_port()); });  // would deadlock if locked
    kbc_ = kbc;
    out(*kbc->command_port(), 0xfe);
    EXPECT_EQ(seen, 0x04);   // the status register: system flag
}

TEST_F(I8042Ctl, PortsKeepTheControllerAlive) {
    kbc_.reset();
    out(*cmd_, 0xaa);
    EXPECT_EQ(in(*data_), 0x55);
}

TEST_F(I8042Ctl, WorksWithoutSharedOwnership) {
    int n = 0;
    I8042 kbc([&n] { ++n; });
    auto cmd = kbc.command_port();
    out(*cmd, 0xaa);
    EXPECT_EQ(in(*kbc.data_port()), 0x55);
    out(*cmd, 0xfe);
    EXPECT_EQ(n, 1);
}

TEST_F(I8042Ctl, OnABus) {
    Bus pio("pio");
    pio.insert(I8042::kDataPort, I8042::kPortLen, data_);
    pio.insert(I8042::kCommandPort, I8042::kPortLen, cmd_);
    pio.insert(0x61, 1, std::make_shared<Speaker>());  // 0x61 stays someone else's
    std::uint8_t v = 0xfe;
    EXPECT_TRUE(pio.write(0x64, std::span<const std::uint8_t>(&v, 1)));
    EXPECT_EQ(resets_, 1);
    std::uint8_t w[2] = {0, 0};
    EXPECT_FALSE(pio.read(0x64, w));  // wider than the port: unclaimed
    EXPECT_TRUE(pio.read(0x64, std::span<std::uint8_t>(w, 1)));
    EXPECT_EQ(w[0], 0x04);
}

TEST_F(I8042Ctl, OddWidthsAndOffsets) {
    std::uint8_t buf[8] = {0xfe, 0xfe, 0xfe, 0xfe, 0xfe, 0xfe, 0xfe, 0xfe};
    cmd_->write(1, buf);                                   // not at the port: ignored
    cmd_->write(~0ull, std::span<const std::uint8_t>(buf, 1));
    cmd_->write(0, std::span<const std::uint8_t>());       // no bytes at all
    EXPECT_EQ(resets_, 0);
    cmd_->write(0, buf);  // 8 bytes: the first one counts
    EXPECT_EQ(resets_, 1);
    cmd_->read(0, buf);
    EXPECT_EQ(buf[0], 0x04);
    for (int i = 1; i < 8; ++i) EXPECT_EQ(buf[i], 0xff);
    data_->read(3, std::span<std::uint8_t>(buf, 2));
    EXPECT_EQ(buf[0], 0xff);
    cmd_->read(0, std::span<std::uint8_t>());
}

// Random accesses of any width, offset and value; a small mirror of the
// command state predicts the resets that must happen (0xFE on the command
// port, or 0xD1 followed by a data byte with bit 0 clear) and no others.
TEST_F(I8042Ctl, RandomHostileAccesses) {
    std::mt19937_64 rng(8042);
    std::vector<std::uint8_t> buf(12);
    int expected = 0;
    std::uint8_t pending = 0;
    for (int i = 0; i < 200000; ++i) {
        std::uint64_t r = rng();
        bool command = r & 1, write = r & 2;
        std::size_t width = (r >> 2) % 10;
        std::uint64_t offset = (r >> 8) % 4 == 0 ? rng() : 0;
        for (auto& b : buf) b = static_cast<std::uint8_t>(rng());
        std::span<std::uint8_t> data(buf.data(), width);
        BusDevice& dev = command ? *cmd_ : *data_;
        if (!write) {
            dev.read(offset, data);
            continue;
        }
        dev.write(offset, data);
        if (offset != 0 || width == 0) continue;
        std::uint8_t v = buf[0];
        if (command) {
            if (v == 0xfe) ++expected;
            pending = (v == 0x60 || v == 0xd1) ? v : 0;
        } else {
            if (pending == 0xd1 && !(v & 1)) ++expected;
            pending = 0;
        }
    }
    EXPECT_GT(expected, 0);
    EXPECT_EQ(resets_, expected);
    EXPECT_EQ(status() & 0x02, 0);
}

} // namespace
} // namespace kguest
