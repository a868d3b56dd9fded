// The guest's CPU plumbing: interrupts (IDT, exception dump), the local APIC,
// kvmclock, per-CPU data, 4 KiB page tables on request, and SMP bring-up
// with INIT-SIPI-SIPI.
#pragma once

#include "arch.hpp"

constexpr unsigned kMaxCpus = 256;
constexpr u8 kTimerVector = 0x40;
constexpr u8 kWakeVector = 0x41;
constexpr u8 kSpuriousVector = 0xff;

// What isr_common pushes (entry.S), lowest address first.
struct Frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;
};

using IrqHandler = void (*)(Frame*);
void idt_init();   // BSP: build the shared IDT
void idt_load();   // every CPU
void set_irq_handler(u8 vector, IrqHandler h);

// Local APIC (xAPIC MMIO at 0xfee00000).
constexpr u64 kLapicBase = 0xfee00000;
enum : u32 { LAPIC_ID = 0x20, LAPIC_EOI = 0xb0, LAPIC_SVR = 0xf0, LAPIC_ICR_LO = 0x300, LAPIC_ICR_HI = 0x310,
             LAPIC_LVTT = 0x320, LAPIC_TMICT = 0x380, LAPIC_TMCCT = 0x390, LAPIC_TDCR = 0x3e0 };
inline u32 lapic_read(u32 reg) { return mmio_read<u32>(kLapicBase + reg); }
inline void lapic_write(u32 reg, u32 v) { mmio_write<u32>(kLapicBase + reg, v); }
inline unsigned apic_id() { return lapic_read(LAPIC_ID) >> 24; }
void lapic_enable();
constexpr u32 MSR_IA32_TSC_DEADLINE = 0x6e0;  // the LAPIC timer's TSC-deadline mode (SDM 10.5.4.1)
void pic_disable();  // remap the legacy 8259s out of the exception range and mask them

// The KVM PV feature bits (CPUID 0x40000001 EAX), 0 without a KVM signature
// (Documentation/virt/kvm/x86/cpuid.rst).
u32 kvm_pv_features();
enum : u32 { KVM_FEATURE_CLOCKSOURCE = 1u << 0, KVM_FEATURE_CLOCKSOURCE2 = 1u << 3, KVM_FEATURE_PV_EOI = 1u << 6,
             KVM_FEATURE_PV_UNHALT = 1u << 7 };
// kvmclock (Documentation/virt/kvm/x86/msr.rst): per-CPU pvclock area.
bool kvmclock_init();  // this CPU; false when the hypervisor offers none
u64 kvmclock_ns();     // this CPU's clock
u64 kvmclock_ns_at(u64 tsc);  // this CPU's clock at a TSC reading taken earlier
u64 tsc_hz();          // from the pvclock scale factors
void delay_us(u64 us);

struct PerCpu {
    PerCpu* self;              // GS:0 points here (see this_cpu())
    unsigned apic_id;
    volatile u32 online;
    volatile u32 work_seen;    // the last ap_work_gen this AP took up (APs only)
    alignas(4) volatile u32 pv_eoi;  // KVM PV EOI flag word (MSR_KVM_PV_EOI_EN)
    u64 eoi_writes, pv_eois;         // EOIs done by an APIC write (an exit) and by PV EOI
    // Timer test state and results.
    volatile u64 ticks, spurious;
    u64 target_ticks;
    u64 period_tsc;
    u64 next_deadline;
    u64 start_ns, last_tick_ns;
    u32 nsamples;
    u32 lat_ns[1024];
};
extern PerCpu percpu[kMaxCpus];
// This CPU's PerCpu through GS, which percpu_init() points at it: reading the
// APIC ID instead would be an MMIO access, i.e. a VM exit, on every call.
inline PerCpu& this_cpu() {
    PerCpu* p;
    asm volatile("mov %%gs:0, %0" : "=r"(p));
    return *p;
}
// Per-CPU setup once the CPU's LAPIC is on: GS, and PV EOI when offered.
void percpu_init();
extern bool g_use_pv_eoi;  // pv_eoi=off on the command line clears it
// End of interrupt. With PV EOI, KVM sets bit 0 of pv_eoi when it injects an
// interrupt whose EOI it can infer; clearing the bit replaces the EOI write
// and its exit (Documentation/virt/kvm/x86/msr.rst, MSR_KVM_PV_EOI_EN). Test
// and clear must be one instruction (BTR): KVM takes the bit back on any exit
// while it is set, and with a separate load and store an exit between them
// let the guest skip an EOI KVM no longer did, leaving the vector in service
// for good (seen in the nested sandbox: a halted vCPU with 0x51 in ISR, PPR
// 0x50, its MSI and timer pending in IRR). Only this CPU and KVM touch the
// word: no LOCK.
inline void lapic_eoi() {
    PerCpu& c = this_cpu();
    bool was_set;
    asm volatile("btrl $0, %0" : "+m"(c.pv_eoi), "=@ccc"(was_set) :: "memory");
    if (was_set) {
        ++c.pv_eois;
        return;
    }
    ++c.eoi_writes;
    lapic_write(LAPIC_EOI, 0);
}

// SMP: start every AP (APIC IDs 1..n-1); each runs `ap_work` once online.
unsigned cpu_count(const char* cmdline);
unsigned smp_boot(unsigned ncpus);
using ApWork = void (*)(unsigned cpu);
void smp_run_on_aps(ApWork work);  // returns at once; APs run it in parallel
void smp_wait_aps_idle();

// Remaps the first GiB with 4 KiB pages (pages=4k on the command line).
void paging_use_4k();
