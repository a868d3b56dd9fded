// The kernel loaders (see loader.hpp): PVH ELF, then the Linux bzImage.
#include "vmm/loader.hpp"
#include "devices/base/error.hpp"

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <string_view>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace kguest {

FileImage read_file(const std::string& path, std::uint64_t max_size) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw UsageError("cannot open " + path + ": " + std::strerror(errno));
    Fd owner(fd);
    struct stat st;
    if (::fstat(fd, &st) != 0) throw UsageError("cannot stat " + path + ": " + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) throw UsageError(path + " is not a regular file");
    if (st.st_size == 0) throw UsageError(path + " is empty");
    if (static_cast<std::uint64_t>(st.st_size) > max_size)
        throw UsageError(path + " is larger than guest RAM");
    const std::size_t size = static_cast<std::size_t>(st.st_size);
    // Mapped, not read into a buffer: the loaders copy only what they load
    // (a vmlinux's PT_LOAD segments) straight from the page cache into guest
    // RAM. Reading Debian's 66 MB vmlinux into an anonymous buffer first
    // (zeroing it, copying it, then copying again) took 0.8-2.8 s of a Linux
    // boot in the QEMU sandbox, against 0.38 s mapped. A file truncated while
    // we copy it raises SIGBUS: the start dies before any guest has run.
    // A file system that cannot map files (ENODEV, e.g. sysfs) gets the
    // file read into an anonymous buffer instead.
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p != MAP_FAILED) return FileImage(Mapping(p, size), size);
    if (errno != ENODEV) throw_errno("mmap (" + path + ")");
    p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw_errno("mmap (a buffer for " + path + ")");
    Mapping buf(p, size);
    auto* dst = static_cast<std::uint8_t*>(p);
    std::size_t done = 0;
    while (done < size) {
        ssize_t r = ::read(fd, dst + done, size - done);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) throw UsageError("cannot read " + path + ": " + std::strerror(errno));
        if (r == 0) break;  // shorter than its size said: what we got is the file
        done += static_cast<std::size_t>(r);
    }
    if (done == 0) throw UsageError(path + " is empty");
    return FileImage(std::move(buf), done);
}

namespace {

[[noreturn]] void bad(const std::string& why) { throw UsageError("kernel image: " + why); }

// Is [off, off+len) inside a buffer of `size` bytes? (No overflow.)
bool within(std::uint64_t off, std::uint64_t len, std::uint64_t size) {
    return off <= size && len <= size - off;
}

std::uint64_t align4(std::uint64_t v) { return (v + 3) & ~std::uint64_t(3); }

// Calls fn(type, owner, desc) for each note in one note area until it returns true.
template <typename F>
void for_each_note(std::span<const std::uint8_t> notes, F fn) {
    std::uint64_t pos = 0;
    while (pos + sizeof(Elf64_Nhdr) <= notes.size()) {
        Elf64_Nhdr nh;
        std::memcpy(&nh, notes.data() + pos, sizeof nh);
        std::uint64_t name_off = pos + sizeof nh;
        std::uint64_t desc_off = name_off + align4(nh.n_namesz);
        std::uint64_t next = desc_off + align4(nh.n_descsz);
        if (!within(name_off, nh.n_namesz, notes.size()) || !within(desc_off, nh.n_descsz, notes.size()))
            bad("a PT_NOTE entry runs past its segment");
        std::string_view owner(reinterpret_cast<const char*>(notes.data() + name_off), nh.n_namesz);
        if (!owner.empty() && owner.back() == '\0') owner.remove_suffix(1);
        if (fn(nh.n_type, owner, notes.subspan(desc_off, nh.n_descsz))) return;
        pos = next;
    }
}

// Searches one note area for the (first) PVH entry; 0 when absent. Every
// note is walked, so one that runs past its segment is refused anywhere.
std::uint64_t find_pvh_note(std::span<const std::uint8_t> notes) {
    std::uint64_t entry = 0;
    for_each_note(notes, [&](std::uint32_t type, std::string_view owner, std::span<const std::uint8_t> desc) {
        if (entry != 0 || type != XEN_ELFNOTE_PHYS32_ENTRY || owner != "Xen") return false;
        // Linux writes the address with _ASM_PTR: 8 bytes in ELF64; accept 4 too.
        if (desc.size() == 4) {
            std::uint32_t v;
            std::memcpy(&v, desc.data(), 4);
            entry = v;
        } else if (desc.size() == 8) {
            std::memcpy(&entry, desc.data(), 8);
        } else {
            bad("the PVH entry note has a " + std::to_string(desc.size()) + "-byte address");
        }
        return false;
    });
    return entry;
}

bool has_linux_note(std::span<const std::uint8_t> notes) {
    bool found = false;
    for_each_note(notes, [&](std::uint32_t, std::string_view owner, std::span<const std::uint8_t>) {
        return found = owner == "Linux";
    });
    return found;
}

// The program headers of a valid x86-64 executable ELF; throws naming what is wrong.
std::vector<Elf64_Phdr> program_headers(std::span<const std::uint8_t> image) {
    Elf64_Ehdr eh;
    if (image.size() < sizeof eh) bad("too small to be an ELF file");
    std::memcpy(&eh, image.data(), sizeof eh);
    if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0) bad("neither a PVH ELF file nor a bzImage (bad magic)");
    if (eh.e_ident[EI_CLASS] != ELFCLASS64) bad("not a 64-bit ELF file");
    if (eh.e_ident[EI_DATA] != ELFDATA2LSB) bad("not a little-endian ELF file");
    if (eh.e_machine != EM_X86_64) bad("not an x86-64 ELF file (e_machine " + std::to_string(eh.e_machine) + ")");
    if (eh.e_type != ET_EXEC) bad("not an executable ELF file");
    if (eh.e_phentsize != sizeof(Elf64_Phdr)) bad("unexpected program header size");
    if (eh.e_phnum == 0) bad("no program headers");
    if (!within(eh.e_phoff, std::uint64_t(eh.e_phnum) * sizeof(Elf64_Phdr), image.size()))
        bad("program headers run past the end of the file");
    std::vector<Elf64_Phdr> phs(eh.e_phnum);
    std::memcpy(phs.data(), image.data() + eh.e_phoff, phs.size() * sizeof(Elf64_Phdr));
    return phs;
}

