// Bus: range insertion (overlap and bad-range refusal), dispatch with offsets
// relative to the base, unclaimed and straddling accesses, remove(), and the
// range ids and names that read and write report.
#include "devices/base/bus.hpp"

#include <algorithm>
#include <cstdint>
#include <gtest/gtest.h>
#include <memory>
#include <stdexcept>
#include <vector>

namespace kguest {
namespace {

// Records every access; reads return offset + i in each byte.
struct Recorder : BusDevice {
    struct Access {
        bool write;
        std::uint64_t offset;
        std::vector<std::uint8_t> data;
    };
    std::vector<Access> log;

    void read(std::uint64_t offset, std::span<std::uint8_t> data) override {
        for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::uint8_t>(offset + i);
        log.push_back({false, offset, {data.begin(), data.end()}});
    }
    void write(std::uint64_t offset, std::span<const std::uint8_t> data) override {
        log.push_back({true, offset, {data.begin(), data.end()}});
    }
};

TEST(Bus, OverlapsRefused) {
    Bus bus("test");
    bus.insert(0x100, 0x10, std::make_shared<Recorder>());  // [0x100, 0x10f]
    auto dev = std::make_shared<Recorder>();
    EXPECT_THROW(bus.insert(0x100, 0x10, dev), std::invalid_argument);  // exact
    EXPECT_THROW(bus.insert(0xf8, 0x9, dev), std::invalid_argument);    // covers 0x100
    EXPECT_THROW(bus.insert(0x10f, 0x8, dev), std::invalid_argument);   // starts at the last byte
    EXPECT_THROW(bus.insert(0x104, 0x4, dev), std::invalid_argument);   // contained
    EXPECT_THROW(bus.insert(0xf0, 0x40, dev), std::invalid_argument);   // containing
    EXPECT_THROW(bus.insert(0x100, 0x1, dev), std::invalid_argument);   // same base, shorter
}

TEST(Bus, AdjacentRangesAccepted) {
    Bus bus("test");
    auto a = std::make_shared<Recorder>(), b = std::make_shared<Recorder>(), c = std::make_shared<Recorder>();
    bus.insert(0x100, 0x10, a);
    EXPECT_NO_THROW(bus.insert(0xf0, 0x10, b));   // ends at 0xff
    EXPECT_NO_THROW(bus.insert(0x110, 0x10, c));  // starts at 0x110
    std::uint8_t v = 0;
    EXPECT_TRUE(bus.read(0xff, {&v, 1}));
    EXPECT_TRUE(bus.read(0x100, {&v, 1}));
    EXPECT_TRUE(bus.read(0x110, {&v, 1}));
    EXPECT_EQ(a->log.size(), 1u);
    EXPECT_EQ(b->log.size(), 1u);
    EXPECT_EQ(c->log.size(), 1u);
}

TEST(Bus, BadRangesRefused) {
    Bus bus("test");
    auto dev = std::make_shared<Recorder>();
    EXPECT_THROW(bus.insert(0x100, 0, dev), std::invalid_argument);
    EXPECT_THROW(bus.insert(UINT64_MAX, 2, dev), std::invalid_argument);
    EXPECT_THROW(bus.insert(UINT64_MAX - 3, UINT64_MAX, dev), std::invalid_argument);
    EXPECT_THROW(bus.insert(0x100, 1, nullptr), std::invalid_argument);
    EXPECT_NO_THROW(bus.insert(UINT64_MAX, 1, dev));  // the very last byte is a valid range
    std::uint8_t v = 0;
    EXPECT_TRUE(bus.read(UINT64_MAX, {&v, 1}));
}

TEST(Bus, DispatchUsesOffsets) {
    Bus bus("test");
    auto dev = std::make_shared<Recorder>();
    bus.insert(0x3f8, 8, dev);
    std::uint8_t in[2] = {};
    EXPECT_TRUE(bus.read(0x3fa, in));
    EXPECT_EQ(in[0], 2);
    EXPECT_EQ(in[1], 3);
    const std::uint8_t out[4] = {1, 2, 3, 4};
    EXPECT_TRUE(bus.write(0x3fc, out));
    ASSERT_EQ(dev->log.size(), 2u);
    EXPECT_FALSE(dev->log[0].write);
    EXPECT_EQ(dev->log[0].offset, 2u);
    EXPECT_TRUE(dev->log[1].write);
    EXPECT_EQ(dev->log[1].offset, 4u);
    EXPECT_EQ(dev->log[1].data, (std::vector<std::uint8_t>{1, 2, 3, 4}));
}

TEST(Bus, UnclaimedAndStraddlingAccesses) {
    Bus bus("test");
    auto dev = std::make_shared<Recorder>();
    bus.insert(0x100, 8, dev);
    std::uint8_t in[4] = {0, 0, 0, 0};
    EXPECT_FALSE(bus.read(0x200, in));  // nothing there
    for (std::uint8_t b : in) EXPECT_EQ(b, 0xff);
    std::fill(std::begin(in), std::end(in), 0);
    EXPECT_FALSE(bus.read(0x106, in));  // runs past the end
    for (std::uint8_t b : in) EXPECT_EQ(b, 0xff);
    std::fill(std::begin(in), std::end(in), 0);
    EXPECT_FALSE(bus.read(0xfe, in));  // starts before the base
    for (std::uint8_t b : in) EXPECT_EQ(b, 0xff);
    EXPECT_FALSE(bus.write(0x107, in));
    EXPECT_FALSE(bus.write(0xff, in));
    EXPECT_TRUE(bus.read(0x104, in));  // exactly the last 4 bytes
    EXPECT_TRUE(dev->log.size() == 1 && dev->log[0].offset == 4u);
}

TEST(Bus, Remove) {
    Bus bus("test");
    auto dev = std::make_shared<Recorder>();
    bus.insert(0x100, 8, dev);
    EXPECT_FALSE(bus.remove(0x104));  // not a base
    EXPECT_TRUE(bus.remove(0x100));
    EXPECT_FALSE(bus.remove(0x100));
    std::uint8_t v = 0;
    EXPECT_FALSE(bus.read(0x100, {&v, 1}));
    EXPECT_TRUE(dev->log.empty());
    EXPECT_NO_THROW(bus.insert(0x100, 8, dev));  // the range is free again
    EXPECT_TRUE(bus.read(0x100, {&v, 1}));
}

TEST(Bus, ReportsTheRangeItDispatchedTo) {
    Bus bus("PIO");
    auto dev = std::make_shared<Recorder>();
    bus.insert(0x3f8, 8, dev, "serial COM1");
    bus.insert(0x60, 1, dev);   // unnamed: the bus's name and the base
    std::uint8_t v = 0;
    std::uint32_t com1 = Bus::kNoRange, other = Bus::kNoRange;
    EXPECT_TRUE(bus.write(0x3fd, {&v, 1}, &com1));
    EXPECT_TRUE(bus.read(0x60, {&v, 1}, &other));
    EXPECT_NE(com1, other);
    EXPECT_EQ(bus.range_name(com1), "serial COM1");
    EXPECT_EQ(bus.range_name(other), "PIO 0x60");
    EXPECT_EQ(bus.range_name(Bus::kNoRange), "");
    std::uint32_t none = Bus::kNoRange;
    EXPECT_FALSE(bus.read(0x70, {&v, 1}, &none));
    EXPECT_FALSE(bus.write(0x3ff, {&v, 2}, &none));   // straddles the end
    EXPECT_EQ(none, Bus::kNoRange);
    // Re-inserted elsewhere under the same name (a moved BAR): the same id.
    ASSERT_TRUE(bus.remove(0x3f8));
    bus.insert(0x2f8, 8, dev, "serial COM1");
    std::uint32_t moved = Bus::kNoRange;
    EXPECT_TRUE(bus.read(0x2f8, {&v, 1}, &moved));
    EXPECT_EQ(moved, com1);
}

} // namespace
} // namespace kguest
