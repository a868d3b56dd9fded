// Logging for kguest. One line per event on stderr, prefixed "kguest: ".
// Guest-driven paths (a bad port access, a broken virtqueue) must never flood
// the host, so they log through a RateLimit: a few lines per second, then a
// count of what was suppressed. Neither a log line nor console output ever
// waits for a slow reader of stderr/stdout (write_nowait): a vCPU may be the
// writer, holding device and bus locks.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace kguest {

void log_msg(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// Log lines stderr did not take (its reader did not keep up, or is gone).
std::uint64_t log_lines_dropped();

// Writes up to `n` bytes to `fd` without waiting for its reader; returns how
// many it took, 0 when the reader does not keep up or the fd is broken (a
// closed pipe: EPIPE, as kguest ignores SIGPIPE). It does not set O_NONBLOCK,
// which would change the open file description that a shell shares with
// other processes (the terminal, `| tee`): sockets get MSG_DONTWAIT; anything
// else is polled for room first and then given at most PIPE_BUF bytes, which
// a pipe with a free slot takes at once. Our own writers take turns, so none
// fills the room another just saw; an outside process writing into the same
// full pipe between the poll and the write could still make it wait, and so
// could a terminal with less room than the write (the console writes single
// bytes, log lines are at most 1 KiB). Thread-safe.
std::size_t write_nowait(int fd, const void* p, std::size_t n);

// Lets `burst` lines through per second; the first line after a quiet spell
// says how many were dropped. Lock-free: vCPU threads share one.
class RateLimit {
public:
    explicit RateLimit(unsigned burst = 5) : burst_(burst) {}
    // True when the caller may log now; `suppressed` gets the drop count to report.
    bool allow(std::uint64_t& suppressed);

private:
    unsigned burst_;
    std::atomic<std::uint64_t> window_{0};   // second of the current window
    std::atomic<std::uint64_t> used_{0};
    std::atomic<std::uint64_t> dropped_{0};
};

#define KGUEST_LOG_LIMITED(limit, fmt, ...)                                              \
    do {                                                                                 \
        std::uint64_t kguest_dropped_ = 0;                                               \
        if ((limit).allow(kguest_dropped_)) {                                            \
            if (kguest_dropped_ != 0)                                                    \
                ::kguest::log_msg("(%llu similar messages suppressed)",                  \
                                  static_cast<unsigned long long>(kguest_dropped_));     \
            ::kguest::log_msg(fmt, ##__VA_ARGS__);                                       \
        }                                                                                \
    } while (0)

} // namespace kguest
