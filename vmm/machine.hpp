// A Machine is one running VM: KVM objects, guest RAM, the buses and devices,
// and one thread per vCPU. Building it (the constructor) does all host setup
// and may throw; run() starts the vCPUs and returns the VM's exit status when
// the guest ends it (exit port, triple fault, system event), when every vCPU
// has halted without an in-kernel LAPIC, or when SIGINT/SIGTERM arrives.
#pragma once

#include "devices/base/bus.hpp"
#include "balloon/balloon.hpp"
#include "devices/net_backend.hpp"
#include "devices/base/guest_memory.hpp"
#include "vmm/kvm.hpp"
#include "vmm/loader.hpp"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace kguest {

class Serial;
class Port80;
class Port80Absorber;
class ExitPort;
class Rtc;
class I8042;
class AcpiPm;
class PciHostBridge;
class VirtioDevice;
class VirtioPciSlot;
class VirtioNet;
class VirtioBalloon;
class MachineControl;
class GsiRouter;

// The command line a Linux kernel gets before --cmdline: the console on COM1,
// reboot through the i8042 reset line (devices/i8042.hpp), and a panic that
// ends the VM (reboot after 1 s) instead of hanging it, as kvmtool and
// Firecracker do.
#define KGUEST_LINUX_CMDLINE "console=ttyS0 reboot=k panic=1"

struct VmConfig {
    std::string kernel;
    std::string initrd;
    std::string cmdline;
    bool default_cmdline = true;   // Linux kernels: KGUEST_LINUX_CMDLINE first
    std::string name = "kguest";
    unsigned cpus = 1;
    std::uint64_t memory = 256ull << 20;
    Backing backing = Backing::thp;
    enum class Console { stdio, none, file } console = Console::stdio;
    std::string console_path;
    enum class Port80Mode { kernel, exit } port80 = Port80Mode::kernel;
    // Hide KVM_FEATURE_PV_UNHALT (like Linux's `nopvspin`): guests fall back to
    // native spinlocks, for pv/native comparisons from the command line.
    bool pv_spinlocks = true;
    // virtio-net devices (--net), in PCI slot order.
    std::vector<NetConfig> nets;
    // A virtio-balloon device (--balloon), after the network devices.
    bool balloon = false;
    BalloonOptions balloon_options;   // the features it offers (--balloon=...)
    // The control API's socket: "" picks socket_for(name), "none" has none.
    std::string api_socket;
    // Fault all guest RAM in before boot (MADV_POPULATE_WRITE, --prefault).
    bool prefault = false;
};

inline constexpr std::uint64_t kMinMemory = 8ull << 20;
inline constexpr unsigned kMaxCpus = 254;  // xAPIC IDs; 0xff is broadcast

class Machine {
public:
    explicit Machine(const VmConfig& cfg);
    ~Machine();
    Machine(const Machine&) = delete;
    Machine& operator=(const Machine&) = delete;

    // Runs the VM to its end; returns the exit status. Call once.
    int run();
    // Stops the VM with `status` (the first request wins). Thread-safe.
    void request_stop(int status);
    // Parks every vCPU thread outside KVM_RUN and returns once all are parked
    // (false if the VM is stopping or they did not park within 5 s);
    // resume() lets them go on. Thread-safe (the control API calls them).
    bool pause();
    void resume();
    bool paused() const { return paused_.load(); }

    Port80& port80() { return *port80_; }
    VirtioBalloon* balloon() { return balloon_.get(); }
    Serial& serial() { return *serial_; }
    const GuestMemory& memory() const { return mem_; }

private:
    void setup_vcpu(Vcpu& vcpu, const std::vector<kvm_cpuid_entry2>& supported);
    void setup_boot_cpu(Vcpu& vcpu);
    // Guest-initiated ends that are not an exit-port write: ACPI S5
    // (poweroff) and a reset (i8042 0xFE, the ACPI reset register).
    void guest_power_off();
    void guest_reset();
    void vcpu_thread(Vcpu& vcpu);
    void park(Vcpu& vcpu);   // a vCPU thread waiting out a pause
    void input_thread();
    // Puts a virtio device in the next free PCI slot, BAR pre-assigned.
    VirtioPciSlot& add_virtio(std::shared_ptr<VirtioDevice> dev, std::uint32_t class_code);

    // Declaration order is construction order: everything the user supplies
    // (flags, image, command line) is checked before /dev/kvm is opened, so
    // bad input is a usage error even on a host without KVM.
    VmConfig cfg_;
    GuestMemory mem_;
    BootPlan boot_;
    Kvm kvm_;
    Vm vm_;
    // Before the buses and the bridge, so those drop their references first
    // and a slot's device (and its thread) goes before the slot's eventfds.
    std::unique_ptr<GsiRouter> gsi_router_;
    std::vector<std::unique_ptr<VirtioPciSlot>> virtio_;   // slots 1, 2, ...
    std::vector<std::shared_ptr<VirtioNet>> nets_;
    std::shared_ptr<VirtioBalloon> balloon_;
    friend class MachineControl;   // the control API's view (machine.cpp)
    Bus pio_{"PIO"};
    Bus mmio_{"MMIO"};
    Fd console_file_;
    int console_fd_ = -1;
    std::shared_ptr<Serial> serial_;
    std::shared_ptr<Port80> port80_;
    std::unique_ptr<Port80Absorber> port80_absorber_;
    std::shared_ptr<ExitPort> exit_port_;
    std::shared_ptr<Rtc> rtc_;          // CMOS at 0x70-0x71
    std::shared_ptr<I8042> i8042_;      // reset line at 0x64
    std::shared_ptr<AcpiPm> acpi_pm_;   // ACPI sleep control / reset registers
    std::shared_ptr<PciHostBridge> pci_;  // bus 0 through ports 0xcf8-0xcff
    std::vector<Vcpu> vcpus_;
    std::uint32_t pv_features_ = 0;  // KVM PV features offered (0x40000001 EAX), before the host's mask
    std::vector<std::thread> threads_;
    std::thread input_;
    Fd stop_event_;  // eventfd: written once when the VM stops
    std::atomic<bool> stopping_{false};
    std::atomic<int> status_{0};
    std::atomic<unsigned> halted_{0};
    std::mutex pause_mu_;
    std::condition_variable pause_cv_;
    std::atomic<bool> paused_{false};
    unsigned parked_ = 0;   // vCPU threads waiting in park() (pause_mu_)
};

} // namespace kguest