// The E820 map of both boot paths: low RAM, the reserved BIOS area (which holds
// the ACPI tables), then everything from 1 MiB in each RAM region.
std::vector<HvmMemmapEntry> e820_map(const GuestMemory& mem) {
    std::vector<HvmMemmapEntry> map{{0, kLowRamEnd, 1, 0}, {kLowRamEnd, kKernelMinGpa - kLowRamEnd, 2, 0}};
    for (const auto& r : mem.regions()) {
        std::uint64_t start = std::max(r.gpa.value(), kKernelMinGpa);
        if (r.gpa.value() + r.size > start) map.push_back({start, r.gpa.value() + r.size - start, 1, 0});
    }
    return map;
}

// End of the RAM region that starts at 0 (below the 32-bit MMIO hole).
std::uint64_t low_ram_end(const GuestMemory& mem) { return mem.regions().front().size; }

// Every copy into guest RAM is checked: a guest must never boot from memory
// the loader meant to fill but did not.
void copy_in(GuestMemory& mem, std::uint64_t gpa, const void* src, std::uint64_t len, const char* what) {
    if (!mem.write(Gpa(gpa), src, len))
        throw UsageError(std::string(what) + " (" + std::to_string(len) + " bytes at " + std::to_string(gpa) +
                         ") does not fit in guest RAM (raise --memory)");
}

void write_cmdline(GuestMemory& mem, const std::string& cmdline, std::uint64_t max_with_nul) {
    if (cmdline.size() + 1 > max_with_nul)
        throw UsageError("--cmdline is longer than " + std::to_string(max_with_nul - 1) + " bytes" +
                         (max_with_nul < kCmdlineMax ? " (this kernel's cmdline_size)" : ""));
    if (cmdline.find('\0') != std::string::npos) throw UsageError("--cmdline contains a NUL byte");
    copy_in(mem, kCmdlineGpa, cmdline.c_str(), cmdline.size() + 1, "the command line");
}

// Copies an initrd page-aligned as high as it goes in low RAM (boot.rst), below
// `max_addr` and above `floor` (the end of what the kernel needs); returns its
// address. Throws UsageError when it does not fit.
std::uint64_t load_initrd(GuestMemory& mem, std::span<const std::uint8_t> initrd, std::uint64_t floor,
                          std::uint64_t max_addr) {
    const std::uint64_t top = std::min(low_ram_end(mem), max_addr + 1);
    const std::uint64_t mib = 1 << 20;
    if (initrd.size() > top || ((top - initrd.size()) & ~std::uint64_t(0xfff)) < floor)
        throw UsageError("--initrd: " + std::to_string((initrd.size() + mib - 1) / mib) +
                         " MiB does not fit in guest RAM beside the kernel (raise --memory)");
    std::uint64_t gpa = (top - initrd.size()) & ~std::uint64_t(0xfff);
    copy_in(mem, gpa, initrd.data(), initrd.size(), "--initrd");
    return gpa;
}

} // namespace

