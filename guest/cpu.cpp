// CPU plumbing for the small guest (see cpu.hpp).
#include "cpu.hpp"
#include "lib.hpp"

struct IdtEntry {
    u16 off_lo, sel;
    u8 ist, type;
    u16 off_mid;
    u32 off_hi, zero;
};
static_assert(sizeof(IdtEntry) == 16);
alignas(16) static IdtEntry idt[256];
static IrqHandler handlers[256];
extern "C" const u64 isr_table[256];

void idt_init() {
    for (unsigned v = 0; v < 256; ++v) {
        u64 a = isr_table[v];
        idt[v] = {u16(a), 0x08, 0, 0x8e, u16(a >> 16), u32(a >> 32), 0};  // present, DPL0, interrupt gate
    }
}

void idt_load() {
    struct __attribute__((packed)) { u16 limit; u64 base; } p = {sizeof idt - 1, u64(idt)};
    asm volatile("lidt %0" ::"m"(p));
}

void set_irq_handler(u8 vector, IrqHandler h) { handlers[vector] = h; }

static const char* const kExceptionNames[32] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow", "#BR bound range",
    "#UD invalid opcode", "#NM device not available", "#DF double fault", "coprocessor overrun",
    "#TS invalid TSS", "#NP segment not present", "#SS stack fault", "#GP general protection",
    "#PF page fault", "reserved", "#MF x87 error", "#AC alignment check", "#MC machine check",
    "#XM SIMD error", "#VE virtualization", "#CP control protection"};

extern "C" void interrupt_dispatch(Frame* f) {
    if (f->vector < 32) {
        u64 cr2;
        asm volatile("mov %%cr2, %0" : "=r"(cr2));
        const char* name = f->vector < 22 ? kExceptionNames[f->vector] : "reserved";
        print("EXCEPTION %s (vector %lu) on APIC %u, error %#lx\n", name, f->vector, apic_id(), f->error);
        print("  rip %016lx cs %lx rflags %lx rsp %016lx ss %lx cr2 %016lx\n", f->rip, f->cs, f->rflags, f->rsp,
              f->ss, cr2);
        print("  rax %016lx rbx %016lx rcx %016lx rdx %016lx\n", f->rax, f->rbx, f->rcx, f->rdx);
        print("  rsi %016lx rdi %016lx rbp %016lx r8  %016lx\n", f->rsi, f->rdi, f->rbp, f->r8);
        print("  r9  %016lx r10 %016lx r11 %016lx r12 %016lx\n", f->r9, f->r10, f->r11, f->r12);
        print("  r13 %016lx r14 %016lx r15 %016lx\n", f->r13, f->r14, f->r15);
        guest_exit(4);
    }
    if (handlers[f->vector]) {
        handlers[f->vector](f);
        return;
    }
    if (f->vector != kSpuriousVector) lapic_eoi();
}

void pic_disable() {
    // SeaBIOS leaves the 8259s delivering IRQ0 as vector 8 (a double fault):
    // remap them to 0x20-0x2f and mask every line; we use only the LAPIC.
    outb(0x20, 0x11); outb(0xa0, 0x11);  // ICW1: init, ICW4 follows
    outb(0x21, 0x20); outb(0xa1, 0x28);  // ICW2: vector bases
    outb(0x21, 0x04); outb(0xa1, 0x02);  // ICW3: cascade on IRQ2
    outb(0x21, 0x01); outb(0xa1, 0x01);  // ICW4: 8086 mode
    outb(0x21, 0xff); outb(0xa1, 0xff);  // OCW1: mask all
}

void lapic_enable() {
    lapic_write(LAPIC_SVR, 0x100 | kSpuriousVector);  // APIC software enable
    lapic_write(LAPIC_LVTT, 1u << 16);                 // timer masked until a test arms it
}

