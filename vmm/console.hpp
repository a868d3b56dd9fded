// The serial console's host ends (COM1, devices/serial.hpp): where its output
// goes and where its input comes from, for each `--console` kind.
//   stdio   output to stdout; input from stdin, a terminal put in raw mode
//           (ISIG and output processing stay on, so Ctrl-C stops the VM)
//   file    output to the file; no input
//   pty     a pseudo-terminal pair (posix_openpt, grantpt, unlockpt): output
//           to the master, input read from it; the slave's path
//           ("/dev/pts/N") is what a user or libvirt opens. kguest keeps a
//           slave fd of its own open, in raw mode, so the master never sees
//           the hang-up a departing client would cause (which would make its
//           reads fail with EIO until someone reopens the slave); output
//           nobody reads waits in the PTY's buffer, then is dropped.
//   socket  a UNIX stream socket kguest listens on: one client at a time
//           gets the output and sends input; a second is accepted and closed
//           at once; until a client connects, output is dropped.
// Output never blocks a vCPU (Serial uses write_nowait), whatever the kind.
//
// Threading: ConsoleBackend is built and destroyed by the Machine's owner;
// its accessors are const. ConsoleInput's thread (named "console") is the
// only reader of the input fd and the only one that accepts and closes
// socket clients; it switches the Serial's output with Serial::set_output.
#pragma once

#include "devices/base/fd.hpp"

#include <string>
#include <termios.h>
#include <thread>

namespace kguest {

class Serial;

enum class ConsoleKind { stdio, none, file, pty, socket };

class ConsoleBackend {
public:
    // Opens the kind's host end: for `file` and `socket`, `path` names it.
    // Throws UsageError (naming `--console` and the path) or SysError.
    ConsoleBackend(ConsoleKind kind, const std::string& path);
    ~ConsoleBackend();   // unlinks a socket it created
    ConsoleBackend(const ConsoleBackend&) = delete;
    ConsoleBackend& operator=(const ConsoleBackend&) = delete;

    ConsoleKind kind() const { return kind_; }
    // The serial's first output fd (-1: none yet or ever).
    int output_fd() const;
    // What ConsoleInput reads: stdin, the PTY master, the listening socket; -1: no input.
    int input_fd() const;
    // The PTY slave's path ("" unless kind is pty).
    const std::string& pty_path() const { return pty_path_; }

private:
    ConsoleKind kind_;
    std::string path_;
    Fd fd_;          // the file, the PTY master or the listening socket
    Fd pty_slave_;   // kept open: see the header comment
    std::string pty_path_;
};

// Feeds the backend's input to the serial on a thread of its own until
// `stop_fd` is readable, EOF on stdin, or an error. Nothing for file/none.
// The destructor joins it (stop_fd must be readable by then, or stdin closed)
// and restores the terminal.
class ConsoleInput {
public:
    ConsoleInput(const ConsoleBackend& backend, Serial& serial, int stop_fd);
    ~ConsoleInput();
    ConsoleInput(const ConsoleInput&) = delete;
    ConsoleInput& operator=(const ConsoleInput&) = delete;

private:
    void thread_main();
    void serve_socket();

    const ConsoleBackend& backend_;
    Serial& serial_;
    int stop_fd_;
    termios saved_{};
    bool raw_ = false;
    std::thread thread_;
};

} // namespace kguest
