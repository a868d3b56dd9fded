// The vCPU threads: one per vCPU, each looping KVM_RUN -> decode_exit ->
// handle_exit until the VM stops. Pause parks every thread outside KVM_RUN;
// stop ends them. A thread is kicked out of KVM_RUN by immediate_exit plus a
// signal (SIGUSR1, whose handler does nothing: KVM_RUN returns EINTR).
//
// Each thread counts its userspace exits and their handling time (its own
// ExitCounter, vmm/exit.hpp); exits() adds KVM's counters from each vCPU's
// KVM_GET_STATS_FD.
//
// Threading: request_stop, pause, resume and the queries may be called from
// any thread; start and wait belong to the thread that owns the loop. No vCPU
// thread ever waits for another thread except while parked.
#pragma once

#include "devices/base/fd.hpp"
#include "vmm/exit.hpp"
#include "vmm/kvm.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace kguest {

class Bus;

class VcpuLoop {
public:
    // `vcpus`, the buses and `before_exit` (called on a vCPU thread before
    // each exit is handled) must outlive the loop.
    VcpuLoop(std::vector<Vcpu>& vcpus, std::size_t run_size, const Bus& pio, const Bus& mmio,
             std::function<void()> before_exit);
    ~VcpuLoop();   // a loop still running is stopped (status 1) and joined
    VcpuLoop(const VcpuLoop&) = delete;
    VcpuLoop& operator=(const VcpuLoop&) = delete;

    // Starts one thread per vCPU. Call once.
    void start();
    // Stops the VM with `status` (the first request wins).
    void request_stop(int status);
    // Parks every vCPU thread outside KVM_RUN; false, with the VM left
    // running (paused() false), if it is stopping or they did not park within
    // 5 s. resume() lets them go on.
    bool pause();
    void resume();
    bool paused() const { return paused_.load(); }
    // An eventfd that becomes readable when the VM stops (for poll).
    int stop_fd() const { return stop_event_.get(); }
    // Joins the vCPU threads (they end when the VM stops); returns the status.
    int wait();
    // The exits so far, summed over the vCPUs (empty before start).
    ExitStats exits() const;

private:
    void kick_all();   // with pause_mu_ held
    void park(Vcpu& vcpu);
    void thread_main(Vcpu& vcpu, ExitCounter& counter);

    std::vector<Vcpu>& vcpus_;
    std::size_t run_size_;
    const Bus& pio_;
    const Bus& mmio_;
    std::function<void()> before_exit_;
    std::vector<std::thread> threads_;
    Fd stop_event_;
    std::atomic<bool> stopping_{false};
    std::atomic<int> status_{0};
    std::atomic<unsigned> halted_{0};
    std::mutex pause_mu_;
    std::condition_variable pause_cv_;
    std::atomic<bool> paused_{false};
    unsigned parked_ = 0;   // vCPU threads waiting in park() (pause_mu_)
    bool stop_kicked_ = false;   // request_stop is done with threads_ (pause_mu_)
    // Set up by start() before started_, then only read (the counters change inside).
    std::deque<ExitCounter> exit_counters_;   // one per vCPU
    std::vector<Fd> kvm_stats_;               // one per vCPU, or none
    std::string kvm_stats_note_;              // why there are none
    std::uint64_t tsc_start_ = 0;             // the TSC and the clock at start(), to
    std::chrono::steady_clock::time_point clock_start_;   // turn handling ticks into ns
    std::atomic<bool> started_{false};
};

// Where a vCPU stands, for the log when the VM is stopped from outside: RIP,
// the MP state and the highest LAPIC vectors in service and pending.
std::string describe_vcpu(const Vcpu& v);
// The KVM paravirt MSRs the guest enabled on `v`, space-separated ("none").
std::string pv_msrs_enabled(const Vcpu& v);

} // namespace kguest
