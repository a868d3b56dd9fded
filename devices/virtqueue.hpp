// The split virtqueue (VIRTIO 1.2 section 2.7), device side, shared by the
// virtio-pci devices. The driver lays out three rings in guest RAM: the
// descriptor table, the available ring (driver → device) and the used ring
// (device → driver). pop() takes the next available descriptor chain and
// validates all of it before the device sees any of it: indexes, loops,
// indirect tables, buffer bounds and the order of readable and writable
// buffers. Everything the guest wrote is hostile input, so a malformed chain
// never crashes or hangs the host; it puts the queue into an error state that
// lasts until reset(), and the device logs the reason once and sets
// DEVICE_NEEDS_RESET. Guest RAM is reached only through GuestMemory; the three
// rings are resolved to GuestRange views once, with their full length checked,
// when the driver enables the queue.
#pragma once

#include "devices/base/error.hpp"
#include "devices/base/guest_memory.hpp"

#include <cstdint>
#include <span>
#include <vector>

namespace kguest {

// 2.7.5: descriptor flags.
inline constexpr std::uint16_t kVirtqDescFNext = 1;
inline constexpr std::uint16_t kVirtqDescFWrite = 2;
inline constexpr std::uint16_t kVirtqDescFIndirect = 4;
// 2.7.6 / 2.7.8: ring flags.
inline constexpr std::uint16_t kVirtqAvailFNoInterrupt = 1;
inline constexpr std::uint16_t kVirtqUsedFNoNotify = 1;
// 2.7: "Queue Size ... maximum Queue Size value is 32768".
inline constexpr std::uint16_t kVirtqMaxSize = 32768;

// 2.7.5: one descriptor table entry, little-endian in guest RAM.
struct Descriptor {
    std::uint64_t addr;
    std::uint32_t len;
    std::uint16_t flags;
    std::uint16_t next;
};
static_assert(sizeof(Descriptor) == 16);

// One guest buffer of a chain, already checked to lie inside guest RAM.
struct DescChainElem {
    Gpa addr;
    std::uint32_t len;
    bool write;   // device-writable
};

// A validated descriptor chain: the device-readable buffers, then the
// device-writable ones (2.7.4.2), seen as two byte streams.
class DescChain {
public:
    std::uint16_t head() const { return head_; }
    std::span<const DescChainElem> elems() const { return elems_; }
    std::uint64_t readable_len() const { return readable_len_; }
    std::uint64_t writable_len() const { return writable_len_; }

    // Gather `len` bytes at `offset` of the readable part into `dst`, or
    // scatter `src` into the writable part. False, with nothing copied, when
    // [offset, offset+len) runs past the end of that part.
    bool read(const GuestMemory& mem, std::uint64_t offset, void* dst, std::uint64_t len) const;
    bool write(GuestMemory& mem, std::uint64_t offset, const void* src, std::uint64_t len) const;

private:
    friend class Virtqueue;
    void clear();

    std::uint16_t head_ = 0;
    std::vector<DescChainElem> elems_;
    std::uint64_t readable_len_ = 0;
    std::uint64_t writable_len_ = 0;
};

enum class PopStatus { empty, ok, error };

class Virtqueue {
public:
    explicit Virtqueue(GuestMemory& mem) : mem_(mem) {}

    // Negotiated features that change the ring format or rules; set them
    // before configure(). reset() clears them.
    void set_event_idx(bool on) { event_idx_ = on; }         // VIRTIO_F_EVENT_IDX (2.7.10)
    void set_indirect(bool on) { indirect_ = on; }           // VIRTIO_F_INDIRECT_DESC (2.7.5.3)

    // The driver enabled the queue (queue_enable = 1): check the size (a power
    // of 2, 1..32768), the alignment of each ring (2.7: desc 16, avail 2,
    // used 4) and that each ring lies entirely in guest RAM. On success the
    // queue is ready with both indexes at 0; on failure it stays not ready and
    // error() says why. A failed queue refuses until reset().
    bool configure(std::uint16_t size, std::uint64_t desc_gpa, std::uint64_t avail_gpa,
                   std::uint64_t used_gpa);
    // Back to the state after construction: not ready, no error, no features.
    void reset();

    bool ready() const { return ready_; }
    bool failed() const { return failed_; }
    GuestError error() const { return {reason_}; }
    std::uint16_t size() const { return size_; }
    std::uint16_t last_avail_idx() const { return last_avail_; }
    std::uint16_t used_idx() const { return used_idx_; }

    // Takes the next available chain into `out`. `empty` when the driver has
    // made nothing new available (or the queue is not ready); `error` on a
    // malformed ring or chain (`out` then holds nothing useful), and on every
    // call after that until reset().
    PopStatus pop(DescChain& out);

    // 2.7.8: hands chain `head` back with `written` bytes written into it and
    // publishes the new used index (release). False if the queue is not
    // usable or `head` is out of range.
    bool push_used(std::uint16_t head, std::uint32_t written);

    // 2.7.7.2 / 2.7.10: whether the driver wants an interrupt for the used
    // buffers pushed since the previous call.
    bool needs_notification();

    // Driver → device notification suppression (2.7.7.1 / 2.7.10). While
    // processing, disable_notifications(); when pop() runs dry,
    // enable_notifications(), which returns true if buffers arrived in the
    // meantime (the caller must pop again, closing the race).
    void disable_notifications();
    bool enable_notifications();
    // The step every queue service uses: pop(); when the queue is empty,
    // re-enable notifications and re-check once (2.7.10: a buffer made
    // available before the driver saw the re-enabled notifications would
    // otherwise wait for a kick that never comes), disabling them again when
    // something did arrive. `empty` leaves notifications enabled.
    PopStatus pop_or_enable_notifications(DescChain& out);

    // One service pass, the shape of every queue handler: with driver
    // notifications off, hands up to `budget` chains to handle(chain) in
    // ring order. `more`: the budget ran out (come back after the other
    // queues, so a guest that keeps republishing buffers cannot pin the
    // thread); `done`: the ring ran dry (notifications re-enabled, race-free);
    // `stopped`: handle() returned false (it reported why); `error`: a
    // malformed ring (error() says why).
    enum class Pass { done, more, stopped, error };
    template <typename Fn>
    Pass service(int budget, Fn&& handle) {
        disable_notifications();
        DescChain chain;
        for (int n = 0; n < budget; ++n) {
            const PopStatus st = pop_or_enable_notifications(chain);
            if (st != PopStatus::ok) return st == PopStatus::empty ? Pass::done : Pass::error;
            if (!handle(chain)) return Pass::stopped;
        }
        return Pass::more;
    }
    // With EVENT_IDX: avail_event = last_avail_idx, i.e. "notify me when you
    // make the next buffer available".
    void set_avail_event();

private:
    PopStatus fail(const char* reason);
    std::uint16_t avail_idx() const;   // acquire load of avail->idx
    bool add_buffer(DescChain& out, const Descriptor& d, std::uint64_t& total);

    GuestMemory& mem_;
    bool event_idx_ = false;
    bool indirect_ = false;
    bool ready_ = false;
    bool failed_ = false;
    const char* reason_ = "";
    std::uint16_t size_ = 0;
    GuestRange desc_;    // full ring lengths checked by configure()
    GuestRange avail_;
    GuestRange used_;
    std::uint16_t last_avail_ = 0;
    std::uint16_t used_idx_ = 0;
    std::uint16_t signalled_used_ = 0;   // used_idx_ at the last needs_notification()
    bool signalled_valid_ = false;
};

} // namespace kguest
