// Where each thread the VMM starts tells the process "my own set-up is done,
// confine me now". The foundation knows nothing of seccomp or capabilities:
// the application (vmm/app/confine.hpp) sets the hooks; without them (unit
// tests, tools) both calls do nothing.
//
// Threading: the hooks are set once by the main thread before it starts any
// thread that calls them, and cleared after those threads are joined; the
// calls themselves may come from any thread.
#pragma once

#include <cstddef>

namespace kguest {

// The kinds of thread, each with its own system-call allow-list.
enum class ThreadKind : unsigned { main, vcpu, device, api, console };
inline constexpr std::size_t kThreadKinds = 5;
const char* thread_kind_name(ThreadKind kind);

struct ThreadHooks {
    // Confines the calling thread, first waiting until the process has
    // finished its set-up.
    void (*started)(ThreadKind) = nullptr;
    // Confines the calling thread if the process has finished its set-up and
    // returns true; false (and nothing done) while it has not.
    bool (*checkpoint)(ThreadKind) = nullptr;
};
void set_thread_hooks(const ThreadHooks& hooks);

// First thing on a thread whose owner cannot be waiting for it: may block
// until the process's set-up is done.
void thread_started(ThreadKind kind);
// For a thread that starts during set-up and must never block on it (a
// device loop, whose owner joins it if set-up fails): call before each batch
// of work; it confines the thread once set-up is done, then costs one load.
void thread_checkpoint(ThreadKind kind);

} // namespace kguest
