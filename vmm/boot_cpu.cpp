// Boot vCPU state (see boot_cpu.hpp).
#include "vmm/boot_cpu.hpp"
#include "devices/base/guest_memory.hpp"
#include "devices/base/log.hpp"

#include <cstring>
#include <filesystem>

namespace kguest {

std::uint32_t pv_features_to_offer(bool pv_spinlocks) {
    std::uint32_t features = kWantedPvFeatures;
    if (!pv_spinlocks) features &= ~(1u << KVM_FEATURE_PV_UNHALT);
    // Hack: PVM, the software-only KVM some CI hosts run (kvm_pvm.ko), lists
    // the hypercall-based PV features, but a guest's VMCALL/VMMCALL never
    // completes there (seen: the vCPU hangs in KVM_HC_KICK_CPU). Offer them
    // only where the standard hypercall instruction works.
    if (std::filesystem::exists("/sys/module/kvm_pvm") && (features & kHypercallPvFeatures)) {
        log_msg("host KVM is PVM: hiding PV_UNHALT, PV_SEND_IPI and PV_SCHED_YIELD (its hypercalls hang the guest)");
        features &= ~kHypercallPvFeatures;
    }
    return features;
}

void setup_vcpu(Vcpu& vcpu, const std::vector<kvm_cpuid_entry2>& supported, const CpuidOptions& opt) {
    vcpu.set_cpuid(make_guest_cpuid(supported, opt));

    kvm_fpu fpu{};
    fpu.fcw = 0x37f;     // x87 reset value
    fpu.mxcsr = 0x1f80;  // SSE reset value: all exceptions masked
    vcpu.set_fpu(fpu);

    // LINT0 = ExtINT (the 8259 PIC's output), LINT1 = NMI, as on a PC.
    kvm_lapic_state lapic = vcpu.get_lapic();
    auto set_lvt = [&](std::size_t reg, std::uint32_t mode) {
        std::uint32_t v;
        std::memcpy(&v, lapic.regs + reg, 4);
        v = (v & ~0x700u) | (mode << 8);
        std::memcpy(lapic.regs + reg, &v, 4);
    };
    set_lvt(0x350, 7);  // APIC_LVT0, delivery mode ExtINT
    set_lvt(0x360, 4);  // APIC_LVT1, delivery mode NMI
    vcpu.set_lapic(lapic);
}

void setup_boot_cpu(Vcpu& vcpu, GuestMemory& mem, const BootPlan& boot) {
    // One GDT for both protocols: PVH uses 0x08/0x10 (flat 32-bit code and
    // data), Linux's 64-bit entry __BOOT_CS 0x10 / __BOOT_DS 0x18 (boot.rst).
    // In guest memory too, so selectors mean something until the kernel's GDT.
    const bool lm = boot.mode == BootPlan::Mode::linux64;
    const std::uint64_t gdt[5] = {
        0,
        0x00cf9b000000ffff,                                // 0x08: code, 32-bit, 4 GiB
        lm ? 0x00af9b000000ffffull : 0x00cf93000000ffffull,  // 0x10: code, 64-bit (linux64) / data (PVH)
        0x00cf93000000ffff,                                // 0x18: data, 4 GiB
        0x00008b0000000067,                                // 0x20: 32-bit TSS (busy)
    };
    mem.write(Gpa(kBootGdtGpa), gdt, sizeof gdt);

    kvm_sregs s = vcpu.get_sregs();
    auto seg = [](std::uint16_t sel, std::uint8_t type, bool code_or_data) {
        return kvm_segment{.base = 0, .limit = 0xffffffff, .selector = sel, .type = type, .present = 1,
                           .dpl = 0, .db = 1, .s = code_or_data, .l = 0, .g = 1, .avl = 0, .unusable = 0,
                           .padding = 0};
    };
    s.tr = seg(0x20, 0xb, false);
    s.tr.limit = 0x67;
    s.tr.g = 0;
    s.tr.db = 0;
    s.gdt.base = kBootGdtGpa;
    s.gdt.limit = sizeof gdt - 1;
    s.idt.base = 0;
    s.idt.limit = 0;
    kvm_regs r{};
    r.rip = boot.entry;
    r.rflags = 0x2;  // interrupts off
    if (lm) {
        // Linux 64-bit boot protocol: long mode with the identity tables at
        // kPml4Gpa, CS = __BOOT_CS (L=1), DS/ES/SS = __BOOT_DS, %rsi = boot_params.
        s.cs = seg(0x10, 0xb, true);
        s.cs.l = 1;
        s.cs.db = 0;
        s.ds = s.es = s.fs = s.gs = s.ss = seg(0x18, 0x3, true);
        s.cr0 = 0x80000031;  // PG | NE | ET | PE
        s.cr3 = kPml4Gpa;
        s.cr4 = 0x20;        // PAE
        s.efer = 0x500;      // LMA | LME
        r.rsi = boot.arg;
    } else {
        // PVH boot ABI: 32-bit protected mode, flat CS and DS/ES/SS, a 32-bit
        // TSS in TR, paging off, CR4=0, %ebx = start_info.
        s.cs = seg(0x08, 0xb, true);
        s.ds = s.es = s.fs = s.gs = s.ss = seg(0x10, 0x3, true);
        s.cr0 = 0x11;  // PE | ET
        s.cr3 = 0;
        s.cr4 = 0;
        s.efer = 0;
        r.rbx = boot.arg;
    }
    vcpu.set_sregs(s);
    vcpu.set_regs(r);
}

} // namespace kguest
