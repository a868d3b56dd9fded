// The device event loop (see event_loop.hpp). Every io_uring request carries
// its Completion as user data (the cancel request sent at stop carries none).
// An eventfd is watched by a READ of its counter, which also drains it.
#include "devices/base/event_loop.hpp"

#include "devices/base/error.hpp"
#include "devices/base/log.hpp"
#include "devices/base/thread_start.hpp"

#include <algorithm>
#include <pthread.h>
#include <cerrno>
#include <cstring>
#include <liburing.h>
#include <sys/eventfd.h>
#include <unistd.h>

namespace kguest {

namespace {
constexpr unsigned kRingEntries = 256;
constexpr std::uint16_t kNoQueue = 0xffff;
} // namespace

struct EventLoop::Ring {
    io_uring ring{};
    bool live = false;
    ~Ring() {
        if (live) io_uring_queue_exit(&ring);
    }
};

// An eventfd the loop keeps a READ on: a signal kicks queue q (if any).
struct EventLoop::FdWatch final : Completion {
    FdWatch(EventLoop& l, int f, std::uint16_t queue) : loop(l), fd(f), q(queue) {}
    void complete(int res) override {
        if (res == sizeof counter && q != kNoQueue) loop.mark(q);
        if (res > 0 || res == -EINTR || res == -EAGAIN)
            loop.arm(*this);
        else if (!loop.stopped_)
            log_msg("%s: eventfd %d: %s; no longer watched", loop.name_.c_str(), fd, std::strerror(-res));
    }
    EventLoop& loop;
    int fd;
    std::uint16_t q;
    std::uint64_t counter = 0;
};

void prep_sqe(io_uring_sqe* sqe, const IoOp& op) {
    // read/write: offset -1, the file position, which eventfds, TAPs and
    // sockets ignore; the block kinds (virtio-blk) carry their own offset.
    switch (op.kind) {
    case IoOp::Kind::read: io_uring_prep_read(sqe, op.fd, op.buf, static_cast<unsigned>(op.len), -1); break;
    case IoOp::Kind::write: io_uring_prep_write(sqe, op.fd, op.buf, static_cast<unsigned>(op.len), -1); break;
    case IoOp::Kind::recv: io_uring_prep_recv(sqe, op.fd, op.buf, op.len, op.flags); break;
    case IoOp::Kind::send: io_uring_prep_send(sqe, op.fd, op.buf, op.len, op.flags); break;
    case IoOp::Kind::readv:
        io_uring_prep_readv2(sqe, op.fd, static_cast<const iovec*>(op.buf), static_cast<unsigned>(op.len), op.offset,
                             op.flags);
        break;
    case IoOp::Kind::writev:
        io_uring_prep_writev2(sqe, op.fd, static_cast<const iovec*>(op.buf), static_cast<unsigned>(op.len),
                              op.offset, op.flags);
        break;
    case IoOp::Kind::fdatasync: io_uring_prep_fsync(sqe, op.fd, IORING_FSYNC_DATASYNC); break;
    case IoOp::Kind::fallocate: io_uring_prep_fallocate(sqe, op.fd, op.flags, static_cast<off_t>(op.offset), static_cast<off_t>(op.len));
        break;
    }
}

EventLoop::EventLoop(std::string name, std::uint16_t queues, Service service)
    : name_(std::move(name)), service_(std::move(service)), queues_(queues) {
    wake_fd_ = Fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!wake_fd_.valid()) throw_errno("eventfd");
    ring_ = std::make_unique<Ring>();
    if (int rc = io_uring_queue_init(kRingEntries, &ring_->ring, 0); rc < 0)
        throw SysError("io_uring_queue_init", -rc);
    ring_->live = true;
    kicks_ = std::make_unique<std::atomic<bool>[]>(queues);
    dirty_.assign(queues, false);
    watches_.push_back(std::make_unique<FdWatch>(*this, wake_fd_.get(), kNoQueue));
    thread_ = std::thread([this] { run(); });
    loop_id_ = thread_.get_id();
}

EventLoop::~EventLoop() { stop(); }

void EventLoop::set_thread_name(const std::string& name) {
    // Best effort: a name is for people and tools, nothing depends on it.
    if (thread_.joinable()) ::pthread_setname_np(thread_.native_handle(), name.substr(0, 15).c_str());
}

void EventLoop::stop() {
    {
        std::lock_guard lock(mu_);
        stop_ = true;
    }
    pending_.store(true);
    wake();
    if (thread_.joinable()) thread_.join();
}

void EventLoop::wake() {
    const std::uint64_t one = 1;
    // EAGAIN means the counter is already huge: the loop will wake anyway.
    [[maybe_unused]] ssize_t n = ::write(wake_fd_.get(), &one, sizeof one);
}

void EventLoop::kick(std::uint16_t q) {
    if (q >= queues_) return;
    kicks_[q].store(true);
    wake();
}

bool EventLoop::enqueue(std::shared_ptr<Request> r, std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu_);
    if (stop_) return false;
    requests_.push_back(r);
    pending_.store(true);
    wake();
    if (timeout.count() == 0) return true;
    if (cv_.wait_for(lock, timeout, [&] { return r->done || stop_; }) && r->done) return true;
    log_msg("%s: the device loop did not answer within %lld ms", name_.c_str(),
            static_cast<long long>(timeout.count()));
    return false;
}

