// The boot timeline: steps keep their first time, and the init step follows
// the kernel's "Run ... as init process" line. (Each test runs in a process
// of its own under ctest, so the process-wide timeline starts empty.)
#include "devices/base/timeline.hpp"

#include <gtest/gtest.h>
#include <string_view>

namespace kguest {
namespace {

void console(std::string_view s) {
    for (char c : s) boot_console_output(static_cast<std::uint8_t>(c));
}

TEST(BootTimeline, InitLineIsTheFirstWholeLineAfterTheKernelRunsInit) {
    boot_step(BootStep::kvm_ready);
    console("[    0.000000] Linux version 6.1\r\n");
    std::string r = boot_timeline_report();
    EXPECT_NE(r.find("KVM ready"), std::string::npos) << r;
    EXPECT_NE(r.find("first serial byte"), std::string::npos) << r;
    EXPECT_EQ(r.find("first line from init"), std::string::npos) << r;

    console("kguest-init: start\n");   // not after the kernel's line yet
    EXPECT_EQ(boot_timeline_report().find("first line from init"), std::string::npos);
    console("[    1.500000] Run /init as init process\r\n\r\nkguest-ini");
    EXPECT_EQ(boot_timeline_report().find("first line from init"), std::string::npos) << "a half line";
    console("t: start\r\n");
    r = boot_timeline_report();
    EXPECT_NE(r.find("first line from init"), std::string::npos) << r;
    // In time order: KVM ready before the serial steps.
    EXPECT_LT(r.find("KVM ready"), r.find("first serial byte")) << r;
    EXPECT_LT(r.find("first serial byte"), r.find("first line from init")) << r;
    EXPECT_EQ(r.find("first KVM_RUN"), std::string::npos) << "a step never reached is not listed";
}

TEST(BootTimeline, AStepKeepsItsFirstTime) {
    boot_step(BootStep::first_kvm_run);
    const std::string first = boot_timeline_report();
    boot_step(BootStep::first_kvm_run);
    EXPECT_EQ(boot_timeline_report(), first);
}

} // namespace
} // namespace kguest
