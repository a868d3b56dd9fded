// virtio-pci devices wired to KVM: MSI routes with irqfds, ioeventfd kicks and
// the BAR on the MMIO bus. See virtio_kvm.hpp for the design.
#include "vmm/virtio_kvm.hpp"
#include "vmm/board.hpp"

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <unistd.h>

namespace kguest {

std::uint32_t GsiRouter::alloc_msi_gsi() {
    std::lock_guard lock(mu_);
    msi_.push_back({next_gsi_, 0, 0, false});
    return next_gsi_++;
}

std::vector<kvm_irq_routing_entry> GsiRouter::table_locked() const {
    std::vector<kvm_irq_routing_entry> t;
    auto irqchip = [&](std::uint32_t gsi, std::uint32_t chip, std::uint32_t pin) {
        kvm_irq_routing_entry e{};
        e.gsi = gsi;
        e.type = KVM_IRQ_ROUTING_IRQCHIP;
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        t.push_back(e);
    };
    for (std::uint32_t gsi = 0; gsi < 24; ++gsi) {
        irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi);
        if (gsi < 16) irqchip(gsi, gsi < 8 ? KVM_IRQCHIP_PIC_MASTER : KVM_IRQCHIP_PIC_SLAVE, gsi % 8);
    }
    for (const auto& m : msi_) {
        if (!m.set) continue;
        kvm_irq_routing_entry e{};
        e.gsi = m.gsi;
        e.type = KVM_IRQ_ROUTING_MSI;
        e.u.msi.address_lo = static_cast<std::uint32_t>(m.address);
        e.u.msi.address_hi = static_cast<std::uint32_t>(m.address >> 32);
        e.u.msi.data = m.data;
        t.push_back(e);
    }
    return t;
}

int GsiRouter::set_msi(std::uint32_t gsi, std::uint64_t address, std::uint32_t data) noexcept {
    std::lock_guard lock(mu_);
    for (auto& m : msi_) {
        if (m.gsi != gsi) continue;
        if (m.set && m.address == address && m.data == data) return 0;
        m = {gsi, address, data, true};
        return vm_.set_gsi_routing(table_locked());
    }
    return EINVAL;
}

// VirtioInterrupts backed by irqfds (MSI-X) and KVM_IRQ_LINE (INTx). Called
// under the transport's interrupt lock, from vCPU and device threads.
class VirtioPciSlot::Irqs : public VirtioInterrupts {
public:
    Irqs(Vm& vm, GsiRouter& router, std::uint16_t vectors, unsigned slot)
        : vm_(vm), router_(router), slot_(slot) {
        for (std::uint16_t v = 0; v < vectors; ++v) {
            fds_.push_back(make_eventfd());
            gsis_.push_back(router_.alloc_msi_gsi());
            vm_.irqfd(fds_.back().get(), gsis_.back());
        }
    }

    void msix(std::uint16_t vector, std::uint64_t address, std::uint32_t data) override {
        if (vector >= fds_.size()) return;
        // The route follows the table entry; KVM re-reads it for the irqfd.
        if (int err = router_.set_msi(gsis_[vector], address, data)) {
            KGUEST_LOG_LIMITED(limit_, "virtio-pci: KVM_SET_GSI_ROUTING for vector %u: %s (errno %d); interrupt dropped",
                               vector, std::strerror(err), err);
            return;
        }
        std::uint64_t one = 1;
        if (::write(fds_[vector].get(), &one, sizeof one) < 0 && errno != EAGAIN)
            KGUEST_LOG_LIMITED(limit_, "virtio-pci: write(irqfd): %s (errno %d)", std::strerror(errno), errno);
        msi_count_.fetch_add(1, std::memory_order_relaxed);
    }

    void intx(bool level) override {
        if (int err = router_.intx().set(slot_, level))
            KGUEST_LOG_LIMITED(limit_, "virtio-pci: KVM_IRQ_LINE %u: %s (errno %d)", pci::intx_gsi(slot_),
                               std::strerror(err), err);
        if (level) intx_count_.fetch_add(1, std::memory_order_relaxed);
    }

    std::uint64_t msi_count() const { return msi_count_.load(std::memory_order_relaxed); }
    std::uint64_t intx_count() const { return intx_count_.load(std::memory_order_relaxed); }

private:
    Vm& vm_;
    GsiRouter& router_;
    unsigned slot_;
    std::vector<Fd> fds_;
    std::vector<std::uint32_t> gsis_;
    std::atomic<std::uint64_t> msi_count_{0}, intx_count_{0};
    RateLimit limit_{5};
};

