// Loading a PVH kernel. The image is an ELF whose PT_NOTE segments carry
// XEN_ELFNOTE_PHYS32_ENTRY (type 18, owner "Xen"): the physical address of a
// 32-bit entry point. Per the PVH boot ABI (xen/include/public/arch-x86/hvm/
// start_info.h, Linux's Documentation/x86/boot.rst "PVH") the loader copies
// the PT_LOAD segments to their physical addresses, writes struct
// hvm_start_info (with the command line and an E820-style memory map), and
// starts the BSP in 32-bit protected mode, paging off, with %ebx = the
// start_info address. Everything in the file is untrusted: every offset and
// size is checked, and a malformed image is refused with one clear message.
#pragma once

#include "guest_memory.hpp"

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace kguest {

// Fixed low-memory spots for what the loader writes; kernels load at 1 MiB
// and up, and PT_LOAD segments below that are refused.
inline constexpr std::uint64_t kBootGdtGpa = 0x500;
inline constexpr std::uint64_t kStartInfoGpa = 0x6000;
inline constexpr std::uint64_t kMemmapGpa = 0x6100;
inline constexpr std::uint64_t kCmdlineGpa = 0x7000;
inline constexpr std::uint64_t kCmdlineMax = 0x1000;  // including the NUL
inline constexpr std::uint64_t kKernelMinGpa = 0x100000;

inline constexpr std::uint32_t XEN_ELFNOTE_PHYS32_ENTRY = 18;
inline constexpr std::uint32_t XEN_HVM_START_MAGIC_VALUE = 0x336ec578;

struct HvmStartInfo {
    std::uint32_t magic;
    std::uint32_t version;
    std::uint32_t flags;
    std::uint32_t nr_modules;
    std::uint64_t modlist_paddr;
    std::uint64_t cmdline_paddr;
    std::uint64_t rsdp_paddr;
    std::uint64_t memmap_paddr;
    std::uint32_t memmap_entries;
    std::uint32_t reserved;
};
static_assert(sizeof(HvmStartInfo) == 56);

struct HvmMemmapEntry {
    std::uint64_t addr;
    std::uint64_t size;
    std::uint32_t type;  // E820 types: 1 RAM, 2 reserved
    std::uint32_t reserved;
};

struct LoadedKernel {
    std::uint32_t entry;        // PVH 32-bit entry point
    std::uint64_t image_start;  // lowest loaded address
    std::uint64_t image_end;    // one past the highest
};

// Reads the whole file; UsageError if unreadable, empty or over `max_size`.
std::vector<std::uint8_t> read_file(const std::string& path, std::uint64_t max_size);

// Validates and loads; throws UsageError("...") naming what is wrong.
LoadedKernel load_pvh_elf(GuestMemory& mem, std::span<const std::uint8_t> image);

// Writes hvm_start_info, the memory map and the command line; returns the
// start_info address (for %ebx). Throws UsageError if the cmdline is too long.
std::uint64_t write_pvh_start_info(GuestMemory& mem, const std::string& cmdline);

} // namespace kguest
