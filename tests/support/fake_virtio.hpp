// The one fake virtio driver side every device test uses, with no transport
// and no KVM: a Driver that lays out one split virtqueue (VIRTIO 1.2 section
// 2.7) in a real GuestMemory and plays the guest's side of it, well-behaved
// or hostile; a Transport (VirtioTransport) that records what a device asks
// of it; an Interrupts sink (VirtioInterrupts) that records what a transport
// raises; and a clock: a polling wait and a stopwatch for latency checks.
// Header-only, in kguest::fake. Thread-safe where a device's loop thread
// calls in (Transport, Interrupts are called under the transport's lock).
#pragma once

#include "devices/virtio.hpp"
#include "devices/virtio_pci.hpp"
#include "devices/virtqueue.hpp"
#include "devices/base/guest_memory.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <gtest/gtest.h>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace kguest::fake {

struct Buf {
    std::uint64_t addr;
    std::uint32_t len;
    bool write = false;
};

// The driver side of one queue: rings at `base` (descriptor table, then the
// available ring, then the used ring at the next 4-byte boundary), data
// buffers bump-allocated from `data`.
class Driver {
public:
    Driver(GuestMemory& mem, std::uint16_t size, std::uint64_t base = 0x10000, std::uint64_t data = 0x100000)
        : mem_(mem), size_(size), desc_(base), avail_(base + 16ull * size),
          used_((avail_ + 6 + 2ull * size + 3) & ~3ull), data_(data) {
        std::vector<std::uint8_t> zero(used_ + 6 + 8ull * size - base);
        EXPECT_TRUE(mem_.write(Gpa(base), zero.data(), zero.size()));
    }

    bool configure(Virtqueue& q) const { return q.configure(size_, desc_, avail_, used_); }
    std::uint16_t size() const { return size_; }
    std::uint64_t desc() const { return desc_; }
    std::uint64_t avail() const { return avail_; }
    std::uint64_t used() const { return used_; }

    // A bump allocator for data buffers, filled with `fill`.
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

    // Raw descriptor writes (hostile rings).
    void set_desc(std::uint16_t i, std::uint64_t addr, std::uint32_t len, std::uint16_t flags,
                  std::uint16_t next = 0) {
        put_desc(desc_ + 16ull * i, {addr, len, flags, next});
    }
    void set_desc(std::uint16_t i, Descriptor d) { put_desc(desc_ + 16ull * i, d); }
    void put_desc(std::uint64_t gpa, Descriptor d) { EXPECT_TRUE(mem_.write_obj(Gpa(gpa), d)); }

    // Links `bufs` through NEXT in free descriptor slots and makes the chain
    // available (no kick); returns its head.
    std::uint16_t add_chain(const std::vector<Buf>& bufs) {
        std::uint16_t head = next_desc_;
        for (std::size_t i = 0; i < bufs.size(); ++i) {
            std::uint16_t cur = next_desc_;
            next_desc_ = static_cast<std::uint16_t>((next_desc_ + 1) % size_);
            bool last = i + 1 == bufs.size();
            set_desc(cur, bufs[i].addr, bufs[i].len,
                     static_cast<std::uint16_t>((bufs[i].write ? kVirtqDescFWrite : 0) | (last ? 0 : kVirtqDescFNext)),
                     static_cast<std::uint16_t>(last ? 0 : next_desc_));
        }
        publish(head);
        return head;
    }

    // One INDIRECT descriptor pointing at a table at `table` holding `bufs`.
    std::uint16_t add_indirect(const std::vector<Buf>& bufs, std::uint64_t table) {
        for (std::size_t i = 0; i < bufs.size(); ++i) {
            bool last = i + 1 == bufs.size();
            put_desc(table + 16 * i, {bufs[i].addr, bufs[i].len,
                                      static_cast<std::uint16_t>((bufs[i].write ? kVirtqDescFWrite : 0) |
                                                                 (last ? 0 : kVirtqDescFNext)),
                                      static_cast<std::uint16_t>(last ? 0 : i + 1)});
        }
        std::uint16_t head = next_desc_;
        next_desc_ = static_cast<std::uint16_t>((next_desc_ + 1) % size_);
        set_desc(head, table, static_cast<std::uint32_t>(16 * bufs.size()), kVirtqDescFIndirect);
        publish(head);
        return head;
    }

