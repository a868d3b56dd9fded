// The VMM's confinement pieces without KVM: a thread's capabilities dropped
// (in a forked child), --user parsing, and the flags' usage errors.
#include "devices/base/error.hpp"
#include "tests/support/process.hpp"
#include "vmm/app/confine.hpp"
#include "vmm/app/seccomp.hpp"

#include <gtest/gtest.h>

#include <csignal>
#include <fcntl.h>
#include <cstdio>
#include <cstring>
#include <functional>
#include <sstream>
#include <tuple>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

namespace kguest {
namespace {

using test::in_child;
using test::Child;

TEST(Confine, DropsEveryCapabilityOfTheThread) {
    Child c = in_child([] {
        if (drop_thread_capabilities() != 0) ::_exit(3);
        std::string status = test::slurp("/proc/thread-self/status");
        for (const char* key : {"CapInh:\t", "CapPrm:\t", "CapEff:\t", "CapAmb:\t"}) {
            auto at = status.find(key);
            if (at == std::string::npos || status.compare(at + std::strlen(key), 16, "0000000000000000") != 0) {
                std::fprintf(stderr, "%s", status.c_str());
                ::_exit(4);
            }
        }
        ::_exit(0);
    });
    ASSERT_TRUE(WIFEXITED(c.wstatus)) << c.err;
    EXPECT_EQ(WEXITSTATUS(c.wstatus), 0) << c.err;
}

// A bare VMM keeps the inherited fds it was given (--api-socket fd=N,
// --event-monitor fd=N) and closes every other one.
TEST(Confine, KeepsOnlyTheGivenInheritedFds) {
    Child c = in_child([] {
        int a[2], b[2];
        if (::pipe(a) != 0 || ::pipe(b) != 0) ::_exit(3);
        ConfineOptions o;
        o.seccomp = SeccompMode::off;
        o.bare_vmm = true;
        o.keep_fds = {b[0], a[1]};
        {
            Confinement confine(o);
            const bool kept = ::fcntl(b[0], F_GETFD) >= 0 && ::fcntl(a[1], F_GETFD) >= 0;
            const bool closed = ::fcntl(a[0], F_GETFD) < 0 && ::fcntl(b[1], F_GETFD) < 0;
            if (!kept || !closed) {
                std::fprintf(stderr, "kept %d closed %d\n", kept, closed);
                ::_exit(4);
            }
        }
        ::_exit(0);
    });
    ASSERT_TRUE(WIFEXITED(c.wstatus)) << c.err;
    EXPECT_EQ(WEXITSTATUS(c.wstatus), 0) << c.err;
}

TEST(Confine, ParsesUser) {
    UserIds u = parse_user("1000:100");
    EXPECT_EQ(u.uid, 1000u);
    EXPECT_EQ(u.gid, 100u);
    u = parse_user("65534");
    EXPECT_EQ(u.uid, 65534u);
    EXPECT_EQ(u.gid, 65534u);
    for (const char* bad : {"", "nobody", "1000:", ":1", "1:x", "0", "1000:0", "-1", "1234567890"})
        EXPECT_THROW(parse_user(bad), UsageError) << bad;
}

TEST(Confine, BadFlagsAreUsageErrors) {
    for (const auto& [flag, value, needle] :
         {std::tuple{"--seccomp", "strict", "--seccomp 'strict'"}, std::tuple{"--user", "nobody", "--user 'nobody'"}}) {
        auto r = test::run_process({test::kKguest, "run", "--kernel", test::kGuestElf, flag, value}, 30);
        EXPECT_EQ(r.status, 2) << r.err;
        EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
    }
}

} // namespace
} // namespace kguest
