// Cloud Hypervisor's lifecycle without KVM: a VmLifecycle in API mode whose
// VMs are fakes (FakeGuest), its owner thread running serve(), driven through
// api_dispatch() as the API thread would: the state machine, the 4xx answers
// that leave the VMM usable, the event monitor's lines, and vmm.shutdown.
#include "vmm/app/lifecycle.hpp"
#include "devices/base/error.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <fcntl.h>
#include <functional>
#include <future>
#include <string>
#include <sys/eventfd.h>
#include <unistd.h>

namespace kguest {
namespace {

using json = nlohmann::json;
constexpr std::uint64_t MiB = 1ull << 20;

struct FakeStats {
    std::atomic<int> built{0}, started{0}, finished{0}, live{0};
    std::atomic<int> fail_next{0};   // 1: UsageError, 2: runtime_error
    std::atomic<int> resets{0};      // the next N guests reset the machine as they start
};

class FakeControl : public VmControl {
public:
    FakeControl(const VmConfig& c, std::function<void()> on_power_button)
        : cfg_(c), on_power_button_(std::move(on_power_button)) {}
    VmInfo info() override {
        VmInfo i;
        i.name = cfg_.name;
        i.paused = paused_;
        i.cpus = cfg_.cpus;
        i.memory = cfg_.memory;
        return i;
    }
    VmCounters counters() override { return {}; }
    ControlError resize(std::uint64_t) override { return ControlError::no_balloon; }
    ControlError pause() override {
        if (paused_) return ControlError::already_paused;
        paused_ = true;
        return ControlError::none;
    }
    ControlError resume() override {
        if (!paused_) return ControlError::not_paused;
        paused_ = false;
        return ControlError::none;
    }
    ControlError shutdown() override { return ControlError::none; }
    ControlError power_button() override {
        on_power_button_();   // a guest that powers off on the button
        return ControlError::none;
    }

private:
    VmConfig cfg_;
    std::function<void()> on_power_button_;
    bool paused_ = false;
};

class FakeGuest : public GuestVm {
public:
    FakeGuest(const VmConfig& c, FakeStats& s)
        : control_(c, [this] { request_stop(0); }), stats_(s), stop_(::eventfd(0, EFD_CLOEXEC)) {
        ++stats_.built;
        ++stats_.live;
    }
    ~FakeGuest() override { --stats_.live; }
    VmControl& control() override { return control_; }
    void start() override {
        ++stats_.started;
        if (stats_.resets.load() > 0) {
            --stats_.resets;
            reset_ = true;
            request_stop(0);
        }
    }
    int stop_fd() override { return stop_.get(); }
    void request_stop(int status) override {
        status_ = status;
        const std::uint64_t one = 1;
        ASSERT_EQ(::write(stop_.get(), &one, sizeof one), 8);
    }
    std::string console_pty_path() override { return "/dev/pts/fake"; }
    bool reset_by_guest() override { return reset_; }
    int finish(bool) override {
        ++stats_.finished;
        return status_;
    }

private:
    FakeControl control_;
    FakeStats& stats_;
    Fd stop_;
    int status_ = 0;
    bool reset_ = false;
};

struct Reply {
    unsigned status;
    json body;
    ApiReply raw;
};

class Lifecycle : public ::testing::Test {
protected:
    void SetUp() override {
        ASSERT_EQ(::pipe2(events_pipe_, O_CLOEXEC | O_NONBLOCK), 0);
        events_ = std::make_unique<EventMonitor>("fd=" + std::to_string(events_pipe_[1]));
        life_ = std::make_unique<VmLifecycle>(
            VmLifecycle::Mode::api,
            [this](const VmConfig& c) -> std::unique_ptr<GuestVm> {
                if (int f = stats_.fail_next.exchange(0)) {
                    if (f == 1) throw UsageError("--disk /nonexistent: No such file or directory");
                    throw std::runtime_error("open /dev/kvm: No such file or directory");
                }
                return std::make_unique<FakeGuest>(c, stats_);
            },
            events_.get());
        owner_ = std::async(std::launch::async, [this] { return life_->serve(-1); });
    }
    void TearDown() override {
        if (owner_.valid()) {
            life_->shutdown_vmm();
            owner_.get();
        }
        life_.reset();
        ::close(events_pipe_[0]);
    }

