// virtio-rng end to end: the small guest's driver (guest/rng.cpp, test=rng)
// behind kguest's device (--rng) and, unchanged, behind QEMU's
// virtio-rng-pci. Checked here: the guest gets the bytes it asked for and
// they look random (the guest's own check); with a file as the source, the
// exit summary counts exactly the bytes the guest took; with a low rate the
// guest cannot take them faster than the bucket allows (a lower bound on the
// run time, which a slow host cannot break); a missing source is one line
// and exit 2.
#include "tests/support/kvm_env.hpp"
#include "tests/support/process.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <fstream>
#include <random>
#include <regex>
#include <string>
#include <unistd.h>

namespace kguest {
namespace {
using namespace kguest::test;

TEST(KvmRng, GuestReadsRandomBytesFromUrandom) {
    KGUEST_OPEN_KVM(kvm);
    auto r = run_process(kguest_run("test=rng rng.n=8192", 1, {"--console", "stdio", "--rng"}), 120);
    ASSERT_EQ(r.status, 0) << r.out << r.err;
    auto rows = results(r.out, "rng");
    ASSERT_EQ(rows.size(), 1u) << r.out;
    EXPECT_EQ(rows[0]["pass"], "1");
    EXPECT_EQ(rows[0]["bytes"], "8192");
    EXPECT_NE(r.err.find("virtio-rng at PCI 00:01.0 from /dev/urandom"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("virtio-rng: 8192 bytes in"), std::string::npos) << r.err;
}

TEST(KvmRng, FileSourceAndRateLimit) {
    KGUEST_OPEN_KVM(kvm);
    const std::string src = "/tmp/kguest-rng-src-" + std::to_string(::getpid());
    {
        std::mt19937 gen(7);
        std::ofstream f(src, std::ios::binary);
        for (int i = 0; i < 16384; ++i) f.put(static_cast<char>(gen()));
    }
    // 4096 bytes at 1 KiB/s from a 1 KiB bucket: 3 s of refill at least.
    auto r = run_process(kguest_run("test=rng rng.n=4096 rng.chunk=256", 1,
                                    {"--console", "stdio", "--rng", "src=" + src + ",rate=1K"}),
                         120);
    ::unlink(src.c_str());
    ASSERT_EQ(r.status, 0) << r.out << r.err;
    auto rows = results(r.out, "rng");
    ASSERT_EQ(rows.size(), 1u) << r.out;
    EXPECT_EQ(rows[0]["pass"], "1");
    EXPECT_GE(r.wall_s, 2.9) << "4 KiB at 1 KiB/s with a 1 KiB burst";
    std::smatch m;
    ASSERT_TRUE(std::regex_search(r.err, m, std::regex(R"(virtio-rng: (\d+) bytes in (\d+) requests, (\d+) waits)")))
        << r.err;
    EXPECT_EQ(m[1], "4096");
    EXPECT_GE(std::stoul(m[2]), 16u);   // 256-byte buffers
    EXPECT_GE(std::stoul(m[3]), 1u);    // the bucket ran dry
}

TEST(KvmRng, MissingSourceIsOneLineAndExitTwo) {
    KGUEST_OPEN_KVM(kvm);
    auto r = run_process(kguest_run("test=rng", 1, {"--rng", "src=/nonexistent/entropy"}), 60);
    EXPECT_EQ(r.status, 2) << r.err;
    EXPECT_NE(r.err.find("--rng src=/nonexistent/entropy: No such file or directory"), std::string::npos) << r.err;
}

TEST(KvmRng, SameGuestOnQemuVirtioRngPci) {
    KGUEST_OPEN_KVM(kvm);
    // isa-debug-exit turns the guest's status S into (S << 1) | 1.
    auto r = run_process({"qemu-system-x86_64", "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "128",
                          "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-device",
                          "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", kGuestElf, "-append", "test=rng",
                          "-device", "virtio-rng-pci,disable-legacy=on"},
                         300);
    ASSERT_EQ(r.status, 1) << r.out << r.err;
    auto rows = results(r.out, "rng");
    ASSERT_EQ(rows.size(), 1u) << r.out;
    EXPECT_EQ(rows[0]["pass"], "1");
}

} // namespace
} // namespace kguest
