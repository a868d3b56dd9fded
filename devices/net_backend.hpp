// Packet backends for virtio-net (devices/virtio_net.hpp): where the guest's
// Ethernet frames go on the host. A NetBackend is one or more packet channels
// ("queues", one per virtqueue pair), each an fd whose I/O runs on the
// device's event loop (devices/base/event_loop.hpp): the backend describes
// the request it wants (IoOp) and takes back its result. Nothing in the data
// path makes a system call or blocks. Two kinds:
//
//   TapBackend     a Linux TAP interface (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR,
//                  IFF_MULTI_QUEUE for several queues): every frame carries a
//                  12-byte struct virtio_net_hdr_v1 (VIRTIO 1.2 5.1.6), so
//                  offloads pass through. One READ or WRITE is one frame.
//   StreamBackend  a connected UNIX stream socket speaking QEMU's
//                  `-netdev stream` / passt framing: a 4-byte big-endian
//                  length, then the frame. No vnet header.
//
// Setup throws SysError or UsageError; the data path reports through return
// values. A backend is used by one thread at a time (the device's loop), so
// it has no locks. The buffers an IoOp points at belong to the backend and
// must outlive the request: drain the ring before destroying the backend.
#pragma once

#include "devices/base/event_loop.hpp"
#include "devices/base/fd.hpp"

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <sys/uio.h>
#include <vector>

namespace kguest {

// 5.1.6: struct virtio_net_hdr_v1 (VERSION_1 always has num_buffers).
inline constexpr std::size_t kVnetHdrLen = 12;
// Largest frame (Ethernet header included, vnet header excluded): a 64 KiB
// GSO packet plus its Ethernet header (QEMU's NET_BUFSIZE with the header).
inline constexpr std::size_t kMaxFrameLen = 65550;
inline constexpr std::size_t kMaxPacketLen = kVnetHdrLen + kMaxFrameLen;   // 65562

using MacAddress = std::array<std::uint8_t, 6>;

// What a `--net` option asks for.
struct NetConfig {
    enum class Kind { tap, stream };
    Kind kind = Kind::tap;
    std::string target;          // TAP interface name or socket path
    MacAddress mac{};
    unsigned queue_pairs = 1;    // tap only: IFF_MULTI_QUEUE when > 1
    // tap only: TAP queues opened by someone else (Cloud Hypervisor's
    // vm.add-net with SCM_RIGHTS, libvirt, Kata), one per queue pair. Not
    // owned: the backend takes duplicates, so the VM can be rebuilt from the
    // same config; `target` is then only for messages.
    std::vector<int> tap_fds;
    std::string id;              // the API's name for it ("" = _netN)
};

inline constexpr unsigned kMaxNetQueuePairs = 16;

std::string format_mac(const MacAddress& mac);

// The outcome of one frame transfer.
enum class NetIo {
    ok,       // a whole frame moved; `len` bytes (vnet header included if any)
    again,    // nothing moved: no complete frame yet (post a read) / the
              // output queue is full (wait for a write's completion)
    drop,     // this frame was lost (too big, transient error); carry on
    closed,   // the channel is gone for good (peer hung up, fatal error)
};
struct NetIoResult {
    NetIo status = NetIo::again;
    std::size_t len = 0;
    int err = 0;   // errno for drop/closed, 0 otherwise
};

class NetBackend {
public:
    virtual ~NetBackend() = default;

    // Packet channels (1 unless a multi-queue TAP); q below is < num_queues().
    virtual unsigned num_queues() const = 0;
    // Whether frames carry a 12-byte virtio_net_hdr_v1 in front, both ways.
    virtual bool has_vnet_hdr() const = 0;

    // Receive. read_frame() hands out one received frame (with any vnet
    // header) per call into `buf` (kMaxPacketLen bytes). On `again` the caller
    // posts the read read_op() describes (one per queue) and passes its
    // result (bytes or -errno) to read_done().
    virtual NetIoResult read_frame(unsigned q, std::span<std::uint8_t> buf) = 0;
    virtual IoOp read_op(unsigned q) = 0;
    virtual void read_done(unsigned q, int res) = 0;

    // Transmit. write_frame() copies a frame (with any vnet header) into the
    // output queue: ok, again (full until a write completes) or lost (drop,
    // closed). While wants_write(), write_op() describes a write of queued
    // output in slot < write_slots() (the most writes in flight per queue);
    // write_done() answers ok, drop or closed and counts in `lost` the
    // accepted frames that will never leave.
    virtual NetIoResult write_frame(unsigned q, std::span<const iovec> frame) = 0;
    virtual bool wants_write(unsigned q) const = 0;
    virtual IoOp write_op(unsigned q, unsigned& slot) = 0;
    virtual unsigned write_slots() const = 0;
    virtual NetIo write_done(unsigned q, unsigned slot, int res, unsigned& lost) = 0;

