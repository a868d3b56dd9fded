// virtio-blk (see virtio_blk.hpp): configuration space, request parsing and
// checking, and the io_uring requests the device's EventLoop runs.
//
// Each queue owns kQueueSize request slots; a service pass pops at most
// kBudget chains and stops early when every slot is in flight (a completion
// marks the queue again). A request's I/O is one io_uring request at a time
// (readv/writev resubmitted for the rest after a short transfer; one fallocate
// per DISCARD/WRITE_ZEROES segment), so the slot is its only state. Used
// elements are pushed on completion and the interrupt goes out in the queue's
// next pass, which the completion schedules: one per batch of completions.
#include "devices/virtio_blk.hpp"

#include "devices/base/error.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdexcept>
#include <sys/uio.h>
#include <thread>

namespace kguest {

namespace {

constexpr int kBudget = 64;   // chains per service pass before yielding
constexpr std::uint64_t kSector = 512;   // 5.2.6: sector is in 512-byte units, whatever blk_size says
constexpr auto kResetWait = std::chrono::seconds(30);

bool has(std::uint64_t features, unsigned bit) { return (features & virtio_bit(bit)) != 0; }

const char* type_name(std::uint32_t type) {
    switch (type) {
    case VIRTIO_BLK_T_IN: return "read";
    case VIRTIO_BLK_T_OUT: return "write";
    case VIRTIO_BLK_T_FLUSH: return "flush";
    case VIRTIO_BLK_T_DISCARD: return "discard";
    case VIRTIO_BLK_T_WRITE_ZEROES: return "write-zeroes";
    default: return "request";
    }
}

} // namespace

// One request slot: what its I/O needs until it completes.
struct VirtioBlk::Req final : EventLoop::Completion {
    void complete(int res) override { dev->io_done(*this, res); }

