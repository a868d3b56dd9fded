// Turning a KVM exit into work. decode_exit() reads and validates the shared
// kvm_run page into a plain struct; handle_exit() maps that struct and the
// buses to an outcome, so unit tests can drive both without KVM.
//
// And counting exits, as kvm_stat and `perf kvm` do: ExitCounter keeps one
// vCPU's userspace exits by reason (which device, which unclaimed port) with
// their handling time; parse_kvm_stats reads the counters of the exits KVM
// handles itself from a KVM_GET_STATS_FD file (Documentation/virt/kvm/api.rst).
#pragma once

#include "devices/base/bus.hpp"

#include <atomic>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>
#include "vmm/kvm_uapi.hpp"

namespace kguest {

enum class ExitKind {
    io,             // KVM_EXIT_IO: port I/O, possibly a `rep ins/outs` batch
    mmio,           // KVM_EXIT_MMIO
    hlt,            // KVM_EXIT_HLT (only without an in-kernel LAPIC)
    shutdown,       // KVM_EXIT_SHUTDOWN: triple fault
    system_event,   // KVM_EXIT_SYSTEM_EVENT: PSCI-style shutdown/reset/crash
    internal_error, // KVM_EXIT_INTERNAL_ERROR: KVM could not emulate something
    fail_entry,     // KVM_EXIT_FAIL_ENTRY: invalid guest state
    intr,           // KVM_EXIT_INTR: a signal interrupted the run
    malformed,      // a kvm_run page whose I/O fields do not fit the page
    unknown,
};

struct DecodedExit {
    ExitKind kind = ExitKind::unknown;
    std::uint32_t reason = 0;   // raw exit_reason
    bool write = false;
    std::uint64_t addr = 0;     // port or guest-physical address
    std::uint32_t size = 0;     // bytes per access
    std::uint32_t count = 0;    // accesses (rep count for I/O, 1 for MMIO)
    std::uint8_t* data = nullptr;  // count * size bytes inside the kvm_run page
    std::uint64_t detail = 0;   // suberror, hardware entry failure reason, event type
};

// `run_size` is the kvm_run mapping's size (KVM_GET_VCPU_MMAP_SIZE), which I/O data must fit.
DecodedExit decode_exit(kvm_run& run, std::size_t run_size);

struct ExitOutcome {
    enum What { resume, halt, stop } what = resume;
    int status = 0;  // for stop: the VM's exit status
    std::uint32_t range = Bus::kNoRange;  // the bus range I/O or MMIO went to
};

// Dispatches I/O and MMIO to the buses, logging unclaimed accesses (rate-limited). Never throws.
ExitOutcome handle_exit(const DecodedExit& exit, const Bus& pio, const Bus& mmio, unsigned vcpu_id);

struct ExitCount {
    std::string reason;   // a bus range's name, "unclaimed port 0x70", "shutdown", ...
    std::uint64_t count = 0, handling_ns = 0;
};
// One KVM binary statistic, by its KVM name ("exits", "halt_exits", ...).
struct KvmStat {
    std::string name;
    std::uint64_t value = 0;
};
struct ExitStats {
    std::vector<ExitCount> userspace;          // most frequent first
    std::optional<std::vector<KvmStat>> kvm;   // summed over vCPUs; absent when unreadable
    std::string kvm_note;                      // why kvm is absent
};

// One vCPU's userspace exits. record() belongs to that vCPU's thread and
// allocates only for a reason it has not seen before; sum() may run on any
// thread meanwhile. Only such a first insert and sum() share a lock (per
// vCPU, held for a copy of the counts), so no vCPU contends with another.
//
// Handling time is counted in TSC ticks (the caller's two RDTSCs around the
// handling) and turned into ns only by sum(): a clock_gettime pair on every
// exit costs more than a bare exit can afford to lose.
class ExitCounter {
public:
    void record(const DecodedExit& e, const ExitOutcome& out, std::uint64_t handling_ticks);
    // The reasons of all counters `c` together, named from the buses, most
    // frequent first; handling_ns = ticks * `ns_per_tick`.
    static std::vector<ExitCount> sum(const std::deque<ExitCounter>& c, const Bus& pio, const Bus& mmio,
                                      double ns_per_tick);

private:
    struct Entry {
        std::atomic<std::uint64_t> count{0}, ticks{0};   // one writer: relaxed loads and stores
    };
    std::unordered_map<std::uint64_t, Entry> entries_;   // by exit_key() (exit.cpp)
    // The owner's last reason (exits come in runs of one kind): no hash lookup
    // then. Nodes of an unordered_map stay put when it grows.
    std::uint64_t last_key_ = ~std::uint64_t{0};
    Entry* last_ = nullptr;
    mutable std::mutex insert_mu_;   // inserts vs sum(); lookups by the owner need none
};

// The cumulative single-value counters in one KVM_GET_STATS_FD file image,
// in KVM's order. Throws std::runtime_error when it is truncated.
std::vector<KvmStat> parse_kvm_stats(std::span<const std::uint8_t> file);
// Reads and parses a stats fd (pread from 0: reusable). Throws SysError.
std::vector<KvmStat> read_kvm_stats(int stats_fd);
// Adds `from` into `into` by name; new names go last.
void add_kvm_stats(std::vector<KvmStat>& into, const std::vector<KvmStat>& from);

} // namespace kguest
