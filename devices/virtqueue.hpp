// The split virtqueue (VIRTIO 1.2 section 2.7), device side: the descriptor
// table, the available ring (driver → device) and the used ring (device →
// driver) in guest RAM. pop() validates a whole chain before the device sees
// any of it: indexes, loops, indirect tables, buffer bounds and the order of
// readable and writable buffers. A malformed chain puts the queue into an
// error state until reset(); the device logs it and sets DEVICE_NEEDS_RESET.
// The rings are resolved to GuestRange views, fully checked, when the driver
// enables the queue.
#pragma once

#include "devices/base/error.hpp"
#include "devices/base/guest_memory.hpp"

#include <cstdint>
#include <span>
#include <vector>

namespace kguest {

// 2.7.5: descriptor flags.
inline constexpr std::uint16_t kVirtqDescFNext = 1, kVirtqDescFWrite = 2, kVirtqDescFIndirect = 4;
// 2.7.6 / 2.7.8: ring flags.
inline constexpr std::uint16_t kVirtqAvailFNoInterrupt = 1, kVirtqUsedFNoNotify = 1;
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

    // Gather from the readable part, or scatter into the writable part;
    // false, with nothing copied, when the range runs past its end.
    bool read(const GuestMemory& mem, std::uint64_t offset, void* dst, std::uint64_t len) const;
    bool write(GuestMemory& mem, std::uint64_t offset, const void* src, std::uint64_t len) const;
    // The host iovecs of [offset, offset+len) of the readable (or writable)
    // part, appended to `out`, for I/O straight into or out of guest RAM (no
    // copy); false, with `out` unchanged, when the range runs past its end.
    bool append_iovecs(GuestMemory& mem, bool writable, std::uint64_t offset, std::uint64_t len,
                       std::vector<iovec>& out) const;

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

    // Negotiated features; set before configure(), cleared by reset().
    void set_event_idx(bool on) { event_idx_ = on; }         // VIRTIO_F_EVENT_IDX (2.7.10)
    void set_indirect(bool on) { indirect_ = on; }           // VIRTIO_F_INDIRECT_DESC (2.7.5.3)

    // The driver enabled the queue: checks size, alignment and that the rings
    // lie in guest RAM; ready with both indexes at 0, or error() says why.
    bool configure(std::uint16_t size, std::uint64_t desc_gpa, std::uint64_t avail_gpa,
                   std::uint64_t used_gpa);
    void reset();   // not ready, no error, no features

    bool ready() const { return ready_; }
    bool failed() const { return failed_; }
    GuestError error() const { return {reason_}; }
    std::uint16_t size() const { return size_; }
    std::uint16_t last_avail_idx() const { return last_avail_; }
    std::uint16_t used_idx() const { return used_idx_; }

    // Takes the next available chain into `out`. `empty`: nothing new (or not
    // ready); `error`: a malformed ring or chain, and every call until reset().
    PopStatus pop(DescChain& out);

    // 2.7.8: hands chain `head` back with `written` bytes; false if unusable.
    bool push_used(std::uint16_t head, std::uint32_t written);

    // 2.7.7.2 / 2.7.10: whether the driver wants an interrupt for the pushes since.
    bool needs_notification();

    // Driver → device notification suppression (2.7.7.1 / 2.7.10).
    // enable_notifications() returns true if buffers arrived meanwhile.
    void disable_notifications();
    bool enable_notifications();
    // pop(); when empty, re-enable notifications and re-check once, so a
    // buffer added meanwhile is not left waiting for a kick that never comes.
    // `empty` leaves notifications enabled.
    PopStatus pop_or_enable_notifications(DescChain& out);

    // One service pass: with notifications off, hands up to `budget` chains
    // to handle(chain). `more`: the budget ran out; `done`: the ring ran dry
    // (notifications re-enabled); `stopped`: handle() returned false;
    // `error`: a malformed ring.
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
    // With EVENT_IDX: avail_event = last_avail_idx.
    void set_avail_event();

private:
    PopStatus fail(const char* reason);
    std::uint16_t avail_idx() const;   // acquire load of avail->idx
    PopStatus add_buffer(DescChain& out, const Descriptor& d, std::uint64_t& total);

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
