// virtio-net (see virtio_net.hpp): configuration space, feature negotiation,
// the control queue, and the event loop that moves frames.
//
// The loop (one thread) does all its waiting and all packet I/O in one
// io_uring: a READ on the wake eventfd and on each notify eventfd (which both
// waits and drains it); per queue pair one read from the backend (a TAP
// READ, a stream RECV) while the device wants frames, and the backend's
// writes for whatever frames the guest sent. Requests collected during an
// iteration (every frame of a TX batch among them) go to the kernel in one
// io_uring_submit. Not posting a read while the guest has no receive buffers
// is the RX backpressure: frames wait in the backend (the kernel's TAP
// queue, the socket) and nothing wakes the loop until the guest adds buffers
// and kicks. Each pump handles a bounded batch and then yields to the other
// queues. Before the loop ends it cancels what is in flight and waits for
// it, since those requests point into buffers of ours and the backend's.
#include "devices/virtio_net.hpp"

#include "devices/base/error.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <liburing.h>
#include <linux/if_tun.h>
#include <optional>
#include <poll.h>
#include <stdexcept>
#include <sys/eventfd.h>
#include <unistd.h>

namespace kguest {

namespace {

constexpr std::uint64_t kTagShift = 56;
enum : std::uint64_t { kTagWake = 1, kTagNotify = 2, kTagIn = 3, kTagOut = 4, kTagCancel = 5 };
constexpr std::uint64_t tag(std::uint64_t kind, std::uint64_t index) { return kind << kTagShift | index; }

constexpr int kBatch = 64;        // frames per pump before yielding
constexpr unsigned kRingEntries = 256;

bool has(std::uint64_t features, unsigned bit) { return (features & virtio_bit(bit)) != 0; }

} // namespace

struct VirtioNet::Ring {
    io_uring ring{};
    bool live = false;
    ~Ring() {
        if (live) io_uring_queue_exit(&ring);
    }
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
};

VirtioNet::VirtioNet(std::unique_ptr<NetBackend> backend, const MacAddress& mac, std::uint16_t mtu)
    : backend_(std::move(backend)) {
    if (!backend_) throw std::invalid_argument("virtio-net: null backend");
    pairs_ = backend_->num_queues();
    if (pairs_ < 1 || pairs_ > kMaxNetQueuePairs) throw std::invalid_argument("virtio-net: bad queue pair count");
    num_queues_ = static_cast<std::uint16_t>(2 * pairs_ + (pairs_ > 1 ? 1 : 0));

    // 5.1.3. INDIRECT_DESC: virtio-pci passes it through and Virtqueue
    // implements it; EVENT_IDX likewise.
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

    wake_fd_ = Fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!wake_fd_.valid()) throw_errno("eventfd");
    ring_ = std::make_unique<Ring>();
    if (int rc = io_uring_queue_init(kRingEntries, &ring_->ring, 0); rc < 0)
        throw SysError("io_uring_queue_init", -rc);
    ring_->live = true;
    kicks_ = std::make_unique<std::atomic<bool>[]>(num_queues_);
    evbuf_.assign(num_queues_ + 1u, 0);
    dirty_.assign(num_queues_, false);
    for (unsigned p = 0; p < pairs_; ++p) pair_.push_back(std::make_unique<Pair>());
    thread_ = std::thread([this] { loop(); });
}

VirtioNet::~VirtioNet() {
    {
        std::lock_guard lock(mu_);
        stop_ = true;
        ++req_seq_;
        req_pending_.store(1);
    }
    wake();
    if (thread_.joinable()) thread_.join();
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
    std::memcpy(data.data(), reinterpret_cast<const std::uint8_t*>(&config_) + offset, data.size());
}

void VirtioNet::write_config(std::uint64_t offset, std::span<const std::uint8_t> data) {
    // 5.1.4.2: the driver MUST NOT write the configuration (the legacy MAC
    // write is not supported): ignored.
    KGUEST_LOG_LIMITED(log_limit_, "virtio-net: ignored %zu-byte config write at %llu", data.size(),
                       static_cast<unsigned long long>(offset));
}

void VirtioNet::activate(std::span<Virtqueue> queues, GuestMemory& mem) {
    const std::uint64_t features = transport() != nullptr ? transport()->driver_features() : 0;
    std::unique_lock lock(mu_);
    want_active_ = true;
    req_queues_ = queues;
    req_mem_ = &mem;
    req_features_ = features;
    const std::uint64_t mine = ++req_seq_;
    req_pending_.store(1);
    wake();
    acked_.wait(lock, [&] { return ack_seq_ >= mine; });
}

