// The per-thread-kind allow-lists and the SIGSYS reporter (see seccomp.hpp).
// The lists come from each thread kind's code paths, grouped by why a call is
// needed, and are checked by running the kvm suite with them
// (scripts/seccomp-audit lists any call the kernel logged as outside them).
#include "vmm/app/seccomp.hpp"
#include "devices/base/error.hpp"
#include "devices/base/fd.hpp"

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <seccomp.h>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/seccomp.h>

namespace kguest {

namespace {

// Every kind: stderr logging, malloc, locks and condition variables, clocks,
// thread exit, and the reporter's own re-raise (rt_sigprocmask, gettid,
// tgkill; tgkill is further limited to this process, and mmap and mprotect
// to no PROT_EXEC, in allow()). read/write also serve the eventfds every kind
// signals through. poll and sendto: write_nowait (devices/base/log.hpp), which
// every thread's log lines and the vCPUs' console bytes go through.
// sigaltstack: the sanitizer runtimes call it when a signal handler returns
// (seen: the ASan build's vCPU-list test died of SIGSYS in sigaltstack right
// after its SIGUSR1 handler); it only moves the calling thread's signal stack.
constexpr const char* kCommon[] = {
    "read", "write", "readv", "writev", "close", "lseek", "fstat", "newfstatat",
    "mmap", "munmap", "mremap", "mprotect", "madvise", "brk",
    "futex", "sched_yield", "nanosleep", "clock_nanosleep", "clock_gettime", "gettimeofday",
    "rt_sigreturn", "rt_sigprocmask", "restart_syscall", "getpid", "gettid", "getrandom",
    "exit", "exit_group", "poll", "ppoll", "sendto", "sigaltstack",
};
// vCPU threads: KVM_RUN and the register/LAPIC ioctls, the ioeventfd and irqfd
// set-up a guest's PCI writes trigger (on the VM fd).
constexpr const char* kVcpu[] = {"ioctl"};
// Device loops: io_uring, the backends' sockets and TAP (TUNSETOFFLOAD on
// feature negotiation), the balloon's page returns (madvise, above), and
// virtio-rng's rate-limit timer (timerfd_settime).
constexpr const char* kDevice[] = {"io_uring_enter", "io_uring_register", "ioctl",
                                   "recvfrom", "recvmsg", "sendmsg", "timerfd_settime"};
// Control API: Boost.Asio (epoll, its timerfd, non-blocking sockets), and the
// answers' sources: /proc/self/status and smaps, mincore over guest RAM,
// KVM's per-vCPU stats fds (pread), pause's vCPU kicks (tgkill) and ioctls.
constexpr const char* kApi[] = {"epoll_wait", "epoll_pwait", "epoll_ctl", "accept4", "accept", "shutdown",
                                "recvfrom", "recvmsg", "sendmsg", "getsockopt", "setsockopt",
                                "getsockname", "getpeername", "ioctl", "fcntl", "timerfd_settime",
                                "openat", "pread64", "mincore"};
// Console input: poll on stdin (or the PTY master, or the console socket)
// and the stop eventfd; the serial IRQ (ioctl); the socket's clients (accept4).
constexpr const char* kConsole[] = {"ioctl", "accept4"};
// Main thread after start-up: waits on the signalfd and the stop eventfd,
// the exit report (vCPU ioctls, stats fds), the terminal's restore, and
// tearing everything down (the API socket's unlink, io_uring, the acceptor).
constexpr const char* kMain[] = {"ioctl", "pread64", "unlink", "unlinkat", "lstat",
                                 "epoll_ctl", "shutdown", "io_uring_enter", "fcntl"};

// Hack, sanitizer builds only: the ASan runtime probes whether memory is
// readable by writing it into a pipe (sanitizer_common's
// IsAccessibleMemoryRange). Seen: the ASan build's bare VMM died of SIGSYS in
// pipe2 (flags 0, from libasan, on the API thread) on its first request, and
// strace showed ten such pipe2 calls per request.
#if defined(__SANITIZE_ADDRESS__)
constexpr const char* kSanitizerRuntime[] = {"pipe2"};
#else
constexpr std::span<const char* const> kSanitizerRuntime{};
#endif

std::span<const char* const> list_for(ThreadKind kind) {
    switch (kind) {
    case ThreadKind::main: return kMain;
    case ThreadKind::vcpu: return kVcpu;
    case ThreadKind::device: return kDevice;
    case ThreadKind::api: return kApi;
    case ThreadKind::console: return kConsole;
    }
    return {};
}

// Owns a libseccomp context.
struct Ctx {
    scmp_filter_ctx ctx;
    explicit Ctx(std::uint32_t def) : ctx(seccomp_init(def)) {
        if (ctx == nullptr) throw std::runtime_error("seccomp_init failed");
    }
    ~Ctx() { seccomp_release(ctx); }
    Ctx(const Ctx&) = delete;
    Ctx& operator=(const Ctx&) = delete;
};

void allow(Ctx& c, const char* name) {
    const int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) throw std::runtime_error(std::string("seccomp: unknown system call ") + name);
    int rc;
    if (std::strcmp(name, "tgkill") == 0)   // signals to this process's own threads only
        rc = seccomp_rule_add(c.ctx, SCMP_ACT_ALLOW, nr, 1, SCMP_A0(SCMP_CMP_EQ, static_cast<scmp_datum_t>(::getpid())));
    else if (std::strcmp(name, "mmap") == 0 || std::strcmp(name, "mprotect") == 0)   // never new code
        rc = seccomp_rule_add(c.ctx, SCMP_ACT_ALLOW, nr, 1, SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0));
    else
        rc = seccomp_rule_add(c.ctx, SCMP_ACT_ALLOW, nr, 0);
    if (rc < 0) throw SysError(std::string("seccomp_rule_add ") + name, -rc);
}

