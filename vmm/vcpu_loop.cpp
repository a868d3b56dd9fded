// The vCPU run loop with pause and stop (see vcpu_loop.hpp).
#include "vmm/vcpu_loop.hpp"
#include "devices/base/error.hpp"
#include "devices/base/log.hpp"
#include "devices/base/timeline.hpp"
#include "devices/base/thread_start.hpp"
#include "vmm/exit.hpp"

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <pthread.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <x86intrin.h>

namespace kguest {

constexpr int kKickSignal = SIGUSR1;
static void on_kick(int) {}

VcpuLoop::VcpuLoop(std::vector<Vcpu>& vcpus, std::size_t run_size, const Bus& pio, const Bus& mmio,
                   std::function<void()> before_exit)
    : vcpus_(vcpus), run_size_(run_size), pio_(pio), mmio_(mmio), before_exit_(std::move(before_exit)),
      stop_event_(make_eventfd()) {}

VcpuLoop::~VcpuLoop() {
    // wait() joins on every normal path; this covers a start that threw.
    if (!threads_.empty()) {
        request_stop(1);
        wait();
    }
}

void VcpuLoop::start() {
    // The kick's handler must be in place before any vCPU thread unblocks it.
    struct sigaction sa {};
    sa.sa_handler = on_kick;
    sigemptyset(&sa.sa_mask);
    if (::sigaction(kKickSignal, &sa, nullptr) != 0) throw_errno("sigaction");
    for (const auto& v : vcpus_) {
        exit_counters_.emplace_back();
        int fd = ::ioctl(v.fd(), KVM_GET_STATS_FD, nullptr);   // Linux 5.14+
        if (fd >= 0) {
            kvm_stats_.emplace_back(fd);
        } else if (kvm_stats_note_.empty()) {
            int err = errno;
            kvm_stats_note_ = std::string("KVM_GET_STATS_FD: ") + std::strerror(err) + " (errno " +
                              std::to_string(err) + "); KVM's own exit counters need Linux 5.14+";
        }
    }
    if (!kvm_stats_note_.empty()) kvm_stats_.clear();
    tsc_start_ = __rdtsc();
    clock_start_ = std::chrono::steady_clock::now();
    started_.store(true, std::memory_order_release);
    std::lock_guard lock(pause_mu_);   // pause() and request_stop() read threads_ under it
    for (std::size_t i = 0; i < vcpus_.size(); ++i)
        threads_.emplace_back([this, i] { thread_main(vcpus_[i], exit_counters_[i]); });
}

ExitStats VcpuLoop::exits() const {
    ExitStats s;
    if (!started_.load(std::memory_order_acquire)) return s;
    // The TSC's rate against CLOCK_MONOTONIC since start(): KVM needs a
    // constant-rate TSC for kvm-clock anyway, and over the VM's life this is
    // exact to a few ppm.
    const std::uint64_t ticks = __rdtsc() - tsc_start_;
    const auto ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - clock_start_).count();
    s.userspace = ExitCounter::sum(exit_counters_, pio_, mmio_, ticks > 0 ? ns / static_cast<double>(ticks) : 0.0);
    s.kvm_note = kvm_stats_note_;
    if (!kvm_stats_.empty()) {
        try {
            std::vector<KvmStat> sum;
            for (const Fd& f : kvm_stats_) add_kvm_stats(sum, read_kvm_stats(f.get()));
            s.kvm = std::move(sum);
        } catch (const std::exception& e) {
            s.kvm_note = e.what();
        }
    }
    return s;
}

int VcpuLoop::wait() {
    std::vector<std::thread> threads;
    {
        // The threads end only once the VM stops; joining them while
        // request_stop still kicks them would race with it.
        std::unique_lock lock(pause_mu_);
        pause_cv_.wait(lock, [&] { return stop_kicked_; });
        // Taken out under the lock: pause() and kick_all() read threads_ under it.
        threads.swap(threads_);
    }
    for (auto& t : threads)
        if (t.joinable()) t.join();
    return status_.load();
}

void VcpuLoop::kick_all() {
    // immediate_exit first, then the signal: a vCPU between its stopping_ or
    // paused_ check and KVM_RUN still returns at once (KVM_CAP_IMMEDIATE_EXIT).
    for (auto& v : vcpus_) v.run_state().immediate_exit = 1;
    for (auto& t : threads_)
        if (t.joinable() && t.get_id() != std::this_thread::get_id()) pthread_kill(t.native_handle(), kKickSignal);
}

void VcpuLoop::request_stop(int status) {
    bool expected = false;
    if (!stopping_.compare_exchange_strong(expected, true)) return;
    status_.store(status);
    {
        std::lock_guard lock(pause_mu_);
        kick_all();
        stop_kicked_ = true;
        pause_cv_.notify_all();   // parked vCPUs wake up and leave, wait() goes on
    }
    std::uint64_t one = 1;
    [[maybe_unused]] ssize_t r = ::write(stop_event_.get(), &one, sizeof one);  // cannot overflow
}

bool VcpuLoop::pause() {
    std::unique_lock lock(pause_mu_);
    if (stopping_.load()) return false;
    paused_.store(true);
    kick_all();
    const std::size_t threads = threads_.size();   // fixed from start() until wait(), which needs stopping_
    const bool parked = pause_cv_.wait_for(lock, std::chrono::seconds(5), [&] {
        return stopping_.load() || parked_ + halted_.load() >= threads;
    }) && !stopping_.load();
    if (!parked) {
        // Failed: do not leave the VM half-paused (the vCPUs that did park,
        // and any that arrive later, would wait for a resume nobody sends).
        paused_.store(false);
        pause_cv_.notify_all();
    }
    return parked;
}

