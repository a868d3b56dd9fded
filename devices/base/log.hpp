// Logging for kguest. One line per event on stderr, prefixed "kguest: ".
// Guest-driven paths (a bad port access, a broken virtqueue) must never flood
// the host, so they log through a RateLimit: a few lines per second, then a
// count of what was suppressed.
#pragma once

#include <atomic>
#include <cstdint>

namespace kguest {

void log_msg(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

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
