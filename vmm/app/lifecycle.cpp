// The VM lifecycle (see lifecycle.hpp).
#include "vmm/app/lifecycle.hpp"
#include "vmm/app/net_options.hpp"
#include "devices/base/error.hpp"
#include "devices/base/log.hpp"

#include <cerrno>
#include <cstring>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <unistd.h>

namespace kguest {

namespace {

void signal_eventfd(int fd) {
    const std::uint64_t one = 1;
    [[maybe_unused]] ssize_t r = ::write(fd, &one, sizeof one);   // fails only when the counter is full: still readable
}
void drain_eventfd(int fd) {
    std::uint64_t v;
    [[maybe_unused]] ssize_t r = ::read(fd, &v, sizeof v);
}

} // namespace

const char* VmLifecycle::state_name(int state) {
    switch (state) {
    case not_created: return "NotCreated";
    case created: return "Created";
    case running: return "Running";
    case paused: return "Paused";
    case shut_down: return "Shutdown";
    }
    return "?";
}

VmLifecycle::VmLifecycle(Mode mode, GuestFactory factory, EventMonitor* events)
    : mode_(mode), factory_(std::move(factory)), events_(events) {
    wake_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!wake_.valid()) throw_errno("eventfd");
}

VmLifecycle::~VmLifecycle() {
    // The VM's threads go before anything they use (GuestVm's destructor
    // stops a started VM).
    std::lock_guard lock(mu_);
    vm_.reset();
}

void VmLifecycle::emit(const char* source, const char* event) {
    if (events_ != nullptr) events_->emit(source, event);
}

Refusal VmLifecycle::wrong_state(const char* step) const {
    const std::string state = state_name(state_);
    return {409, std::string(step) + ": the VM is " + (state_ == not_created ? "not created (vm.create first)" : state)};
}

// ---- owner thread ----
// Only the owner thread sets or resets vm_ (under mu_), so it reads vm_ without mu_.

void VmLifecycle::create_fixed(const VmConfig& cfg) {
    std::lock_guard lock(mu_);
    cfg_.config = cfg;
    state_ = created;
}

void VmLifecycle::build() {
    VmConfig cfg;
    {
        std::lock_guard lock(mu_);
        cfg = cfg_.config;
    }
    std::unique_ptr<GuestVm> vm = factory_(cfg);
    std::lock_guard lock(mu_);
    vm_ = std::move(vm);
    started_ = false;
}

void VmLifecycle::start() {
    std::uint64_t balloon = 0;
    {
        std::lock_guard lock(mu_);
        vm_->start();
        started_ = true;
        state_ = running;
        balloon = cfg_.balloon_bytes;
    }
    if (balloon != 0) vm_->control().resize(balloon);   // balloon.size: the first target
}

Refusal VmLifecycle::boot_now() {
    emit("vm", "booting");
    try {
        build();
    } catch (const UsageError& e) {   // the config names something unusable (an image, a TAP, ...)
        log_msg("vm.boot: %s", e.what());
        return {400, std::string("vm.boot: ") + e.what()};
    } catch (const std::exception& e) {   // a host failure
        log_msg("vm.boot: %s", e.what());
        return {500, std::string("vm.boot: ") + e.what()};
    }
    start();
    emit("vm", "booted");
    return {};
}

Refusal VmLifecycle::boot_again() {
    emit("vm", "rebooting");
    if (Refusal r = boot_now()) return r;
    emit("vm", "rebooted");
    return {};
}

int VmLifecycle::end_vm(bool signalled) {
    GuestVm* vm;
    {
        std::lock_guard lock(mu_);
        vm = vm_.get();
    }
    const int status = vm->finish(signalled);
    std::lock_guard lock(mu_);
    vm_.reset();   // joins what is left of it; nobody else uses vm_ without mu_
    started_ = false;
    state_ = shut_down;
    return status;
}

Refusal VmLifecycle::run_step(Step step) {
    State state;
    {
        std::lock_guard lock(mu_);
        state = state_;
    }
    const bool live = state == running || state == paused;
    switch (step) {
    case Step::boot:
        if (state != created && state != shut_down) {
            std::lock_guard lock(mu_);
            return wrong_state("vm.boot");
        }
        return boot_now();
    case Step::reboot:
        if (!live) {
            std::lock_guard lock(mu_);
            return wrong_state("vm.reboot");
        }
        vm_->request_stop(0);
        end_vm(false);
        return boot_again();
    case Step::shutdown:
        if (!live) {
            std::lock_guard lock(mu_);
            return wrong_state("vm.shutdown");
        }
        vm_->request_stop(0);
        end_vm(false);
        emit("vm", "shutdown");
        return {};
    case Step::remove:
        if (state == not_created) {
            std::lock_guard lock(mu_);
            return wrong_state("vm.delete");
        }
        if (live) {
            vm_->request_stop(0);
            end_vm(false);
            emit("vm", "shutdown");
        }
        {
            std::lock_guard lock(mu_);
            cfg_ = {};
            tap_fds_.clear();
            state_ = not_created;
        }
        emit("vm", "deleted");
        return {};
    }
    return {500, "unknown step"};
}

