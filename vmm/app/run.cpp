// Running VMs (see run.hpp): the console input, the stop signals, the exit
// report, MachineControl, the control API's view of one Machine, called on
// the API thread (its pause() waits for the vCPUs to park; the rest is atomics
// or the devices' own locks), and MachineVm, the GuestVm (vmm/app/lifecycle.hpp)
// that builds, starts and ends a Machine on the thread that called run_vm or
// run_bare_vmm (the lifecycle's owner thread).
#include "vmm/app/run.hpp"
#include "balloon/balloon.hpp"
#include "devices/virtio_mem.hpp"
#include "devices/base/error.hpp"
#include "devices/base/fd.hpp"
#include "devices/base/log.hpp"
#include "devices/base/timeline.hpp"
#include "devices/base/thread_start.hpp"
#include "devices/port80.hpp"
#include "devices/serial.hpp"
#include "devices/virtio_blk.hpp"
#include "devices/virtio_net.hpp"
#include "vmm/app/api.hpp"
#include "vmm/app/api_client.hpp"
#include "vmm/app/events.hpp"
#include "vmm/app/lifecycle.hpp"
#include "vmm/app/setup_pages.hpp"
#include "vmm/console.hpp"
#include "vmm/machine.hpp"
#include "vmm/virtio_kvm.hpp"

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <csignal>
#include <cstring>
#include <memory>
#include <poll.h>
#include <pthread.h>
#include <sys/signalfd.h>
#include <unistd.h>

namespace kguest {

namespace {

// VmRSS of the whole process (guest RAM that is resident included).
std::uint64_t vmm_rss_bytes() {
    std::FILE* f = std::fopen("/proc/self/status", "re");
    if (f == nullptr) return 0;
    char line[256];
    std::uint64_t kib = 0;
    while (std::fgets(line, sizeof line, f) != nullptr && std::sscanf(line, "VmRSS: %" SCNu64, &kib) != 1) {}
    std::fclose(f);
    return kib << 10;
}

class MachineControl : public VmControl {
public:
    explicit MachineControl(Machine& m) : m_(m) {}

    VmInfo info() override {
        const GuestMemory& mem = m_.memory();
        VmInfo i;
        i.name = m_.config().name;
        i.paused = m_.loop().paused();
        i.cpus = m_.config().cpus;
        i.memory = mem.size();
        i.backing = mem.backing();
        const GuestMemory::Usage u = mem.usage();
        i.hugepage_backed_bytes = u.huge_backed_bytes;
        i.rss_bytes = u.resident_bytes;
        i.vmm_rss_bytes = vmm_rss_bytes();
        if (VirtioBalloon* b = m_.balloon())
            i.balloon = VmInfo::Balloon{std::uint64_t{b->target_pages()} << 12, std::uint64_t{b->actual_pages()} << 12};
        for (const DiskDevice& d : m_.disks())
            i.disks.push_back({d.dev->image().path(), d.dev->image().size(), d.dev->image().readonly(),
                               d.dev->num_queues()});
        if (VirtioMem* vmem = m_.virtio_mem()) {
            const VirtioMemConfig c = vmem->config();
            i.virtio_mem = VmInfo::VirtioMem{m_.config().memory_max, c.region_size, c.plugged_size, c.requested_size,
                                             u.hotplug_huge_backed_bytes, u.hotplug_resident_bytes};
        }
        return i;
    }

    VmCounters counters() override {
        VmCounters c;
        c.port80 = {m_.port80().writes(), m_.port80().reads(), m_.port80().last_code()};
        for (const NetDevice& n : m_.nets()) c.nets.push_back(n.dev->counters());
        for (const DiskDevice& d : m_.disks()) c.disks.push_back(d.dev->counters());
        if (VirtioBalloon* b = m_.balloon()) {
            // Ask for a fresh sample (5.5.6.3); this answer carries the last one.
            b->request_stats();
            c.balloon = VmCounters::Balloon{b->counters(), b->stats()};
        }
        if (VirtioRng* r = m_.rng()) c.rng = r->counters();
        c.exits = m_.loop().exits();
        return c;
    }

