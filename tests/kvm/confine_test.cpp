// The VMM confined while a guest runs (vmm/app/confine.hpp): started as root
// with --user, every thread runs as that user with no capabilities, under
// its seccomp list (named after its kind), with no_new_privs and a small
// RLIMIT_NOFILE; the control API's info, stats, pause/resume and stop all
// work under the lists, and the VM ends with its exit report. The threads
// are named for what they do: vcpu0, vcpu1, ... (what libvirt and Kata look
// for), api, console, and each device loop (net0, disk0, balloon, mem, rng).
#include "tests/support/kvm_env.hpp"
#include "tests/support/process.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <unistd.h>

namespace kguest {
namespace {
using namespace kguest::test;

// "Key:" → the rest of the line, from /proc/PID/task/TID/status.
std::map<std::string, std::string> status_fields(const std::string& path) {
    std::map<std::string, std::string> m;
    std::istringstream in(slurp(path));
    std::string line;
    while (std::getline(in, line))
        if (auto colon = line.find(':'); colon != std::string::npos) {
            auto v = line.substr(colon + 1);
            v.erase(0, v.find_first_not_of(" \t"));
            v.erase(v.find_last_not_of(" \t") + 1);
            m[line.substr(0, colon)] = v;
        }
    return m;
}

std::vector<std::map<std::string, std::string>> tasks_of(pid_t pid) {
    std::vector<std::map<std::string, std::string>> out;
    std::error_code ec;
    for (const auto& t : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task", ec))
        out.push_back(status_fields(t.path().string() + "/status"));
    return out;
}

TEST(KvmConfine, UserSwitchLeavesEveryThreadUnprivilegedAndFiltered) {
    KGUEST_OPEN_KVM(kvm);
    ASSERT_EQ(::geteuid(), 0u) << "this test starts kguest as root with --user (scripts/sandbox runs tests as root)";
    const std::string sock = "/tmp/kguest-confine-test.sock";
    ::unlink(sock.c_str());
    Background vm(kguest_run("test=idle idle_ms=120000", 2, {"--user", "65534:65534", "--api-socket", sock}));

    // main, two vCPUs and the API thread, each under its filter (Seccomp: 2).
    std::vector<std::map<std::string, std::string>> tasks;
    auto all_filtered = [&] {
        tasks = tasks_of(vm.pid());
        if (tasks.size() != 4) return false;
        for (auto& t : tasks)
            if (t["Seccomp"] != "2") return false;
        return true;
    };
    for (int i = 0; i < 600 && vm.running() && !all_filtered(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    ASSERT_TRUE(all_filtered()) << threads_of(vm.pid()) << vm.err();
    std::multiset<std::string> names;
    for (auto& t : tasks) {
        names.insert(t["Name"]);
        EXPECT_EQ(t["Uid"], "65534\t65534\t65534\t65534") << t["Name"];
        EXPECT_EQ(t["Gid"], "65534\t65534\t65534\t65534") << t["Name"];
        EXPECT_EQ(t["Groups"], "65534") << t["Name"];
        for (const char* cap : {"CapInh", "CapPrm", "CapEff", "CapAmb"})
            EXPECT_EQ(t[cap], "0000000000000000") << t["Name"] << " " << cap;
        EXPECT_EQ(t["NoNewPrivs"], "1") << t["Name"];
    }
    EXPECT_EQ(names, (std::multiset<std::string>{"kguest", "api", "vcpu0", "vcpu1"}));
    const std::string limits = slurp("/proc/" + std::to_string(vm.pid()) + "/limits");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(limits, m, std::regex(R"(Max open files\s+(\d+)\s+(\d+))"))) << limits;
    EXPECT_LE(std::stoul(m[1]), 200u) << limits;
    EXPECT_EQ(m[1], m[2]) << limits;

    // The control API under the lists: info (/proc reads, mincore), stats
    // (KVM's stats fds), pause and resume (vCPU kicks), stop.
    for (const std::vector<std::string>& cmd :
         {std::vector<std::string>{"info", "--json"}, {"stats"}, {"pause"}, {"resume"}, {"stop"}}) {
        std::vector<std::string> argv = {kKguest, cmd[0], "--api-socket", sock};
        argv.insert(argv.end(), cmd.begin() + 1, cmd.end());
        auto r = run_process(argv, 30);
        EXPECT_EQ(r.status, 0) << cmd[0] << ": " << r.out << r.err << vm.err();
    }
    ProcResult r = vm.wait(60);
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_NE(r.err.find("stopped with status 0"), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find("seccomp"), std::string::npos) << r.err;
    ::unlink(sock.c_str());   // root's /tmp file, which the VMM as nobody cannot remove
}

TEST(KvmConfine, ThreadsAreNamedForWhatTheyDo) {
    KGUEST_OPEN_KVM(kvm);
    const std::string sock = "/tmp/kguest-names-test.sock", console = "/tmp/kguest-names-console.sock";
    const std::string img = "/tmp/kguest-names-test.img";
    ASSERT_EQ(run_process({"truncate", "-s", "1M", img}, 30).status, 0);
    Background vm(kguest_run("test=idle idle_ms=120000", 2,
                             {"--api-socket", sock, "--console", "socket=" + console, "--rng", "--balloon",
                              "--disk", "path=" + img, "--memory", "256M", "--memory-max", "512M"}));
    // The kernel's io_uring workers (iou-wrk-N, iou-sqp-N) are threads of the
    // process too, started and named by the kernel: not ours to name.
    auto names = [&] {
        std::multiset<std::string> out;
        std::error_code ec;
        for (const auto& t : std::filesystem::directory_iterator("/proc/" + std::to_string(vm.pid()) + "/task", ec)) {
            std::string comm = slurp(t.path().string() + "/comm");
            while (!comm.empty() && comm.back() == '\n') comm.pop_back();
            if (comm.rfind("iou-", 0) != 0) out.insert(comm);
        }
        return out;
    };
    const std::multiset<std::string> want{"kguest", "vcpu0", "vcpu1", "api", "console", "disk0", "balloon", "mem", "rng"};
    std::multiset<std::string> got;
    for (int i = 0; i < 600 && vm.running() && (got = names()) != want; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_EQ(got, want) << threads_of(vm.pid()) << vm.err();
    EXPECT_EQ(run_process({kKguest, "stop", "--api-socket", sock}, 30).status, 0);
    ProcResult r = vm.wait(60);
    EXPECT_EQ(r.status, 0) << r.err;
    ::unlink(img.c_str());
}

} // namespace
} // namespace kguest