VirtioPciSlot::VirtioPciSlot(Vm& vm, GsiRouter& router, Bus& mmio, GuestMemory& mem, PciHostBridge& bridge,
                             std::shared_ptr<VirtioDevice> device, std::uint32_t class_code, unsigned slot,
                             std::uint64_t bar_gpa)
    : vm_(vm), mmio_(mmio), mem_(mem) {
    const std::uint32_t intx = pci::intx_gsi(slot);
    const auto queues = device->num_queues();
    irqs_ = std::make_shared<Irqs>(vm, router, static_cast<std::uint16_t>(queues + 1), slot);
    auto dev = device;
    const std::uint16_t id = dev->device_id();
    const char* kind = id == 1 ? "virtio-net" : id == 5 ? "virtio-balloon" : "virtio";
    char name[40];
    std::snprintf(name, sizeof name, "%s 00:%02x.0", kind, slot);
    bar_name_ = name;
    pci_ = std::make_shared<VirtioPciDevice>(std::move(device), mem, irqs_, class_code);
    pci_->set_config(pci::kInterruptLine, 1, intx);

    // One eventfd per queue for KVM_IOEVENTFD, if the device polls them.
    std::vector<Fd> fds;
    std::vector<int> raw;
    for (std::uint16_t q = 0; q < queues; ++q) {
        fds.push_back(make_eventfd());
        raw.push_back(fds.back().get());
    }
    if (dev->take_notify_fds(raw)) notify_fds_ = std::move(fds);
    ioeventfd_any_length_ = vm.check_extension(KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0;

    pci_->set_bar_hook([this](std::uint64_t gpa, bool decode) { map_bar(gpa, decode); });
    bridge.add_function(slot, pci_);
    // Pre-assign the BAR the way a guest would (64-bit BAR: low, then high
    // half) and turn on memory decode and bus mastering; the hooks map it.
    const unsigned bar = pci::kBar0 + 4 * VirtioPciDevice::kBar;
    pci_->config_write(bar, 4, static_cast<std::uint32_t>(bar_gpa));
    pci_->config_write(bar + 4, 4, static_cast<std::uint32_t>(bar_gpa >> 32));
    pci_->config_write(pci::kCommand, 2, pci::kCommandMemory | pci::kCommandMaster);
    if (mapped_ != bar_gpa) throw std::runtime_error("virtio-pci: could not map the BAR of slot " + std::to_string(slot));
}

std::uint64_t VirtioPciSlot::msi_count() const { return irqs_->msi_count(); }
std::uint64_t VirtioPciSlot::intx_count() const { return irqs_->intx_count(); }

void VirtioPciSlot::set_ioeventfds(std::uint64_t bar, bool assign) noexcept {
    for (std::size_t q = 0; q < notify_fds_.size(); ++q) {
        kvm_ioeventfd spec{};
        spec.addr = bar + VirtioPciDevice::kNotifyOffset + q * VirtioPciDevice::kNotifyOffMultiplier;
        // 4.1.4.4: drivers write the 16-bit queue index; with ANY_LENGTH any
        // width is caught in the kernel, else other widths take the MMIO exit.
        spec.len = ioeventfd_any_length_ ? 0 : 2;
        spec.fd = notify_fds_[q].get();
        spec.flags = assign ? 0 : KVM_IOEVENTFD_FLAG_DEASSIGN;
        if (int err = vm_.try_ioeventfd(spec))
            KGUEST_LOG_LIMITED(log_limit_, "virtio-pci: KVM_IOEVENTFD %s at %#llx: %s (errno %d)%s",
                               assign ? "assign" : "deassign", static_cast<unsigned long long>(spec.addr),
                               std::strerror(err), err, assign ? "; kicks take the MMIO exit" : "");
    }
}

void VirtioPciSlot::map_bar(std::uint64_t gpa, bool decode) noexcept {
    std::lock_guard lock(bar_mu_);
    if (mapped_ != 0 && (mapped_ != gpa || !decode)) {
        set_ioeventfds(mapped_, false);
        mmio_.remove(mapped_);
        mapped_ = 0;
    }
    if (!decode || gpa == 0 || mapped_ == gpa) return;
    const std::uint64_t size = VirtioPciDevice::kBarSize;
    // Refuse what would shadow RAM or the LAPIC/IOAPIC range (0xfec00000 up
    // to 4 GiB), or wrap.
    bool bad = gpa + size < gpa || (gpa < 0x100000000ull && gpa + size > kIoApicAddress);
    for (const auto& r : mem_.regions()) bad |= gpa < r.gpa.value() + r.size && r.gpa.value() < gpa + size;
    if (!bad) {
        try {
            mmio_.insert(gpa, size, pci_->bar_device(), bar_name_);
        } catch (const std::exception&) {
            bad = true;   // overlaps another device's range
        }
    }
    if (bad) {
        KGUEST_LOG_LIMITED(log_limit_, "virtio-pci: BAR at %#llx overlaps RAM or another device; left unmapped",
                           static_cast<unsigned long long>(gpa));
        return;
    }
    mapped_ = gpa;
    set_ioeventfds(gpa, true);
}

} // namespace kguest
