// The VM lifecycle behind the control API, in Cloud Hypervisor's terms:
// a VMM holds at most one VM, which vm.create configures (state Created),
// vm.add-net / vm.add-disk extend, vm.boot builds and starts (Running, Paused
// through vm.pause), vm.shutdown or the guest's power-off ends (Shutdown: a
// new vm.boot rebuilds it from the same config), vm.reboot and the guest's
// own reset end it and boot it again, vm.delete forgets; vmm.shutdown ends the process. `kguest run` is
// the same machinery with its one VM created and booted from the command
// line (Mode::fixed: vm.create and friends are refused, vm.shutdown ends the
// process with the VM, as before).
//
// Threads and ownership. The owner thread (the process's main thread)
// builds, starts, ends and destroys every VM (GuestVm): building needs the
// set-up system calls (KVM, mmap, opening images), which the API thread's
// seccomp list does not allow, and a VM's threads inherit their creator's
// filters, so the creator must be a thread whose own list allows what they
// need. In API mode the main thread therefore stays without a seccomp list
// (it never touches guest input: it builds, joins and reports), while every
// thread it starts (vCPUs, device loops, console input) and the API thread
// confine themselves as in `kguest run` (vmm/app/confine.hpp). The API
// thread calls VmControl: config edits, info, pause, resize and the power
// button are done at once under mu_; boot, reboot, vm.shutdown and vm.delete
// are handed to the owner thread (serve()), and the API thread waits for
// the answer: it waits for set-up or tear-down of a VM, never for a vCPU,
// and vCPU threads never wait for it. mu_ is never held while a VM is built
// or joined, and vCPU and device threads never take it.
//
// State machine (state_): NotCreated -create-> Created -boot-> Running
// <-pause/resume-> Paused; Running/Paused -vm.shutdown, guest power-off->
// Shutdown -boot-> Running; any -delete-> NotCreated. A step in the wrong
// state is a 409 naming the state; the VMM stays usable.
#pragma once

#include "vmm/app/api.hpp"
#include "vmm/app/ch_config.hpp"
#include "vmm/app/events.hpp"

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>

namespace kguest {

// One built VM as the lifecycle drives it: run.cpp's over a Machine; a fake
// in the unit tests. Owner-thread calls but control(), request_stop() and
// console_pty_path(), which any thread may make.
class GuestVm {
public:
    virtual ~GuestVm() = default;   // stops a started VM that was not finished
    virtual VmControl& control() = 0;
    virtual void start() = 0;               // console input and vCPUs
    virtual int stop_fd() = 0;              // readable once the VM has stopped
    virtual void request_stop(int status) = 0;
    virtual std::string console_pty_path() = 0;   // the serial's PTY slave, "" when none
    virtual bool reset_by_guest() = 0;            // it stopped because the guest reset the machine
    virtual int finish(bool signalled) = 0;   // waits for the stop, logs the exit report; its status
};
// Builds a VM (does not start it); throws as Machine's constructor does.
using GuestFactory = std::function<std::unique_ptr<GuestVm>(const VmConfig&)>;

class VmLifecycle : public VmControl {
public:
    enum class Mode { fixed, api };
    // `events` may be null; it must outlive the lifecycle.
    VmLifecycle(Mode mode, GuestFactory factory, EventMonitor* events = nullptr);
    ~VmLifecycle() override;
    VmLifecycle(const VmLifecycle&) = delete;
    VmLifecycle& operator=(const VmLifecycle&) = delete;

    // Owner thread. Fixed mode: set the VM, build it (throws), start it.
    void create_fixed(const VmConfig& cfg);
    void build();
    void start();
    // Owner thread: runs the handed-over steps and watches the VM and the
    // stop signals (`signal_fd`, a signalfd; -1 for none) until the VMM
    // ends. Returns the exit status: fixed mode the VM's (128 + N when
    // signal N stopped it), API mode 0 after vmm.shutdown, 128 + N after a
    // signal.
    int serve(int signal_fd);

    // VmControl, on the API thread.
    VmInfo info() override;
    VmCounters counters() override;
    ControlError resize(std::uint64_t desired_balloon_bytes) override;
    ControlError resize_hotplug(std::uint64_t requested_bytes) override;
    ControlError pause() override;
    ControlError resume() override;
    ControlError shutdown() override;
    Refusal create(const ChVmConfig& cfg) override;
    Refusal add_net(NetConfig net, std::vector<Fd> tap_fds) override;
    Refusal add_disk(const DiskConfig& disk) override;
    Refusal boot() override;
    Refusal reboot() override;
    Refusal remove() override;
    ControlError power_button() override;
    Refusal can_shutdown_vmm() override;
    void shutdown_vmm() override;

    static const char* state_name(int state);

private:
    enum State { not_created, created, running, paused, shut_down };
    enum class Step { boot, reboot, shutdown, remove };

    Refusal hand_over(Step step);                  // API thread: to serve(), waits for the answer
    Refusal run_step(Step step);                   // owner thread
    Refusal boot_now();                            // owner thread
    Refusal boot_again();                          // owner thread: an ended VM, with CH's rebooting/rebooted
    int end_vm(bool signalled);                    // owner thread: finish, destroy; the status
    Refusal wrong_state(const char* step) const;   // (mu_)
    Refusal id_taken(const char* step, const std::string& id) const;   // (mu_)
    void emit(const char* source, const char* event);

    const Mode mode_;
    GuestFactory factory_;
    EventMonitor* events_;
    Fd wake_;   // eventfd: a step handed over, or vmm.shutdown

    std::mutex mu_;
    std::condition_variable answered_;
    State state_ = not_created;      // (mu_)
    ChVmConfig cfg_;                 // (mu_)
    std::vector<Fd> tap_fds_;        // vm.add-net's fds, for every build (mu_)
    std::unique_ptr<GuestVm> vm_;    // set and reset by the owner thread (mu_)
    bool started_ = false;           // vm_ is started (mu_)
    std::optional<Step> step_;       // handed over, not yet taken (mu_)
    std::optional<Refusal> answer_;  // the owner thread's answer (mu_)
    bool quit_ = false;              // vmm.shutdown (mu_)
};

} // namespace kguest
