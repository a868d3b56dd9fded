// The `--disk` option parser (vmm/app/disk_options.hpp): good specs with
// their defaults, and every bad one a one-line UsageError.
#include "devices/base/error.hpp"
#include "vmm/app/disk_options.hpp"

#include <gtest/gtest.h>
#include <string>

namespace kguest {
namespace {

TEST(VirtioBlkDiskParse, GoodSpecs) {
    DiskConfig c = parse_disk_spec("path=/var/lib/disk.img");
    EXPECT_EQ(c.path, "/var/lib/disk.img");
    EXPECT_FALSE(c.readonly);
    EXPECT_EQ(c.serial, "");
    EXPECT_EQ(c.cache, DiskConfig::Cache::writeback);
    EXPECT_EQ(c.queues, 1u);
    EXPECT_FALSE(c.discard);
    c = parse_disk_spec("queues=4,path=d.img,readonly=on,serial=ABC-123_x.y,cache=none,discard=on");
    EXPECT_EQ(c.path, "d.img");
    EXPECT_TRUE(c.readonly);
    EXPECT_EQ(c.serial, "ABC-123_x.y");
    EXPECT_EQ(c.cache, DiskConfig::Cache::none);
    EXPECT_EQ(c.queues, 4u);
    EXPECT_TRUE(c.discard);
    c = parse_disk_spec("path=x,readonly=off,discard=off,cache=writeback,serial=12345678901234567890");
    EXPECT_FALSE(c.readonly);
    EXPECT_FALSE(c.discard);
    EXPECT_EQ(c.serial.size(), 20u);
}

TEST(VirtioBlkDiskParse, BadSpecsThrowUsageError) {
    const char* bad[] = {
        "",                                     // empty
        "disk.img",                             // not KEY=VALUE
        "path=",                                // empty path
        "readonly=on",                          // no path
        "path=a,path=b",                        // twice
        "path=a,readonly=yes",
        "path=a,serial=",
        "path=a,serial=123456789012345678901",  // 21 > 20
        "path=a,serial=has space",
        "path=a,cache=unsafe",
        "path=a,queues=0",
        "path=a,queues=65",
        "path=a,queues=2x",
        "path=a,discard=1",
        "path=a,format=raw",                    // unknown key
        "path=a,",
    };
    for (const char* s : bad) {
        try {
            parse_disk_spec(s);
            ADD_FAILURE() << "accepted: " << s;
        } catch (const UsageError& e) {
            const std::string msg = e.what();
            EXPECT_EQ(msg.rfind("--disk ", 0), 0u) << msg;
            EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
        }
    }
}

} // namespace
} // namespace kguest
