// Guest RAM. One anonymous host mapping, 2 MiB-aligned so that transparent
// huge pages (or hugetlbfs pages) can back it, laid out in guest-physical
// space the way a PC expects: RAM from 0 up to the 32-bit MMIO hole, the rest
// from 4 GiB up. GuestMemory is the only way kguest code touches guest RAM, and
// every access is bounds-checked: a guest-supplied address that falls outside
// RAM, or a length that runs off the end of a region, gets nullopt/false and
// never a host pointer outside the mapping.
//
// Guest-physical addresses are a type of their own (Gpa), never a bare
// integer. A checked span of RAM inside one region is a GuestRange: a host
// pointer and a length that never leave it, with copies and naturally aligned
// 16/32/64-bit loads and stores (atomic, so that ring indexes shared with a
// running guest get the acquire/release the virtio rings need). Host pointers
// into guest RAM leave this file at exactly two audited places:
// append_iovec(), for I/O requests, and host_address_for_kvm(), for
// registering a region as a KVM memory slot.
//
// Threading: the layout is fixed at construction; every method may run on any
// thread. Guest RAM itself is shared with running vCPUs, so callers that need
// ordering use the atomic loads and stores of GuestRange.
#pragma once

#include "devices/base/fd.hpp"

#include <atomic>
#include <bit>
#include <compare>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <sys/uio.h>

static_assert(std::endian::native == std::endian::little,
              "guest RAM is read as little-endian (x86, virtio 1.x rings) with native loads");

namespace kguest {

enum class Backing { thp, hugetlbfs, off };
std::optional<Backing> parse_backing(std::string_view name);
const char* backing_name(Backing b);

inline constexpr std::uint64_t kHugePageSize = 2ull << 20;
// Guest-physical layout: [0, kMmioHoleStart) RAM, [kMmioHoleStart, 4 GiB) for
// devices (PCI BARs, IOAPIC 0xfec00000, LAPIC 0xfee00000), RAM again from 4 GiB.
inline constexpr std::uint64_t kMmioHoleStart = 0xc0000000;
inline constexpr std::uint64_t kHighRamStart = 0x100000000;

// A guest-physical address. Explicit both ways, so that it cannot be mixed up
// with a host offset, a length or a count. Adding an offset saturates: a sum
// that would wrap past 2^64 is UINT64_MAX, which is never RAM, so a hostile
// address plus a length cannot wrap back into RAM.
class Gpa {
public:
    constexpr Gpa() = default;
    constexpr explicit Gpa(std::uint64_t v) : v_(v) {}
    constexpr std::uint64_t value() const { return v_; }
    friend constexpr Gpa operator+(Gpa a, std::uint64_t off) {
        std::uint64_t r = 0;
        return Gpa(__builtin_add_overflow(a.v_, off, &r) ? UINT64_MAX : r);
    }
    friend constexpr auto operator<=>(Gpa, Gpa) = default;

private:
    std::uint64_t v_ = 0;
};

// A checked view of [gpa, gpa+size) of guest RAM, all in one region; made only
// by GuestMemory::range(). Like std::span it does not own the memory, and it
// copies as cheaply (a pointer and a length). read()/write()/fill() copy bytes
// and are false, with nothing copied, when [off, off+len) is not inside it.
// The loads and stores take a naturally aligned offset inside the view that
// kguest computed itself (a ring field, from a size it checked): one that is
// not is a kguest bug, and aborts rather than touch memory outside the view.
// They are atomic with the given order, because the guest may write the same
// field at the same time (VIRTIO 1.2 2.7.13.3: read avail->idx with acquire,
// publish used->idx with release).
class GuestRange {
public:
    using Order = std::memory_order;
    GuestRange() = default;   // empty
    std::uint64_t size() const { return size_; }

    bool read(std::uint64_t off, void* dst, std::uint64_t len) const {
        if (!fits(off, len)) return false;
        if (len != 0) std::memcpy(dst, p_ + off, len);
        return true;
    }
    bool write(std::uint64_t off, const void* src, std::uint64_t len) const {
        if (!fits(off, len)) return false;
        if (len != 0) std::memcpy(p_ + off, src, len);
        return true;
    }
    bool fill(std::uint64_t off, std::uint8_t byte, std::uint64_t len) const {
        if (!fits(off, len)) return false;
        if (len != 0) std::memset(p_ + off, byte, len);
        return true;
    }

    std::uint16_t load_le16(std::uint64_t off, Order o = kRelaxed) const { return at<std::uint16_t>(off).load(o); }
    std::uint32_t load_le32(std::uint64_t off, Order o = kRelaxed) const { return at<std::uint32_t>(off).load(o); }
    std::uint64_t load_le64(std::uint64_t off, Order o = kRelaxed) const { return at<std::uint64_t>(off).load(o); }
    void store_le16(std::uint64_t off, std::uint16_t v, Order o = kRelaxed) const { at<std::uint16_t>(off).store(v, o); }
    void store_le32(std::uint64_t off, std::uint32_t v, Order o = kRelaxed) const { at<std::uint32_t>(off).store(v, o); }
    void store_le64(std::uint64_t off, std::uint64_t v, Order o = kRelaxed) const { at<std::uint64_t>(off).store(v, o); }

private:
    friend class GuestMemory;
    static constexpr std::memory_order kRelaxed = std::memory_order_relaxed;
    GuestRange(std::uint8_t* p, std::uint64_t size) : p_(p), size_(size) {}

