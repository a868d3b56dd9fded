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

bool Port80::absorb_in_kernel(Vm& vm) {
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

std::uint64_t Port80::writes() {
    std::lock_guard lock(mu_);
    if (eventfd_.valid()) {
        std::uint64_t n = 0;
        // Reading an eventfd returns its counter and resets it; EAGAIN means 0.
        if (::read(eventfd_.get(), &n, sizeof n) == sizeof n) kernel_writes_ += n;
    }
    return kernel_writes_ + user_writes_.load(std::memory_order_relaxed);
}

} // namespace kguest
