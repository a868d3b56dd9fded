// virtio-net (VIRTIO 1.2 section 5.1), the device half: moves Ethernet frames
// between the guest's receive/transmit virtqueues and a NetBackend
// (net_backend.hpp). Queues are rx0, tx0, rx1, tx1, ..., then the control
// queue when there is more than one pair (5.1.2). Every frame is preceded by
// a 12-byte struct virtio_net_hdr_v1 (5.1.6); for backends without one the
// device writes a zero header on RX and strips the header on TX.
//
// Threading: the device runs on its own EventLoop (devices/base/event_loop.hpp
// documents the model); only the loop thread touches the queues, guest memory
// and the backend after construction. queue_notify() only kicks the loop;
// activate(), reset() and take_notify_fds() run their part on the loop and
// wait for it (run_and_wait's timeout; a late reset still stops the loop at
// its next chain), so when reset() returns the loop no longer touches the
// queues.
// counters() is safe from any thread. Nothing on the guest-driven paths
// throws; a malformed ring or an oversized TX frame sets DEVICE_NEEDS_RESET
// and the device leaves its queues alone until reset.
//
// A backend that goes away for good (a deleted TAP, a passt that exited)
// takes the link down: status loses VIRTIO_NET_S_LINK_UP (5.1.4), the driver
// gets a configuration change notification, one line is logged, and the
// device reads nothing more from it (TX chains are used and counted dropped).
//
// The channel ioctls (TUNSETQUEUE, TUNSETOFFLOAD) take the host's rtnl lock,
// so the device issues them only when the state changes, and at most
// kPairChangesPerSecond VQ_PAIRS_SET changes a second: a change beyond that
// is refused with VIRTIO_NET_ERR rather than applied later, since 5.1.6.5.5
// holds the device to the new count once the command is in the used ring.
#pragma once

#include "devices/net_backend.hpp"
#include "devices/virtio.hpp"
#include "devices/base/event_loop.hpp"
#include "devices/base/log.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace kguest {

// 5.1.3: feature bits.
inline constexpr unsigned VIRTIO_NET_F_CSUM = 0, VIRTIO_NET_F_GUEST_CSUM = 1, VIRTIO_NET_F_MTU = 3,
                          VIRTIO_NET_F_MAC = 5, VIRTIO_NET_F_GUEST_TSO4 = 7, VIRTIO_NET_F_GUEST_TSO6 = 8,
                          VIRTIO_NET_F_GUEST_ECN = 9, VIRTIO_NET_F_HOST_TSO4 = 11, VIRTIO_NET_F_HOST_TSO6 = 12,
                          VIRTIO_NET_F_HOST_ECN = 13, VIRTIO_NET_F_MRG_RXBUF = 15, VIRTIO_NET_F_STATUS = 16,
                          VIRTIO_NET_F_CTRL_VQ = 17, VIRTIO_NET_F_MQ = 22;
// 5.1.4: status field.
inline constexpr std::uint16_t VIRTIO_NET_S_LINK_UP = 1;
// 5.1.6: virtio_net_hdr gso_type.
inline constexpr std::uint8_t VIRTIO_NET_HDR_GSO_NONE = 0;
// 5.1.6.5: control queue.
inline constexpr std::uint8_t VIRTIO_NET_OK = 0, VIRTIO_NET_ERR = 1, VIRTIO_NET_CTRL_MQ = 4,
                              VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0;

// 5.1.6: struct virtio_net_hdr_v1, little-endian.
struct VirtioNetHdr {
    std::uint8_t flags;
    std::uint8_t gso_type;
    std::uint16_t hdr_len;
    std::uint16_t gso_size;
    std::uint16_t csum_start;
    std::uint16_t csum_offset;
    std::uint16_t num_buffers;
};
static_assert(sizeof(VirtioNetHdr) == kVnetHdrLen);

// Traffic counters for the VMM's exit summary (frame bytes, headers excluded).
struct NetCounters {
    std::uint64_t rx_packets = 0, rx_bytes = 0, rx_dropped = 0;
    std::uint64_t tx_packets = 0, tx_bytes = 0, tx_dropped = 0;
};

class VirtioNet final : public LoopDevice {
public:
    static constexpr std::uint16_t kQueueSize = 256;
    static constexpr std::uint16_t kDefaultMtu = 1500;
    static constexpr unsigned kPairChangesPerSecond = 5;   // VQ_PAIRS_SET changes (see above)