    // Puts `head` in the next avail slot and bumps avail->idx (release).
    void publish(std::uint16_t head) {
        EXPECT_TRUE(mem_.write_obj<std::uint16_t>(Gpa(avail_ + 4 + 2ull * (avail_idx_ % size_)), head));
        set_avail_idx(static_cast<std::uint16_t>(avail_idx_ + 1));
    }
    // The ring fields both sides may touch at any time are written and read
    // with atomic accesses, as Linux's virtio_ring does (virt_store_release,
    // READ_ONCE): the device thread reads them while the test's thread (the
    // guest) writes, which plain copies would make a data race (TSan).
    void set_avail_idx(std::uint16_t idx) {
        avail_idx_ = idx;
        store16(avail_ + 2, idx, std::memory_order_release);
    }
    std::uint16_t avail_idx() const { return avail_idx_; }
    void set_avail_flags(std::uint16_t f) { store16(avail_, f, std::memory_order_relaxed); }
    void set_used_event(std::uint16_t v) { store16(avail_ + 4 + 2ull * size_, v, std::memory_order_seq_cst); }

    std::uint16_t used_flags() const { return load16(used_, std::memory_order_relaxed); }
    std::uint16_t used_idx() const { return load16(used_ + 2, std::memory_order_acquire); }
    std::uint16_t avail_event() const { return load16(used_ + 4 + 8ull * size_, std::memory_order_seq_cst); }
    // used->ring[i % size] as {id, len}
    std::pair<std::uint32_t, std::uint32_t> used_elem(std::uint16_t i) const {
        std::uint64_t a = used_ + 4 + 8ull * (i % size_);
        return {*mem_.read_obj<std::uint32_t>(Gpa(a)), *mem_.read_obj<std::uint32_t>(Gpa(a + 4))};
    }
    // The next used element {id, len} the driver has not seen yet, if any.
    bool take_used(std::uint32_t& id, std::uint32_t& len) {
        if (used_idx() == seen_) return false;
        std::tie(id, len) = used_elem(seen_);
        ++seen_;
        return true;
    }

private:
    void store16(std::uint64_t gpa, std::uint16_t v, std::memory_order o) const {
        auto r = mem_.range(Gpa(gpa), 2);
        ASSERT_TRUE(r.has_value());
        r->store_le16(0, v, o);
    }
    std::uint16_t load16(std::uint64_t gpa, std::memory_order o) const {
        auto r = mem_.range(Gpa(gpa), 2);
        EXPECT_TRUE(r.has_value());
        return r ? r->load_le16(0, o) : 0;
    }

    GuestMemory& mem_;
    std::uint16_t size_;
    std::uint64_t desc_, avail_, used_;
    std::uint64_t data_;
    std::uint16_t next_desc_ = 0;
    std::uint16_t avail_idx_ = 0;
    std::uint16_t seen_ = 0;
};

// Records a device's requests; thread-safe (the device calls from its loop).
class Transport final : public VirtioTransport {
public:
    std::atomic<std::uint64_t> features{0};
    std::atomic<int> needs_reset_calls{0};
    std::atomic<int> config_calls{0};
    std::atomic<bool> dma{true};   // dma_enabled(): false plays bus mastering off

    void interrupt_queue(std::uint16_t q) override {
        std::lock_guard lock(mu_);
        irqs_.push_back(q);
    }
    void interrupt_config() override { ++config_calls; }
    void needs_reset() override { ++needs_reset_calls; }
    std::uint64_t driver_features() const override { return features.load(); }
    bool dma_enabled() const override { return dma.load(); }

    int interrupts(std::uint16_t q) {
        std::lock_guard lock(mu_);
        int n = 0;
        for (std::uint16_t v : irqs_) n += v == q;
        return n;
    }
    // Every queue interrupt so far, in order.
    std::vector<std::uint16_t> queue_irqs() {
        std::lock_guard lock(mu_);
        return irqs_;
    }
    void clear_irqs() {
        std::lock_guard lock(mu_);
        irqs_.clear();
    }

private:
    std::mutex mu_;
    std::vector<std::uint16_t> irqs_;
};

// Where a transport's interrupts go (the VMM's irqfds in the real thing).
struct Interrupts : VirtioInterrupts {
    std::vector<std::uint16_t> vectors;
    std::vector<bool> levels;
    bool level = false;
    void msix(std::uint16_t vector, std::uint64_t, std::uint32_t) override { vectors.push_back(vector); }
    void intx(bool l) override {
        levels.push_back(l);
        level = l;
    }
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

// How long a call takes, for latency bounds.
class Stopwatch {
public:
    std::chrono::milliseconds elapsed() const {
        return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start_);
    }
    template <typename Fn>
    static std::chrono::milliseconds time(Fn&& fn) {
        Stopwatch w;
        fn();
        return w.elapsed();
    }

private:
    std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

} // namespace kguest::fake