void VirtioNet::reset() {
    // 2.4: when this returns, the loop has dropped every reference to the queues.
    std::unique_lock lock(mu_);
    want_active_ = false;
    req_queues_ = {};
    req_mem_ = nullptr;
    const std::uint64_t mine = ++req_seq_;
    req_pending_.store(1);
    wake();
    acked_.wait(lock, [&] { return ack_seq_ >= mine; });
}

void VirtioNet::queue_notify(std::uint16_t q) {
    if (q >= num_queues_) return;
    kicks_[q].store(true);
    wake();
}

bool VirtioNet::take_notify_fds(std::span<const int> fds) {
    if (fds.size() != num_queues_) return false;
    std::unique_lock lock(mu_);
    if (!notify_fds_.empty()) return false;
    notify_fds_.assign(fds.begin(), fds.end());
    const std::uint64_t mine = ++req_seq_;
    req_pending_.store(1);
    wake();
    acked_.wait(lock, [&] { return ack_seq_ >= mine; });
    return true;
}

NetCounters VirtioNet::counters() const {
    NetCounters c;
    c.rx_packets = rx_packets_.load(std::memory_order_relaxed);
    c.rx_bytes = rx_bytes_.load(std::memory_order_relaxed);
    c.rx_dropped = rx_dropped_.load(std::memory_order_relaxed);
    c.tx_packets = tx_packets_.load(std::memory_order_relaxed);
    c.tx_bytes = tx_bytes_.load(std::memory_order_relaxed);
    c.tx_dropped = tx_dropped_.load(std::memory_order_relaxed);
    return c;
}

void VirtioNet::wake() {
    const std::uint64_t one = 1;
    // EAGAIN means the counter is already huge: the loop will wake anyway.
    [[maybe_unused]] ssize_t n = ::write(wake_fd_.get(), &one, sizeof one);
}

// ---- The event loop ----

io_uring_sqe* VirtioNet::get_sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_->ring);
    if (sqe == nullptr) {   // SQ full: push what we have and retry
        io_uring_submit(&ring_->ring);
        sqe = io_uring_get_sqe(&ring_->ring);
    }
    return sqe;
}

void VirtioNet::arm_read(int fd, std::uint64_t t, std::uint64_t* buf) {
    io_uring_sqe* sqe = get_sqe();
    if (sqe == nullptr) return;   // cannot happen: entries exceed the armed requests
    io_uring_prep_read(sqe, fd, buf, sizeof *buf, 0);
    io_uring_sqe_set_data64(sqe, t);
    ++in_flight_;
}

void VirtioNet::post_read(unsigned p) {
    io_uring_sqe* sqe = get_sqe();
    if (sqe == nullptr) return;
    pair_[p]->rx_reading = true;
    backend_->prep_read(p, sqe);
    io_uring_sqe_set_data64(sqe, tag(kTagIn, p));
    ++in_flight_;
}

void VirtioNet::post_writes(unsigned p) {
    while (backend_->wants_write(p)) {
        io_uring_sqe* sqe = get_sqe();
        if (sqe == nullptr) return;
        const unsigned slot = backend_->prep_write(p, sqe);
        io_uring_sqe_set_data64(sqe, tag(kTagOut, std::uint64_t{slot} << 8 | p));
        ++in_flight_;
    }
}

void VirtioNet::drain() {
    // Cancel everything still in flight, and wait until the kernel is done
    // with our buffers: reads into the eventfd counters and the backend's
    // receive buffers, writes from its output queue.
    io_uring& ring = ring_->ring;
    if (io_uring_sqe* sqe = get_sqe()) {
        io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
        io_uring_sqe_set_data64(sqe, tag(kTagCancel, 0));
    }
    io_uring_submit(&ring);
    while (in_flight_ > 0) {
        io_uring_cqe* cqe;
        __kernel_timespec ts{2, 0};
        const int rc = io_uring_wait_cqe_timeout(&ring, &cqe, &ts);
        if (rc == -EINTR) continue;
        if (rc < 0) {
            log_msg("virtio-net: %llu io_uring requests still in flight at exit: %s",
                    static_cast<unsigned long long>(in_flight_), std::strerror(-rc));
            return;
        }
        if ((io_uring_cqe_get_data64(cqe) >> kTagShift) != kTagCancel) --in_flight_;
        io_uring_cqe_seen(&ring, cqe);
    }
}

