// The VM control API without KVM: a fake VmControl behind a real ApiServer on
// a temporary UNIX socket, driven by raw request bytes (for the malformed and
// hostile cases), by ApiClient, and by the CLI's cli_main().
#include "vmm/app/api.hpp"
#include "vmm/app/api_client.hpp"
#include "devices/base/error.hpp"

#include <algorithm>
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <mutex>
#include <poll.h>
#include <string>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace kguest {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr std::uint64_t MiB = 1ull << 20;

// A VM that answers like the real one. With `converge`, each info() moves the
// balloon's actual size a step toward its target, as a guest would.
class FakeVm : public VmControl {
public:
    explicit FakeVm(bool converge = true) : converge_(converge) {}

    VmInfo info() override {
        std::lock_guard lock(mu_);
        ++info_calls_;
        if (converge_) {
            if (actual_ < target_) actual_ = std::min(target_, actual_ + 64 * MiB);
            else if (actual_ > target_) actual_ = target_ + (actual_ - target_ > 64 * MiB ? actual_ - target_ - 64 * MiB : 0);
        }
        VmInfo i;
        i.name = "fake";
        i.paused = paused_;
        i.cpus = 2;
        i.memory = memory_;
        i.backing = Backing::thp;
        i.hugepage_backed_bytes = 128 * MiB;
        i.rss_bytes = 100 * MiB + 512 * 1024;
        i.balloon = VmInfo::Balloon{target_, actual_};
        i.disks = {{"/img/a.raw", 8 * MiB, true, 2}};
        return i;
    }
    VmCounters counters() override {
        VmCounters c;
        c.port80.writes = 42;
        c.nets.resize(1);
        c.nets[0].tx_bytes = 1000;
        c.disks.resize(1);
        c.disks[0].read_bytes = 4096;
        c.disks[0].reads = 1;
        c.exits.userspace = {{"serial COM1", 3, 4500}, {"rtc", 1, 100}};
        c.exits.kvm_note = "KVM_GET_STATS_FD: no";
        return c;
    }
    ControlError resize(std::uint64_t bytes) override {
        std::lock_guard lock(mu_);
        target_ = bytes;
        ++resizes_;
        return ControlError::none;
    }
    ControlError pause() override {
        std::lock_guard lock(mu_);
        if (paused_) return ControlError::already_paused;
        paused_ = true;
        return ControlError::none;
    }
    ControlError resume() override {
        std::lock_guard lock(mu_);
        if (!paused_) return ControlError::not_paused;
        paused_ = false;
        return ControlError::none;
    }
    ControlError shutdown() override {
        stopped_ = true;
        return ControlError::none;
    }
    ControlError power_button() override {
        ++power_buttons_;
        return ControlError::none;
    }

    std::uint64_t target() {
        std::lock_guard lock(mu_);
        return target_;
    }
    bool paused() {
        std::lock_guard lock(mu_);
        return paused_;
    }
    int resizes() {
        std::lock_guard lock(mu_);
        return resizes_;
    }
    std::atomic<bool> stopped_{false};
    std::atomic<int> power_buttons_{0};

private:
    std::mutex mu_;
    bool converge_;
    bool paused_ = false;
    std::uint64_t memory_ = 256 * MiB, target_ = 0, actual_ = 0;
    int resizes_ = 0, info_calls_ = 0;
};

class TempDir {
public:
    TempDir() {
        char tmpl[] = "/tmp/kguest-api-test.XXXXXX";
        if (::mkdtemp(tmpl) == nullptr) throw_errno("mkdtemp");
        path_ = tmpl;
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    const std::string& path() const { return path_; }

private:
    std::string path_;
};

class ScopedEnv {
public:
    ScopedEnv(const char* name, const std::string& value) : name_(name) {
        if (const char* old = std::getenv(name)) old_ = old;
        ::setenv(name, value.c_str(), 1);
    }
    ~ScopedEnv() {
        if (old_) ::setenv(name_, old_->c_str(), 1);
        else ::unsetenv(name_);
    }

private:
    const char* name_;
    std::optional<std::string> old_;
};

// A raw client connection: bytes in, bytes out, with poll() timeouts.
class RawConn {
public:
    explicit RawConn(const std::string& path) : fd_(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
        if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) throw_errno("connect " + path);
    }
    ~RawConn() { ::close(fd_); }
    void send(const std::string& bytes) {
        std::size_t off = 0;
        while (off < bytes.size()) {
            ssize_t n = ::send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
            if (n <= 0) return;  // the server may close early (413); what it said is still readable
            off += static_cast<std::size_t>(n);
        }
    }
    // Reads until EOF or `timeout`; `eof` tells which.
    std::string read_all(std::chrono::milliseconds timeout, bool* eof = nullptr) {
        std::string out;
        auto deadline = Clock::now() + timeout;
        for (;;) {
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
            if (left <= 0) break;
            pollfd p{fd_, POLLIN, 0};
            if (::poll(&p, 1, static_cast<int>(left)) <= 0) break;
            char buf[4096];
            ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
            if (n <= 0) {
                if (eof) *eof = true;
                return out;
            }
            out.append(buf, static_cast<std::size_t>(n));
        }
        if (eof) *eof = false;
        return out;
    }
    // Reads one response whose body length is known from Content-Length (or none).
    std::string read_response(std::chrono::milliseconds timeout) {
        std::string out;
        auto deadline = Clock::now() + timeout;
        while (Clock::now() < deadline) {
            auto end = out.find("\r\n\r\n");
            if (end != std::string::npos) {
                std::size_t len = 0;
                auto cl = out.find("Content-Length: ");
                if (cl != std::string::npos && cl < end) len = std::stoul(out.substr(cl + 16));
                if (out.size() >= end + 4 + len) return out;
            }
            pollfd p{fd_, POLLIN, 0};
            if (::poll(&p, 1, 100) <= 0) continue;
            char buf[4096];
            ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
            if (n <= 0) break;
            out.append(buf, static_cast<std::size_t>(n));
        }
        return out;
    }

    int fd() const { return fd_; }

private:
    int fd_;
};

