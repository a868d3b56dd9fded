// The guest CPUID table (see cpuid.hpp).
#include "vmm/cpuid.hpp"

namespace kguest {

namespace {

kvm_cpuid_entry2* find(std::vector<kvm_cpuid_entry2>& t, std::uint32_t fn, std::uint32_t idx = 0) {
    for (auto& e : t)
        if (e.function == fn && (!(e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) || e.index == idx)) return &e;
    return nullptr;
}

unsigned bits_for(unsigned n) {  // ceil(log2(n)), 0 for n <= 1
    unsigned b = 0;
    while ((1u << b) < n) ++b;
    return b;
}

} // namespace

std::vector<kvm_cpuid_entry2> make_guest_cpuid(const std::vector<kvm_cpuid_entry2>& supported,
                                               const CpuidOptions& opt) {
    std::vector<kvm_cpuid_entry2> t = supported;
    const std::uint32_t apic_id = opt.vcpu_id;  // APIC IDs are the vCPU ids, 0..cpus-1

    if (auto* e = find(t, 1)) {
        e->ebx = (e->ebx & 0x0000ffff) | ((opt.cpus & 0xff) << 16) | (apic_id << 24);
        e->ecx |= 1u << 31;  // hypervisor present
        if (opt.tsc_deadline) e->ecx |= 1u << 24;
        if (opt.cpus > 1) e->edx |= 1u << 28;  // HTT: EBX[23:16] is valid
    }
    // Leaf 4: cores per package - 1 in EAX[31:26], one thread per cache.
    for (auto& e : t)
        if (e.function == 4) e.eax = (e.eax & 0x03ffffff) | (((opt.cpus - 1) & 0x3f) << 26);
    // Leaves 0xB and 0x1F: x2APIC topology. Level 0 = SMT (1 thread), level 1 = core.
    for (std::uint32_t leaf : {0xbu, 0x1fu}) {
        for (auto& e : t) {
            if (e.function != leaf) continue;
            e.edx = apic_id;
            switch (e.index) {
            case 0: e.eax = 0; e.ebx = 1; e.ecx = (1u << 8) | 0; break;
            case 1: e.eax = bits_for(opt.cpus); e.ebx = opt.cpus; e.ecx = (2u << 8) | 1; break;
            default: e.eax = 0; e.ebx = 0; e.ecx = e.index; break;
            }
        }
    }

    // The KVM leaves. KVM's own answer carries the host-supported PV features;
    // we keep the signature, state our maximum leaf and offer the intersection.
    std::uint32_t host_pv = 0;
    if (auto* f = find(t, KVM_CPUID_FEATURES)) host_pv = f->eax;
    std::erase_if(t, [](const kvm_cpuid_entry2& e) { return e.function == KVM_CPUID_SIGNATURE || e.function == KVM_CPUID_FEATURES; });
    kvm_cpuid_entry2 sig{};
    sig.function = KVM_CPUID_SIGNATURE;
    sig.eax = KVM_CPUID_FEATURES;
    sig.ebx = 0x4b4d564b;  // "KVMK"
    sig.ecx = 0x564b4d56;  // "VMKV"
    sig.edx = 0x0000004d;  // "M\0\0\0"
    t.push_back(sig);
    kvm_cpuid_entry2 feat{};
    feat.function = KVM_CPUID_FEATURES;
    feat.eax = host_pv & opt.pv_features;
    feat.edx = 0;  // no KVM_HINTS_REALTIME: vCPUs are not pinned and may be overcommitted
    t.push_back(feat);
    return t;
}

} // namespace kguest
