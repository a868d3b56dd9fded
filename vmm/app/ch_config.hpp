// Cloud Hypervisor's VmConfig JSON (vmm/src/api/openapi/cloud-hypervisor.yaml
// in cloud-hypervisor/cloud-hypervisor) to and from kguest's VmConfig
// (vmm/machine.hpp), for vm.create, vm.add-net, vm.add-disk and vm.info's
// "config". The engines that drive Cloud Hypervisor (libvirt's ch driver,
// Kata's clh driver) fill in many defaulted fields: unknown fields are
// ignored, fields kguest understands are mapped, and a field that asks for
// something kguest cannot do (a vsock, virtio-fs, shared guest memory, more
// max_vcpus than boot_vcpus, ...) is refused with a ChConfigError naming the
// field, never dropped in silence.
//
// Pure functions: no I/O (paths are checked when the VM is built), any thread.
#pragma once

#include "vmm/machine.hpp"

#include <cstdint>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

namespace kguest {

// What vm.create answers 400 with; the message starts with the field's path
// (e.g. "cpus.max_vcpus: ...").
struct ChConfigError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A vm.create request, mapped.
struct ChVmConfig {
    VmConfig config;
    std::uint64_t balloon_bytes = 0;   // balloon.size: the balloon's first target
};

// Throws ChConfigError.
ChVmConfig vm_config_from_ch(const nlohmann::json& j);
// One NetConfig (vm.add-net's body, or an element of net[]); `index` picks
// the default MAC (kMacLater: left all zeros for the VM to pick). tap_fds
// stays empty: the caller adds received fds.
inline constexpr unsigned kMacLater = ~0u;
NetConfig net_from_ch(const nlohmann::json& j, unsigned index, const std::string& field = "net");
// One DiskConfig (vm.add-disk's body, or an element of disks[]).
DiskConfig disk_from_ch(const nlohmann::json& j, const std::string& field = "disks");

// The effective config in Cloud Hypervisor's shape (vm.info's "config").
// `balloon_bytes` is the balloon's current target.
nlohmann::json ch_config_json(const VmConfig& cfg, std::uint64_t balloon_bytes);

} // namespace kguest
