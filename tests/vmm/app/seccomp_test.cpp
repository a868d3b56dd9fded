// The seccomp allow-lists without KVM, each in a forked child: a call
// outside a thread kind's list dies of SIGSYS and stderr names it, calls in
// every list pass, `log` lets a forbidden call through, `off` installs
// nothing.
#include "tests/support/process.hpp"
#include "vmm/app/seccomp.hpp"

#include <gtest/gtest.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace kguest {
namespace {

using test::in_child;
using test::Child;

// Installs `kind`'s list (mode `mode`) in the child, then calls socket(2),
// which no list allows.
Child socket_after(ThreadKind kind, SeccompMode mode) {
    return in_child([=] {
        const rlimit no_core{0, 0};   // the SIGSYS death would dump core
        ::setrlimit(RLIMIT_CORE, &no_core);
        install_sigsys_reporter();
        SeccompFilters f(mode);
        if (int err = f.install(kind)) {
            std::fprintf(stderr, "install: %s\n", std::strerror(err));
            ::_exit(3);
        }
        int fd = ::socket(AF_INET, SOCK_STREAM, 0);
        ::_exit(fd >= 0 ? 0 : 4);
    });
}

TEST(Seccomp, CallOutsideTheListKillsWithSigsysAndNamesIt) {
    for (ThreadKind kind : {ThreadKind::vcpu, ThreadKind::device, ThreadKind::api, ThreadKind::console,
                            ThreadKind::main}) {
        Child c = socket_after(kind, SeccompMode::on);
        ASSERT_TRUE(WIFSIGNALED(c.wstatus)) << thread_kind_name(kind) << ": status " << c.wstatus << " " << c.err;
        EXPECT_EQ(WTERMSIG(c.wstatus), SIGSYS) << thread_kind_name(kind);
        const std::string want = std::string("kguest: seccomp: the ") + thread_kind_name(kind) +
                                 " thread made system call " + std::to_string(SYS_socket) + " (socket)";
        EXPECT_NE(c.err.find(want), std::string::npos) << c.err;
    }
}

TEST(Seccomp, LogModeLetsTheCallThrough) {
    Child c = socket_after(ThreadKind::vcpu, SeccompMode::log);
    ASSERT_TRUE(WIFEXITED(c.wstatus)) << c.err;
    EXPECT_EQ(WEXITSTATUS(c.wstatus), 0) << c.err;
}

TEST(Seccomp, OffInstallsNothing) {
    Child c = socket_after(ThreadKind::vcpu, SeccompMode::off);
    ASSERT_TRUE(WIFEXITED(c.wstatus)) << c.err;
    EXPECT_EQ(WEXITSTATUS(c.wstatus), 0) << c.err;
}

TEST(Seccomp, AllowedCallsAndSignalsToOwnThreadsPass) {
    Child c = in_child([] {
        install_sigsys_reporter();
        std::signal(SIGUSR1, [](int) {});
        SeccompFilters f(SeccompMode::on);
        if (f.install(ThreadKind::vcpu) != 0) ::_exit(3);
        // Logging and a signal to this very thread (the vCPU kick's path,
        // its handler's return included): in every list.
        if (::write(STDERR_FILENO, "ok\n", 3) != 3) ::_exit(4);
        if (::syscall(SYS_tgkill, ::getpid(), ::gettid(), SIGUSR1) != 0) ::_exit(5);
        ::_exit(0);
    });
    ASSERT_TRUE(WIFEXITED(c.wstatus)) << c.wstatus << " " << c.err;
    EXPECT_EQ(WEXITSTATUS(c.wstatus), 0) << c.err;
    EXPECT_EQ(c.err, "ok\n");
}

TEST(Seccomp, SignalsToOtherProcessesAreForbidden) {
    // tgkill is allowed for this process's own threads only.
    Child c = in_child([] {
        const rlimit no_core{0, 0};
        ::setrlimit(RLIMIT_CORE, &no_core);
        install_sigsys_reporter();
        SeccompFilters f(SeccompMode::on);
        if (f.install(ThreadKind::api) != 0) ::_exit(3);
        ::syscall(SYS_tgkill, 1, 1, 0);
        ::_exit(0);
    });
    ASSERT_TRUE(WIFSIGNALED(c.wstatus)) << c.err;
    EXPECT_EQ(WTERMSIG(c.wstatus), SIGSYS);
    EXPECT_NE(c.err.find("(tgkill)"), std::string::npos) << c.err;
}

TEST(Seccomp, NoListMapsExecutableMemory) {
    Child c = in_child([] {
        const rlimit no_core{0, 0};
        ::setrlimit(RLIMIT_CORE, &no_core);
        install_sigsys_reporter();
        SeccompFilters f(SeccompMode::on);
        if (f.install(ThreadKind::device) != 0) ::_exit(3);
        void* rw = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (rw == MAP_FAILED) ::_exit(4);
        ::mprotect(rw, 4096, PROT_READ | PROT_EXEC);
        ::_exit(0);
    });
    ASSERT_TRUE(WIFSIGNALED(c.wstatus)) << c.err;
    EXPECT_EQ(WTERMSIG(c.wstatus), SIGSYS);
    EXPECT_NE(c.err.find("(mprotect)"), std::string::npos) << c.err;
}

TEST(Seccomp, ParsesModes) {
    EXPECT_EQ(parse_seccomp_mode("on"), SeccompMode::on);
    EXPECT_EQ(parse_seccomp_mode("log"), SeccompMode::log);
    EXPECT_EQ(parse_seccomp_mode("off"), SeccompMode::off);
    EXPECT_FALSE(parse_seccomp_mode("yes"));
    EXPECT_FALSE(parse_seccomp_mode(""));
}

} // namespace
} // namespace kguest
