// seccomp-BPF allow-lists, one per thread kind (devices/base/thread_start.hpp),
// and the SIGSYS reporter that names a forbidden system call before the
// process dies of it.
//
// The lists are built with libseccomp into BPF programs by the main thread
// before any thread needs one; install() is then a single seccomp(2) call on
// the thread that wants confining. A filter binds the thread that installs it
// and the threads it creates afterwards (filters stack; the strictest answer
// wins); who installs what, and in which order, is vmm/app/confine.hpp's job.
//
// Mode `on`: a call outside the list traps (SIGSYS); the reporter writes
// "kguest: seccomp: the vcpu thread made system call 41 (socket), ..." with
// write(2) and a name table filled in before (libseccomp's resolver allocates,
// so it is not async-signal-safe), then re-raises SIGSYS with the default
// action, which kills the process. Mode `log`: such calls are allowed and the
// kernel logs them (audit type 1326, in dmesg), for finding what a list
// lacks. Mode `off`: nothing is built or installed.
//
// Threading: build SeccompFilters and install the reporter on one thread,
// then install() from any thread.
#pragma once

#include "devices/base/thread_start.hpp"

#include <array>
#include <optional>
#include <span>
#include <string_view>
#include <vector>
#include <linux/filter.h>

namespace kguest {

enum class SeccompMode { off, log, on };
std::optional<SeccompMode> parse_seccomp_mode(std::string_view s);

class SeccompFilters {
public:
    // Builds every kind's program; throws SysError (naming the libseccomp
    // call) on failure. `off` builds none.
    explicit SeccompFilters(SeccompMode mode);
    SeccompMode mode() const { return mode_; }
    // Sets no_new_privs and installs `kind`'s list on the calling thread;
    // 0, or the errno of the failing call. Does nothing in mode `off`.
    int install(ThreadKind kind) const noexcept;

private:
    SeccompMode mode_;
    std::array<std::vector<sock_filter>, kThreadKinds> programs_;
};

// The system calls `kind` may make (besides the ones every kind may make).
std::span<const char* const> seccomp_allow_list(ThreadKind kind);

// Installs the SIGSYS handler described above; throws SysError.
void install_sigsys_reporter();

} // namespace kguest
