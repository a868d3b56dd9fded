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
// vm.resume, vm.shutdown, vm.power-button (204). Cloud Hypervisor's lifecycle (vmm/app/lifecycle.hpp
// serves it; a `kguest run` VMM answers 409): PUT vm.create (a VmConfig in
// Cloud Hypervisor's JSON, vmm/app/ch_config.hpp), vm.add-net (its TAP fds
// as SCM_RIGHTS ancillary data on the request's first bytes, as libvirt and
// Kata send them), vm.add-disk, vm.boot, vm.reboot,
// vm.delete, vmm.shutdown (answered, then the VMM ends); vm.info then also
// has "config" and Cloud Hypervisor's "state" (Created, Running, Paused,
// Shutdown) and "memory_actual_size". vm.resize also takes "desired_vcpus"
// (the current count only) and ignores fields sent as null. Errors carry
// {"error": "message"}: 400 bad JSON or fields, 404, 405, 408 too slow, 409
// refused (a ControlError, or a lifecycle step in the wrong state), 413 body
// too large, 431, 500 an exception, 503 too many connections.
#pragma once

#include "balloon/balloon.hpp"
#include "devices/base/fd.hpp"
#include "devices/base/guest_memory.hpp"
#include "devices/virtio_blk.hpp"
#include "devices/virtio_net.hpp"
#include "devices/virtio_rng.hpp"
#include "vmm/exit.hpp"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace kguest {

// What vm.info reports. The CLI relies on "name", "state" (Cloud Hypervisor's
// "Running", "Paused", ...), "memory" and "balloon"; it shows "*_bytes" and
// "memory" in MiB.
struct VmInfo {
    std::string name;
    bool paused = false;
    std::string state;          // Cloud Hypervisor's: Created, Running, Paused, Shutdown; "" = from `paused`
    nlohmann::json config;      // the effective VmConfig in Cloud Hypervisor's JSON; null = none
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
                         hotplug_too_large, not_running };
const char* control_message(ControlError e);

struct NetConfig;
struct DiskConfig;
struct ChVmConfig;

// A lifecycle step's outcome: status 0 = done (204), else an HTTP status and why.
struct Refusal {
    unsigned status = 0;
    std::string message;
    explicit operator bool() const { return status != 0; }
};

// Implemented by the VMM; every call comes from the API thread, one at a time,
// and must be quick (no other client is served meanwhile): the lifecycle
// steps wait only for the thread that builds and ends VMs, never for a vCPU.
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

    // Cloud Hypervisor's lifecycle; a VMM that runs one VM from its command
    // line refuses it (these defaults).
    virtual Refusal create(const ChVmConfig& /*cfg*/) { return fixed_vm(); }
    virtual Refusal add_net(NetConfig /*net*/, std::vector<Fd> /*tap_fds*/);
    virtual Refusal add_disk(const DiskConfig& /*disk*/) { return fixed_vm(); }
    virtual Refusal boot() { return fixed_vm(); }
    virtual Refusal reboot() { return fixed_vm(); }
    virtual Refusal remove() { return fixed_vm(); }   // vm.delete
    // vmm.shutdown: refused (non-zero status), or done once the answer is
    // written: then shutdown_vmm() is called on the API thread.
    virtual Refusal can_shutdown_vmm() { return fixed_vm(); }
    virtual void shutdown_vmm() {}

protected:
    static Refusal fixed_vm() {
        return {409, "this kguest runs one VM from its command line (kguest run); "
                     "start a bare VMM with `kguest --api-socket PATH` for Cloud Hypervisor's lifecycle"};
    }
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
    std::function<void()> after_write;   // run once the answer is written (or could not be)
};
// `fds`: the file descriptors that came with the request (SCM_RIGHTS); closed
// unless the route takes them (vm.add-net).
ApiReply api_dispatch(VmControl& vm, std::string_view method, std::string_view target,
                      std::string_view body, std::vector<Fd> fds = {});

class ApiServer {
public:
    // Creates the socket's directory if missing (mode 0700), replaces a stale
    // socket file, refuses a path another process serves, binds, chmods the
    // socket 0600 and starts the API thread. Throws naming the call and path.
    ApiServer(const std::string& socket_path, VmControl& vm, ApiLimits limits = {});
    // Serves an inherited socket that already listens (`--api-socket fd=N`,
    // as libvirt passes it): not unlinked at the end. Throws if `fd` is not a
    // listening AF_UNIX stream socket.
    ApiServer(Fd listening, VmControl& vm, ApiLimits limits = {});
    ~ApiServer();  // stops and joins the thread, closes all clients, unlinks the socket
    ApiServer(const ApiServer&) = delete;
    ApiServer& operator=(const ApiServer&) = delete;

    struct Impl;

private:
    std::unique_ptr<Impl> impl_;
};

} // namespace kguest
