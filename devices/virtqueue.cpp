// The split virtqueue (see virtqueue.hpp). Ring layout (2.7, little-endian):
// avail = { flags, idx, ring[size], used_event }, used = { flags, idx,
// { id, len }[size], avail_event }. avail->idx is read with acquire, used->idx
// written with release (2.7.13.3, 2.7.8); everything else is copied once
// before use, so a guest changing the rings under us gives garbage, never a
// bad access.
#include "devices/virtqueue.hpp"

#include <algorithm>
#include <atomic>
#include <bit>

namespace kguest {

namespace {

// Calls fn(gpa, pos, n) for each piece of [offset, offset+len) of the readable
// (or writable) part of a chain; false, calling nothing, past its end.
template <typename Fn>
bool for_each_piece(const DescChain& chain, bool writable, std::uint64_t offset, std::uint64_t len,
                    Fn&& fn) {
    std::uint64_t total = writable ? chain.writable_len() : chain.readable_len();
    if (offset > total || len > total - offset) return false;
    std::uint64_t pos = 0;
    for (const DescChainElem& e : chain.elems()) {
        if (len == 0) break;
        if (e.write != writable) continue;
        if (offset >= e.len) {
            offset -= e.len;
            continue;
        }
        std::uint64_t n = std::min<std::uint64_t>(e.len - offset, len);
        if (!fn(e.addr + offset, pos, n)) return false;
        pos += n;
        len -= n;
        offset = 0;
    }
    return true;
}

} // namespace

void DescChain::clear() {
    head_ = 0;
    elems_.clear();
    readable_len_ = writable_len_ = 0;
}

bool DescChain::read(const GuestMemory& mem, std::uint64_t offset, void* dst, std::uint64_t len) const {
    auto* out = static_cast<std::uint8_t*>(dst);
    return for_each_piece(*this, false, offset, len, [&](Gpa gpa, std::uint64_t pos, std::uint64_t n) {
        return mem.read(gpa, out + pos, n);
    });
}

bool DescChain::write(GuestMemory& mem, std::uint64_t offset, const void* src, std::uint64_t len) const {
    auto* in = static_cast<const std::uint8_t*>(src);
    return for_each_piece(*this, true, offset, len, [&](Gpa gpa, std::uint64_t pos, std::uint64_t n) {
        return mem.write(gpa, in + pos, n);
    });
}

bool DescChain::append_iovecs(GuestMemory& mem, bool writable, std::uint64_t offset, std::uint64_t len,
                              std::vector<iovec>& out) const {
    const std::size_t before = out.size();
    // Every element was checked to lie in one RAM region by pop().
    if (for_each_piece(*this, writable, offset, len, [&](Gpa gpa, std::uint64_t, std::uint64_t n) {
            return mem.append_iovec(gpa, n, out);
        }))
        return true;
    out.resize(before);
    return false;
}

bool Virtqueue::configure(std::uint16_t size, std::uint64_t desc_gpa, std::uint64_t avail_gpa,
                          std::uint64_t used_gpa) {
    ready_ = false;
    if (failed_) return false;   // only reset() clears an error, keeping its reason
    auto refuse = [this](const char* why) {
        reason_ = why;
        return false;
    };
    if (size == 0 || size > kVirtqMaxSize || !std::has_single_bit(size))
        return refuse("queue size is not a power of 2 in 1..32768");
    // 2.7: alignment 16 / 2 / 4; sizes 16*size, 6+2*size, 6+8*size bytes.
    if (desc_gpa % 16 != 0 || avail_gpa % 2 != 0 || used_gpa % 4 != 0)
        return refuse("misaligned ring address");
    auto desc = mem_.range(Gpa(desc_gpa), 16ull * size);
    auto avail = mem_.range(Gpa(avail_gpa), 6 + 2ull * size);
    auto used = mem_.range(Gpa(used_gpa), 6 + 8ull * size);
    if (!desc || !avail || !used) return refuse("ring not entirely in guest RAM");
    size_ = size;
    desc_ = *desc;
    avail_ = *avail;
    used_ = *used;
    last_avail_ = used_idx_ = signalled_used_ = 0;
    signalled_valid_ = false;
    ready_ = true;
    return true;
}

void Virtqueue::reset() {
    event_idx_ = indirect_ = ready_ = failed_ = signalled_valid_ = false;
    reason_ = "";
    size_ = 0;
    desc_ = avail_ = used_ = GuestRange();
    last_avail_ = used_idx_ = signalled_used_ = 0;
}

PopStatus Virtqueue::fail(const char* reason) {
    failed_ = true;
    reason_ = reason;
    return PopStatus::error;
}

std::uint16_t Virtqueue::avail_idx() const {
    return avail_.load_le16(2, std::memory_order_acquire);
}

PopStatus Virtqueue::add_buffer(DescChain& out, const Descriptor& d, std::uint64_t& total) {
    bool writable = (d.flags & kVirtqDescFWrite) != 0;
    // 2.7.4.2: the driver MUST place device-writable buffers after readable ones.
    if (!writable && !out.elems_.empty() && out.elems_.back().write)
        return fail("device-readable descriptor after a device-writable one");
    // A zero-length buffer must still point at RAM.
    if (!mem_.contains(Gpa(d.addr), d.len)) return fail("buffer not entirely in guest RAM");
    total += d.len;
    // 2.7.5.2 caps a chain at 2^32 bytes; used->len has 32 bits.
    if (total > UINT32_MAX) return fail("chain longer than 4 GiB");
    out.elems_.push_back({Gpa(d.addr), d.len, writable});
    (writable ? out.writable_len_ : out.readable_len_) += d.len;
    return PopStatus::ok;
}

PopStatus Virtqueue::pop(DescChain& out) {
    if (failed_) return PopStatus::error;
    if (!ready_) return PopStatus::empty;
    // 2.7.6: avail->idx may be at most `size` entries ahead of what we consumed.
    auto pending = static_cast<std::uint16_t>(avail_idx() - last_avail_);
    if (pending == 0) return PopStatus::empty;
    if (pending > size_) return fail("avail idx more than queue size ahead");
    std::uint16_t head = avail_.load_le16(4 + 2 * (last_avail_ & (size_ - 1)));
    if (head >= size_) return fail("head index out of range");

    out.clear();
    out.head_ = head;
    GuestRange table = desc_;
    std::uint64_t table_len = size_;   // entries
    bool in_indirect = false;
    std::uint32_t idx = head;
    std::uint32_t buffers = 0;
    std::uint64_t total = 0;
    for (;;) {
        Descriptor d;
        table.read(16ull * idx, &d, sizeof d);   // idx < table_len: cannot fail
        if (d.flags & kVirtqDescFIndirect) {
            // 2.7.5.3.1: only with the feature, only one level, never with NEXT;
            // 2.7.5.3.2: it may follow direct descriptors, and its WRITE flag
            // is ignored.
            if (!indirect_) return fail("INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC");
            if (in_indirect) return fail("nested INDIRECT descriptor");
            if (d.flags & kVirtqDescFNext) return fail("INDIRECT descriptor with NEXT");
            if (d.len == 0 || d.len % 16 != 0) return fail("indirect table length not a nonzero multiple of 16");
            auto indirect = mem_.range(Gpa(d.addr), d.len);
            if (!indirect) return fail("indirect table not entirely in guest RAM");
            table = *indirect;
            table_len = d.len / 16;
            in_indirect = true;
            idx = 0;
            continue;
        }
        // 2.7.5.3.1: no chain longer than the queue size (this ends any loop too).
        if (++buffers > size_) return fail("descriptor chain loops or is longer than the queue size");
        if (add_buffer(out, d, total) != PopStatus::ok) return PopStatus::error;
        if (!(d.flags & kVirtqDescFNext)) break;
        if (d.next >= table_len) return fail("next index out of range");
        idx = d.next;
    }
    ++last_avail_;
    return PopStatus::ok;
}

bool Virtqueue::push_used(std::uint16_t head, std::uint32_t written) {
    if (!ready_ || failed_ || head >= size_) return false;
    // 2.7.8: the element, then the index (release).
    const std::uint64_t elem = 4 + 8 * (used_idx_ & (size_ - 1));
    used_.store_le32(elem, head);
    used_.store_le32(elem + 4, written);
    ++used_idx_;
    used_.store_le16(2, used_idx_, std::memory_order_release);
    return true;
}

bool Virtqueue::needs_notification() {
    if (!ready_) return false;
    // Our used->idx store before the driver's suppression state is read.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (!event_idx_)   // 2.7.7.2
        return (avail_.load_le16(0) & kVirtqAvailFNoInterrupt) == 0;
    // 2.7.10: interrupt iff used_event lies in [old, new), i.e. vring_need_event().
    std::uint16_t old = signalled_used_;
    bool valid = signalled_valid_;
    signalled_used_ = used_idx_;
    signalled_valid_ = true;
    if (!valid) return true;
    std::uint16_t event = avail_.load_le16(4 + 2 * size_);
    return static_cast<std::uint16_t>(used_idx_ - event - 1) < static_cast<std::uint16_t>(used_idx_ - old);
}

void Virtqueue::set_avail_event() {
    if (ready_ && event_idx_) used_.store_le16(4 + 8 * size_, last_avail_);
}

void Virtqueue::disable_notifications() {
    // With EVENT_IDX the driver ignores used->flags (2.7.10); an avail_event
    // left behind suppresses notifications.
    if (ready_ && !event_idx_) used_.store_le16(0, kVirtqUsedFNoNotify);
}

bool Virtqueue::enable_notifications() {
    if (!ready_ || failed_) return false;
    if (event_idx_)
        set_avail_event();
    else
        used_.store_le16(0, 0);
    // The store must be visible before avail->idx is re-read.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    return avail_idx() != last_avail_;
}

PopStatus Virtqueue::pop_or_enable_notifications(DescChain& out) {
    const PopStatus st = pop(out);
    if (st != PopStatus::empty || !enable_notifications()) return st;
    disable_notifications();   // buffers arrived meanwhile: take them
    return pop(out);
}

} // namespace kguest
