// The thread confinement hooks (see thread_start.hpp).
#include "devices/base/thread_start.hpp"

#include <atomic>

namespace kguest {

namespace {
std::atomic<void (*)(ThreadKind)> g_started{nullptr};
std::atomic<bool (*)(ThreadKind)> g_checkpoint{nullptr};
thread_local bool t_confined = false;
} // namespace

const char* thread_kind_name(ThreadKind kind) {
    constexpr const char* kNames[kThreadKinds] = {"main", "vcpu", "device", "api", "console"};
    const auto i = static_cast<std::size_t>(kind);
    return i < kThreadKinds ? kNames[i] : "?";
}

void set_thread_hooks(const ThreadHooks& hooks) {
    g_started.store(hooks.started);
    g_checkpoint.store(hooks.checkpoint);
}

void thread_started(ThreadKind kind) {
    if (auto fn = g_started.load()) {
        fn(kind);
        t_confined = true;
    }
}

void thread_checkpoint(ThreadKind kind) {
    if (t_confined) return;
    if (auto fn = g_checkpoint.load(); fn != nullptr && fn(kind)) t_confined = true;
}

} // namespace kguest
