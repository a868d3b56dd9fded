// Conformance with the two engines that drive Cloud Hypervisor: a bare
// `kguest --api-socket ...` driven by the request sequences libvirt's ch
// driver and Kata's clh driver send, replayed byte for byte, with a real
// guest behind them; each answer, the states, the event lines and the vCPU
// threads' names are checked.
//
// The request bytes are transcribed from the drivers' sources (read through
// the reference search, not captured from a live run):
// - libvirt, src/ch/ch_monitor.c and ch_process.c (libvirt/libvirt at
//   92441ba35ac9): the VMM is started as `--api-socket fd=N`
//   (chMonitorCreateSocket: bound, listen(fd, 1), passed to the child) and
//   `--event-monitor path=FIFO`; vm.create and vm.info go through libcurl
//   with "Accept: application/json" and "Content-Type: application/json"
//   (virCHMonitorCreateVM, virCHMonitorGet); the body-less PUTs (vm.boot,
//   vm.shutdown, ...) through virCHMonitorPut: CURLOPT_UPLOAD with
//   CURLOPT_INFILESIZE 0, so libcurl sends "Content-Length: 0" (libcurl
//   without a size sends a chunked body behind "Expect: 100-continue"
//   instead; one call checks that form too); vm.create's JSON is
//   virCHMonitorBuildVMJson's (serial Pty for a <serial type='pty'>, cpus,
//   memory, payload, in that order, and no "net"); then one vm.add-net per
//   NIC, written by hand (chProcessAddNetworkDevice): a fresh connection,
//   the request line, "Host: localhost", "Content-Type: application/json",
//   "Content-Length: N", the body virCHMonitorBuildNetJson makes ("id" from
//   the NIC's alias, "mac", "num_queues" twice the queue pairs), and one TAP
//   fd per queue pair as SCM_RIGHTS, all in one sendmsg; the answer is read
//   by chSocketProcessHttpResponse: one recv of at most 1024 bytes after at
//   most 500 ms, whose status line must say 200 or 204.
// - Kata, src/runtime/virtcontainers/clh.go: `--api-socket PATH`, vmm.ping
//   polled until it answers, then vm.create with the VmConfig its OpenAPI
//   client (Go net/http: Host, User-Agent, Content-Length, Accept,
//   Content-Type, Accept-Encoding: gzip) marshals from the generated
//   constructors' defaults (NewVmConfig, NewMemoryConfig, NewCpusConfig,
//   NewRngConfig, NewConsoleConfig, NewPlatformConfig with 2 PCI segments),
//   vm.info, vm.add-net with the TAP fds (vmAddNetPut), vm.boot, vm.info,
//   vm.resize with desired_ram, vmm.shutdown. Two settings differ from
//   Kata's defaults, as kguest needs them: max_vcpus equal to boot_vcpus
//   (Kata: default_maxvcpus = default_vcpus) and no shared file system (Kata:
//   shared_fs = "none", which also makes memory.shared false).
// One Linux boot (Kata's) and one small-guest boot (libvirt's). (The bare
// VMM's first ping answer is timed by the unit test BareVmm.*: it needs no
// KVM, and the emulated sandbox would time its own emulation.)
#include "tests/support/kvm_env.hpp"
#include "tests/support/process.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <poll.h>
#include <string>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <thread>
#include <vector>

