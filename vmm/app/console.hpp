// The serial console's input side for `--console stdio`: the terminal in
// raw-ish mode and a thread that feeds stdin to the guest's COM1. ISIG stays
// on, so Ctrl-C is SIGINT and stops the VM cleanly; output processing stays
// on. The thread ends at EOF on stdin or when `stop_fd` (an eventfd the VM
// writes when it stops) becomes readable; the destructor joins it, then
// restores the terminal, so the VM must be stopping before then.
#pragma once

#include <termios.h>
#include <thread>

namespace kguest {

class Serial;

class ConsoleInput {
public:
    ConsoleInput(Serial& serial, int stop_fd);
    ~ConsoleInput();
    ConsoleInput(const ConsoleInput&) = delete;
    ConsoleInput& operator=(const ConsoleInput&) = delete;

private:
    void thread_main();

    Serial& serial_;
    int stop_fd_;
    termios saved_{};
    bool raw_ = false;   // the terminal was changed and needs restoring
    std::thread thread_;
};

} // namespace kguest
