// Guest RAM. One anonymous host mapping, 2 MiB-aligned so that transparent
// huge pages (or hugetlbfs pages) can back it, laid out in guest-physical
// space the way a PC expects: RAM from 0 up to the 32-bit MMIO hole, the rest
// from 4 GiB up. GuestMemory is the only way kguest code touches guest RAM, and
// every access is bounds-checked: a guest-supplied address that falls outside
// RAM, or a length that runs off the end of a region, gets nullptr/false and
// never a host pointer outside the mapping.
#pragma once

#include "devices/base/fd.hpp"

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace kguest {

enum class Backing { thp, hugetlbfs, off };
std::optional<Backing> parse_backing(std::string_view name);
const char* backing_name(Backing b);

inline constexpr std::uint64_t kHugePageSize = 2ull << 20;
// Guest-physical layout: [0, kMmioHoleStart) RAM, [kMmioHoleStart, 4 GiB) for
// devices (PCI BARs, IOAPIC 0xfec00000, LAPIC 0xfee00000), RAM again from 4 GiB.
inline constexpr std::uint64_t kMmioHoleStart = 0xc0000000;
inline constexpr std::uint64_t kHighRamStart = 0x100000000;

struct MemoryRegion {
    std::uint64_t gpa;      // guest-physical start
    std::uint64_t size;
    std::uint64_t offset;   // offset into the host mapping
};

class GuestMemory {
public:
    // Maps `size` bytes (rounded up to 2 MiB) with the given backing. Throws
    // SysError or std::runtime_error on failure, with a hint for hugetlbfs.
    GuestMemory(std::uint64_t size, Backing backing);

    std::uint64_t size() const { return mapping_.size(); }
    Backing backing() const { return backing_; }
    const std::vector<MemoryRegion>& regions() const { return regions_; }
    std::uint8_t* host_base() const { return static_cast<std::uint8_t*>(mapping_.get()); }

    // Host pointer to [gpa, gpa+len) when all of it is guest RAM in one region;
    // nullptr otherwise (including len overflow). len 0 is checked as 1 byte.
    std::uint8_t* ptr(std::uint64_t gpa, std::uint64_t len) const;
    bool contains(std::uint64_t gpa, std::uint64_t len) const { return ptr(gpa, len) != nullptr; }

    bool read(std::uint64_t gpa, void* dst, std::uint64_t len) const;
    bool write(std::uint64_t gpa, const void* src, std::uint64_t len);

    // Returns the host memory behind [gpa, gpa+len) (one RAM region) to the
    // host: the next guest access finds zeroes. madvise(MADV_DONTNEED) on
    // this private anonymous mapping; for hugetlbfs that needs Linux >= 5.18
    // and 2 MiB-aligned ranges (the freed huge pages go back to the hugetlb
    // pool, and a later touch needs a free one there again). gpa and len must
    // be 4 KiB-aligned (2 MiB with hugetlbfs) and len non-zero; false, with
    // nothing done, otherwise or when madvise fails. With THP, a range that
    // covers part of a huge page splits it (the balloon avoids that).
    bool discard(std::uint64_t gpa, std::uint64_t len);
    // Bytes of the RAM mapping (or of [gpa, gpa+len) of guest RAM, one
    // region) resident in host memory, from mincore(2): the mapping's Rss,
    // plus pages that map the shared zero page after a read fault.
    std::uint64_t resident_bytes() const;
    std::uint64_t resident_bytes(std::uint64_t gpa, std::uint64_t len) const;
    // Bytes of the RAM mapping backed by 2 MiB pages: for thp/off the sum of
    // AnonHugePages in /proc/self/smaps over the mapping's VMAs (a VMA that the
    // kernel merged with a neighbour counts at most its overlap with ours);
    // for hugetlbfs every resident byte. 0 when smaps cannot be read.
    std::uint64_t huge_backed_bytes() const;

    template <typename T>
    std::optional<T> read_obj(std::uint64_t gpa) const {
        static_assert(std::is_trivially_copyable_v<T>);
        T v;
        if (!read(gpa, &v, sizeof v)) return std::nullopt;
        return v;
    }
    template <typename T>
    bool write_obj(std::uint64_t gpa, const T& v) {
        static_assert(std::is_trivially_copyable_v<T>);
        return write(gpa, &v, sizeof v);
    }

private:
    Mapping mapping_;
    Backing backing_;
    std::vector<MemoryRegion> regions_;
};

} // namespace kguest
