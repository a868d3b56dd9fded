// The device event loop: the one execution model for device models that do
// work of their own (virtio-net, virtio-balloon). A device gives the loop a
// queue service function and nothing else runs its guest-driven work.
//
// Threads:
//   - The loop thread (one per device) waits in one io_uring for its wake
//     eventfd, the watched eventfds and the device's I/O, then runs one
//     service pass per queue with work. Only it touches the device's queues,
//     guest memory and backend.
//   - Any other thread may only kick() a queue, post() work, or
//     run_and_wait() work on the loop with a timeout. None waits on anything
//     a guest controls: a service pass is bounded by the device's budget
//     (it returns `true` and the queue gets another turn after the others),
//     so a guest can neither pin the loop nor starve a caller.
//     After each wake, before any service pass or completion, it calls
//     thread_checkpoint (devices/base/thread_start.hpp), which confines it
//     once the VMM's set-up is done.
// Locks: one mutex for the request list; the kick flags are atomics. Devices
// keep what the API reads in atomics or under their own short lock.
//
// I/O: a device describes a request (IoOp) with a Completion called on the
// loop thread with the result (cqe->res). An iteration's requests reach the
// kernel in one io_uring_submit. Buffers and Completions must stay alive until
// the completion ran or stop() returned (it cancels and waits).
#pragma once

#include "devices/base/fd.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

struct io_uring_sqe;   // liburing, kept out of this header

namespace kguest {

// One I/O request, as a device or backend describes it. read/write/recv/send
// use the file position (sockets, eventfds); the block kinds take `offset`.
struct IoOp {
    enum class Kind { read, write, recv, send, readv, writev, fdatasync, fallocate };
    Kind kind = Kind::read;
    int fd = -1;
    void* buf = nullptr;     // readv/writev: the `const iovec[]`
    std::size_t len = 0;     // readv/writev: the iovec count; fallocate: bytes
    int flags = 0;           // recv/send: MSG_*; readv/writev: RWF_*; fallocate: its mode (FALLOC_FL_*)
    std::uint64_t offset = 0;   // readv/writev/fallocate: the file offset
};

// Fills an io_uring submission entry for `op` (also for tests).
void prep_sqe(io_uring_sqe* sqe, const IoOp& op);

class EventLoop {
public:
    // Runs on the loop thread with the request's result (bytes, or -errno).
    class Completion {
    public:
        virtual void complete(int res) = 0;

    protected:
        ~Completion() = default;
    };

    // One pass over queue q; true when the budget ran out with work left.
    using Service = std::function<bool(std::uint16_t q)>;

    // Starts the loop thread; `name` prefixes log lines. Throws SysError.
    EventLoop(std::string name, std::uint16_t queues, Service service);
    ~EventLoop();   // stop()
    EventLoop(const EventLoop&) = delete;
    EventLoop& operator=(const EventLoop&) = delete;

    // Any thread.
    void kick(std::uint16_t q);
    void post(std::function<void()> fn);
    // Runs fn on the loop (at once when called from it) and waits; false on
    // timeout (fn still runs later, so it must own what it captures).
    bool run_and_wait(std::function<void()> fn, std::chrono::milliseconds timeout = std::chrono::seconds(2));
    // Watches one eventfd per queue (fds[q] kicks q); the first call wins.
    bool watch_queues(std::span<const int> fds);
    // Waits until a pass ends with no queue left to service (tests, settling).
    bool wait_idle(std::chrono::milliseconds timeout = std::chrono::seconds(2));
    // Cancels the I/O in flight, waits for it, and joins the thread. Idempotent.
    void stop();
    // Names the loop's thread (ps -L, top -H, /proc/PID/task/TID/comm; at
    // most 15 bytes are kept), e.g. "net0" or "disk1". Done from the caller
    // (it writes the thread's comm file), so the loop thread, which may be
    // confined already, makes no call for it; the caller must be allowed to
    // open that file: the VMM names its loops at set-up, before --user's
    // setresuid makes the process's /proc files root's. Best effort.
    void set_thread_name(const std::string& name);

    // Loop thread only.
    void mark(std::uint16_t q) { dirty_[q] = true; }   // q has work: service it
    void submit(const IoOp& op, Completion& done);

private:
    struct Request {
        std::function<void()> fn;
        bool idle = false;   // a wait_idle() waiter
        bool done = false;
    };
    struct FdWatch;

    void run();
    void wake();
    bool enqueue(std::shared_ptr<Request> r, std::chrono::milliseconds timeout);
    void arm(FdWatch& w);
    void drain();
    bool busy() const;

    std::string name_;
    Service service_;
    Fd wake_fd_;
    struct Ring;
    std::unique_ptr<Ring> ring_;
    std::unique_ptr<std::atomic<bool>[]> kicks_;
    std::uint16_t queues_;

    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<std::shared_ptr<Request>> requests_;
    bool stop_ = false;
    std::atomic<bool> pending_{false};
    std::atomic<bool> watching_{false};

    // Loop thread.
    std::vector<bool> dirty_;
    std::vector<std::unique_ptr<FdWatch>> watches_;
    std::vector<std::shared_ptr<Request>> idle_waiters_;
    std::uint64_t in_flight_ = 0;
    bool stopped_ = false;
    std::thread::id loop_id_;
    std::thread thread_;
};

} // namespace kguest