void EventLoop::post(std::function<void()> fn) {
    enqueue(std::make_shared<Request>(Request{std::move(fn)}), std::chrono::milliseconds(0));
}

bool EventLoop::run_and_wait(std::function<void()> fn, std::chrono::milliseconds timeout) {
    if (std::this_thread::get_id() == loop_id_) {
        fn();
        return true;
    }
    return enqueue(std::make_shared<Request>(Request{std::move(fn)}), timeout);
}

bool EventLoop::wait_idle(std::chrono::milliseconds timeout) {
    if (std::this_thread::get_id() == loop_id_) return true;
    return enqueue(std::make_shared<Request>(Request{{}, true}), timeout);
}

bool EventLoop::watch_queues(std::span<const int> fds) {
    if (fds.size() != queues_ || watching_.exchange(true)) return false;
    return run_and_wait([this, v = std::vector<int>(fds.begin(), fds.end())] {
        for (std::uint16_t q = 0; q < queues_; ++q) {
            watches_.push_back(std::make_unique<FdWatch>(*this, v[q], q));
            arm(*watches_.back());
        }
    });
}

void EventLoop::arm(FdWatch& w) {
    submit({IoOp::Kind::read, w.fd, &w.counter, sizeof w.counter}, w);
}

void EventLoop::submit(const IoOp& op, Completion& done) {
    io_uring& ring = ring_->ring;
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    if (sqe == nullptr) {   // SQ full: push what we have and retry
        io_uring_submit(&ring);
        sqe = io_uring_get_sqe(&ring);
    }
    if (sqe == nullptr) {   // cannot happen: the ring was just emptied
        done.complete(-EBUSY);
        return;
    }
    prep_sqe(sqe, op);
    io_uring_sqe_set_data(sqe, &done);
    ++in_flight_;
}

bool EventLoop::busy() const { return std::find(dirty_.begin(), dirty_.end(), true) != dirty_.end(); }

void EventLoop::drain() {
    // Cancel what is in flight and wait until the kernel is done with it.
    stopped_ = true;
    io_uring& ring = ring_->ring;
    if (io_uring_sqe* sqe = io_uring_get_sqe(&ring)) {
        io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
        io_uring_sqe_set_data(sqe, nullptr);
    }
    io_uring_submit(&ring);
    while (in_flight_ > 0) {
        io_uring_cqe* cqe;
        __kernel_timespec ts{2, 0};
        const int rc = io_uring_wait_cqe_timeout(&ring, &cqe, &ts);
        if (rc == -EINTR) continue;
        if (rc < 0) {
            log_msg("%s: %llu io_uring requests still in flight at exit: %s", name_.c_str(),
                    static_cast<unsigned long long>(in_flight_), std::strerror(-rc));
            return;
        }
        if (io_uring_cqe_get_data(cqe) != nullptr) --in_flight_;
        io_uring_cqe_seen(&ring, cqe);
    }
}

void EventLoop::run() {
    io_uring& ring = ring_->ring;
    RateLimit limit{5};
    arm(*watches_.front());
    for (;;) {
        const int rc = busy() ? io_uring_submit(&ring) : io_uring_submit_and_wait(&ring, 1);
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
            KGUEST_LOG_LIMITED(limit, "%s: io_uring_submit: %s", name_.c_str(), std::strerror(-rc));
            ::usleep(10000);   // never spin on a broken ring
        }
        // Woken by a kick, a request or I/O: confine this thread first, once
        // the VMM's set-up is done (devices/base/thread_start.hpp).
        thread_checkpoint(ThreadKind::device);
        // Completions; a handler may submit (the SQ is separate from the CQ).
        unsigned head, seen = 0;
        io_uring_cqe* cqe;
        io_uring_for_each_cqe(&ring, head, cqe) {
            ++seen;
            auto* done = static_cast<Completion*>(io_uring_cqe_get_data(cqe));
            if (done == nullptr) continue;   // the cancel request
            --in_flight_;
            done->complete(cqe->res);
        }
        io_uring_cq_advance(&ring, seen);

        // Posted requests.
        if (pending_.exchange(false)) {
            std::deque<std::shared_ptr<Request>> todo;
            bool stop;
            {
                std::lock_guard lock(mu_);
                todo.swap(requests_);
                stop = stop_;
            }
            for (auto& r : todo) {
                if (r->idle) {
                    idle_waiters_.push_back(std::move(r));
                    continue;
                }
                r->fn();
                std::lock_guard lock(mu_);
                r->done = true;
            }
            cv_.notify_all();
            if (stop) {
                drain();
                return;
            }
        }

        // One budgeted pass per queue with work.
        for (std::uint16_t q = 0; q < queues_; ++q)
            if (kicks_[q].exchange(false)) dirty_[q] = true;
        for (std::uint16_t q = 0; q < queues_; ++q) {
            if (!dirty_[q]) continue;
            dirty_[q] = false;   // the service may mark it again
            if (service_(q)) dirty_[q] = true;
        }

        if (!idle_waiters_.empty() && !busy() && !pending_.load()) {
            bool kicked = false;
            for (std::uint16_t q = 0; q < queues_; ++q) kicked |= kicks_[q].load();
            if (!kicked) {
                {
                    std::lock_guard lock(mu_);
                    for (auto& r : idle_waiters_) r->done = true;
                }
                idle_waiters_.clear();
                cv_.notify_all();
            }
        }
    }
}

} // namespace kguest
