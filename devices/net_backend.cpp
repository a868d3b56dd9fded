// Packet backends for virtio-net (see net_backend.hpp): the TAP interface,
// the length-prefixed UNIX stream, and the factory.
//
// All packet I/O is io_uring requests the device's loop submits; a READ or
// RECV waits in io_uring's internal poll (no io-wq thread, seen on Linux 6.1
// and 6.18). Registered buffers (READ_FIXED) gained nothing within noise (UDP
// echo: 9,052-10,163 packets/s against 9,121-10,313 without) and were dropped.
//
// Outgoing frames are copied, so no request points into guest RAM; a full
// TAP queue (kTapTxSlots frames) or stream queue (kStreamMaxQueued bytes)
// answers `again`: the device's TX backpressure.
#include "devices/net_backend.hpp"

#include "devices/base/error.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

namespace kguest {

std::string format_mac(const MacAddress& mac) {
    char buf[18];
    std::snprintf(buf, sizeof buf, "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2], mac[3], mac[4],
                  mac[5]);
    return buf;
}

// ---- TAP ----

TapBackend::TapBackend(const std::string& ifname, unsigned queues) {
    if (ifname.empty() || ifname.size() >= IFNAMSIZ) throw UsageError("bad TAP interface name '" + ifname + "'");
    if (queues < 1 || queues > kMaxNetQueuePairs) throw UsageError("bad TAP queue count");
    name_ = ifname;
    for (unsigned q = 0; q < queues; ++q) {
        Fd fd(::open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC));
        if (!fd.valid()) throw_errno("open /dev/net/tun");
        ifreq ifr{};
        std::memcpy(ifr.ifr_name, name_.data(), name_.size());
        ifr.ifr_flags = static_cast<short>(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (queues > 1 ? IFF_MULTI_QUEUE : 0));
        if (::ioctl(fd.get(), TUNSETIFF, &ifr) != 0) throw_errno("TUNSETIFF " + name_);
        name_.assign(ifr.ifr_name, strnlen(ifr.ifr_name, IFNAMSIZ));
        add_queue(std::move(fd));
    }
}

void TapBackend::add_queue(Fd fd) {
    int hdr = static_cast<int>(kVnetHdrLen);
    if (::ioctl(fd.get(), TUNSETVNETHDRSZ, &hdr) != 0) throw_errno("TUNSETVNETHDRSZ " + name_);
    // No offloads until the guest negotiates them (VirtioNet::activate).
    if (::ioctl(fd.get(), TUNSETOFFLOAD, 0ul) != 0) throw_errno("TUNSETOFFLOAD " + name_);
    fds_.push_back(std::move(fd));
    Queue& s = queues_.emplace_back();
    for (unsigned i = kTapTxSlots; i > 0; --i) s.free.push_back(i - 1);
}

TapBackend::TapBackend(const std::vector<int>& fds) {
    if (fds.empty() || fds.size() > kMaxNetQueuePairs) throw UsageError("bad TAP queue count");
    for (int inherited : fds) {
        ifreq ifr{};
        if (::ioctl(inherited, TUNGETIFF, &ifr) != 0)
            throw UsageError("fd " + std::to_string(inherited) + " is not a TAP device (TUNGETIFF: " + std::strerror(errno) + ")");
        name_.assign(ifr.ifr_name, strnlen(ifr.ifr_name, IFNAMSIZ));
        const int want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if ((ifr.ifr_flags & (IFF_TUN | IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)) != want)
            throw UsageError("TAP " + name_ + " (fd " + std::to_string(inherited) +
                             ") was not opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR");
        // A duplicate of our own: the open file description (and O_NONBLOCK)
        // is shared with the sender, which hands it over and no longer reads it.
        Fd fd(::fcntl(inherited, F_DUPFD_CLOEXEC, 3));
        if (!fd.valid()) throw_errno("fcntl F_DUPFD_CLOEXEC (TAP " + name_ + ")");
        const int fl = ::fcntl(fd.get(), F_GETFL);
        if (fl < 0 || ::fcntl(fd.get(), F_SETFL, fl | O_NONBLOCK) != 0) throw_errno("fcntl O_NONBLOCK (TAP " + name_ + ")");
        add_queue(std::move(fd));
    }
}

