// Cloud Hypervisor's VmConfig <-> kguest's VmConfig (see ch_config.hpp).
// Field names, defaults and enum spellings follow cloud-hypervisor.yaml.
#include "vmm/app/ch_config.hpp"
#include "vmm/app/net_options.hpp"
#include "vmm/kvm.hpp"

#include <optional>

namespace kguest {

using json = nlohmann::json;

namespace {

constexpr std::uint64_t k2M = 2ull << 20;

[[noreturn]] void bad(const std::string& field, const std::string& why) { throw ChConfigError(field + ": " + why); }

// The member `key` of object `j`, or nullptr when missing or JSON null (the
// engines send unset optional fields as null).
const json* member(const json& j, const char* key) {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
}

std::optional<std::uint64_t> get_u64(const json& j, const char* key, const std::string& at) {
    const json* v = member(j, key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_number_integer() || (!v->is_number_unsigned() && v->get<std::int64_t>() < 0))
        bad(at + "." + key, "must be a non-negative integer");
    return v->get<std::uint64_t>();
}
std::optional<bool> get_bool(const json& j, const char* key, const std::string& at) {
    const json* v = member(j, key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_boolean()) bad(at + "." + key, "must be true or false");
    return v->get<bool>();
}
std::optional<std::string> get_string(const json& j, const char* key, const std::string& at) {
    const json* v = member(j, key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_string()) bad(at + "." + key, "must be a string");
    return v->get<std::string>();
}
const json& object_at(const json& j, const std::string& at) {
    if (!j.is_object()) bad(at, "must be a JSON object");
    return j;
}

// A feature kguest lacks: refused when set to anything but false/empty.
void refuse_set(const json& j, const char* key, const std::string& at, const char* why) {
    const json* v = member(j, key);
    if (v == nullptr) return;
    if ((v->is_boolean() && !v->get<bool>()) || (v->is_array() && v->empty()) || (v->is_object() && v->empty())) return;
    bad(at.empty() ? key : at + "." + key, why);
}

void check_memory(VmConfig& c) {
    if (c.memory < kMinMemory) bad("memory.size", "too little memory (at least 8 MiB)");
    if (c.memory_max == 0) return;
    // As `kguest run --memory-max`: the boot size is rounded up to 2 MiB like the RAM mapping.
    c.memory = (c.memory + k2M - 1) & ~(k2M - 1);
    if (c.memory_max - c.memory > (1ull << 46)) bad("memory.hotplug_size", "too large");
    if (c.backing == Backing::hugetlbfs)
        bad("memory.hotplug_size", "needs memory.hugepages false (hugetlbfs for hot-plugged memory is not supported)");
}

// serial: COM1. console: Cloud Hypervisor's virtio-console, which kguest lacks.
void map_serial(const json& s, VmConfig& c) {
    object_at(s, "serial");
    const std::string mode = get_string(s, "mode", "serial").value_or("Null");
    refuse_set(s, "iommu", "serial", "kguest has no IOMMU");
    if (mode == "Off" || mode == "Null") {
        c.console = VmConfig::Console::none;
    } else if (mode == "Tty") {
        c.console = VmConfig::Console::stdio;
    } else if (mode == "File") {
        auto file = get_string(s, "file", "serial");
        if (!file || file->empty()) bad("serial.file", "mode File needs a file");
        c.console = VmConfig::Console::file;
        c.console_path = *file;
    } else if (mode == "Pty") {
        c.console = VmConfig::Console::pty;   // its path: vm.info's config.serial.file
    } else if (mode == "Socket") {
        auto sock = get_string(s, "socket", "serial");
        if (!sock || sock->empty()) bad("serial.socket", "mode Socket needs a socket path");
        c.console = VmConfig::Console::socket;
        c.console_path = *sock;
    } else {
        bad("serial.mode", "unknown mode '" + mode + "' (Off, Null, Tty, File, Pty, Socket)");
    }
}

} // namespace

NetConfig net_from_ch(const json& j, unsigned index, const std::string& at) {
    object_at(j, at);
    NetConfig n;
    n.kind = NetConfig::Kind::tap;
    n.id = get_string(j, "id", at).value_or("");
    n.target = get_string(j, "tap", at).value_or("");
    if (n.target.size() >= 16) bad(at + ".tap", "interface name longer than 15 characters");
    if (auto mac = get_string(j, "mac", at)) {
        if (!parse_mac(*mac, n.mac)) bad(at + ".mac", "bad MAC address '" + *mac + "' (want XX:XX:XX:XX:XX:XX)");
        if (n.mac[0] & 1) bad(at + ".mac", "MAC address " + *mac + " is multicast");
    } else if (index != kMacLater) {
        n.mac = default_mac(index);
    }
    // num_queues counts virtqueues, RX and TX of each pair (default 2).
    const std::uint64_t queues = get_u64(j, "num_queues", at).value_or(2);
    if (queues < 2 || queues % 2 != 0 || queues / 2 > kMaxNetQueuePairs)
        bad(at + ".num_queues", "must be an even number of queues from 2 to " + std::to_string(2 * kMaxNetQueuePairs));
    n.queue_pairs = static_cast<unsigned>(queues / 2);
    refuse_set(j, "vhost_user", at, "vhost-user networking is not supported");
    refuse_set(j, "iommu", at, "kguest has no IOMMU");
    return n;
}

DiskConfig disk_from_ch(const json& j, const std::string& at) {
    object_at(j, at);
    DiskConfig d;
    d.id = get_string(j, "id", at).value_or("");
    auto path = get_string(j, "path", at);
    if (!path || path->empty()) bad(at + ".path", "missing (kguest needs an image file or block device)");
    d.path = *path;
    d.readonly = get_bool(j, "readonly", at).value_or(false);
    d.cache = get_bool(j, "direct", at).value_or(false) ? DiskConfig::Cache::none : DiskConfig::Cache::writeback;
    const std::uint64_t queues = get_u64(j, "num_queues", at).value_or(1);
    if (queues < 1 || queues > kMaxBlkQueues) bad(at + ".num_queues", "must be 1 to " + std::to_string(kMaxBlkQueues));
    d.queues = static_cast<unsigned>(queues);
    if (auto serial = get_string(j, "serial", at)) {
        if (serial->size() > kBlkIdBytes) bad(at + ".serial", "longer than 20 characters");
        d.serial = *serial;
    }
    if (auto type = get_string(j, "image_type", at); type && *type != "Raw" && *type != "Unknown")
        bad(at + ".image_type", "'" + *type + "' is not supported (raw images only)");
    refuse_set(j, "vhost_user", at, "vhost-user disks are not supported");
    refuse_set(j, "iommu", at, "kguest has no IOMMU");
    return d;
}

ChVmConfig vm_config_from_ch(const json& j) {
    if (!j.is_object()) bad("body", "must be a JSON object (a VmConfig)");
    ChVmConfig out;
    VmConfig& c = out.config;
    c.api_socket = "none";      // the VMM's own socket serves it
    c.default_cmdline = false;  // payload.cmdline is the whole command line, as in Cloud Hypervisor

    const json* payload = member(j, "payload");
    if (payload == nullptr) bad("payload.kernel", "missing (the kernel to boot)");
    object_at(*payload, "payload");
    auto kernel = get_string(*payload, "kernel", "payload");
    if (!kernel || kernel->empty()) bad("payload.kernel", "missing (the kernel to boot)");
    c.kernel = *kernel;
    c.cmdline = get_string(*payload, "cmdline", "payload").value_or("");
    c.initrd = get_string(*payload, "initramfs", "payload").value_or("");
    refuse_set(*payload, "firmware", "payload", "firmware is not supported (kguest boots kernels directly)");
    refuse_set(*payload, "igvm", "payload", "IGVM payloads are not supported");
    refuse_set(*payload, "host_data", "payload", "confidential guests are not supported");

    if (const json* cpus = member(j, "cpus")) {
        object_at(*cpus, "cpus");
        const std::uint64_t boot = get_u64(*cpus, "boot_vcpus", "cpus").value_or(1);
        if (boot < 1 || boot > kMaxCpus) bad("cpus.boot_vcpus", "need 1 to " + std::to_string(kMaxCpus));
        if (auto max = get_u64(*cpus, "max_vcpus", "cpus"); max && *max != boot)
            bad("cpus.max_vcpus", std::to_string(*max) + " differs from boot_vcpus " + std::to_string(boot) +
                                      " (kguest does not hot-plug vCPUs)");
        refuse_set(*cpus, "kvm_hyperv", "cpus", "Hyper-V enlightenments are not supported");
        refuse_set(*cpus, "affinity", "cpus", "per-vCPU affinity is not supported (pin threads vcpuN from outside)");
        c.cpus = static_cast<unsigned>(boot);
    }

    c.memory = 512ull << 20;   // Cloud Hypervisor's default
    if (const json* mem = member(j, "memory")) {
        object_at(*mem, "memory");
        c.memory = get_u64(*mem, "size", "memory").value_or(c.memory);
        if (const std::uint64_t hp = get_u64(*mem, "hotplug_size", "memory").value_or(0)) {
            if (hp % k2M != 0) bad("memory.hotplug_size", "not a multiple of 2 MiB (the virtio-mem block)");
            c.memory_max = c.memory + hp;
        }
        // Both hot-plug methods are served by virtio-mem (kguest has no ACPI memory hot-plug).
        if (auto m = get_string(*mem, "hotplug_method", "memory"); m && *m != "Acpi" && *m != "VirtioMem")
            bad("memory.hotplug_method", "unknown method '" + *m + "' (Acpi, VirtioMem)");
        refuse_set(*mem, "hotplugged_size", "memory", "memory plugged at boot is not supported");
        refuse_set(*mem, "shared", "memory", "shared guest memory (vhost-user, virtio-fs) is not supported");
        refuse_set(*mem, "mergeable", "memory", "KSM merging is not supported");
        refuse_set(*mem, "zones", "memory", "memory zones are not supported");
        const bool huge = get_bool(*mem, "hugepages", "memory").value_or(false);
        const bool thp = get_bool(*mem, "thp", "memory").value_or(true);
        c.backing = huge ? Backing::hugetlbfs : thp ? Backing::thp : Backing::off;
        if (auto size = get_u64(*mem, "hugepage_size", "memory"); huge && size && *size != k2M)
            bad("memory.hugepage_size", "only 2 MiB huge pages are supported");
        c.prefault = get_bool(*mem, "prefault", "memory").value_or(false);
    }
    check_memory(c);

    if (const json* nets = member(j, "net")) {
        if (!nets->is_array()) bad("net", "must be an array");
        for (std::size_t i = 0; i < nets->size(); ++i) {
            NetConfig n = net_from_ch((*nets)[i], static_cast<unsigned>(i), "net[" + std::to_string(i) + "]");
            if (n.target.empty())
                bad("net[" + std::to_string(i) + "].tap", "missing (or pass the TAP fds with vm.add-net)");
            c.nets.push_back(std::move(n));
        }
    }
    if (const json* disks = member(j, "disks")) {
        if (!disks->is_array()) bad("disks", "must be an array");
        for (std::size_t i = 0; i < disks->size(); ++i)
            c.disks.push_back(disk_from_ch((*disks)[i], "disks[" + std::to_string(i) + "]"));
    }
    if (const json* b = member(j, "balloon")) {
        object_at(*b, "balloon");
        c.balloon = true;
        out.balloon_bytes = get_u64(*b, "size", "balloon").value_or(0);
        if (out.balloon_bytes > c.memory) bad("balloon.size", "larger than memory.size");
        c.balloon_options.deflate_on_oom = get_bool(*b, "deflate_on_oom", "balloon").value_or(false);
        c.balloon_options.reporting = get_bool(*b, "free_page_reporting", "balloon").value_or(false);
    }

    c.console = VmConfig::Console::none;   // Cloud Hypervisor's serial default is Null
    if (const json* s = member(j, "serial")) map_serial(*s, c);
    if (const json* con = member(j, "console")) {
        object_at(*con, "console");
        const std::string mode = get_string(*con, "mode", "console").value_or("Off");
        if (mode != "Off" && mode != "Null")
            bad("console.mode", mode + ": kguest has no virtio-console (use serial; console Off or Null)");
    }
    if (const json* rng = member(j, "rng")) {
        object_at(*rng, "rng");
        const std::string src = get_string(*rng, "src", "rng").value_or(VirtioRng::kDefaultSource);
        if (src.empty()) bad("rng.src", "empty path");
        refuse_set(*rng, "iommu", "rng", "kguest has no IOMMU");
        c.rng = src;
    }

    // Devices and features kguest lacks: refused by name.
    for (const char* key : {"fs", "pmem", "devices", "user_devices", "vdpa", "vsock", "sgx_epc", "numa", "tpm",
                            "pci_segments", "landlock_rules", "debug_console", "preserved_fds"})
        refuse_set(j, key, "", "not supported by kguest");
    refuse_set(j, "iommu", "", "kguest has no IOMMU");
    refuse_set(j, "watchdog", "", "kguest has no watchdog device");
    refuse_set(j, "pvpanic", "", "kguest has no pvpanic device");
    refuse_set(j, "landlock_enable", "", "Landlock is not supported (kguest confines itself with seccomp)");
    if (const json* platform = member(j, "platform")) {
        // num_pci_segments is accepted: every device sits on segment 0.
        object_at(*platform, "platform");
        refuse_set(*platform, "iommu_segments", "platform", "kguest has no IOMMU");
        refuse_set(*platform, "tdx", "platform", "confidential guests are not supported");
        refuse_set(*platform, "sev_snp", "platform", "confidential guests are not supported");
    }
    return out;
}

json ch_config_json(const VmConfig& c, std::uint64_t balloon_bytes) {
    json j;
    j["payload"] = {{"kernel", c.kernel}, {"cmdline", c.cmdline}};
    if (!c.initrd.empty()) j["payload"]["initramfs"] = c.initrd;
    j["cpus"] = {{"boot_vcpus", c.cpus}, {"max_vcpus", c.cpus}};
    const std::uint64_t hotplug = c.memory_max > c.memory ? c.memory_max - c.memory : 0;
    j["memory"] = {{"size", c.memory},
                   {"hotplug_size", hotplug},
                   {"hotplug_method", "VirtioMem"},
                   {"mergeable", false},
                   {"shared", false},
                   {"hugepages", c.backing == Backing::hugetlbfs},
                   {"thp", c.backing == Backing::thp},
                   {"prefault", c.prefault}};
    if (!c.nets.empty()) {
        json& nets = j["net"] = json::array();
        for (const NetConfig& n : c.nets) {
            // Cloud Hypervisor names a device "_netN" / "_diskN" when its config does not.
            const std::string id = n.id.empty() ? "_net" + std::to_string(nets.size()) : n.id;
            json e = {{"id", id}, {"mac", format_mac(n.mac)}, {"num_queues", 2 * n.queue_pairs}};
            if (n.kind == NetConfig::Kind::tap && !n.target.empty()) e["tap"] = n.target;
            nets.push_back(e);
        }
    }
    if (!c.disks.empty()) {
        json& disks = j["disks"] = json::array();
        for (const DiskConfig& d : c.disks) {
            json e = {{"id", d.id.empty() ? "_disk" + std::to_string(disks.size()) : d.id},
                      {"path", d.path},
                      {"readonly", d.readonly},
                      {"direct", d.cache == DiskConfig::Cache::none},
                      {"num_queues", d.queues}};
            if (!d.serial.empty()) e["serial"] = d.serial;
            disks.push_back(e);
        }
    }
    if (c.balloon)
        j["balloon"] = {{"size", balloon_bytes},
                        {"deflate_on_oom", c.balloon_options.deflate_on_oom},
                        {"free_page_reporting", c.balloon_options.reporting}};
    switch (c.console) {
    case VmConfig::Console::none: j["serial"] = {{"mode", "Null"}}; break;
    case VmConfig::Console::stdio: j["serial"] = {{"mode", "Tty"}}; break;
    case VmConfig::Console::file: j["serial"] = {{"mode", "File"}, {"file", c.console_path}}; break;
    case VmConfig::Console::pty: j["serial"] = {{"mode", "Pty"}}; break;   // "file": the running VM's PTY
    case VmConfig::Console::socket: j["serial"] = {{"mode", "Socket"}, {"socket", c.console_path}}; break;
    }
    if (c.rng) j["rng"] = {{"src", c.rng->empty() ? VirtioRng::kDefaultSource : c.rng->c_str()}};
    j["console"] = {{"mode", "Off"}};
    j["iommu"] = false;
    return j;
}

} // namespace kguest