namespace kguest {
namespace {
using namespace kguest::test;
using nlohmann::json;
using Clock = std::chrono::steady_clock;
constexpr std::uint64_t kMiB = 1ull << 20;

// ---- a raw HTTP/1.1 client on a UNIX socket, as the drivers are ----

int connect_unix(const std::string& path) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
    if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return fd;
    if (fd >= 0) ::close(fd);
    return -1;
}

void send_with_fds(int sock, const std::string& bytes, const std::vector<int>& fds) {
    iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
    if (!fds.empty()) {
        msg.msg_control = control.data();
        msg.msg_controllen = control.size();
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
        std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    ASSERT_EQ(::sendmsg(sock, &msg, MSG_NOSIGNAL), static_cast<ssize_t>(bytes.size())) << std::strerror(errno);
}

// Reads one response (headers, then Content-Length bytes); "" on timeout.
std::string read_response(int sock, int timeout_ms = 120000) {
    std::string out;
    const auto end = Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (Clock::now() < end) {
        const auto h = out.find("\r\n\r\n");
        if (h != std::string::npos) {
            std::size_t len = 0;
            const auto cl = out.find("Content-Length: ");
            if (cl != std::string::npos && cl < h) len = std::stoul(out.substr(cl + 16));
            if (out.rfind("HTTP/1.1 100 ", 0) == 0) return out.substr(0, h + 4);
            if (out.size() >= h + 4 + len) return out.substr(0, h + 4 + len);
        }
        pollfd p{sock, POLLIN, 0};
        if (::poll(&p, 1, 100) <= 0) continue;
        char buf[8192];
        const ssize_t n = ::recv(sock, buf, sizeof buf, 0);
        if (n <= 0) break;
        out.append(buf, static_cast<std::size_t>(n));
    }
    return out;
}

struct Response {
    unsigned status = 0;
    json body;   // null when none
    std::string raw;
};
Response parse(const std::string& raw) {
    Response r;
    r.raw = raw;
    if (raw.size() >= 12 && raw.rfind("HTTP/1.", 0) == 0) r.status = static_cast<unsigned>(std::stoul(raw.substr(9, 3)));
    const auto h = raw.find("\r\n\r\n");
    if (h != std::string::npos && h + 4 < raw.size()) r.body = json::parse(raw.substr(h + 4), nullptr, false);
    return r;
}

// One request on a fresh connection, as both drivers make them.
Response http_exchange(const std::string& sock_path, const std::string& bytes, const std::vector<int>& fds = {}) {
    const int s = connect_unix(sock_path);
    if (s < 0) return {};
    send_with_fds(s, bytes, fds);
    Response r = parse(read_response(s));
    ::close(s);
    return r;
}

// libvirt's virCHMonitorPut without a payload: libcurl's upload of size 0.
Response curl_put_no_content(const std::string& sock_path, const std::string& endpoint) {
    return http_exchange(sock_path, "PUT /api/v1/" + endpoint + " HTTP/1.1\r\nHost: localhost\r\n"
                                    "Accept: application/json\r\nContent-Length: 0\r\n\r\n");
}

// libcurl's upload of unknown size: a chunked empty body behind Expect.
Response curl_put_chunked(const std::string& sock_path, const std::string& endpoint) {
    const int s = connect_unix(sock_path);
    if (s < 0) return {};
    send_with_fds(s, "PUT /api/v1/" + endpoint + " HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
                     "Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n", {});
    std::string first = read_response(s, 1000);   // libcurl waits a second for the 100
    send_with_fds(s, "0\r\n\r\n", {});
    Response r = parse(first.rfind("HTTP/1.1 100 ", 0) == 0 ? read_response(s) : first);
    ::close(s);
    return r;
}

// chProcessAddNetworkDevice and chSocketProcessHttpResponse: the request
// and the fds in one sendmsg on a fresh connection, then one recv of at most
// 1024 bytes within 500 ms; the status from "HTTP/1.x NNN" (0: none).
int libvirt_add_net(const std::string& sock_path, const std::string& body, const std::vector<int>& fds) {
    const int s = connect_unix(sock_path);
    if (s < 0) return 0;
    send_with_fds(s, "PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body, fds);
    int status = 0;
    pollfd p{s, POLLIN, 0};
    char buf[1024] = {};
    if (::poll(&p, 1, 500) == 1 && ::recv(s, buf, sizeof buf - 1, 0) > 0) std::sscanf(buf, "HTTP/1.%*d %d", &status);
    ::close(s);
    return status;
}

std::string libcurl_json(const std::string& method, const std::string& endpoint, const std::string& body) {
    std::string req = method + " /api/v1/" + endpoint + " HTTP/1.1\r\nHost: localhost\r\n"
                      "Accept: application/json\r\nContent-Type: application/json\r\n";
    if (method != "GET") req += "Content-Length: " + std::to_string(body.size()) + "\r\n";
    return req + "\r\n" + body;
}

std::string go_openapi(const std::string& method, const std::string& endpoint, const std::string& body) {
    std::string req = method + " /api/v1/" + endpoint + " HTTP/1.1\r\nHost: localhost\r\n"
                      "User-Agent: OpenAPI-Generator/1.0.0/go\r\n";
    if (method != "GET") req += "Content-Length: " + std::to_string(body.size()) + "\r\n";
    req += "Accept: application/json\r\n";
    if (method != "GET") req += "Content-Type: application/json\r\n";
    return req + "Accept-Encoding: gzip\r\n\r\n" + body;
}

// A TAP queue opened the way libvirt and Kata open theirs (virNetDevTapCreate:
// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR); the interface lives while the fd does.
int open_tap(const char* name) {
    int fd = ::open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) return -1;
    ifreq ifr{};
    std::snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if (::ioctl(fd, TUNSETIFF, &ifr) != 0) {
        ::close(fd);
        return -1;
    }
    return fd;
}

// The names of the process's threads (/proc/PID/task/*/comm).
std::vector<std::string> thread_names(pid_t pid) {
    std::vector<std::string> names;
    const std::string dir = "/proc/" + std::to_string(pid) + "/task";
    DIR* d = ::opendir(dir.c_str());
    if (d == nullptr) return names;
    while (dirent* e = ::readdir(d)) {
        if (e->d_name[0] == '.') continue;
        std::string comm = slurp(dir + "/" + e->d_name + "/comm");
        while (!comm.empty() && comm.back() == '\n') comm.pop_back();
        names.push_back(comm);
    }
    ::closedir(d);
    return names;
}
bool has_thread(pid_t pid, const std::string& name) {
    for (const auto& n : thread_names(pid))
        if (n == name) return true;
    return false;
}
std::string joined(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ",") + x;
    return s;
}

// The event monitor's lines as "source:event".
std::vector<std::string> event_names(const std::string& text) {
    std::vector<std::string> out;
    std::size_t pos = 0;
    while (pos < text.size()) {
        const auto nl = text.find('\n', pos);
        if (nl == std::string::npos) break;
        const json j = json::parse(text.substr(pos, nl - pos), nullptr, false);
        if (j.is_object() && j.contains("timestamp") && j["timestamp"].contains("secs") && j["timestamp"].contains("nanos"))
            out.push_back(j.value("source", "?") + ":" + j.value("event", "?"));
        else
            out.push_back("malformed:" + text.substr(pos, nl - pos));
        pos = nl + 1;
    }
    return out;
}

bool wait_until(const std::function<bool()>& f, int timeout_s) {
    const auto end = Clock::now() + std::chrono::seconds(timeout_s);
    while (Clock::now() < end) {
        if (f()) return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return f();
}

// ---- the tests ----

// libvirt: fd= socket, event FIFO, malformed configs first (400/409, the VMM
// stays usable), then create with a Pty serial, add-net with a TAP fd, boot
// (the small guest), info (the PTY path in config.serial.file, which libvirt
// reads back), shutdown, delete; the event lines and the vCPU thread names.
TEST(KvmChApi, LibvirtSequenceWithTheSmallGuest) {
    KGUEST_OPEN_KVM(kvm);
    const std::string sock = "/tmp/kguest-test-chapi-libvirt.sock";
    const std::string fifo = "/tmp/kguest-test-chapi-libvirt.fifo";
    ::unlink(sock.c_str());
    ::unlink(fifo.c_str());
    ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
    // chMonitorCreateSocket: bound and listening before the VMM starts, passed without CLOEXEC.
    int lsock = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sock.c_str());
    ASSERT_EQ(::bind(lsock, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    ASSERT_EQ(::listen(lsock, 1), 0);
    Background vmm({kKguest, "--api-socket", "fd=" + std::to_string(lsock), "--event-monitor", "path=" + fifo});
    ::close(lsock);
    // libvirt opens the FIFO for reading; the VMM's open for writing meets it.
    int ev = ::open(fifo.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(ev, 0);
    std::string events;
    auto read_events = [&] {
        char buf[4096];
        pollfd p{ev, POLLIN, 0};
        while (::poll(&p, 1, 0) > 0 && (p.revents & POLLIN)) {
            const ssize_t n = ::read(ev, buf, sizeof buf);
            if (n <= 0) break;
            events.append(buf, static_cast<std::size_t>(n));
        }
    };

    // Refusals that leave the VMM usable.
    Response r = curl_put_chunked(sock, "vm.boot");
    EXPECT_EQ(r.status, 409u) << r.raw;
    r = http_exchange(sock, libcurl_json("PUT", "vm.create", R"({"serial":{"mode":"Carrier"},"payload":{"kernel":"/k"}})"));
    EXPECT_EQ(r.status, 400u) << r.raw;
    EXPECT_NE(r.raw.find("serial.mode"), std::string::npos) << r.raw;
    r = http_exchange(sock, libcurl_json("PUT", "vm.create", R"({"cpus":{"boot_vcpus":1,"max_vcpus":2},"payload":{"kernel":"/k"}})"));
    EXPECT_EQ(r.status, 400u) << r.raw;
    EXPECT_NE(r.raw.find("cpus.max_vcpus"), std::string::npos) << r.raw;
    r = http_exchange(sock, libcurl_json("PUT", "vm.create", R"({"cpus":{"boot_vcpus":1,"max_vcpus":1},"memory":{"size":268435456}})"));
    EXPECT_EQ(r.status, 400u) << r.raw;
    EXPECT_NE(r.raw.find("payload.kernel"), std::string::npos) << r.raw;

    // virCHMonitorBuildVMJson for a 2-vCPU, 256 MiB domain with <serial type='pty'/>.
    const std::string create = R"({"serial":{"mode":"Pty"},"cpus":{"boot_vcpus":2,"max_vcpus":2},)"
                               R"("memory":{"size":268435456},"payload":{"kernel":")" + kGuestElf +
                               R"(","cmdline":"test=idle idle_ms=120000"}})";
    r = http_exchange(sock, libcurl_json("PUT", "vm.create", create));
    ASSERT_EQ(r.status, 204u) << r.raw;
    r = http_exchange(sock, libcurl_json("PUT", "vm.create", create));
    EXPECT_EQ(r.status, 409u) << r.raw;   // a second create
    const int tap = open_tap("kgch0");
    ASSERT_GE(tap, 0) << "cannot open a TAP (needs root and /dev/net/tun)";
    // <interface type='ethernet'> with its alias net0, default queues: one fd.
    const int add_net = libvirt_add_net(sock, R"({"id":"net0","mac":"52:54:00:e5:48:58","num_queues":2})", {tap});
    EXPECT_TRUE(add_net == 200 || add_net == 204) << "vm.add-net: " << add_net;
    ::close(tap);   // libvirt closes its copy (chCloseFDs); the VMM holds its own