LoadedKernel load_pvh_elf(GuestMemory& mem, std::span<const std::uint8_t> image) {
    LoadedKernel k{0, UINT64_MAX, 0};
    std::uint64_t entry = 0;
    unsigned loads = 0;
    for (const Elf64_Phdr& ph : program_headers(image)) {
        if (ph.p_type == PT_NOTE) {
            if (!within(ph.p_offset, ph.p_filesz, image.size())) bad("a PT_NOTE segment runs past the end of the file");
            std::uint64_t e = find_pvh_note(image.subspan(ph.p_offset, ph.p_filesz));
            if (entry == 0) entry = e;
            continue;
        }
        if (ph.p_type != PT_LOAD || ph.p_memsz == 0) continue;
        if (!within(ph.p_offset, ph.p_filesz, image.size())) bad("a PT_LOAD segment runs past the end of the file");
        if (ph.p_filesz > ph.p_memsz) bad("a PT_LOAD segment has filesz > memsz");
        if (ph.p_paddr < kKernelMinGpa) bad("a PT_LOAD segment lies below 1 MiB");
        auto dst = mem.range(Gpa(ph.p_paddr), ph.p_memsz);
        if (!dst) bad("a PT_LOAD segment does not fit in guest RAM (raise --memory)");
        dst->write(0, image.data() + ph.p_offset, ph.p_filesz);   // filesz <= memsz: cannot fail
        dst->fill(ph.p_filesz, 0, ph.p_memsz - ph.p_filesz);
        k.image_start = std::min(k.image_start, ph.p_paddr);
        k.image_end = std::max(k.image_end, ph.p_paddr + ph.p_memsz);
        ++loads;
    }
    if (loads == 0) bad("no loadable segments");
    if (entry == 0) bad("no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); not a PVH kernel");
    if (entry < k.image_start || entry >= k.image_end || entry > UINT32_MAX)
        bad("the PVH entry point lies outside the loaded image");
    k.entry = static_cast<std::uint32_t>(entry);
    return k;
}

std::uint64_t write_pvh_start_info(GuestMemory& mem, const std::string& cmdline, std::uint64_t rsdp,
                                   std::uint64_t initrd_gpa, std::uint64_t initrd_size) {
    write_cmdline(mem, cmdline, kCmdlineMax);
    const auto map = e820_map(mem);
    copy_in(mem, kMemmapGpa, map.data(), map.size() * sizeof(HvmMemmapEntry), "the PVH memory map");

    HvmStartInfo si{};
    si.magic = XEN_HVM_START_MAGIC_VALUE;
    si.version = 1;
    si.cmdline_paddr = kCmdlineGpa;
    si.memmap_paddr = kMemmapGpa;
    si.memmap_entries = static_cast<std::uint32_t>(map.size());
    si.rsdp_paddr = rsdp;
    if (initrd_size != 0) {
        // struct hvm_modlist_entry {paddr, size, cmdline_paddr, reserved}
        const std::uint64_t mod[4] = {initrd_gpa, initrd_size, 0, 0};
        copy_in(mem, kModlistGpa, mod, sizeof mod, "the PVH module list");
        si.nr_modules = 1;
        si.modlist_paddr = kModlistGpa;
    }
    copy_in(mem, kStartInfoGpa, &si, sizeof si, "the PVH start_info");
    return kStartInfoGpa;
}

// ---- bzImage (Documentation/arch/x86/boot.rst) ------------------------------

