// Port 0x80's in-kernel write path (devices/port80.hpp has the device and
// why): Port80Absorber registers coalesced PIO (preferred) or an ioeventfd
// for port 0x80 and feeds what KVM absorbed into the Port80's counters.
//
// Threading: drain() and sync() from any thread; one mutex keeps the ring's
// consumer index and the eventfd read in order.
#pragma once

#include "devices/base/fd.hpp"
#include "devices/port80.hpp"
#include "vmm/kvm_uapi.hpp"

#include <mutex>

namespace kguest {

class Kvm;
class Vm;
class Vcpu;

class Port80Absorber {
public:
    explicit Port80Absorber(Port80& port) : port_(port) {}
    Port80Absorber(const Port80Absorber&) = delete;
    Port80Absorber& operator=(const Port80Absorber&) = delete;

    // Registers coalesced PIO (the ring page of `vcpu`'s mapping) when the
    // host has it, else an ioeventfd. False (nothing changes) when KVM refuses
    // both; userspace exits then serve every write.
    bool absorb(const Kvm& kvm, Vm& vm, const Vcpu& vcpu);
    // Reads writes from `ring` from now on (absorb does this after KVM
    // accepted the zone; unit tests hand it a made-up ring page).
    void attach_ring(kvm_coalesced_mmio_ring* ring);
    // Takes the queued coalesced writes (a no-op without a ring). Call it
    // before handling an exit, so that the codes stay in order.
    void drain();

private:
    void sync();   // drain() plus the ioeventfd's counter

    Port80& port_;
    std::mutex mu_;
    Fd eventfd_;
    kvm_coalesced_mmio_ring* ring_ = nullptr;  // shared with KVM: it writes `last`, we write `first`
};

} // namespace kguest