    Reply call(std::string_view method, std::string_view route, std::string_view body = "") {
        ApiReply r = api_dispatch(*life_, method, "/api/v1/" + std::string(route), body);
        return {r.status, r.body, r};
    }
    std::string state() {
        Reply r = call("GET", "vm.info");
        return r.status == 200 ? r.body["state"].get<std::string>() : "(" + std::to_string(r.status) + ")";
    }
    // The event lines written so far, as "source:event".
    std::vector<std::string> events() {
        std::string all;
        char buf[4096];
        ssize_t n;
        while ((n = ::read(events_pipe_[0], buf, sizeof buf)) > 0) all.append(buf, static_cast<std::size_t>(n));
        std::vector<std::string> out;
        std::size_t pos = 0;
        while (pos < all.size()) {
            const std::size_t nl = all.find('\n', pos);
            const json j = json::parse(all.substr(pos, nl - pos));
            EXPECT_TRUE(j["timestamp"]["secs"].is_number_unsigned());
            EXPECT_TRUE(j["timestamp"]["nanos"].is_number_unsigned());
            EXPECT_TRUE(j["properties"].is_null());
            out.push_back(j["source"].get<std::string>() + ":" + j["event"].get<std::string>());
            pos = nl + 1;
        }
        return out;
    }

    static constexpr const char* kCreate =
        R"({"payload":{"kernel":"/k","cmdline":"x"},"cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":268435456}})";

    FakeStats stats_;
    int events_pipe_[2] = {-1, -1};
    std::unique_ptr<EventMonitor> events_;
    std::unique_ptr<VmLifecycle> life_;
    std::future<int> owner_;
};

TEST_F(Lifecycle, RefusalsLeaveTheVmmUsable) {
    EXPECT_EQ(call("GET", "vmm.ping").status, 200u);
    EXPECT_EQ(state(), "(409)");   // no VM yet
    Reply r = call("PUT", "vm.boot");
    EXPECT_EQ(r.status, 409u);
    EXPECT_NE(r.body["error"].get<std::string>().find("not created"), std::string::npos) << r.body;
    EXPECT_EQ(call("PUT", "vm.shutdown").status, 409u);
    EXPECT_EQ(call("PUT", "vm.add-disk", R"({"path":"/d"})").status, 409u);
    EXPECT_EQ(call("PUT", "vm.create", "{not json").status, 400u);
    r = call("PUT", "vm.create", R"({"payload":{"kernel":"/k"},"serial":{"mode":"Telepathy"}})");
    EXPECT_EQ(r.status, 400u);
    EXPECT_NE(r.body["error"].get<std::string>().find("serial.mode"), std::string::npos) << r.body;
    r = call("PUT", "vm.create", R"({"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1,"max_vcpus":2}})");
    EXPECT_EQ(r.status, 400u);
    EXPECT_NE(r.body["error"].get<std::string>().find("cpus.max_vcpus"), std::string::npos) << r.body;
    r = call("PUT", "vm.create", R"({"cpus":{"boot_vcpus":1}})");
    EXPECT_EQ(r.status, 400u);
    EXPECT_NE(r.body["error"].get<std::string>().find("payload.kernel"), std::string::npos) << r.body;
    EXPECT_EQ(state(), "(409)");

    EXPECT_EQ(call("PUT", "vm.create", kCreate).status, 204u);
    r = call("PUT", "vm.create", kCreate);
    EXPECT_EQ(r.status, 409u);
    EXPECT_NE(r.body["error"].get<std::string>().find("already"), std::string::npos) << r.body;
    EXPECT_EQ(state(), "Created");
    EXPECT_EQ(call("PUT", "vm.resize", R"({"desired_ram":536870912})").status, 409u);   // not booted
    EXPECT_EQ(call("PUT", "vm.pause").status, 409u);
    EXPECT_EQ(call("PUT", "vm.add-net", R"({"num_queues":2})").status, 400u);   // no tap, no fds

    // A boot that fails leaves the VM created, bootable once fixed.
    stats_.fail_next = 1;
    r = call("PUT", "vm.boot");
    EXPECT_EQ(r.status, 400u);
    EXPECT_NE(r.body["error"].get<std::string>().find("/nonexistent"), std::string::npos) << r.body;
    stats_.fail_next = 2;
    EXPECT_EQ(call("PUT", "vm.boot").status, 500u);
    EXPECT_EQ(state(), "Created");
    EXPECT_EQ(call("PUT", "vm.boot").status, 204u);
    EXPECT_EQ(state(), "Running");
    EXPECT_EQ(call("PUT", "vm.boot").status, 409u);
    EXPECT_EQ(call("PUT", "vm.add-disk", R"({"path":"/d"})").status, 409u);   // no hot-plug
    EXPECT_EQ(call("GET", "vmm.ping").status, 200u);
}

