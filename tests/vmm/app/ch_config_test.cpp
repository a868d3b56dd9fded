// Cloud Hypervisor's VmConfig JSON <-> kguest's VmConfig: the accepted
// subset, the 400s naming the field, unknown fields ignored, and the way back
// for vm.info's "config".
#include "vmm/app/ch_config.hpp"

#include <gtest/gtest.h>

#include <string>

namespace kguest {
namespace {

using json = nlohmann::json;
constexpr std::uint64_t MiB = 1ull << 20;

// The message of the ChConfigError `j` raises ("" when it is accepted).
std::string refusal(const json& j) {
    try {
        vm_config_from_ch(j);
    } catch (const ChConfigError& e) {
        return e.what();
    }
    return "";
}

json minimal() { return {{"payload", {{"kernel", "/k"}}}}; }

TEST(ChConfig, MapsTheAcceptedSubset) {
    const json j = json::parse(R"({
        "payload": {"kernel": "/boot/vmlinux", "cmdline": "console=ttyS0 quiet", "initramfs": "/initrd"},
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "topology": {"threads_per_core": 1}},
        "memory": {"size": 536870912, "hotplug_size": 1073741824, "hotplug_method": "Acpi", "shared": false,
                   "hugepages": false, "thp": true, "prefault": true, "mergeable": false},
        "net": [{"tap": "tap0", "mac": "12:34:56:78:9a:bc", "num_queues": 4}],
        "disks": [{"path": "/img.raw", "readonly": true, "num_queues": 2, "serial": "root", "direct": true}],
        "balloon": {"size": 67108864, "deflate_on_oom": true, "free_page_reporting": false},
        "serial": {"mode": "File", "file": "/tmp/console.log"},
        "console": {"mode": "Off"},
        "iommu": false, "watchdog": false, "pvpanic": false,
        "platform": {"num_pci_segments": 2},
        "some_future_field": {"x": 1}
    })");
    const ChVmConfig m = vm_config_from_ch(j);
    const VmConfig& c = m.config;
    EXPECT_EQ(c.kernel, "/boot/vmlinux");
    EXPECT_EQ(c.cmdline, "console=ttyS0 quiet");
    EXPECT_FALSE(c.default_cmdline);   // verbatim: no default Linux command line added
    EXPECT_EQ(c.initrd, "/initrd");
    EXPECT_EQ(c.cpus, 2u);
    EXPECT_EQ(c.memory, 512 * MiB);
    EXPECT_EQ(c.memory_max, 1536 * MiB);
    EXPECT_EQ(c.backing, Backing::thp);
    EXPECT_TRUE(c.prefault);
    ASSERT_EQ(c.nets.size(), 1u);
    EXPECT_EQ(c.nets[0].target, "tap0");
    EXPECT_EQ(format_mac(c.nets[0].mac), "12:34:56:78:9a:bc");
    EXPECT_EQ(c.nets[0].queue_pairs, 2u);   // num_queues counts queues, not pairs
    ASSERT_EQ(c.disks.size(), 1u);
    EXPECT_EQ(c.disks[0].path, "/img.raw");
    EXPECT_TRUE(c.disks[0].readonly);
    EXPECT_EQ(c.disks[0].queues, 2u);
    EXPECT_EQ(c.disks[0].serial, "root");
    EXPECT_EQ(c.disks[0].cache, DiskConfig::Cache::none);
    EXPECT_TRUE(c.balloon);
    EXPECT_EQ(m.balloon_bytes, 64 * MiB);
    EXPECT_TRUE(c.balloon_options.deflate_on_oom);
    EXPECT_FALSE(c.balloon_options.reporting);
    EXPECT_EQ(c.console, VmConfig::Console::file);
    EXPECT_EQ(c.console_path, "/tmp/console.log");
    EXPECT_EQ(c.api_socket, "none");   // the bare VMM's socket serves it
}

TEST(ChConfig, DefaultsAndNulls) {
    json j = minimal();
    j["cpus"] = nullptr;   // unset optional fields arrive as null
    j["memory"] = {{"size", 256 * MiB}, {"hotplug_size", nullptr}};
    j["serial"] = {{"mode", "Null"}};
    const VmConfig c = vm_config_from_ch(j).config;
    EXPECT_EQ(c.cpus, 1u);
    EXPECT_EQ(c.memory_max, 0u);
    EXPECT_EQ(c.console, VmConfig::Console::none);
    EXPECT_EQ(c.cmdline, "");
    EXPECT_EQ(vm_config_from_ch(json{{"payload", {{"kernel", "/k"}}}, {"serial", {{"mode", "Tty"}}}}).config.console,
              VmConfig::Console::stdio);
    EXPECT_EQ(vm_config_from_ch(json{{"payload", {{"kernel", "/k"}}}, {"serial", {{"mode", "Off"}}}}).config.console,
              VmConfig::Console::none);
    // Cloud Hypervisor's default memory is 512 MiB.
    EXPECT_EQ(vm_config_from_ch(minimal()).config.memory, 512 * MiB);
}

