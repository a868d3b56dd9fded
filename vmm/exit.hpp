// Turning a KVM exit into work. decode_exit() reads and validates the shared
// kvm_run page into a plain struct; handle_exit() maps that struct and the
// buses to an outcome, so unit tests can drive both without KVM.
#pragma once

#include "devices/base/bus.hpp"

#include <cstdint>
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
};

// Dispatches I/O and MMIO to the buses, logging unclaimed accesses (rate-limited). Never throws.
ExitOutcome handle_exit(const DecodedExit& exit, const Bus& pio, const Bus& mmio, unsigned vcpu_id);

} // namespace kguest
