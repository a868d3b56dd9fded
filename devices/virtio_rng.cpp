// virtio-rng device model (VIRTIO 1.2 section 5.4): the requestq its
// EventLoop serves, the source reads and the token bucket (see virtio_rng.hpp).
#include "devices/virtio_rng.hpp"
#include "devices/base/error.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sys/timerfd.h>

namespace kguest {

VirtioRng::VirtioRng(Fd source, RngLimit limit)
    : source_(std::move(source)), limit_(limit), tokens_(limit.burst), last_refill_(std::chrono::steady_clock::now()),
      buf_(std::make_unique<std::uint8_t[]>(kMaxRead)) {
    const int t = ::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    if (t < 0) throw_errno("timerfd_create");
    timer_ = Fd(t);
    read_done_.dev = this;
    timer_done_.dev = this;
    loop_ = std::make_unique<EventLoop>("virtio-rng", 1, [this](std::uint16_t q) { return service(q); });
}

VirtioRng::~VirtioRng() {
    reset();
    loop_->stop();   // cancels and waits for the reads in flight (into buf_, timer_value_)
}

void VirtioRng::read_config(std::uint64_t, std::span<std::uint8_t> data) {
    std::fill(data.begin(), data.end(), 0xff);   // 5.4.4: no configuration space
}

RngCounters VirtioRng::counters() const {
    constexpr auto o = std::memory_order_relaxed;
    return {bytes_.load(o), requests_.load(o), throttled_.load(o), bad_chains_.load(o)};
}

void VirtioRng::activate(std::span<Virtqueue> queues, GuestMemory& mem) {
    loop_->run_and_wait([this, queues, &mem] {
        queues_ = queues;
        mem_ = &mem;
        loop_->mark(0);   // a buffer added and kicked before DRIVER_OK lost its kick
    });
}

void VirtioRng::reset() {
    // 2.4: after this nothing touches the old ring. A read still in flight
    // goes into buf_ (host memory) and is dropped when it completes.
    loop_->run_and_wait([this] {
        queues_ = {};
        mem_ = nullptr;
        pending_.reset();
        ++generation_;
    });
}

// ---- On the loop ----

void VirtioRng::refill() {
    if (limit_.rate == 0) return;
    const auto now = std::chrono::steady_clock::now();
    // Capped at 10 s, so the product below cannot overflow for any rate that
    // fits the bucket (the bucket fills within a second at any useful rate).
    const auto ns = std::min<std::int64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_refill_).count(), 10'000'000'000);
    const auto add = static_cast<std::uint64_t>(static_cast<unsigned __int128>(ns) * limit_.rate / 1'000'000'000u);
    if (add == 0) return;   // keep the fraction: last_refill_ stays where it was
    tokens_ = std::min(limit_.burst, tokens_ + add);
    last_refill_ = now;
}

void VirtioRng::wait_for(std::chrono::nanoseconds delay) {
    itimerspec its{};
    its.it_value.tv_sec = static_cast<time_t>(delay.count() / 1'000'000'000);
    its.it_value.tv_nsec = static_cast<long>(delay.count() % 1'000'000'000);
    if (::timerfd_settime(timer_.get(), 0, &its, nullptr) != 0) {
        KGUEST_LOG_LIMITED(log_limit_, "virtio-rng: timerfd_settime: %s (errno %d)", std::strerror(errno), errno);
        return;   // the next kick serves the queue again
    }
    waiting_ = true;
    loop_->submit({IoOp::Kind::read, timer_.get(), &timer_value_, sizeof timer_value_}, timer_done_);
}

void VirtioRng::timer_done(int /*res*/) {
    waiting_ = false;
    loop_->mark(0);
}

void VirtioRng::broken(const char* reason) {
    bad_chains_.fetch_add(1, std::memory_order_relaxed);
    KGUEST_LOG_LIMITED(log_limit_, "virtio-rng: requestq: %s; device needs reset", reason);
    pending_.reset();
    queues_ = {};   // hands off until the driver resets the device
    fail();
}

bool VirtioRng::service(std::uint16_t q) {
    // Bus Master Enable off (PCI 3.0 6.2.2): nothing until the transport kicks again.
    if (q != 0 || queues_.empty() || !queues_[0].ready() || !dma_enabled()) return false;
    if (reading_ || waiting_) return false;   // their completion serves the queue again
    Virtqueue& vq = queues_[0];
    if (!pending_) {
        DescChain chain;
        vq.disable_notifications();
        const PopStatus st = vq.pop_or_enable_notifications(chain);
        if (st == PopStatus::empty) return false;
        if (st == PopStatus::error) {
            broken(vq.error().reason);
            return false;
        }
        // 5.4.6.2: "The driver MUST NOT place driver-readable buffers into the queue."
        if (chain.readable_len() != 0 || chain.writable_len() == 0) {
            broken(chain.readable_len() != 0 ? "a chain with driver-readable buffers" : "a chain with no writable byte");
            return false;
        }
        pending_ = std::move(chain);
    }
    std::uint64_t n = std::min<std::uint64_t>(pending_->writable_len(), kMaxRead);
    if (limit_.rate != 0) {
        // Wait until the bucket holds the whole buffer (or all it can hold):
        // a trickle of a few bytes per buffer would cost the guest a round
        // trip per trickle.
        refill();
        const std::uint64_t want = std::min(n, limit_.burst);
        if (tokens_ < want) {
            throttled_.fetch_add(1, std::memory_order_relaxed);
            // At least a millisecond (no timer churn), at most 10 s (any rate).
            const auto ns = static_cast<unsigned __int128>(want - tokens_) * 1'000'000'000u / limit_.rate + 1;
            wait_for(std::chrono::nanoseconds(
                static_cast<std::int64_t>(std::clamp<unsigned __int128>(ns, 1'000'000, 10'000'000'000))));
            return false;
        }
        n = std::min(n, tokens_);
    }
    reading_ = true;
    read_generation_ = generation_;
    loop_->submit({IoOp::Kind::read, source_.get(), buf_.get(), static_cast<std::size_t>(n)}, read_done_);
    return false;
}

void VirtioRng::read_done(int res) {
    reading_ = false;
    if (read_generation_ != generation_ || !pending_ || queues_.empty()) {   // reset meanwhile: dropped
        loop_->mark(0);
        return;
    }
    if (res <= 0) {
        // EOF of a file, or an error: the chain waits, and the source is tried again in a second.
        KGUEST_LOG_LIMITED(log_limit_, "virtio-rng: the source gave no bytes (%s); retrying in 1 s",
                           res == 0 ? "end of file" : std::strerror(-res));
        wait_for(std::chrono::seconds(1));
        return;
    }
    if (!dma_enabled()) {   // bus mastering went off meanwhile: the bytes are dropped, the chain waits
        return;            // the transport kicks the queue when it comes back on
    }
    Virtqueue& vq = queues_[0];
    const auto len = static_cast<std::uint32_t>(res);
    pending_->write(*mem_, 0, buf_.get(), len);   // fits: len <= writable_len
    const std::uint16_t head = pending_->head();
    pending_.reset();
    if (limit_.rate != 0) tokens_ -= std::min<std::uint64_t>(tokens_, len);
    vq.push_used(head, len);
    bytes_.fetch_add(len, std::memory_order_relaxed);
    requests_.fetch_add(1, std::memory_order_relaxed);
    if (!vq.failed() && vq.needs_notification()) notify_used(0);
    loop_->mark(0);
}

} // namespace kguest
