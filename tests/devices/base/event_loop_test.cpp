// The device event loop (devices/base/event_loop.hpp) on its own: a queue
// whose service never runs out of work neither starves the other queues nor
// the callers waiting on the loop; typed completions get their request's
// result; eventfd watches kick their queue; post-and-wait times out; the
// block kinds (readv/writev at an offset, fdatasync, fallocate) on a file.
#include "devices/base/event_loop.hpp"

#include "tests/support/fake_virtio.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <gtest/gtest.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace kguest {
namespace {

using namespace std::chrono_literals;
using fake::Stopwatch;
using fake::wait_until;

TEST(EventLoop, EndlessQueueStarvesNeitherOtherQueuesNorCallers) {
    std::atomic<std::uint64_t> passes[2]{};
    EventLoop loop("test", 2, [&](std::uint16_t q) {
        ++passes[q];
        return q == 0;   // queue 0 always has more work (a guest republishing forever)
    });
    loop.kick(0);
    ASSERT_TRUE(wait_until([&] { return passes[0].load() > 1000; }));
    loop.kick(1);
    EXPECT_TRUE(wait_until([&] { return passes[1].load() == 1; }, 100));
    bool ran = false;
    const auto took = Stopwatch::time([&] { EXPECT_TRUE(loop.run_and_wait([&] { ran = true; }, 1s)); });
    EXPECT_TRUE(ran);
    EXPECT_LT(took.count(), 100);
    EXPECT_FALSE(loop.wait_idle(50ms));   // never idle while queue 0 has work
    const std::uint64_t before = passes[0].load();
    EXPECT_TRUE(wait_until([&] { return passes[0].load() > before + 100; }));
    loop.stop();
    const std::uint64_t after = passes[0].load();
    std::this_thread::sleep_for(10ms);
    EXPECT_EQ(passes[0].load(), after);   // stopped for good
    EXPECT_FALSE(loop.run_and_wait([] {}, 10ms));
}

TEST(EventLoop, KickedQueueIsServicedOncePerKickThenIdle) {
    std::atomic<int> passes{0};
    EventLoop loop("test", 3, [&](std::uint16_t q) {
        EXPECT_EQ(q, 2);
        ++passes;
        return false;
    });
    loop.kick(2);
    loop.kick(7);   // out of range: ignored
    ASSERT_TRUE(loop.wait_idle());
    EXPECT_EQ(passes.load(), 1);
    ASSERT_TRUE(loop.wait_idle());
    EXPECT_EQ(passes.load(), 1);
}

// Records the result of one request.
class Record final : public EventLoop::Completion {
public:
    void complete(int res) override { result.store(res); }
    std::atomic<int> result{0};
};

TEST(EventLoop, TypedCompletionGetsItsRequestsResult) {
    EventLoop loop("test", 1, [](std::uint16_t) { return false; });
    Fd efd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    ASSERT_TRUE(efd.valid());
    std::uint64_t counter = 0;
    Record done;
    ASSERT_TRUE(loop.run_and_wait([&] { loop.submit({IoOp::Kind::read, efd.get(), &counter, sizeof counter}, done); }));
    std::this_thread::sleep_for(10ms);
    EXPECT_EQ(done.result.load(), 0);   // still waiting in the kernel
    const std::uint64_t five = 5;
    ASSERT_EQ(::write(efd.get(), &five, sizeof five), 8);
    ASSERT_TRUE(wait_until([&] { return done.result.load() == 8; }));
    EXPECT_EQ(counter, 5u);
    // A request still in flight at stop is cancelled and waited for.
    Record pending;
    ASSERT_TRUE(loop.run_and_wait([&] { loop.submit({IoOp::Kind::read, efd.get(), &counter, sizeof counter}, pending); }));
    loop.stop();
    EXPECT_EQ(pending.result.load(), 0);   // the handler does not run during stop
}

TEST(EventLoop, WatchedEventfdsKickTheirQueues) {
    std::atomic<int> passes[2]{};
    EventLoop loop("test", 2, [&](std::uint16_t q) {
        ++passes[q];
        return false;
    });
    Fd a(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)), b(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    const int fds[2] = {a.get(), b.get()};
    EXPECT_FALSE(loop.watch_queues(std::span<const int>(fds, 1)));   // one per queue
    ASSERT_TRUE(loop.watch_queues(fds));
    EXPECT_FALSE(loop.watch_queues(fds));   // the first call wins
    const std::uint64_t one = 1;
    ASSERT_EQ(::write(b.get(), &one, 8), 8);
    ASSERT_TRUE(wait_until([&] { return passes[1].load() == 1; }));
    ASSERT_EQ(::write(a.get(), &one, 8), 8);
    ASSERT_EQ(::write(b.get(), &one, 8), 8);
    ASSERT_TRUE(wait_until([&] { return passes[0].load() == 1 && passes[1].load() == 2; }));
}

TEST(EventLoop, RunAndWaitTimesOutBehindABusyLoopAndRunsLater) {
    EventLoop loop("test", 1, [](std::uint16_t) { return false; });
    std::atomic<bool> release{false}, ran{false};
    loop.post([&] {
        while (!release.load()) std::this_thread::sleep_for(1ms);
    });
    const auto took = Stopwatch::time([&] { EXPECT_FALSE(loop.run_and_wait([&] { ran = true; }, 50ms)); });
    EXPECT_GE(took.count(), 50);
    EXPECT_LT(took.count(), 1000);
    EXPECT_FALSE(ran.load());
    release = true;
    EXPECT_TRUE(wait_until([&] { return ran.load(); }));
}

// The kinds virtio-blk uses, each with its own file offset.
TEST(VirtioBlkEventLoop, ReadvWritevFdatasyncFallocate) {
    char tmpl[] = "/tmp/kguest-loop-test-XXXXXX";
    Fd file(::mkstemp(tmpl));
    ASSERT_TRUE(file.valid());
    ::unlink(tmpl);
    ASSERT_EQ(::ftruncate(file.get(), 8192), 0);
    EventLoop loop("test", 1, [](std::uint16_t) { return false; });
    auto run = [&](const IoOp& op) {
        Record done;
        done.result = -1000;
        EXPECT_TRUE(loop.run_and_wait([&] { loop.submit(op, done); }));
        EXPECT_TRUE(wait_until([&] { return done.result.load() != -1000; }));
        return done.result.load();
    };
    char a[3] = {'a', 'b', 'c'}, b[2] = {'d', 'e'};
    iovec out[2] = {{a, 3}, {b, 2}};
    EXPECT_EQ(run({IoOp::Kind::writev, file.get(), out, 2, 0, 4096}), 5);
    char x[4] = {}, y[4] = {};
    iovec in[2] = {{x, 1}, {y, 4}};
    EXPECT_EQ(run({IoOp::Kind::readv, file.get(), in, 2, 0, 4096}), 5);
    EXPECT_EQ(x[0], 'a');
    EXPECT_EQ(std::string(y, 4), "bcde");
    EXPECT_EQ(run({IoOp::Kind::fdatasync, file.get()}), 0);
    // Punch the data away; the size stays.
    EXPECT_EQ(run({IoOp::Kind::fallocate, file.get(), nullptr, 4096, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096}), 0);
    EXPECT_EQ(run({IoOp::Kind::readv, file.get(), in, 2, 0, 4096}), 5);
    EXPECT_EQ(std::string(y, 4), std::string(4, '\0'));
    struct stat st {};
    ASSERT_EQ(::fstat(file.get(), &st), 0);
    EXPECT_EQ(st.st_size, 8192);
    // Errors come back as -errno.
    EXPECT_EQ(run({IoOp::Kind::readv, -1, in, 2, 0, 0}), -EBADF);
}

} // namespace
} // namespace kguest