unsigned status_of(const std::string& response) {
    if (response.rfind("HTTP/1.", 0) != 0 || response.size() < 12) return 0;
    return static_cast<unsigned>(std::stoul(response.substr(9, 3)));
}

json body_of(const std::string& response) {
    auto end = response.find("\r\n\r\n");
    if (end == std::string::npos) return json::value_t::discarded;
    return json::parse(response.substr(end + 4), nullptr, false);
}

// One request with "Connection: close"; returns the whole response.
std::string exchange(const std::string& sock, const std::string& method, const std::string& target,
                     const std::string& body = "", const std::string& extra_headers = "") {
    RawConn c(sock);
    std::string req = method + " " + target + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + extra_headers;
    if (!body.empty() || method == "PUT") req += "Content-Length: " + std::to_string(body.size()) + "\r\n";
    c.send(req + "\r\n" + body);
    return c.read_all(3s);
}

class ApiServerTest : public ::testing::Test {
protected:
    void start(ApiLimits limits = {}) { server_ = std::make_unique<ApiServer>(sock_, vm_, limits); }
    TempDir dir_;
    std::string sock_ = dir_.path() + "/run/vm.sock";  // run/ does not exist yet
    FakeVm vm_;
    std::unique_ptr<ApiServer> server_;
};

TEST_F(ApiServerTest, CreatesPrivateDirAndSocket) {
    start();
    struct stat st {};
    ASSERT_EQ(::stat(sock_.c_str(), &st), 0);
    EXPECT_TRUE(S_ISSOCK(st.st_mode));
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    ASSERT_EQ(::stat((dir_.path() + "/run").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700u);
    server_.reset();
    EXPECT_NE(::access(sock_.c_str(), F_OK), 0) << "the socket is unlinked on destruction";
}

TEST_F(ApiServerTest, EveryRouteThroughClient) {
    start();
    ApiClient c(sock_);
    ApiResponse r = c.get("vmm.ping");
    EXPECT_EQ(r.status, 200u);
    EXPECT_EQ(r.body["version"], KGUEST_VERSION);

    r = c.get("vm.info");
    EXPECT_EQ(r.status, 200u);
    EXPECT_EQ(r.body["memory"], 256 * MiB);
    EXPECT_EQ(r.body["state"], "Running");

    r = c.get("/api/v1/vm.counters");
    EXPECT_EQ(r.status, 200u);
    EXPECT_EQ(r.body["port80"]["writes"], 42);

    r = c.request("PUT", "vm.resize", json{{"desired_balloon", 32 * MiB}});
    EXPECT_EQ(r.status, 204u);
    EXPECT_TRUE(r.body.is_null());
    EXPECT_EQ(vm_.target(), 32 * MiB);
    r = c.request("PUT", "vm.resize", json{{"desired_ram", 200 * MiB}});
    EXPECT_EQ(r.status, 204u);
    EXPECT_EQ(vm_.target(), 56 * MiB);

    EXPECT_EQ(c.request("PUT", "vm.pause").status, 204u);
    EXPECT_TRUE(vm_.paused());
    r = c.request("PUT", "vm.pause");
    EXPECT_EQ(r.status, 409u);
    EXPECT_EQ(r.error(), "already paused");
    EXPECT_EQ(c.get("vm.info").body["state"], "Paused");
    EXPECT_EQ(c.request("PUT", "vm.resume").status, 204u);
    EXPECT_FALSE(vm_.paused());
    EXPECT_EQ(c.request("PUT", "vm.power-button").status, 204u);
    EXPECT_EQ(vm_.power_buttons_, 1);
    EXPECT_EQ(c.get("vm.power-button").status, 405u);
    EXPECT_EQ(c.request("PUT", "vm.shutdown").status, 204u);
    EXPECT_TRUE(vm_.stopped_);
}

TEST_F(ApiServerTest, RawRequestsLikeCurl) {
    start();
    std::string r = exchange(sock_, "GET", "/api/v1/vm.info");
    EXPECT_EQ(status_of(r), 200u) << r;
    EXPECT_NE(r.find("Content-Type: application/json"), std::string::npos) << r;
    EXPECT_EQ(body_of(r)["cpus"], 2);

    r = exchange(sock_, "PUT", "/api/v1/vm.resize", R"({"desired_ram": 134217728})",
                 "Content-Type: application/json\r\n");
    EXPECT_EQ(status_of(r), 204u) << r;
    EXPECT_EQ(vm_.target(), 128 * MiB);

    // HTTP/1.0 without a Host header works too.
    RawConn c(sock_);
    c.send("GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n");
    bool eof = false;
    r = c.read_all(3s, &eof);
    EXPECT_EQ(status_of(r), 200u) << r;
    EXPECT_TRUE(eof);
}

// libvirt's body-less PUTs go through libcurl's CURLOPT_UPLOAD: a chunked
// empty body behind `Expect: 100-continue`. The interim 100 comes first, so
// curl need not wait a second for it.
TEST_F(ApiServerTest, ExpectContinueAndChunkedBody) {
    start();
    RawConn c(sock_);
    c.send("PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
           "Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n");
    const auto t0 = Clock::now();
    std::string r = c.read_all(500ms);
    EXPECT_EQ(r, "HTTP/1.1 100 Continue\r\n\r\n");
    EXPECT_LT(Clock::now() - t0, 600ms);
    c.send("0\r\n\r\n");
    r = c.read_response(3s);
    EXPECT_EQ(status_of(r), 204u) << r;
    EXPECT_TRUE(vm_.paused());
}

// A VMM that takes the lifecycle steps, to see what reaches it.
class LifecycleVm : public FakeVm {
public:
    Refusal add_net(NetConfig net, std::vector<Fd> fds) override {
        nets.push_back(net);
        for (Fd& f : fds) {
            struct stat st {};
            fd_kinds.push_back(::fstat(f.get(), &st) == 0 && S_ISFIFO(st.st_mode) ? "fifo" : "other");
        }
        return {};
    }
    std::vector<NetConfig> nets;
    std::vector<std::string> fd_kinds;
};

// vm.add-net's TAP fds ride on the request as SCM_RIGHTS, the way libvirt
// and Kata send them; the API hands them to add_net. Here: pipes.
TEST(ApiServerFds, AddNetReceivesTheRequestsFds) {
    TempDir dir;
    const std::string sock = dir.path() + "/vm.sock";
    LifecycleVm vm;
    ApiServer server(sock, vm);
    int p1[2], p2[2];
    ASSERT_EQ(::pipe2(p1, O_CLOEXEC), 0);
    ASSERT_EQ(::pipe2(p2, O_CLOEXEC), 0);
    const std::string body = R"({"mac":"52:54:00:aa:bb:cc","num_queues":4})";
    const std::string req = "PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                            "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    RawConn c(sock);
    int fds[2] = {p1[0], p2[0]};
    iovec iov{const_cast<char*>(req.data()), req.size()};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof fds)] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof fds);
    std::memcpy(CMSG_DATA(cm), fds, sizeof fds);
    ASSERT_EQ(::sendmsg(c.fd(), &msg, 0), static_cast<ssize_t>(req.size()));
    std::string r = c.read_response(3s);
    EXPECT_EQ(status_of(r), 204u) << r;
    ASSERT_EQ(vm.nets.size(), 1u);
    EXPECT_EQ(vm.nets[0].queue_pairs, 2u);
    EXPECT_EQ(vm.fd_kinds, (std::vector<std::string>{"fifo", "fifo"}));

    // Fewer fds than queue pairs: 400, and the fds are closed.
    c.send("PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nContent-Length: 16\r\n\r\n{\"num_queues\":4}");
    r = c.read_response(3s);
    EXPECT_EQ(status_of(r), 400u) << r;   // no fds, no tap
    for (int f : {p1[0], p1[1], p2[0], p2[1]}) ::close(f);
}

