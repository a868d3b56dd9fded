// The serial console's host ends and its input thread (see console.hpp).
#include "vmm/console.hpp"
#include "devices/base/error.hpp"
#include "devices/base/log.hpp"
#include "devices/base/thread_start.hpp"
#include "devices/serial.hpp"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

namespace kguest {

namespace {

// A PTY pair: the master for kguest, the slave's path for the user.
void open_pty(Fd& master, Fd& slave, std::string& path) {
    const int m = ::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) throw_errno("posix_openpt");
    master = Fd(m);
    if (::grantpt(m) != 0) throw_errno("grantpt");
    if (::unlockpt(m) != 0) throw_errno("unlockpt");
    char name[128];
    if (int e = ::ptsname_r(m, name, sizeof name)) throw SysError("ptsname_r", e);
    path = name;
    const int s = ::open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (s < 0) throw_errno("open " + path);
    slave = Fd(s);
    // Raw, as QEMU's and Cloud Hypervisor's PTY consoles: no echo, no line
    // editing, no CR/NL translation; the guest's own tty does all that.
    termios t{};
    if (::tcgetattr(s, &t) != 0) throw_errno("tcgetattr " + path);
    ::cfmakeraw(&t);
    if (::tcsetattr(s, TCSANOW, &t) != 0) throw_errno("tcsetattr " + path);
}

Fd listen_unix(const std::string& path) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof addr.sun_path)
        throw UsageError("--console socket=" + path + ": path too long (at most " +
                         std::to_string(sizeof addr.sun_path - 1) + " bytes)");
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    // A socket left by an earlier run is replaced; anything else is not ours.
    struct stat st;
    if (::lstat(path.c_str(), &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) throw UsageError("--console socket=" + path + ": exists and is not a socket");
        if (::unlink(path.c_str()) != 0) throw_errno("unlink " + path);
    }
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw_errno("socket");
    Fd s(fd);
    if (::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
        throw UsageError("--console socket=" + path + ": bind: " + std::strerror(errno));
    if (::listen(fd, 1) != 0) throw_errno("listen " + path);
    return s;
}

} // namespace

ConsoleBackend::ConsoleBackend(ConsoleKind kind, const std::string& path) : kind_(kind), path_(path) {
    switch (kind) {
    case ConsoleKind::stdio:
    case ConsoleKind::none: break;
    case ConsoleKind::file: {
        const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0) throw UsageError("--console " + path + ": " + std::strerror(errno));
        fd_ = Fd(fd);
        break;
    }
    case ConsoleKind::pty:
        open_pty(fd_, pty_slave_, pty_path_);
        log_msg("console on %s", pty_path_.c_str());
        break;
    case ConsoleKind::socket:
        fd_ = listen_unix(path);
        log_msg("console on socket %s", path.c_str());
        break;
    }
}

ConsoleBackend::~ConsoleBackend() {
    if (kind_ == ConsoleKind::socket && fd_.valid()) ::unlink(path_.c_str());   // best effort (--user may forbid it)
}

int ConsoleBackend::output_fd() const {
    switch (kind_) {
    case ConsoleKind::stdio: return STDOUT_FILENO;
    case ConsoleKind::file:
    case ConsoleKind::pty: return fd_.get();
    default: return -1;   // none; socket: no client yet
    }
}

int ConsoleBackend::input_fd() const {
    switch (kind_) {
    case ConsoleKind::stdio: return STDIN_FILENO;
    case ConsoleKind::pty:
    case ConsoleKind::socket: return fd_.get();
    default: return -1;
    }
}

ConsoleInput::ConsoleInput(const ConsoleBackend& backend, Serial& serial, int stop_fd)
    : backend_(backend), serial_(serial), stop_fd_(stop_fd) {
    if (backend.input_fd() < 0) return;
    if (backend.kind() == ConsoleKind::stdio && ::isatty(STDIN_FILENO) && ::tcgetattr(STDIN_FILENO, &saved_) == 0) {
        termios raw = saved_;
        raw.c_iflag &= ~static_cast<tcflag_t>(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON);
        raw.c_lflag &= ~static_cast<tcflag_t>(ECHO | ECHONL | ICANON | IEXTEN);
        raw.c_cc[VMIN] = 1;
        raw.c_cc[VTIME] = 0;
        raw_ = ::tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0;
    }
    thread_ = std::thread([this] { thread_main(); });
}

ConsoleInput::~ConsoleInput() {
    if (thread_.joinable()) thread_.join();
    if (raw_) ::tcsetattr(STDIN_FILENO, TCSANOW, &saved_);
}

void ConsoleInput::thread_main() {
    ::pthread_setname_np(::pthread_self(), "console");
    thread_started(ThreadKind::console);
    if (backend_.kind() == ConsoleKind::socket) {
        serve_socket();
        return;
    }
    const int in = backend_.input_fd();
    pollfd fds[2] = {{in, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    std::uint8_t buf[256];
    for (;;) {
        int n = ::poll(fds, 2, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 || (fds[1].revents & POLLIN)) return;
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t r = ::read(in, buf, sizeof buf);
            if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (r <= 0) return;  // EOF (e.g. </dev/null) or error: no more input
            serial_.receive({buf, static_cast<std::size_t>(r)});
        }
    }
}

void ConsoleInput::serve_socket() {
    const int listener = backend_.input_fd();
    Fd client;
    RateLimit limit{2};
    std::uint8_t buf[256];
    for (;;) {
        pollfd fds[3] = {{stop_fd_, POLLIN, 0}, {listener, POLLIN, 0}, {client.get(), POLLIN, 0}};
        const int n = ::poll(fds, client.valid() ? 3 : 2, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 || (fds[0].revents & POLLIN)) break;
        // The client first: one that left is gone before the next is accepted.
        if (client.valid() && (fds[2].revents & (POLLIN | POLLHUP | POLLERR))) {
            const ssize_t r = ::read(client.get(), buf, sizeof buf);
            if (r > 0) {
                serial_.receive({buf, static_cast<std::size_t>(r)});
            } else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
                serial_.set_output(-1);   // the client left: output is dropped until the next one
                client.reset();
            }
        }
        if (fds[1].revents & POLLIN) {
            const int c = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
            if (c < 0) {
                KGUEST_LOG_LIMITED(limit, "console: accept4: %s (errno %d)", std::strerror(errno), errno);
            } else if (client.valid()) {   // one client at a time
                KGUEST_LOG_LIMITED(limit, "console: a second client connected; closed (one at a time)");
                ::close(c);
            } else {
                client = Fd(c);
                serial_.set_output(c);
            }
        }
    }
    serial_.set_output(-1);   // before the client's fd closes
}

} // namespace kguest