    // TUN_F_* offloads the guest takes on received frames (TUNSETOFFLOAD),
    // and attaching or detaching channel q (TUNSETQUEUE): 0 or an errno.
    virtual int set_offloads(unsigned /*tun_flags*/) { return 0; }
    virtual int set_queue_enabled(unsigned /*q*/, bool /*enabled*/) { return 0; }

    // For messages: "tap kgb0", "stream /run/passt.sock".
    virtual std::string describe() const = 0;
};

inline constexpr unsigned kTapTxSlots = 64;   // frames a TAP queue holds for writing

class TapBackend final : public NetBackend {
public:
    // Opens (creating it when missing: CAP_NET_ADMIN) the TAP interface
    // `ifname` with `queues` channels. Throws SysError naming the failing call.
    explicit TapBackend(const std::string& ifname, unsigned queues = 1);
    // Adopts duplicates of TAP queue fds another process opened (TUNSETIFF
    // done there): each must be IFF_TAP with IFF_VNET_HDR and IFF_NO_PI, as
    // libvirt opens them. Throws UsageError for a wrong fd, SysError else.
    explicit TapBackend(const std::vector<int>& fds);

    unsigned num_queues() const override { return static_cast<unsigned>(fds_.size()); }
    bool has_vnet_hdr() const override { return true; }
    NetIoResult read_frame(unsigned q, std::span<std::uint8_t> buf) override;
    IoOp read_op(unsigned q) override;
    void read_done(unsigned q, int res) override;
    NetIoResult write_frame(unsigned q, std::span<const iovec> frame) override;
    bool wants_write(unsigned q) const override { return !queues_[q].ready.empty(); }
    IoOp write_op(unsigned q, unsigned& slot) override;
    unsigned write_slots() const override { return kTapTxSlots; }
    NetIo write_done(unsigned q, unsigned slot, int res, unsigned& lost) override;
    int set_offloads(unsigned tun_flags) override;
    int set_queue_enabled(unsigned q, bool enabled) override;
    std::string describe() const override { return "tap " + name_; }

private:
    // One queue's TAP fd: vnet header size set, offloads off, TX slots free.
    void add_queue(Fd fd);
    struct Queue {
        std::vector<std::uint8_t> in = std::vector<std::uint8_t>(kMaxPacketLen + 1);   // +1: a cut frame shows
        NetIoResult got;             // what the last completed read brought
        bool has = false;
        std::vector<std::vector<std::uint8_t>> out = std::vector<std::vector<std::uint8_t>>(kTapTxSlots);
        std::vector<unsigned> free, ready;   // slots: unused; filled, not yet submitted (in order)
        bool attached = true;        // TUNSETIFF attaches it; TUNSETQUEUE may detach it
    };
    std::string name_;   // as the kernel named it
    std::vector<Fd> fds_;
    std::vector<Queue> queues_;
};

inline constexpr std::size_t kStreamMaxQueued = 1 << 20;   // output bytes before `again`

class StreamBackend final : public NetBackend {
public:
    // Connects to the UNIX stream socket at `path`; throws SysError or UsageError.
    explicit StreamBackend(const std::string& path);
    // Takes a connected stream socket, e.g. one end of a socketpair.
    explicit StreamBackend(Fd connected, std::string name = "socket");

    unsigned num_queues() const override { return 1; }
    bool has_vnet_hdr() const override { return false; }
    NetIoResult read_frame(unsigned q, std::span<std::uint8_t> buf) override;
    IoOp read_op(unsigned q) override;
    void read_done(unsigned q, int res) override;
    NetIoResult write_frame(unsigned q, std::span<const iovec> frame) override;
    bool wants_write(unsigned) const override { return !sending_ && (out_head_ < out_.size() || !next_.empty()); }
    IoOp write_op(unsigned q, unsigned& slot) override;
    unsigned write_slots() const override { return 1; }
    NetIo write_done(unsigned q, unsigned slot, int res, unsigned& lost) override;
    std::string describe() const override { return "stream " + name_; }

private:
    void init();

    Fd fd_;
    std::string name_;
    // Received bytes not yet returned: in_[in_head_, in_tail_); skip_: the
    // rest of an oversized frame being discarded.
    std::vector<std::uint8_t> in_;
    std::size_t in_head_ = 0, in_tail_ = 0;
    std::size_t skip_ = 0, asked_ = 0;
    bool eof_ = false;
    int err_ = 0;
    // out_[out_head_, size()) is being sent (so it never grows meanwhile);
    // frames accepted since wait in next_.
    std::vector<std::uint8_t> out_, next_;
    std::vector<std::size_t> out_ends_, next_ends_;   // where each frame ends in out_ / next_, in order
    std::size_t out_head_ = 0;
    bool sending_ = false;
};

// Opens the backend `config` describes. Throws SysError / UsageError.
std::unique_ptr<NetBackend> open_backend(const NetConfig& config);

} // namespace kguest