// `--api-socket fd=N`: a socket the caller bound and listens on (libvirt's
// chMonitorCreateSocket) is served as it is, and left in place at the end.
TEST(ApiServerFds, ServesAnInheritedListeningSocket) {
    TempDir dir;
    const std::string path = dir.path() + "/inherited.sock";
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    ASSERT_EQ(::listen(fd, 1), 0);
    FakeVm vm;
    {
        ApiServer server(Fd(fd), vm);
        std::string r = exchange(path, "GET", "/api/v1/vmm.ping");
        EXPECT_EQ(status_of(r), 200u) << r;
    }
    EXPECT_EQ(::access(path.c_str(), F_OK), 0);
    // Not a listening socket: refused.
    int unbound = ::socket(AF_UNIX, SOCK_STREAM, 0);
    EXPECT_THROW(ApiServer(Fd(unbound), vm), UsageError);
}

TEST_F(ApiServerTest, BadRequestsGetJsonErrors) {
    start();
    struct Case {
        const char* method;
        const char* target;
        const char* body;
        unsigned status;
    };
    const Case cases[] = {
        {"PUT", "/api/v1/vm.resize", "{\"desired_balloon\": ", 400},
        {"PUT", "/api/v1/vm.resize", "not json", 400},
        {"PUT", "/api/v1/vm.resize", "", 400},
        {"PUT", "/api/v1/vm.resize", "{\"desired_balloon\": -1}", 400},
        {"PUT", "/api/v1/vm.resize", "{\"desired_balloon\": \"64M\"}", 400},
        {"PUT", "/api/v1/vm.resize", "{\"desired_balloon\": 1.5}", 400},
        {"PUT", "/api/v1/vm.resize", "{\"desired_balloon\": 1e3}", 400},
        {"PUT", "/api/v1/vm.resize", "{\"desired_balloon\": 99999999999999999999999}", 400},
        {"PUT", "/api/v1/vm.resize", "{\"desired_balloon\": null}", 400},
        {"PUT", "/api/v1/vm.resize", "{}", 400},
        {"PUT", "/api/v1/vm.resize", "[1]", 400},
        {"PUT", "/api/v1/vm.resize", "{\"desired_ram\": 1, \"desired_balloon\": 1}", 400},
        {"PUT", "/api/v1/vm.resize", "{\"desired_ballon\": 1}", 400},
        {"PUT", "/api/v1/vm.resize", "{\"desired_ram\": 268435457}", 400},   // above memory
        {"PUT", "/api/v1/vm.resize", "{\"desired_ram\": 1048576}", 400},     // below the 16 MiB floor
        {"PUT", "/api/v1/vm.resize", "{\"desired_balloon\": 260046849}", 400},  // leaves < 16 MiB
        {"GET", "/api/v1/vm.nope", "", 404},
        {"GET", "/", "", 404},
        {"GET", "/api/v2/vm.info", "", 404},
        {"GET", "/api/v1/vm.pause", "", 405},
        {"PUT", "/api/v1/vm.info", "", 405},
        {"POST", "/api/v1/vm.resize", "{}", 405},
        {"DELETE", "/api/v1/vm.shutdown", "", 405},
    };
    for (const Case& k : cases) {
        std::string r = exchange(sock_, k.method, k.target, k.body);
        EXPECT_EQ(status_of(r), k.status) << k.method << " " << k.target << " " << k.body << "\n" << r;
        json b = body_of(r);
        ASSERT_TRUE(b.is_object()) << r;
        EXPECT_TRUE(b["error"].is_string()) << r;
    }
    EXPECT_EQ(vm_.resizes(), 0) << "no bad request reached the VM";
    std::string r = exchange(sock_, "GET", "/api/v1/vm.pause");
    EXPECT_NE(r.find("Allow: PUT"), std::string::npos) << r;

    // Not HTTP at all.
    for (const char* junk : {"HELLO\r\n\r\n", "GET /api/v1/vm.info HTTP/9.9\r\n\r\n", "GET  HTTP/1.1\r\n\r\n",
                             "PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: -5\r\n\r\n"}) {
        RawConn c(sock_);
        c.send(junk);
        bool eof = false;
        r = c.read_all(3s, &eof);
        EXPECT_EQ(status_of(r), 400u) << junk << "\n" << r;
        EXPECT_TRUE(body_of(r)["error"].is_string()) << r;
        EXPECT_TRUE(eof) << "the connection is closed after a malformed request";
    }
}