    bool fits(std::uint64_t off, std::uint64_t len) const { return off <= size_ && len <= size_ - off; }
    [[noreturn]] static void misuse(std::uint64_t off, std::uint64_t width, std::uint64_t size);
    template <typename T>
    std::atomic_ref<T> at(std::uint64_t off) const {
        if (!fits(off, sizeof(T)) || reinterpret_cast<std::uintptr_t>(p_ + off) % sizeof(T) != 0)
            misuse(off, sizeof(T), size_);
        return std::atomic_ref<T>(*reinterpret_cast<T*>(p_ + off));
    }

    std::uint8_t* p_ = nullptr;
    std::uint64_t size_ = 0;
};

struct MemoryRegion {
    Gpa gpa;                // guest-physical start
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

    // The view of [gpa, gpa+len) when all of it is guest RAM in one region;
    // nullopt otherwise (including len overflow). len 0 is checked as 1 byte.
    std::optional<GuestRange> range(Gpa gpa, std::uint64_t len) {
        std::uint8_t* p = find(gpa, len);
        if (p == nullptr) return std::nullopt;
        return GuestRange(p, len);
    }
    bool contains(Gpa gpa, std::uint64_t len) const { return find(gpa, len) != nullptr; }

    // Copies, false with nothing copied unless all of [gpa, gpa+len) is RAM
    // in one region (len 0 always succeeds).
    bool read(Gpa gpa, void* dst, std::uint64_t len) const { return len == 0 || view(gpa, len).read(0, dst, len); }
    bool write(Gpa gpa, const void* src, std::uint64_t len) { return len == 0 || view(gpa, len).write(0, src, len); }

    // Audited escape 1 of 2, for I/O requests (a frame handed to writev or
    // io_uring): appends the host iovec of [gpa, gpa+len) to `out` when all
    // of it is guest RAM in one region; false, with nothing appended,
    // otherwise. len 0 is checked as 1 byte and appends nothing. The iovec
    // stays valid as long as this GuestMemory.
    bool append_iovec(Gpa gpa, std::uint64_t len, std::vector<iovec>& out);
    // Audited escape 2 of 2: the host address of one of regions(), for
    // KVM_SET_USER_MEMORY_REGION. Nothing else may use it.
    void* host_address_for_kvm(const MemoryRegion& r) const { return host_base() + r.offset; }
    // Faults every page of RAM in now (MADV_POPULATE_WRITE, Linux 5.14), so
    // that a benchmark does not measure first touches; with thp they are
    // huge. Throws SysError on failure.
    void prefault();

    // Returns the host memory behind [gpa, gpa+len) (one RAM region) to the
    // host: the next guest access finds zeroes. madvise(MADV_DONTNEED) on
    // this private anonymous mapping; for hugetlbfs that needs Linux >= 5.18
    // and 2 MiB-aligned ranges (the freed huge pages go back to the hugetlb
    // pool, and a later touch needs a free one there again). gpa and len must
    // be 4 KiB-aligned (2 MiB with hugetlbfs) and len non-zero; false, with
    // nothing done, otherwise or when madvise fails. With THP, a range that
    // covers part of a huge page splits it (the balloon avoids that).
    bool discard(Gpa gpa, std::uint64_t len);
    // Bytes of the RAM mapping (or of [gpa, gpa+len) of guest RAM, one
    // region) resident in host memory, from mincore(2): the mapping's Rss,
    // plus pages that map the shared zero page after a read fault.
    std::uint64_t resident_bytes() const;
    std::uint64_t resident_bytes(Gpa gpa, std::uint64_t len) const;
    // Bytes of the RAM mapping backed by 2 MiB pages: for thp/off the sum of
    // AnonHugePages in /proc/self/smaps over the mapping's VMAs (a VMA that the
    // kernel merged with a neighbour counts at most its overlap with ours);
    // for hugetlbfs every resident byte. 0 when smaps cannot be read.
    std::uint64_t huge_backed_bytes() const;

    template <typename T>
    std::optional<T> read_obj(Gpa gpa) const {
        static_assert(std::is_trivially_copyable_v<T>);
        T v;
        if (!read(gpa, &v, sizeof v)) return std::nullopt;
        return v;
    }
    template <typename T>
    bool write_obj(Gpa gpa, const T& v) {
        static_assert(std::is_trivially_copyable_v<T>);
        return write(gpa, &v, sizeof v);
    }

private:
    std::uint8_t* host_base() const { return static_cast<std::uint8_t*>(mapping_.get()); }
    // Host address of [gpa, gpa+len) when all of it is RAM in one region;
    // nullptr otherwise. len 0 is checked as 1 byte.
    std::uint8_t* find(Gpa gpa, std::uint64_t len) const;
    // The view of [gpa, gpa+len), empty when find() fails.
    GuestRange view(Gpa gpa, std::uint64_t len) const {
        std::uint8_t* p = find(gpa, len);
        return GuestRange(p, p != nullptr ? len : 0);
    }

    Mapping mapping_;
    Backing backing_;
    std::vector<MemoryRegion> regions_;
};

} // namespace kguest
