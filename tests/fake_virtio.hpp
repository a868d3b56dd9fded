// Test helpers for virtio devices driven without a transport or KVM: a fake
// driver that lays out one split virtqueue (VIRTIO 1.2 section 2.7) in a real
// GuestMemory and plays the guest's side of it, a fake VirtioTransport that
// records what the device asks of it, and a polling wait. Header-only, in
// kguest::fake, for tests/virtio_net_test.cpp and later device tests.
#pragma once

#include "devices/virtio.hpp"
#include "devices/virtqueue.hpp"
#include "devices/base/guest_memory.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <gtest/gtest.h>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace kguest::fake {

struct Buf {
    std::uint64_t addr;
    std::uint32_t len;
    bool write = false;
};

// The driver side of one queue: rings at `base`, data buffers bump-allocated
// from `data`.
class Driver {
public:
    Driver(GuestMemory& mem, std::uint16_t size, std::uint64_t base, std::uint64_t data)
        : mem_(mem), size_(size), desc_(base), avail_(base + 16ull * size),
          used_((avail_ + 6 + 2ull * size + 3) & ~3ull), data_(data) {
        std::vector<std::uint8_t> zero(used_ + 6 + 8ull * size - base);
        EXPECT_TRUE(mem_.write(Gpa(base), zero.data(), zero.size()));
    }

    bool configure(Virtqueue& q) const { return q.configure(size_, desc_, avail_, used_); }
    std::uint16_t size() const { return size_; }

    std::uint64_t alloc(std::uint32_t len, std::uint8_t fill = 0) {
        std::uint64_t a = data_;
        data_ += (len + 15) & ~15u;
        std::vector<std::uint8_t> v(len, fill);
        EXPECT_TRUE(mem_.write(Gpa(a), v.data(), len));
        return a;
    }
    std::uint64_t alloc_bytes(const std::vector<std::uint8_t>& bytes) {
        std::uint64_t a = alloc(static_cast<std::uint32_t>(bytes.size()));
        EXPECT_TRUE(mem_.write(Gpa(a), bytes.data(), bytes.size()));
        return a;
    }

    // Links `bufs` through NEXT in free descriptor slots and makes the chain
    // available (no kick); returns its head.
    std::uint16_t add_chain(const std::vector<Buf>& bufs) {
        std::uint16_t head = next_desc_;
        for (std::size_t i = 0; i < bufs.size(); ++i) {
            std::uint16_t cur = next_desc_;
            next_desc_ = static_cast<std::uint16_t>((next_desc_ + 1) % size_);
            bool last = i + 1 == bufs.size();
            Descriptor d{bufs[i].addr, bufs[i].len,
                         static_cast<std::uint16_t>((bufs[i].write ? kVirtqDescFWrite : 0) | (last ? 0 : kVirtqDescFNext)),
                         static_cast<std::uint16_t>(last ? 0 : next_desc_)};
            EXPECT_TRUE(mem_.write_obj(Gpa(desc_ + 16ull * cur), d));
        }
        publish(head);
        return head;
    }
    void publish(std::uint16_t head) {
        EXPECT_TRUE(mem_.write_obj<std::uint16_t>(Gpa(avail_ + 4 + 2ull * (avail_idx_ % size_)), head));
        ++avail_idx_;
        std::atomic_thread_fence(std::memory_order_release);
        EXPECT_TRUE(mem_.write_obj(Gpa(avail_ + 2), avail_idx_));
    }

    std::uint16_t used_idx() const {
        std::atomic_thread_fence(std::memory_order_acquire);
        return *mem_.read_obj<std::uint16_t>(Gpa(used_ + 2));
    }
    // used->ring[i % size] as {id, len}
    std::pair<std::uint32_t, std::uint32_t> used_elem(std::uint16_t i) const {
        std::uint64_t a = used_ + 4 + 8ull * (i % size_);
        return {*mem_.read_obj<std::uint32_t>(Gpa(a)), *mem_.read_obj<std::uint32_t>(Gpa(a + 4))};
    }

private:
    GuestMemory& mem_;
    std::uint16_t size_;
    std::uint64_t desc_, avail_, used_;
    std::uint64_t data_;
    std::uint16_t next_desc_ = 0;
    std::uint16_t avail_idx_ = 0;
};

// Records the device's requests; thread-safe (the device calls from its loop).
class Transport final : public VirtioTransport {
public:
    std::atomic<std::uint64_t> features{0};
    std::atomic<int> needs_reset_calls{0};
    std::atomic<int> config_calls{0};

    void interrupt_queue(std::uint16_t q) override {
        std::lock_guard lock(mu_);
        irqs_.push_back(q);
    }
    void interrupt_config() override { ++config_calls; }
    void needs_reset() override { ++needs_reset_calls; }
    std::uint64_t driver_features() const override { return features.load(); }

    int interrupts(std::uint16_t q) {
        std::lock_guard lock(mu_);
        int n = 0;
        for (std::uint16_t v : irqs_) n += v == q;
        return n;
    }

private:
    std::mutex mu_;
    std::vector<std::uint16_t> irqs_;
};

// Polls `pred` every millisecond for up to `ms`.
inline bool wait_until(const std::function<bool()>& pred, int ms = 5000) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (!pred()) {
        if (std::chrono::steady_clock::now() > end) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
}

} // namespace kguest::fake
