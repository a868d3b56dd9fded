// The PVH ELF loader (see loader.hpp).
#include "loader.hpp"
#include "error.hpp"

#include <cerrno>
#include <cstring>
#include <elf.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace kguest {

std::vector<std::uint8_t> read_file(const std::string& path, std::uint64_t max_size) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw UsageError("cannot open " + path + ": " + std::strerror(errno));
    Fd owner(fd);
    struct stat st;
    if (::fstat(fd, &st) != 0) throw UsageError("cannot stat " + path + ": " + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) throw UsageError(path + " is not a regular file");
    if (st.st_size == 0) throw UsageError(path + " is empty");
    if (static_cast<std::uint64_t>(st.st_size) > max_size)
        throw UsageError(path + " is larger than guest RAM");
    std::vector<std::uint8_t> buf(static_cast<std::size_t>(st.st_size));
    std::size_t done = 0;
    while (done < buf.size()) {
        ssize_t r = ::read(fd, buf.data() + done, buf.size() - done);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) throw UsageError("cannot read " + path + ": " + std::strerror(errno));
        if (r == 0) break;
        done += static_cast<std::size_t>(r);
    }
    buf.resize(done);
    return buf;
}

namespace {

[[noreturn]] void bad(const std::string& why) { throw UsageError("kernel image: " + why); }

// Is [off, off+len) inside a buffer of `size` bytes? (No overflow.)
bool within(std::uint64_t off, std::uint64_t len, std::uint64_t size) {
    return off <= size && len <= size - off;
}

std::uint64_t align4(std::uint64_t v) { return (v + 3) & ~std::uint64_t(3); }

// Searches one note area for the PVH entry; 0 when absent.
std::uint64_t find_pvh_note(std::span<const std::uint8_t> notes) {
    std::uint64_t pos = 0;
    while (pos + sizeof(Elf64_Nhdr) <= notes.size()) {
        Elf64_Nhdr nh;
        std::memcpy(&nh, notes.data() + pos, sizeof nh);
        std::uint64_t name_off = pos + sizeof nh;
        std::uint64_t desc_off = name_off + align4(nh.n_namesz);
        std::uint64_t next = desc_off + align4(nh.n_descsz);
        if (!within(name_off, nh.n_namesz, notes.size()) || !within(desc_off, nh.n_descsz, notes.size()))
            bad("a PT_NOTE entry runs past its segment");
        if (nh.n_type == XEN_ELFNOTE_PHYS32_ENTRY && nh.n_namesz == 4 &&
            std::memcmp(notes.data() + name_off, "Xen", 4) == 0) {
            // Linux writes the address with _ASM_PTR: 8 bytes in ELF64; accept 4 too.
            if (nh.n_descsz == 4) {
                std::uint32_t v;
                std::memcpy(&v, notes.data() + desc_off, 4);
                return v;
            }
            if (nh.n_descsz == 8) {
                std::uint64_t v;
                std::memcpy(&v, notes.data() + desc_off, 8);
                return v;
            }
            bad("the PVH entry note has a " + std::to_string(nh.n_descsz) + "-byte address");
        }
        pos = next;
    }
    return 0;
}

} // namespace

LoadedKernel load_pvh_elf(GuestMemory& mem, std::span<const std::uint8_t> image) {
    Elf64_Ehdr eh;
    if (image.size() < sizeof eh) bad("too small to be an ELF file");
    std::memcpy(&eh, image.data(), sizeof eh);
    if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0) {
        if (image.size() > 0x206 && std::memcmp(image.data() + 0x202, "HdrS", 4) == 0)
            bad("this is a bzImage; kguest boots the PVH ELF (vmlinux) for now");
        bad("not an ELF file (bad magic)");
    }
    if (eh.e_ident[EI_CLASS] != ELFCLASS64) bad("not a 64-bit ELF file");
    if (eh.e_ident[EI_DATA] != ELFDATA2LSB) bad("not a little-endian ELF file");
    if (eh.e_machine != EM_X86_64) bad("not an x86-64 ELF file (e_machine " + std::to_string(eh.e_machine) + ")");
    if (eh.e_type != ET_EXEC) bad("not an executable ELF file");
    if (eh.e_phentsize != sizeof(Elf64_Phdr)) bad("unexpected program header size");
    if (eh.e_phnum == 0) bad("no program headers");
    if (!within(eh.e_phoff, std::uint64_t(eh.e_phnum) * sizeof(Elf64_Phdr), image.size()))
        bad("program headers run past the end of the file");

    LoadedKernel k{0, UINT64_MAX, 0};
    std::uint64_t entry = 0;
    unsigned loads = 0;
    for (unsigned i = 0; i < eh.e_phnum; ++i) {
        Elf64_Phdr ph;
        std::memcpy(&ph, image.data() + eh.e_phoff + i * sizeof ph, sizeof ph);
        if (ph.p_type == PT_NOTE) {
            if (!within(ph.p_offset, ph.p_filesz, image.size())) bad("a PT_NOTE segment runs past the end of the file");
            if (entry == 0) entry = find_pvh_note(image.subspan(ph.p_offset, ph.p_filesz));
            continue;
        }
        if (ph.p_type != PT_LOAD || ph.p_memsz == 0) continue;
        if (!within(ph.p_offset, ph.p_filesz, image.size())) bad("a PT_LOAD segment runs past the end of the file");
        if (ph.p_filesz > ph.p_memsz) bad("a PT_LOAD segment has filesz > memsz");
        if (ph.p_paddr < kKernelMinGpa) bad("a PT_LOAD segment lies below 1 MiB");
        std::uint8_t* dst = mem.ptr(ph.p_paddr, ph.p_memsz);
        if (dst == nullptr) bad("a PT_LOAD segment does not fit in guest RAM (raise --memory)");
        std::memcpy(dst, image.data() + ph.p_offset, ph.p_filesz);
        std::memset(dst + ph.p_filesz, 0, ph.p_memsz - ph.p_filesz);
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

std::uint64_t write_pvh_start_info(GuestMemory& mem, const std::string& cmdline) {
    if (cmdline.size() + 1 > kCmdlineMax)
        throw UsageError("--cmdline is longer than " + std::to_string(kCmdlineMax - 1) + " bytes");
    if (cmdline.find('\0') != std::string::npos) throw UsageError("--cmdline contains a NUL byte");
    mem.write(kCmdlineGpa, cmdline.c_str(), cmdline.size() + 1);

    // The E820 map: low RAM below the EBDA/VGA/BIOS area, then everything
    // from 1 MiB in each RAM region.
    std::vector<HvmMemmapEntry> map;
    map.push_back({0, 0x9fc00, 1, 0});
    map.push_back({0x9fc00, 0x100000 - 0x9fc00, 2, 0});
    for (const auto& r : mem.regions()) {
        std::uint64_t start = r.gpa < kKernelMinGpa ? kKernelMinGpa : r.gpa;
        if (r.gpa + r.size > start) map.push_back({start, r.gpa + r.size - start, 1, 0});
    }
    mem.write(kMemmapGpa, map.data(), map.size() * sizeof(HvmMemmapEntry));

    HvmStartInfo si{};
    si.magic = XEN_HVM_START_MAGIC_VALUE;
    si.version = 1;
    si.cmdline_paddr = kCmdlineGpa;
    si.memmap_paddr = kMemmapGpa;
    si.memmap_entries = static_cast<std::uint32_t>(map.size());
    mem.write_obj(kStartInfoGpa, si);
    return kStartInfoGpa;
}

} // namespace kguest