TEST_F(Lifecycle, StatesAndEvents) {
    ASSERT_EQ(call("PUT", "vm.create", kCreate).status, 204u);
    EXPECT_EQ(call("PUT", "vm.add-disk", R"({"path":"/img","readonly":true})").status, 204u);
    EXPECT_EQ(call("PUT", "vm.add-disk", R"({"path":"/img2","id":"data"})").status, 204u);
    Reply dup = call("PUT", "vm.add-disk", R"({"path":"/img3","id":"data"})");   // CH: 409, same identifier
    EXPECT_EQ(dup.status, 409u);
    EXPECT_NE(dup.body["error"].get<std::string>().find("'data'"), std::string::npos) << dup.body;
    Reply info = call("GET", "vm.info");
    ASSERT_EQ(info.status, 200u);
    EXPECT_EQ(info.body["state"], "Created");
    EXPECT_EQ(info.body["config"]["cpus"]["boot_vcpus"], 2);
    EXPECT_EQ(info.body["config"]["disks"][0]["path"], "/img");
    EXPECT_EQ(info.body["config"]["disks"][0]["id"], "_disk0");   // named as Cloud Hypervisor names it
    EXPECT_EQ(info.body["config"]["disks"][1]["id"], "data");
    EXPECT_EQ(info.body["config"]["disks"].size(), 2u);
    EXPECT_EQ(info.body["config"]["payload"]["cmdline"], "x");
    EXPECT_EQ(info.body["memory_actual_size"], 256 * MiB);

    ASSERT_EQ(call("PUT", "vm.boot").status, 204u);
    EXPECT_EQ(stats_.started.load(), 1);
    EXPECT_EQ(state(), "Running");
    EXPECT_EQ(call("PUT", "vm.pause").status, 204u);
    EXPECT_EQ(state(), "Paused");
    EXPECT_EQ(call("PUT", "vm.resume").status, 204u);
    // desired_vcpus: only the current count; nulls are ignored.
    EXPECT_EQ(call("PUT", "vm.resize", R"({"desired_vcpus":2,"desired_ram":null,"desired_balloon":null})").status,
              204u);
    EXPECT_EQ(call("PUT", "vm.resize", R"({"desired_vcpus":3})").status, 400u);

    ASSERT_EQ(call("PUT", "vm.reboot").status, 204u);
    EXPECT_EQ(stats_.built.load(), 2);
    EXPECT_EQ(stats_.live.load(), 1);
    EXPECT_EQ(state(), "Running");

    ASSERT_EQ(call("PUT", "vm.shutdown").status, 204u);
    EXPECT_EQ(state(), "Shutdown");
    EXPECT_EQ(stats_.live.load(), 0);
    EXPECT_EQ(call("PUT", "vm.reboot").status, 409u);
    // A new boot from the same config.
    ASSERT_EQ(call("PUT", "vm.boot").status, 204u);
    EXPECT_EQ(state(), "Running");
    // The guest powers off by itself: Shutdown, the VMM stays.
    ASSERT_EQ(call("PUT", "vm.power-button").status, 204u);
    for (int i = 0; i < 500 && state() != "Shutdown"; ++i) ::usleep(2000);
    EXPECT_EQ(state(), "Shutdown");
    ASSERT_EQ(call("PUT", "vm.delete").status, 204u);
    EXPECT_EQ(state(), "(409)");
    EXPECT_EQ(call("PUT", "vm.delete").status, 409u);

    Reply bye = call("PUT", "vmm.shutdown");
    ASSERT_EQ(bye.status, 204u);
    ASSERT_TRUE(bye.raw.after_write);
    bye.raw.after_write();
    EXPECT_EQ(owner_.get(), 0);
    EXPECT_EQ(stats_.built.load(), stats_.finished.load());

    const std::vector<std::string> want = {
        "vm:booting",   "vm:booted",  "vm:pausing",  "vm:paused",   "vm:resuming", "vm:resumed",
        "vm:rebooting", "vm:booting", "vm:booted",   "vm:rebooted", "vm:shutdown", "vm:booting",
        "vm:booted",    "vm:shutdown", "vm:deleted", "vmm:shutdown"};
    EXPECT_EQ(events(), want);
}