void VirtioNet::loop() {
    io_uring& ring = ring_->ring;
    arm_read(wake_fd_.get(), tag(kTagWake, 0), &evbuf_[num_queues_]);
    for (;;) {
        const bool busy = std::find(dirty_.begin(), dirty_.end(), true) != dirty_.end();
        const int rc = busy ? io_uring_submit(&ring) : io_uring_submit_and_wait(&ring, 1);
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
            KGUEST_LOG_LIMITED(log_limit_, "virtio-net: io_uring_submit: %s", std::strerror(-rc));
            ::usleep(10000);   // never spin on a broken ring
        }
        unsigned head, seen = 0;
        io_uring_cqe* cqe;
        io_uring_for_each_cqe(&ring, head, cqe) {
            ++seen;
            const std::uint64_t t = io_uring_cqe_get_data64(cqe);
            const std::uint64_t kind = t >> kTagShift, index = t & ((std::uint64_t{1} << kTagShift) - 1);
            if (kind != kTagCancel) --in_flight_;
            const int res = cqe->res;
            const bool retry = res == -EINTR || res == -EAGAIN;
            switch (kind) {
            case kTagWake:
                if (res > 0 || retry) arm_read(wake_fd_.get(), t, &evbuf_[num_queues_]);
                break;
            case kTagNotify:
                // 2.9 via KVM_IOEVENTFD: a kick; ignored while not active.
                if (res == sizeof(std::uint64_t) && active_) dirty_[index] = true;
                if (res > 0 || retry) {
                    arm_read(loop_notify_fds_[index], t, &evbuf_[index]);
                } else {
                    KGUEST_LOG_LIMITED(log_limit_, "virtio-net: notify fd of queue %u: %s",
                                       static_cast<unsigned>(index), std::strerror(-res));
                }
                break;
            case kTagIn:
                pair_[index]->rx_reading = false;
                backend_->read_done(static_cast<unsigned>(index), res);
                if (active_) dirty_[2 * index] = true;
                break;
            case kTagOut: {
                const auto p = static_cast<unsigned>(index & 0xff), slot = static_cast<unsigned>(index >> 8);
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
                    if (active_) dirty_[2 * p + 1] = true;
                }
                break;
            }
            default:
                break;
            }
        }
        io_uring_cq_advance(&ring, seen);

        if (req_pending_.exchange(0) != 0) {
            apply_request();
            bool stop;
            {
                std::lock_guard lock(mu_);
                stop = stop_;
            }
            if (stop) {
                drain();
                return;
            }
        }
        for (std::uint16_t q = 0; q < num_queues_; ++q)
            if (kicks_[q].exchange(false) && active_) dirty_[q] = true;
        for (std::uint16_t q = 0; q < num_queues_; ++q) {
            if (!dirty_[q]) continue;
            dirty_[q] = false;
            if (!active_ || broken_) continue;
            if (pairs_ > 1 && q == num_queues_ - 1) {
                ctrl_pump();
            } else if (q % 2 == 0) {
                pair_[q / 2]->rx_wait = false;
                rx_pump(q / 2);
            } else {
                tx_pump(q / 2);
            }
        }
    }
}

void VirtioNet::apply_request() {
    std::lock_guard lock(mu_);
    if (stop_) {
        if (active_) do_deactivate();
    } else {
        if (!notify_fds_.empty() && !notify_fds_armed_) {
            loop_notify_fds_ = notify_fds_;
            for (std::uint16_t q = 0; q < num_queues_; ++q) arm_read(loop_notify_fds_[q], tag(kTagNotify, q), &evbuf_[q]);
            notify_fds_armed_ = true;
        }
        if (active_ && (!want_active_ || req_queues_.data() != queues_.data() || req_mem_ != mem_)) do_deactivate();
        if (want_active_ && !active_) do_activate();
    }
    ack_seq_ = req_seq_;
    acked_.notify_all();
}