TEST(ChConfig, SerialModesAndRng) {
    auto serial = [](json s) {
        json j = minimal();
        j["serial"] = std::move(s);
        return vm_config_from_ch(j).config;
    };
    EXPECT_EQ(serial({{"mode", "Pty"}}).console, VmConfig::Console::pty);
    const VmConfig sock = serial({{"mode", "Socket"}, {"socket", "/run/s.sock"}});
    EXPECT_EQ(sock.console, VmConfig::Console::socket);
    EXPECT_EQ(sock.console_path, "/run/s.sock");
    EXPECT_EQ(ch_config_json(sock, 0)["serial"]["socket"], "/run/s.sock");
    EXPECT_EQ(ch_config_json(serial({{"mode", "Pty"}}), 0)["serial"]["mode"], "Pty");
    EXPECT_NE(refusal(json{{"payload", {{"kernel", "/k"}}}, {"serial", {{"mode", "Socket"}}}}).find("serial.socket"),
              std::string::npos);

    json j = minimal();
    EXPECT_FALSE(vm_config_from_ch(j).config.rng);
    j["rng"] = {{"src", "/dev/hwrng"}, {"iommu", false}};
    VmConfig c = vm_config_from_ch(j).config;
    ASSERT_TRUE(c.rng);
    EXPECT_EQ(*c.rng, "/dev/hwrng");
    EXPECT_EQ(ch_config_json(c, 0)["rng"]["src"], "/dev/hwrng");
    j["rng"] = json::object();   // Cloud Hypervisor's default source
    EXPECT_EQ(*vm_config_from_ch(j).config.rng, "/dev/urandom");
    j["rng"] = {{"src", "/dev/urandom"}, {"iommu", true}};
    EXPECT_NE(refusal(j).find("rng.iommu"), std::string::npos);
}

TEST(ChConfig, RefusalsNameTheField) {
    EXPECT_EQ(refusal(minimal()), "");
    EXPECT_NE(refusal(json::object()).find("payload.kernel"), std::string::npos);
    EXPECT_NE(refusal(json{{"payload", {{"cmdline", "x"}}}}).find("payload.kernel"), std::string::npos);
    EXPECT_NE(refusal(json::array()).find("body"), std::string::npos);

    auto with = [](const char* key, json v) {
        json j = minimal();
        j[key] = std::move(v);
        return refusal(j);
    };
    EXPECT_NE(with("cpus", {{"boot_vcpus", 2}, {"max_vcpus", 4}}).find("cpus.max_vcpus"), std::string::npos);
    EXPECT_NE(with("cpus", {{"boot_vcpus", 0}}).find("cpus.boot_vcpus"), std::string::npos);
    EXPECT_NE(with("cpus", {{"boot_vcpus", "two"}}).find("cpus.boot_vcpus"), std::string::npos);
    EXPECT_NE(with("serial", {{"mode", "Carrier-Pigeon"}}).find("serial.mode"), std::string::npos);
    EXPECT_NE(with("serial", {{"mode", "File"}}).find("serial.file"), std::string::npos);
    EXPECT_NE(with("console", {{"mode", "Tty"}}).find("console.mode"), std::string::npos);
    EXPECT_NE(with("memory", {{"size", 1 * MiB}}).find("memory.size"), std::string::npos);
    EXPECT_NE(with("memory", {{"size", 256 * MiB}, {"shared", true}}).find("memory.shared"), std::string::npos);
    EXPECT_NE(with("memory", {{"size", 256 * MiB}, {"hotplug_size", 3 * MiB}}).find("memory.hotplug_size"),
              std::string::npos);
    EXPECT_NE(with("memory", {{"size", 256 * MiB}, {"hotplug_method", "Dimm"}}).find("memory.hotplug_method"),
              std::string::npos);
    EXPECT_NE(with("vsock", {{"cid", 3}, {"socket", "/v"}}).find("vsock"), std::string::npos);
    EXPECT_NE(with("fs", json::array({{{"tag", "t"}, {"socket", "/s"}}})).find("fs"), std::string::npos);
    EXPECT_NE(with("vdpa", json::array({{{"path", "/dev/vhost-vdpa-0"}}})).find("vdpa"), std::string::npos);
    EXPECT_NE(with("iommu", true).find("iommu"), std::string::npos);
    EXPECT_NE(with("net", json::array({{{"mac", "12:34:56:78:9a:bc"}}})).find("net[0].tap"), std::string::npos);
    EXPECT_NE(with("net", json::array({{{"tap", "t0"}, {"num_queues", 3}}})).find("net[0].num_queues"),
              std::string::npos);
    EXPECT_NE(with("net", json::array({{{"tap", "t0"}, {"mac", "01:00:00:00:00:01"}}})).find("net[0].mac"),
              std::string::npos);
    EXPECT_NE(with("net", json::array({{{"tap", "t0"}, {"vhost_user", true}}})).find("net[0].vhost_user"),
              std::string::npos);
    EXPECT_NE(with("disks", json::array({{{"readonly", true}}})).find("disks[0].path"), std::string::npos);
    EXPECT_NE(with("disks", json::array({{{"path", "/a"}, {"image_type", "Qcow2"}}})).find("disks[0].image_type"),
              std::string::npos);
    EXPECT_NE(with("balloon", {{"size", 1ull << 40}}).find("balloon.size"), std::string::npos);
    // Empty lists and false flags of unsupported features are no request for them.
    EXPECT_EQ(with("fs", json::array()), "");
    EXPECT_EQ(with("watchdog", false), "");
}

