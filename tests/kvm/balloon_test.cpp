// Live memory resizing end to end, and the control API against a
// running VM:
// - a 1 GiB THP-backed guest touches all its RAM (>= 90% huge-page backed),
//   then `kguest balloon NAME --target 256M --wait` five times over: the VMM's
//   RSS drops by >= 90% of 768 MiB, what stays is >= 80% huge-page backed,
//   deflating gives it back, and RSS does not creep from cycle to cycle; the
//   guest checks that its non-ballooned memory kept its contents;
// - the same guest driver against QEMU's virtio-balloon-pci, driven by QMP;
// - the README's curl examples, malformed requests (4xx, the VM runs on), and
//   slow clients that do not delay the guest's timer ticks; vm.counters'
//   exits by reason (COM1's, and KVM's own counters).
#include "tests/support/kvm_env.hpp"
#include "tests/support/process.hpp"

#include <nlohmann/json.hpp>
#include <sys/socket.h>
#include <sys/un.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

namespace kguest {
namespace {
using namespace kguest::test;
using nlohmann::json;

constexpr std::uint64_t kMiB = 1ull << 20;

// `kguest info --json`; a failure is reported and reads as zeros.
json info(const std::string& sock) {
    ProcResult r;
    for (int attempt = 0; attempt < 3; ++attempt) {
        r = run_process({kKguest, "info", "--api-socket", sock, "--json"}, 30);
        json j = r.status == 0 ? json::parse(r.out, nullptr, false) : json();
        if (j.is_object()) return j;
        std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    ADD_FAILURE() << "kguest info failed 3 times (status " << r.status << "): " << r.err << r.out;
    return {{"memory", 0}, {"vmm_rss_bytes", 0}, {"hugepage_backed_bytes", 0}, {"state", ""}};
}

bool wait_socket(const std::string& path, int seconds) {
    for (int i = 0; i < seconds * 20; ++i) {
        if (access(path.c_str(), F_OK) == 0) return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
}

std::size_t count(const std::string& text, const std::string& what) {
    std::size_t n = 0;
    for (auto p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
    return n;
}

TEST(KvmBalloon, ThpAwareInflateDeflateCycles) {
    KGUEST_OPEN_KVM(kvm);
    const std::string sock = "/tmp/kguest-test-balloon.sock";
    Background vm(kguest_run("test=balloon balloon_ms=600000 cycles=5", 1,
                             {"--memory", "1G", "--hugepages", "thp", "--balloon", "--api-socket", sock}));
    ASSERT_TRUE(vm.wait_for_output("balloon: touched", 300)) << vm.out() << vm.err();
    json full = info(sock);
    ASSERT_TRUE(full.is_object()) << vm.err();
    const std::uint64_t ram = full["memory"], rss_full = full["vmm_rss_bytes"];
    EXPECT_GE(full["hugepage_backed_bytes"].get<std::uint64_t>(), ram * 9 / 10) << full.dump();
    std::vector<std::uint64_t> inflated_rss;
    for (int cycle = 1; cycle <= 5; ++cycle) {
        auto in = run_process({kKguest, "balloon", "--api-socket", sock, "--target", "256M", "--wait", "--timeout", "30"}, 60);
        // The required bound: the guest reports `actual` at the target within 30 s.
        ASSERT_EQ(in.status, 0) << "cycle " << cycle << ": " << in.out << in.err << "\nVM:\n" << vm.out() << vm.err();
        json small = info(sock);
        const std::uint64_t rss = small["vmm_rss_bytes"];
        inflated_rss.push_back(rss);
        EXPECT_GE(rss_full - std::min(rss, rss_full), 768 * kMiB * 9 / 10) << "cycle " << cycle << ": " << small.dump();
        EXPECT_GE(small["hugepage_backed_bytes"].get<std::uint64_t>(), 256 * kMiB * 8 / 10) << small.dump();
        const std::size_t done = count(vm.out(), "balloon: target=0 ");
        if (cycle == 5) {
            // cycles=5: once the balloon is empty the guest verifies and ends its
            // test, so a --wait client can find the VM gone between two polls
            // (seen: "balloon 64 MiB of 0 MiB", then the socket gone). The
            // guest's own "target=0 actual=0" line, checked below, is the proof.
            auto out = run_process({kKguest, "balloon", "--api-socket", sock, "--target", "1G"}, 30);
            ASSERT_EQ(out.status, 0) << out.out << out.err;
            break;
        }
        auto out = run_process({kKguest, "balloon", "--api-socket", sock, "--target", "1G", "--wait", "--timeout", "120"}, 150);
        ASSERT_EQ(out.status, 0) << "cycle " << cycle << ": " << out.out << out.err << "\nVM:\n" << vm.out() << vm.err();
        // The guest re-touches and verifies what came back before its next line.
        for (int i = 0; i < 1200 && count(vm.out(), "balloon: target=0 ") == done; ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        ASSERT_TRUE(vm.running()) << "the VM ended during cycle " << cycle << "\n" << vm.out() << vm.err();
        EXPECT_GE(info(sock)["vmm_rss_bytes"].get<std::uint64_t>(), rss_full * 9 / 10) << "deflated memory not back in use";
    }
    auto r = vm.wait(120);
    ASSERT_EQ(r.status, 0) << r.out << r.err;
    EXPECT_EQ(count(r.out, "balloon: target=0 actual=0 "), 5u) << r.out;
    auto res = results(r.out, "balloon");
    ASSERT_EQ(res.size(), 1u) << r.out;
    EXPECT_EQ(res[0]["mismatches"], "0");
    EXPECT_EQ(res[0]["ok"], "1");
    // No creep: the inflated footprint is the same in every cycle.
    auto [lo, hi] = std::minmax_element(inflated_rss.begin(), inflated_rss.end());
    EXPECT_LE(*hi - *lo, 16 * kMiB) << "RSS at 256M over the cycles crept from " << *lo << " to " << *hi;
}

// A minimal QMP client: one JSON object per line each way.
class Qmp {
public:
    bool connect_to(const std::string& path) {
        for (int i = 0; i < 200; ++i) {
            fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            sockaddr_un sa{};
            sa.sun_family = AF_UNIX;
            std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path.c_str());
            if (connect(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0) {
                timeval tv{30, 0};
                setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
                return read_msg().contains("QMP") && cmd({{"execute", "qmp_capabilities"}}).contains("return");
            }
            close(fd_);
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
        return false;
    }
    ~Qmp() { if (fd_ >= 0) close(fd_); }
    json cmd(const json& c) {
        std::string s = c.dump() + "\n";
        if (write(fd_, s.data(), s.size()) != static_cast<ssize_t>(s.size())) return json();
        for (;;) {   // skip asynchronous events
            json m = read_msg();
            if (m.is_null() || m.contains("return") || m.contains("error")) return m;
        }
    }

private:
    json read_msg() {
        for (;;) {
            if (auto nl = buf_.find('\n'); nl != std::string::npos) {
                std::string line = buf_.substr(0, nl);
                buf_.erase(0, nl + 1);
                return json::parse(line, nullptr, false);
            }
            char b[4096];
            ssize_t n = read(fd_, b, sizeof b);
            if (n <= 0) return json();
            buf_.append(b, static_cast<std::size_t>(n));
        }
    }
    int fd_ = -1;
    std::string buf_;
};

TEST(KvmBalloon, OurDriverOnQemuBalloon) {
    KGUEST_OPEN_KVM(kvm);
    const std::string qmp_path = "/tmp/kguest-test-qmp.sock";
    unlink(qmp_path.c_str());
    Background vm({"qemu-system-x86_64", "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "512", "-nodefaults",
                   "-no-user-config", "-display", "none", "-serial", "stdio", "-device",
                   "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", kGuestElf, "-append",
                   "test=balloon balloon_ms=300000 cycles=2", "-device", "virtio-balloon-pci,disable-legacy=on",
                   "-qmp", "unix:" + qmp_path + ",server=on,wait=off"});
    ASSERT_TRUE(vm.wait_for_output("balloon: touched", 300)) << vm.out() << vm.err();
    Qmp qmp;
    ASSERT_TRUE(qmp.connect_to(qmp_path)) << vm.err();
    auto follow = [&](std::uint64_t bytes) {
        qmp.cmd({{"execute", "balloon"}, {"arguments", {{"value", bytes}}}});
        for (int i = 0; i < 600; ++i) {
            json q = qmp.cmd({{"execute", "query-balloon"}});
            if (q["return"]["actual"].get<std::uint64_t>() == bytes) return true;
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
        return false;
    };
    for (int cycle = 0; cycle < 2; ++cycle) {
        EXPECT_TRUE(follow(128 * kMiB)) << "QEMU's actual never reached 128 MiB\n" << vm.out();
        EXPECT_TRUE(follow(512 * kMiB)) << vm.out();
    }
    auto r = vm.wait(120);
    ASSERT_EQ(r.status, 1) << r.out << r.err;   // isa-debug-exit: (0 << 1) | 1
    auto res = results(r.out, "balloon");
    ASSERT_EQ(res.size(), 1u) << r.out;
    EXPECT_EQ(res[0]["ok"], "1");
    EXPECT_EQ(res[0]["mismatches"], "0");
}

// Raw bytes to the API socket; the reply's status line (or "" on none).
std::string raw_request(const std::string& sock, const std::string& bytes) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s", sock.c_str());
    std::string reply;
    if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0 && write(fd, bytes.data(), bytes.size()) > 0) {
        timeval tv{10, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char b[512];
        ssize_t n = read(fd, b, sizeof b);
        if (n > 0) reply.assign(b, static_cast<std::size_t>(n));
    }
    close(fd);
    return reply.substr(0, reply.find("\r\n"));
}

TEST(KvmApi, CurlExamplesAndHostileClients) {
    KGUEST_OPEN_KVM(kvm);
    const std::string sock = "/tmp/kguest-test-api.sock";
    // The guest measures its timer ticks while clients misbehave.
    Background vm(kguest_run("test=timer,idle timer_ms=3000 idle_ms=60000", 1, {"--balloon", "--api-socket", sock}));
    ASSERT_TRUE(wait_socket(sock, 60)) << vm.err();
    // Slow clients: half a request each, never finished.
    std::vector<int> slow;
    for (int i = 0; i < 8; ++i) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_un sa{};
        sa.sun_family = AF_UNIX;
        std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s", sock.c_str());
        if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0) {
            std::string half = "PUT /api/v1/vm.resize HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"desired";
            (void)!write(fd, half.data(), half.size());
        }
        slow.push_back(fd);
    }
    auto curl = [&](std::vector<std::string> args) {
        std::vector<std::string> a = {"curl", "-s", "-w", "\n%{http_code}", "--unix-socket", sock};
        a.insert(a.end(), args.begin(), args.end());
        auto r = run_process(a, 30);
        auto nl = r.out.rfind('\n');
        return std::make_pair(nl == std::string::npos ? r.out : r.out.substr(nl + 1), r.out.substr(0, nl == std::string::npos ? 0 : nl));
    };
    // The README's examples, as shown there.
    EXPECT_EQ(curl({"http://localhost/api/v1/vmm.ping"}).first, "200");
    auto i = curl({"http://localhost/api/v1/vm.info"});
    EXPECT_EQ(i.first, "200");
    EXPECT_NE(i.second.find("\"hugepage_backed_bytes\""), std::string::npos) << i.second;
    EXPECT_EQ(curl({"http://localhost/api/v1/vm.counters"}).first, "200");
    EXPECT_EQ(curl({"-X", "PUT", "-d", "{\"desired_ram\": 134217728}", "http://localhost/api/v1/vm.resize"}).first, "204");
    // Malformed requests get 4xx, and the VM runs on.
    EXPECT_EQ(curl({"-X", "PUT", "-d", "{\"desired_balloon\": -1}", "http://localhost/api/v1/vm.resize"}).first, "400");
    EXPECT_EQ(curl({"-X", "PUT", "-d", "{not json", "http://localhost/api/v1/vm.resize"}).first, "400");
    EXPECT_EQ(curl({"http://localhost/api/v1/nope"}).first, "404");
    EXPECT_EQ(curl({"http://localhost/api/v1/vm.pause"}).first, "405");
    EXPECT_EQ(raw_request(sock, "\x01\x02garbage\r\n\r\n").rfind("HTTP/1.1 400", 0), 0u);
    // The timer test ran meanwhile: every tick on time despite the clients.
    ASSERT_TRUE(vm.wait_for_output("RESULT timer_all", 120)) << vm.out() << vm.err();
    // The serial line may still be on its way: wait for its last field.
    for (int k = 0; k < 200 && results(vm.out(), "timer_all")[0].count("ok") == 0; ++k)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    auto t = results(vm.out(), "timer_all");
    ASSERT_EQ(t.size(), 1u);
    EXPECT_EQ(t[0]["ok"], "1") << vm.out();
    // Exits by reason: the guest's console output took COM1's port exits, and
    // KVM's own counters (KVM_GET_STATS_FD, Linux 5.14+) saw exits too.
    json c = json::parse(curl({"http://localhost/api/v1/vm.counters"}).second, nullptr, false);
    ASSERT_TRUE(c.is_object() && c["exits"].is_object()) << c.dump();
    std::uint64_t serial = 0;
    for (const json& x : c["exits"]["userspace"])
        if (x.value("reason", "") == "serial COM1") serial = x.value("count", 0ull);
    EXPECT_GT(serial, 0u) << c["exits"].dump();
    ASSERT_TRUE(c["exits"].contains("kvm")) << c["exits"].dump();
    EXPECT_GT(c["exits"]["kvm"].value("exits", 0ull), 0u) << c["exits"].dump();
    // Pause and resume a running guest, then shut it down through the API.
    EXPECT_EQ(curl({"-X", "PUT", "http://localhost/api/v1/vm.pause"}).first, "204");
    EXPECT_EQ(info(sock)["state"], "Paused");
    EXPECT_EQ(curl({"-X", "PUT", "http://localhost/api/v1/vm.resume"}).first, "204");
    EXPECT_EQ(info(sock)["state"], "Running");
    EXPECT_EQ(curl({"-X", "PUT", "http://localhost/api/v1/vm.shutdown"}).first, "204");
    auto r = vm.wait(60);
    for (int fd : slow) close(fd);
    EXPECT_EQ(r.status, 0) << r.out << r.err;
    EXPECT_NE(access(sock.c_str(), F_OK), 0) << "the socket outlived the VM";
}

} // namespace
} // namespace kguest
