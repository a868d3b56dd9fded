// Guest RAM. One anonymous host mapping, 2 MiB-aligned so that transparent
// huge pages (or hugetlbfs pages) can back it, laid out the way a PC expects:
// RAM from 0 up to the 32-bit MMIO hole, the rest from 4 GiB up. Optionally a
// hotplug region (virtio-mem, devices/virtio_mem.hpp) above all RAM: a second
// mapping, reserved lazily (MAP_NORESERVE), that KVM maps and devices reach
// like RAM but that is not RAM for E820 (regions() leaves it out). GuestMemory
// is the only way kguest code touches guest RAM, and every access is
// bounds-checked: an address outside RAM, or a length running off the end of
// a region, gets nullopt/false, never a host pointer outside the mapping.
//
// Guest-physical addresses are a type of their own (Gpa). A checked span of
// RAM inside one region is a GuestRange. Host pointers into guest RAM leave
// this file at exactly two audited places: append_iovec() and
// host_address_for_kvm().
//
// Threading: the layout is fixed at construction; every method may run on any
// thread. Callers that need ordering against running vCPUs use the atomic
// loads and stores of GuestRange.
#pragma once

#include "devices/base/fd.hpp"

#include <atomic>
#include <bit>
#include <chrono>
#include <compare>
#include <memory>
#include <cstdint>
#include <cstring>
#include <mutex>
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
// The hotplug region starts and ends on this boundary: Linux adds hot-plugged
// memory in memory blocks, 128 MiB on x86 (memory_block_size_bytes()), and
// warns that an unaligned start or end leaves memory unusable.
inline constexpr std::uint64_t kHotplugAlign = 128ull << 20;

// A guest-physical address, explicit both ways. Adding an offset saturates at
// UINT64_MAX (never RAM), so a hostile address plus a length cannot wrap.
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

// A checked, non-owning view of [gpa, gpa+size) of guest RAM in one region,
// made only by GuestMemory::range(). read()/write()/fill() are false, with
// nothing copied, when [off, off+len) is not inside it. The loads and stores
// take a naturally aligned offset inside the view (anything else is a kguest
// bug and aborts) and are atomic with the given order, since the guest may
// write the same field at the same time (VIRTIO 1.2 2.7.13.3).
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
    std::uint64_t offset;   // offset into the host mapping (the hotplug one for the hotplug region)
    bool hotplug = false;   // the hotplug region: mapped, but not RAM for E820
};

class GuestMemory {
public:
    // Maps `size` bytes of RAM (rounded up to 2 MiB) and, when `hotplug` is
    // non-zero, a hotplug region of `hotplug` bytes rounded up to
    // kHotplugAlign, at the first kHotplugAlign boundary above 4 GiB and
    // above all RAM. The hotplug region needs THP or 4 KiB backing (with
    // hugetlbfs the pool would be charged on a guest's first touch, and a
    // touch beyond the pool is SIGBUS). Throws on failure.
    GuestMemory(std::uint64_t size, Backing backing, std::uint64_t hotplug = 0);

    std::uint64_t size() const { return mapping_.size(); }   // RAM only
    Backing backing() const { return backing_; }
    // The RAM regions (E820 RAM), low then high.
    const std::vector<MemoryRegion>& regions() const { return regions_; }
    // The hotplug region, or null.
    const MemoryRegion* hotplug_region() const { return hotplug_ ? &*hotplug_ : nullptr; }
    // The hotplug region's 2 MiB blocks (kHugePageSize each) and which of
    // them are plugged. The virtio-mem device is the only writer (from its
    // loop thread); anything else may read it from any thread to tell
    // hot-added memory the guest may use from memory it may not (the balloon
    // accepts pages of plugged blocks only) without knowing that device.
    // Reads of a block past the end say unplugged; writes to one are ignored.
    std::uint64_t hotplug_blocks() const { return hotplug_ ? hotplug_->size / kHugePageSize : 0; }
    bool hotplug_block_plugged(std::uint64_t block) const {
        return block < hotplug_blocks() &&
               (hotplug_plugged_[block / 64].load(std::memory_order_relaxed) >> (block % 64) & 1) != 0;
    }
    void set_hotplug_block_plugged(std::uint64_t block, bool plugged) {
        if (block >= hotplug_blocks()) return;
        const std::uint64_t bit = std::uint64_t{1} << (block % 64);
        if (plugged)
            hotplug_plugged_[block / 64].fetch_or(bit, std::memory_order_relaxed);
        else
            hotplug_plugged_[block / 64].fetch_and(~bit, std::memory_order_relaxed);
    }

