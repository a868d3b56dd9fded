// The serial console's PTY and socket backends (vmm/console.hpp) with a real
// 16550A model and the input thread, no KVM: bytes the "guest" transmits
// reach the PTY's slave or the socket's client, and what those write lands
// in the UART's receive FIFO. Also: one socket client at a time, output
// dropped (never blocking) while nobody is connected, the next client taking
// over, the socket file replaced and removed, and bad paths refused.
#include "vmm/console.hpp"
#include "devices/base/error.hpp"
#include "devices/serial.hpp"

#include "tests/support/fake_virtio.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <string>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

namespace kguest {
namespace {

constexpr std::uint64_t kThr = 0, kRbr = 0, kLsr = 5;

struct Uart {
    Serial serial;
    explicit Uart(int fd) : serial(fd, [](bool) {}) {}
    void send(const std::string& s) {
        for (char c : s) {
            const std::uint8_t b = static_cast<std::uint8_t>(c);
            serial.write(kThr, {&b, 1});
        }
    }
    // What the guest reads from the receive FIFO within a few seconds.
    std::string receive(std::size_t n) {
        std::string out;
        fake::wait_until([&] {
            std::uint8_t lsr = 0;
            serial.read(kLsr, {&lsr, 1});
            if (lsr & 1) {
                std::uint8_t b = 0;
                serial.read(kRbr, {&b, 1});
                out.push_back(static_cast<char>(b));
            }
            return out.size() >= n;
        });
        return out;
    }
};

// Reads up to n bytes from fd within a few seconds.
std::string read_some(int fd, std::size_t n) {
    std::string out;
    fake::wait_until([&] {
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, 0) == 1 && (p.revents & POLLIN)) {
            char buf[256];
            const ssize_t r = ::read(fd, buf, std::min(sizeof buf, n - out.size()));
            if (r > 0) out.append(buf, static_cast<std::size_t>(r));
        }
        return out.size() >= n;
    });
    return out;
}

struct StopFd {
    Fd fd{::eventfd(0, EFD_CLOEXEC)};
    void stop() const {
        const std::uint64_t one = 1;
        EXPECT_EQ(::write(fd.get(), &one, sizeof one), 8);
    }
};

int connect_to(const std::string& path) {
    const int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
    EXPECT_EQ(::connect(s, reinterpret_cast<const sockaddr*>(&a), sizeof a), 0) << path;
    return s;
}

TEST(ConsolePty, OutputReachesTheSlaveAndInputTheGuest) {
    ConsoleBackend b(ConsoleKind::pty, "");
    ASSERT_EQ(b.pty_path().rfind("/dev/pts/", 0), 0u) << b.pty_path();
    Uart u(b.output_fd());
    StopFd stop;
    {
        ConsoleInput in(b, u.serial, stop.fd.get());
        Fd user(::open(b.pty_path().c_str(), O_RDWR | O_NOCTTY | O_CLOEXEC));
        ASSERT_TRUE(user.valid());
        u.send("hello\n");
        EXPECT_EQ(read_some(user.get(), 6), "hello\n");   // raw: no CR added
        ASSERT_EQ(::write(user.get(), "ls\r", 3), 3);
        EXPECT_EQ(u.receive(3), "ls\r");                   // raw: no echo, no CR→NL
        user.reset();   // the user leaves; the guest's output is not blocked
        u.send(std::string(100000, 'x'));
        EXPECT_GT(u.serial.tx_dropped(), 0u);
        stop.stop();
    }
}

TEST(ConsoleSocket, OneClientAtATimeBothWays) {
    const std::string path = "/tmp/kguest-console-test-" + std::to_string(::getpid()) + ".sock";
    StopFd stop;
    {
        ConsoleBackend b(ConsoleKind::socket, path);
        EXPECT_EQ(b.output_fd(), -1);
        Uart u(b.output_fd());
        ConsoleInput in(b, u.serial, stop.fd.get());
        u.send("before");   // nobody connected: dropped
        EXPECT_EQ(u.serial.tx_dropped(), 0u);   // -1 discards without counting

        Fd c1(connect_to(path));
        // Its input reaching the guest shows the thread accepted it (and switched the output).
        ASSERT_EQ(::write(c1.get(), "root\n", 5), 5);
        EXPECT_EQ(u.receive(5), "root\n");
        u.send("login: ");
        EXPECT_EQ(read_some(c1.get(), 7), "login: ");

        // A second client is accepted and closed at once: it reads EOF.
        Fd c2(connect_to(path));
        char ch;
        pollfd p2{c2.get(), POLLIN, 0};
        ASSERT_EQ(::poll(&p2, 1, 5000), 1);
        EXPECT_EQ(::read(c2.get(), &ch, 1), 0);

        // The first leaves; the next one gets the output.
        c1.reset();
        Fd c3(connect_to(path));
        ASSERT_EQ(::write(c3.get(), "!", 1), 1);
        EXPECT_EQ(u.receive(1), "!");
        u.send("z");
        EXPECT_EQ(read_some(c3.get(), 1), "z");
        stop.stop();
    }
    struct stat st;
    EXPECT_NE(::lstat(path.c_str(), &st), 0) << "the socket file is removed";
}

TEST(ConsoleSocket, ReplacesAStaleSocketButNotAFile) {
    const std::string path = "/tmp/kguest-console-test-" + std::to_string(::getpid()) + ".stale";
    {
        ConsoleBackend first(ConsoleKind::socket, path);
        // What a killed kguest leaves: the file without a listener.
        ASSERT_EQ(::link(path.c_str(), (path + ".kept").c_str()), 0);
    }
    ASSERT_EQ(::rename((path + ".kept").c_str(), path.c_str()), 0);
    { ConsoleBackend again(ConsoleKind::socket, path); }
    Fd f(::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600));
    EXPECT_THROW(ConsoleBackend(ConsoleKind::socket, path), UsageError);
    ::unlink(path.c_str());
    EXPECT_THROW(ConsoleBackend(ConsoleKind::socket, "/nonexistent-dir/console.sock"), UsageError);
    EXPECT_THROW(ConsoleBackend(ConsoleKind::socket, "/tmp/" + std::string(200, 'x')), UsageError);
}

} // namespace
} // namespace kguest
