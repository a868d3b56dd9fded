// What the guest sees in CPUID: KVM_GET_SUPPORTED_CPUID adjusted per vCPU (the
// APIC ID and topology, one thread per core, `cpus` cores; the hypervisor bit;
// TSC-deadline) and the KVM leaves 0x40000000/0x40000001 with the PV features
// kguest offers, masked by the host's (Documentation/virt/kvm/x86/cpuid.rst).
#pragma once

#include <cstdint>
#include "vmm/kvm_uapi.hpp"
#include <vector>

namespace kguest {

// 0x40000001 EAX bits (include/uapi/asm/kvm_para.h).
enum : std::uint32_t {
    KVM_FEATURE_CLOCKSOURCE = 0, KVM_FEATURE_NOP_IO_DELAY = 1, KVM_FEATURE_CLOCKSOURCE2 = 3,
    KVM_FEATURE_STEAL_TIME = 5, KVM_FEATURE_PV_EOI = 6, KVM_FEATURE_PV_UNHALT = 7, KVM_FEATURE_PV_TLB_FLUSH = 9,
    KVM_FEATURE_PV_SEND_IPI = 11, KVM_FEATURE_POLL_CONTROL = 12, KVM_FEATURE_PV_SCHED_YIELD = 13,
    KVM_FEATURE_CLOCKSOURCE_STABLE_BIT = 24,
};
inline constexpr std::uint32_t KVM_CPUID_SIGNATURE = 0x40000000;
inline constexpr std::uint32_t KVM_CPUID_FEATURES = 0x40000001;

// The PV features kguest asks for. Left out: ASYNC_PF* (needs VMM support for
// async page faults we do not wire up) and MSI_EXT_DEST_ID.
inline constexpr std::uint32_t kWantedPvFeatures =
    (1u << KVM_FEATURE_CLOCKSOURCE) | (1u << KVM_FEATURE_NOP_IO_DELAY) | (1u << KVM_FEATURE_CLOCKSOURCE2) |
    (1u << KVM_FEATURE_STEAL_TIME) | (1u << KVM_FEATURE_PV_EOI) | (1u << KVM_FEATURE_PV_UNHALT) |
    (1u << KVM_FEATURE_PV_TLB_FLUSH) | (1u << KVM_FEATURE_PV_SEND_IPI) | (1u << KVM_FEATURE_POLL_CONTROL) |
    (1u << KVM_FEATURE_PV_SCHED_YIELD) | (1u << KVM_FEATURE_CLOCKSOURCE_STABLE_BIT);

// The PV features a guest uses through hypercalls (VMCALL/VMMCALL):
// KVM_HC_KICK_CPU, KVM_HC_SEND_IPI, KVM_HC_SCHED_YIELD.
inline constexpr std::uint32_t kHypercallPvFeatures =
    (1u << KVM_FEATURE_PV_UNHALT) | (1u << KVM_FEATURE_PV_SEND_IPI) | (1u << KVM_FEATURE_PV_SCHED_YIELD);

struct CpuidOptions {
    unsigned vcpu_id = 0, cpus = 1;
    bool tsc_deadline = false;     // KVM_CAP_TSC_DEADLINE_TIMER and in-kernel LAPIC
    std::uint32_t pv_features = kWantedPvFeatures;  // further masked by the host
};

// A pure function of the supported table, so unit tests feed it made-up tables.
std::vector<kvm_cpuid_entry2> make_guest_cpuid(const std::vector<kvm_cpuid_entry2>& supported,
                                               const CpuidOptions& opt);

} // namespace kguest
