// stderr logging and the rate limiter (see log.hpp).
#include "devices/base/log.hpp"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

namespace kguest {

namespace {
std::atomic<std::uint64_t> lines_dropped{0};
} // namespace

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
    // A line stderr cannot take now is dropped (and counted), never waited for.
    if (write_nowait(STDERR_FILENO, buf, static_cast<std::size_t>(n)) != static_cast<std::size_t>(n))
        lines_dropped.fetch_add(1, std::memory_order_relaxed);
}

std::uint64_t log_lines_dropped() { return lines_dropped.load(std::memory_order_relaxed); }

std::size_t write_nowait(int fd, const void* p, std::size_t n) {
    static std::mutex turns;   // see log.hpp: our writers never race each other for the same room
    std::lock_guard lock(turns);
    // The caller's errno survives (a log line often comes between a failing
    // call and the code that reports its errno).
    struct KeepErrno {
        int saved = errno;
        ~KeepErrno() { errno = saved; }
    } keep;
    ssize_t r = ::send(fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r >= 0) return static_cast<std::size_t>(r);
    if (errno != ENOTSOCK) return 0;   // EAGAIN: the reader is behind; EPIPE: gone
    pollfd pfd{fd, POLLOUT, 0};
    if (::poll(&pfd, 1, 0) != 1 || (pfd.revents & POLLOUT) == 0) return 0;
    r = ::write(fd, p, std::min<std::size_t>(n, PIPE_BUF));
    return r > 0 ? static_cast<std::size_t>(r) : 0;
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
