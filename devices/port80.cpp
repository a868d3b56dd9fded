// Port 0x80 (see port80.hpp).
#include "port80.hpp"
#include "vmm/error.hpp"
#include "vmm/kvm.hpp"
#include "vmm/log.hpp"

#include <cerrno>
#include <cstring>
#include <sys/eventfd.h>
#include <unistd.h>

namespace kguest {

void Port80::read(std::uint64_t offset, std::span<std::uint8_t> data) {
    if (offset == 0) reads_.fetch_add(1, std::memory_order_relaxed);
    std::memset(data.data(), kReadValue, data.size());
}

void Port80::write(std::uint64_t offset, std::span<const std::uint8_t> data) {
    if (offset != 0) return;
    user_writes_.fetch_add(1, std::memory_order_relaxed);
    last_.store(data[0], std::memory_order_relaxed);
}

bool Port80::absorb_in_kernel(Vm& vm, kvm_coalesced_mmio_ring* ring) {
    if (ring != nullptr) {
        try {
            // The zone covers 0x80-0x83, so that 16- and 32-bit writes at 0x80
            // fit in it; drain() counts those that start at 0x80, like write().
            vm.register_coalesced_pio(kPort, kLen);
            attach_ring(ring);
            return true;
        } catch (const SysError& e) {
            log_msg("port 0x80: coalesced PIO unavailable (%s); using an ioeventfd", e.what());
        }
    }
    int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (efd < 0) throw_errno("eventfd");
    Fd fd(efd);
    kvm_ioeventfd spec{};
    spec.addr = kPort;
    spec.len = 0;  // any width (KVM_CAP_IOEVENTFD_ANY_LENGTH)
    spec.fd = efd;
    spec.flags = KVM_IOEVENTFD_FLAG_PIO;
    try {
        vm.ioeventfd(spec);
    } catch (const SysError& e) {
        log_msg("port 0x80: in-kernel write path unavailable (%s); using userspace exits", e.what());
        return false;
    }
    eventfd_ = std::move(fd);
    return true;
}

// The ring (include/uapi/linux/kvm.h): KVM fills entries at `last`, we
// consume from `first`; both wrap at KVM_COALESCED_MMIO_MAX.
void Port80::drain() {
    if (ring_ == nullptr) return;
    // KVM_COALESCED_MMIO_MAX, whose PAGE_SIZE userspace lacks (x86: 4 KiB).
    constexpr std::uint32_t kMax = (4096 - sizeof(kvm_coalesced_mmio_ring)) / sizeof(kvm_coalesced_mmio);
    std::lock_guard lock(mu_);
    std::uint32_t first = __atomic_load_n(&ring_->first, __ATOMIC_RELAXED);
    std::uint32_t last = __atomic_load_n(&ring_->last, __ATOMIC_ACQUIRE);
    if (first >= kMax || last >= kMax) return;  // never from a sane KVM
    while (first != last) {
        const kvm_coalesced_mmio& e = ring_->coalesced_mmio[first];
        if (e.phys_addr == kPort && e.len >= 1) {
            ++kernel_writes_;
            last_.store(e.data[0], std::memory_order_relaxed);
        }
        first = (first + 1) % kMax;
    }
    __atomic_store_n(&ring_->first, first, __ATOMIC_RELEASE);  // the entries are free again
}

std::uint64_t Port80::writes() {
    drain();
    std::lock_guard lock(mu_);
    if (eventfd_.valid()) {
        std::uint64_t n = 0;
        // Reading an eventfd returns its counter and resets it; EAGAIN means 0.
        if (::read(eventfd_.get(), &n, sizeof n) == sizeof n) kernel_writes_ += n;
    }
    return kernel_writes_ + user_writes_.load(std::memory_order_relaxed);
}

} // namespace kguest