void VirtioNet::do_activate() {
    queues_ = req_queues_;
    mem_ = req_mem_;
    negotiated_ = req_features_;
    if (queues_.size() < num_queues_ || mem_ == nullptr) {
        queues_ = {};
        return;
    }
    mergeable_ = has(negotiated_, VIRTIO_NET_F_MRG_RXBUF);
    guest_csum_ = has(negotiated_, VIRTIO_NET_F_GUEST_CSUM);
    broken_ = false;
    logged_error_ = false;
    active_ = true;
    if (backend_->has_vnet_hdr()) {
        // 5.1.6.4: the guest takes partially checksummed / GSO frames only
        // if it negotiated the GUEST_* features: tell the TAP (TUNSETOFFLOAD).
        unsigned off = 0;
        if (has(negotiated_, VIRTIO_NET_F_GUEST_CSUM)) off |= TUN_F_CSUM;
        if (has(negotiated_, VIRTIO_NET_F_GUEST_TSO4)) off |= TUN_F_TSO4;
        if (has(negotiated_, VIRTIO_NET_F_GUEST_TSO6)) off |= TUN_F_TSO6;
        if (has(negotiated_, VIRTIO_NET_F_GUEST_ECN)) off |= TUN_F_TSO_ECN;
        if (int err = backend_->set_offloads(off); err != 0)
            log_msg("virtio-net: %s: TUNSETOFFLOAD 0x%x: %s", backend_->describe().c_str(), off, std::strerror(err));
    }
    // 5.1.6.5.5: multiqueue starts disabled: pair 0 only.
    set_active_pairs(1);
    std::fill(dirty_.begin(), dirty_.end(), true);
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
    std::fill(dirty_.begin(), dirty_.end(), false);
    if (backend_->has_vnet_hdr()) backend_->set_offloads(0);
}

void VirtioNet::set_active_pairs(unsigned n) {
    for (unsigned p = 0; p < pairs_; ++p)
        if (int err = backend_->set_queue_enabled(p, p < n); err != 0)
            KGUEST_LOG_LIMITED(log_limit_, "virtio-net: %s: TUNSETQUEUE %u: %s", backend_->describe().c_str(), p,
                               std::strerror(err));
    active_pairs_ = n;
    for (unsigned p = 0; p < n; ++p) dirty_[2 * p] = true;
}

void VirtioNet::queue_error(std::uint16_t q, const char* what) {
    // 2.1.2: a broken ring: DEVICE_NEEDS_RESET, and hands off until reset.
    if (!logged_error_) log_msg("virtio-net: queue %u: %s; device needs reset", static_cast<unsigned>(q), what);
    logged_error_ = true;
    broken_ = true;
    fail();
}

void VirtioNet::backend_closed(unsigned p, int err) {
    if (!closed_)
        log_msg("virtio-net: %s (queue pair %u): %s; dropping frames from now on", backend_->describe().c_str(), p,
                std::strerror(err));
    closed_ = true;
}

void VirtioNet::maybe_notify(std::uint16_t q) {
    // 2.7.7.2 / 2.7.10: interrupt only when the driver wants one.
    if (queues_[q].needs_notification()) notify_used(q);
}

// ---- Receive (5.1.6.3, 5.1.6.4) ----

bool VirtioNet::next_rx_chain(unsigned p, DescChain& out, Rx& why) {
    Pair& s = *pair_[p];
    if (!s.rx_held.empty()) {
        out = std::move(s.rx_held.front());
        s.rx_held.pop_front();
        return true;
    }
    Virtqueue& vq = queues_[2 * p];
    PopStatus st = vq.pop(out);
    if (st == PopStatus::empty && vq.enable_notifications()) {
        // Buffers arrived while we enabled notifications: take them.
        vq.disable_notifications();
        st = vq.pop(out);
    }
    if (st == PopStatus::ok) return true;
    if (st == PopStatus::empty) {
        why = Rx::no_buffers;   // notifications stay enabled: the guest kicks when it refills
        return false;
    }
    queue_error(static_cast<std::uint16_t>(2 * p), vq.error_reason());
    why = Rx::error;
    return false;
}