    ControlError resize(std::uint64_t desired_balloon_bytes) override {
        VirtioBalloon* b = m_.balloon();
        if (b == nullptr) return ControlError::no_balloon;
        // num_pages is a le32 (VIRTIO 1.2 5.5.6); api.cpp refuses more, this never truncates.
        if (desired_balloon_bytes > m_.memory().size() || (desired_balloon_bytes >> 12) > UINT32_MAX)
            return ControlError::balloon_too_large;
        b->set_target_pages(static_cast<std::uint32_t>(desired_balloon_bytes >> 12));
        return ControlError::none;
    }
    ControlError resize_hotplug(std::uint64_t requested_bytes) override {
        VirtioMem* vmem = m_.virtio_mem();
        if (vmem == nullptr) return ControlError::no_virtio_mem;
        // The API checked it against memory_max; set_requested_size() checks it again.
        return vmem->set_requested_size(requested_bytes) ? ControlError::none : ControlError::hotplug_too_large;
    }
    ControlError pause() override {
        if (m_.loop().paused()) return ControlError::already_paused;
        return m_.loop().pause() ? ControlError::none : ControlError::pause_failed;
    }
    ControlError resume() override {
        if (!m_.loop().paused()) return ControlError::not_paused;
        m_.loop().resume();
        return ControlError::none;
    }
    ControlError shutdown() override {
        m_.loop().request_stop(0);
        return ControlError::none;
    }
    ControlError power_button() override {
        m_.press_power_button();
        return ControlError::none;
    }

private:
    Machine& m_;
};

// Blocks the stop signals in this thread (and the threads it starts) and reads
// them from a signalfd; restores the mask on destruction. Created before any
// other thread exists (run_vm).
class StopSignals {
public:
    StopSignals() {
        sigset_t sigs;
        sigemptyset(&sigs);
        for (int s : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&sigs, s);
        if (int e = pthread_sigmask(SIG_BLOCK, &sigs, &old_)) throw SysError("pthread_sigmask", e);
        int sfd = ::signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK);
        if (sfd < 0) {
            int err = errno;
            pthread_sigmask(SIG_SETMASK, &old_, nullptr);
            throw SysError("signalfd", err);
        }
        fd_ = Fd(sfd);
    }
    ~StopSignals() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }
    StopSignals(const StopSignals&) = delete;
    StopSignals& operator=(const StopSignals&) = delete;
    int fd() const { return fd_.get(); }

private:
    sigset_t old_;
    Fd fd_;
};

void exit_report(Machine& m, int status, bool signalled) {
    if (signalled)   // stopped from outside: where each vCPU was
        for (const auto& v : m.vcpus()) log_msg("vCPU %u: %s", v.id(), describe_vcpu(v).c_str());
    log_msg("vCPU 0 PV MSRs enabled by the guest: %s", pv_msrs_enabled(m.vcpus()[0]).c_str());
    auto ull = [](std::uint64_t v) { return static_cast<unsigned long long>(v); };
    Port80& p = m.port80();
    log_msg("VM '%s' stopped with status %d; port 0x80: %llu writes (%s path), %llu reads, last code 0x%02x",
            m.config().name.c_str(), status, ull(p.writes()), p.absorbed() ? "in-kernel" : "userspace",
            ull(p.reads()), p.last_code());
    if (const std::uint64_t dropped = m.serial().tx_dropped())
        log_msg("console: %llu of %llu bytes dropped (its reader did not keep up or was gone)", ull(dropped),
                ull(m.serial().tx_bytes()));
    if (const std::uint64_t lost = log_lines_dropped())
        log_msg("log: %llu lines dropped (stderr's reader did not keep up)", ull(lost));
    std::size_t i = 0;
    for (const NetDevice& n : m.nets()) {
        NetCounters c = n.dev->counters();
        log_msg("virtio-net %zu: rx %llu packets (%llu dropped), tx %llu packets (%llu dropped); %llu MSI-X, %llu INTx interrupts",
                i++, ull(c.rx_packets), ull(c.rx_dropped), ull(c.tx_packets), ull(c.tx_dropped),
                ull(n.slot->msi_count()), ull(n.slot->intx_count()));
    }
    i = 0;
    for (const DiskDevice& d : m.disks()) {
        const BlkCounters c = d.dev->counters();
        log_msg("virtio-blk %zu: %llu reads (%llu bytes), %llu writes (%llu bytes), %llu flushes, %llu discards, "
                "%llu errors; %llu MSI-X, %llu INTx interrupts",
                i++, ull(c.reads), ull(c.read_bytes), ull(c.writes), ull(c.write_bytes), ull(c.flushes),
                ull(c.discards), ull(c.errors), ull(d.slot->msi_count()), ull(d.slot->intx_count()));
    }
    if (VirtioRng* r = m.rng()) {
        const RngCounters c = r->counters();
        log_msg("virtio-rng: %llu bytes in %llu requests, %llu waits for the rate limit, %llu bad chains", ull(c.bytes),
                ull(c.requests), ull(c.throttled), ull(c.bad_chains));
    }
    // Exits by reason, as kvm_stat shows them: the top userspace ones, then KVM's own.
    const ExitStats ex = m.loop().exits();
    std::string line;
    for (std::size_t k = 0; k < std::min<std::size_t>(5, ex.userspace.size()); ++k) {
        const ExitCount& x = ex.userspace[k];
        char buf[160];
        std::snprintf(buf, sizeof buf, "%s%s %llu (%.1f us each)", k ? ", " : "", x.reason.c_str(),
                      ull(x.count), static_cast<double>(x.handling_ns) / 1e3 / static_cast<double>(x.count));
        line += buf;
    }
    log_msg("exits to userspace by reason: %s (%zu reasons)", line.empty() ? "none" : line.c_str(),
            ex.userspace.size());
    line.clear();
    for (const char* name : {"exits", "halt_exits", "irq_window_exits", "io_exits", "mmio_exits", "hypercalls",
                             "irq_exits", "signal_exits"})
        for (const KvmStat& st : ex.kvm ? *ex.kvm : std::vector<KvmStat>{})
            if (st.name == name) line += (line.empty() ? "" : ", ") + st.name + " " + std::to_string(st.value);
    log_msg("exits in KVM: %s", ex.kvm ? line.c_str() : ex.kvm_note.c_str());
    if (m.config().boot_timeline) std::fputs(boot_timeline_report().c_str(), stderr);
}

