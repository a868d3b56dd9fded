// The small guest's main program: read the PVH start info, print who we are,
// run the tests the command line asks for and end the VM with their status.
#include "lib.hpp"

// struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h).
struct HvmStartInfo {
    u32 magic;  // 0x336ec578
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;  // version >= 1
    u32 memmap_entries;
    u32 reserved;
};
struct HvmMemmapEntry { u64 addr, size; u32 type, reserved; };
constexpr u32 kHvmStartMagic = 0x336ec578;

extern "C" void ap_main() {
    for (;;) asm volatile("cli; hlt");
}

extern "C" void kmain(u32 start_info_paddr) {
    serial_init();
    auto* si = reinterpret_cast<const HvmStartInfo*>(u64(start_info_paddr));
    if (si->magic != kHvmStartMagic) panic("bad hvm_start_info magic %x", si->magic);
    const char* cmdline = si->cmdline_paddr ? reinterpret_cast<const char*>(si->cmdline_paddr) : "";
    print("kguest-guest: booted, cmdline \"%s\"\n", cmdline);
    u64 ram = 0;
    if (si->version >= 1)
        for (u32 i = 0; i < si->memmap_entries; ++i) {
            auto* e = reinterpret_cast<const HvmMemmapEntry*>(si->memmap_paddr) + i;
            if (e->type == 1) ram += e->size;
        }
    print("RESULT boot ram_mib=%lu\n", ram >> 20);
    guest_exit(0);
}