    VirtioBlk* dev = nullptr;
    std::uint16_t q = 0;
    std::uint16_t head = 0;
    std::uint32_t type = 0;
    Gpa status;                 // the last writable byte of the chain
    std::uint32_t used = 1;     // bytes written into guest memory, status included
    std::uint64_t offset = 0;   // file offset of the next transfer
    std::uint64_t bytes = 0;    // data bytes of the request
    std::uint64_t left = 0;     // data bytes not transferred yet
    std::vector<iovec> iov;     // guest RAM, from DescChain::append_iovecs
    std::size_t iov_at = 0;
    std::vector<VirtioBlkDiscardSeg> segs;
    std::size_t seg_at = 0;
    int mode = 0;               // the fallocate mode in flight
};

struct VirtioBlk::Queue {
    std::vector<std::unique_ptr<Req>> slots;
    std::vector<Req*> free;
    bool broken = false;   // a chain we could not answer: hands off until reset
    bool pushed = false;   // used elements since the last notification check
};

VirtioBlk::VirtioBlk(std::unique_ptr<BlockImage> image, unsigned queues, bool discard)
    : image_(std::move(image)), discard_(discard && image_ && !image_->readonly()) {
    if (!image_) throw std::invalid_argument("virtio-blk: null image");
    if (queues < 1 || queues > kMaxBlkQueues) throw std::invalid_argument("virtio-blk: bad queue count");
    num_queues_ = static_cast<std::uint16_t>(queues);

    // 5.2.3.
    features_ = virtio_bit(VIRTIO_BLK_F_SIZE_MAX) | virtio_bit(VIRTIO_BLK_F_SEG_MAX) |
                virtio_bit(VIRTIO_BLK_F_BLK_SIZE) | virtio_bit(VIRTIO_BLK_F_FLUSH) |
                virtio_bit(VIRTIO_BLK_F_CONFIG_WCE) | virtio_bit(VIRTIO_F_EVENT_IDX) |
                virtio_bit(VIRTIO_F_INDIRECT_DESC);
    if (image_->readonly()) features_ |= virtio_bit(VIRTIO_BLK_F_RO);
    if (num_queues_ > 1) features_ |= virtio_bit(VIRTIO_BLK_F_MQ);
    if (discard_) features_ |= virtio_bit(VIRTIO_BLK_F_DISCARD) | virtio_bit(VIRTIO_BLK_F_WRITE_ZEROES);

    // 5.2.4 (little-endian; the host is).
    config_.capacity = image_->size() / kSector;
    config_.size_max = kSizeMax;
    config_.seg_max = kSegMax;
    config_.blk_size = image_->block_size();
    config_.writeback = 1;
    config_.num_queues = num_queues_;
    if (discard_) {
        config_.max_discard_sectors = kMaxDiscardSectors;
        config_.max_discard_seg = kMaxDiscardSeg;
        config_.discard_sector_alignment = image_->block_size() / kSector;
        config_.max_write_zeroes_sectors = kMaxDiscardSectors;
        config_.max_write_zeroes_seg = kMaxDiscardSeg;
        config_.write_zeroes_may_unmap = 1;
    }

    for (unsigned q = 0; q < num_queues_; ++q) {
        auto s = std::make_unique<Queue>();
        for (unsigned i = 0; i < kQueueSize; ++i) {
            auto r = std::make_unique<Req>();
            r->dev = this;
            r->q = static_cast<std::uint16_t>(q);
            r->iov.reserve(8);
            s->free.push_back(r.get());
            s->slots.push_back(std::move(r));
        }
        q_.push_back(std::move(s));
    }
    loop_ = std::make_unique<EventLoop>("virtio-blk", num_queues_, [this](std::uint16_t q) { return service(q); });
}

VirtioBlk::~VirtioBlk() {
    reset();
    loop_->stop();   // cancels and waits for anything still in flight
}

// ---- VirtioDevice, called by the transport ----

void VirtioBlk::read_config(std::uint64_t offset, std::span<std::uint8_t> data) {
    VirtioBlkConfig c = config_;
    c.writeback = writeback_.load(std::memory_order_relaxed);
    if (offset > sizeof c || data.size() > sizeof c - offset) {
        std::fill(data.begin(), data.end(), 0xff);
        return;
    }
    std::memcpy(data.data(), reinterpret_cast<const std::uint8_t*>(&c) + offset, data.size());
}

void VirtioBlk::write_config(std::uint64_t offset, std::span<const std::uint8_t> data) {
    // 5.2.5: with CONFIG_WCE the driver may switch the cache mode through
    // `writeback` (0 writethrough, 1 writeback); every other field is read-only.
    const bool wce = transport() != nullptr && has(transport()->driver_features(), VIRTIO_BLK_F_CONFIG_WCE);
    if (wce && offset == offsetof(VirtioBlkConfig, writeback) && data.size() == 1) {
        writeback_.store(data[0] != 0 ? 1 : 0, std::memory_order_relaxed);
        return;
    }
    KGUEST_LOG_LIMITED(log_limit_, "virtio-blk: ignored %zu-byte config write at %llu", data.size(),
                       static_cast<unsigned long long>(offset));
}

void VirtioBlk::activate(std::span<Virtqueue> queues, GuestMemory& mem) {
    const std::uint64_t features = transport() != nullptr ? transport()->driver_features() : 0;
    // 5.2.5.1: with CONFIG_WCE but without FLUSH, writeback starts at 0.
    if (has(features, VIRTIO_BLK_F_CONFIG_WCE) && !has(features, VIRTIO_BLK_F_FLUSH))
        writeback_.store(0, std::memory_order_relaxed);
    loop_->run_and_wait([this, queues, &mem, features] { do_activate(queues, mem, features); });
}

void VirtioBlk::reset() {
    // 2.4: when this returns, nothing touches the queues or guest memory any
    // more: no new request starts, and the I/O in flight (which reads or
    // writes guest RAM directly) has completed.
    loop_->run_and_wait([this] { quiescing_ = true; });
    const auto deadline = std::chrono::steady_clock::now() + kResetWait;
    while (in_flight_.load() != 0 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (const unsigned n = in_flight_.load(); n != 0)
        log_msg("virtio-blk: %s: %u request(s) still in flight %llds after a reset", image_->path().c_str(), n,
                static_cast<long long>(kResetWait.count()));
    loop_->run_and_wait([this] {
        active_ = false;
        quiescing_ = false;
        queues_ = {};
        mem_ = nullptr;
    });
    writeback_.store(1, std::memory_order_relaxed);
}

BlkCounters VirtioBlk::counters() const {
    constexpr auto o = std::memory_order_relaxed;
    return {reads_.load(o),  read_bytes_.load(o),    writes_.load(o),        write_bytes_.load(o), flushes_.load(o),
            discards_.load(o), discard_bytes_.load(o), errors_.load(o)};
}

// ---- On the loop ----

void VirtioBlk::do_activate(std::span<Virtqueue> queues, GuestMemory& mem, std::uint64_t features) {
    if (queues.size() < num_queues_) return;
    queues_ = queues;
    mem_ = &mem;
    negotiated_ = features;
    quiescing_ = false;
    active_ = true;
    for (std::uint16_t q = 0; q < num_queues_; ++q) {
        Queue& s = *q_[q];
        s.broken = s.pushed = false;
        loop_->mark(q);
    }
}

bool VirtioBlk::queue_error(std::uint16_t q, const char* reason) {
    // 2.1.2: a chain we cannot answer: DEVICE_NEEDS_RESET; this queue stops,
    // the others go on serving until the driver resets the device.
    KGUEST_LOG_LIMITED(log_limit_, "virtio-blk: %s: queue %u: %s; device needs reset", image_->path().c_str(),
                       static_cast<unsigned>(q), reason);
    q_[q]->broken = true;
    fail();
    return false;
}

void VirtioBlk::maybe_notify(std::uint16_t q) {
    // 2.7.7.2 / 2.7.10: interrupt only when the driver wants one.
    Queue& s = *q_[q];
    if (!s.pushed) return;
    s.pushed = false;
    if (queues_[q].needs_notification()) notify_used(q);
}

bool VirtioBlk::service(std::uint16_t q) {
    // Kicks while inactive are dropped; with Bus Master Enable off (PCI 3.0
    // 6.2.2) no new request starts until the transport kicks again.
    if (!active_ || quiescing_ || !dma_enabled()) return false;
    Virtqueue& vq = queues_[q];
    Queue& s = *q_[q];
    if (!vq.ready()) return false;
    auto pass = Virtqueue::Pass::stopped;
    if (!s.broken && !s.free.empty()) {
        pass = vq.service(kBudget, [&](const DescChain& c) { return start(q, c) && !s.free.empty(); });
        if (pass == Virtqueue::Pass::error) queue_error(q, vq.error().reason);
    }
    maybe_notify(q);
    // Out of slots: a completion marks the queue again.
    return pass == Virtqueue::Pass::more;
}

std::uint8_t VirtioBlk::check_ranges(Req& r, const DescChain& c) {
    // 5.2.6: DISCARD / WRITE_ZEROES carry segments of 16 bytes after the header.
    const bool discard = r.type == VIRTIO_BLK_T_DISCARD;
    const std::uint64_t len = c.readable_len() - sizeof(VirtioBlkReqHdr);
    if (len == 0 || len % sizeof(VirtioBlkDiscardSeg) != 0 || len / sizeof(VirtioBlkDiscardSeg) > kMaxDiscardSeg)
        return VIRTIO_BLK_S_IOERR;
    r.segs.resize(len / sizeof(VirtioBlkDiscardSeg));
    c.read(*mem_, sizeof(VirtioBlkReqHdr), r.segs.data(), len);
    const std::uint64_t sectors = image_->size() / kSector;
    for (const VirtioBlkDiscardSeg& g : r.segs) {
        // 5.2.6.2: UNSUPP for a discard with the unmap flag or any unknown
        // flag, for a write zeroes with an unknown flag.
        if (discard ? g.flags != 0 : (g.flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) != 0) return VIRTIO_BLK_S_UNSUPP;
        if (g.num_sectors == 0 || g.num_sectors > kMaxDiscardSectors || g.sector > sectors ||
            g.num_sectors > sectors - g.sector)
            return VIRTIO_BLK_S_IOERR;
        r.bytes += std::uint64_t{g.num_sectors} * kSector;
    }
    return VIRTIO_BLK_S_OK;
}

bool VirtioBlk::start(std::uint16_t q, const DescChain& c) {
    Queue& s = *q_[q];
    // 5.2.6: the header is device-readable, the status the last device-writable byte.
    if (c.readable_len() < sizeof(VirtioBlkReqHdr)) return queue_error(q, "request header missing or device-writable");
    const DescChainElem* last = nullptr;
    for (const DescChainElem& e : c.elems())
        if (e.write && e.len != 0) last = &e;
    if (last == nullptr) return queue_error(q, "request without a device-writable status byte");
    VirtioBlkReqHdr h;
    c.read(*mem_, 0, &h, sizeof h);

    Req& r = *s.free.back();
    s.free.pop_back();
    in_flight_.fetch_add(1);
    r.head = c.head();
    r.type = h.type;
    r.status = last->addr + (last->len - 1);
    r.used = 1;
    r.bytes = r.left = 0;
    r.iov.clear();
    r.iov_at = 0;
    r.segs.clear();
    r.seg_at = 0;

    const std::uint64_t data_in = c.writable_len() - 1, data_out = c.readable_len() - sizeof h;
    const std::uint64_t size = image_->size();
    // [sector*512, +len) inside the image; the image never grows.
    auto in_range = [&](std::uint64_t len) {
        return len != 0 && len % kSector == 0 && h.sector <= size / kSector && len <= size - h.sector * kSector;
    };
    switch (h.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT: {
        const bool in = h.type == VIRTIO_BLK_T_IN;
        const std::uint64_t len = in ? data_in : data_out;
        if (!in && image_->readonly()) break;   // IOERR (5.2.6.2: a write to a RO device)
        if (!in_range(len)) break;
        // Elements were checked against guest RAM by pop(): this cannot fail.
        if (!c.append_iovecs(*mem_, in, in ? 0 : sizeof h, len, r.iov)) break;
        r.offset = h.sector * kSector;
        r.bytes = r.left = len;
        submit_io(r);
        return true;
    }
    case VIRTIO_BLK_T_FLUSH:
        if (!has(negotiated_, VIRTIO_BLK_F_FLUSH)) {
            finish(r, VIRTIO_BLK_S_UNSUPP);
            return true;
        }
        loop_->submit({IoOp::Kind::fdatasync, image_->fd()}, r);
        return true;
    case VIRTIO_BLK_T_GET_ID: {
        // 5.2.6: 20 bytes, NUL-padded when shorter; as much as fits.
        char id[kBlkIdBytes] = {};
        std::memcpy(id, image_->serial().data(), std::min(image_->serial().size(), kBlkIdBytes));
        const std::uint64_t n = std::min<std::uint64_t>(data_in, kBlkIdBytes);
        c.write(*mem_, 0, id, n);
        r.used = static_cast<std::uint32_t>(n + 1);
        finish(r, VIRTIO_BLK_S_OK);
        return true;
    }
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES: {
        const unsigned feature = h.type == VIRTIO_BLK_T_DISCARD ? VIRTIO_BLK_F_DISCARD : VIRTIO_BLK_F_WRITE_ZEROES;
        if (!has(negotiated_, feature)) {
            finish(r, VIRTIO_BLK_S_UNSUPP);
            return true;
        }
        if (image_->readonly()) break;
        if (const std::uint8_t st = check_ranges(r, c); st != VIRTIO_BLK_S_OK) {
            finish(r, st);
            return true;
        }
        submit_range(r);
        return true;
    }
    default:
        finish(r, VIRTIO_BLK_S_UNSUPP);   // 5.2.6.1: unknown types get UNSUPP
        return true;
    }
    finish(r, VIRTIO_BLK_S_IOERR);
    return true;
}

void VirtioBlk::submit_io(Req& r) {
    const bool in = r.type == VIRTIO_BLK_T_IN;
    // 5.2.5: writethrough (writeback=0, or no FLUSH to ask for durability
    // later): the write is on stable storage before the request completes.
    const bool sync = !in && (writeback_.load(std::memory_order_relaxed) == 0 || !has(negotiated_, VIRTIO_BLK_F_FLUSH));
    loop_->submit({in ? IoOp::Kind::readv : IoOp::Kind::writev, image_->fd(), r.iov.data() + r.iov_at,
                   r.iov.size() - r.iov_at, sync ? RWF_DSYNC : 0, r.offset},
                  r);
}

void VirtioBlk::submit_range(Req& r) {
    const VirtioBlkDiscardSeg& g = r.segs[r.seg_at];
    // DISCARD punches a hole; WRITE_ZEROES zeroes the range, or with UNMAP
    // (write_zeroes_may_unmap) punches it too: a hole reads as zeroes.
    const bool punch = r.type == VIRTIO_BLK_T_DISCARD || (g.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) != 0;
    r.mode = (punch ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE;
    r.offset = g.sector * kSector;
    loop_->submit({IoOp::Kind::fallocate, image_->fd(), nullptr, std::uint64_t{g.num_sectors} * kSector, r.mode,
                   r.offset},
                  r);
}

void VirtioBlk::io_done(Req& r, int res) {
    if (quiescing_ || !active_) {   // a reset is waiting for us: no ring, no status
        q_[r.q]->free.push_back(&r);
        in_flight_.fetch_sub(1);
        return;
    }
    switch (r.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT:
        if (res > 0) {
            auto n = static_cast<std::uint64_t>(res);
            r.left -= std::min(n, r.left);
            r.offset += n;
            if (r.left != 0) {   // a short transfer: the rest, from where it stopped
                while (n >= r.iov[r.iov_at].iov_len) n -= r.iov[r.iov_at++].iov_len;
                r.iov[r.iov_at].iov_base = static_cast<std::uint8_t*>(r.iov[r.iov_at].iov_base) + n;
                r.iov[r.iov_at].iov_len -= n;
                submit_io(r);
                return;
            }
        }
        if (r.type == VIRTIO_BLK_T_IN) r.used = static_cast<std::uint32_t>(r.bytes - r.left + 1);
        if (res == 0) res = -EIO;   // end of file inside the image: it shrank under us
        break;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        if (res == -EOPNOTSUPP || res == -EINVAL) {
            // A file system without ZERO_RANGE (tmpfs): a hole reads as
            // zeroes too. DISCARD is advisory (5.2.6.2): nothing done is fine.
            if (r.type == VIRTIO_BLK_T_DISCARD && !image_->block_device()) res = 0;
            else if ((r.mode & FALLOC_FL_ZERO_RANGE) != 0 && !image_->block_device()) {
                r.mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
                const VirtioBlkDiscardSeg& g = r.segs[r.seg_at];
                loop_->submit({IoOp::Kind::fallocate, image_->fd(), nullptr, std::uint64_t{g.num_sectors} * kSector,
                               r.mode, g.sector * kSector},
                              r);
                return;
            }
        }
        if (res >= 0 && ++r.seg_at < r.segs.size()) {
            submit_range(r);
            return;
        }
        // Neither zeroing nor punching here (a 9p share): UNSUPP, so that
        // the driver writes zeroes itself (Linux maps it to BLK_STS_NOTSUPP
        // and blkdev_issue_zeroout() falls back to writing zero pages).
        if (res == -EOPNOTSUPP) {
            finish(r, VIRTIO_BLK_S_UNSUPP);
            loop_->mark(r.q);
            return;
        }
        break;
    default: break;
    }
    if (res < 0)
        KGUEST_LOG_LIMITED(log_limit_, "virtio-blk: %s: %s at byte %llu: %s", image_->path().c_str(), type_name(r.type),
                           static_cast<unsigned long long>(r.offset), std::strerror(-res));
    finish(r, res < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK);
    loop_->mark(r.q);   // the interrupt for this batch, and slots free again
}

void VirtioBlk::finish(Req& r, std::uint8_t status) {
    constexpr auto o = std::memory_order_relaxed;
    if (status != VIRTIO_BLK_S_OK) {
        errors_.fetch_add(1, o);
    } else {
        switch (r.type) {
        case VIRTIO_BLK_T_IN: reads_.fetch_add(1, o), read_bytes_.fetch_add(r.bytes, o); break;
        case VIRTIO_BLK_T_OUT: writes_.fetch_add(1, o), write_bytes_.fetch_add(r.bytes, o); break;
        case VIRTIO_BLK_T_FLUSH: flushes_.fetch_add(1, o); break;
        case VIRTIO_BLK_T_DISCARD:
        case VIRTIO_BLK_T_WRITE_ZEROES: discards_.fetch_add(1, o), discard_bytes_.fetch_add(r.bytes, o); break;
        default: break;
        }
    }
    Queue& s = *q_[r.q];
    if (!s.broken) {
        // 5.2.6: the status byte, then the used element with what we wrote.
        mem_->write(r.status, &status, 1);   // checked by pop()
        queues_[r.q].push_used(r.head, status == VIRTIO_BLK_S_OK || r.type == VIRTIO_BLK_T_IN ? r.used : 1);
        s.pushed = true;
    }
    s.free.push_back(&r);
    in_flight_.fetch_sub(1);
}

} // namespace kguest
