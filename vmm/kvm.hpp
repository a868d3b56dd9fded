// The KVM API in three owning types, as rust-vmm splits it: `Kvm` is the open
// /dev/kvm (system ioctls), `Vm` is one virtual machine (VM ioctls), `Vcpu` is
// one virtual CPU with its shared `kvm_run` page (vCPU ioctls). A Vm outlives
// its Vcpus by the caller's convention (the Machine declares it first).
//
// Every setup ioctl throws SysError naming the ioctl; guest-driven ones
// (noexcept below, and `Vcpu::run`) return the errno instead.
#pragma once

#include "devices/base/fd.hpp"

#include <cstdint>
#include "vmm/kvm_uapi.hpp"
#include <string>
#include <vector>

namespace kguest {

class Vm;
class Vcpu;

// A non-blocking, close-on-exec eventfd (ioeventfds, irqfds, wake-ups).
Fd make_eventfd();

class Kvm {
public:
    // Opens the device and insists on KVM_API_VERSION 12 (the only stable one).
    explicit Kvm(const std::string& path = "/dev/kvm");

    // KVM_CHECK_EXTENSION on the system fd: 0 when absent, else a cap-specific value.
    int check_extension(long cap) const;
    // Throws, naming the capability, when the host KVM lacks it.
    void require_extension(long cap, const char* name) const;
    std::size_t vcpu_mmap_size() const;
    // KVM_GET_SUPPORTED_CPUID: every leaf KVM can virtualise on this host.
    std::vector<kvm_cpuid_entry2> supported_cpuid() const;
    Vm create_vm() const;

private:
    Fd fd_;
};

class Vm {
public:
    Vm(Fd fd, std::size_t vcpu_mmap_size) : fd_(std::move(fd)), vcpu_mmap_size_(vcpu_mmap_size) {}

    int check_extension(long cap) const;
    void set_user_memory_region(std::uint32_t slot, std::uint64_t gpa, std::uint64_t size,
                                void* host, std::uint32_t flags = 0);
    void set_tss_addr(std::uint64_t addr);
    void set_identity_map_addr(std::uint64_t addr);
    void create_irqchip();
    void create_pit2();
    // KVM_IOEVENTFD: a matching guest write signals an eventfd instead of exiting.
    void ioeventfd(const kvm_ioeventfd& spec);
    // The same for guest-driven paths (a PCI BAR moved): the errno, or 0.
    int try_ioeventfd(const kvm_ioeventfd& spec) noexcept;
    // KVM_IRQFD: writing `eventfd` raises GSI `gsi` inside the kernel.
    void irqfd(int eventfd, std::uint32_t gsi);
    // KVM_SET_GSI_ROUTING: replaces the VM's whole GSI routing table
    // (irqchip pins and MSI messages).
    int set_gsi_routing(const std::vector<kvm_irq_routing_entry>& entries) noexcept;
    // KVM_REGISTER_COALESCED_MMIO, pio = 1: port writes are queued in the ring, not exits.
    void register_coalesced_pio(std::uint16_t port, std::uint32_t len);
    // KVM_IRQ_LINE on the in-kernel PIC/IOAPIC.
    int irq_line(std::uint32_t irq, bool level) noexcept;
    Vcpu create_vcpu(unsigned id) const;

private:
    Fd fd_;
    std::size_t vcpu_mmap_size_;
};

class Vcpu {
public:
    Vcpu(Fd fd, Mapping run, unsigned id) : fd_(std::move(fd)), run_(std::move(run)), id_(id) {}

    int fd() const { return fd_.get(); }
    unsigned id() const { return id_; }
    kvm_run& run_state() const { return *static_cast<kvm_run*>(run_.get()); }

    // KVM_RUN once: 0 after an exit to decode in run_state(), or the errno (EINTR: kicked).
    int run();

    kvm_regs get_regs() const;
    void set_regs(const kvm_regs& r);
    kvm_sregs get_sregs() const;
    void set_sregs(const kvm_sregs& s);
    void set_fpu(const kvm_fpu& f);
    void set_cpuid(const std::vector<kvm_cpuid_entry2>& entries);
    // KVM_GET_MSRS: the values of `indices`, in order, up to the first one
    // KVM cannot read (so the result may be shorter). Never throws.
    std::vector<kvm_msr_entry> get_msrs(const std::vector<std::uint32_t>& indices) const;
    kvm_lapic_state get_lapic() const;
    void set_lapic(const kvm_lapic_state& l);

private:
    Fd fd_;
    Mapping run_;
    unsigned id_;
};

} // namespace kguest
