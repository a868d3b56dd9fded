// Loading a kernel: a PVH ELF (our guest, or Linux's vmlinux) or a Linux
// bzImage. A PVH ELF's PT_NOTE segments carry XEN_ELFNOTE_PHYS32_ENTRY (type
// 18, owner "Xen"), a 32-bit entry point. Per the PVH boot ABI
// (xen/include/public/arch-x86/hvm/start_info.h) the PT_LOAD segments go to
// their physical addresses, struct hvm_start_info gets the command line, an
// E820-style memory map and the initrd as the one module, and the BSP starts
// in 32-bit protected mode, paging off, with %ebx = start_info.
//
// A bzImage follows the Linux x86 boot protocol (Documentation/arch/x86/
// boot.rst): the protected-mode kernel is loaded at 1 MiB and entered at
// load address + 0x200 in long mode, %rsi = boot_params (zero-page.rst).
//
// Everything in the files is untrusted: every offset and size is checked,
// and a malformed image is refused with one clear message.
#pragma once

#include "devices/base/fd.hpp"
#include "devices/base/guest_memory.hpp"

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
inline constexpr std::uint64_t kModlistGpa = 0x6800;  // PVH module list (the initrd)
inline constexpr std::uint64_t kCmdlineGpa = 0x7000;
inline constexpr std::uint64_t kCmdlineMax = 0x1000;  // including the NUL
inline constexpr std::uint64_t kKernelMinGpa = 0x100000;
// Long-mode boot (bzImage): identity page tables for the low 4 GiB with
// 2 MiB pages (PML4, PDPT, four PDs), then the zero page.
inline constexpr std::uint64_t kPml4Gpa = 0x9000;
inline constexpr std::uint64_t kZeroPageGpa = 0x10000;
// The BIOS area [0x9fc00, 1 MiB), reserved in E820, holds the ACPI tables.
inline constexpr std::uint64_t kLowRamEnd = 0x9fc00;

inline constexpr std::uint32_t XEN_ELFNOTE_PHYS32_ENTRY = 18;
inline constexpr std::uint32_t XEN_HVM_START_MAGIC_VALUE = 0x336ec578;

struct HvmStartInfo {
    std::uint32_t magic, version, flags, nr_modules;
    std::uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    std::uint32_t memmap_entries, reserved;
};
static_assert(sizeof(HvmStartInfo) == 56);

struct HvmMemmapEntry {
    std::uint64_t addr, size;
    std::uint32_t type, reserved;  // E820 types: 1 RAM, 2 reserved
};

struct LoadedKernel {
    std::uint32_t entry;        // PVH 32-bit entry point
    std::uint64_t image_start;  // lowest loaded address
    std::uint64_t image_end;    // one past the highest
};

// How the boot CPU starts: PVH (32-bit, %ebx = start_info) or the Linux
// 64-bit boot protocol (long mode, %rsi = boot_params, page tables at kPml4Gpa).
struct BootPlan {
    enum class Mode { pvh32, linux64 } mode;
    std::uint64_t entry;
    std::uint64_t arg;      // start_info or boot_params address
    std::uint64_t initrd_gpa = 0, initrd_size = 0;
};

// The fields of the bzImage setup header kguest reads (boot.rst offsets).
struct SetupHeader {
    std::uint64_t setup_bytes;    // (setup_sects (0x1f1, 0 means 4) + 1) * 512: where the protected-mode kernel starts
    std::uint16_t version;        // 0x206
    std::uint8_t loadflags;       // 0x211
    std::uint32_t initrd_addr_max;  // 0x22c
    std::uint32_t cmdline_size;   // 0x238
    std::uint64_t pref_address;   // 0x258
    std::uint32_t init_size;      // 0x260
};
bool is_bzimage(std::span<const std::uint8_t> image);
// A bzImage, or an ELF with a note owned by "Linux" (a vmlinux); false for
// anything else, malformed files included (loading them says what is wrong).
bool is_linux_kernel(std::span<const std::uint8_t> image);
// Validates the header; throws UsageError naming what is wrong.
SetupHeader parse_setup_header(std::span<const std::uint8_t> image);

// A whole file's bytes, mapped read-only from the page cache; unmapped when
// it goes, so a multi-MiB image leaves the VMM's RSS once loaded.
class FileImage {
public:
    FileImage(Mapping m, std::size_t size) : m_(std::move(m)), size_(size) {}
    std::span<const std::uint8_t> bytes() const { return {static_cast<const std::uint8_t*>(m_.get()), size_}; }

private:
    Mapping m_;
    std::size_t size_;
};

// Maps the whole file read-only; UsageError if unreadable, empty or over `max_size`.
FileImage read_file(const std::string& path, std::uint64_t max_size);

// Validates and loads; throws UsageError("...") naming what is wrong.
LoadedKernel load_pvh_elf(GuestMemory& mem, std::span<const std::uint8_t> image);

// Writes hvm_start_info (with `rsdp`, 0 for none, and an initrd already in RAM), the memory
// map and the command line (UsageError when too long); returns the start_info address (%ebx).
std::uint64_t write_pvh_start_info(GuestMemory& mem, const std::string& cmdline, std::uint64_t rsdp = 0,
                                   std::uint64_t initrd_gpa = 0, std::uint64_t initrd_size = 0);

// The whole boot of either kind of image: loads the kernel and initrd (empty
// span: none), writes the boot information and, for a bzImage, the page
// tables. Throws UsageError for a malformed or unfitting image.
BootPlan load_kernel(GuestMemory& mem, std::span<const std::uint8_t> image, std::span<const std::uint8_t> initrd,
                     const std::string& cmdline, std::uint64_t rsdp);

} // namespace kguest
