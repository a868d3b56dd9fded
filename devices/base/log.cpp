// stderr logging and the rate limiter (see log.hpp).
#include "devices/base/log.hpp"

#include <cstdarg>
#include <cstdio>
#include <ctime>
#include <unistd.h>

namespace kguest {

void log_msg(const char* fmt, ...) {
    // One write(2) per line, so threads never interleave mid-line; "\r\n" for
    // a terminal in raw mode.
    char buf[1024];
    int n = std::snprintf(buf, sizeof buf, "kguest: ");
    va_list ap;
    va_start(ap, fmt);
    int m = std::vsnprintf(buf + n, sizeof buf - n - 2, fmt, ap);
    va_end(ap);
    if (m < 0) return;
    n += m;
    if (n > static_cast<int>(sizeof buf) - 3) n = sizeof buf - 3;
    buf[n++] = '\r';
    buf[n++] = '\n';
    ssize_t r = ::write(STDERR_FILENO, buf, n);
    (void)r;  // Nowhere left to report a failing stderr.
}

bool RateLimit::allow(std::uint64_t& suppressed) {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    auto now = static_cast<std::uint64_t>(ts.tv_sec);
    std::uint64_t w = window_.load(std::memory_order_relaxed);
    if (w != now && window_.compare_exchange_strong(w, now)) {
        used_.store(0, std::memory_order_relaxed);
    }
    if (used_.fetch_add(1, std::memory_order_relaxed) < burst_) {
        suppressed = dropped_.exchange(0, std::memory_order_relaxed);
        return true;
    }
    dropped_.fetch_add(1, std::memory_order_relaxed);
    return false;
}

} // namespace kguest