void VcpuLoop::resume() {
    std::lock_guard lock(pause_mu_);
    paused_.store(false);
    pause_cv_.notify_all();
}

void VcpuLoop::park(Vcpu& vcpu) {
    std::unique_lock lock(pause_mu_);
    ++parked_;
    pause_cv_.notify_all();
    pause_cv_.wait(lock, [&] { return !paused_.load() || stopping_.load(); });
    --parked_;
    // Re-arm KVM_RUN; request_stop sets stopping_ before immediate_exit, so
    // checking again after clearing cannot lose a stop.
    vcpu.run_state().immediate_exit = 0;
    if (stopping_.load()) vcpu.run_state().immediate_exit = 1;
}

void VcpuLoop::thread_main(Vcpu& vcpu, ExitCounter& counter) {
    // "vcpu0", "vcpu1", ...: libvirt and Kata find vCPU threads by these names
    // (as Cloud Hypervisor names them) to pin and place them. Named by the
    // thread itself (glibc's prctl(PR_SET_NAME)) before its confinement: the
    // main thread could only write /proc/self/task/TID/comm, which after
    // --user's setresuid (the process no longer dumpable) it may not open.
    const std::string name = "vcpu" + std::to_string(vcpu.id());
    ::pthread_setname_np(::pthread_self(), name.c_str());
    thread_started(ThreadKind::vcpu);
    sigset_t kick;
    sigemptyset(&kick);
    sigaddset(&kick, kKickSignal);
    pthread_sigmask(SIG_UNBLOCK, &kick, nullptr);

    while (!stopping_.load(std::memory_order_relaxed)) {
        if (paused_.load()) {
            park(vcpu);
            continue;
        }
        boot_step(BootStep::first_kvm_run);
        int err = vcpu.run();
        if (err == EINTR || err == EAGAIN) continue;
        if (err != 0) {
            log_msg("vCPU %u: KVM_RUN: %s (errno %d); stopping the VM", vcpu.id(), std::strerror(err), err);
            request_stop(1);
            break;
        }
        if (before_exit_) before_exit_();
        const std::uint64_t t0 = __rdtsc();
        DecodedExit exit = decode_exit(vcpu.run_state(), run_size_);
        ExitOutcome out = handle_exit(exit, pio_, mmio_, vcpu.id());
        counter.record(exit, out, __rdtsc() - t0);
        if (out.what == ExitOutcome::stop) {
            request_stop(out.status);
            break;
        }
        if (out.what == ExitOutcome::halt) {
            // Only without an in-kernel LAPIC does HLT come here: nothing can
            // wake this vCPU, so it is done. The VM ends when all are.
            if (halted_.fetch_add(1) + 1 == vcpus_.size()) request_stop(0);
            break;
        }
    }
}

// A hung guest's post-mortem, like QEMU's `info registers` and `info lapic`.
// A vector left in service masks every interrupt at or below its priority
// class: that is how a lost EOI looks.
std::string describe_vcpu(const Vcpu& v) {
    static constexpr const char* kMpStates[] = {"runnable", "uninitialized", "init-received", "halted", "sipi-received"};
    kvm_mp_state mp{};
    const char* state = ::ioctl(v.fd(), KVM_GET_MP_STATE, &mp) != 0 ? "unknown"
                        : mp.mp_state < std::size(kMpStates)         ? kMpStates[mp.mp_state]
                                                                      : "other";
    auto highest = [](const kvm_lapic_state& l, unsigned base) {   // 8 registers of 32 bits, 16 bytes apart
        for (int i = 7; i >= 0; --i) {
            std::uint32_t w;
            std::memcpy(&w, l.regs + base + 16 * i, 4);
            if (w != 0) return std::to_string(32 * i + 31 - __builtin_clz(w));
        }
        return std::string("none");
    };
    try {
        const kvm_regs r = v.get_regs();
        const kvm_lapic_state l = v.get_lapic();
        char line[160];
        std::snprintf(line, sizeof line, "rip 0x%llx, %s, LAPIC in service %s, pending %s",
                      static_cast<unsigned long long>(r.rip), state, highest(l, 0x100).c_str(), highest(l, 0x200).c_str());
        return line;
    } catch (const std::exception& e) {
        return std::string(state) + " (" + e.what() + ")";
    }
}

// kvm_para.h; bit 0 of each is its enable bit. Evidence, from outside, that
// a Linux guest uses kvmclock, steal time, PV EOI and async page faults.
std::string pv_msrs_enabled(const Vcpu& v) {
    static constexpr std::pair<std::uint32_t, const char*> kPvMsrs[] = {
        {0x4b564d01, "kvmclock"}, {0x4b564d03, "steal-time"}, {0x4b564d04, "pv-eoi"}, {0x4b564d02, "async-pf"}};
    std::vector<std::uint32_t> idx;
    for (const auto& m : kPvMsrs) idx.push_back(m.first);
    std::string used;
    for (const auto& e : v.get_msrs(idx))
        for (const auto& m : kPvMsrs)
            if (m.first == e.index && (e.data & 1)) used += std::string(used.empty() ? "" : " ") + m.second;
    return used.empty() ? "none" : used;
}

} // namespace kguest
