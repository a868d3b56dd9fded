// The boot timeline: when this process reached each step of bringing a guest
// up, from its own start to the guest's first line of user space, so a slow
// boot shows where the time went (`kguest run --boot-timeline`).
//
// One timeline per process (a kguest process runs one VM). Each step keeps the
// first time it was reached; later marks are ignored. The clock is
// CLOCK_MONOTONIC, from the static initialisation of this file (before main).
//
// Threading: boot_step() is lock-free and safe from any thread; it costs one
// relaxed load once the step is set, so hot paths (KVM_RUN, serial output)
// may call it every time. boot_console_output() must be called by one thread
// at a time (the serial device calls it under its lock).
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace kguest {

enum class BootStep {
    ram_mapped,          // guest RAM mapped in this process
    kernel_loaded,       // kernel, initrd, command line and ACPI tables in guest RAM
    kvm_ready,           // VM created with its irqchip and PIT
    vm_built,            // memory slots, devices and vCPUs set up
    first_kvm_run,       // the first KVM_RUN entered
    first_serial_byte,   // the guest's first byte on COM1
    init_first_line,     // Linux: the first line on COM1 after "Run ... as init process"
    count
};

void boot_step(BootStep step);

// Watches the console output for the serial steps.
void boot_console_output(std::uint8_t byte);

// One line per step reached: "  +12.3 ms  KVM ready", ordered by time.
std::string boot_timeline_report();

} // namespace kguest
