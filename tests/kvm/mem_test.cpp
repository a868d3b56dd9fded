// The small guest's virtio-mem test (test=mem, guest/mem.cpp) on kguest's
// device and, unchanged, on QEMU's virtio-mem-pci: the guest waits for a
// requested_size, plugs up to it in 2 MiB blocks, writes and checks a pattern
// in every plugged block, unplugs every other block and checks the rest kept
// their contents, and checks the spec's NACK and ERROR answers. On kguest the
// test sets requested_size through `kguest resize` while the guest waits.
#include "tests/support/kvm_env.hpp"
#include "tests/support/process.hpp"

#include <gtest/gtest.h>

#include <string>
#include <unistd.h>

namespace kguest {
namespace {
using namespace kguest::test;

TEST(KvmMem, SmallGuestOnKguest) {
    KGUEST_OPEN_KVM(kvm);
    const std::string sock = "/tmp/kguest-test-mem.sock";
    Background vm({kKguest, "run", "--kernel", kGuestElf, "--memory", "256M", "--memory-max", "1G",
                   "--api-socket", sock, "--cmdline", "test=mem"});
    ASSERT_TRUE(vm.wait_for_output("mem: waiting for requested_size", 60)) << vm.out() << vm.err();
    // 256M boot + 64 MiB: 32 blocks of 2 MiB, and a 33rd PLUG the device must NACK.
    auto r = run_process({kKguest, "resize", "--api-socket", sock, "--memory", "320M"}, 30);
    ASSERT_EQ(r.status, 0) << r.out << r.err;
    auto end = vm.wait(120);
    EXPECT_EQ(end.status, 0) << vm.out() << vm.err();
    EXPECT_NE(vm.out().find("RESULT mem blocks=32 block_kib=2048 plugged=32 unplugged=16 pattern_bad=0 kept_bad=0 "
                            "past_requested=nack pass=1"),
              std::string::npos)
        << vm.out();
    EXPECT_NE(vm.err().find("virtio-mem at PCI"), std::string::npos) << vm.err();
    unlink(sock.c_str());
}

TEST(KvmMem, SmallGuestOnQemu) {
    KGUEST_OPEN_KVM(kvm);
    // QEMU's isa-debug-exit turns the guest's status S into (S << 1) | 1, so success is 1.
    auto r = run_process({"qemu-system-x86_64", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
                          "-m", "512M,maxmem=4G,slots=1", "-object", "memory-backend-ram,id=m0,size=2G",
                          "-device", "virtio-mem-pci,memdev=m0,block-size=2M,requested-size=64M",
                          "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                          "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", kGuestElf,
                          "-append", "test=mem"},
                         300);
    EXPECT_EQ(r.status, 1) << r.out << r.err;
    EXPECT_NE(r.out.find("RESULT mem blocks=32 block_kib=2048 plugged=32 unplugged=16 pattern_bad=0 kept_bad=0 "
                         "past_requested=nack pass=1"),
              std::string::npos)
        << r.out;
}

} // namespace
} // namespace kguest