namespace {
// A completion that moved nothing and says nothing about the channel.
bool retry(int res) { return res == -EINTR || res == -EAGAIN || res == -ECANCELED; }
} // namespace

NetIoResult TapBackend::read_frame(unsigned q, std::span<std::uint8_t> buf) {
    Queue& s = queues_[q];
    if (!s.has) return {NetIo::again, 0, 0};
    s.has = false;
    if (s.got.status != NetIo::ok) return s.got;
    if (s.got.len > buf.size()) return {NetIo::drop, 0, EMSGSIZE};
    std::memcpy(buf.data(), s.in.data(), s.got.len);
    return s.got;
}

IoOp TapBackend::read_op(unsigned q) {
    Queue& s = queues_[q];
    return {IoOp::Kind::read, fds_[q].get(), s.in.data(), s.in.size()};
}

void TapBackend::read_done(unsigned q, int res) {
    Queue& s = queues_[q];
    if (retry(res)) return;   // nothing came: read again
    s.has = true;
    if (res > 0) {
        // tun truncates what does not fit: a frame filling the buffer was cut.
        const auto n = static_cast<std::size_t>(res);
        s.got = n >= s.in.size() || n < kVnetHdrLen ? NetIoResult{NetIo::drop, 0, EMSGSIZE} : NetIoResult{NetIo::ok, n, 0};
    } else if (res == -EBADFD && !s.attached) {
        s.has = false;   // we detached the queue (TUNSETQUEUE): nothing to report
    } else {
        // EOF, or EBADFD on an attached queue: tun_get() found no interface,
        // which was deleted (`ip link delete`; seen with Linux 6.18). Reading
        // again would fail at once, forever: the channel is closed.
        s.got = {NetIo::closed, 0, res == 0 ? EPIPE : -res};   // the interface went away
    }
}

NetIoResult TapBackend::write_frame(unsigned q, std::span<const iovec> frame) {
    std::size_t total = 0;
    for (const iovec& v : frame) total += v.iov_len;
    if (total < kVnetHdrLen || total > kMaxPacketLen) return {NetIo::drop, 0, EMSGSIZE};
    Queue& s = queues_[q];
    if (s.free.empty()) return {NetIo::again, 0, 0};
    const unsigned slot = s.free.back();
    s.free.pop_back();
    std::vector<std::uint8_t>& out = s.out[slot];
    out.resize(total);
    std::size_t at = 0;
    for (const iovec& v : frame) {
        if (v.iov_len != 0) std::memcpy(out.data() + at, v.iov_base, v.iov_len);
        at += v.iov_len;
    }
    s.ready.push_back(slot);
    return {NetIo::ok, total, 0};
}

IoOp TapBackend::write_op(unsigned q, unsigned& slot) {
    Queue& s = queues_[q];
    slot = s.ready.front();
    s.ready.erase(s.ready.begin());
    // Not linked: io_uring issues a batch's writes in order and tun takes
    // each whole, on the spot, so frames leave in order.
    return {IoOp::Kind::write, fds_[q].get(), s.out[slot].data(), s.out[slot].size()};
}

NetIo TapBackend::write_done(unsigned q, unsigned slot, int res, unsigned& lost) {
    Queue& s = queues_[q];
    lost = 0;
    if (slot >= kTapTxSlots) return NetIo::ok;
    s.free.push_back(slot);
    if (res >= 0) return NetIo::ok;   // tun takes a frame whole
    lost = 1;   // EIO (interface down), EINVAL (bad vnet header)...: the next may pass
    return res == -EBADF || res == -EBADFD ? NetIo::closed : NetIo::drop;
}

