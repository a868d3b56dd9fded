// `kguest run`: one VM from start to exit report; `kguest --api-socket ...`:
// a bare VMM whose VMs Cloud Hypervisor's API creates and boots
// (vmm/app/lifecycle.hpp has the state machine and who owns what). Builds the Machine, then,
// with SIGINT/SIGTERM/SIGHUP blocked and read from a signalfd by the calling
// thread, starts the control API (its own thread), the console input and the
// vCPUs; waits for the VM to end or a signal to arrive; and logs the exit
// report (where each vCPU was when stopped by a signal, the PV MSRs the guest
// enabled, port 0x80's and each virtio-net device's counters). The process is
// confined once set-up is done (vmm/app/confine.hpp has the order).
#pragma once

#include "vmm/app/confine.hpp"
#include "vmm/app/events.hpp"

#include <optional>
#include <string>

namespace kguest {

struct VmConfig;

// Returns the VM's exit status (128 + N when stopped by signal N). Throws on
// host set-up failures (UsageError for the user's).
int run_vm(const VmConfig& cfg, const ConfineOptions& confine = {});

struct BareVmmOptions {
    PathOrFd api;                                // --api-socket path=PATH | fd=N
    std::optional<std::string> event_monitor;    // --event-monitor path=PATH | fd=N
    ConfineOptions confine;
};
// Serves the API until vmm.shutdown (0) or a stop signal (128 + N). Throws
// on set-up failures (UsageError for the user's).
int run_bare_vmm(const BareVmmOptions& options);

} // namespace kguest
