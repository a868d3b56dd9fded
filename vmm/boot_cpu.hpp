// The vCPU state before the guest's first instruction: CPUID, FPU and the
// LAPIC's LINT pins for every vCPU, and for the boot CPU the GDT, segment
// registers and entry registers its boot protocol (PVH or Linux 64-bit)
// expects. Set-up time only, on the thread that builds the Machine.
#pragma once

#include "vmm/cpuid.hpp"
#include "vmm/kvm.hpp"
#include "vmm/loader.hpp"

#include <vector>

namespace kguest {

class GuestMemory;

// The KVM PV features to offer (0x40000001 EAX, before the host's mask):
// kWantedPvFeatures, less PV_UNHALT without `pv_spinlocks`, less the
// hypercall-based ones on a host whose KVM is PVM.
std::uint32_t pv_features_to_offer(bool pv_spinlocks);

// CPUID from `supported` and `opt`, FPU reset values, LINT0 = ExtINT, LINT1 = NMI.
void setup_vcpu(Vcpu& vcpu, const std::vector<kvm_cpuid_entry2>& supported, const CpuidOptions& opt);
// The boot CPU's GDT (written at kBootGdtGpa), segments and registers.
void setup_boot_cpu(Vcpu& vcpu, GuestMemory& mem, const BootPlan& boot);

} // namespace kguest
