// See setup_pages.hpp. Why it pays: kguest is one static binary of about
// 1.8 MiB of code and read-only data, and the kernel maps every cached file
// page in the 64 KiB around each fault (fault-around), so after set-up nearly
// all of it is resident although a running VM uses a fraction of it.
// Measured in the sandbox (Debian's 6.1 at init, balloon and virtio-net): the
// binary's resident pages were 1704 KiB, 1516 KiB after the unmap (fault-
// around maps most of it back), and 456 KiB with fault-around off in the
// kernel, which is what the running VM really touches. Also dropping the
// pages from the page cache (POSIX_FADV_DONTNEED, MADV_RANDOM) got 1292 KiB,
// but every later fault then read the binary again: in the sandbox, where it
// sits on a 9p share, KvmGuest.IdleGuestBlocksInTheKernel's VMM went from
// under 0.3 to 0.33-0.35 of a CPU. So the pages stay cached.
#include "vmm/app/setup_pages.hpp"
#include "devices/base/log.hpp"

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <link.h>
#include <malloc.h>
#include <sys/mman.h>
#include <unistd.h>

namespace kguest {

namespace {

// dl_iterate_phdr's callback: the first object is the executable itself.
int drop_read_only_segments(dl_phdr_info* info, std::size_t, void*) {
    const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    for (unsigned i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        // Only segments never written: not the data segment, whose read-only
        // part (RELRO: the GOT, written by start-up's IRELATIVE relocations)
        // holds private copies that MADV_DONTNEED would throw away.
        if (ph.p_type != PT_LOAD || (ph.p_flags & PF_W) != 0) continue;
        // Whole pages inside the segment only, so no page shared with a
        // writable segment is touched.
        const std::uintptr_t start = (info->dlpi_addr + ph.p_vaddr + page - 1) & ~(page - 1);
        const std::uintptr_t end = (info->dlpi_addr + ph.p_vaddr + ph.p_memsz) & ~(page - 1);
        if (end > start && ::madvise(reinterpret_cast<void*>(start), end - start, MADV_DONTNEED) != 0)
            log_msg("madvise(MADV_DONTNEED) on kguest's own code: %s (errno %d)", std::strerror(errno), errno);
    }
    return 1;   // the executable only
}

} // namespace

void drop_setup_pages() {
    ::dl_iterate_phdr(drop_read_only_segments, nullptr);
    ::malloc_trim(0);   // returns free heap pages (MADV_DONTNEED inside the heap)
}

} // namespace kguest