namespace {
template <typename T>
T get(std::span<const std::uint8_t> b, std::size_t off) {
    T v;
    std::memcpy(&v, b.data() + off, sizeof v);
    return v;
}
template <typename T>
void put(std::span<std::uint8_t> b, std::size_t off, T v) {
    std::memcpy(b.data() + off, &v, sizeof v);
}

constexpr std::size_t kHeaderEnd = 0x268;       // through init_size (protocol 2.10+)
constexpr std::uint8_t kLoadedHigh = 0x01;      // loadflags: protected-mode code at 1 MiB
constexpr std::uint8_t kCanUseHeap = 0x80;      // loadflags: heap_end_ptr is valid
constexpr std::uint16_t kXlfKernel64 = 0x01;    // xloadflags: has the 64-bit entry at +0x200
constexpr std::uint16_t kMinVersion = 0x020c;   // 2.12: xloadflags
constexpr std::uint64_t kBzLoadGpa = 0x100000;  // code32_start's default; the kernel relocates itself
constexpr unsigned kMaxE820 = 128;              // boot_params.e820_table[] entries

std::string version_str(std::uint16_t v) { return std::to_string(v >> 8) + "." + std::to_string(v & 0xff); }

// Identity map of the low 4 GiB with 2 MiB pages (boot.rst, 64-bit boot
// protocol: "the range with setup_header.init_size ... must be identity mapped").
void write_identity_page_tables(GuestMemory& mem) {
    constexpr std::uint64_t kP = 1, kRw = 2, kPs = 0x80;
    const std::uint64_t pdpt = kPml4Gpa + 0x1000, pd = kPml4Gpa + 0x2000;
    std::uint64_t pml4[512] = {pdpt | kP | kRw};
    std::uint64_t pdpte[512] = {};
    for (std::uint64_t i = 0; i < 4; ++i) pdpte[i] = (pd + i * 0x1000) | kP | kRw;
    copy_in(mem, kPml4Gpa, pml4, sizeof pml4, "the boot page tables");
    copy_in(mem, pdpt, pdpte, sizeof pdpte, "the boot page tables");
    for (std::uint64_t i = 0; i < 4; ++i) {
        std::uint64_t pde[512];
        for (std::uint64_t j = 0; j < 512; ++j) pde[j] = ((i << 30) | (j << 21)) | kP | kRw | kPs;
        copy_in(mem, pd + i * 0x1000, pde, sizeof pde, "the boot page tables");
    }
}
} // namespace

bool is_bzimage(std::span<const std::uint8_t> image) {
    return image.size() >= 0x206 && std::memcmp(image.data() + 0x202, "HdrS", 4) == 0;
}

bool is_linux_kernel(std::span<const std::uint8_t> image) {
    if (is_bzimage(image)) return true;
    try {
        for (const Elf64_Phdr& ph : program_headers(image)) {
            if (ph.p_type == PT_NOTE && within(ph.p_offset, ph.p_filesz, image.size()) &&
                has_linux_note(image.subspan(ph.p_offset, ph.p_filesz)))
                return true;
        }
    } catch (const UsageError&) {
    }
    return false;
}

SetupHeader parse_setup_header(std::span<const std::uint8_t> image) {
    if (!is_bzimage(image)) bad("not a bzImage (no \"HdrS\" magic at 0x202)");
    if (image.size() < kHeaderEnd) bad("bzImage truncated inside its setup header");
    if (get<std::uint16_t>(image, 0x1fe) != 0xaa55) bad("bzImage has a bad boot_flag (want 0xAA55)");
    SetupHeader h;
    h.version = get<std::uint16_t>(image, 0x206);
    if (h.version < kMinVersion)
        bad("bzImage boot protocol " + version_str(h.version) + " is too old (kguest needs 2.12 or later)");
    const unsigned setup_sects = image[0x1f1] == 0 ? 4 : image[0x1f1];
    const std::uint32_t syssize = get<std::uint32_t>(image, 0x1f4);  // in 16-byte units
    h.loadflags = image[0x211];
    h.initrd_addr_max = get<std::uint32_t>(image, 0x22c);
    h.cmdline_size = get<std::uint32_t>(image, 0x238);
    h.pref_address = get<std::uint64_t>(image, 0x258);
    h.init_size = get<std::uint32_t>(image, 0x260);
    if (!(h.loadflags & kLoadedHigh)) bad("a zImage (loaded low), not a bzImage");
    if (!(get<std::uint16_t>(image, 0x236) & kXlfKernel64))  // xloadflags
        bad("bzImage has no 64-bit entry point (XLF_KERNEL_64)");
    h.setup_bytes = (std::uint64_t(setup_sects) + 1) * 512;
    if (h.setup_bytes >= image.size()) bad("bzImage truncated: no protected-mode kernel after the setup code");
    const std::uint64_t kernel_bytes = image.size() - h.setup_bytes;
    if (std::uint64_t(syssize) * 16 > kernel_bytes)
        bad("bzImage truncated: the header says " + std::to_string(std::uint64_t(syssize) * 16) +
            " bytes of kernel, the file has " + std::to_string(kernel_bytes));
    if (h.init_size == 0 || h.init_size < kernel_bytes) bad("bzImage has a bad init_size");
    return h;
}

