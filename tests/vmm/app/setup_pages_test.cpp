// drop_setup_pages() on the test binary itself: the executable's code leaves
// the resident set, and the code that runs afterwards faults back in.
#include "tests/support/process.hpp"
#include "vmm/app/setup_pages.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>
#include <link.h>
#include <unistd.h>

namespace kguest {
namespace {

// Rss (KiB) of the executable's code mapping, from /proc/self/smaps.
std::uint64_t exe_code_rss_kib() {
    char exe[4096];
    ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) return 0;
    const std::string path(exe, static_cast<std::size_t>(n));
    std::istringstream smaps(test::slurp("/proc/self/smaps"));
    std::string line;
    bool in_code = false;
    std::uintmax_t lo, hi, kib = 0, v;
    char perms[5];
    while (std::getline(smaps, line)) {
        if (std::sscanf(line.c_str(), "%jx-%jx %4s", &lo, &hi, perms) == 3)   // a mapping's first line
            in_code = std::strcmp(perms, "r-xp") == 0 && line.size() > path.size() &&
                      line.compare(line.size() - path.size(), path.size(), path) == 0;
        else if (in_code && std::sscanf(line.c_str(), "Rss: %ju kB", &v) == 1)
            kib += v;
    }
    return kib;
}

// Reads one byte of every page of the executable's code, so all of it is
// resident before the drop whatever this test process ran so far.
int touch_code(dl_phdr_info* info, std::size_t, void*) {
    for (unsigned i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type != PT_LOAD || (ph.p_flags & PF_X) == 0) continue;
        const auto* p = reinterpret_cast<const volatile unsigned char*>(info->dlpi_addr + ph.p_vaddr);
        for (std::size_t off = 0; off < ph.p_memsz; off += 4096) (void)p[off];
    }
    return 1;
}

TEST(SetupPages, CodeLeavesTheResidentSetAndStillRuns) {
    ::dl_iterate_phdr(touch_code, nullptr);
    const std::uint64_t before = exe_code_rss_kib();
    drop_setup_pages();
    const std::uint64_t after = exe_code_rss_kib();   // runs code that was just dropped
    RecordProperty("code_rss_kib_before", static_cast<int>(before));
    RecordProperty("code_rss_kib_after", static_cast<int>(after));
    EXPECT_GT(before, 1024u);
    EXPECT_LT(after * 4, before) << before << " KiB before, " << after << " KiB after";
}

} // namespace
} // namespace kguest