TEST(ChConfig, AddNetAndDiskBodies) {
    // vm.add-net with fds: no tap name, the MAC left for the VM to pick.
    NetConfig n = net_from_ch(json{{"num_queues", 2}}, kMacLater, "vm.add-net");
    EXPECT_EQ(n.target, "");
    EXPECT_EQ(n.mac, MacAddress{});
    EXPECT_EQ(n.queue_pairs, 1u);
    n = net_from_ch(json::object(), 1);
    EXPECT_EQ(format_mac(n.mac), "52:54:00:12:34:57");
    try {
        disk_from_ch(json{{"path", "/a"}, {"num_queues", 0}}, "vm.add-disk");
        ADD_FAILURE() << "num_queues 0 accepted";
    } catch (const ChConfigError& e) {
        EXPECT_NE(std::string(e.what()).find("vm.add-disk.num_queues"), std::string::npos) << e.what();
    }
}

TEST(ChConfig, RoundTripsThroughVmInfoConfig) {
    json in = json::parse(R"({
        "payload": {"kernel": "/k", "cmdline": "a b"},
        "cpus": {"boot_vcpus": 3, "max_vcpus": 3},
        "memory": {"size": 268435456, "hotplug_size": 268435456},
        "net": [{"tap": "t0", "mac": "52:54:00:00:00:01", "num_queues": 2}],
        "disks": [{"path": "/d", "readonly": false}],
        "balloon": {"size": 0},
        "serial": {"mode": "Tty"}
    })");
    const ChVmConfig m = vm_config_from_ch(in);
    const json out = ch_config_json(m.config, 32 * MiB);
    EXPECT_EQ(out["payload"]["kernel"], "/k");
    EXPECT_EQ(out["payload"]["cmdline"], "a b");
    EXPECT_EQ(out["cpus"]["boot_vcpus"], 3);
    EXPECT_EQ(out["cpus"]["max_vcpus"], 3);
    EXPECT_EQ(out["memory"]["size"], 256 * MiB);
    EXPECT_EQ(out["memory"]["hotplug_size"], 256 * MiB);
    EXPECT_EQ(out["net"][0]["tap"], "t0");
    EXPECT_EQ(out["net"][0]["num_queues"], 2);
    EXPECT_EQ(out["disks"][0]["path"], "/d");
    EXPECT_EQ(out["balloon"]["size"], 32 * MiB);
    EXPECT_EQ(out["serial"]["mode"], "Tty");
    // And back again: the same VM.
    const VmConfig again = vm_config_from_ch(out).config;
    EXPECT_EQ(again.memory_max, m.config.memory_max);
    EXPECT_EQ(again.nets[0].mac, m.config.nets[0].mac);
    EXPECT_EQ(again.console, m.config.console);
}

} // namespace
} // namespace kguest