int TapBackend::set_offloads(unsigned tun_flags) {
    for (const Fd& fd : fds_)
        if (::ioctl(fd.get(), TUNSETOFFLOAD, static_cast<unsigned long>(tun_flags)) != 0) return errno;
    return 0;
}

int TapBackend::set_queue_enabled(unsigned q, bool enabled) {
    if (fds_.size() < 2 || q >= fds_.size()) return 0;
    ifreq ifr{};
    ifr.ifr_flags = static_cast<short>(enabled ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE);
    if (::ioctl(fds_[q].get(), TUNSETQUEUE, &ifr) != 0) {
        // Attaching an attached queue or detaching a detached one: EINVAL.
        if (errno != EINVAL) return errno;
    }
    queues_[q].attached = enabled;
    return 0;
}

// ---- UNIX stream, 4-byte big-endian length prefix ----

namespace {
constexpr std::size_t kStreamInBuf = 4 * (4 + kMaxFrameLen);   // several frames per read()
}

StreamBackend::StreamBackend(const std::string& path) : name_(path) {
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    if (path.empty() || path.size() >= sizeof sa.sun_path) throw UsageError("bad socket path '" + path + "'");
    std::memcpy(sa.sun_path, path.data(), path.size());
    fd_ = Fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd_.valid()) throw_errno("socket");
    // A blocking connect (a UNIX socket connects at once or fails), then init().
    int rc;
    do rc = ::connect(fd_.get(), reinterpret_cast<const sockaddr*>(&sa), sizeof sa);
    while (rc != 0 && errno == EINTR);
    if (rc != 0) throw_errno("connect " + path);
    init();
}

StreamBackend::StreamBackend(Fd connected, std::string name) : fd_(std::move(connected)), name_(std::move(name)) {
    if (!fd_.valid()) throw SysError("stream backend", EBADF);
    init();
}

void StreamBackend::init() {
    const int fl = ::fcntl(fd_.get(), F_GETFL);
    if (fl < 0 || ::fcntl(fd_.get(), F_SETFL, fl | O_NONBLOCK) != 0) throw_errno("fcntl O_NONBLOCK " + name_);
    in_.resize(kStreamInBuf);
    out_.reserve(64 * 1024);
}

NetIoResult StreamBackend::read_frame(unsigned, std::span<std::uint8_t> buf) {
    for (;;) {
        // Discarding the rest of an oversized frame.
        if (skip_ > 0 && in_tail_ > in_head_) {
            const std::size_t n = std::min(skip_, in_tail_ - in_head_);
            in_head_ += n;
            skip_ -= n;
        }
        if (skip_ == 0 && in_tail_ - in_head_ >= 4) {
            const std::uint8_t* p = in_.data() + in_head_;
            const std::uint32_t len = std::uint32_t{p[0]} << 24 | std::uint32_t{p[1]} << 16 |
                                      std::uint32_t{p[2]} << 8 | std::uint32_t{p[3]};
            if (len > kMaxFrameLen || len > buf.size()) {
                in_head_ += 4;
                skip_ = len;
                return {NetIo::drop, 0, EMSGSIZE};
            }
            if (in_tail_ - in_head_ >= 4 + std::size_t{len}) {
                std::memcpy(buf.data(), p + 4, len);
                in_head_ += 4 + len;
                if (in_head_ == in_tail_) in_head_ = in_tail_ = 0;
                if (len == 0) continue;   // an empty frame carries nothing
                return {NetIo::ok, len, 0};
            }
        }
        if (eof_) {
            if (in_tail_ != in_head_ || skip_ != 0) {   // a frame cut short by the hang-up
                in_head_ = in_tail_ = skip_ = 0;
                return {NetIo::drop, 0, EPIPE};
            }
            return {NetIo::closed, 0, err_ ? err_ : EPIPE};
        }
        return {NetIo::again, 0, 0};   // need more bytes: the caller posts a RECV
    }
}

