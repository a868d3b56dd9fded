// RAII for fds and mappings (see fd.hpp), and the errno-carrying exception.
#include "devices/base/fd.hpp"
#include "devices/base/error.hpp"

#include <cstring>
#include <sys/mman.h>
#include <unistd.h>

namespace kguest {

void Fd::reset() {
    if (fd_ >= 0) {
        ::close(fd_);  // close() errors are not actionable here.
        fd_ = -1;
    }
}

void Mapping::reset() {
    if (addr_ != nullptr) {
        ::munmap(addr_, len_);
        addr_ = nullptr;
        len_ = 0;
    }
}

SysError::SysError(const std::string& call, int err)
    : std::runtime_error(call + ": " + std::strerror(err) + " (errno " + std::to_string(err) + ")"),
      err_(err) {}

void throw_errno(const std::string& call) { throw SysError(call, errno); }

} // namespace kguest