TEST_F(ApiServerTest, OversizedBodyIs413) {
    start();
    std::string big(100 * 1024, 'x');
    std::string r = exchange(sock_, "PUT", "/api/v1/vm.resize", "{\"desired_ram\": \"" + big + "\"}");
    EXPECT_EQ(status_of(r), 413u) << r.substr(0, 200);
    EXPECT_TRUE(body_of(r)["error"].is_string());
    // Announced but not sent: refused from the header alone.
    RawConn c(sock_);
    c.send("PUT /api/v1/vm.resize HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n");
    EXPECT_EQ(status_of(c.read_all(3s)), 413u);
    // Chunked bodies count too.
    RawConn d(sock_);
    std::string chunk(32 * 1024, 'y');
    char size_line[32];
    std::snprintf(size_line, sizeof size_line, "%zx\r\n", chunk.size());
    d.send("PUT /api/v1/vm.resize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (int i = 0; i < 3; ++i) d.send(size_line + chunk + "\r\n");
    EXPECT_EQ(status_of(d.read_all(3s)), 413u);
    // Headers too large.
    RawConn e(sock_);
    e.send("GET /api/v1/vm.info HTTP/1.1\r\nX-Junk: " + std::string(20000, 'z') + "\r\n\r\n");
    EXPECT_EQ(status_of(e.read_all(3s)), 431u);
    EXPECT_EQ(ApiClient(sock_).get("vmm.ping").status, 200u) << "the server still answers";
}

TEST_F(ApiServerTest, KeepAliveServesSeveralRequests) {
    start();
    RawConn c(sock_);
    for (int i = 0; i < 3; ++i) {
        c.send("GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n");
        std::string r = c.read_response(3s);
        EXPECT_EQ(status_of(r), 200u) << r;
    }
    // Pipelined.
    c.send("GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\nGET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    std::string both = c.read_all(3s);
    EXPECT_EQ(status_of(both), 200u);
    EXPECT_NE(both.find("\"cpus\""), std::string::npos) << both;
}

TEST_F(ApiServerTest, SlowClientDoesNotBlockOthers) {
    ApiLimits limits;
    limits.request_timeout = 1000ms;
    start(limits);
    RawConn slow(sock_);
    slow.send("PUT /api/v1/vm.resize HTTP/1.1\r\nHost: localhost\r\nContent-Length: 30\r\n\r\n{\"desired");
    auto stalled_at = Clock::now();
    std::this_thread::sleep_for(100ms);  // the server is now in the middle of reading it

    auto t0 = Clock::now();
    ApiResponse r = ApiClient(sock_).get("vm.info");
    auto took = Clock::now() - t0;
    EXPECT_EQ(r.status, 200u);
    EXPECT_LT(took, 300ms) << "another client's request waited on the stalled one";

    bool eof = false;
    std::string answer = slow.read_all(5s, &eof);
    auto dropped_after = Clock::now() - stalled_at;
    EXPECT_TRUE(eof) << "the stalled client is disconnected";
    EXPECT_EQ(status_of(answer), 408u) << answer;
    EXPECT_TRUE(body_of(answer)["error"].is_string()) << answer;
    EXPECT_GE(dropped_after, 900ms);
    EXPECT_LT(dropped_after, 3s);
    EXPECT_EQ(vm_.resizes(), 0);
}

TEST_F(ApiServerTest, IdleConnectionsAreClosedSilently) {
    ApiLimits limits;
    limits.idle_timeout = 300ms;
    start(limits);
    RawConn idle(sock_);
    bool eof = false;
    std::string got = idle.read_all(3s, &eof);
    EXPECT_TRUE(eof);
    EXPECT_EQ(got, "");
}

TEST_F(ApiServerTest, StopsWithClientsConnected) {
    start();
    RawConn idle(sock_), partial(sock_);
    partial.send("GET /api/v1/vm.info HTTP/1.1\r\n");
    std::this_thread::sleep_for(50ms);
    auto t0 = Clock::now();
    server_.reset();
    EXPECT_LT(Clock::now() - t0, 500ms) << "the destructor waited on its clients";
    bool eof = false;
    idle.read_all(1s, &eof);
    EXPECT_TRUE(eof) << "clients are disconnected";
    EXPECT_NE(::access(sock_.c_str(), F_OK), 0);
}

TEST_F(ApiServerTest, DefaultLimits) {
    ApiLimits d;
    EXPECT_EQ(d.request_timeout, 5s);
    EXPECT_EQ(d.body_limit, 64u * 1024);
    EXPECT_EQ(d.max_connections, 32u);
}

TEST_F(ApiServerTest, ConnectionLimit) {
    ApiLimits limits;
    limits.max_connections = 2;
    start(limits);
    RawConn a(sock_), b(sock_);
    std::this_thread::sleep_for(200ms);  // let the server accept both
    RawConn c(sock_);
    std::string r = c.read_all(3s);
    EXPECT_EQ(status_of(r), 503u) << r;
    EXPECT_TRUE(body_of(r)["error"].is_string()) << r;
    // One of the idle ones still works.
    a.send("GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n");
    EXPECT_EQ(status_of(a.read_response(3s)), 200u);
}

TEST_F(ApiServerTest, RefusesLiveSocket) {
    start();
    FakeVm other;
    try {
        ApiServer second(sock_, other);
        FAIL() << "a second server took over a live socket";
    } catch (const std::exception& e) {
        EXPECT_NE(std::string(e.what()).find("served by another process"), std::string::npos) << e.what();
    }
    EXPECT_EQ(ApiClient(sock_).get("vmm.ping").status, 200u) << "the first server still owns its socket";
}

TEST_F(ApiServerTest, ReplacesStaleSocket) {
    std::filesystem::create_directories(dir_.path() + "/run");
    {  // a socket file nobody listens on, as a crashed VM leaves behind
        int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sock_.c_str());
        ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
        ::close(fd);
    }
    try {
        ApiClient(sock_).get("vmm.ping");
        FAIL() << "a stale socket answered";
    } catch (const SysError& e) {
        EXPECT_EQ(e.err(), ECONNREFUSED);
        EXPECT_NE(std::string(e.what()).find(sock_), std::string::npos) << e.what();
    }
    start();
    EXPECT_EQ(ApiClient(sock_).get("vmm.ping").status, 200u);
}

TEST_F(ApiServerTest, RefusesToReplaceAFile) {
    std::filesystem::create_directories(dir_.path() + "/run");
    { FILE* f = std::fopen(sock_.c_str(), "w"); ASSERT_NE(f, nullptr); std::fclose(f); }
    EXPECT_THROW(start(), std::runtime_error);
    EXPECT_EQ(::access(sock_.c_str(), F_OK), 0) << "the file was left alone";
}

TEST(ApiDispatch, WithoutSockets) {
    FakeVm vm;
    EXPECT_EQ(api_dispatch(vm, "GET", "/api/v1/vm.info?x=1", "").status, 200u);
    EXPECT_EQ(api_dispatch(vm, "PUT", "/api/v1/vm.resize", R"({"desired_ram": 16777216})").status, 204u);
    EXPECT_EQ(vm.target(), 240 * MiB);
    EXPECT_EQ(api_dispatch(vm, "PUT", "/api/v1/vm.resize", R"({"desired_ram": 268435456})").status, 204u);
    EXPECT_EQ(vm.target(), 0u);
    EXPECT_EQ(api_dispatch(vm, "PUT", "/api/v1/vm.resize", R"({"desired_balloon": 0})").status, 204u);
    EXPECT_EQ(api_dispatch(vm, "PUT", "/api/v1/vm.resize", R"({"desired_ram": 16777215})").status, 400u);
    ApiReply r = api_dispatch(vm, "GET", "/api/v1/vm.resume", "");
    EXPECT_EQ(r.status, 405u);
    EXPECT_EQ(r.allow, "PUT");
}

// desired_ram with virtio-mem: the guest's total memory, as in Cloud
// Hypervisor's API. Above the boot size virtio-mem gets the difference and the
// balloon gives everything back; at or below it virtio-mem unplugs all and
// the balloon takes the rest; past --memory-max or below the floor is 400.
TEST(ApiDispatch, DesiredRamWithVirtioMem) {
    struct Vm : FakeVm {
        bool balloon = true;
        std::uint64_t requested = 0;
        int hotplug_calls = 0;
        VmInfo info() override {
            VmInfo i = FakeVm::info();
            if (!balloon) i.balloon.reset();
            i.virtio_mem = VmInfo::VirtioMem{1024 * MiB, 768 * MiB, 0, requested, 0, 0};
            return i;
        }
        ControlError resize_hotplug(std::uint64_t bytes) override {
            requested = bytes;
            ++hotplug_calls;
            return ControlError::none;
        }
    } vm;
    auto put = [&](std::uint64_t ram) {
        return api_dispatch(vm, "PUT", "/api/v1/vm.resize", json{{"desired_ram", ram}}.dump());
    };
    EXPECT_EQ(api_dispatch(vm, "PUT", "/api/v1/vm.resize", R"({"desired_balloon": 64000000})").status, 204u);
    EXPECT_EQ(put(768 * MiB).status, 204u);   // boot 256 MiB + 512 MiB plugged
    EXPECT_EQ(vm.requested, 512 * MiB);
    EXPECT_EQ(vm.target(), 0u) << "growing deflates the balloon";
    EXPECT_EQ(put(1024 * MiB).status, 204u);
    EXPECT_EQ(vm.requested, 768 * MiB);
    EXPECT_EQ(put(128 * MiB).status, 204u);
    EXPECT_EQ(vm.requested, 0u);
    EXPECT_EQ(vm.target(), 128 * MiB);
    EXPECT_EQ(put(256 * MiB).status, 204u);
    EXPECT_EQ(vm.target(), 0u);

    const int calls = vm.hotplug_calls;
    ApiReply r = put(1024 * MiB + 2 * MiB);
    EXPECT_EQ(r.status, 400u);
    EXPECT_NE(r.body["error"].get<std::string>().find("--memory-max"), std::string::npos) << r.body;
    EXPECT_EQ(put(512 * MiB + 4096).status, 400u);   // not whole 2 MiB blocks
    EXPECT_EQ(put(1 * MiB).status, 400u);            // below the floor
    EXPECT_EQ(vm.hotplug_calls, calls) << "no bad request reached the VM";

    vm.balloon = false;
    r = put(200 * MiB);
    EXPECT_EQ(r.status, 400u);
    EXPECT_NE(r.body["error"].get<std::string>().find("no balloon"), std::string::npos) << r.body;
    EXPECT_EQ(put(256 * MiB).status, 204u);
    EXPECT_EQ(vm.requested, 0u);

    json info = api_dispatch(vm, "GET", "/api/v1/vm.info", "").body;
    EXPECT_EQ(info["memory_max"], 1024 * MiB);
    EXPECT_EQ(info["virtio_mem"]["region_bytes"], 768 * MiB);
    EXPECT_TRUE(info["virtio_mem"].contains("plugged_bytes"));
    EXPECT_TRUE(info["virtio_mem"].contains("hugepage_backed_bytes"));

    // A VM without virtio-mem refuses to grow past its memory with 400.
    FakeVm plain;
    r = api_dispatch(plain, "PUT", "/api/v1/vm.resize", json{{"desired_ram", 512 * MiB}}.dump());
    EXPECT_EQ(r.status, 400u);
    EXPECT_NE(r.body["error"].get<std::string>().find("no --memory-max"), std::string::npos) << r.body;
}

// The JSON of vm.info and vm.counters: the keys the README documents and the
// CLI and scripts read, made from the typed structs.
TEST(ApiDispatch, InfoAndCountersJson) {
    struct Vm : FakeVm {
        VmCounters counters() override {
            VmCounters c;
            c.port80 = {7, 2, 0x42};
            c.nets.resize(2);
            c.nets[1].rx_packets = 5;
            c.nets[1].tx_dropped = 1;
            c.disks.resize(1);
            c.disks[0] = {1, 512, 2, 1024, 3, 4, 8192, 5};
            VmCounters::Balloon b;
            b.counters.tracker.inflated_pages = 256;
            b.counters.tracker.bytes_released = 2 * MiB;
            b.counters.bad_chains = 3;
            b.stats.valid = true;
            b.stats.last_update_unix_s = 1700000000;
            b.stats.values.push_back(BalloonStat{5, 6, "unused", 4096, 4});
            c.balloon = b;
            c.exits.userspace = {{"serial COM1", 12, 3400}, {"unclaimed port 0x70", 2, 100}};
            c.exits.kvm = std::vector<KvmStat>{{"exits", 99}, {"halt_exits", 7}};
            return c;
        }
    } vm;
    ApiReply r = api_dispatch(vm, "GET", "/api/v1/vm.info", "");
    ASSERT_EQ(r.status, 200u);
    for (const char* k : {"name", "state", "cpus", "memory", "backing", "hugepage_backed_bytes", "rss_bytes",
                          "vmm_rss_bytes", "balloon"})
        EXPECT_TRUE(r.body.contains(k)) << k;
    EXPECT_EQ(r.body["backing"], "thp");
    EXPECT_EQ(r.body["balloon"]["target_bytes"], 0u);
    EXPECT_TRUE(r.body["balloon"].contains("actual_bytes"));
    EXPECT_EQ(r.body["disks"], json::parse(R"([{"path": "/img/a.raw", "size": 8388608, "readonly": true, "queues": 2}])"));

    r = api_dispatch(vm, "GET", "/api/v1/vm.counters", "");
    ASSERT_EQ(r.status, 200u);
    EXPECT_EQ(r.body["port80"], (json{{"writes", 7}, {"reads", 2}, {"last_code", 0x42}}));
    EXPECT_EQ(r.body["net0"]["rx_packets"], 0u);
    EXPECT_EQ(r.body["net1"], (json{{"rx_packets", 5}, {"rx_bytes", 0}, {"rx_dropped", 0},
                                    {"tx_packets", 0}, {"tx_bytes", 0}, {"tx_dropped", 1}}));
    EXPECT_FALSE(r.body.contains("net2"));
    EXPECT_EQ(r.body["disk0"], (json{{"read_requests", 1}, {"read_bytes", 512}, {"write_requests", 2},
                                     {"write_bytes", 1024}, {"flush_requests", 3}, {"discard_requests", 4},
                                     {"discard_bytes", 8192}, {"errors", 5}}));
    EXPECT_FALSE(r.body.contains("disk1"));
    const json& b = r.body["balloon"];
    EXPECT_EQ(b["inflated_pages"], 256u);
    EXPECT_EQ(b["released_bytes"], 2 * MiB);
    EXPECT_EQ(b["bad_chains"], 3u);
    for (const char* k : {"regions_released", "discarded_bytes", "reported_bytes", "bad_pfns"})
        EXPECT_TRUE(b.contains(k)) << k;
    EXPECT_EQ(b["stats"], (json{{"unused", 4}, {"last_update", 1700000000}}));
    // Exits by reason, most frequent first, and KVM's counters by their names.
    const json user = json::array({{{"reason", "serial COM1"}, {"count", 12}, {"handling_ns", 3400}},
                                   {{"reason", "unclaimed port 0x70"}, {"count", 2}, {"handling_ns", 100}}});
    EXPECT_EQ(r.body["exits"], (json{{"userspace", user}, {"kvm", {{"exits", 99}, {"halt_exits", 7}}}}));
    // Without KVM's statistics: no "kvm", a note saying why.
    FakeVm plain;
    r = api_dispatch(plain, "GET", "/api/v1/vm.counters", "");
    EXPECT_FALSE(r.body["exits"].contains("kvm")) << r.body;
    EXPECT_EQ(r.body["exits"]["kvm_note"], "KVM_GET_STATS_FD: no");
}

// virtio-balloon's num_pages is a le32 (VIRTIO 1.2 §5.5.6): a target of 2^32
// pages (16 TiB) or more cannot be expressed, and must be refused rather than
// truncated to a small target.
TEST(ApiDispatch, BalloonTargetBeyond32BitPagesIs400) {
    constexpr std::uint64_t TiB = 1ull << 40;
    struct Vm : FakeVm {
        VmInfo info() override {
            VmInfo i = FakeVm::info();
            i.memory = 64 * TiB;
            return i;
        }
    } vm;
    ApiReply r = api_dispatch(vm, "PUT", "/api/v1/vm.resize", json{{"desired_balloon", 20 * TiB}}.dump());
    EXPECT_EQ(r.status, 400u) << r.body;
    r = api_dispatch(vm, "PUT", "/api/v1/vm.resize", json{{"desired_ram", 1 * TiB}}.dump());
    EXPECT_EQ(r.status, 400u) << r.body;
    EXPECT_EQ(vm.resizes(), 0);
    // The largest target that fits: 2^32 - 1 pages.
    const std::uint64_t most = (std::uint64_t{UINT32_MAX}) << 12;
    r = api_dispatch(vm, "PUT", "/api/v1/vm.resize", json{{"desired_balloon", most}}.dump());
    EXPECT_EQ(r.status, 204u) << r.body;
    EXPECT_EQ(vm.target(), most);
}

// Every refusal is a 409 with the message the CLI prints.
TEST(ApiDispatch, RefusalsAre409WithTheirMessage) {
    struct Vm : FakeVm {
        ControlError resize(std::uint64_t) override { return ControlError::no_balloon; }
    } vm;
    ApiReply r = api_dispatch(vm, "PUT", "/api/v1/vm.resize", R"({"desired_balloon": 0})");
    EXPECT_EQ(r.status, 409u);
    EXPECT_EQ(r.body["error"], "this VM has no balloon (start it with --balloon)");
    r = api_dispatch(vm, "PUT", "/api/v1/vm.resume", "");
    EXPECT_EQ(r.status, 409u);
    EXPECT_EQ(r.body["error"], "not paused");
    EXPECT_STREQ(control_message(ControlError::pause_failed), "the vCPUs did not stop (is the VM stopping?)");
}

TEST(ApiClientTest, UnreachableSocketNamesPathAndErrno) {
    TempDir dir;
    std::string missing = dir.path() + "/none.sock";
    try {
        ApiClient(missing).get("vm.info");
        FAIL();
    } catch (const SysError& e) {
        EXPECT_EQ(e.err(), ENOENT);
        std::string what = e.what();
        EXPECT_NE(what.find("connect " + missing), std::string::npos) << what;
        EXPECT_NE(what.find("errno 2"), std::string::npos) << what;
    }
}

TEST(ApiClientTest, TimesOutOnAMuteServer) {
    TempDir dir;
    std::string path = dir.path() + "/mute.sock";
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    ASSERT_EQ(::listen(fd, 4), 0);  // accepts (in the backlog) but never answers
    auto t0 = Clock::now();
    try {
        ApiClient(path, 300ms).get("vm.info");
        FAIL();
    } catch (const SysError& e) {
        EXPECT_EQ(e.err(), ETIMEDOUT) << e.what();
    }
    EXPECT_LT(Clock::now() - t0, 2s);
    ::close(fd);
}

TEST(ApiSocketDir, Defaults) {
    {
        ScopedEnv env("XDG_RUNTIME_DIR", "/run/user/1234");
        EXPECT_EQ(default_socket_dir(), "/run/user/1234/kguest");
        EXPECT_EQ(socket_for("vm1"), "/run/user/1234/kguest/vm1.sock");
    }
    {
        ScopedEnv env("XDG_RUNTIME_DIR", "");
        EXPECT_EQ(default_socket_dir(), ::geteuid() == 0 ? std::string("/run/kguest")
                                                          : "/tmp/kguest-" + std::to_string(::getuid()));
    }
    EXPECT_THROW(socket_for("a/b"), UsageError);
    EXPECT_THROW(socket_for(""), UsageError);
}

// A socket directory someone else owns, or can write to without the sticky
// bit, lets them replace our socket (or serve a fake VM to our client): the
// server and the client refuse it with one line (a usage error: exit 2).
TEST(ApiSocketDir, RefusesADirectoryOthersOwnOrCanWrite) {
    TempDir dir;
    const std::string sock = dir.path() + "/vm.sock";
    FakeVm vm;
    auto refused = [&](const char* why) {
        try {
            ApiServer server(sock, vm);
            ADD_FAILURE() << "served from a directory " << why;
        } catch (const UsageError& e) {
            EXPECT_NE(std::string(e.what()).find(dir.path()), std::string::npos) << e.what();
        } catch (const std::exception& e) {
            ADD_FAILURE() << "not a usage error: " << e.what();
        }
    };
    ASSERT_EQ(::chmod(dir.path().c_str(), 0777), 0);
    refused("writable by others");
    ASSERT_EQ(::chmod(dir.path().c_str(), 0730), 0);
    refused("writable by its group");
    // World-writable with the sticky bit, as /tmp: nobody else may remove or
    // rename our socket there.
    ASSERT_EQ(::chmod(dir.path().c_str(), 01777), 0);
    EXPECT_NO_THROW(ApiServer(sock, vm));
    ASSERT_EQ(::chmod(dir.path().c_str(), 0755), 0);
    EXPECT_NO_THROW(ApiServer(sock, vm));
    if (::geteuid() == 0) {   // another owner needs root to set up
        ASSERT_EQ(::chown(dir.path().c_str(), 65534, 65534), 0);
        refused("owned by another user");
        ASSERT_EQ(::chown(dir.path().c_str(), 0, 0), 0);
    }

    // The client: `kguest info NAME` and `kguest list` look in the default directory.
    TempDir runtime;
    ScopedEnv env("XDG_RUNTIME_DIR", runtime.path());
    const std::string kdir = runtime.path() + "/kguest";
    ASSERT_EQ(::mkdir(kdir.c_str(), 0700), 0);
    ASSERT_EQ(::chmod(kdir.c_str(), 0777), 0);
    for (std::vector<std::string> args : {std::vector<std::string>{"info", "vm1"}, {"list"}}) {
        std::vector<std::string> argv = {"kguest"};
        argv.insert(argv.end(), args.begin(), args.end());
        std::vector<char*> raw;
        for (auto& a : argv) raw.push_back(a.data());
        raw.push_back(nullptr);
        ::testing::internal::CaptureStderr();
        const int status = cli_main(static_cast<int>(argv.size()), raw.data());
        const std::string err = ::testing::internal::GetCapturedStderr();
        EXPECT_EQ(status, 2) << args[0] << ": " << err;
        EXPECT_NE(err.find(kdir), std::string::npos) << err;
        EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    }
}

// --- the CLI ---------------------------------------------------------------

struct CliRun {
    int status;
    std::string out, err;
};

CliRun cli(std::vector<std::string> args) {
    args.insert(args.begin(), "kguest");
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::testing::internal::CaptureStdout();
    ::testing::internal::CaptureStderr();
    int status = cli_main(static_cast<int>(args.size()), argv.data());
    std::fflush(stdout);
    std::fflush(stderr);
    CliRun r{status, ::testing::internal::GetCapturedStdout(), ::testing::internal::GetCapturedStderr()};
    return r;
}

// True when `out` has a line "key:   value" (any alignment).
bool has_line(const std::string& out, const std::string& key, const std::string& value) {
    std::size_t pos = 0;
    while (pos < out.size()) {
        std::size_t end = out.find('\n', pos);
        std::string line = out.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
        if (line.rfind(key + ":", 0) == 0) {
            std::size_t v = line.find_first_not_of(' ', key.size() + 1);
            if (v != std::string::npos && line.substr(v) == value) return true;
        }
        if (end == std::string::npos) break;
        pos = end + 1;
    }
    return false;
}

class ApiCliTest : public ::testing::Test {
protected:
    TempDir dir_;
    ScopedEnv env_{"XDG_RUNTIME_DIR", dir_.path()};
};

TEST_F(ApiCliTest, BalloonWaitConverges) {
    FakeVm vm(true);
    ApiServer server(socket_for("vm1"), vm);
    auto t0 = Clock::now();
    CliRun r = cli({"balloon", "vm1", "--target", "64M", "--wait", "--timeout", "10"});
    EXPECT_EQ(r.status, 0) << r.out << r.err;
    EXPECT_EQ(vm.target(), 192 * MiB);
    EXPECT_NE(r.out.find("(reached)"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("192 MiB"), std::string::npos) << r.out;
    EXPECT_LT(Clock::now() - t0, 5s);
}

TEST_F(ApiCliTest, BalloonWaitTimesOut) {
    FakeVm vm(false);
    ApiServer server(socket_for("vm1"), vm);
    auto t0 = Clock::now();
    CliRun r = cli({"balloon", "vm1", "--target=64M", "--wait", "--timeout", "1"});
    auto took = Clock::now() - t0;
    EXPECT_EQ(r.status, 1) << r.out << r.err;
    EXPECT_NE(r.err.find("not 192 MiB"), std::string::npos) << r.err;
    EXPECT_GE(took, 900ms);
    EXPECT_LT(took, 3s);
}

TEST_F(ApiCliTest, BalloonWithoutWaitAndBySocket) {
    FakeVm vm(false);
    std::string sock = dir_.path() + "/elsewhere/x.sock";
    ApiServer server(sock, vm);
    CliRun r = cli({"balloon", "--api-socket", sock, "--target", "128M"});
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(vm.target(), 128 * MiB);
    r = cli({"balloon", "--api-socket", sock, "--target", "1G"});
    EXPECT_EQ(r.status, 2) << r.err;
    r = cli({"balloon", "--api-socket", sock, "--target", "1M"});
    EXPECT_EQ(r.status, 1) << r.err;  // the server's floor
    EXPECT_NE(r.err.find("below the floor"), std::string::npos) << r.err;
}

TEST_F(ApiCliTest, ListShowsRunningVmsOnly) {
    FakeVm vm;
    ApiServer server(socket_for("alpha"), vm);
    {  // a stale socket: listed by nobody
        int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", socket_for("dead").c_str());
        ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
        ::close(fd);
    }
    CliRun r = cli({"list"});
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_NE(r.out.find("NAME"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("alpha"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("Running"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("256 MiB"), std::string::npos) << r.out;
    EXPECT_EQ(r.out.find("dead"), std::string::npos) << r.out;
    r = cli({"list", "--json"});
    EXPECT_EQ(r.status, 0);
    json j = json::parse(r.out);
    ASSERT_EQ(j.size(), 1u);
    EXPECT_EQ(j[0]["socket"], socket_for("alpha"));
}

TEST_F(ApiCliTest, InfoStatsAndControl) {
    FakeVm vm;
    ApiServer server(socket_for("vm1"), vm);
    CliRun r = cli({"info", "vm1"});
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out.rfind("name:", 0), 0u) << r.out;
    EXPECT_TRUE(has_line(r.out, "memory", "256 MiB")) << r.out;
    EXPECT_TRUE(has_line(r.out, "rss", "100.5 MiB")) << r.out;
    EXPECT_TRUE(has_line(r.out, "hugepage_backed", "128 MiB")) << r.out;
    EXPECT_TRUE(has_line(r.out, "balloon.actual", "0 MiB")) << r.out;
    EXPECT_TRUE(has_line(r.out, "state", "Running")) << r.out;
    EXPECT_TRUE(has_line(r.out, "disks.0.path", "/img/a.raw")) << r.out;
    EXPECT_TRUE(has_line(r.out, "disks.0.readonly", "true")) << r.out;
    // Keys are aligned: every value starts in the same column.
    std::size_t col = r.out.find("256 MiB") - r.out.rfind('\n', r.out.find("256 MiB")) - 1;
    EXPECT_EQ(r.out.find("Running") - r.out.rfind('\n', r.out.find("Running")) - 1, col) << r.out;
    r = cli({"info", "vm1", "--json"});
    EXPECT_EQ(json::parse(r.out)["memory"], 256 * MiB);
    r = cli({"stats", "vm1"});
    EXPECT_EQ(r.status, 0);
    EXPECT_TRUE(has_line(r.out, "port80.writes", "42")) << r.out;
    EXPECT_TRUE(has_line(r.out, "net0.tx", "1000 B")) << r.out;
    EXPECT_TRUE(has_line(r.out, "disk0.read", "4096 B")) << r.out;
    EXPECT_TRUE(has_line(r.out, "disk0.read_requests", "1")) << r.out;
    // The exits in a block of their own, top first, with the time per exit.
    EXPECT_TRUE(has_line(r.out, "  serial COM1", "3, 1.5 us each")) << r.out;
    EXPECT_LT(r.out.find("serial COM1"), r.out.find("rtc:")) << r.out;
    EXPECT_NE(r.out.find("exits in KVM: KVM_GET_STATS_FD: no"), std::string::npos) << r.out;
    EXPECT_EQ(cli({"pause", "vm1"}).status, 0);
    EXPECT_TRUE(vm.paused());
    r = cli({"pause", "vm1"});
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.err.find("already paused (HTTP 409)"), std::string::npos) << r.err;
    EXPECT_EQ(cli({"resume", "vm1"}).status, 0);
    EXPECT_EQ(cli({"stop", "vm1"}).status, 0);
    EXPECT_TRUE(vm.stopped_);
}

TEST_F(ApiCliTest, UsageAndUnreachable) {
    for (std::vector<std::string> bad : std::vector<std::vector<std::string>>{
             {"info"}, {"info", "a", "b"}, {"info", "a", "--target", "1M"}, {"balloon", "a"},
             {"balloon", "a", "--target", "lots"}, {"balloon", "a", "--target", "1M", "--timeout", "1"},
             {"balloon", "a", "--target", "1M", "--wait", "--timeout", "-1"}, {"pause", "a", "--bogus"},
             {"info", "a/b"}, {"info", "a", "--api-socket", "/x.sock"}, {"list", "x"}, {"frobnicate"}}) {
        CliRun r = cli(bad);
        EXPECT_EQ(r.status, 2) << bad[0] << " " << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    }
    CliRun r = cli({"info", "ghost"});
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.err.find(socket_for("ghost")), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("errno 2"), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    r = cli({"list"});
    EXPECT_EQ(r.status, 0) << "no socket directory yet: an empty list";
    r = cli({"info", "--help"});
    EXPECT_EQ(r.status, 0);
    EXPECT_EQ(r.out, cli_usage());
}

} // namespace
} // namespace kguest
