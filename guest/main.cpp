// The small guest's main program. It reads the PVH start info, sets up
// interrupts, the local APIC and kvmclock, brings up the other vCPUs, runs the
// tests named by test=... and ends the VM through the exit port: 0 when every
// test passed, 1 when one failed, 3 on a panic, 4 on an unexpected exception.
#include "cpu.hpp"
#include "lib.hpp"
#include "net.hpp"
#include "tests.hpp"

// struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h).
struct HvmStartInfo {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;  // memmap: version >= 1
    u32 memmap_entries, reserved;
};
struct HvmMemmapEntry { u64 addr, size; u32 type, reserved; };
constexpr u32 kHvmStartMagic = 0x336ec578;

static char cmdline[4096];

extern "C" void kmain(u32 start_info_paddr) {
    serial_init();
    auto* si = reinterpret_cast<const HvmStartInfo*>(u64(start_info_paddr));
    if (si->magic != kHvmStartMagic) panic("bad hvm_start_info magic %x", si->magic);
    // Copy the command line first: low memory is ours to reuse (AP trampoline).
    if (si->cmdline_paddr) {
        const char* src = reinterpret_cast<const char*>(si->cmdline_paddr);
        usize n = 0;
        while (n + 1 < sizeof cmdline && src[n]) { cmdline[n] = src[n]; ++n; }
        cmdline[n] = 0;
    }
    if (si->version >= 1)
        for (u32 i = 0; i < si->memmap_entries; ++i) {
            auto* e = reinterpret_cast<const HvmMemmapEntry*>(si->memmap_paddr) + i;
            if (e->type == 1) ram_add(e->addr, e->size);
        }

    pic_disable();
    idt_init();
    idt_load();
    lapic_enable();
    char opt[64];
    g_use_pv_eoi = !(cmdline_get(cmdline, "pv_eoi", opt, sizeof opt) && str_eq(opt, "off", 4));
    percpu_init();
    if (!kvmclock_init()) panic("no kvmclock (KVM_FEATURE_CLOCKSOURCE/CLOCKSOURCE2)");
    bool small_pages = cmdline_get(cmdline, "pages", opt, sizeof opt) && str_eq(opt, "4k", 3);
    if (small_pages) paging_use_4k();
    Cpuid pv = cpuid(0x40000001);
    print("kguest-guest: cmdline \"%s\", %lu MiB RAM, %s pages, PV features %#x\n", cmdline, g_ram_total >> 20,
          small_pages ? "4 KiB" : "2 MiB", pv.a);

    char tests[256] = "all";
    cmdline_get(cmdline, "test", tests, sizeof tests);
    bool all = list_has(tests, "all");
    unsigned ncpus = cpu_count(cmdline);
    unsigned online = 1;
    bool want_smp = all || list_has(tests, "smp") || list_has(tests, "timer") || list_has(tests, "spinlock");
    if (want_smp && ncpus > 1) online = smp_boot(ncpus);
    print("RESULT boot ram_mib=%lu cpus=%u online=%u tsc_khz=%lu\n", g_ram_total >> 20, ncpus, online, tsc_hz() / 1000);

    bool ok = true;
    bool ran = false;
    if (all || list_has(tests, "smp")) { ok &= test_smp(ncpus, online); ran = true; }
    if (all || list_has(tests, "port80")) { ok &= test_port80(cmdline); ran = true; }
    if (all || list_has(tests, "timer")) { ok &= test_timer(cmdline, online); ran = true; }
    if (list_has(tests, "hostile")) { ok &= test_hostile(cmdline); ran = true; }
    if (list_has(tests, "pci")) { ok &= test_pci(); ran = true; }
    if (list_has(tests, "idle")) { ok &= test_idle(cmdline); ran = true; }
    if (list_has(tests, "spinlock")) { ok &= test_spinlock(cmdline, online); ran = true; }
    if (list_has(tests, "net-echo")) { ok &= test_net_echo(cmdline); ran = true; }
    if (list_has(tests, "net-ping")) { ok &= test_net_ping(cmdline); ran = true; }
    if (list_has(tests, "net-bench")) { ok &= test_net_bench(cmdline); ran = true; }
    if (list_has(tests, "tlb")) { ok &= test_tlb(cmdline); ran = true; }
    if (list_has(tests, "balloon")) { ok &= test_balloon(cmdline); ran = true; }
    if (list_has(tests, "mem")) { ok &= test_mem(cmdline); ran = true; }
    if (list_has(tests, "blk")) { ok &= test_blk(cmdline); ran = true; }
    if (list_has(tests, "blk-bench")) { ok &= test_blk_bench(cmdline); ran = true; }
    if (list_has(tests, "blk-log")) { ok &= test_blk_log(cmdline); ran = true; }
    if (list_has(tests, "rng")) { ok &= test_rng(cmdline); ran = true; }
    net_shutdown();  // stop the NIC's DMA before the VM ends (no-op when unused)
    if (list_has(tests, "none")) ran = true;
    if (list_has(tests, "exception")) {
        // An exception with a working IDT: the handler dumps registers and exits with 4.
        asm volatile("ud2");
    }
    if (list_has(tests, "triplefault")) {
        // A stack pointer into unmapped space: #BP faults (#PF), that faults
        // (#DF), then a triple fault, which KVM reports as KVM_EXIT_SHUTDOWN.
        asm volatile("mov $0x8000000000, %%rsp; int3" ::: "memory");
    }
    if (list_has(tests, "reset")) {
        // The i8042's "pulse output port" command with the reset line (bit 0)
        // low, as Linux's reboot=k does: the machine resets.
        print("RESULT reset\n");
        outb(0x64, 0xfe);
        panic("the i8042 reset did not reset the machine");
    }
    if (!ran) panic("unknown test list \"%s\" (known: all,timer,port80,smp,pci,hostile,idle,spinlock,net-echo,net-ping,net-bench,tlb,balloon,mem,blk,blk-bench,blk-log,rng,none,exception,triplefault,reset)", tests);
    print("RESULT done ok=%d\n", ok ? 1 : 0);
    guest_exit(ok ? 0 : 1);
}