VirtioNet::Rx VirtioNet::rx_deliver(unsigned p) {
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
        if (!next_rx_chain(p, c, why)) return why;
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
        // 5.1.6.4.2: spread the frame over as many buffers as it takes, the
        // count in the first header's num_buffers.
        std::vector<DescChain>& got = s.scratch;
        got.clear();
        std::uint64_t room = 0;
        while (room < total) {
            DescChain c;
            if (!next_rx_chain(p, c, why)) {
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

void VirtioNet::rx_pump(unsigned p) {
    if (p >= active_pairs_) return;
    const auto q = static_cast<std::uint16_t>(2 * p);
    Virtqueue& vq = queues_[q];
    if (!vq.ready()) return;
    Pair& s = *pair_[p];
    const std::uint16_t used_before = vq.used_idx();
    const std::size_t room = backend_->has_vnet_hdr() ? 0 : kVnetHdrLen;
    vq.disable_notifications();
    bool more = true;   // stopped by the batch limit, not by the backend or the guest
    for (int n = 0; n < kBatch; ++n) {
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
        const Rx res = rx_deliver(p);
        if (res == Rx::error) return;
        if (res == Rx::no_buffers) {
            s.rx_wait = true;   // no POLLIN until the guest kicks
            more = false;
            break;
        }
        s.rx_pending = false;
    }
    if (more) dirty_[q] = true;
    if (vq.used_idx() != used_before) maybe_notify(q);
}

// ---- Transmit (5.1.6.2) ----

void VirtioNet::tx_pump(unsigned p) {
    const auto q = static_cast<std::uint16_t>(2 * p + 1);
    Virtqueue& vq = queues_[q];
    Pair& s = *pair_[p];
    if (!vq.ready() || s.tx_blocked) return;
    const std::uint16_t used_before = vq.used_idx();
    const std::size_t strip = backend_->has_vnet_hdr() ? 0 : kVnetHdrLen;
    std::vector<iovec> iov;
    vq.disable_notifications();
    bool more = true;
    for (int n = 0; n < kBatch; ++n) {
        DescChain c;
        if (s.tx_held) {
            c = std::move(*s.tx_held);
            s.tx_held.reset();
        } else {
            PopStatus st = vq.pop(c);
            if (st == PopStatus::empty) {
                if (vq.enable_notifications()) {   // raced with the driver: go on
                    vq.disable_notifications();
                    continue;
                }
                more = false;
                break;
            }
            if (st == PopStatus::error) {
                queue_error(q, vq.error_reason());
                return;
            }
        }
        // 5.1.6.2: header then frame, in the readable part.
        const std::uint64_t len = c.readable_len();
        if (len < kVnetHdrLen) {
            queue_error(q, "transmit chain shorter than the virtio-net header");
            return;
        }
        if (len > kMaxPacketLen) {
            queue_error(q, "transmit frame larger than 65562 bytes");
            return;
        }
        if (closed_) {
            tx_dropped_.fetch_add(1, std::memory_order_relaxed);
            vq.push_used(c.head(), 0);
            continue;
        }
        iov.clear();
        std::uint64_t skip = strip;
        for (const DescChainElem& e : c.elems()) {
            if (e.write) break;
            if (skip >= e.len) {
                skip -= e.len;
                continue;
            }
            mem_->append_iovec(e.addr + skip, e.len - skip, iov);   // checked by pop()
            skip = 0;
        }
        const NetIoResult r = backend_->write_frame(p, iov);
        if (r.status == NetIo::again) {   // the backend's output queue is full
            s.tx_held = std::move(c);
            s.tx_blocked = true;
            more = false;
            break;
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
        vq.push_used(c.head(), 0);
    }
    post_writes(p);   // the whole batch in the next io_uring_submit
    if (more) dirty_[q] = true;
    if (vq.used_idx() != used_before) maybe_notify(q);
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
            set_active_pairs(n);
            return VIRTIO_NET_OK;
        }
    }
    return VIRTIO_NET_ERR;
}

void VirtioNet::ctrl_pump() {
    const auto q = static_cast<std::uint16_t>(num_queues_ - 1);
    Virtqueue& vq = queues_[q];
    if (!vq.ready()) return;
    const std::uint16_t used_before = vq.used_idx();
    for (int n = 0;; ++n) {
        if (n == kBatch) {   // yield; come back next iteration
            dirty_[q] = true;
            break;
        }
        DescChain c;
        const PopStatus st = vq.pop(c);
        if (st == PopStatus::empty) break;
        if (st == PopStatus::error) {
            queue_error(q, vq.error_reason());
            return;
        }
        // 5.1.6.5: class, command, data (readable); ack (writable).
        if (c.readable_len() < 2 || c.writable_len() < 1) {
            queue_error(q, "malformed control command");
            return;
        }
        const std::uint8_t ack = ctrl_command(c);
        c.write(*mem_, 0, &ack, 1);
        vq.push_used(c.head(), 1);
    }
    if (vq.used_idx() != used_before) maybe_notify(q);
}

} // namespace kguest
