// `kguest run`: one VM from start to exit report. Builds the Machine, then,
// with SIGINT/SIGTERM/SIGHUP blocked and read from a signalfd by the calling
// thread, starts the control API (its own thread), the console input and the
// vCPUs; waits for the VM to end or a signal to arrive; and logs the exit
// report (where each vCPU was when stopped by a signal, the PV MSRs the guest
// enabled, port 0x80's and each virtio-net device's counters). The process is
// confined once set-up is done (vmm/app/confine.hpp has the order).
#pragma once

#include "vmm/app/confine.hpp"

namespace kguest {

struct VmConfig;

// Returns the VM's exit status (128 + N when stopped by signal N). Throws on
// host set-up failures (UsageError for the user's).
int run_vm(const VmConfig& cfg, const ConfineOptions& confine = {});

} // namespace kguest
