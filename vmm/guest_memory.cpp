// Guest RAM allocation and bounds-checked access (see guest_memory.hpp).
#include "guest_memory.hpp"
#include "error.hpp"
#include "size.hpp"

#include <cerrno>
#include <stdexcept>
#include <sys/mman.h>

#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << MAP_HUGE_SHIFT)
#endif

namespace kguest {

std::optional<Backing> parse_backing(std::string_view name) {
    if (name == "thp") return Backing::thp;
    if (name == "hugetlbfs") return Backing::hugetlbfs;
    if (name == "off") return Backing::off;
    return std::nullopt;
}

const char* backing_name(Backing b) {
    switch (b) {
    case Backing::thp: return "thp";
    case Backing::hugetlbfs: return "hugetlbfs";
    case Backing::off: return "off";
    }
    return "?";
}

namespace {

Mapping map_ram(std::uint64_t size, Backing backing) {
    const int prot = PROT_READ | PROT_WRITE;
    if (backing == Backing::hugetlbfs) {
        // hugetlb mappings are aligned to their page size by the kernel. No
        // MAP_NORESERVE here: reserving at mmap time turns "not enough huge
        // pages" into ENOMEM now instead of SIGBUS when the guest touches RAM.
        void* p = ::mmap(nullptr, size, prot,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB, -1, 0);
        if (p == MAP_FAILED) {
            int err = errno;
            if (err == ENOMEM)
                throw std::runtime_error("mmap MAP_HUGETLB: not enough 2 MiB huge pages reserved for " +
                                         format_size(size) +
                                         " (raise /proc/sys/vm/nr_hugepages or use --hugepages thp)");
            throw SysError("mmap MAP_HUGETLB", err);
        }
        return Mapping(p, size);
    }
    // Over-allocate by 2 MiB and trim both ends so the start is 2 MiB-aligned:
    // THP can only back 2 MiB-aligned virtual ranges, and matching guest-
    // physical alignment lets KVM map them with 2 MiB stage-2 pages.
    std::uint64_t span = size + kHugePageSize;
    void* p = ::mmap(nullptr, span, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw_errno("mmap guest RAM");
    auto raw = reinterpret_cast<std::uintptr_t>(p);
    std::uintptr_t aligned = (raw + kHugePageSize - 1) & ~(kHugePageSize - 1);
    if (aligned > raw) ::munmap(p, aligned - raw);
    std::uintptr_t end = raw + span, want_end = aligned + size;
    if (end > want_end) ::munmap(reinterpret_cast<void*>(want_end), end - want_end);
    Mapping m(reinterpret_cast<void*>(aligned), size);
    int advice = backing == Backing::thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE;
    if (::madvise(m.get(), size, advice) != 0)
        throw_errno(backing == Backing::thp ? "madvise MADV_HUGEPAGE" : "madvise MADV_NOHUGEPAGE");
    return m;
}

} // namespace

GuestMemory::GuestMemory(std::uint64_t size, Backing backing) : backing_(backing) {
    if (size == 0) throw std::runtime_error("guest RAM size is zero");
    if (size > (1ull << 46)) throw std::runtime_error("guest RAM size " + format_size(size) + " is too large");
    size = (size + kHugePageSize - 1) & ~(kHugePageSize - 1);
    mapping_ = map_ram(size, backing);
    std::uint64_t low = size < kMmioHoleStart ? size : kMmioHoleStart;
    regions_.push_back({0, low, 0});
    if (size > low) regions_.push_back({kHighRamStart, size - low, low});
}

std::uint8_t* GuestMemory::ptr(std::uint64_t gpa, std::uint64_t len) const {
    if (len == 0) len = 1;
    for (const auto& r : regions_) {
        // Written so that nothing overflows: gpa - r.gpa only when gpa >= r.gpa.
        if (gpa >= r.gpa && gpa - r.gpa < r.size && len <= r.size - (gpa - r.gpa))
            return host_base() + r.offset + (gpa - r.gpa);
    }
    return nullptr;
}

bool GuestMemory::read(std::uint64_t gpa, void* dst, std::uint64_t len) const {
    if (len == 0) return true;
    const std::uint8_t* p = ptr(gpa, len);
    if (p == nullptr) return false;
    std::memcpy(dst, p, len);
    return true;
}

bool GuestMemory::write(std::uint64_t gpa, const void* src, std::uint64_t len) {
    if (len == 0) return true;
    std::uint8_t* p = ptr(gpa, len);
    if (p == nullptr) return false;
    std::memcpy(p, src, len);
    return true;
}

} // namespace kguest
