// Stopping a VM from outside, end to end: a stop signal must take kguest's
// normal stop path (the "stopping the VM" line, exit status 128 + N, the API
// socket removed) whatever threads the devices started, and a console whose
// reader does not keep up must neither keep a vCPU from stopping nor hold the
// VM past the signal.
#include "tests/support/kvm_env.hpp"
#include "tests/support/process.hpp"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <chrono>
#include <csignal>
#include <string>
#include <thread>

namespace kguest {
namespace {

using namespace kguest::test;

bool wait_for_path(const std::string& path, int timeout_s) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
    while (std::chrono::steady_clock::now() < end) {
        if (::access(path.c_str(), F_OK) == 0) return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
}

// The virtio-net device's event loop thread used to start before the stop
// signals were blocked, so SIGTERM could land there and its default action
// end the process: no stop line, the API socket left behind.
TEST(KvmStop, SigtermWithAStreamNetDeviceTakesTheStopPath) {
    KGUEST_OPEN_KVM(kvm);
    const std::string tag = std::to_string(::getpid());
    const std::string net = "/tmp/kguest-stop-net-" + tag + ".sock", api = "/tmp/kguest-stop-api-" + tag + ".sock";
    ::unlink(net.c_str());
    ::unlink(api.c_str());
    // The far end of --net stream=: a listener whose backlog takes kguest's
    // connection (frames from the idle guest would just queue).
    const int peer = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s", net.c_str());
    ASSERT_EQ(::bind(peer, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
    ASSERT_EQ(::listen(peer, 4), 0);

    // Three rounds: which thread the kernel picks for a process signal varies.
    for (int round = 0; round < 3; ++round) {
        Background vm(kguest_run("test=idle idle_ms=60000", 1, {"--net", "stream=" + net, "--api-socket", api}));
        ASSERT_TRUE(wait_for_path(api, 60)) << vm.err();
        ASSERT_TRUE(vm.wait_for_output("RESULT boot", 60)) << vm.out() << vm.err();   // the guest runs
        ::kill(vm.pid(), SIGTERM);
        ProcResult r = vm.wait(60);
        EXPECT_FALSE(r.timed_out);
        EXPECT_EQ(r.status, 128 + SIGTERM) << r.err;
        EXPECT_NE(r.err.find("stopping the VM"), std::string::npos) << "round " << round << ":\n" << r.err;
        EXPECT_NE(r.err.find("stopped with status 143"), std::string::npos) << r.err;
        EXPECT_NE(::access(api.c_str(), F_OK), 0) << "the API socket was left behind";
        ::unlink(api.c_str());
        if (::testing::Test::HasFailure()) break;
    }
    ::close(peer);
    ::unlink(net.c_str());
}

// stdout a pipe nobody reads (`kguest run ... | slow-reader` stopped): the
// console used to block the writing vCPU in write(2), retrying the stop
// kick's EINTR, so only SIGKILL ended the VM. Now the bytes are dropped and
// counted, and SIGTERM stops the VM at once.
TEST(KvmStop, SigtermWithStdoutAnUnreadPipe) {
    KGUEST_OPEN_KVM(kvm);
    int p[2];
    ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
    ASSERT_GT(::fcntl(p[1], F_SETPIPE_SZ, 4096), 0);   // one page: the guest's output fills it
    char err_path[] = "/tmp/kguest-stop-err.XXXXXX";
    const int err_fd = ::mkstemp(err_path);
    ASSERT_GE(err_fd, 0);
    // 32 vCPUs print a timer line each: more than the pipe's page (about
    // 5.7 KiB in all), then the guest idles for 10 minutes.
    const pid_t pid = spawn(kguest_run("test=timer,idle hz=50 timer_ms=200 drift_limit_ppm=0 idle_ms=600000", 32,
                                       {"--memory", "128M"}),
                            p[1], err_fd);
    ::close(p[1]);
    // Once output arrives, give the guest time to print the rest, which the
    // pipe cannot take (a kguest that waits for room fills it to the page),
    // then stop the VM.
    int queued = 0;
    for (int i = 0; i < 1200 && queued == 0; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        if (::ioctl(p[0], FIONREAD, &queued) != 0) queued = 0;
    }
    EXPECT_GT(queued, 0) << "no console output from the guest";
    for (int i = 0; i < 400 && queued < 4096; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        if (::ioctl(p[0], FIONREAD, &queued) != 0) queued = 0;
    }
    std::this_thread::sleep_for(std::chrono::seconds(1));
    const auto t0 = std::chrono::steady_clock::now();
    ::kill(pid, SIGTERM);
    int ws = 0;
    pid_t w = 0;
    while ((w = ::waitpid(pid, &ws, WNOHANG)) == 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(30))
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const bool ended = w == pid;
    if (!ended) {
        std::fprintf(stderr, "still running 30 s after SIGTERM; its threads:\n%s", threads_of(pid).c_str());
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &ws, 0);
    }
    ::close(p[0]);
    const std::string err = slurp(err_path);
    ::close(err_fd);
    ::unlink(err_path);
    EXPECT_TRUE(ended) << "SIGTERM did not stop a VM whose stdout nobody reads\n" << err;
    if (ended) {
        EXPECT_TRUE(WIFEXITED(ws) && WEXITSTATUS(ws) == 128 + SIGTERM) << err;
        EXPECT_NE(err.find("stopping the VM"), std::string::npos) << err;
        EXPECT_NE(err.find("bytes dropped"), std::string::npos) << "the console's dropped bytes are reported\n" << err;
    }
}

} // namespace
} // namespace kguest
