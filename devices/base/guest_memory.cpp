// Guest RAM allocation and bounds-checked access (see guest_memory.hpp).
#include "devices/base/guest_memory.hpp"
#include "devices/base/error.hpp"
#include "devices/base/log.hpp"
#include "devices/base/size.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <sys/mman.h>
#include <vector>

#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << MAP_HUGE_SHIFT)
#endif

namespace kguest {

namespace {

constexpr const char* kBackingNames[] = {"thp", "hugetlbfs", "off"};   // by Backing

// Keeps guest RAM out of the VMM's core dumps: it is the guest's data, not
// the VMM's state, and can be most of the process.
void dont_dump(const Mapping& m, std::uint64_t size) {
    if (::madvise(m.get(), size, MADV_DONTDUMP) != 0) throw_errno("madvise MADV_DONTDUMP");
}

Mapping map_ram(std::uint64_t size, Backing backing) {
    const int prot = PROT_READ | PROT_WRITE;
    if (backing == Backing::hugetlbfs) {
        // Aligned by the kernel. No MAP_NORESERVE: too few huge pages is ENOMEM
        // now instead of SIGBUS when the guest touches RAM.
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
        Mapping m(p, size);
        dont_dump(m, size);
        return m;
    }
    // Over-allocate by 2 MiB and trim both ends so the start is 2 MiB-aligned,
    // as THP (and KVM's 2 MiB stage-2 mappings) need.
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
    dont_dump(m, size);
    return m;
}

} // namespace

std::optional<Backing> parse_backing(std::string_view name) {
    for (int i = 0; i < 3; ++i)
        if (name == kBackingNames[i]) return static_cast<Backing>(i);
    return std::nullopt;
}

const char* backing_name(Backing b) { return kBackingNames[static_cast<int>(b)]; }

GuestMemory::GuestMemory(std::uint64_t size, Backing backing, std::uint64_t hotplug) : backing_(backing) {
    if (size == 0) throw std::runtime_error("guest RAM size is zero");
    if (size > (1ull << 46)) throw std::runtime_error("guest RAM size " + format_size(size) + " is too large");
    if (hotplug > (1ull << 46)) throw std::runtime_error("hotplug region " + format_size(hotplug) + " is too large");
    if (hotplug != 0 && backing == Backing::hugetlbfs)
        throw std::runtime_error("a hotplug region needs --hugepages thp or off, not hugetlbfs");
    size = (size + kHugePageSize - 1) & ~(kHugePageSize - 1);
    mapping_ = map_ram(size, backing);
    std::uint64_t low = size < kMmioHoleStart ? size : kMmioHoleStart;
    regions_.push_back({Gpa(0), low, 0});
    if (size > low) regions_.push_back({Gpa(kHighRamStart), size - low, low});
    if (hotplug != 0) {
        // Above 4 GiB and above all RAM, on a memory-block boundary.
        const std::uint64_t ram_end = regions_.back().gpa.value() + regions_.back().size;
        const std::uint64_t start = (std::max(ram_end, kHighRamStart) + kHotplugAlign - 1) & ~(kHotplugAlign - 1);
        hotplug = (hotplug + kHotplugAlign - 1) & ~(kHotplugAlign - 1);
        hotplug_mapping_ = map_ram(hotplug, backing);   // MAP_NORESERVE: host memory on first touch only
        hotplug_ = MemoryRegion{Gpa(start), hotplug, 0, true};
        hotplug_plugged_ = std::make_unique<std::atomic<std::uint64_t>[]>((hotplug_blocks() + 63) / 64);
    }
}

void GuestRange::misuse(std::uint64_t off, std::uint64_t width, std::uint64_t size) {
    log_msg("internal error: %llu-byte guest RAM access at offset %llu of a %llu-byte view (outside or misaligned)",
            static_cast<unsigned long long>(width), static_cast<unsigned long long>(off),
            static_cast<unsigned long long>(size));
    std::abort();
}

std::uint8_t* GuestMemory::find(Gpa gpa, std::uint64_t len) const {
    if (len == 0) len = 1;
    const std::uint64_t a = gpa.value();
    // Written so that nothing overflows: a - start only when a >= start.
    auto inside = [&](const MemoryRegion& r) {
        const std::uint64_t start = r.gpa.value();
        return a >= start && a - start < r.size && len <= r.size - (a - start);
    };
    for (const auto& r : regions_)
        if (inside(r)) return host_base() + r.offset + (a - r.gpa.value());
    if (hotplug_ && inside(*hotplug_))
        return static_cast<std::uint8_t*>(hotplug_mapping_.get()) + hotplug_->offset + (a - hotplug_->gpa.value());
    return nullptr;
}

bool GuestMemory::append_iovec(Gpa gpa, std::uint64_t len, std::vector<iovec>& out) {
    std::uint8_t* p = find(gpa, len);
    if (p == nullptr) return false;
    if (len != 0) out.push_back({p, len});
    return true;
}

void GuestMemory::prefault() {
    constexpr int kMadvPopulateWrite = 23;   // not in every libc's headers yet
    if (::madvise(host_base(), size(), kMadvPopulateWrite) != 0) throw_errno("madvise(MADV_POPULATE_WRITE)");
}

bool GuestMemory::discard(Gpa gpa, std::uint64_t len) {
    const std::uint64_t grain = backing_ == Backing::hugetlbfs ? kHugePageSize : 4096;
    if (len == 0 || gpa.value() % grain != 0 || len % grain != 0) return false;
    std::uint8_t* p = find(gpa, len);
    if (p == nullptr) return false;
    // Private anonymous memory: MADV_DONTNEED (MADV_REMOVE fails on it).
    return ::madvise(p, len, MADV_DONTNEED) == 0;
}

namespace {

// mincore(2) over [p, p+len), both 4 KiB-aligned, in bounded chunks.
std::uint64_t count_resident(std::uint8_t* p, std::uint64_t len) {
    constexpr std::uint64_t kPage = 4096, kChunkPages = 16384;
    std::vector<unsigned char> vec(kChunkPages);
    std::uint64_t resident = 0;
    for (std::uint64_t done = 0; done < len;) {
        const std::uint64_t n = std::min(len - done, kChunkPages * kPage);
        if (::mincore(p + done, n, vec.data()) != 0) return resident;
        const std::uint64_t pages = (n + kPage - 1) / kPage;
        for (std::uint64_t i = 0; i < pages; ++i) resident += (vec[i] & 1) != 0 ? kPage : 0;
        done += n;
    }
    return resident;
}

} // namespace

std::uint64_t GuestMemory::resident_bytes() const {
    return count_resident(host_base(), size()) +
           (hotplug_ ? count_resident(static_cast<std::uint8_t*>(hotplug_mapping_.get()), hotplug_->size) : 0);
}

std::uint64_t GuestMemory::resident_bytes(Gpa gpa, std::uint64_t len) const {
    const std::uint64_t start = gpa.value() & ~std::uint64_t{4095};
    if (len == 0 || gpa.value() - start > UINT64_MAX - len) return 0;
    const std::uint64_t span = (gpa.value() - start + len + 4095) & ~std::uint64_t{4095};
    std::uint8_t* p = find(Gpa(start), span);
    return p == nullptr ? 0 : count_resident(p, span);
}

namespace {

// AnonHugePages of the VMAs overlapping [lo, hi), from /proc/self/smaps.
std::uint64_t smaps_huge_bytes(std::uintptr_t base, std::uintptr_t end) {
    std::FILE* f = std::fopen("/proc/self/smaps", "re");
    if (f == nullptr) return 0;
    std::uint64_t total = 0, overlap = 0;
    char* line = nullptr;   // getline(3) grows it: path names have no length limit
    std::size_t cap = 0;
    while (::getline(&line, &cap, f) > 0) {
        std::uintmax_t lo = 0, hi = 0, kb = 0;
        // VMA headers start with lower-case hex, field lines with a capital.
        const char c = line[0];
        const bool header = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
        if (header && std::sscanf(line, "%jx-%jx ", &lo, &hi) == 2) {
            const std::uintptr_t a = std::max<std::uintptr_t>(lo, base), b = std::min<std::uintptr_t>(hi, end);
            overlap = a < b ? b - a : 0;
        } else if (overlap != 0 && std::sscanf(line, "AnonHugePages: %ju kB", &kb) == 1) {
            total += std::min<std::uint64_t>(kb * 1024, overlap);
        }
    }
    std::free(line);
    std::fclose(f);
    return total;
}

} // namespace

std::uint64_t GuestMemory::huge_backed_bytes() const {
    if (backing_ == Backing::hugetlbfs) return resident_bytes();
    const auto base = reinterpret_cast<std::uintptr_t>(host_base());
    std::uint64_t total = smaps_huge_bytes(base, base + size());
    if (hotplug_) {
        const auto hp = reinterpret_cast<std::uintptr_t>(hotplug_mapping_.get());
        total += smaps_huge_bytes(hp, hp + hotplug_->size);
    }
    return total;
}

std::uint64_t GuestMemory::hotplug_huge_backed_bytes() const {
    if (!hotplug_) return 0;
    const auto hp = reinterpret_cast<std::uintptr_t>(hotplug_mapping_.get());
    if (backing_ == Backing::hugetlbfs) return count_resident(reinterpret_cast<std::uint8_t*>(hp), hotplug_->size);
    return smaps_huge_bytes(hp, hp + hotplug_->size);
}

std::uint64_t GuestMemory::hotplug_resident_bytes() const {
    return hotplug_ ? count_resident(static_cast<std::uint8_t*>(hotplug_mapping_.get()), hotplug_->size) : 0;
}

GuestMemory::Usage GuestMemory::usage() const {
    std::lock_guard lock(usage_mu_);
    const auto now = std::chrono::steady_clock::now();
    if (usage_scans_.load() != 0 && now - usage_at_ < std::chrono::seconds(1)) return usage_;
    usage_scans_.fetch_add(1);
    usage_ = Usage{resident_bytes(), huge_backed_bytes(), hotplug_resident_bytes(), hotplug_huge_backed_bytes()};
    usage_at_ = std::chrono::steady_clock::now();   // after the scan: a slow scan is not repeated at once
    return usage_;
}

} // namespace kguest
