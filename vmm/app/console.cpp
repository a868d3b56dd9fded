// Console input (see console.hpp).
#include "vmm/app/console.hpp"
#include "devices/serial.hpp"

#include <cerrno>
#include <poll.h>
#include <unistd.h>

namespace kguest {

ConsoleInput::ConsoleInput(Serial& serial, int stop_fd) : serial_(serial), stop_fd_(stop_fd) {
    if (::isatty(STDIN_FILENO) && ::tcgetattr(STDIN_FILENO, &saved_) == 0) {
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
    pollfd fds[2] = {{STDIN_FILENO, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    std::uint8_t buf[256];
    for (;;) {
        int n = ::poll(fds, 2, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 || (fds[1].revents & POLLIN)) return;
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t r = ::read(STDIN_FILENO, buf, sizeof buf);
            if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (r <= 0) return;  // EOF (e.g. </dev/null) or error: no more input
            serial_.receive({buf, static_cast<std::size_t>(r)});
        }
    }
}

} // namespace kguest
