// The serial console's PTY and socket backends end to end (vmm/console.hpp):
// the small guest's output read through the PTY whose path kguest prints
// ("console on /dev/pts/N"), and through a client of the console socket;
// the guest's status comes back either way and stdout carries none of it.
#include "tests/support/kvm_env.hpp"
#include "tests/support/process.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <fcntl.h>
#include <poll.h>
#include <regex>
#include <string>
#include <sys/socket.h>
#include <sys/un.h>
#include <thread>
#include <unistd.h>

namespace kguest {
namespace {
using namespace kguest::test;

// Reads fd until the whole line holding `until` has come (the serial port
// hands the console one byte per exit, so a read can end mid-line), EOF, or
// timeout_s.
std::string read_until(int fd, const std::string& until, int timeout_s) {
    std::string out;
    const auto line_done = [&] {
        const auto at = out.find(until);
        return at != std::string::npos && out.find('\n', at) != std::string::npos;
    };
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
    while (!line_done() && std::chrono::steady_clock::now() < end) {
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, 100) != 1) continue;
        char buf[512];
        const ssize_t n = ::read(fd, buf, sizeof buf);
        if (n <= 0) break;
        out.append(buf, static_cast<std::size_t>(n));
    }
    return out;
}

TEST(KvmConsole, GuestOutputThroughThePty) {
    KGUEST_OPEN_KVM(kvm);
    Background vm(kguest_run("test=pci,idle idle_ms=3000", 1, {"--console", "pty", "--api-socket", "none"}));
    std::smatch m;
    std::string err;
    for (int i = 0; i < 600 && !std::regex_search(err = vm.err(), m, std::regex("console on (/dev/pts/[0-9]+)")); ++i) {
        ASSERT_TRUE(vm.running()) << err;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ASSERT_FALSE(m.empty()) << err;
    const std::string pts = m[1];
    const int fd = ::open(pts.c_str(), O_RDWR | O_NOCTTY | O_CLOEXEC);
    ASSERT_GE(fd, 0) << pts;
    // What the guest wrote before we opened it waited in the PTY.
    const std::string got = read_until(fd, "RESULT done", 120);
    ::close(fd);
    EXPECT_NE(got.find("RESULT pci"), std::string::npos) << got;
    EXPECT_NE(got.find("RESULT done ok=1"), std::string::npos) << got;
    ProcResult r = vm.wait(60);
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out.find("RESULT"), std::string::npos) << "stdout: " << r.out;
}

TEST(KvmConsole, GuestOutputThroughTheSocket) {
    KGUEST_OPEN_KVM(kvm);
    const std::string path = "/tmp/kguest-console-kvm-" + std::to_string(::getpid()) + ".sock";
    Background vm(kguest_run("test=idle idle_ms=4000", 1, {"--console", "socket=" + path, "--api-socket", "none"}));
    const int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
    bool connected = false;
    for (int i = 0; i < 600 && vm.running() && !connected; ++i) {
        connected = ::connect(s, reinterpret_cast<const sockaddr*>(&a), sizeof a) == 0;
        if (!connected) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ASSERT_TRUE(connected) << vm.err();
    const std::string got = read_until(s, "RESULT done", 120);
    ::close(s);
    EXPECT_NE(got.find("RESULT idle"), std::string::npos) << got;
    EXPECT_NE(got.find("RESULT done ok=1"), std::string::npos) << got;
    ProcResult r = vm.wait(60);
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_NE(r.err.find("console on socket " + path), std::string::npos) << r.err;
    EXPECT_EQ(r.out.find("RESULT"), std::string::npos) << "stdout: " << r.out;
    EXPECT_NE(::access(path.c_str(), F_OK), 0) << "the socket is removed at exit";
}

} // namespace
} // namespace kguest
