// Host setup failures are exceptions, caught once in main() and printed as one
// line. SysError carries the name of the failing call and its errno, so a
// message reads "KVM_CREATE_VM: Permission denied (errno 13)".
// Guest-driven paths never throw: they log and carry on (see log.hpp), and
// what the guest did wrong is a GuestError.
#pragma once

#include <stdexcept>
#include <string>

namespace kguest {

class SysError : public std::runtime_error {
public:
    SysError(const std::string& call, int err);
    int err() const { return err_; }

private:
    int err_;
};

// Throws SysError(call, errno). Use right after a failed syscall or ioctl.
[[noreturn]] void throw_errno(const std::string& call);

// The one error of guest-driven paths: never thrown; the device logs the
// static `reason` (rate-limited) and sets DEVICE_NEEDS_RESET.
struct GuestError {
    const char* reason = "";
};

// A bad command line, config or image: the user's error, exit status 2.
class UsageError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

} // namespace kguest
