// Where a virtio-pci device (devices/virtio_pci.hpp, which knows nothing of
// KVM) meets KVM, so that its data path needs no exit to userspace:
//
//   - interrupts: each MSI-X vector gets a GSI with an MSI route and an irqfd.
//     The route is (re)programmed lazily, when a vector fires with a message
//     KVM does not have yet. INTx is a level on an IOAPIC pin, 16-23.
//   - kicks: each queue's notify address gets a KVM_IOEVENTFD when the device
//     takes the eventfds; otherwise a kick is an MMIO exit.
//   - the BAR: inserted on the MMIO bus wherever the guest puts it (kguest
//     pre-assigns it, as no firmware runs), the ioeventfds moved along. A BAR
//     over guest RAM, the LAPIC/IOAPIC range or another device is not mapped.
#pragma once

#include "devices/pci.hpp"
#include "devices/virtio_pci.hpp"
#include "devices/base/bus.hpp"
#include "devices/base/fd.hpp"
#include "devices/base/guest_memory.hpp"
#include "vmm/kvm.hpp"
#include "devices/base/log.hpp"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace kguest {

// The VM's GSI routing table, kept whole for KVM_SET_GSI_ROUTING: KVM's
// default irqchip routes (virt/kvm/irq_comm.c) plus one MSI route per GSI.
class GsiRouter {
public:
    static constexpr std::uint32_t kFirstMsiGsi = 24;
    explicit GsiRouter(Vm& vm) : vm_(vm), intx_([&vm](unsigned gsi, bool level) { return vm.irq_line(gsi, level); }) {}
    // Setup time: a fresh GSI for an MSI route (no route until set_msi).
    std::uint32_t alloc_msi_gsi();
    // Points `gsi` at an MSI message and commits the table; the errno, or 0.
    int set_msi(std::uint32_t gsi, std::uint64_t address, std::uint32_t data) noexcept;
    // The INTx pins 16-23, which slots share (devices/pci.hpp).
    IntxLines& intx() { return intx_; }

private:
    std::vector<kvm_irq_routing_entry> table_locked() const;
    Vm& vm_;
    IntxLines intx_;
    std::mutex mu_;
    std::uint32_t next_gsi_ = kFirstMsiGsi;
    struct Msi { std::uint32_t gsi; std::uint64_t address; std::uint32_t data; bool set; };
    std::vector<Msi> msi_;
};

// One virtio device on PCI bus 0, wired to KVM.
class VirtioPciSlot {
public:
    // Throws on host setup failures. `bar_gpa` is the pre-assigned BAR.
    VirtioPciSlot(Vm& vm, GsiRouter& router, Bus& mmio, GuestMemory& mem, PciHostBridge& bridge,
                  std::shared_ptr<VirtioDevice> device, std::uint32_t class_code, unsigned slot,
                  std::uint64_t bar_gpa);
    VirtioPciSlot(const VirtioPciSlot&) = delete;
    VirtioPciSlot& operator=(const VirtioPciSlot&) = delete;

    bool ioeventfds() const { return !notify_fds_.empty(); }
    std::uint64_t msi_count() const;
    std::uint64_t intx_count() const;

private:
    class Irqs;
    // The BAR hook: unmap, then map at `gpa` when decode is on (guest-driven).
    void map_bar(std::uint64_t gpa, bool decode) noexcept;
    void set_ioeventfds(std::uint64_t bar, bool assign) noexcept;

    Vm& vm_;
    Bus& mmio_;
    GuestMemory& mem_;
    std::shared_ptr<Irqs> irqs_;
    // Declared before pci_: the device (and its thread) goes first.
    std::vector<Fd> notify_fds_;   // one per queue, when the device took them
    std::shared_ptr<VirtioPciDevice> pci_;
    bool ioeventfd_any_length_ = false;
    std::mutex bar_mu_;
    std::uint64_t mapped_ = 0;     // BAR address on the MMIO bus, 0 if none
    std::string bar_name_;         // "virtio-net 00:01.0", for exit statistics
    RateLimit log_limit_{5};
};

} // namespace kguest
