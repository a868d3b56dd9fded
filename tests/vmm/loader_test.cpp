// The kernel loaders on in-memory images: good PVH ELF files and bzImages
// load, every malformed header or note is refused with UsageError naming the
// problem, random corruption never crashes; hvm_start_info / memory map /
// command line written by write_pvh_start_info, and the bzImage zero page,
// initrd placement and page tables written by load_kernel.
#include "devices/base/error.hpp"
#include "vmm/loader.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <elf.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

namespace kguest {
namespace {

// Layout of the test image: ELF header, PT_LOAD and PT_NOTE headers, the Xen
// note, then the loaded bytes.
constexpr std::size_t kPhOff = sizeof(Elf64_Ehdr);
constexpr std::size_t kNoteOff = kPhOff + 2 * sizeof(Elf64_Phdr);
constexpr std::size_t kLoadOff = 0x100;
constexpr std::uint64_t kFilesz = 0x100, kMemsz = 0x300;
constexpr std::uint64_t kPaddr = 0x100000, kEntry = 0x100040;
constexpr std::uint64_t kRam = 4 << 20;

using Image = std::vector<std::uint8_t>;

// Copies of guest RAM, for comparing with what the loader should have put there.
std::vector<std::uint8_t> guest_bytes(const GuestMemory& mem, std::uint64_t gpa, std::uint64_t len) {
    std::vector<std::uint8_t> v(len);
    EXPECT_TRUE(mem.read(Gpa(gpa), v.data(), len));
    return v;
}
template <typename T>
T peek(const GuestMemory& mem, std::uint64_t gpa) { return *mem.read_obj<T>(Gpa(gpa)); }
std::string guest_cstr(const GuestMemory& mem, std::uint64_t gpa, std::uint64_t max) {
    const auto v = guest_bytes(mem, gpa, max);
    return std::string(v.begin(), std::find(v.begin(), v.end(), 0));
}

template <typename T, typename F>
void edit(Image& img, std::size_t off, F f) {
    T v;
    std::memcpy(&v, img.data() + off, sizeof v);
    f(v);
    std::memcpy(img.data() + off, &v, sizeof v);
}
template <typename F> void edit_eh(Image& img, F f) { edit<Elf64_Ehdr>(img, 0, f); }
template <typename F> void edit_load(Image& img, F f) { edit<Elf64_Phdr>(img, kPhOff, f); }
template <typename F> void edit_note_ph(Image& img, F f) { edit<Elf64_Phdr>(img, kPhOff + sizeof(Elf64_Phdr), f); }
template <typename F> void edit_nhdr(Image& img, F f) { edit<Elf64_Nhdr>(img, kNoteOff, f); }

Image make_image(std::uint32_t desc_size = 8, std::uint64_t entry = kEntry) {
    Image img(kLoadOff + kFilesz, 0);
    Elf64_Ehdr eh{};
    std::memcpy(eh.e_ident, ELFMAG, SELFMAG);
    eh.e_ident[EI_CLASS] = ELFCLASS64;
    eh.e_ident[EI_DATA] = ELFDATA2LSB;
    eh.e_ident[EI_VERSION] = EV_CURRENT;
    eh.e_type = ET_EXEC;
    eh.e_machine = EM_X86_64;
    eh.e_version = EV_CURRENT;
    eh.e_entry = 0xffffffff81000000;  // the 64-bit entry, which PVH ignores
    eh.e_phoff = kPhOff;
    eh.e_ehsize = sizeof eh;
    eh.e_phentsize = sizeof(Elf64_Phdr);
    eh.e_phnum = 2;
    std::memcpy(img.data(), &eh, sizeof eh);

    Elf64_Phdr load{};
    load.p_type = PT_LOAD;
    load.p_offset = kLoadOff;
    load.p_vaddr = load.p_paddr = kPaddr;
    load.p_filesz = kFilesz;
    load.p_memsz = kMemsz;
    std::memcpy(img.data() + kPhOff, &load, sizeof load);

    Elf64_Nhdr nh{4, desc_size, XEN_ELFNOTE_PHYS32_ENTRY};
    Elf64_Phdr note{};
    note.p_type = PT_NOTE;
    note.p_offset = kNoteOff;
    note.p_filesz = sizeof nh + 4 + desc_size;
    std::memcpy(img.data() + kPhOff + sizeof load, &note, sizeof note);
    std::memcpy(img.data() + kNoteOff, &nh, sizeof nh);
    std::memcpy(img.data() + kNoteOff + sizeof nh, "Xen", 4);
    std::memcpy(img.data() + kNoteOff + sizeof nh + 4, &entry, desc_size);  // little-endian

    for (std::size_t i = 0; i < kFilesz; ++i) img[kLoadOff + i] = static_cast<std::uint8_t>(i * 7 + 1);
    return img;
}

// Refused with a UsageError whose message contains `what`.
void expect_refused(const Image& img, const std::string& what) {
    GuestMemory mem(kRam, Backing::off);
    try {
        load_pvh_elf(mem, img);
        ADD_FAILURE() << "loaded; expected refusal mentioning \"" << what << "\"";
    } catch (const UsageError& e) {
        EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
}

TEST(PvhLoader, LoadsGoodImage) {
    for (std::uint32_t desc : {8u, 4u}) {
        GuestMemory mem(kRam, Backing::off);
        ASSERT_TRUE(mem.range(Gpa(kPaddr), kMemsz)->fill(0, 0xcc, kMemsz));  // bss must be zeroed
        Image img = make_image(desc);
        LoadedKernel k = load_pvh_elf(mem, img);
        EXPECT_EQ(k.entry, kEntry) << desc;
        EXPECT_EQ(k.image_start, kPaddr);
        EXPECT_EQ(k.image_end, kPaddr + kMemsz);
        EXPECT_EQ(std::memcmp(guest_bytes(mem, kPaddr, kFilesz).data(), img.data() + kLoadOff, kFilesz), 0);
        const auto bss = guest_bytes(mem, kPaddr + kFilesz, kMemsz - kFilesz);
        EXPECT_TRUE(std::all_of(bss.begin(), bss.end(), [](std::uint8_t b) { return b == 0; }));
        EXPECT_EQ(peek<std::uint8_t>(mem, kPaddr + kMemsz), 0u);  // fresh RAM beyond: untouched zero pages
    }
    // The entry may be the last byte of the image, and the segment may end at the end of RAM.
    GuestMemory mem(kRam, Backing::off);
    Image img = make_image(8, kPaddr + kMemsz - 1);
    EXPECT_EQ(load_pvh_elf(mem, img).entry, kPaddr + kMemsz - 1);
    img = make_image(4, kRam - kMemsz);
    edit_load(img, [](Elf64_Phdr& p) { p.p_paddr = kRam - kMemsz; });
    EXPECT_EQ(load_pvh_elf(mem, img).image_end, kRam);
}

TEST(PvhLoader, RefusesBadHeaders) {
    Image good = make_image();
    expect_refused(Image(good.begin(), good.begin() + sizeof(Elf64_Ehdr) - 1), "too small");
    Image img = good;
    img[1] = 'F';
    expect_refused(img, "bad magic");
    img = good;
    edit_eh(img, [](Elf64_Ehdr& e) { e.e_ident[EI_CLASS] = ELFCLASS32; });
    expect_refused(img, "64-bit");
    img = good;
    edit_eh(img, [](Elf64_Ehdr& e) { e.e_ident[EI_DATA] = ELFDATA2MSB; });
    expect_refused(img, "little-endian");
    img = good;
    edit_eh(img, [](Elf64_Ehdr& e) { e.e_machine = EM_386; });
    expect_refused(img, "x86-64");
    img = good;
    edit_eh(img, [](Elf64_Ehdr& e) { e.e_type = ET_DYN; });
    expect_refused(img, "executable");
    img = good;
    edit_eh(img, [](Elf64_Ehdr& e) { e.e_phentsize = sizeof(Elf64_Phdr) - 1; });
    expect_refused(img, "program header size");
    img = good;
    edit_eh(img, [](Elf64_Ehdr& e) { e.e_phnum = 0; });
    expect_refused(img, "no program headers");
}

TEST(PvhLoader, RefusesProgramHeadersPastTheEnd) {
    Image good = make_image();
    for (std::uint64_t phoff : {std::uint64_t(good.size()), std::uint64_t(good.size() - sizeof(Elf64_Phdr)),
                                UINT64_MAX - 8}) {
        Image img = good;
        edit_eh(img, [&](Elf64_Ehdr& e) { e.e_phoff = phoff; });
        expect_refused(img, "program headers run past");
    }
    Image img = good;
    edit_eh(img, [](Elf64_Ehdr& e) { e.e_phnum = 0xffff; });  // phnum * phentsize far past the file
    expect_refused(img, "program headers run past");
}

TEST(PvhLoader, RefusesBadLoadSegments) {
    Image good = make_image();
    Image img = good;
    edit_load(img, [](Elf64_Phdr& p) { p.p_filesz = kFilesz + 1; });
    expect_refused(img, "PT_LOAD segment runs past");
    img = good;
    edit_load(img, [](Elf64_Phdr& p) { p.p_offset = UINT64_MAX - 0x10; });
    expect_refused(img, "PT_LOAD segment runs past");
    img = good;
    edit_load(img, [](Elf64_Phdr& p) { p.p_memsz = kFilesz - 1; });
    expect_refused(img, "filesz > memsz");
    img = good;
    edit_load(img, [](Elf64_Phdr& p) { p.p_paddr = kKernelMinGpa - 0x1000; });
    expect_refused(img, "below 1 MiB");
    for (std::uint64_t paddr : {kRam - kMemsz + 1, kRam, std::uint64_t(kMmioHoleStart), UINT64_MAX - 0x10}) {
        img = good;
        edit_load(img, [&](Elf64_Phdr& p) { p.p_paddr = paddr; });
        expect_refused(img, "does not fit in guest RAM");
    }
    img = good;
    edit_load(img, [](Elf64_Phdr& p) { p.p_type = PT_NULL; });
    expect_refused(img, "no loadable segments");
}

TEST(PvhLoader, RefusesMissingOrBadNote) {
    Image good = make_image();
    Image img = good;
    edit_nhdr(img, [](Elf64_Nhdr& n) { n.n_type = XEN_ELFNOTE_PHYS32_ENTRY + 1; });
    expect_refused(img, "no PVH entry note");
    img = good;
    img[kNoteOff + sizeof(Elf64_Nhdr) + 2] = 'm';  // owner "Xem"
    expect_refused(img, "no PVH entry note");
    img = good;
    edit_note_ph(img, [](Elf64_Phdr& p) { p.p_type = PT_NULL; });
    expect_refused(img, "no PVH entry note");
    img = good;
    edit_note_ph(img, [](Elf64_Phdr& p) { p.p_filesz = 8; });  // too short for one header
    expect_refused(img, "no PVH entry note");
    img = good;
    edit_nhdr(img, [](Elf64_Nhdr& n) { n.n_namesz = 100; });
    expect_refused(img, "runs past its segment");
    img = good;
    edit_nhdr(img, [](Elf64_Nhdr& n) { n.n_descsz = 9; });
    expect_refused(img, "runs past its segment");
    img = good;
    edit_nhdr(img, [](Elf64_Nhdr& n) { n.n_namesz = n.n_descsz = 0xffffffff; });
    expect_refused(img, "runs past its segment");
    img = good;
    edit_note_ph(img, [&](Elf64_Phdr& p) { p.p_filesz = good.size(); });  // offset + filesz past the file
    expect_refused(img, "PT_NOTE segment runs past");
    expect_refused(make_image(2), "2-byte address");
}

TEST(PvhLoader, RefusesEntryOutsideTheImage) {
    expect_refused(make_image(8, kPaddr - 1), "outside the loaded image");
    expect_refused(make_image(8, kPaddr + kMemsz), "outside the loaded image");
    expect_refused(make_image(8, 0x100000000ull + kEntry), "outside the loaded image");
    expect_refused(make_image(8, 0), "no PVH entry note");  // 0 means "none"
}

TEST(PvhLoader, SaysWhenNeitherElfNorBzImage) {
    Image img(0x1000, 0);
    img[0] = 'M';
    img[1] = 'Z';
    expect_refused(img, "neither a PVH ELF file nor a bzImage");
}

TEST(PvhLoader, LinuxNoteMarksAVmlinux) {
    Image img = make_image();
    EXPECT_FALSE(is_linux_kernel(img));
    // Point the PT_NOTE at a note area holding a note owned by "Linux".
    Image linux_img = img;
    const std::size_t off = linux_img.size();
    Elf64_Nhdr nh{6, 4, 1};
    linux_img.resize(off + sizeof nh + 8 + 4);
    std::memcpy(linux_img.data() + off, &nh, sizeof nh);
    std::memcpy(linux_img.data() + off + sizeof nh, "Linux", 6);
    edit_note_ph(linux_img, [&](Elf64_Phdr& p) {
        p.p_offset = off;
        p.p_filesz = sizeof nh + 8 + 4;
    });
    EXPECT_TRUE(is_linux_kernel(linux_img));
    EXPECT_FALSE(is_linux_kernel(Image(10, 0)));
}

// ---- bzImage ------------------------------------------------------------------

constexpr unsigned kSetupSects = 7;                       // setup code: (7 + 1) * 512 bytes
constexpr std::size_t kSetupBytes = (kSetupSects + 1) * 512;
constexpr std::size_t kPayload = 0x3000;                 // the "compressed kernel"
constexpr std::uint32_t kInitSize = 0x200000;
constexpr std::uint64_t kBzRam = 64 << 20;

template <typename T>
void poke(Image& img, std::size_t off, T v) { std::memcpy(img.data() + off, &v, sizeof v); }

Image make_bzimage() {
    Image img(kSetupBytes + kPayload, 0);
    img[0x1f1] = kSetupSects;
    poke<std::uint32_t>(img, 0x1f4, kPayload / 16);       // syssize
    poke<std::uint16_t>(img, 0x1fe, 0xaa55);              // boot_flag
    img[0x200] = 0xeb;                                    // jmp short
    img[0x201] = 0x66;                                    // header ends at 0x268
    std::memcpy(img.data() + 0x202, "HdrS", 4);
    poke<std::uint16_t>(img, 0x206, 0x020f);              // protocol 2.15
    img[0x211] = 0x01;                                    // LOADED_HIGH
    poke<std::uint32_t>(img, 0x22c, 0x7fffffff);          // initrd_addr_max
    poke<std::uint32_t>(img, 0x230, 0x200000);            // kernel_alignment
    poke<std::uint16_t>(img, 0x236, 0x03);                // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    poke<std::uint32_t>(img, 0x238, 2047);                // cmdline_size
    poke<std::uint64_t>(img, 0x258, 0x1000000);           // pref_address: 16 MiB
    poke<std::uint32_t>(img, 0x260, kInitSize);
    for (std::size_t i = 0; i < kPayload; ++i) img[kSetupBytes + i] = static_cast<std::uint8_t>(i * 13 + 5);
    return img;
}

void expect_bz_refused(const Image& img, const std::string& what, const Image& initrd = {},
                       const std::string& cmdline = "console=ttyS0", std::uint64_t ram = kBzRam) {
    GuestMemory mem(ram, Backing::off);
    try {
        load_kernel(mem, img, initrd, cmdline, 0xe0000);
        ADD_FAILURE() << "loaded; expected refusal mentioning \"" << what << "\"";
    } catch (const UsageError& e) {
        EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
}

TEST(BzImageLoader, LoadsKernelZeroPageInitrdAndPageTables) {
    GuestMemory mem(kBzRam, Backing::off);
    Image initrd(10000, 0x5a);
    const Image img = make_bzimage();
    ASSERT_TRUE(is_bzimage(img));
    ASSERT_TRUE(is_linux_kernel(img));
    BootPlan plan = load_kernel(mem, img, initrd, "console=ttyS0 quiet", 0xe0000);
    EXPECT_EQ(plan.mode, BootPlan::Mode::linux64);
    EXPECT_EQ(plan.entry, 0x100200u);  // 64-bit entry: load address + 0x200
    EXPECT_EQ(plan.arg, kZeroPageGpa);
    // The protected-mode kernel at 1 MiB.
    EXPECT_EQ(std::memcmp(guest_bytes(mem, 0x100000, kPayload).data(), img.data() + kSetupBytes, kPayload), 0);
    // Zero page: the header copied, our fields filled.
    const std::uint64_t zp = kZeroPageGpa;
    EXPECT_EQ(peek<std::uint32_t>(mem, zp + 0x202), 0x53726448u);  // "HdrS"
    EXPECT_EQ(peek<std::uint16_t>(mem, zp + 0x206), 0x020fu);
    EXPECT_EQ(peek<std::uint8_t>(mem, zp + 0x210), 0xffu);         // type_of_loader
    EXPECT_EQ(peek<std::uint8_t>(mem, zp + 0x211), 0x81u);         // LOADED_HIGH | CAN_USE_HEAP
    EXPECT_EQ(peek<std::uint32_t>(mem, zp + 0x228), kCmdlineGpa);
    EXPECT_EQ(guest_cstr(mem, kCmdlineGpa, kCmdlineMax), "console=ttyS0 quiet");
    EXPECT_EQ(peek<std::uint64_t>(mem, zp + 0x070), 0xe0000u);     // acpi_rsdp_addr
    // The initrd: page-aligned at the top of RAM, intact.
    const std::uint32_t rd = peek<std::uint32_t>(mem, zp + 0x218);
    EXPECT_EQ(peek<std::uint32_t>(mem, zp + 0x21c), initrd.size());
    EXPECT_EQ(rd % 4096, 0u);
    EXPECT_LE(rd + initrd.size(), kBzRam);
    EXPECT_GT(rd + initrd.size() + 4096, kBzRam);
    EXPECT_GE(rd, 0x1000000u + kInitSize);  // clear of the decompressed kernel
    EXPECT_EQ(peek<std::uint8_t>(mem, rd), 0x5a);
    EXPECT_EQ(plan.initrd_gpa, rd);
    // E820: low RAM, the reserved BIOS area (with the ACPI tables), RAM from 1 MiB.
    ASSERT_EQ(peek<std::uint8_t>(mem, zp + 0x1e8), 3u);
    EXPECT_EQ(peek<std::uint64_t>(mem, zp + 0x2d0 + 8), 0x9fc00u);
    EXPECT_EQ(peek<std::uint32_t>(mem, zp + 0x2d0 + 20 + 16), 2u);
    EXPECT_EQ(peek<std::uint64_t>(mem, zp + 0x2d0 + 40), 0x100000u);
    EXPECT_EQ(peek<std::uint64_t>(mem, zp + 0x2d0 + 48), kBzRam - 0x100000);
    EXPECT_EQ(peek<std::uint32_t>(mem, zp + 0x2d0 + 56), 1u);
    // Identity page tables: PML4[0] -> PDPT -> PDs; 2 MiB pages up to 4 GiB.
    const std::uint64_t pdpt = peek<std::uint64_t>(mem, kPml4Gpa) & ~0xfffull;
    const std::uint64_t pd3 = peek<std::uint64_t>(mem, pdpt + 3 * 8) & ~0xfffull;
    EXPECT_EQ(peek<std::uint64_t>(mem, pd3 + 511 * 8), 0xffe00000ull | 0x83);
}

TEST(BzImageLoader, WithoutInitrdTheRamdiskFieldsStayZero) {
    GuestMemory mem(kBzRam, Backing::off);
    load_kernel(mem, make_bzimage(), {}, "", 0);
    EXPECT_EQ(peek<std::uint32_t>(mem, kZeroPageGpa + 0x218), 0u);
    EXPECT_EQ(peek<std::uint32_t>(mem, kZeroPageGpa + 0x21c), 0u);
}

TEST(BzImageLoader, RefusesMalformedImages) {
    const Image good = make_bzimage();
    // Truncated: the header's syssize promises more than the file has.
    expect_bz_refused(Image(good.begin(), good.end() - 16), "truncated");
    expect_bz_refused(Image(good.begin(), good.begin() + kSetupBytes), "truncated");
    expect_bz_refused(Image(good.begin(), good.begin() + 0x240), "truncated inside its setup header");
    // Wrong magic: then it is neither format.
    Image img = good;
    img[0x205] = 'X';
    expect_bz_refused(img, "neither a PVH ELF file nor a bzImage");
    img = good;
    poke<std::uint16_t>(img, 0x1fe, 0x1234);
    expect_bz_refused(img, "boot_flag");
    // Bad setup version.
    img = good;
    poke<std::uint16_t>(img, 0x206, 0x0204);
    expect_bz_refused(img, "boot protocol 2.4 is too old");
    img = good;
    img[0x211] = 0;
    expect_bz_refused(img, "zImage");
    img = good;
    poke<std::uint16_t>(img, 0x236, 0x02);
    expect_bz_refused(img, "64-bit entry");
    img = good;
    poke<std::uint32_t>(img, 0x260, 0);
    expect_bz_refused(img, "init_size");
}

TEST(BzImageLoader, RefusesWhatDoesNotFit) {
    const Image good = make_bzimage();
    // The kernel needs pref_address + init_size: 18 MiB, not in 16 MiB.
    expect_bz_refused(good, "needs 18 MiB", {}, "", 16 << 20);
    // An initrd larger than RAM, and one that would overlap the kernel.
    expect_bz_refused(good, "does not fit", Image(kBzRam + 4096, 1));
    expect_bz_refused(good, "does not fit", Image(kBzRam - (16 << 20), 1));
    // A command line longer than the kernel's cmdline_size.
    expect_bz_refused(good, "cmdline_size", {}, std::string(2048, 'x'));
    GuestMemory mem(kBzRam, Backing::off);
    EXPECT_NO_THROW(load_kernel(mem, good, {}, std::string(2047, 'x'), 0));
}

// pref_address near 2^64: pref_address + init_size wraps to a small address
// that "fits", and the kernel would be copied nowhere (or partly) and the
// guest boot zeroed memory. The loader must refuse the header instead.
TEST(BzImageLoader, RefusesPrefAddressThatWrapsWithInitSize) {
    Image img = make_bzimage();
    poke<std::uint64_t>(img, 0x258, ~std::uint64_t{0} - kInitSize + 1 + 0x100000);   // + init_size = 1 MiB (mod 2^64)
    expect_bz_refused(img, "pref_address");
    poke<std::uint64_t>(img, 0x258, ~std::uint64_t{0});
    expect_bz_refused(img, "pref_address");
    // Just below the wrap: still far beyond RAM, refused as not fitting.
    poke<std::uint64_t>(img, 0x258, std::uint64_t{1} << 40);
    expect_bz_refused(img, "raise --memory");
}

TEST(BzImageLoader, SurvivesRandomCorruption) {
    const Image good = make_bzimage();
    GuestMemory mem(kBzRam, Backing::off);
    std::mt19937 rng(777);
    unsigned loaded = 0, refused = 0;
    for (int iter = 0; iter < 4000; ++iter) {
        Image img = good;
        for (unsigned i = 0, flips = 1 + rng() % 4; i < flips; ++i) {
            std::size_t pos = 0x1f1 + rng() % (0x268 - 0x1f1);  // the header fields
            img[pos] = static_cast<std::uint8_t>(rng());
        }
        if (rng() % 16 == 0) img.resize(rng() % img.size());
        try {
            load_kernel(mem, img, {}, "console=ttyS0", 0);
            ++loaded;
        } catch (const UsageError&) {
            ++refused;
        }
    }
    EXPECT_GT(loaded, 0u);
    EXPECT_GT(refused, 0u);
}

TEST(BzImageLoader, ParsesTheInstalledDebianKernel) {
    // The host's own kernel when there is one (Debian's bzImage is what the
    // Linux kvm tests boot); a hand-made header proves the rest above.
    std::string path;
    for (const char* p : {"/boot/vmlinuz", "/vmlinuz"})
        if (::access(p, R_OK) == 0) path = p;
    if (path.empty()) GTEST_SKIP() << "no /boot/vmlinuz on this host";
    FileImage file = read_file(path, 256 << 20);
    auto image = file.bytes();
    SetupHeader h = parse_setup_header(image);
    EXPECT_GE(h.version, 0x020cu);
    GuestMemory mem(256 << 20, Backing::off);
    BootPlan plan = load_kernel(mem, image, {}, "console=ttyS0", 0xe0000);
    EXPECT_EQ(plan.entry, 0x100200u);
}

TEST(PvhLoader, SurvivesRandomCorruption) {
    const Image good = make_image();
    GuestMemory mem(kRam, Backing::off);
    std::mt19937 rng(12345);
    unsigned loaded = 0, refused = 0;
    for (int iter = 0; iter < 4000; ++iter) {
        Image img = good;
        unsigned flips = 1 + rng() % 8;
        for (unsigned i = 0; i < flips; ++i) {
            // Mostly the headers and the note, where the interesting fields are.
            std::size_t pos = rng() % 4 != 0 ? rng() % kLoadOff : rng() % img.size();
            img[pos] = static_cast<std::uint8_t>(rng() % 2 ? rng() : img[pos] ^ (1u << (rng() % 8)));
        }
        if (rng() % 16 == 0) img.resize(rng() % img.size());
        try {
            load_pvh_elf(mem, img);
            ++loaded;
        } catch (const UsageError&) {
            ++refused;
        }
    }
    EXPECT_EQ(loaded + refused, 4000u);
    EXPECT_GT(loaded, 0u);  // the corruption is not so heavy that nothing survives
    EXPECT_GT(refused, 0u);
}

TEST(PvhStartInfo, WritesStartInfoMemmapAndCmdline) {
    GuestMemory mem(64 << 20, Backing::off);
    EXPECT_EQ(write_pvh_start_info(mem, "console=ttyS0 quiet"), kStartInfoGpa);
    auto si = mem.read_obj<HvmStartInfo>(Gpa(kStartInfoGpa));
    ASSERT_TRUE(si.has_value());
    EXPECT_EQ(si->magic, 0x336ec578u);
    EXPECT_EQ(si->version, 1u);
    EXPECT_EQ(si->nr_modules, 0u);
    EXPECT_EQ(si->cmdline_paddr, kCmdlineGpa);
    EXPECT_EQ(guest_cstr(mem, kCmdlineGpa, kCmdlineMax), "console=ttyS0 quiet");
    EXPECT_EQ(si->memmap_paddr, kMemmapGpa);
    ASSERT_EQ(si->memmap_entries, 3u);
    std::vector<HvmMemmapEntry> map(3);
    ASSERT_TRUE(mem.read(Gpa(kMemmapGpa), map.data(), 3 * sizeof(HvmMemmapEntry)));
    // Contiguous from 0 to the end of RAM, with the legacy hole reserved.
    EXPECT_EQ(map[0].addr, 0u);
    EXPECT_EQ(map[0].type, 1u);
    EXPECT_EQ(map[1].addr, map[0].addr + map[0].size);
    EXPECT_EQ(map[1].type, 2u);
    EXPECT_EQ(map[2].addr, 0x100000u);
    EXPECT_EQ(map[1].addr + map[1].size, map[2].addr);
    EXPECT_EQ(map[2].addr + map[2].size, mem.size());
    EXPECT_EQ(map[2].type, 1u);
}

TEST(PvhStartInfo, MemmapCoversHighRam) {
    GuestMemory mem(4ull << 30, Backing::off);  // MAP_NORESERVE: only the low pages are touched
    write_pvh_start_info(mem, "");
    auto si = mem.read_obj<HvmStartInfo>(Gpa(kStartInfoGpa));
    ASSERT_TRUE(si.has_value());
    ASSERT_EQ(si->memmap_entries, 4u);
    auto low = mem.read_obj<HvmMemmapEntry>(Gpa(kMemmapGpa + 2 * sizeof(HvmMemmapEntry)));
    auto high = mem.read_obj<HvmMemmapEntry>(Gpa(kMemmapGpa + 3 * sizeof(HvmMemmapEntry)));
    EXPECT_EQ(low->addr + low->size, kMmioHoleStart);
    EXPECT_EQ(high->addr, kHighRamStart);
    EXPECT_EQ(high->size, (4ull << 30) - kMmioHoleStart);
    EXPECT_EQ(high->type, 1u);
    EXPECT_EQ(peek<std::uint8_t>(mem, kCmdlineGpa), 0u);  // empty cmdline: just the NUL
}

TEST(PvhStartInfo, CmdlineLimits) {
    GuestMemory mem(4 << 20, Backing::off);
    std::string longest(kCmdlineMax - 1, 'a');
    EXPECT_NO_THROW(write_pvh_start_info(mem, longest));
    EXPECT_EQ(guest_cstr(mem, kCmdlineGpa, kCmdlineMax), longest);
    EXPECT_THROW(write_pvh_start_info(mem, longest + "a"), UsageError);
    EXPECT_THROW(write_pvh_start_info(mem, std::string("a\0b", 3)), UsageError);
}

TEST(ReadFile, ReadsAndRefuses) {
    char path[] = "/tmp/kguest_loader_test_XXXXXX";
    int fd = ::mkstemp(path);
    ASSERT_GE(fd, 0);
    EXPECT_THROW(read_file(path, 100), UsageError);  // empty
    ASSERT_EQ(::write(fd, "hello", 5), 5);
    ::close(fd);
    FileImage f = read_file(path, 5);
    EXPECT_EQ(std::vector<std::uint8_t>(f.bytes().begin(), f.bytes().end()),
              (std::vector<std::uint8_t>{'h', 'e', 'l', 'l', 'o'}));
    EXPECT_THROW(read_file(path, 4), UsageError);  // larger than the limit
    EXPECT_THROW(read_file("/tmp", 100), UsageError);  // not a regular file
    ::unlink(path);
    EXPECT_THROW(read_file(path, 100), UsageError);  // gone
}

TEST(ReadFile, ReadsAFileThatCannotBeMapped) {
    // A sysfs attribute is a regular file of 4096 bytes by fstat that mmap
    // refuses (ENODEV) and read gives in full, shorter.
    const char* path = "/sys/kernel/mm/transparent_hugepage/enabled";
    int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) GTEST_SKIP() << path << ": " << std::strerror(errno);
    char want[4096];
    const ssize_t n = ::read(fd, want, sizeof want);
    ::close(fd);
    ASSERT_GT(n, 0);
    FileImage f = read_file(path, 1 << 20);
    EXPECT_EQ(std::string(f.bytes().begin(), f.bytes().end()), std::string(want, static_cast<std::size_t>(n)));
}

} // namespace
} // namespace kguest
