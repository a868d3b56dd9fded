// Port 0x80 (POST codes, counted writes, 0xff reads) and the 0xf4 exit port,
// driven through the userspace path (the in-kernel path: vmm/port80_kvm_test.cpp).
#include "devices/exit_port.hpp"
#include "devices/port80.hpp"

#include <cstdint>
#include <cstring>
#include <gtest/gtest.h>
#include <vector>

namespace kguest {
namespace {

TEST(Port80, CountsWritesAndKeepsTheLowByte) {
    Port80 p;
    EXPECT_FALSE(p.absorbed());
    EXPECT_EQ(p.writes(), 0u);
    const std::uint8_t b1[1] = {0x12};
    const std::uint8_t b2[2] = {0x34, 0x56};
    const std::uint8_t b4[4] = {0x78, 0x9a, 0xbc, 0xde};
    p.write(0, b1);
    EXPECT_EQ(p.last_code(), 0x12);
    p.write(0, b4);
    EXPECT_EQ(p.last_code(), 0x78);
    p.write(0, b2);
    EXPECT_EQ(p.last_code(), 0x34);
    EXPECT_EQ(p.writes(), 3u);
    EXPECT_EQ(p.writes(), 3u);  // reading the count does not reset it
    EXPECT_EQ(p.reads(), 0u);
}

TEST(Port80, ReadsReturnAllOnes) {
    Port80 p;
    for (std::size_t width : {1u, 2u, 4u}) {
        std::vector<std::uint8_t> data(width, 0);
        p.read(0, data);
        for (std::uint8_t b : data) EXPECT_EQ(b, 0xff) << width;
    }
    EXPECT_EQ(p.reads(), 3u);
    EXPECT_EQ(p.writes(), 0u);
    EXPECT_EQ(p.last_code(), 0u);
}

TEST(ExitPort, WriteStopsWithTheValue) {
    std::vector<int> stops;
    ExitPort port([&](int status) { stops.push_back(status); });
    const std::uint8_t v[1] = {7};
    port.write(0, v);
    EXPECT_EQ(stops, (std::vector<int>{7}));
    const std::uint8_t wide[4] = {0x2a, 0x01, 0x00, 0x00};  // only the low byte counts
    port.write(0, wide);
    EXPECT_EQ(stops, (std::vector<int>{7, 42}));
    port.write(1, v);  // not the base port
    EXPECT_EQ(stops.size(), 2u);
    std::uint8_t in[4] = {0xaa, 0xaa, 0xaa, 0xaa};
    port.read(0, in);
    for (std::uint8_t b : in) EXPECT_EQ(b, 0);
    EXPECT_EQ(stops.size(), 2u);
}

} // namespace
} // namespace kguest