int VmLifecycle::serve(int signal_fd) {
    int exit_status = 0;
    for (;;) {
        int stop_fd = -1;
        {
            std::lock_guard lock(mu_);
            if (vm_ && started_) stop_fd = vm_->stop_fd();
        }
        pollfd fds[3] = {{wake_.get(), POLLIN, 0}, {signal_fd, POLLIN, 0}, {stop_fd, POLLIN, 0}};
        const int n = ::poll(fds, 3, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            log_msg("poll: %s (errno %d); stopping", std::strerror(errno), errno);
            if (stop_fd >= 0) {
                vm_->request_stop(1);
                exit_status = end_vm(false);
            }
            exit_status = 1;
            break;
        }
        if (fds[1].revents & POLLIN) {
            signalfd_siginfo si;
            if (::read(signal_fd, &si, sizeof si) == sizeof si) {
                const int sig = static_cast<int>(si.ssi_signo);
                log_msg("caught %s; stopping %s", strsignal(sig), mode_ == Mode::fixed ? "the VM" : "the VMM");
                exit_status = 128 + sig;
                if (stop_fd >= 0) {
                    vm_->request_stop(128 + sig);
                    exit_status = end_vm(true);
                    if (mode_ == Mode::api) emit("vm", "shutdown");
                }
                break;
            }
        }
        if (stop_fd >= 0 && (fds[2].revents & POLLIN)) {
            // The VM ended by itself (the guest, a vm.shutdown in fixed mode, a failure).
            const bool reset = vm_->reset_by_guest();
            exit_status = end_vm(false);
            if (mode_ == Mode::fixed) break;
            if (reset) {
                // A guest's reboot: built again from the same config, as vm.reboot
                // does (Cloud Hypervisor reboots its guests too). A guest that
                // resets at once loops here, one build per reset; a step the API
                // hands over meanwhile waits for one build, as behind vm.reboot.
                log_msg("booting the VM again");
                if (Refusal r = boot_again()) {
                    log_msg("rebooting the VM failed: %s", r.message.c_str());
                    emit("vm", "shutdown");
                }
                continue;
            }
            emit("vm", "shutdown");
            continue;
        }
        if (fds[0].revents & POLLIN) {
            drain_eventfd(wake_.get());
            std::optional<Step> step;
            bool quit;
            {
                std::lock_guard lock(mu_);
                step = std::exchange(step_, std::nullopt);
                quit = quit_;
            }
            if (step) {
                Refusal r = run_step(*step);
                {
                    std::lock_guard lock(mu_);
                    answer_ = std::move(r);
                }
                answered_.notify_all();
            }
            if (quit) {
                bool live;
                {
                    std::lock_guard lock(mu_);
                    live = vm_ && started_;
                }
                if (live) {
                    vm_->request_stop(0);
                    end_vm(false);
                    emit("vm", "shutdown");
                }
                break;
            }
        }
    }
    // An API call still waiting for an answer gets one before the API thread is joined.
    {
        std::lock_guard lock(mu_);
        if (step_) {
            step_.reset();
            answer_ = Refusal{503, "the VMM is shutting down"};
        }
    }
    answered_.notify_all();
    if (mode_ == Mode::api) emit("vmm", "shutdown");
    return exit_status;
}

// ---- API thread ----

Refusal VmLifecycle::hand_over(Step step) {
    std::unique_lock lock(mu_);
    if (quit_) return {503, "the VMM is shutting down"};
    step_ = step;
    answer_.reset();
    signal_eventfd(wake_.get());
    answered_.wait(lock, [this] { return answer_.has_value(); });
    return *std::exchange(answer_, std::nullopt);
}

VmInfo VmLifecycle::info() {
    std::lock_guard lock(mu_);
    VmInfo i;
    if (vm_ && started_) {
        i = vm_->control().info();
        i.state = i.paused ? "Paused" : "Running";
    } else {
        const VmConfig& c = cfg_.config;
        i.name = c.name;
        i.cpus = c.cpus;
        i.memory = c.memory;
        i.backing = c.backing;
        i.state = state_name(state_);
    }
    if (state_ != not_created) {
        std::uint64_t balloon = cfg_.balloon_bytes;
        if (i.balloon) balloon = i.balloon->target_bytes;
        i.config = ch_config_json(cfg_.config, balloon);
        // libvirt reads the PTY's path back from here (ch_process.c, virCHProcessUpdateConsole).
        if (vm_ && started_ && cfg_.config.console == VmConfig::Console::pty)
            i.config["serial"]["file"] = vm_->console_pty_path();
    }
    return i;
}

VmCounters VmLifecycle::counters() {
    std::lock_guard lock(mu_);
    if (vm_ && started_) return vm_->control().counters();
    return {};
}

