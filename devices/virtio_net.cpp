// virtio-net (see virtio_net.hpp): configuration space, feature negotiation,
// the control queue, and the queue services the device's EventLoop runs.
//
// Per queue pair, one backend read is in flight while the device wants
// frames; a TX pass's frames reach the kernel in the loop's next
// io_uring_submit. Posting no read while the guest has no receive buffers is
// the RX backpressure: frames wait in the backend until the guest adds
// buffers and kicks. Each service pass handles at most kBudget chains.
#include "devices/virtio_net.hpp"

#include "devices/base/error.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <linux/if_tun.h>
#include <optional>
#include <stdexcept>

namespace kguest {

namespace {

constexpr int kBudget = 64;   // chains per service pass before yielding

bool has(std::uint64_t features, unsigned bit) { return (features & virtio_bit(bit)) != 0; }

} // namespace

// The completion of a pair's backend read (slot kRead) or of one of its
// backend's write slots.
struct VirtioNet::IoDone final : EventLoop::Completion {
    static constexpr unsigned kRead = ~0u;
    IoDone(VirtioNet& d, unsigned pair, unsigned s) : dev(d), p(pair), slot(s) {}
    void complete(int res) override { slot == kRead ? dev.read_done(p, res) : dev.write_done(p, slot, res); }
    VirtioNet& dev;
    unsigned p, slot;
};

// Loop-thread state of one queue pair.
struct VirtioNet::Pair {
    std::vector<std::uint8_t> rx_buf = std::vector<std::uint8_t>(kMaxPacketLen + 64);
    std::size_t rx_len = 0;      // a frame (with its 12-byte header) waiting in rx_buf
    bool rx_pending = false;
    bool rx_wait = false;        // waiting for the guest to add receive buffers
    bool rx_reading = false;     // a backend read in flight
    bool tx_blocked = false;     // the backend said `again`: wait for a write to complete
    std::deque<DescChain> rx_held;       // popped, not yet used, in ring order
    std::optional<DescChain> tx_held;    // popped, the backend refused it for now
    std::vector<DescChain> scratch;
    std::vector<iovec> iov;              // the frame being sent
    std::vector<IoDone> io;              // one per backend write slot, then the read's
};

VirtioNet::VirtioNet(std::unique_ptr<NetBackend> backend, const MacAddress& mac, std::uint16_t mtu)
    : backend_(std::move(backend)) {
    if (!backend_) throw std::invalid_argument("virtio-net: null backend");
    pairs_ = backend_->num_queues();
    if (pairs_ < 1 || pairs_ > kMaxNetQueuePairs) throw std::invalid_argument("virtio-net: bad queue pair count");
    num_queues_ = static_cast<std::uint16_t>(2 * pairs_ + (pairs_ > 1 ? 1 : 0));

    // 5.1.3.
    features_ = virtio_bit(VIRTIO_NET_F_MAC) | virtio_bit(VIRTIO_NET_F_STATUS) | virtio_bit(VIRTIO_NET_F_MTU) |
                virtio_bit(VIRTIO_NET_F_MRG_RXBUF) | virtio_bit(VIRTIO_F_EVENT_IDX) |
                virtio_bit(VIRTIO_F_INDIRECT_DESC);
    if (backend_->has_vnet_hdr())
        features_ |= virtio_bit(VIRTIO_NET_F_CSUM) | virtio_bit(VIRTIO_NET_F_GUEST_CSUM) |
                     virtio_bit(VIRTIO_NET_F_GUEST_TSO4) | virtio_bit(VIRTIO_NET_F_GUEST_TSO6) |
                     virtio_bit(VIRTIO_NET_F_GUEST_ECN) | virtio_bit(VIRTIO_NET_F_HOST_TSO4) |
                     virtio_bit(VIRTIO_NET_F_HOST_TSO6) | virtio_bit(VIRTIO_NET_F_HOST_ECN);
    if (pairs_ > 1) features_ |= virtio_bit(VIRTIO_NET_F_MQ) | virtio_bit(VIRTIO_NET_F_CTRL_VQ);

    // 5.1.4: mac, status, max_virtqueue_pairs, mtu (little-endian; the host is).
    std::memcpy(config_.mac, mac.data(), 6);
    config_.status = VIRTIO_NET_S_LINK_UP;
    config_.max_virtqueue_pairs = static_cast<std::uint16_t>(pairs_);
    config_.mtu = mtu;
    attached_.assign(pairs_, true);

    for (unsigned p = 0; p < pairs_; ++p) {
        auto pair = std::make_unique<Pair>();
        pair->io.reserve(backend_->write_slots() + 1);
        for (unsigned slot = 0; slot < backend_->write_slots(); ++slot) pair->io.emplace_back(*this, p, slot);
        pair->io.emplace_back(*this, p, IoDone::kRead);
        pair_.push_back(std::move(pair));
    }
    loop_ = std::make_unique<EventLoop>("virtio-net", num_queues_, [this](std::uint16_t q) { return service(q); });
}

VirtioNet::~VirtioNet() {
    reset();
    loop_->stop();   // also cancels and waits for the backend's I/O in flight
}

// ---- VirtioDevice, called by the transport ----

bool VirtioNet::accept_features(std::uint64_t f) {
    // 5.1.3.1: the driver MUST NOT accept a feature without the ones it needs.
    auto needs = [&](unsigned bit, std::uint64_t any_of) { return !has(f, bit) || (f & any_of) != 0; };
    const std::uint64_t guest_tso = virtio_bit(VIRTIO_NET_F_GUEST_TSO4) | virtio_bit(VIRTIO_NET_F_GUEST_TSO6);
    const std::uint64_t host_tso = virtio_bit(VIRTIO_NET_F_HOST_TSO4) | virtio_bit(VIRTIO_NET_F_HOST_TSO6);
    return needs(VIRTIO_NET_F_GUEST_TSO4, virtio_bit(VIRTIO_NET_F_GUEST_CSUM)) &&
           needs(VIRTIO_NET_F_GUEST_TSO6, virtio_bit(VIRTIO_NET_F_GUEST_CSUM)) &&
           needs(VIRTIO_NET_F_GUEST_ECN, guest_tso) &&
           needs(VIRTIO_NET_F_HOST_TSO4, virtio_bit(VIRTIO_NET_F_CSUM)) &&
           needs(VIRTIO_NET_F_HOST_TSO6, virtio_bit(VIRTIO_NET_F_CSUM)) &&
           needs(VIRTIO_NET_F_HOST_ECN, host_tso) && needs(VIRTIO_NET_F_MQ, virtio_bit(VIRTIO_NET_F_CTRL_VQ));
}

void VirtioNet::read_config(std::uint64_t offset, std::span<std::uint8_t> data) {
    if (offset > sizeof config_ || data.size() > sizeof config_ - offset) {
        std::fill(data.begin(), data.end(), 0xff);
        return;
    }
    Config img = config_;
    img.status = link_status_.load();
    std::memcpy(data.data(), reinterpret_cast<const std::uint8_t*>(&img) + offset, data.size());
}

void VirtioNet::write_config(std::uint64_t offset, std::span<const std::uint8_t> data) {
    // 5.1.4.2: the driver MUST NOT write the configuration: ignored.
    KGUEST_LOG_LIMITED(log_limit_, "virtio-net: ignored %zu-byte config write at %llu", data.size(),
                       static_cast<unsigned long long>(offset));
}

void VirtioNet::activate(std::span<Virtqueue> queues, GuestMemory& mem) {
    const std::uint64_t features = transport() != nullptr ? transport()->driver_features() : 0;
    const std::uint64_t epoch = resets_.load();
    const bool done = loop_->run_and_wait([this, queues, &mem, features, epoch] {
        if (active_) do_deactivate();
        // Late (run_and_wait timed out) and a reset came meanwhile: these
        // queues are no longer the driver's.
        if (epoch != resets_.load()) return;
        epoch_ = epoch;
        do_activate(queues, mem, features);
    });
    if (!done)
        KGUEST_LOG_LIMITED(log_limit_, "virtio-net: activate: the device loop did not answer in time; "
                                       "the queues start when it does");
}

void VirtioNet::reset() {
    // 2.4: when this returns, the loop no longer touches the queues. Bumping
    // resets_ first stops it at its next pass or chain (stale()) even when
    // run_and_wait times out (a loop held up in the middle of a pass): the
    // deactivation then runs late, and nothing uses a buffer meanwhile.
    resets_.fetch_add(1);
    const bool done = loop_->run_and_wait([this] {
        if (active_) do_deactivate();
    });
    if (!done)
        KGUEST_LOG_LIMITED(log_limit_, "virtio-net: reset: the device loop did not answer in time; "
                                       "it leaves the queues alone from its next chain");
}

NetCounters VirtioNet::counters() const {
    constexpr auto o = std::memory_order_relaxed;
    return {rx_packets_.load(o), rx_bytes_.load(o), rx_dropped_.load(o),
            tx_packets_.load(o), tx_bytes_.load(o), tx_dropped_.load(o)};
}

// ---- On the loop ----

bool VirtioNet::service(std::uint16_t q) {
    // Kicks while inactive are dropped; without DMA (bus mastering off) the
    // transport kicks every queue again once it is back.
    if (!active_ || broken_ || stale() || !dma_enabled()) return false;
    if (pairs_ > 1 && q == num_queues_ - 1) return ctrl_pump();
    if (q % 2 == 0) {
        pair_[q / 2]->rx_wait = false;
        return rx_pump(q / 2);
    }
    return tx_pump(q / 2);
}

void VirtioNet::post_read(unsigned p) {
    pair_[p]->rx_reading = true;
    loop_->submit(backend_->read_op(p), pair_[p]->io.back());
}

void VirtioNet::post_writes(unsigned p) {
    while (backend_->wants_write(p)) {
        unsigned slot = 0;
        const IoOp op = backend_->write_op(p, slot);
        loop_->submit(op, pair_[p]->io[std::min<std::size_t>(slot, pair_[p]->io.size() - 2)]);
    }
}

void VirtioNet::read_done(unsigned p, int res) {
    pair_[p]->rx_reading = false;
    backend_->read_done(p, res);
    if (active_) loop_->mark(static_cast<std::uint16_t>(2 * p));
}

void VirtioNet::write_done(unsigned p, unsigned slot, int res) {
    Pair& s = *pair_[p];
    unsigned lost = 0;
    const NetIo r = backend_->write_done(p, slot, res, lost);
    tx_dropped_.fetch_add(lost, std::memory_order_relaxed);
    if (r == NetIo::closed) {
        backend_closed(p, res < 0 ? -res : EPIPE);
    } else if (r == NetIo::drop) {
        KGUEST_LOG_LIMITED(log_limit_, "virtio-net: %s: transmit: %s", backend_->describe().c_str(),
                           std::strerror(-res));
    }
    post_writes(p);
    if (s.tx_blocked) {
        s.tx_blocked = false;
        if (active_) loop_->mark(static_cast<std::uint16_t>(2 * p + 1));
    }
}

void VirtioNet::do_activate(std::span<Virtqueue> queues, GuestMemory& mem, std::uint64_t features) {
    if (queues.size() < num_queues_) return;
    queues_ = queues;
    mem_ = &mem;
    negotiated_ = features;
    mergeable_ = has(negotiated_, VIRTIO_NET_F_MRG_RXBUF);
    guest_csum_ = has(negotiated_, VIRTIO_NET_F_GUEST_CSUM);
    broken_ = false;
    logged_error_ = false;
    active_ = true;
    if (backend_->has_vnet_hdr()) {
        // 5.1.6.4: partially checksummed / GSO frames only with GUEST_*.
        unsigned off = 0;
        if (has(negotiated_, VIRTIO_NET_F_GUEST_CSUM)) off |= TUN_F_CSUM;
        if (has(negotiated_, VIRTIO_NET_F_GUEST_TSO4)) off |= TUN_F_TSO4;
        if (has(negotiated_, VIRTIO_NET_F_GUEST_TSO6)) off |= TUN_F_TSO6;
        if (has(negotiated_, VIRTIO_NET_F_GUEST_ECN)) off |= TUN_F_TSO_ECN;
        set_offloads(off);
    }
    // 5.1.6.5.5: multiqueue starts disabled: pair 0 only.
    set_active_pairs(1);
    for (std::uint16_t q = 0; q < num_queues_; ++q) loop_->mark(q);
}

void VirtioNet::do_deactivate() {
    active_ = false;
    broken_ = false;
    queues_ = {};
    mem_ = nullptr;
    for (auto& p : pair_) {
        p->rx_held.clear();
        p->tx_held.reset();
        p->scratch.clear();
        p->rx_wait = p->tx_blocked = false;   // a frame in rx_buf stays for the next activation
    }
    // The offloads stay until an activation negotiates others: no frame
    // reaches the guest meanwhile, and a guest resetting in a loop must not
    // cost the host two TUNSETOFFLOAD (rtnl) per round.
}

void VirtioNet::set_offloads(unsigned tun_flags) {
    if (tun_flags == offloads_) return;   // TUNSETOFFLOAD takes rtnl: only on change
    if (int err = backend_->set_offloads(tun_flags); err != 0) {
        // Not recorded: the next activation tries again.
        KGUEST_LOG_LIMITED(log_limit_, "virtio-net: %s: TUNSETOFFLOAD 0x%x: %s", backend_->describe().c_str(),
                           tun_flags, std::strerror(err));
        return;
    }
    offloads_ = tun_flags;
}

void VirtioNet::set_active_pairs(unsigned n) {
    for (unsigned p = 0; p < pairs_; ++p) {
        if (attached_[p] == (p < n)) continue;   // TUNSETQUEUE takes rtnl: only on change
        // Recorded even when it fails, so a failing channel costs one ioctl
        // per change, not one per command.
        attached_[p] = p < n;
        if (int err = backend_->set_queue_enabled(p, p < n); err != 0)
            KGUEST_LOG_LIMITED(log_limit_, "virtio-net: %s: TUNSETQUEUE %u: %s", backend_->describe().c_str(), p,
                               std::strerror(err));
    }
    active_pairs_ = n;
    for (unsigned p = 0; p < n; ++p) loop_->mark(static_cast<std::uint16_t>(2 * p));
}

bool VirtioNet::queue_error(std::uint16_t q, GuestError e) {
    // 2.1.2: a broken ring: DEVICE_NEEDS_RESET, and hands off until reset.
    // One line per activation at most, and rate-limited across them: a guest
    // looping reset -> DRIVER_OK -> broken ring -> kick must not flood stderr.
    if (!logged_error_)
        KGUEST_LOG_LIMITED(log_limit_, "virtio-net: queue %u: %s; device needs reset", static_cast<unsigned>(q), e.reason);
    logged_error_ = true;
    broken_ = true;
    fail();
    return false;
}

void VirtioNet::backend_closed(unsigned p, int err) {
    if (closed_) return;
    log_msg("virtio-net: %s (queue pair %u): %s; link down, dropping frames from now on",
            backend_->describe().c_str(), p, std::strerror(err));
    closed_ = true;   // rx_pump posts no read from now on
    // 5.1.4: the link is down for good; 2.5.1: tell the driver (with
    // VIRTIO_NET_F_STATUS it reads status again).
    link_status_.store(0);
    notify_config_changed();
}

void VirtioNet::maybe_notify(std::uint16_t q) {
    // 2.7.7.2 / 2.7.10: interrupt only when the driver wants one.
    if (queues_[q].needs_notification()) notify_used(q);
}

// ---- Receive (5.1.6.3, 5.1.6.4) ----

bool VirtioNet::next_rx_chain(unsigned p, DescChain& out, Rx& why, int& budget) {
    Pair& s = *pair_[p];
    if (stale()) {   // reset() gave up waiting for this pass: hands off
        why = Rx::error;
        return false;
    }
    if (!s.rx_held.empty()) {
        out = std::move(s.rx_held.front());
        s.rx_held.pop_front();
        return true;
    }
    if (budget <= 0) {   // every chain counts, even one given back at once
        why = Rx::yield;
        return false;
    }
    --budget;
    Virtqueue& vq = queues_[2 * p];
    const PopStatus st = vq.pop_or_enable_notifications(out);
    if (st == PopStatus::ok) return true;
    if (st == PopStatus::empty) {
        why = Rx::no_buffers;   // notifications stay enabled: the guest kicks when it refills
        return false;
    }
    queue_error(static_cast<std::uint16_t>(2 * p), vq.error());
    why = Rx::error;
    return false;
}

VirtioNet::Rx VirtioNet::rx_deliver(unsigned p, int& budget) {
    Pair& s = *pair_[p];
    Virtqueue& vq = queues_[2 * p];
    std::uint8_t* pkt = s.rx_buf.data();
    const std::size_t total = s.rx_len;
    VirtioNetHdr hdr;
    std::memcpy(&hdr, pkt, sizeof hdr);
    // 5.1.6.4.1: without GUEST_CSUM the device MUST set flags to zero.
    if (!guest_csum_) hdr.flags = 0;
    Rx why = Rx::done;

    if (!mergeable_) {
        // 5.1.6.3.1: without MRG_RXBUF a frame goes into one chain.
        DescChain c;
        if (!next_rx_chain(p, c, why, budget)) return why;
        if (c.writable_len() < total) {
            rx_dropped_.fetch_add(1, std::memory_order_relaxed);
            KGUEST_LOG_LIMITED(log_limit_, "virtio-net: %zu-byte frame does not fit a %llu-byte receive buffer; dropped",
                               total - kVnetHdrLen, static_cast<unsigned long long>(c.writable_len()));
            s.rx_held.push_front(std::move(c));   // may fit the next frame
            return Rx::done;
        }
        hdr.num_buffers = 1;
        std::memcpy(pkt, &hdr, sizeof hdr);
        c.write(*mem_, 0, pkt, total);
        vq.push_used(c.head(), static_cast<std::uint32_t>(total));
    } else {
        // 5.1.6.4.2: as many buffers as it takes, counted in num_buffers.
        std::vector<DescChain>& got = s.scratch;
        got.clear();
        std::uint64_t room = 0;
        while (room < total) {
            DescChain c;
            if (!next_rx_chain(p, c, why, budget)) {
                for (auto it = got.rbegin(); it != got.rend(); ++it) s.rx_held.push_front(std::move(*it));
                got.clear();
                return why;
            }
            // 5.1.6.3.1: each buffer at least a header long; give back any other.
            if (c.writable_len() < kVnetHdrLen) {
                KGUEST_LOG_LIMITED(log_limit_, "virtio-net: receive buffer shorter than the header");
                vq.push_used(c.head(), 0);
                continue;
            }
            room += c.writable_len();
            got.push_back(std::move(c));
        }
        hdr.num_buffers = static_cast<std::uint16_t>(got.size());
        std::memcpy(pkt, &hdr, sizeof hdr);
        std::size_t off = 0;
        for (const DescChain& c : got) {
            const std::size_t n = std::min<std::size_t>(c.writable_len(), total - off);
            c.write(*mem_, 0, pkt + off, n);
            vq.push_used(c.head(), static_cast<std::uint32_t>(n));
            off += n;
        }
        got.clear();
    }
    rx_packets_.fetch_add(1, std::memory_order_relaxed);
    rx_bytes_.fetch_add(total - kVnetHdrLen, std::memory_order_relaxed);
    return Rx::done;
}

bool VirtioNet::rx_pump(unsigned p) {
    if (p >= active_pairs_) return false;
    const auto q = static_cast<std::uint16_t>(2 * p);
    Virtqueue& vq = queues_[q];
    if (!vq.ready()) return false;
    Pair& s = *pair_[p];
    const std::uint16_t used_before = vq.used_idx();
    const std::size_t room = backend_->has_vnet_hdr() ? 0 : kVnetHdrLen;
    vq.disable_notifications();
    bool more = true;   // stopped by the budget, not by the backend or the guest
    int budget = kBudget;   // chains popped, whether they took a frame or not
    for (int n = 0; n < kBudget; ++n) {
        if (!s.rx_pending) {
            if (closed_) {
                more = false;
                break;
            }
            const NetIoResult r = backend_->read_frame(p, std::span(s.rx_buf).subspan(room));
            if (r.status == NetIo::again) {
                if (!s.rx_reading) post_read(p);
                more = false;
                break;
            }
            if (r.status == NetIo::drop) {
                rx_dropped_.fetch_add(1, std::memory_order_relaxed);
                continue;
            }
            if (r.status == NetIo::closed) {
                backend_closed(p, r.err);
                more = false;
                break;
            }
            if (room != 0) std::memset(s.rx_buf.data(), 0, room);   // a zero header: no offloads
            s.rx_len = room + r.len;
            s.rx_pending = true;
        }
        const Rx res = rx_deliver(p, budget);
        if (res == Rx::error) return false;
        if (res == Rx::yield) break;
        if (res == Rx::no_buffers) {
            s.rx_wait = true;   // no read until the guest kicks
            more = false;
            break;
        }
        s.rx_pending = false;
    }
    if (vq.used_idx() != used_before) maybe_notify(q);
    return more;
}

// ---- Transmit (5.1.6.2) ----

bool VirtioNet::tx_pump(unsigned p) {
    const auto q = static_cast<std::uint16_t>(2 * p + 1);
    Virtqueue& vq = queues_[q];
    Pair& s = *pair_[p];
    if (!vq.ready() || s.tx_blocked) return false;
    const std::uint16_t used_before = vq.used_idx();
    auto pass = Virtqueue::Pass::stopped;
    std::optional<DescChain> held = std::move(s.tx_held);   // the backend refused it last time: first
    s.tx_held.reset();
    if (!held || tx_frame(p, *held)) {
        pass = vq.service(kBudget, [&](const DescChain& c) { return tx_frame(p, c); });
        if (pass == Virtqueue::Pass::error) queue_error(q, vq.error());
    }
    post_writes(p);   // the whole batch in the loop's next io_uring_submit
    if (vq.used_idx() != used_before) maybe_notify(q);
    return pass == Virtqueue::Pass::more;
}

bool VirtioNet::tx_frame(unsigned p, const DescChain& c) {
    const auto q = static_cast<std::uint16_t>(2 * p + 1);
    Pair& s = *pair_[p];
    if (stale()) return false;   // reset() gave up waiting for this pass: hands off
    // 5.1.6.2: header then frame, in the readable part.
    const std::uint64_t len = c.readable_len();
    if (len < kVnetHdrLen) return queue_error(q, {"transmit chain shorter than the virtio-net header"});
    if (len > kMaxPacketLen) return queue_error(q, {"transmit frame larger than 65562 bytes"});
    if (closed_) {
        tx_dropped_.fetch_add(1, std::memory_order_relaxed);
        queues_[q].push_used(c.head(), 0);
        return true;
    }
    s.iov.clear();
    std::uint64_t skip = backend_->has_vnet_hdr() ? 0 : kVnetHdrLen;
    for (const DescChainElem& e : c.elems()) {
        if (e.write) break;
        if (skip >= e.len) {
            skip -= e.len;
            continue;
        }
        mem_->append_iovec(e.addr + skip, e.len - skip, s.iov);   // checked by pop()
        skip = 0;
    }
    const NetIoResult r = backend_->write_frame(p, s.iov);
    if (r.status == NetIo::again) {   // the backend's output queue is full: wait for a write
        s.tx_held = c;
        s.tx_blocked = true;
        return false;
    }
    if (r.status == NetIo::ok) {
        tx_packets_.fetch_add(1, std::memory_order_relaxed);
        tx_bytes_.fetch_add(len - kVnetHdrLen, std::memory_order_relaxed);
    } else {
        tx_dropped_.fetch_add(1, std::memory_order_relaxed);
        if (r.status == NetIo::closed) backend_closed(p, r.err);
        else
            KGUEST_LOG_LIMITED(log_limit_, "virtio-net: %s: transmit: %s", backend_->describe().c_str(),
                               std::strerror(r.err));
    }
    queues_[q].push_used(c.head(), 0);
    return true;
}

// ---- Control queue (5.1.6.5) ----

std::uint8_t VirtioNet::ctrl_command(const DescChain& c) {
    std::uint8_t cls_cmd[2];
    c.read(*mem_, 0, cls_cmd, 2);
    // 5.1.6.5.5: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, le16 virtqueue_pairs in 1..max.
    if (cls_cmd[0] == VIRTIO_NET_CTRL_MQ && cls_cmd[1] == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET &&
        has(negotiated_, VIRTIO_NET_F_MQ) && c.readable_len() >= 4) {
        std::uint16_t n = 0;
        c.read(*mem_, 2, &n, 2);
        if (n >= 1 && n <= pairs_) {
            if (n == active_pairs_) return VIRTIO_NET_OK;   // nothing to change
            // Every change costs the host a TUNSETQUEUE (rtnl) per moved
            // pair: a few a second, the rest refused (see virtio_net.hpp).
            std::uint64_t refused = 0;
            if (!pair_changes_.allow(refused)) {
                KGUEST_LOG_LIMITED(log_limit_, "virtio-net: VQ_PAIRS_SET %u refused: more than %u changes a second",
                                   static_cast<unsigned>(n), kPairChangesPerSecond);
                return VIRTIO_NET_ERR;
            }
            set_active_pairs(n);
            return VIRTIO_NET_OK;
        }
    }
    return VIRTIO_NET_ERR;
}

bool VirtioNet::ctrl_pump() {
    const auto q = static_cast<std::uint16_t>(num_queues_ - 1);
    Virtqueue& vq = queues_[q];
    if (!vq.ready()) return false;
    const std::uint16_t used_before = vq.used_idx();
    const Virtqueue::Pass pass = vq.service(kBudget, [&](const DescChain& c) {
        // 5.1.6.5: class, command, data (readable); ack (writable).
        if (c.readable_len() < 2 || c.writable_len() < 1)
            return queue_error(q, {"malformed control command"});
        const std::uint8_t ack = ctrl_command(c);
        c.write(*mem_, 0, &ack, 1);
        vq.push_used(c.head(), 1);
        return true;
    });
    if (pass == Virtqueue::Pass::error) queue_error(q, vq.error());
    if (pass == Virtqueue::Pass::error || pass == Virtqueue::Pass::stopped) return false;
    if (vq.used_idx() != used_before) maybe_notify(q);
    return pass == Virtqueue::Pass::more;
}

} // namespace kguest