BootPlan load_kernel(GuestMemory& mem, std::span<const std::uint8_t> image, std::span<const std::uint8_t> initrd,
                     const std::string& cmdline, std::uint64_t rsdp) {
    auto add_initrd = [&](BootPlan& plan, std::uint64_t floor, std::uint64_t max_addr) {
        if (initrd.empty()) return;
        plan.initrd_gpa = load_initrd(mem, initrd, floor, max_addr);
        plan.initrd_size = initrd.size();
    };
    if (!is_bzimage(image)) {
        LoadedKernel k = load_pvh_elf(mem, image);
        BootPlan plan{BootPlan::Mode::pvh32, k.entry, 0};
        add_initrd(plan, k.image_end, UINT32_MAX);
        plan.arg = write_pvh_start_info(mem, cmdline, rsdp, plan.initrd_gpa, plan.initrd_size);
        return plan;
    }

    const SetupHeader h = parse_setup_header(image);
    auto kernel = image.subspan(h.setup_bytes);
    // The kernel decompresses itself to max(load address, pref_address)
    // rounded up to kernel_alignment, and needs init_size bytes there. A
    // pref_address near 2^64 would wrap the sum to a small "fitting" value.
    const std::uint64_t dest = std::max(kBzLoadGpa, h.pref_address);
    if (dest > UINT64_MAX - h.init_size)
        bad("bzImage has a bad pref_address (" + std::to_string(h.pref_address) + " + init_size wraps past 2^64)");
    const std::uint64_t need = dest + h.init_size;
    if (need > low_ram_end(mem))
        bad("bzImage needs " + std::to_string((need >> 20) + ((need & 0xfffff) != 0)) + " MiB of RAM below 3 GiB (raise --memory)");
    copy_in(mem, kBzLoadGpa, kernel.data(), kernel.size(), "the bzImage's kernel");

    BootPlan plan{BootPlan::Mode::linux64, kBzLoadGpa + 0x200, kZeroPageGpa};
    add_initrd(plan, need, h.initrd_addr_max);
    write_cmdline(mem, cmdline, std::min<std::uint64_t>(kCmdlineMax, std::uint64_t(h.cmdline_size) + 1));

    // The zero page (zero-page.rst): the setup header as the file has it
    // (0x1f1 up to 0x202 + the jump offset at 0x201), then our fields.
    std::vector<std::uint8_t> zp(4096, 0);
    std::span<std::uint8_t> z(zp);
    const std::size_t hdr_end = std::min<std::size_t>(0x202 + image[0x201], z.size());
    std::memcpy(zp.data() + 0x1f1, image.data() + 0x1f1, hdr_end - 0x1f1);
    z[0x210] = 0xff;  // type_of_loader: "undefined" (boot.rst: no assigned ID)
    z[0x211] = static_cast<std::uint8_t>(h.loadflags | kCanUseHeap);
    put<std::uint16_t>(z, 0x224, 0xfe00);  // heap_end_ptr (unused by the 64-bit entry)
    put<std::uint32_t>(z, 0x218, static_cast<std::uint32_t>(plan.initrd_gpa));   // ramdisk_image
    put<std::uint32_t>(z, 0x21c, static_cast<std::uint32_t>(plan.initrd_size));  // ramdisk_size
    put<std::uint32_t>(z, 0x228, static_cast<std::uint32_t>(kCmdlineGpa));       // cmd_line_ptr
    put<std::uint64_t>(z, 0x070, rsdp);                                           // acpi_rsdp_addr
    const auto map = e820_map(mem);
    if (map.size() > kMaxE820) bad("too many E820 entries");
    z[0x1e8] = static_cast<std::uint8_t>(map.size());  // e820_entries
    for (std::size_t i = 0; i < map.size(); ++i) {     // e820_table: packed {u64 addr, u64 size, u32 type}
        put<std::uint64_t>(z, 0x2d0 + i * 20, map[i].addr);
        put<std::uint64_t>(z, 0x2d0 + i * 20 + 8, map[i].size);
        put<std::uint32_t>(z, 0x2d0 + i * 20 + 16, map[i].type);
    }
    copy_in(mem, kZeroPageGpa, zp.data(), zp.size(), "the zero page");
    write_identity_page_tables(mem);
    return plan;
}

} // namespace kguest