struct PvclockTimeInfo {
    u32 version, pad0;
    u64 tsc_timestamp, system_time;
    u32 tsc_to_system_mul;
    signed char tsc_shift;
    u8 flags, pad[2];
};
static_assert(sizeof(PvclockTimeInfo) == 32);
alignas(64) static volatile PvclockTimeInfo pvclock[kMaxCpus];

constexpr u32 MSR_KVM_SYSTEM_TIME = 0x12;
constexpr u32 MSR_KVM_SYSTEM_TIME_NEW = 0x4b564d01;

constexpr u32 MSR_GS_BASE = 0xc0000101;
constexpr u32 MSR_KVM_PV_EOI_EN = 0x4b564d04;

u32 kvm_pv_features() {
    Cpuid sig = cpuid(0x40000000);
    if (sig.b != 0x4b4d564b || sig.c != 0x564b4d56 || sig.d != 0x4d) return 0;  // "KVMKVMKVM"
    return cpuid(0x40000001).a;
}

bool g_use_pv_eoi = true;

void percpu_init() {
    unsigned id = apic_id();
    PerCpu& c = percpu[id];
    c.self = &c;
    c.apic_id = id;
    wrmsr(MSR_GS_BASE, u64(&c));
    c.pv_eoi = 0;  // must be zero when enabled
    if (g_use_pv_eoi && (kvm_pv_features() & KVM_FEATURE_PV_EOI))
        wrmsr(MSR_KVM_PV_EOI_EN, u64(&c.pv_eoi) | 1);
}

bool kvmclock_init() {
    u32 features = kvm_pv_features();
    u64 gpa = u64(&pvclock[this_cpu().apic_id]) | 1;  // bit 0: enable
    if (features & KVM_FEATURE_CLOCKSOURCE2) wrmsr(MSR_KVM_SYSTEM_TIME_NEW, gpa);
    else if (features & KVM_FEATURE_CLOCKSOURCE) wrmsr(MSR_KVM_SYSTEM_TIME, gpa);
    else return false;
    return true;
}

// kvmclock at a given TSC reading: converting one TSC reading keeps a pair of
// timestamps consistent even when the host preempts the vCPU between them.
u64 kvmclock_ns_at(u64 tsc) {
    volatile PvclockTimeInfo& p = pvclock[this_cpu().apic_id];
    for (;;) {
        u32 v = p.version;
        barrier();
        if (v & 1) continue;  // the host is updating it
        u64 tsc_ts = p.tsc_timestamp, sys = p.system_time;
        u32 mul = p.tsc_to_system_mul;
        signed char shift = p.tsc_shift;
        barrier();
        if (p.version != v) continue;
        // The TSC may predate tsc_timestamp (parameters refreshed since): scale either way.
        bool before = tsc < tsc_ts;
        u64 delta = before ? tsc_ts - tsc : tsc - tsc_ts;
        if (shift < 0) delta >>= -shift; else delta <<= shift;
        u64 ns = u64((unsigned __int128)delta * mul >> 32);
        return before ? sys - ns : sys + ns;
    }
}

u64 kvmclock_ns() { return kvmclock_ns_at(rdtsc()); }

u64 tsc_hz() {
    volatile PvclockTimeInfo& p = pvclock[this_cpu().apic_id];
    // ns = (tsc << shift) * mul / 2^32  =>  tsc per second = 1e9 * 2^32 / mul / 2^shift
    u64 hz = (1000000000ull << 32) / p.tsc_to_system_mul;
    return p.tsc_shift >= 0 ? hz >> p.tsc_shift : hz << -p.tsc_shift;
}

void delay_us(u64 us) {
    u64 end = kvmclock_ns() + us * 1000;
    while (kvmclock_ns() < end) cpu_relax();
}

PerCpu percpu[kMaxCpus];
extern "C" char ap_trampoline[], ap_trampoline_end[];
extern "C" volatile u64 ap_stack_top;
constexpr u64 kApTrampoline = 0x8000;
constexpr usize kApStackSize = 8192;
alignas(16) static u8 ap_stacks[kMaxCpus][kApStackSize];
static volatile ApWork ap_work;
static volatile u32 ap_work_gen, ap_busy;