std::vector<sock_filter> build(ThreadKind kind, SeccompMode mode) {
    Ctx c(mode == SeccompMode::on ? SCMP_ACT_TRAP : SCMP_ACT_LOG);
    // A 32-bit or x32 system call is never kguest's: end the process.
    if (int rc = seccomp_attr_set(c.ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS); rc < 0)
        throw SysError("seccomp_attr_set", -rc);
    for (const char* name : kCommon) allow(c, name);
    allow(c, "tgkill");
    for (const char* name : list_for(kind)) allow(c, name);
    for (const char* name : kSanitizerRuntime) allow(c, name);
    // libseccomp 2.5 exports BPF only to an fd.
    Fd fd(::memfd_create("kguest-seccomp", MFD_CLOEXEC));
    if (!fd.valid()) throw_errno("memfd_create");
    if (int rc = seccomp_export_bpf(c.ctx, fd.get()); rc < 0) throw SysError("seccomp_export_bpf", -rc);
    const off_t size = ::lseek(fd.get(), 0, SEEK_END);
    if (size < 0) throw_errno("lseek");
    std::vector<sock_filter> prog(static_cast<std::size_t>(size) / sizeof(sock_filter));
    if (::pread(fd.get(), prog.data(), prog.size() * sizeof(sock_filter), 0) !=
        static_cast<ssize_t>(prog.size() * sizeof(sock_filter)))
        throw_errno("pread seccomp program");
    return prog;
}

// The reporter's names, filled in before any filter exists.
constexpr int kNamedSyscalls = 512;
char g_names[kNamedSyscalls][28];
thread_local const char* t_kind = "unconfined";

// Async-signal-safe: appends to a fixed buffer.
struct Line {
    char buf[256];
    std::size_t n = 0;
    void add(const char* s) {
        while (*s && n < sizeof buf) buf[n++] = *s++;
    }
    void add_number(long v) {
        char tmp[24];
        int i = 0;
        unsigned long u = v < 0 ? 0UL - static_cast<unsigned long>(v) : static_cast<unsigned long>(v);
        do tmp[i++] = static_cast<char>('0' + u % 10); while ((u /= 10) && i < 23);
        if (v < 0 && n < sizeof buf) buf[n++] = '-';
        while (i > 0 && n < sizeof buf) buf[n++] = tmp[--i];
    }
};

void on_sigsys(int sig, siginfo_t* si, void*) {
    const int nr = si->si_syscall;
    Line l;
    l.add("kguest: seccomp: the ");
    l.add(t_kind);
    l.add(" thread made system call ");
    l.add_number(nr);
    l.add(" (");
    l.add(nr >= 0 && nr < kNamedSyscalls && g_names[nr][0] ? g_names[nr] : "unknown");
    l.add("), which its allow-list forbids; killing the VMM (--seccomp log or off to debug)\r\n");
    [[maybe_unused]] ssize_t r = ::write(STDERR_FILENO, l.buf, l.n);
    // SA_RESETHAND restored the default action (death) and SA_NODEFER left
    // the signal unblocked, so this kills the process with SIGSYS.
    ::raise(sig);
}

} // namespace

std::optional<SeccompMode> parse_seccomp_mode(std::string_view s) {
    if (s == "on") return SeccompMode::on;
    if (s == "log") return SeccompMode::log;
    if (s == "off") return SeccompMode::off;
    return std::nullopt;
}

std::span<const char* const> seccomp_allow_list(ThreadKind kind) { return list_for(kind); }

SeccompFilters::SeccompFilters(SeccompMode mode) : mode_(mode) {
    if (mode == SeccompMode::off) return;
    for (std::size_t k = 0; k < kThreadKinds; ++k) programs_[k] = build(static_cast<ThreadKind>(k), mode);
}

int SeccompFilters::install(ThreadKind kind) const noexcept {
    if (mode_ == SeccompMode::off) return 0;
    // Without CAP_SYS_ADMIN a filter needs no_new_privs (seccomp(2)).
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
    const auto& p = programs_[static_cast<std::size_t>(kind)];
    sock_fprog prog{static_cast<unsigned short>(p.size()), const_cast<sock_filter*>(p.data())};
    t_kind = thread_kind_name(kind);   // for the reporter, before the first trap can come
    // FLAG_LOG: a trapped call is also in the kernel's log (as a `log` one is).
    const unsigned flags = mode_ == SeccompMode::on ? SECCOMP_FILTER_FLAG_LOG : 0;
    if (::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog) != 0) return errno;
    return 0;
}

void install_sigsys_reporter() {
    for (int nr = 0; nr < kNamedSyscalls; ++nr) {
        char* name = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, nr);
        if (name == nullptr) continue;
        std::strncpy(g_names[nr], name, sizeof g_names[nr] - 1);
        std::free(name);
    }
    struct sigaction sa {};
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO | SA_RESETHAND | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (::sigaction(SIGSYS, &sa, nullptr) != 0) throw_errno("sigaction SIGSYS");
}

} // namespace kguest