    // "RAM" below includes the hotplug region: devices may find buffers there.
    // The view of [gpa, gpa+len) when it is RAM in one region (len 0: 1 byte).
    std::optional<GuestRange> range(Gpa gpa, std::uint64_t len) {
        std::uint8_t* p = find(gpa, len);
        if (p == nullptr) return std::nullopt;
        return GuestRange(p, len);
    }
    bool contains(Gpa gpa, std::uint64_t len) const { return find(gpa, len) != nullptr; }

    // Copies; false, copying nothing, unless it is all RAM in one region.
    bool read(Gpa gpa, void* dst, std::uint64_t len) const { return len == 0 || view(gpa, len).read(0, dst, len); }
    bool write(Gpa gpa, const void* src, std::uint64_t len) { return len == 0 || view(gpa, len).write(0, src, len); }

    // Audited escape 1 of 2, for I/O requests: appends the host iovec of
    // [gpa, gpa+len) when it is RAM in one region (len 0 appends nothing).
    bool append_iovec(Gpa gpa, std::uint64_t len, std::vector<iovec>& out);
    // Audited escape 2 of 2, for KVM_SET_USER_MEMORY_REGION only.
    void* host_address_for_kvm(const MemoryRegion& r) const {
        return (r.hotplug ? static_cast<std::uint8_t*>(hotplug_mapping_.get()) : host_base()) + r.offset;
    }
    // Faults every page in now (MADV_POPULATE_WRITE, Linux 5.14), so that a
    // benchmark does not measure first touches (RAM only). Throws SysError.
    void prefault();

    // Returns the host memory behind [gpa, gpa+len) (one RAM region) to the
    // host: the next guest access finds zeroes (MADV_DONTNEED; hugetlbfs
    // needs Linux >= 5.18). gpa and len must be 4 KiB-aligned (2 MiB with
    // hugetlbfs), len non-zero; false, with nothing done, otherwise or when
    // madvise fails. Part of a THP huge page splits it.
    bool discard(Gpa gpa, std::uint64_t len);
    // Resident host bytes of RAM and the hotplug region (or of [gpa,
    // gpa+len)), from mincore(2).
    std::uint64_t resident_bytes() const;
    std::uint64_t resident_bytes(Gpa gpa, std::uint64_t len) const;
    // Bytes backed by 2 MiB pages: AnonHugePages of our VMAs in smaps
    // (hugetlbfs: every resident byte); 0 when smaps cannot be read.
    std::uint64_t huge_backed_bytes() const;
    // Both of the above, and the same two for the hotplug region alone (0
    // without one), as vm.info reports them: scanned at most once a second
    // (mincore over all of RAM and a parse of smaps cost milliseconds per GiB,
    // and any local client may ask in a loop), so an answer may be up to a
    // second old.
    struct Usage {
        std::uint64_t resident_bytes = 0, huge_backed_bytes = 0;
        std::uint64_t hotplug_resident_bytes = 0, hotplug_huge_backed_bytes = 0;
    };
    Usage usage() const;
    // How many times usage() scanned the mapping and smaps.
    std::uint64_t usage_scans() const { return usage_scans_.load(); }

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
    // The hotplug region alone (0 without one), for usage().
    std::uint64_t hotplug_resident_bytes() const;
    std::uint64_t hotplug_huge_backed_bytes() const;
    std::uint8_t* host_base() const { return static_cast<std::uint8_t*>(mapping_.get()); }
    // Host address of [gpa, gpa+len) when it is RAM in one region, else null.
    std::uint8_t* find(Gpa gpa, std::uint64_t len) const;
    GuestRange view(Gpa gpa, std::uint64_t len) const {
        std::uint8_t* p = find(gpa, len);
        return GuestRange(p, p != nullptr ? len : 0);
    }

    Mapping mapping_;
    Mapping hotplug_mapping_;
    Backing backing_;
    std::vector<MemoryRegion> regions_;
    std::optional<MemoryRegion> hotplug_;
    std::unique_ptr<std::atomic<std::uint64_t>[]> hotplug_plugged_;   // hotplug_blocks() bits, all 0 at first
    mutable std::atomic<std::uint64_t> usage_scans_{0};
    mutable std::mutex usage_mu_;   // guards the cached usage() answer
    mutable Usage usage_;
    mutable std::chrono::steady_clock::time_point usage_at_{};
};

} // namespace kguest
