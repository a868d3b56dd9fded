// The event monitor (see events.hpp).
#include "vmm/app/events.hpp"
#include "devices/base/error.hpp"
#include "devices/base/log.hpp"

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <fcntl.h>
#include <unistd.h>

namespace kguest {

PathOrFd parse_path_or_fd(const std::string& option, const std::string& spec) {
    PathOrFd r;
    if (spec.rfind("fd=", 0) == 0) {
        const std::string v = spec.substr(3);
        int fd = -1;
        auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), fd, 10);
        if (v.empty() || ec != std::errc() || end != v.data() + v.size() || fd < 3)
            throw UsageError(option + " '" + spec + "': fd= needs an inherited descriptor number, 3 or more");
        if (::fcntl(fd, F_GETFD) < 0)
            throw UsageError(option + " '" + spec + "': fd " + v + " is not open");
        r.fd = fd;
        return r;
    }
    r.path = spec.rfind("path=", 0) == 0 ? spec.substr(5) : spec;
    if (r.path.empty() || r.path.find(',') != std::string::npos)
        throw UsageError(option + " '" + spec + "': need path=PATH or fd=N");
    return r;
}

EventMonitor::EventMonitor(const std::string& spec) {
    const PathOrFd where = parse_path_or_fd("--event-monitor", spec);
    if (where.fd >= 0) {
        fd_ = Fd(where.fd);
        if (::fcntl(fd_.get(), F_SETFD, FD_CLOEXEC) != 0) throw_errno("fcntl FD_CLOEXEC (event monitor)");
        return;
    }
    fd_ = Fd(::open(where.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (!fd_.valid()) throw SysError("open event monitor " + where.path, errno);
}

std::string EventMonitor::format(std::chrono::nanoseconds since_start, const char* source, const char* event) {
    const auto ns = static_cast<unsigned long long>(since_start.count());
    char line[256];
    std::snprintf(line, sizeof line,
                  "{\"timestamp\":{\"secs\":%llu,\"nanos\":%llu},\"source\":\"%s\",\"event\":\"%s\",\"properties\":null}\n",
                  ns / 1000000000ull, ns % 1000000000ull, source, event);
    return line;
}

void EventMonitor::emit(const char* source, const char* event) {
    const std::string line = format(std::chrono::steady_clock::now() - start_, source, event);
    if (write_nowait(fd_.get(), line.data(), line.size()) != line.size()) dropped_.fetch_add(1);
}

} // namespace kguest
