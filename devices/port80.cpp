// Port 0x80 (see port80.hpp).
#include "devices/port80.hpp"

#include <cstring>

namespace kguest {

void Port80::read(std::uint64_t offset, std::span<std::uint8_t> data) {
    if (offset == 0) reads_.fetch_add(1, std::memory_order_relaxed);
    std::memset(data.data(), 0xff, data.size());
}

void Port80::write(std::uint64_t offset, std::span<const std::uint8_t> data) {
    if (offset != 0) return;
    user_writes_.fetch_add(1, std::memory_order_relaxed);
    last_.store(data[0], std::memory_order_relaxed);
}

void Port80::add_absorbed(std::uint64_t n, int last) {
    kernel_writes_.fetch_add(n, std::memory_order_relaxed);
    if (last >= 0) last_.store(static_cast<std::uint8_t>(last), std::memory_order_relaxed);
}

std::uint64_t Port80::writes() {
    if (sync_) sync_();
    return kernel_writes_.load(std::memory_order_relaxed) + user_writes_.load(std::memory_order_relaxed);
}

} // namespace kguest
