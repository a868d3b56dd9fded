// The `--net` option parser (vmm/app/net_options.hpp): good specs with their
// defaults, and every bad one a one-line UsageError.
#include "devices/base/error.hpp"
#include "vmm/app/net_options.hpp"

#include <gtest/gtest.h>
#include <string>

namespace kguest {
namespace {

TEST(NetBackendParse, GoodSpecs) {
    NetConfig c = parse_net_spec("tap=kgb0");
    EXPECT_EQ(c.kind, NetConfig::Kind::tap);
    EXPECT_EQ(c.target, "kgb0");
    EXPECT_EQ(c.queue_pairs, 1u);
    EXPECT_EQ(format_mac(c.mac), "52:54:00:12:34:56");
    c = parse_net_spec("tap=kgb0", 3);
    EXPECT_EQ(format_mac(c.mac), "52:54:00:12:34:59");
    c = parse_net_spec("tap=abcdefghijklmno,mac=02:AA:bb:cc:dd:0e,queues=4");
    EXPECT_EQ(c.target, "abcdefghijklmno");
    EXPECT_EQ(format_mac(c.mac), "02:aa:bb:cc:dd:0e");
    EXPECT_EQ(c.queue_pairs, 4u);
    c = parse_net_spec("mac=52:54:00:00:00:01,stream=/run/user/1000/passt.socket");
    EXPECT_EQ(c.kind, NetConfig::Kind::stream);
    EXPECT_EQ(c.target, "/run/user/1000/passt.socket");
    EXPECT_EQ(format_mac(c.mac), "52:54:00:00:00:01");
}

TEST(NetBackendParse, BadSpecsThrowUsageError) {
    const char* bad[] = {
        "",                                   // empty
        "tap",                                // not KEY=VALUE
        "tap=",                               // empty name
        "tap=abcdefghijklmnop",               // 16 > 15
        "tap=a/b",                            // invalid name
        "tap=..",
        "stream=",
        "tap=kgb0,stream=/x",                 // two kinds
        "tap=kgb0,foo=1",                     // unknown key
        "tap=kgb0,mac=01:00:5e:00:00:01",     // multicast
        "tap=kgb0,mac=00:00:00:00:00:00",
        "tap=kgb0,mac=52:54:00:12:34",        // short
        "tap=kgb0,mac=52-54-00-12-34-56",
        "tap=kgb0,mac=52:54:00:12:34:5g",
        "tap=kgb0,mac=52:54:00:12:34:56,mac=52:54:00:12:34:57",
        "tap=kgb0,queues=0",
        "tap=kgb0,queues=17",
        "tap=kgb0,queues=2x",
        "stream=/x,queues=2",                 // queues only for tap
        "mac=52:54:00:12:34:56",              // no kind
        "tap=kgb0,",                          // trailing empty item
    };
    for (const char* spec : bad) {
        try {
            parse_net_spec(spec);
            ADD_FAILURE() << "accepted '" << spec << "'";
        } catch (const UsageError& e) {
            const std::string msg = e.what();
            EXPECT_EQ(msg.find('\n'), std::string::npos);
            EXPECT_EQ(msg.rfind("--net ", 0), 0u) << msg;
        }
    }
    try {
        parse_net_spec("tap=kgb0,colour=blue");
    } catch (const UsageError& e) {
        EXPECT_NE(std::string(e.what()).find("unknown key 'colour'"), std::string::npos) << e.what();
    }
    try {
        parse_net_spec("tap=kgb0,mac=03:00:00:00:00:01");
    } catch (const UsageError& e) {
        EXPECT_NE(std::string(e.what()).find("multicast"), std::string::npos) << e.what();
    }
}

} // namespace
} // namespace kguest
