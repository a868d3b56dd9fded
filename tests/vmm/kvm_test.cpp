// The first real-KVM test: build a VM with our own Kvm/Vm/Vcpu classes, put a
// few real-mode instructions in guest RAM, and check every exit they cause.
#include "tests/support/kvm_env.hpp"
#include "devices/base/error.hpp"
#include "devices/base/guest_memory.hpp"

#include <vector>

namespace kguest {
namespace {

constexpr std::uint64_t kCodeGpa = 0x1000;

struct RealModeVm {
    std::unique_ptr<Kvm>& kvm;
    Vm vm;
    GuestMemory mem{2 << 20, Backing::off};
    Vcpu vcpu;

    RealModeVm(std::unique_ptr<Kvm>& k, const std::vector<std::uint8_t>& code)
        : kvm(k), vm(k->create_vm()), vcpu(make_vcpu(code)) {}

    Vcpu make_vcpu(const std::vector<std::uint8_t>& code) {
        EXPECT_TRUE(mem.write(Gpa(kCodeGpa), code.data(), code.size()));
        vm.set_user_memory_region(0, 0, mem.size(), mem.host_address_for_kvm(mem.regions()[0]));
        Vcpu v = vm.create_vcpu(0);
        kvm_sregs s = v.get_sregs();
        s.cs.base = 0;
        s.cs.selector = 0;
        v.set_sregs(s);
        kvm_regs r{};
        r.rip = kCodeGpa;
        r.rflags = 2;  // bit 1 is reserved and must be set
        v.set_regs(r);
        return v;
    }
};

TEST(KvmSmoke, Port80LoopThenHalt) {
    KGUEST_OPEN_KVM(kvm);
    // mov cx, 5 ; l: mov al, cl ; out 0x80, al ; loop l ; hlt
    RealModeVm t(kvm, {0xb9, 0x05, 0x00, 0x88, 0xc8, 0xe6, 0x80, 0xe2, 0xfa, 0xf4});
    std::vector<int> seen;
    for (int guard = 0; guard < 100; ++guard) {
        ASSERT_EQ(t.vcpu.run(), 0);
        kvm_run& run = t.vcpu.run_state();
        if (run.exit_reason == KVM_EXIT_HLT) break;
        ASSERT_EQ(run.exit_reason, static_cast<unsigned>(KVM_EXIT_IO));
        EXPECT_EQ(run.io.direction, KVM_EXIT_IO_OUT);
        EXPECT_EQ(run.io.port, 0x80);
        EXPECT_EQ(run.io.size, 1);
        EXPECT_EQ(run.io.count, 1u);
        seen.push_back(reinterpret_cast<std::uint8_t*>(&run)[run.io.data_offset]);
    }
    EXPECT_EQ(t.vcpu.run_state().exit_reason, static_cast<unsigned>(KVM_EXIT_HLT));
    EXPECT_EQ(seen, (std::vector<int>{5, 4, 3, 2, 1}));
    EXPECT_EQ(t.vcpu.get_regs().rip, kCodeGpa + 10);  // just past the hlt
}

TEST(KvmSmoke, RepOutsbDeliversEveryByte) {
    KGUEST_OPEN_KVM(kvm);
    // mov dx, 0x80 ; mov si, 0x2000 ; mov cx, 300 ; rep outsb ; hlt
    RealModeVm t(kvm, {0xba, 0x80, 0x00, 0xbe, 0x00, 0x20, 0xb9, 0x2c, 0x01, 0xf3, 0x6e, 0xf4});
    std::vector<std::uint8_t> pattern(300);
    for (std::size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<std::uint8_t>(i * 7);
    ASSERT_TRUE(t.mem.write(Gpa(0x2000), pattern.data(), pattern.size()));
    std::vector<std::uint8_t> got;
    for (int guard = 0; guard < 400; ++guard) {
        ASSERT_EQ(t.vcpu.run(), 0);
        kvm_run& run = t.vcpu.run_state();
        if (run.exit_reason == KVM_EXIT_HLT) break;
        ASSERT_EQ(run.exit_reason, static_cast<unsigned>(KVM_EXIT_IO));
        ASSERT_EQ(run.io.port, 0x80);
        ASSERT_EQ(run.io.size, 1);
        auto* data = reinterpret_cast<std::uint8_t*>(&run) + run.io.data_offset;
        got.insert(got.end(), data, data + run.io.count);
    }
    EXPECT_EQ(got, pattern);
}

TEST(KvmSmoke, FailedIoctlNamesItselfAndErrno) {
    KGUEST_OPEN_KVM(kvm);
    Vm vm = kvm->create_vm();
    // A size that is not a multiple of the page size is refused with EINVAL.
    GuestMemory mem{2 << 20, Backing::off};
    try {
        vm.set_user_memory_region(0, 0, 1000, mem.host_address_for_kvm(mem.regions()[0]));
        FAIL() << "KVM accepted an unaligned memory slot";
    } catch (const SysError& e) {
        EXPECT_EQ(e.err(), EINVAL);
        EXPECT_NE(std::string(e.what()).find("KVM_SET_USER_MEMORY_REGION"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("errno 22"), std::string::npos) << e.what();
    }
}

} // namespace
} // namespace kguest
