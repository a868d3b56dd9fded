// virtio-rng, the entropy device (VIRTIO 1.2 section 5.4): one queue
// (requestq) of device-writable buffers, each filled with bytes read from a
// host source (/dev/urandom by default, or any file the user names: a FIFO
// fed by an entropy daemon, a regular file for tests). No feature bits, no
// configuration space (5.4.3, 5.4.4).
//
// 5.4.6.1: "The device MUST place one or more random bytes into the buffer,
// but it MAY use less than the entire buffer length." A chain gets at most
// kMaxRead bytes (what the source gave in one read). 5.4.6.2: the driver
// "MUST NOT place driver-readable buffers into the queue", so a chain with a
// readable part, or with no writable byte, is a broken ring: one
// rate-limited log line and DEVICE_NEEDS_RESET.
//
// Rate limit: a token bucket in bytes, refilled at `rate` bytes/s up to
// `burst` (rate 0 = unlimited); a buffer waits until the bucket holds all of
// it (or a full bucket), so the guest gets whole buffers. The peers: QEMU's
// virtio-rng-pci has max-bytes/period, unlimited by default; Firecracker's
// entropy device takes an optional token bucket (size, one_time_burst,
// refill_time), none by default; Cloud Hypervisor's has none. kguest limits
// by default (kDefaultLimit: 1 MiB/s with a 1 MiB burst, far above what a
// guest's hwrng driver asks for, as Linux's hw_random core reads at most a
// few dozen bytes at a time, yet a bound on how fast a guest can drain the
// host's pool through us).
//
// I/O: one read of the source in flight at a time, through the loop's
// io_uring into a host buffer (a FIFO may block; the loop never does), then
// copied into the chain by the bounds-checked DescChain::write. A reset while
// a read is in flight only drops the chain; the read's bytes are thrown
// away when it completes. When the bucket is empty, or the source gave
// nothing (EOF, an error: logged, rate-limited), the device waits on a
// timerfd read through the same io_uring, then serves the queue again.
//
// Threading: the device runs on its own EventLoop (devices/base/event_loop.hpp);
// only the loop thread touches the queue, the buffer and the bucket.
// queue_notify() only kicks the loop; activate() and reset() run their part
// on the loop and wait for it; counters() may be called from any thread.
#pragma once

#include "devices/virtio.hpp"
#include "devices/base/event_loop.hpp"
#include "devices/base/fd.hpp"
#include "devices/base/log.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>

namespace kguest {

// The rate limit: bytes per second and the bucket's size (0 rate: unlimited).
struct RngLimit {
    std::uint64_t rate = 0;
    std::uint64_t burst = 0;
};

struct RngCounters {
    std::uint64_t bytes = 0;        // served to the guest
    std::uint64_t requests = 0;     // chains answered
    std::uint64_t throttled = 0;    // times the bucket ran dry
    std::uint64_t bad_chains = 0;   // DEVICE_NEEDS_RESET
};

class VirtioRng final : public LoopDevice {
public:
    static constexpr std::uint16_t kQueueSize = 64;
    static constexpr std::size_t kMaxRead = 64 * 1024;   // bytes per chain at most
    static constexpr RngLimit kDefaultLimit{1u << 20, 1u << 20};
    static constexpr const char* kDefaultSource = "/dev/urandom";

    // Serves from `source` (an open fd, read at its file position). Starts
    // the loop; throws SysError.
    VirtioRng(Fd source, RngLimit limit);
    ~VirtioRng() override;
    VirtioRng(const VirtioRng&) = delete;
    VirtioRng& operator=(const VirtioRng&) = delete;

    RngCounters counters() const;
    const RngLimit& limit() const { return limit_; }

    // VirtioDevice.
    std::uint16_t device_id() const override { return 4; }   // 5.4.1: entropy device
    std::uint64_t device_features() const override { return virtio_bit(VIRTIO_F_INDIRECT_DESC); }
    std::uint16_t num_queues() const override { return 1; }
    std::uint16_t max_queue_size(std::uint16_t q) const override { return q == 0 ? kQueueSize : 0; }
    std::size_t config_size() const override { return 0; }   // 5.4.4: none
    void read_config(std::uint64_t, std::span<std::uint8_t> data) override;
    void write_config(std::uint64_t, std::span<const std::uint8_t>) override {}
    void activate(std::span<Virtqueue> queues, GuestMemory& mem) override;
    void reset() override;

private:
    struct ReadDone final : EventLoop::Completion {
        VirtioRng* dev;
        void complete(int res) override { dev->read_done(res); }
    };
    struct TimerDone final : EventLoop::Completion {
        VirtioRng* dev;
        void complete(int res) override { dev->timer_done(res); }
    };

    // On the loop.
    bool service(std::uint16_t q);
    void read_done(int res);
    void timer_done(int res);
    void refill();
    void wait_for(std::chrono::nanoseconds delay);
    void broken(const char* reason);

    const Fd source_;
    const RngLimit limit_;
    Fd timer_;

    // Loop thread only.
    std::span<Virtqueue> queues_;   // empty while not active
    GuestMemory* mem_ = nullptr;
    std::uint64_t generation_ = 0;  // bumped by reset: a read from before it is dropped
    bool reading_ = false;          // a source read is in flight
    bool waiting_ = false;          // a timer read is in flight
    std::uint64_t read_generation_ = 0;
    std::optional<DescChain> pending_;   // the chain the read in flight is for
    std::uint64_t tokens_ = 0;
    std::chrono::steady_clock::time_point last_refill_;
    std::unique_ptr<std::uint8_t[]> buf_;
    std::uint64_t timer_value_ = 0;
    ReadDone read_done_;
    TimerDone timer_done_;
    RateLimit log_limit_{5};

    std::atomic<std::uint64_t> bytes_{0}, requests_{0}, throttled_{0}, bad_chains_{0};
};

} // namespace kguest