    r = curl_put_no_content(sock, "vm.boot");
    ASSERT_EQ(r.status / 100, 2u) << r.raw << vmm.err();
    r = http_exchange(sock, libcurl_json("GET", "vm.info", ""));
    ASSERT_EQ(r.status, 200u) << r.raw;
    EXPECT_EQ(r.body["state"], "Running") << r.raw;
    EXPECT_EQ(r.body["config"]["net"][0]["mac"], "52:54:00:e5:48:58") << r.raw;
    EXPECT_EQ(r.body["config"]["net"][0]["id"], "net0") << r.raw;
    const std::string pty = r.body["config"]["serial"].value("file", "");
    ASSERT_FALSE(pty.empty()) << "no PTY path in config.serial.file: " << r.raw;
    // The guest's console comes out of that PTY.
    int con = ::open(pty.c_str(), O_RDONLY | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
    ASSERT_GE(con, 0) << pty << ": " << std::strerror(errno);
    std::string console;
    wait_until(
        [&] {
            char buf[4096];
            ssize_t n;
            while ((n = ::read(con, buf, sizeof buf)) > 0) console.append(buf, static_cast<std::size_t>(n));
            return console.find("kguest-guest:") != std::string::npos;
        },
        60);
    ::close(con);
    EXPECT_NE(console.find("kguest-guest:"), std::string::npos) << "console: " << console;
    EXPECT_TRUE(wait_until([&] { return has_thread(vmm.pid(), "vcpu0") && has_thread(vmm.pid(), "vcpu1"); }, 10))
        << joined(thread_names(vmm.pid()));

    r = curl_put_no_content(sock, "vm.shutdown");
    EXPECT_EQ(r.status / 100, 2u) << r.raw;
    r = http_exchange(sock, libcurl_json("GET", "vm.info", ""));
    EXPECT_EQ(r.body["state"], "Shutdown") << r.raw;
    EXPECT_FALSE(has_thread(vmm.pid(), "vcpu0")) << joined(thread_names(vmm.pid()));
    r = curl_put_no_content(sock, "vm.delete");
    EXPECT_EQ(r.status / 100, 2u) << r.raw;
    r = curl_put_no_content(sock, "vmm.shutdown");
    EXPECT_EQ(r.status / 100, 2u) << r.raw;
    const ProcResult end = vmm.wait(30);
    EXPECT_EQ(end.status, 0) << end.err;
    read_events();
    ::close(ev);
    const std::vector<std::string> want = {"vmm:starting", "vm:booting", "vm:booted", "vm:shutdown", "vm:deleted",
                                           "vmm:shutdown"};
    EXPECT_EQ(event_names(events), want) << events;
    ::unlink(fifo.c_str());
    ::unlink(sock.c_str());
}

// A guest's own reboot (the i8042 reset line) under a bare VMM: the VM is
// built and booted again, as Cloud Hypervisor does, with CH's events; the
// small guest's test=reset resets at once on every boot, so it loops until
// vm.shutdown, which still answers.
TEST(KvmChApi, GuestResetBootsTheVmAgain) {
    KGUEST_OPEN_KVM(kvm);
    const std::string sock = "/tmp/kguest-test-chapi-reset.sock";
    const std::string log = "/tmp/kguest-test-chapi-reset.events";
    ::unlink(sock.c_str());
    Background vmm({kKguest, "--api-socket", sock, "--event-monitor", "path=" + log});
    Response r;
    ASSERT_TRUE(wait_until([&] { return (r = http_exchange(sock, libcurl_json("GET", "vmm.ping", ""))).status == 200; }, 30))
        << vmm.err();
    const std::string create = R"({"cpus":{"boot_vcpus":1,"max_vcpus":1},"memory":{"size":134217728},)"
                               R"("serial":{"mode":"Null"},"payload":{"kernel":")" + kGuestElf +
                               R"(","cmdline":"test=reset"}})";
    ASSERT_EQ(http_exchange(sock, libcurl_json("PUT", "vm.create", create)).status, 204u);
    ASSERT_EQ(curl_put_no_content(sock, "vm.boot").status / 100, 2u) << vmm.err();
    auto reboots = [&] {
        std::size_t n = 0;
        for (const auto& e : event_names(slurp(log)))
            if (e == "vm:rebooted") ++n;
        return n;
    };
    EXPECT_TRUE(wait_until([&] { return reboots() >= 3; }, 120)) << slurp(log) << vmm.err();
    r = curl_put_no_content(sock, "vm.shutdown");
    EXPECT_EQ(r.status / 100, 2u) << r.raw;
    r = http_exchange(sock, libcurl_json("GET", "vm.info", ""));
    EXPECT_EQ(r.body["state"], "Shutdown") << r.raw;
    EXPECT_EQ(curl_put_no_content(sock, "vmm.shutdown").status / 100, 2u);
    const ProcResult end = vmm.wait(30);
    EXPECT_EQ(end.status, 0) << end.err;
    EXPECT_NE(end.err.find("guest reset the machine"), std::string::npos) << end.err;
    const std::vector<std::string> ev = event_names(slurp(log));
    ASSERT_GE(ev.size(), 7u) << slurp(log);
    const std::vector<std::string> head(ev.begin(), ev.begin() + 7);
    const std::vector<std::string> want = {"vmm:starting", "vm:booting", "vm:booted",  "vm:rebooting",
                                           "vm:booting",   "vm:booted",  "vm:rebooted"};
    EXPECT_EQ(head, want) << slurp(log);
    ::unlink(log.c_str());
}

