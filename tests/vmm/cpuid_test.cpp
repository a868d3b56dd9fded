// make_guest_cpuid on made-up supported tables: leaf 1 APIC ID/count and
// flags, x2APIC topology in leaf 0xB, and the KVM paravirt leaves.
#include "vmm/cpuid.hpp"

#include <cstdint>
#include <cstring>
#include <gtest/gtest.h>
#include <string>
#include <vector>

namespace kguest {
namespace {

kvm_cpuid_entry2 entry(std::uint32_t fn, std::uint32_t idx = 0, std::uint32_t eax = 0, std::uint32_t ebx = 0,
                       std::uint32_t ecx = 0, std::uint32_t edx = 0) {
    kvm_cpuid_entry2 e{};
    e.function = fn;
    e.index = idx;
    e.flags = (fn == 0xb || fn == 4) ? KVM_CPUID_FLAG_SIGNIFCANT_INDEX : 0;
    e.eax = eax;
    e.ebx = ebx;
    e.ecx = ecx;
    e.edx = edx;
    return e;
}

// Roughly what KVM_GET_SUPPORTED_CPUID returns, with `host_pv` in 0x40000001.
std::vector<kvm_cpuid_entry2> supported(std::uint32_t host_pv) {
    return {
        entry(0, 0, 0xd, 0x756e6547, 0x6c65746e, 0x49656e69),
        entry(1, 0, 0x000806f8, 0xaaaa1234, 0x7ef83203, 0x178bfbff),
        entry(0xb, 0, 1, 2, 0x100, 7),
        entry(0xb, 1, 4, 16, 0x201, 7),
        entry(0xb, 2, 0, 0, 2, 7),
        entry(KVM_CPUID_SIGNATURE, 0, KVM_CPUID_FEATURES, 0x4b4d564b, 0x564b4d56, 0x4d),
        entry(KVM_CPUID_FEATURES, 0, host_pv, 0, 0, 0xffffffff),
    };
}

const kvm_cpuid_entry2* find(const std::vector<kvm_cpuid_entry2>& t, std::uint32_t fn, std::uint32_t idx = 0) {
    const kvm_cpuid_entry2* found = nullptr;
    for (const auto& e : t)
        if (e.function == fn && e.index == idx) {
            EXPECT_EQ(found, nullptr) << "duplicate leaf " << std::hex << fn;
            found = &e;
        }
    return found;
}

std::vector<kvm_cpuid_entry2> make(unsigned vcpu, unsigned cpus, bool tsc_deadline, std::uint32_t host_pv = 0xffffffff) {
    CpuidOptions opt;
    opt.vcpu_id = vcpu;
    opt.cpus = cpus;
    opt.tsc_deadline = tsc_deadline;
    return make_guest_cpuid(supported(host_pv), opt);
}

TEST(GuestCpuid, Leaf1) {
    auto t = make(3, 6, false);
    const auto* e = find(t, 1);
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->ebx >> 24, 3u);            // initial APIC ID
    EXPECT_EQ((e->ebx >> 16) & 0xff, 6u);   // logical processors
    EXPECT_EQ(e->ebx & 0xffff, 0x1234u);    // the rest kept
    EXPECT_NE(e->ecx & (1u << 31), 0u);     // hypervisor
    EXPECT_EQ(e->ecx & (1u << 24), 0u);     // no TSC-deadline unless asked
    EXPECT_EQ(e->ecx & ~(1u << 31), 0x7ef83203u);  // the rest kept
    EXPECT_NE(e->edx & (1u << 28), 0u);     // HTT with more than one CPU
    EXPECT_EQ(e->eax, 0x000806f8u);

    t = make(0, 1, true);
    e = find(t, 1);
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->ebx >> 24, 0u);
    EXPECT_EQ((e->ebx >> 16) & 0xff, 1u);
    EXPECT_NE(e->ecx & (1u << 24), 0u);
}

