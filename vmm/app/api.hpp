// The VM control API: HTTP/1.1 + JSON on a UNIX socket, in the style of Cloud
// Hypervisor's API (`curl --unix-socket SOCK http://localhost/api/v1/vm.info`).
// The VMM implements the typed VmControl interface; ApiServer owns the socket
// and one thread running Boost.Asio/Beast (inside api.cpp only), and calls
// VmControl on that thread only. A slow or malicious client holds at most its
// own connection (bounded in number, time and size), and vCPU threads never
// wait on the API thread (VmControl must hand requests to the VM through
// atomics or queues, never take a lock a vCPU holds across a guest exit).
//
// Routes under /api/v1/: GET vmm.ping ({"version", "pid"}), vm.info (VmInfo),
// vm.counters ("port80", "net0"..., "disk0"..., "balloon" with "stats" once sampled, "rng",
// "exits": {"userspace": [{"reason", "count", "handling_ns"}...] most frequent
// first, "kvm": {KVM's counter names: N} or "kvm_note" saying why not}); PUT
// vm.resize ({"desired_balloon": BYTES} or {"desired_ram": BYTES}: the guest's
// total memory, as in Cloud Hypervisor: above --memory through virtio-mem,
// below it by unplugging all and inflating the balloon), vm.pause,
// vm.resume, vm.shutdown, vm.power-button (204). Errors carry {"error": "message"}: 400 bad JSON
// or fields, 404, 405, 408 too slow, 409 refused (a ControlError), 413 body too
// large, 431, 500 an exception, 503 too many connections.
#pragma once

#include "balloon/balloon.hpp"
#include "devices/base/guest_memory.hpp"
#include "devices/virtio_blk.hpp"
#include "devices/virtio_net.hpp"
#include "devices/virtio_rng.hpp"
#include "vmm/exit.hpp"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace kguest {

// What vm.info reports. The CLI relies on "name", "state" ("running" or
// "paused"), "memory" and "balloon"; it shows "*_bytes" and "memory" in MiB.
struct VmInfo {
    std::string name;
    bool paused = false;
    unsigned cpus = 0;
    std::uint64_t memory = 0;   // guest RAM in bytes (vm.resize's desired_ram is checked against it)
    Backing backing = Backing::thp;
    std::uint64_t hugepage_backed_bytes = 0;
    std::uint64_t rss_bytes = 0;       // guest RAM resident in host memory
    std::uint64_t vmm_rss_bytes = 0;   // the whole process
    struct Balloon {
        std::uint64_t target_bytes = 0, actual_bytes = 0;
    };
    std::optional<Balloon> balloon;    // when the VM has one
    struct Disk {
        std::string path;
        std::uint64_t size = 0;   // bytes
        bool readonly = false;
        unsigned queues = 1;
    };
    std::vector<Disk> disks;           // "disks": [...] in PCI slot order
    struct VirtioMem {
        std::uint64_t max_bytes = 0;        // --memory-max: memory plus the most that may be plugged
        std::uint64_t region_bytes = 0;     // the device region (rounded up to 128 MiB)
        std::uint64_t plugged_bytes = 0, requested_bytes = 0;
        std::uint64_t hugepage_backed_bytes = 0, rss_bytes = 0;   // of the region, on the host
    };
    std::optional<VirtioMem> virtio_mem;   // when the VM has one (--memory-max)
};

// What vm.counters reports.
struct VmCounters {
    struct Port80 {
        std::uint64_t writes = 0, reads = 0;
        std::uint8_t last_code = 0;
    } port80;
    std::vector<NetCounters> nets;     // "net0", "net1", ... in PCI slot order
    std::vector<BlkCounters> disks;    // "disk0", "disk1", ... in PCI slot order
    struct Balloon {
        BalloonCounters counters;
        BalloonStats stats;            // "stats" when valid, in libvirt's names and units
    };
    std::optional<Balloon> balloon;
    std::optional<RngCounters> rng;    // "rng" when the VM has a virtio-rng device
    ExitStats exits;
};

// Why the VM refused a request (HTTP 409 with control_message()).
enum class ControlError { none, already_paused, not_paused, pause_failed, no_balloon, balloon_too_large, no_virtio_mem,
                         hotplug_too_large };
const char* control_message(ControlError e);

// Implemented by the VMM; every call comes from the API thread, one at a time,
// and must be quick (no other client is served meanwhile).
struct VmControl {
    virtual ~VmControl() = default;
    virtual VmInfo info() = 0;
    virtual VmCounters counters() = 0;
    // How much the balloon should hold, in bytes. Must not wait for the guest.
    virtual ControlError resize(std::uint64_t desired_balloon_bytes) = 0;
    // virtio-mem's requested_size in bytes (a multiple of 2 MiB, checked
    // against VmInfo::virtio_mem by the caller). Must not wait for the guest.
    virtual ControlError resize_hotplug(std::uint64_t /*requested_bytes*/) { return ControlError::no_virtio_mem; }
    // shutdown() only requests the stop (it must not destroy the ApiServer).
    virtual ControlError pause() = 0;
    virtual ControlError resume() = 0;
    virtual ControlError shutdown() = 0;
    // An ACPI power button press (the guest's OS decides what to do; Linux
    // powers off). Must not wait for the guest.
    virtual ControlError power_button() = 0;
};

// The smallest guest size vm.resize accepts for desired_ram (and the most the
// balloon may take: memory - kMinGuestRam).
inline constexpr std::uint64_t kMinGuestRam = 16ull << 20;

struct ApiLimits {
    std::size_t max_connections = 32;      // more are answered 503 and closed
    std::size_t body_limit = 64 * 1024;    // larger bodies get 413
    std::size_t header_limit = 8 * 1024;   // larger headers get 431
    std::chrono::milliseconds request_timeout{5000};  // first byte to complete request, else 408
    std::chrono::milliseconds idle_timeout{10000};    // keep-alive wait for the next request
    std::chrono::milliseconds write_timeout{5000};    // a client that does not read its response
};

// One HTTP exchange without sockets (exposed for tests); status 204 has no body.
struct ApiReply {
    unsigned status = 200;
    nlohmann::json body;  // null for 204
    std::string allow;    // the Allow header of a 405
};
ApiReply api_dispatch(VmControl& vm, std::string_view method, std::string_view target,
                      std::string_view body);

class ApiServer {
public:
    // Creates the socket's directory if missing (mode 0700), replaces a stale
    // socket file, refuses a path another process serves, binds, chmods the
    // socket 0600 and starts the API thread. Throws naming the call and path.
    ApiServer(const std::string& socket_path, VmControl& vm, ApiLimits limits = {});
    ~ApiServer();  // stops and joins the thread, closes all clients, unlinks the socket
    ApiServer(const ApiServer&) = delete;
    ApiServer& operator=(const ApiServer&) = delete;

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

} // namespace kguest
