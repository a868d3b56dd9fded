// The ticket lock's slow paths and kick (see spinlock.hpp), and test=spinlock:
// every vCPU hammers one shared lock for a fixed time; we report acquisitions
// per second, fairness, and how often waiters halted and were kicked.
#include "spinlock.hpp"
#include "cpu.hpp"
#include "lib.hpp"
#include "tests.hpp"

constexpr u64 KVM_HC_KICK_CPU = 5;

// One per vCPU, indexed by APIC ID (found through this_cpu(), no MMIO).
struct alignas(64) Waiter {
    TicketLock* volatile lock;  // what this vCPU is about to halt on, or null
    volatile u32 ticket;
    u32 apic_id;
    u64 halts, kicks, acquisitions[2], bad;  // acquisitions of the native [0] and pv [1] lock
    u64 sink;  // the result of the outside work, so it is not optimised away
};
static Waiter waiters[kMaxCpus];
static bool amd;                // VMMCALL rather than VMCALL
static u64 spin_limit = 256;      // pause loops before halting (spin=N)
static unsigned nwaiters;       // CPUs that may wait: the scan bound for kicks

static Waiter& me() { return waiters[this_cpu().apic_id]; }

bool pv_spinlock_init() {
    Cpuid v = cpuid(0);
    amd = v.b == 0x68747541;  // "Auth"enticAMD
    // KVM would patch the other vendor's instruction too (unless userspace
    // disabled KVM_X86_QUIRK_FIX_HYPERCALL_INSN); using the right one avoids that.
    return (kvm_pv_features() & KVM_FEATURE_PV_UNHALT) != 0;
}

static long kvm_hypercall2(u64 nr, u64 a0, u64 a1) {
    long ret;
    if (amd) asm volatile("vmmcall" : "=a"(ret) : "a"(nr), "b"(a0), "c"(a1) : "memory");
    else asm volatile("vmcall" : "=a"(ret) : "a"(nr), "b"(a0), "c"(a1) : "memory");
    return ret;
}

void native_lock_wait(TicketLock& l, u32 ticket) {
    while (__atomic_load_n(&l.head, __ATOMIC_ACQUIRE) != ticket) cpu_relax();
}

void pv_lock_wait(TicketLock& l, u32 ticket) {
    Waiter& w = me();
    for (;;) {
        for (u64 i = 0; i < spin_limit; ++i) {
            if (__atomic_load_n(&l.head, __ATOMIC_ACQUIRE) == ticket) return;
            cpu_relax();
        }
        // Announce what we wait for, then (after the locked add's barrier) look
        // once more: an unlock before the announcement shows here, one after it
        // kicks us. A kick before the HLT is kept by KVM (pv_unhalted).
        bool irqs_on = irq_save();
        w.ticket = ticket;
        w.lock = &l;
        __atomic_add_fetch(&l.sleepers, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&l.head, __ATOMIC_ACQUIRE) != ticket) {
            // As Linux's kvm_wait(): STI;HLT with interrupts on, else a bare
            // HLT that only the kick (or an NMI) ends.
            ++w.halts;
            if (irqs_on) asm volatile("sti; hlt; cli" ::: "memory");
            else asm volatile("hlt" ::: "memory");
        }
        irq_restore(irqs_on);
        w.lock = nullptr;
        __atomic_sub_fetch(&l.sleepers, 1, __ATOMIC_RELAXED);
        if (__atomic_load_n(&l.head, __ATOMIC_ACQUIRE) == ticket) return;
    }
}

void pv_kick_waiter(TicketLock& l, u32 ticket) {
    for (unsigned i = 0; i < nwaiters; ++i) {
        Waiter& w = waiters[i];
        if (w.lock == &l && w.ticket == ticket) {
            ++me().kicks;
            kvm_hypercall2(KVM_HC_KICK_CPU, 0, w.apic_id);
            return;  // tickets are unique: one waiter at most
        }
    }
}

// test=spinlock: lock=native or lock=pv runs one flavour for spin_ms; lock=both
// alternates them in rounds of round_ms in one boot, so both see the same host
// conditions (the QEMU sandbox drifts ±10% between runs). Each flavour has its
// own lock and data, so a native unlock never meets a halted pv waiter.

struct alignas(64) Arena {
    TicketLock lock;
    alignas(64) volatile u64 enter, leave;  // equal whenever the lock is free
    volatile u64 data[16];
};
static Arena arenas[2];  // [0] native, [1] pv
enum class Mode { native, pv, both };
static Mode mode;
// Start, end and round length as TSC values: vCPUs share one TSC timeline
// under KVM, and rdtsc() costs no exit (kvmclock_ns() reads the APIC ID).
static u64 t_start_tsc, t_end_tsc, t_round_tsc;
static unsigned cs_work = 4, out_work = 200;  // multiply rounds: per data word inside, in all outside

// A few hundred cycles of dependent arithmetic the compiler cannot drop.
static inline u64 work(u64 x, unsigned n) {
    for (unsigned i = 0; i < n; ++i) x = x * 6364136223846793005ull + 1442695040888963407ull;
    return x;
}

template <bool Pv>
static u64 batch(Waiter& w, u64 x) {
    Arena& a = arenas[Pv];
    for (unsigned k = 0; k < 16; ++k) {
        ticket_lock<Pv>(a.lock);
        // Critical section: two holders at once, or a lost update, shows as
        // enter != leave on entry, or as a wrong total at the end.
        if (a.enter != a.leave) ++w.bad;
        a.enter = a.enter + 1;
        for (unsigned j = 0; j < 16; ++j) a.data[j] = work(a.data[j] + j, cs_work);
        a.leave = a.leave + 1;
        ticket_unlock<Pv>(a.lock);
        ++w.acquisitions[Pv];
        x = work(x, out_work);  // work outside the lock
    }
    return x;
}

