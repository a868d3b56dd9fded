// Confining `kguest run` once its set-up is done, as Firecracker and Cloud
// Hypervisor do: inherited fds closed, no_new_privs, the optional switch to
// an unprivileged user (--user), every capability dropped, RLIMIT_NOFILE cut
// to what the VMM needs, and a seccomp allow-list per thread kind
// (vmm/app/seccomp.hpp). Guest RAM is kept out of core dumps by GuestMemory
// itself (MADV_DONTDUMP).
//
// Order, and why (run_vm follows it):
//  1. The constructor, first thing in run_vm, before anything is opened:
//     closes every fd but 0-2 and keep_fds (nothing else is inherited on
//     purpose), sets
//     no_new_privs (inherited by every thread created later), installs the
//     SIGSYS reporter, builds the BPF programs, and sets the thread hooks
//     (devices/base/thread_start.hpp). Threads started during set-up are not
//     confined yet: the API thread waits in thread_started(); a device loop,
//     which must not block (the Machine joins it if set-up fails), calls
//     thread_checkpoint() after each wake, so it confines itself before it
//     serves any queue or I/O completion, the only ways a guest reaches it.
//  2. setup_done(), once KVM, guest RAM, the images, TAP devices, backend
//     sockets and the API socket are open: --user (setgroups, setresgid,
//     setresuid; glibc applies them to every thread, and leaving uid 0
//     clears every thread's capabilities), the main thread's capabilities
//     dropped, RLIMIT_NOFILE lowered, then the gate opens: each waiting or
//     checking thread drops its own capabilities (they are per thread) and
//     installs its kind's list.
//  3. Threads started after that (console input, vCPUs) do the same as
//     their first act.
//  4. confine_main(), after the main thread has started its last thread:
//     its own list. It must come last: a thread inherits the filters of the
//     thread that creates it and stacks its own on top (the strictest answer
//     wins), so a thread started after it would be bound by the main list too.
// A thread that cannot confine itself logs why and aborts the process.
//
// Threading: construct, setup_done and confine_main on the main thread; one
// Confinement per process at a time.
#pragma once

#include "vmm/app/seccomp.hpp"

#include <memory>
#include <optional>
#include <string>
#include <sys/types.h>
#include <vector>

namespace kguest {

struct UserIds {
    uid_t uid;
    gid_t gid;
};
// --user UID[:GID], numbers (GID defaults to UID); throws UsageError.
UserIds parse_user(const std::string& spec);

struct ConfineOptions {
    SeccompMode seccomp = SeccompMode::on;
    std::optional<UserIds> user;   // switch to it after set-up (needs root)
    // A bare VMM (kguest --api-socket ...): these inherited fds (the API
    // socket, the event monitor) stay open, RLIMIT_NOFILE is not cut (VMs,
    // their images and TAP devices are opened later), and confine_main() is
    // not called (the main thread builds VMs: vmm/app/lifecycle.hpp).
    bool bare_vmm = false;
    std::vector<int> keep_fds;
};

class Confinement {
public:
    explicit Confinement(const ConfineOptions& opt);   // throws
    ~Confinement();   // releases threads still waiting (unconfined: set-up failed)
    Confinement(const Confinement&) = delete;
    Confinement& operator=(const Confinement&) = delete;

    void setup_done();     // throws; waiting threads are released either way
    void confine_main();   // throws

private:
    ConfineOptions opt_;
    std::unique_ptr<SeccompFilters> filters_;
};

// Drops every capability of the calling thread (effective, permitted,
// inheritable, ambient, and the bounding set where CAP_SETPCAP allows);
// 0 or the errno of capset(2).
int drop_thread_capabilities() noexcept;

} // namespace kguest
