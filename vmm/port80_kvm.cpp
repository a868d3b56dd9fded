// Port 0x80's in-kernel path (see port80_kvm.hpp).
#include "vmm/port80_kvm.hpp"

#include "devices/base/error.hpp"
#include "devices/base/log.hpp"
#include "vmm/kvm.hpp"

#include <unistd.h>

namespace kguest {

bool Port80Absorber::absorb(const Kvm& kvm, Vm& vm, const Vcpu& vcpu) {
    // The coalesced ring is a page of every vCPU's mapping, at the page
    // offset KVM_CAP_COALESCED_MMIO returns.
    kvm_coalesced_mmio_ring* ring = nullptr;
    const int page = kvm.check_extension(KVM_CAP_COALESCED_MMIO);
    if (kvm.check_extension(KVM_CAP_COALESCED_PIO) > 0 && page > 0 &&
        (static_cast<std::size_t>(page) + 1) * 4096 <= kvm.vcpu_mmap_size())
        ring = reinterpret_cast<kvm_coalesced_mmio_ring*>(reinterpret_cast<std::uint8_t*>(&vcpu.run_state()) +
                                                          static_cast<std::size_t>(page) * 4096);
    if (ring != nullptr) {
        try {
            // The zone covers 0x80-0x83, so that 16- and 32-bit writes at 0x80
            // fit in it; drain() counts those that start at 0x80, like write().
            vm.register_coalesced_pio(Port80::kPort, Port80::kLen);
            attach_ring(ring);
            return true;
        } catch (const SysError& e) {
            log_msg("port 0x80: coalesced PIO unavailable (%s); using an ioeventfd", e.what());
        }
    }
    Fd fd = make_eventfd();
    kvm_ioeventfd spec{};
    spec.addr = Port80::kPort;
    spec.len = 0;  // any width (KVM_CAP_IOEVENTFD_ANY_LENGTH)
    spec.fd = fd.get();
    spec.flags = KVM_IOEVENTFD_FLAG_PIO;
    try {
        vm.ioeventfd(spec);
    } catch (const SysError& e) {
        log_msg("port 0x80: in-kernel write path unavailable (%s); using userspace exits", e.what());
        return false;
    }
    eventfd_ = std::move(fd);
    port_.set_absorber([this] { sync(); });
    return true;
}

void Port80Absorber::attach_ring(kvm_coalesced_mmio_ring* ring) {
    ring_ = ring;
    port_.set_absorber([this] { sync(); });
}

// The ring (include/uapi/linux/kvm.h): KVM fills entries at `last`, we
// consume from `first`; both wrap at KVM_COALESCED_MMIO_MAX.
void Port80Absorber::drain() {
    if (ring_ == nullptr) return;
    // KVM_COALESCED_MMIO_MAX, whose PAGE_SIZE userspace lacks (x86: 4 KiB).
    constexpr std::uint32_t kMax = (4096 - sizeof(kvm_coalesced_mmio_ring)) / sizeof(kvm_coalesced_mmio);
    std::lock_guard lock(mu_);
    std::uint32_t first = __atomic_load_n(&ring_->first, __ATOMIC_RELAXED);
    std::uint32_t last = __atomic_load_n(&ring_->last, __ATOMIC_ACQUIRE);
    if (first >= kMax || last >= kMax) return;  // never from a sane KVM
    std::uint64_t n = 0;
    int code = -1;
    while (first != last) {
        const kvm_coalesced_mmio& e = ring_->coalesced_mmio[first];
        if (e.phys_addr == Port80::kPort && e.len >= 1) {
            ++n;
            code = e.data[0];
        }
        first = (first + 1) % kMax;
    }
    __atomic_store_n(&ring_->first, first, __ATOMIC_RELEASE);  // the entries are free again
    if (n != 0) port_.add_absorbed(n, code);
}

void Port80Absorber::sync() {
    drain();
    if (!eventfd_.valid()) return;
    std::lock_guard lock(mu_);
    std::uint64_t n = 0;
    // Reading an eventfd returns its counter and resets it; EAGAIN means 0.
    if (::read(eventfd_.get(), &n, sizeof n) == sizeof n) port_.add_absorbed(n, -1);
}

} // namespace kguest