// ---- Kata with Linux ----

using test::linux_initrd;
using test::linux_kernel;

TEST(KvmChApi, KataSequenceWithLinux) {
    KGUEST_OPEN_KVM(kvm);
    ASSERT_EQ(::access(linux_kernel().c_str(), R_OK), 0) << "no kernel at " << linux_kernel();
    ASSERT_FALSE(linux_initrd().empty()) << "scripts/linux-initramfs failed";
    const std::string sock = "/tmp/kguest-test-chapi-kata.sock";
    ::unlink(sock.c_str());
    Background vmm({kKguest, "--api-socket", sock});
    // clh.go waits for the socket, then polls vmm.ping (waitVMM, about 10 s).
    Response r;
    ASSERT_TRUE(wait_until([&] { return (r = http_exchange(sock, go_openapi("GET", "vmm.ping", ""))).status == 200; }, 10))
        << vmm.err();

    // The VmConfig clh.go CreateVM builds, as the Go client marshals it (field
    // order of the generated structs; null/unset optional fields omitted).
    // cmdline: the test initramfs's (Kata's own agent parameters mean nothing
    // here); memhp_default_state onlines what virtio-mem plugs.
    const std::string cmdline = "console=ttyS0 reboot=k panic=1 memhp_default_state=online_movable "
                                "kguest.test=balloon kguest.wait=600";
    const std::string create =
        R"({"payload":{"kernel":")" + linux_kernel() + R"(","cmdline":")" + cmdline + R"(","initramfs":")" +
        linux_initrd() +
        R"("},"cpus":{"boot_vcpus":2,"max_vcpus":2,"topology":{"threads_per_core":1,"cores_per_die":2,)"
        R"("dies_per_package":1,"packages":1},"kvm_hyperv":false},"memory":{"size":536870912,"mergeable":false,)"
        R"("hotplug_method":"Acpi","hotplug_size":536870912,"shared":false,"hugepages":false,"thp":true},)"
        R"("rng":{"src":"/dev/urandom","iommu":false},"serial":{"mode":"Tty","iommu":false},)"
        R"("console":{"mode":"Off","iommu":false},"iommu":false,"watchdog":false,"pvpanic":false,)"
        R"("platform":{"num_pci_segments":2,"iommu_segments":null}})";
    r = http_exchange(sock, go_openapi("PUT", "vm.create", create));
    ASSERT_EQ(r.status, 204u) << r.raw;
    r = http_exchange(sock, go_openapi("GET", "vm.info", ""));
    ASSERT_EQ(r.status, 200u) << r.raw;
    EXPECT_EQ(r.body["state"], "Created") << r.raw;
    EXPECT_EQ(r.body["config"]["memory"]["hotplug_size"], 512 * kMiB) << r.raw;

    // vmAddNetPut: mac, num_queues (2 per queue pair), the TAP fds on the request.
    const int tap = open_tap("kgch1");
    ASSERT_GE(tap, 0) << "cannot open a TAP (needs root and /dev/net/tun)";
    const std::string net = R"({"mac":"52:54:00:aa:00:01","num_queues":2,"num_fds":1})";
    r = http_exchange(sock, "PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
                       "Content-Type: application/json\r\nContent-Length: " + std::to_string(net.size()) + "\r\n\r\n" + net,
                 {tap});
    EXPECT_EQ(r.status / 100, 2u) << r.raw;
    ::close(tap);

    r = http_exchange(sock, go_openapi("PUT", "vm.boot", ""));
    ASSERT_EQ(r.status / 100, 2u) << r.raw << vmm.err();
    r = http_exchange(sock, go_openapi("GET", "vm.info", ""));
    EXPECT_EQ(r.body["state"], "Running") << r.raw;
    EXPECT_EQ(r.body["memory_actual_size"], 512 * kMiB) << r.raw;
    EXPECT_TRUE(wait_until([&] { return has_thread(vmm.pid(), "vcpu0") && has_thread(vmm.pid(), "vcpu1"); }, 10))
        << joined(thread_names(vmm.pid()));
    ASSERT_TRUE(vmm.wait_for_output("BALLOON t=1 ", 240)) << vmm.out() << vmm.err();
    EXPECT_NE(vmm.out().find("kguest-init: start"), std::string::npos);

    // Growing the guest: desired_ram is the total (virtio-mem plugs the difference).
    r = http_exchange(sock, go_openapi("PUT", "vm.resize", R"({"desired_ram":805306368})"));
    EXPECT_EQ(r.status / 100, 2u) << r.raw;
    r = http_exchange(sock, go_openapi("GET", "vm.info", ""));
    EXPECT_EQ(r.body["virtio_mem"]["requested_bytes"], 256 * kMiB) << r.raw;
    EXPECT_TRUE(wait_until(
        [&] {
            r = http_exchange(sock, go_openapi("GET", "vm.info", ""));
            return r.body.is_object() && r.body.value("memory_actual_size", 0ull) == 768 * kMiB;
        },
        120))
        << r.raw;

    r = http_exchange(sock, go_openapi("PUT", "vmm.shutdown", ""));
    EXPECT_EQ(r.status / 100, 2u) << r.raw;
    const ProcResult end = vmm.wait(60);
    EXPECT_EQ(end.status, 0) << end.err;
    EXPECT_NE(end.err.find("stopped with status"), std::string::npos) << end.err;   // the exit report
}

} // namespace
} // namespace kguest
