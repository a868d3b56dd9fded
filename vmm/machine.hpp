// A Machine is one VM: KVM objects, guest RAM, the buses and devices, and the
// vCPU threads (vmm/vcpu_loop.hpp, whose controls loop() exposes). The
// constructor does all host setup and may throw. The application
// (vmm/app/run.cpp) adds the console input, the control API and signals.
//
// Threading: the loop's controls and the accessors may be used from any
// thread; start and wait from the thread that owns the Machine.
#pragma once

#include "devices/base/bus.hpp"
#include "balloon/balloon.hpp"
#include "devices/block_image.hpp"
#include "devices/net_backend.hpp"
#include "devices/virtio_rng.hpp"
#include "devices/base/guest_memory.hpp"
#include "vmm/board.hpp"
#include "vmm/console.hpp"
#include "vmm/kvm.hpp"
#include "vmm/loader.hpp"
#include "vmm/vcpu_loop.hpp"

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kguest {

class Port80Absorber;
class VirtioDevice;
class VirtioPciSlot;
class VirtioNet;
class VirtioBlk;
class VirtioBalloon;
class VirtioMem;
class VirtioRng;
class GsiRouter;

// What a Linux kernel gets before --cmdline: the console on COM1, reboot
// through the i8042 reset line, and a panic that ends the VM (as kvmtool does).
#define KGUEST_LINUX_CMDLINE "console=ttyS0 reboot=k panic=1"

struct VmConfig {
    std::string kernel, initrd, cmdline;
    bool default_cmdline = true;   // Linux kernels: KGUEST_LINUX_CMDLINE first
    std::string name = "kguest";
    unsigned cpus = 1;
    std::uint64_t memory = 256ull << 20;
    std::uint64_t memory_max = 0;     // > memory: a virtio-mem device can grow the guest up to it (--memory-max)
    Backing backing = Backing::thp;
    using Console = ConsoleKind;      // stdio, none, file, pty, socket (vmm/console.hpp)
    Console console = Console::stdio;
    std::string console_path;         // file: the file; socket: the UNIX socket kguest listens on
    enum class Port80Mode { kernel, exit } port80 = Port80Mode::kernel;
    bool pv_spinlocks = true;         // false hides KVM_FEATURE_PV_UNHALT (like Linux's `nopvspin`)
    std::vector<NetConfig> nets;      // virtio-net devices (--net), in PCI slot order
    std::vector<DiskConfig> disks;    // virtio-blk devices (--disk), after the network devices
    bool balloon = false;             // a virtio-balloon device, after the network devices
    BalloonOptions balloon_options;   // the features it offers (--balloon=...)
    std::optional<std::string> rng;  // virtio-rng source path (--rng)
    RngLimit rng_limit = VirtioRng::kDefaultLimit;   // its token bucket (--rng rate=)
    std::string api_socket;           // "" picks socket_for(name), "none" has none
    bool prefault = false;            // fault all guest RAM in before boot (MADV_POPULATE_WRITE)
    bool boot_timeline = false;       // print the boot timeline (devices/base/timeline.hpp) at exit
};

inline constexpr std::uint64_t kMinMemory = 8ull << 20;

// A virtio-net device and the PCI slot that wires it to KVM.
struct NetDevice {
    std::shared_ptr<VirtioNet> dev;
    VirtioPciSlot* slot;
};

// A virtio-blk device and the PCI slot that wires it to KVM.
struct DiskDevice {
    std::shared_ptr<VirtioBlk> dev;
    VirtioPciSlot* slot;
};

class Machine {
public:
    explicit Machine(const VmConfig& cfg);
    ~Machine();
    Machine(const Machine&) = delete;
    Machine& operator=(const Machine&) = delete;

    // The vCPU loop's controls (see vcpu_loop.hpp): start once, then wait.
    VcpuLoop& loop() { return loop_; }

    const VmConfig& config() const { return cfg_; }
    const GuestMemory& memory() const { return mem_; }
    Serial& serial() { return *legacy_.serial; }
    const ConsoleBackend& console() const { return *console_; }
    // The console PTY's slave ("/dev/pts/N"), "" when the console is not a PTY.
    std::string console_pty_path() const { return console_->pty_path(); }
    Port80& port80() { return *legacy_.port80; }
    const std::vector<NetDevice>& nets() const { return nets_; }
    const std::vector<DiskDevice>& disks() const { return disks_; }
    VirtioBalloon* balloon() { return balloon_.get(); }
    VirtioMem* virtio_mem() { return virtio_mem_.get(); }
    VirtioRng* rng() { return rng_.get(); }
    const std::vector<Vcpu>& vcpus() const { return vcpus_; }
    // An ACPI power button press through the Generic Event Device
    // (devices/acpi_pm.hpp). Thread-safe; the control API calls it.
    void press_power_button();
    // Whether the guest ended the VM by resetting the machine (the i8042 or
    // ACPI reset register), rather than powering off or failing.
    bool reset_by_guest() const { return reset_by_guest_.load(); }

private:
    // Puts a virtio device in the next free PCI slot, BAR pre-assigned.
    VirtioPciSlot& add_virtio(std::shared_ptr<VirtioDevice> dev, std::uint32_t class_code);

    // Declaration order is construction order: the user's input is checked
    // before /dev/kvm is opened, so it is a usage error even without KVM.
    VmConfig cfg_;
    GuestMemory mem_;
    BootPlan boot_;
    std::vector<std::unique_ptr<BlockImage>> images_;   // --disk, opened and locked; moved into disks_
    Fd rng_source_;                                     // --rng's source, opened; moved into rng_
    Kvm kvm_;
    Vm vm_;
    // Before the buses and the bridge, so those drop their references first
    // and a slot's device (and its thread) goes before the slot's eventfds.
    std::unique_ptr<GsiRouter> gsi_router_;
    std::vector<std::unique_ptr<VirtioPciSlot>> virtio_;   // slots 1, 2, ...
    std::vector<NetDevice> nets_;
    std::vector<DiskDevice> disks_;
    std::shared_ptr<VirtioBalloon> balloon_;
    std::shared_ptr<VirtioMem> virtio_mem_;
    std::shared_ptr<VirtioRng> rng_;
    std::atomic<bool> reset_by_guest_{false};
    Bus pio_{"PIO"};
    Bus mmio_{"MMIO"};
    std::unique_ptr<ConsoleBackend> console_;
    LegacyDevices legacy_;
    std::unique_ptr<Port80Absorber> port80_absorber_;
    std::vector<Vcpu> vcpus_;
    VcpuLoop loop_;   // after everything its threads touch, so it stops first
};

} // namespace kguest