// A guest that resets the machine (its reboot) is built and booted again
// from the same config, as vm.reboot does; one that then runs stays Running.
TEST_F(Lifecycle, GuestResetBootsTheVmAgain) {
    ASSERT_EQ(call("PUT", "vm.create", kCreate).status, 204u);
    stats_.resets = 2;
    ASSERT_EQ(call("PUT", "vm.boot").status, 204u);
    for (int i = 0; i < 500 && (stats_.built.load() < 3 || state() != "Running"); ++i) ::usleep(2000);
    EXPECT_EQ(stats_.built.load(), 3);
    EXPECT_EQ(stats_.live.load(), 1);
    EXPECT_EQ(stats_.finished.load(), 2);
    EXPECT_EQ(state(), "Running");
    ASSERT_EQ(call("PUT", "vm.shutdown").status, 204u);
    const std::vector<std::string> want = {"vm:booting", "vm:booted",    "vm:rebooting", "vm:booting",
                                           "vm:booted",  "vm:rebooted",  "vm:rebooting", "vm:booting",
                                           "vm:booted",  "vm:rebooted",  "vm:shutdown"};
    EXPECT_EQ(events(), want);
}

TEST_F(Lifecycle, VmmShutdownStopsARunningVm) {
    ASSERT_EQ(call("PUT", "vm.create", kCreate).status, 204u);
    ASSERT_EQ(call("PUT", "vm.boot").status, 204u);
    Reply bye = call("PUT", "vmm.shutdown");
    ASSERT_EQ(bye.status, 204u);
    bye.raw.after_write();
    EXPECT_EQ(owner_.get(), 0);
    EXPECT_EQ(stats_.live.load(), 0);
    EXPECT_EQ(stats_.finished.load(), 1);
}

TEST(LifecycleFixed, RefusesTheLifecycleSteps) {
    FakeStats stats;
    VmLifecycle life(VmLifecycle::Mode::fixed,
                     [&](const VmConfig& c) -> std::unique_ptr<GuestVm> { return std::make_unique<FakeGuest>(c, stats); });
    VmConfig cfg;
    cfg.cpus = 3;
    life.create_fixed(cfg);
    life.build();
    life.start();
    for (const char* route : {"vm.create", "vm.boot", "vm.delete", "vm.reboot", "vmm.shutdown"}) {
        ApiReply r = api_dispatch(life, "PUT", std::string("/api/v1/") + route, R"({"payload":{"kernel":"/k"}})");
        EXPECT_EQ(r.status, 409u) << route;
        EXPECT_NE(r.body["error"].get<std::string>().find("kguest run"), std::string::npos) << route;
    }
    ApiReply info = api_dispatch(life, "GET", "/api/v1/vm.info", "");
    EXPECT_EQ(info.body["state"], "Running");
    EXPECT_EQ(info.body["cpus"], 3);
    // vm.shutdown (kguest stop) ends the VM, and serve() returns its status.
    EXPECT_EQ(api_dispatch(life, "PUT", "/api/v1/vm.shutdown", "").status, 204u);
    EXPECT_EQ(life.serve(-1), 0);
    EXPECT_EQ(stats.finished.load(), 1);
}

TEST(EventMonitorFormat, IsCloudHypervisorsLine) {
    EXPECT_EQ(EventMonitor::format(std::chrono::nanoseconds(29228206), "vm", "booted"),
              "{\"timestamp\":{\"secs\":0,\"nanos\":29228206},\"source\":\"vm\",\"event\":\"booted\",\"properties\":null}\n");
    EXPECT_EQ(EventMonitor::format(std::chrono::seconds(3) + std::chrono::nanoseconds(5), "vmm", "shutdown"),
              "{\"timestamp\":{\"secs\":3,\"nanos\":5},\"source\":\"vmm\",\"event\":\"shutdown\",\"properties\":null}\n");
}

TEST(PathOrFd, Parses) {
    EXPECT_EQ(parse_path_or_fd("--api-socket", "/run/x.sock").path, "/run/x.sock");
    EXPECT_EQ(parse_path_or_fd("--api-socket", "path=/run/x.sock").path, "/run/x.sock");
    int p[2];
    ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
    EXPECT_EQ(parse_path_or_fd("--api-socket", "fd=" + std::to_string(p[0])).fd, p[0]);
    ::close(p[0]);
    ::close(p[1]);
    EXPECT_THROW(parse_path_or_fd("--api-socket", "fd=" + std::to_string(p[0])), UsageError);   // closed now
    EXPECT_THROW(parse_path_or_fd("--api-socket", "fd=1"), UsageError);
    EXPECT_THROW(parse_path_or_fd("--api-socket", "fd=x"), UsageError);
    EXPECT_THROW(parse_path_or_fd("--event-monitor", "path="), UsageError);
}

} // namespace
} // namespace kguest