    // Queue pairs = backend->num_queues(). Starts the event loop. Throws
    // SysError, or std::invalid_argument on a null backend or too many queues.
    VirtioNet(std::unique_ptr<NetBackend> backend, const MacAddress& mac, std::uint16_t mtu = kDefaultMtu);
    ~VirtioNet() override;   // stops and joins the loop

    VirtioNet(const VirtioNet&) = delete;
    VirtioNet& operator=(const VirtioNet&) = delete;

    // VirtioDevice.
    std::uint16_t device_id() const override { return 1; }
    std::uint64_t device_features() const override { return features_; }
    bool accept_features(std::uint64_t features) override;
    std::uint16_t num_queues() const override { return num_queues_; }
    std::uint16_t max_queue_size(std::uint16_t q) const override { return q < num_queues_ ? kQueueSize : 0; }
    std::size_t config_size() const override { return sizeof config_; }
    void read_config(std::uint64_t offset, std::span<std::uint8_t> data) override;
    void write_config(std::uint64_t offset, std::span<const std::uint8_t> data) override;
    void activate(std::span<Virtqueue> queues, GuestMemory& mem) override;
    void reset() override;

    NetCounters counters() const;
    unsigned queue_pairs() const { return pairs_; }

private:
    struct Pair;
    struct IoDone;
    enum class Rx { done, no_buffers, yield, error };

    bool service(std::uint16_t q);
    void post_read(unsigned p);
    void post_writes(unsigned p);
    void read_done(unsigned p, int res);
    void write_done(unsigned p, unsigned slot, int res);
    void do_activate(std::span<Virtqueue> queues, GuestMemory& mem, std::uint64_t features);
    void do_deactivate();
    bool rx_pump(unsigned p);
    Rx rx_deliver(unsigned p, int& budget);
    bool next_rx_chain(unsigned p, DescChain& out, Rx& why, int& budget);
    bool tx_pump(unsigned p);
    bool tx_frame(unsigned p, const DescChain& c);
    bool ctrl_pump();
    std::uint8_t ctrl_command(const DescChain& chain);
    void set_active_pairs(unsigned n);
    void set_offloads(unsigned tun_flags);
    bool queue_error(std::uint16_t q, GuestError e);   // false, for `return queue_error(...)`
    void backend_closed(unsigned p, int err);
    void maybe_notify(std::uint16_t q);
    // The activation predates a reset() (one whose wait may have timed out).
    bool stale() const { return epoch_ != resets_.load(); }

    // Fixed at construction.
    std::unique_ptr<NetBackend> backend_;
    unsigned pairs_;
    std::uint16_t num_queues_;
    std::uint64_t features_;
    struct __attribute__((packed)) Config {   // 5.1.4 struct virtio_net_config
        std::uint8_t mac[6];
        std::uint16_t status;
        std::uint16_t max_virtqueue_pairs;
        std::uint16_t mtu;
    } config_{};   // status: see link_status_
    std::atomic<std::uint16_t> link_status_{VIRTIO_NET_S_LINK_UP};   // read by vCPUs, set by the loop
    std::atomic<std::uint64_t> resets_{0};   // reset() calls; the loop compares (stale())

    // Loop-thread state.
    bool active_ = false;
    bool broken_ = false;     // a queue failed: hands off until reset
    bool closed_ = false;     // the backend is gone
    std::uint64_t epoch_ = 0;   // resets_ when the queues were activated
    std::span<Virtqueue> queues_;
    GuestMemory* mem_ = nullptr;
    std::uint64_t negotiated_ = 0;
    bool mergeable_ = false;
    bool guest_csum_ = false;
    unsigned active_pairs_ = 1;
    std::vector<bool> attached_;   // channels attached (TUNSETQUEUE); the backend opens them all attached
    unsigned offloads_ = 0;        // TUN_F_* in force; the backend starts with none
    RateLimit pair_changes_{kPairChangesPerSecond};
    std::vector<std::unique_ptr<Pair>> pair_;
    std::atomic<std::uint64_t> rx_packets_{0}, rx_bytes_{0}, rx_dropped_{0};
    std::atomic<std::uint64_t> tx_packets_{0}, tx_bytes_{0}, tx_dropped_{0};
    RateLimit log_limit_{5};
    bool logged_error_ = false;
};

} // namespace kguest