static void spin_run_local(unsigned cpu) {
    Waiter& w = waiters[cpu];
    u64 x = cpu + 1;
    // Interrupts on while we spin, as in a kernel's process context.
    sti();
    while (rdtsc() < t_start_tsc) cpu_relax();
    for (u64 now; (now = rdtsc()) < t_end_tsc;) {
        bool pv = mode == Mode::pv || (mode == Mode::both && ((now - t_start_tsc) / t_round_tsc) % 2 == 1);
        x = pv ? batch<true>(w, x) : batch<false>(w, x);
    }
    w.sink = x;
    cli();
}

static bool report(bool pv, unsigned ncpus, u64 ms, u64 overrun_ms) {
    const Arena& a = arenas[pv];
    u64 total = 0, halts = 0, kicks = 0, bad = 0, mn = ~0ull, mx = 0;
    for (unsigned i = 0; i < ncpus; ++i) {
        const Waiter& w = waiters[i];
        u64 n = w.acquisitions[pv];
        total += n;
        bad += w.bad;
        if (pv) { halts += w.halts; kicks += w.kicks; }
        if (n < mn) mn = n;
        if (n > mx) mx = n;
    }
    // The counters are bumped inside the lock: they must equal the acquisitions.
    bool consistent = bad == 0 && a.enter == total && a.leave == total && a.lock.head == a.lock.tail &&
                      a.lock.sleepers == 0;
    print("RESULT spinlock lock=%s cpus=%u ms=%lu overrun_ms=%lu acquisitions=%lu per_sec=%lu min_cpu=%lu max_cpu=%lu "
          "halts=%lu kicks=%lu bad=%lu consistent=%d\n",
          pv ? "pv" : "native", ncpus, ms, overrun_ms, total, total * 1000 / ms, mn, mx, halts, kicks, bad,
          consistent ? 1 : 0);
    return consistent && mn > 0;
}

bool test_spinlock(const char* cmdline, unsigned ncpus) {
    char buf[24];
    bool ok;
    u64 ms = 2000, round_ms = 100;
    if (cmdline_get(cmdline, "spin_ms", buf, sizeof buf)) { u64 v = parse_u64(buf, &ok); if (ok && v >= 10) ms = v; }
    if (cmdline_get(cmdline, "round_ms", buf, sizeof buf)) { u64 v = parse_u64(buf, &ok); if (ok && v >= 10) round_ms = v; }
    if (cmdline_get(cmdline, "spin", buf, sizeof buf)) { u64 v = parse_u64(buf, &ok); if (ok && v >= 1) spin_limit = v; }
    if (cmdline_get(cmdline, "cs_work", buf, sizeof buf)) { u64 v = parse_u64(buf, &ok); if (ok && v <= 1000) cs_work = unsigned(v); }
    if (cmdline_get(cmdline, "out_work", buf, sizeof buf)) { u64 v = parse_u64(buf, &ok); if (ok && v <= 100000) out_work = unsigned(v); }
    mode = Mode::pv;
    if (cmdline_get(cmdline, "lock", buf, sizeof buf)) {
        if (str_eq(buf, "native", 7)) mode = Mode::native;
        else if (str_eq(buf, "both", 5)) mode = Mode::both;
        else if (!str_eq(buf, "pv", 3)) { print("spinlock: lock=%s: need native, pv or both\n", buf); return false; }
    }
    if (mode != Mode::native && !pv_spinlock_init()) {
        print("spinlock: no KVM_FEATURE_PV_UNHALT: using the native lock only\n");
        mode = Mode::native;
    }
    if (mode == Mode::both) ms = (ms / round_ms + 1) / 2 * 2 * round_ms;  // whole rounds, as many of each
    nwaiters = ncpus;
    for (unsigned i = 0; i < ncpus; ++i) {
        waiters[i] = Waiter{};
        waiters[i].apic_id = i;  // kguest and QEMU number APIC IDs 0..n-1 (test_smp checks)
    }
    u64 hz = tsc_hz();
    t_start_tsc = rdtsc() + hz / 50;  // 20 ms for the APs to get going
    t_end_tsc = t_start_tsc + hz / 1000 * ms;
    t_round_tsc = hz / 1000 * round_ms;
    print("spinlock: %s ticket lock, %u CPU(s), %lu ms, spin limit %lu\n",
          mode == Mode::both ? "native and pv" : mode == Mode::pv ? "pv" : "native", ncpus, ms, spin_limit);
    smp_run_on_aps(spin_run_local);
    spin_run_local(0);
    smp_wait_aps_idle();
    // Each CPU stops at the first batch boundary past the end: the overrun
    // shows how long a straggler (a preempted ticket holder) took.
    u64 end_tsc = rdtsc();
    u64 overrun_ms = end_tsc > t_end_tsc ? (end_tsc - t_end_tsc) / (hz / 1000) : 0;
    bool good = true;
    if (mode != Mode::pv) good &= report(false, ncpus, mode == Mode::both ? ms / 2 : ms, overrun_ms);
    if (mode != Mode::native) good &= report(true, ncpus, mode == Mode::both ? ms / 2 : ms, overrun_ms);
    return good;
}
