// The VMM's confinement after set-up (see confine.hpp). The gate the early
// threads wait on is process-wide state, set up and torn down by the one
// Confinement.
#include "vmm/app/confine.hpp"
#include "devices/base/error.hpp"
#include "devices/base/log.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <grp.h>
#include <linux/capability.h>
#include <mutex>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace kguest {

namespace {

// Fds kguest may open after set-up: the control API's connections (at most
// ApiLimits::max_connections, 32) and the /proc files its answers read.
constexpr rlim_t kFdHeadroom = 64;

struct Gate {
    const SeccompFilters* filters = nullptr;
    std::mutex mu;
    std::condition_variable cv;
    bool open = false;      // (mu)
    bool confine = false;   // set-up succeeded: threads confine themselves (mu)
    std::atomic<bool> opened{false};
};
Gate g_gate;

// Confines the calling thread or ends the process: a thread left unconfined
// must not go on serving the guest.
void confine_this_thread(ThreadKind kind) {
    // Each thread was named for what it does when it started ("vcpu0",
    // "api", "disk0", ...), which ps -L, top -H and the kernel's seccomp log
    // lines (comm=) show.
    const char* call = "capset";
    int err = drop_thread_capabilities();
    if (err == 0) {
        call = "seccomp";
        err = g_gate.filters->install(kind);
    }
    if (err == 0) return;
    log_msg("confining the %s thread: %s: %s (errno %d)", thread_kind_name(kind), call, std::strerror(err), err);
    std::abort();
}

void on_started(ThreadKind kind) {
    std::unique_lock lock(g_gate.mu);
    g_gate.cv.wait(lock, [] { return g_gate.open; });
    if (g_gate.confine) confine_this_thread(kind);
}

bool on_checkpoint(ThreadKind kind) {
    if (!g_gate.opened.load()) return false;
    std::lock_guard lock(g_gate.mu);
    if (g_gate.confine) confine_this_thread(kind);
    return true;
}

void open_gate(bool confine) {
    {
        std::lock_guard lock(g_gate.mu);
        if (g_gate.open) return;
        g_gate.open = true;
        g_gate.confine = confine;
    }
    g_gate.opened.store(true);
    g_gate.cv.notify_all();
}

// The highest fd open now (before the limit shrinks below it).
int highest_fd() {
    DIR* d = ::opendir("/proc/self/fd");
    if (d == nullptr) throw_errno("opendir /proc/self/fd");
    int high = 2;
    while (dirent* e = ::readdir(d)) {
        if (e->d_name[0] == '.') continue;
        high = std::max(high, std::atoi(e->d_name));
    }
    ::closedir(d);
    return high;
}

} // namespace

UserIds parse_user(const std::string& spec) {
    auto number = [&](const std::string& s) -> std::uint32_t {
        if (s.empty() || s.size() > 9 || s.find_first_not_of("0123456789") != std::string::npos)
            throw UsageError("--user '" + spec + "': need UID or UID:GID (numbers)");
        return static_cast<std::uint32_t>(std::stoul(s));
    };
    const std::size_t colon = spec.find(':');
    const std::uint32_t uid = number(spec.substr(0, colon));
    const std::uint32_t gid = colon == std::string::npos ? uid : number(spec.substr(colon + 1));
    if (uid == 0 || gid == 0) throw UsageError("--user '" + spec + "': need an unprivileged user and group, not 0");
    return {uid, gid};
}

int drop_thread_capabilities() noexcept {
    // The bounding set only limits what an execve could gain (and kguest
    // runs nothing); dropping it needs CAP_SETPCAP, which a thread that left
    // uid 0 no longer has, so EPERM is no failure. EINVAL: past the last cap.
    for (int cap = 0; cap < 64; ++cap)
        if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno == EINVAL) break;
    // EINVAL: a kernel before 4.3 has no ambient set.
    (void)::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
    if (::syscall(SYS_capset, &hdr, data) != 0) return errno;
    return 0;
}

Confinement::Confinement(const ConfineOptions& opt) : opt_(opt) {
    if (opt_.user && ::geteuid() != 0) throw UsageError("--user: kguest must be started as root to switch users");
    // Nothing is inherited on purpose beyond stdin, stdout, stderr and keep_fds.
    std::vector<int> keep = opt_.keep_fds;
    std::sort(keep.begin(), keep.end());
    unsigned from = 3;
    for (int fd : keep) {
        if (fd < 3 || static_cast<unsigned>(fd) < from) continue;
        if (static_cast<unsigned>(fd) > from && ::close_range(from, static_cast<unsigned>(fd) - 1, 0) != 0)
            throw_errno("close_range");
        from = static_cast<unsigned>(fd) + 1;
    }
    if (::close_range(from, ~0U, 0) != 0) throw_errno("close_range");
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) throw_errno("prctl PR_SET_NO_NEW_PRIVS");
    if (opt_.seccomp == SeccompMode::on) install_sigsys_reporter();
    filters_ = std::make_unique<SeccompFilters>(opt_.seccomp);
    g_gate.filters = filters_.get();
    {
        std::lock_guard lock(g_gate.mu);
        g_gate.open = false;
        g_gate.confine = false;
    }
    g_gate.opened.store(false);
    set_thread_hooks({on_started, on_checkpoint});
}

Confinement::~Confinement() {
    open_gate(false);
    set_thread_hooks({});
    g_gate.filters = nullptr;
}

void Confinement::setup_done() {
    try {
        if (opt_.user) {
            // Groups first: after setresuid there is no right left to change them.
            const gid_t gid = opt_.user->gid;
            if (::setgroups(1, &gid) != 0) throw_errno("setgroups");
            if (::setresgid(gid, gid, gid) != 0) throw_errno("setresgid");
            if (::setresuid(opt_.user->uid, opt_.user->uid, opt_.user->uid) != 0) throw_errno("setresuid");
        }
        if (int err = drop_thread_capabilities()) throw SysError("capset", err);
        if (opt_.bare_vmm) {
            open_gate(true);
            return;
        }
        const rlim_t nofile = static_cast<rlim_t>(highest_fd()) + 1 + kFdHeadroom;
        rlimit old{};
        if (::getrlimit(RLIMIT_NOFILE, &old) != 0) throw_errno("getrlimit RLIMIT_NOFILE");
        if (nofile < old.rlim_max) {
            const rlimit lim{nofile, nofile};
            if (::setrlimit(RLIMIT_NOFILE, &lim) != 0) throw_errno("setrlimit RLIMIT_NOFILE");
        }
    } catch (...) {
        open_gate(false);
        throw;
    }
    open_gate(true);
}

void Confinement::confine_main() {
    if (int err = filters_->install(ThreadKind::main)) throw SysError("seccomp (main thread)", err);
}

} // namespace kguest