// A Machine as the lifecycle drives it.
class MachineVm : public GuestVm {
public:
    explicit MachineVm(const VmConfig& cfg) : m_(cfg), control_(m_) {}
    ~MachineVm() override {
        // Leaving by an exception, or ending the VMM without finish(): stop
        // the VM first, so its threads can be joined.
        if (started_ && !finished_) m_.loop().request_stop(1);
        console_.reset();
    }

    VmControl& control() override { return control_; }
    void start() override {
        console_ = std::make_unique<ConsoleInput>(m_.console(), m_.serial(), m_.loop().stop_fd());
        started_ = true;
        m_.loop().start();
    }
    int stop_fd() override { return m_.loop().stop_fd(); }
    void request_stop(int status) override { m_.loop().request_stop(status); }
    std::string console_pty_path() override { return m_.console_pty_path(); }
    bool reset_by_guest() override { return m_.reset_by_guest(); }
    int finish(bool signalled) override {
        const int status = m_.loop().wait();
        finished_ = true;
        console_.reset();   // joins the input thread, restores a terminal
        exit_report(m_, status, signalled);
        return status;
    }

private:
    Machine m_;
    MachineControl control_;
    std::unique_ptr<ConsoleInput> console_;
    bool started_ = false, finished_ = false;
};

std::unique_ptr<GuestVm> make_machine_vm(const VmConfig& cfg) { return std::make_unique<MachineVm>(cfg); }

} // namespace

int run_vm(const VmConfig& cfg, const ConfineOptions& confine_options) {
    Confinement confine(confine_options);   // first: it closes inherited fds
    // Before the Machine, whose devices start their event loop threads: every
    // thread kguest starts inherits the blocked stop signals, so the kernel
    // can only queue them for the signalfd. One landing on a thread that did
    // not block them would take its default action and end the process
    // without the stop path (the terminal left raw, the socket left behind).
    StopSignals signals;
    // `kguest run` is the lifecycle's create and boot with the command line's VM.
    VmLifecycle life(VmLifecycle::Mode::fixed, make_machine_vm);
    life.create_fixed(cfg);
    life.build();
    // The control API before the VM starts, so a socket error needs no thread cleanup.
    std::unique_ptr<ApiServer> api;
    if (cfg.api_socket != "none")
        api = std::make_unique<ApiServer>(cfg.api_socket.empty() ? socket_for(cfg.name) : cfg.api_socket, life);
    // Everything is open: drop privileges and let the waiting threads
    // confine themselves, before anything else can fail (the API thread
    // waits for this, and `api` joins it).
    confine.setup_done();
    life.start();
    drop_setup_pages();       // after the last thread's start
    confine.confine_main();   // last: no thread is started after it
    return life.serve(signals.fd());
}

int run_bare_vmm(const BareVmmOptions& o) {
    ConfineOptions confine_options = o.confine;
    confine_options.bare_vmm = true;
    if (o.api.fd >= 0) confine_options.keep_fds.push_back(o.api.fd);
    if (o.event_monitor) {
        const PathOrFd ev = parse_path_or_fd("--event-monitor", *o.event_monitor);
        if (ev.fd >= 0) confine_options.keep_fds.push_back(ev.fd);
    }
    Confinement confine(confine_options);   // first: it closes the other inherited fds
    StopSignals signals;
    std::unique_ptr<EventMonitor> events;
    if (o.event_monitor) events = std::make_unique<EventMonitor>(*o.event_monitor);
    VmLifecycle life(VmLifecycle::Mode::api, make_machine_vm, events.get());
    if (events) events->emit("vmm", "starting");
    std::unique_ptr<ApiServer> api = o.api.fd >= 0 ? std::make_unique<ApiServer>(Fd(o.api.fd), life)
                                                   : std::make_unique<ApiServer>(o.api.path, life);
    // The API thread confines itself now; each VM's threads do so as they
    // start. The main thread keeps the set-up calls: it builds the VMs (see
    // lifecycle.hpp).
    confine.setup_done();
    return life.serve(signals.fd());
}

} // namespace kguest
