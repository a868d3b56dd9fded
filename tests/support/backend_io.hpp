// Drives a NetBackend's I/O requests from a test, one call at a time, the
// way VirtioNet on its EventLoop does: posts a read when the backend needs
// one, submits its queued writes, and hands every completion back. Tests only.
#pragma once

#include "devices/net_backend.hpp"

#include <chrono>
#include <cstdint>
#include <liburing.h>
#include <span>
#include <stdexcept>
#include <vector>

namespace kguest::test {

class BackendIo {
public:
    explicit BackendIo(NetBackend& b) : b_(b), reading_(b.num_queues(), false) {
        if (io_uring_queue_init(64, &ring_, 0) < 0) throw std::runtime_error("io_uring_queue_init");
    }
    ~BackendIo() {
        // Cancel and wait: the requests point into the backend's buffers.
        if (io_uring_sqe* sqe = io_uring_get_sqe(&ring_)) {
            io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
            io_uring_sqe_set_data64(sqe, kCancel);
        }
        io_uring_submit(&ring_);
        while (in_flight_ > 0 && reap(2000)) {
        }
        io_uring_queue_exit(&ring_);
    }
    BackendIo(const BackendIo&) = delete;
    BackendIo& operator=(const BackendIo&) = delete;

    // The backend's next frame, reading (waiting up to wait_ms for data) as needed.
    NetIoResult read_frame(unsigned q, std::span<std::uint8_t> buf, int wait_ms = 10) {
        const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
        for (;;) {
            const NetIoResult r = b_.read_frame(q, buf);
            if (r.status != NetIo::again) return r;
            if (!reading_[q]) {
                io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
                prep_sqe(sqe, b_.read_op(q));
                io_uring_sqe_set_data64(sqe, kRead | q);
                reading_[q] = true;
                ++in_flight_;
                io_uring_submit(&ring_);
            }
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
            reap(left.count() > 0 ? static_cast<int>(left.count()) : 0);
            // Also when reads keep completing at once (a backend that re-reads
            // a dead fd): the deadline holds.
            if (std::chrono::steady_clock::now() >= end) return b_.read_frame(q, buf);
        }
    }

    // Submits the queued output and hands back completions for up to
    // wait_ms: ok once nothing is left, closed if a write said so, else again.
    NetIo flush(unsigned q, int wait_ms = 1000) {
        const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
        for (;;) {
            while (b_.wants_write(q)) {
                io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
                if (sqe == nullptr) break;
                unsigned slot = 0;
                prep_sqe(sqe, b_.write_op(q, slot));
                io_uring_sqe_set_data64(sqe, kWrite | std::uint64_t{slot} << 8 | q);
                ++in_flight_;
                ++writes_;
            }
            io_uring_submit(&ring_);
            reap(0);
            if (closed_) return NetIo::closed;
            if (!b_.wants_write(q) && writes_ == 0) return NetIo::ok;
            if (std::chrono::steady_clock::now() >= end) return NetIo::again;
            reap(10);
        }
    }

private:
    static constexpr std::uint64_t kRead = 1ull << 56, kWrite = 2ull << 56, kCancel = 3ull << 56;

    // Hands back the completions there are, waiting up to wait_ms for the
    // first; false if none came.
    bool reap(int wait_ms) {
        io_uring_cqe* cqe;
        __kernel_timespec ts{wait_ms / 1000, (wait_ms % 1000) * 1000000ll};
        if (io_uring_wait_cqe_timeout(&ring_, &cqe, &ts) != 0) return false;
        do {
            const std::uint64_t t = io_uring_cqe_get_data64(cqe);
            const int res = cqe->res;
            io_uring_cqe_seen(&ring_, cqe);
            const std::uint64_t kind = t & (0xffull << 56), low = t & ((1ull << 56) - 1);
            if (kind != kCancel) --in_flight_;
            if (kind == kRead) {
                reading_[low] = false;
                b_.read_done(static_cast<unsigned>(low), res);
            } else if (kind == kWrite) {
                --writes_;
                unsigned lost = 0;
                if (b_.write_done(static_cast<unsigned>(low & 0xff), static_cast<unsigned>(low >> 8), res, lost) ==
                    NetIo::closed)
                    closed_ = true;
            }
        } while (io_uring_peek_cqe(&ring_, &cqe) == 0);
        return true;
    }

    NetBackend& b_;
    io_uring ring_{};
    std::vector<bool> reading_;
    std::uint64_t in_flight_ = 0;
    long writes_ = 0;
    bool closed_ = false;
};

} // namespace kguest::test