IoOp StreamBackend::read_op(unsigned) {
    // Compact, then receive as much as fits (always a whole frame).
    if (in_head_ > 0) {
        std::memmove(in_.data(), in_.data() + in_head_, in_tail_ - in_head_);
        in_tail_ -= in_head_;
        in_head_ = 0;
    }
    asked_ = in_.size() - in_tail_;
    return {IoOp::Kind::recv, fd_.get(), in_.data() + in_tail_, asked_};
}

void StreamBackend::read_done(unsigned, int res) {
    if (res > 0) {
        in_tail_ += static_cast<std::size_t>(res);
    } else if (res == 0) {
        eof_ = asked_ > 0;   // (no room asked for nothing: cannot happen, see read_op)
    } else if (!retry(res)) {
        eof_ = true;
        err_ = -res;
    }
}

NetIoResult StreamBackend::write_frame(unsigned, std::span<const iovec> frame) {
    std::size_t total = 0;
    for (const iovec& v : frame) total += v.iov_len;
    if (total == 0 || total > kMaxFrameLen) return {NetIo::drop, 0, EMSGSIZE};
    if (eof_ || err_) return {NetIo::closed, 0, err_ ? err_ : EPIPE};
    if (out_.size() - out_head_ + next_.size() + 4 + total > kStreamMaxQueued) return {NetIo::again, 0, 0};
    const std::uint8_t prefix[4] = {static_cast<std::uint8_t>(total >> 24), static_cast<std::uint8_t>(total >> 16),
                                    static_cast<std::uint8_t>(total >> 8), static_cast<std::uint8_t>(total)};
    next_.insert(next_.end(), prefix, prefix + 4);
    for (const iovec& v : frame)
        next_.insert(next_.end(), static_cast<const std::uint8_t*>(v.iov_base),
                     static_cast<const std::uint8_t*>(v.iov_base) + v.iov_len);
    next_ends_.push_back(next_.size());
    return {NetIo::ok, total, 0};
}

IoOp StreamBackend::write_op(unsigned, unsigned& slot) {
    if (out_head_ == out_.size()) {   // all sent: the queued frames go next
        out_.swap(next_);
        out_ends_.swap(next_ends_);
        next_.clear();
        next_ends_.clear();
        out_head_ = 0;
    }
    sending_ = true;
    slot = 0;
    return {IoOp::Kind::send, fd_.get(), out_.data() + out_head_, out_.size() - out_head_, MSG_NOSIGNAL};
}

NetIo StreamBackend::write_done(unsigned, unsigned, int res, unsigned& lost) {
    sending_ = false;
    lost = 0;
    if (res > 0) {
        out_head_ += static_cast<std::size_t>(res);   // a short send: the rest goes next
        std::size_t sent = 0;
        while (sent < out_ends_.size() && out_ends_[sent] <= out_head_) ++sent;
        out_ends_.erase(out_ends_.begin(), out_ends_.begin() + static_cast<std::ptrdiff_t>(sent));
        return NetIo::ok;
    }
    if (retry(res)) return NetIo::ok;   // send it again
    err_ = res == 0 ? EPIPE : -res;
    lost = static_cast<unsigned>(out_ends_.size() + next_ends_.size());
    out_.clear();
    next_.clear();
    out_ends_.clear();
    next_ends_.clear();
    out_head_ = 0;
    return NetIo::closed;
}

std::unique_ptr<NetBackend> open_backend(const NetConfig& config) {
    if (config.kind == NetConfig::Kind::tap && !config.tap_fds.empty()) return std::make_unique<TapBackend>(config.tap_fds);
    if (config.kind == NetConfig::Kind::tap) return std::make_unique<TapBackend>(config.target, config.queue_pairs);
    return std::make_unique<StreamBackend>(config.target);
}

} // namespace kguest