ControlError VmLifecycle::resize(std::uint64_t bytes) {
    std::lock_guard lock(mu_);
    if (!vm_ || !started_) return ControlError::not_running;
    return vm_->control().resize(bytes);
}

ControlError VmLifecycle::resize_hotplug(std::uint64_t bytes) {
    std::lock_guard lock(mu_);
    if (!vm_ || !started_) return ControlError::not_running;
    return vm_->control().resize_hotplug(bytes);
}

ControlError VmLifecycle::pause() {
    std::lock_guard lock(mu_);
    if (!vm_ || !started_) return ControlError::not_running;
    emit("vm", "pausing");
    const ControlError e = vm_->control().pause();
    if (e == ControlError::none) {
        state_ = paused;
        emit("vm", "paused");
    }
    return e;
}

ControlError VmLifecycle::resume() {
    std::lock_guard lock(mu_);
    if (!vm_ || !started_) return ControlError::not_running;
    emit("vm", "resuming");
    const ControlError e = vm_->control().resume();
    if (e == ControlError::none) {
        state_ = running;
        emit("vm", "resumed");
    }
    return e;
}

ControlError VmLifecycle::shutdown() {
    if (mode_ == Mode::fixed) {
        // `kguest stop`: the VM stops and the process ends with it (serve()).
        std::lock_guard lock(mu_);
        if (!vm_ || !started_) return ControlError::not_running;
        vm_->request_stop(0);
        return ControlError::none;
    }
    const Refusal r = hand_over(Step::shutdown);
    return r ? ControlError::not_running : ControlError::none;
}

Refusal VmLifecycle::create(const ChVmConfig& cfg) {
    if (mode_ == Mode::fixed) return fixed_vm();
    std::lock_guard lock(mu_);
    if (state_ != not_created) return {409, "vm.create: a VM is already created (state " + std::string(state_name(state_)) +
                                                "); vm.delete it first"};
    cfg_ = cfg;
    state_ = created;
    return {};
}

// Cloud Hypervisor's 409 for a device whose id another device has (mu_).
Refusal VmLifecycle::id_taken(const char* step, const std::string& id) const {
    if (id.empty()) return {};
    for (const NetConfig& n : cfg_.config.nets)
        if (n.id == id) return {409, std::string(step) + ": a device named '" + id + "' exists"};
    for (const DiskConfig& d : cfg_.config.disks)
        if (d.id == id) return {409, std::string(step) + ": a device named '" + id + "' exists"};
    return {};
}

Refusal VmLifecycle::add_net(NetConfig net, std::vector<Fd> tap_fds) {
    if (mode_ == Mode::fixed) return fixed_vm();
    std::lock_guard lock(mu_);
    if (state_ == not_created) return wrong_state("vm.add-net");
    if (state_ != created && state_ != shut_down)
        return {409, "vm.add-net: kguest does not hot-plug devices; add them before vm.boot"};
    if (Refusal r = id_taken("vm.add-net", net.id)) return r;
    if (net.mac == MacAddress{}) net.mac = default_mac(static_cast<unsigned>(cfg_.config.nets.size()));
    for (Fd& fd : tap_fds) {
        net.tap_fds.push_back(fd.get());
        tap_fds_.push_back(std::move(fd));
    }
    if (net.target.empty()) net.target = "fd " + std::to_string(net.tap_fds.front());
    cfg_.config.nets.push_back(std::move(net));
    return {};
}

Refusal VmLifecycle::add_disk(const DiskConfig& disk) {
    if (mode_ == Mode::fixed) return fixed_vm();
    std::lock_guard lock(mu_);
    if (state_ == not_created) return wrong_state("vm.add-disk");
    if (state_ != created && state_ != shut_down)
        return {409, "vm.add-disk: kguest does not hot-plug devices; add them before vm.boot"};
    if (Refusal r = id_taken("vm.add-disk", disk.id)) return r;
    cfg_.config.disks.push_back(disk);
    return {};
}

Refusal VmLifecycle::boot() {
    if (mode_ == Mode::fixed) return fixed_vm();
    return hand_over(Step::boot);
}

Refusal VmLifecycle::reboot() {
    if (mode_ == Mode::fixed) return fixed_vm();
    return hand_over(Step::reboot);
}

Refusal VmLifecycle::remove() {
    if (mode_ == Mode::fixed) return fixed_vm();
    return hand_over(Step::remove);
}

ControlError VmLifecycle::power_button() {
    std::lock_guard lock(mu_);
    if (!vm_ || !started_) return ControlError::not_running;
    return vm_->control().power_button();
}

Refusal VmLifecycle::can_shutdown_vmm() {
    if (mode_ == Mode::fixed) return fixed_vm();
    return {};
}

void VmLifecycle::shutdown_vmm() {
    std::lock_guard lock(mu_);
    quit_ = true;
    signal_eventfd(wake_.get());
}

} // namespace kguest
