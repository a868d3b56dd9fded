// Command-line size parsing.
#include "devices/base/size.hpp"

#include <gtest/gtest.h>

namespace kguest {
namespace {

TEST(ParseSize, Suffixes) {
    EXPECT_EQ(parse_size("4096"), 4096u);
    EXPECT_EQ(parse_size("64K"), 64u << 10);
    EXPECT_EQ(parse_size("256M"), 256u << 20);
    EXPECT_EQ(parse_size("2G"), 2ull << 30);
    EXPECT_EQ(parse_size("2g"), 2ull << 30);
    EXPECT_EQ(parse_size("1T"), 1ull << 40);
    EXPECT_EQ(parse_size("512MiB"), 512ull << 20);
    EXPECT_EQ(parse_size("512MB"), 512ull << 20);
    EXPECT_EQ(parse_size("100B"), 100u);
}

TEST(ParseSize, RejectsJunk) {
    for (const char* bad : {"", "M", "-1", "1.5G", "12X", "1GG", "1 G", "0x10", "1Gi", "99999999999999999999"})
        EXPECT_FALSE(parse_size(bad).has_value()) << bad;
    EXPECT_FALSE(parse_size("17179869184G").has_value());  // 2^34 GiB overflows 64 bits
}

TEST(FormatSize, Readable) {
    EXPECT_EQ(format_size(256ull << 20), "256 MiB");
    EXPECT_EQ(format_size(1536ull << 20), "1.5 GiB");
    EXPECT_EQ(format_size(100), "100 B");
}

} // namespace
} // namespace kguest