unsigned cpu_count(const char* cmdline) {
    char buf[16];
    bool ok = false;
    if (cmdline_get(cmdline, "cpus", buf, sizeof buf)) {
        u64 n = parse_u64(buf, &ok);
        if (ok && n >= 1 && n <= kMaxCpus) return unsigned(n);
    }
    // CPUID 0xB level 1 (core): logical processors in the package.
    if (cpuid(0).a >= 0xb) {
        Cpuid c = cpuid(0xb, 1);
        if (((c.c >> 8) & 0xff) == 2 && (c.b & 0xffff) != 0) return c.b & 0xffff;
    }
    Cpuid l1 = cpuid(1);
    return (l1.d & (1u << 28)) ? ((l1.b >> 16) & 0xff) : 1;
}

static void send_ipi(unsigned dest, u32 icr_lo) {
    lapic_write(LAPIC_ICR_HI, dest << 24);
    lapic_write(LAPIC_ICR_LO, icr_lo);
    for (int i = 0; i < 100000 && (lapic_read(LAPIC_ICR_LO) & (1u << 12)); ++i) cpu_relax();  // delivery status
}

extern "C" void ap_main() {
    idt_load();
    lapic_enable();
    percpu_init();
    kvmclock_init();
    PerCpu& me = this_cpu();
    __atomic_store_n(&me.online, 1, __ATOMIC_RELEASE);
    u32 seen = 0;
    for (;;) {
        // Sleep until the BSP posts work (it sends kWakeVector); the IPI only wakes us.
        cli();
        while (__atomic_load_n(&ap_work_gen, __ATOMIC_ACQUIRE) == seen) { sti_hlt(); cli(); }
        seen = ap_work_gen;
        __atomic_store_n(&me.work_seen, seen, __ATOMIC_RELEASE);
        ApWork w = ap_work;
        w(me.apic_id);
        if (__atomic_sub_fetch(&ap_busy, 1, __ATOMIC_ACQ_REL) == 0) send_ipi(0, kWakeVector);  // the last one wakes the BSP
    }
}

unsigned smp_boot(unsigned ncpus) {
    set_irq_handler(kWakeVector, [](Frame*) { lapic_eoi(); });
    memcpy(reinterpret_cast<void*>(kApTrampoline), ap_trampoline, usize(ap_trampoline_end - ap_trampoline));
    unsigned online = 1;
    for (unsigned id = 1; id < ncpus; ++id) {
        ap_stack_top = u64(ap_stacks[id] + kApStackSize);
        send_ipi(id, 0x4500);  // INIT, assert
        delay_us(100);
        for (int i = 0; i < 2; ++i) {  // STARTUP twice, per the MP spec
            send_ipi(id, 0x4600 | u32(kApTrampoline >> 12));
            delay_us(10);
            if (percpu[id].online) break;
        }
        u64 deadline = kvmclock_ns() + 2000000000ull;  // 2 s: generous for emulated hosts
        while (!__atomic_load_n(&percpu[id].online, __ATOMIC_ACQUIRE) && kvmclock_ns() < deadline) cpu_relax();
        if (!percpu[id].online) { print("smp: APIC %u did not come up\n", id); break; }
        while (ap_stack_top != 0) cpu_relax();  // it has its stack: the next one may use the slot
        ++online;
    }
    return online;
}

void smp_run_on_aps(ApWork work) {
    unsigned n = 0;
    for (unsigned i = 1; i < kMaxCpus; ++i) n += percpu[i].online;
    ap_busy = n;
    ap_work = work;
    __atomic_fetch_add(&ap_work_gen, 1, __ATOMIC_RELEASE);
    for (unsigned i = 1; i < kMaxCpus; ++i)
        if (percpu[i].online) send_ipi(i, kWakeVector);  // fixed delivery, physical destination
}

