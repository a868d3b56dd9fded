// Cloud Hypervisor's event monitor (`--event-monitor path=PATH|fd=N`): one
// JSON object per line for each lifecycle step, as Cloud Hypervisor writes
// them and libvirt's ch driver (src/ch/ch_events.c) parses them:
//   {"timestamp":{"secs":0,"nanos":29228206},"source":"vm","event":"booted","properties":null}
// The timestamp is the time since the VMM started (Cloud Hypervisor's
// Instant::elapsed). Names used: vmm starting/shutdown; vm booting, booted,
// pausing, paused, resuming, resumed, rebooting, rebooted, shutdown, deleted.
//
// A write never blocks the VMM (write_nowait, devices/base/log.hpp): a
// reader that does not keep up loses lines, which are counted. Thread-safe.
#pragma once

#include "devices/base/fd.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

namespace kguest {

class EventMonitor {
public:
    // `spec` is path=PATH (opened for writing, created if missing; a FIFO's
    // open waits for its reader, as Cloud Hypervisor's does) or fd=N (an
    // inherited fd, owned from then on). Throws UsageError / SysError.
    explicit EventMonitor(const std::string& spec);

    void emit(const char* source, const char* event);
    std::uint64_t dropped() const { return dropped_.load(); }

    // The line emit() writes (exposed for tests).
    static std::string format(std::chrono::nanoseconds since_start, const char* source, const char* event);

private:
    Fd fd_;
    std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
    std::atomic<std::uint64_t> dropped_{0};
};

// Parses `path=PATH` / `fd=N` (also a bare PATH) for --api-socket and
// --event-monitor: the path, or the fd (>= 3) with an empty path. Throws UsageError.
struct PathOrFd {
    std::string path;
    int fd = -1;
};
PathOrFd parse_path_or_fd(const std::string& option, const std::string& spec);

} // namespace kguest
