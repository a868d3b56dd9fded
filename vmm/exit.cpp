// Exit decoding and dispatch (see exit.hpp).
#include "vmm/exit.hpp"
#include "devices/base/log.hpp"

namespace kguest {

DecodedExit decode_exit(kvm_run& run, std::size_t run_size) {
    DecodedExit e;
    e.reason = run.exit_reason;
    switch (run.exit_reason) {
    case KVM_EXIT_IO: {
        e.kind = ExitKind::io;
        e.write = run.io.direction == KVM_EXIT_IO_OUT;
        e.addr = run.io.port;
        e.size = run.io.size;
        e.count = run.io.count;
        // KVM batches `rep ins/outs` into one exit with count elements at
        // data_offset; checked to fit the page rather than trusted.
        std::uint64_t bytes = std::uint64_t(e.size) * e.count;
        if ((e.size != 1 && e.size != 2 && e.size != 4) || run.io.data_offset > run_size ||
            bytes > run_size - run.io.data_offset) {
            e.kind = ExitKind::malformed;
            break;
        }
        e.data = reinterpret_cast<std::uint8_t*>(&run) + run.io.data_offset;
        break;
    }
    case KVM_EXIT_MMIO:
        e.kind = ExitKind::mmio;
        e.write = run.mmio.is_write != 0;
        e.addr = run.mmio.phys_addr;
        e.size = run.mmio.len;
        e.count = 1;
        e.data = run.mmio.data;
        if (e.size == 0 || e.size > sizeof run.mmio.data) e.kind = ExitKind::malformed;
        break;
    case KVM_EXIT_HLT: e.kind = ExitKind::hlt; break;
    case KVM_EXIT_SHUTDOWN: e.kind = ExitKind::shutdown; break;
    case KVM_EXIT_SYSTEM_EVENT:
        e.kind = ExitKind::system_event;
        e.detail = run.system_event.type;
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        e.kind = ExitKind::internal_error;
        e.detail = run.internal.suberror;
        e.count = run.internal.ndata;
        if (run.internal.ndata > 0) e.addr = run.internal.data[0];
        break;
    case KVM_EXIT_FAIL_ENTRY:
        e.kind = ExitKind::fail_entry;
        e.detail = run.fail_entry.hardware_entry_failure_reason;
        break;
    case KVM_EXIT_INTR: e.kind = ExitKind::intr; break;
    default: e.kind = ExitKind::unknown; break;
    }
    return e;
}

static RateLimit unclaimed_pio_log, unclaimed_mmio_log, odd_exit_log;

ExitOutcome handle_exit(const DecodedExit& e, const Bus& pio, const Bus& mmio, unsigned vcpu_id) {
    switch (e.kind) {
    case ExitKind::io:
    case ExitKind::mmio: {
        const Bus& bus = e.kind == ExitKind::io ? pio : mmio;
        bool claimed = true;
        for (std::uint32_t i = 0; i < e.count; ++i) {
            std::uint8_t* p = e.data + std::size_t(i) * e.size;
            claimed = e.write ? bus.write(e.addr, {p, e.size}) : bus.read(e.addr, {p, e.size});
            if (!claimed) {
                // Fill (or drop) the rest of a rep batch without a lookup each.
                if (!e.write)
                    for (std::uint32_t j = i + 1; j < e.count; ++j)
                        bus.read(e.addr, {e.data + std::size_t(j) * e.size, e.size});
                break;
            }
        }
        if (!claimed) {
            if (e.kind == ExitKind::io)
                KGUEST_LOG_LIMITED(unclaimed_pio_log, "vCPU %u: unclaimed port %s %#llx (size %u, count %u)",
                                   vcpu_id, e.write ? "write" : "read",
                                   static_cast<unsigned long long>(e.addr), e.size, e.count);
            else
                KGUEST_LOG_LIMITED(unclaimed_mmio_log, "vCPU %u: unclaimed MMIO %s %#llx (size %u)", vcpu_id,
                                   e.write ? "write" : "read", static_cast<unsigned long long>(e.addr), e.size);
        }
        return {};
    }
    case ExitKind::intr: return {};
    case ExitKind::hlt: return {ExitOutcome::halt, 0};
    case ExitKind::shutdown:
        log_msg("vCPU %u: guest triple fault (KVM_EXIT_SHUTDOWN); stopping the VM", vcpu_id);
        return {ExitOutcome::stop, 1};
    case ExitKind::system_event:
        // Like Firecracker, a reboot request ends the VM: nothing to reboot into.
        if (e.detail == KVM_SYSTEM_EVENT_SHUTDOWN || e.detail == KVM_SYSTEM_EVENT_RESET)
            return {ExitOutcome::stop, 0};
        log_msg("vCPU %u: guest system event %llu (crash or unknown); stopping the VM", vcpu_id,
                static_cast<unsigned long long>(e.detail));
        return {ExitOutcome::stop, 1};
    case ExitKind::internal_error:
        log_msg("vCPU %u: KVM internal error, suberror %llu (%u data words, first %#llx); stopping the VM",
                vcpu_id, static_cast<unsigned long long>(e.detail), e.count,
                static_cast<unsigned long long>(e.addr));
        return {ExitOutcome::stop, 1};
    case ExitKind::fail_entry:
        log_msg("vCPU %u: KVM_EXIT_FAIL_ENTRY, hardware reason %#llx; stopping the VM", vcpu_id,
                static_cast<unsigned long long>(e.detail));
        return {ExitOutcome::stop, 1};
    case ExitKind::malformed:
        KGUEST_LOG_LIMITED(odd_exit_log, "vCPU %u: malformed exit (reason %u, size %u, count %u) ignored",
                           vcpu_id, e.reason, e.size, e.count);
        return {};
    case ExitKind::unknown:
        log_msg("vCPU %u: unexpected exit reason %u; stopping the VM", vcpu_id, e.reason);
        return {ExitOutcome::stop, 1};
    }
    return {};
}

} // namespace kguest