TEST(GuestCpuid, Leaf0bTopology) {
    for (auto [cpus, shift] : {std::pair{1u, 0u}, {2u, 1u}, {3u, 2u}, {4u, 2u}, {5u, 3u}, {8u, 3u}, {9u, 4u}}) {
        unsigned vcpu = cpus - 1;
        auto t = make(vcpu, cpus, false);
        const auto* smt = find(t, 0xb, 0);
        const auto* core = find(t, 0xb, 1);
        const auto* end = find(t, 0xb, 2);
        ASSERT_TRUE(smt && core && end);
        EXPECT_EQ(smt->eax, 0u);
        EXPECT_EQ(smt->ebx, 1u);
        EXPECT_EQ(smt->ecx, 0x100u);  // level 0, type 1 (SMT)
        EXPECT_EQ(smt->edx, vcpu);
        EXPECT_EQ(core->eax, shift) << cpus;
        EXPECT_EQ(core->ebx, cpus);
        EXPECT_EQ(core->ecx, 0x201u);  // level 1, type 2 (core)
        EXPECT_EQ(core->edx, vcpu);
        EXPECT_EQ(end->ebx, 0u);       // level 2: invalid, ends the enumeration
        EXPECT_EQ((end->ecx >> 8) & 0xff, 0u);
        EXPECT_EQ(end->edx, vcpu);
    }
}

TEST(GuestCpuid, KvmSignature) {
    auto t = make(0, 1, false);
    const auto* sig = find(t, KVM_CPUID_SIGNATURE);
    ASSERT_NE(sig, nullptr);
    EXPECT_EQ(sig->eax, KVM_CPUID_FEATURES);
    char name[13] = {};
    std::memcpy(name, &sig->ebx, 4);
    std::memcpy(name + 4, &sig->ecx, 4);
    std::memcpy(name + 8, &sig->edx, 4);
    EXPECT_EQ(std::string(name, 12), std::string("KVMKVMKVM\0\0\0", 12));
}

TEST(GuestCpuid, PvFeaturesAreTheIntersection) {
    auto t = make(0, 1, false, 0xffffffff);
    const auto* f = find(t, KVM_CPUID_FEATURES);
    ASSERT_NE(f, nullptr);
    EXPECT_EQ(f->eax, kWantedPvFeatures);
    EXPECT_EQ(f->edx, 0u);  // host said 0xffffffff: no KVM_HINTS_REALTIME passed through

    t = make(0, 1, false, 1u << KVM_FEATURE_PV_UNHALT);
    f = find(t, KVM_CPUID_FEATURES);
    ASSERT_NE(f, nullptr);
    EXPECT_EQ(f->eax, 1u << KVM_FEATURE_PV_UNHALT);

    t = make(0, 1, false, 0);
    EXPECT_EQ(find(t, KVM_CPUID_FEATURES)->eax, 0u);

    CpuidOptions opt;
    opt.pv_features = 1u << KVM_FEATURE_CLOCKSOURCE2;
    t = make_guest_cpuid(supported(0xffffffff), opt);
    EXPECT_EQ(find(t, KVM_CPUID_FEATURES)->eax, 1u << KVM_FEATURE_CLOCKSOURCE2);
}

TEST(GuestCpuid, KvmLeavesNotDuplicated) {
    auto table = supported(1u << KVM_FEATURE_PV_EOI);
    table.push_back(entry(KVM_CPUID_SIGNATURE, 0, 0x40000010));
    table.push_back(entry(KVM_CPUID_FEATURES, 0, 0xffffffff));
    auto t = make_guest_cpuid(table, CpuidOptions{});
    unsigned sig = 0, feat = 0;
    for (const auto& e : t) {
        sig += e.function == KVM_CPUID_SIGNATURE;
        feat += e.function == KVM_CPUID_FEATURES;
    }
    EXPECT_EQ(sig, 1u);
    EXPECT_EQ(feat, 1u);
    EXPECT_EQ(find(t, KVM_CPUID_SIGNATURE)->eax, KVM_CPUID_FEATURES);
    EXPECT_EQ(find(t, KVM_CPUID_FEATURES)->eax, 1u << KVM_FEATURE_PV_EOI);  // the first host entry counts
    EXPECT_EQ(t.size(), supported(0).size());  // nothing else added or lost
}

TEST(GuestCpuid, KvmLeavesAddedWhenHostHasNone) {
    auto table = supported(0);
    table.resize(table.size() - 2);
    auto t = make_guest_cpuid(table, CpuidOptions{});
    ASSERT_NE(find(t, KVM_CPUID_SIGNATURE), nullptr);
    ASSERT_NE(find(t, KVM_CPUID_FEATURES), nullptr);
    EXPECT_EQ(find(t, KVM_CPUID_FEATURES)->eax, 0u);  // nothing the host did not offer
}

} // namespace
} // namespace kguest