void smp_wait_aps_idle() {
    // Halt rather than spin (overcommitted APs need the host CPU); the last AP
    // to finish sends kWakeVector. Each halt is bounded (LAPIC timer, 10 ms),
    // so a lost wake-up costs a check, not the VM: each second an AP that has
    // not taken up the work gets its IPI again, with a console line; after
    // 30 s every AP gets one each second, ending halts whose interrupt went
    // missing. (Seen once in CI: a 64-vCPU boot in the nested sandbox that
    // never ended, which wait hung unknown.)
    bool irqs_on = irq_save();
    const bool deadline = (cpuid(1).c & (1u << 24)) != 0;
    const u32 saved_lvtt = lapic_read(LAPIC_LVTT), saved_tdcr = lapic_read(LAPIC_TDCR);
    if (deadline) {
        lapic_write(LAPIC_LVTT, (2u << 17) | kWakeVector);
    } else {
        lapic_write(LAPIC_TDCR, 0xb);  // divide by 1: 10^7 counts is ~10 ms at KVM's 1 GHz APIC bus
        lapic_write(LAPIC_LVTT, kWakeVector);
    }
    const u32 gen = __atomic_load_n(&ap_work_gen, __ATOMIC_ACQUIRE);
    const u64 start = kvmclock_ns();
    u64 next_check = start + 1000000000ull;
    bool named = false;
    while (__atomic_load_n(&ap_busy, __ATOMIC_ACQUIRE) != 0) {
        if (deadline) wrmsr(MSR_IA32_TSC_DEADLINE, rdtsc() + tsc_hz() / 100);
        else lapic_write(LAPIC_TMICT, 10000000);
        sti_hlt();
        cli();
        const u64 now = kvmclock_ns();
        if (now < next_check) continue;
        next_check = now + 1000000000ull;
        const bool late = now - start > 30000000000ull;
        if (late && !named) {
            named = true;
            print("smp: still waiting after 30 s; %u AP(s) busy: waking them each second\n",
                  __atomic_load_n(&ap_busy, __ATOMIC_ACQUIRE));
        }
        for (unsigned i = 1; i < kMaxCpus; ++i) {
            if (!percpu[i].online) continue;
            if (__atomic_load_n(&percpu[i].work_seen, __ATOMIC_ACQUIRE) != gen) {
                print("smp: APIC %u has not woken for its work after %lu ms: sending the wake IPI again\n", i,
                      (now - start) / 1000000);
                send_ipi(i, kWakeVector);
            } else if (late) {
                send_ipi(i, kWakeVector);  // ends a halt whose own interrupt went missing; its loop re-checks
            }
        }
    }
    if (deadline) wrmsr(MSR_IA32_TSC_DEADLINE, 0);
    else lapic_write(LAPIC_TMICT, 0);
    lapic_write(LAPIC_LVTT, saved_lvtt);
    lapic_write(LAPIC_TDCR, saved_tdcr);
    irq_restore(irqs_on);
}

extern "C" u64 boot_pml4[512];
alignas(4096) static u64 pt_4k[512 * 512];  // 512 page tables: the first GiB
alignas(4096) static u64 pd_4k[512];

void paging_use_4k() {
    for (u64 i = 0; i < 512 * 512; ++i) pt_4k[i] = (i << 12) | 0x3;
    for (u64 i = 0; i < 512; ++i) pd_4k[i] = u64(&pt_4k[i * 512]) | 0x3;
    // PML4[0] -> PDPT; point PDPT[0] at the new directory.
    u64* pdpt = reinterpret_cast<u64*>(boot_pml4[0] & ~0xfffull);
    pdpt[0] = u64(pd_4k) | 0x3;
    u64 cr3;
    asm volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) :: "memory");  // flush the TLB
}
