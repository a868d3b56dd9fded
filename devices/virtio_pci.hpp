// The virtio-pci modern transport (VIRTIO 1.2 section 4.1): one PCI function
// wrapping one VirtioDevice. It knows nothing of KVM; interrupts leave through
// VirtioInterrupts (irqfds / KVM MSI routes in the VMM) and the BAR is reached
// as a BusDevice (read/write, or bar_device()).
//
// PCI identity (4.1.2): vendor 0x1AF4, device 0x1040 + virtio device ID,
// revision 1, subsystem 0x1AF4/0x1100 (as QEMU), INTA#. One 64-bit memory
// BAR, BAR 4, holds every region, each at a 4 KiB boundary:
//
//   0x0000 common configuration (4.1.4.3)        cfg_type 1
//   0x1000 ISR status (4.1.4.5)                  cfg_type 3
//   0x2000 device-specific configuration (4.1.4.6) cfg_type 4 (if any)
//   0x3000 notifications (4.1.4.4), 4 bytes per queue, queue_notify_off = q
//   0x4000 MSI-X table, num_queues + 1 entries (PCI 3.0 §6.8.2)
//   0x5000 MSI-X PBA
//
// Capabilities: the five virtio vendor capabilities (cfg_type 1..5, the last
// the PCI configuration access window of 4.1.4.9) and MSI-X.
//
// The guest is hostile: accesses of the wrong width, alignment or offset read
// all-ones and are dropped, and nothing on a guest path throws.
//
// Bus Master Enable (PCI 3.0 6.2.2, Command bit 2; off at power-on, set by
// the VMM as firmware would and by every driver): while it is clear the
// function issues no memory requests, so the transport drops the guest's
// kicks, tells the device through dma_enabled() (devices process no queue,
// not even on an ioeventfd kick) and holds MSI-X messages, which are memory
// writes; INTx is a wire and stays. Setting it again sends what was held
// and kicks every queue.
//
// Locking: a control lock serialises the common/device configuration; an
// interrupt lock guards ISR, vectors and the MSI-X table/PBA, taken after the
// control lock when both are needed. VirtioInterrupts is called under the
// interrupt lock and must not call back into this object. Config-space hooks
// run under the host bridge's lock (see pci.hpp).
#pragma once

#include "devices/pci.hpp"
#include "devices/virtio.hpp"
#include "devices/virtqueue.hpp"
#include "devices/base/bus.hpp"
#include "devices/base/guest_memory.hpp"
#include "devices/base/log.hpp"

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

namespace kguest {

// 4.1.4: virtio_pci_cap.cfg_type.
inline constexpr std::uint8_t VIRTIO_PCI_CAP_COMMON_CFG = 1, VIRTIO_PCI_CAP_NOTIFY_CFG = 2,
                              VIRTIO_PCI_CAP_ISR_CFG = 3, VIRTIO_PCI_CAP_DEVICE_CFG = 4,
                              VIRTIO_PCI_CAP_PCI_CFG = 5;
// 4.1.4.5: ISR status bits.
inline constexpr std::uint8_t VIRTIO_PCI_ISR_QUEUE = 1, VIRTIO_PCI_ISR_CONFIG = 2;
// 4.1.5.1.2: "no vector".
inline constexpr std::uint16_t VIRTIO_MSI_NO_VECTOR = 0xffff;
// 4.1.4.3: struct virtio_pci_common_cfg offsets.
inline constexpr unsigned VIRTIO_PCI_COMMON_DFSELECT = 0x00, VIRTIO_PCI_COMMON_DF = 0x04,
                          VIRTIO_PCI_COMMON_GFSELECT = 0x08, VIRTIO_PCI_COMMON_GF = 0x0c,
                          VIRTIO_PCI_COMMON_MSIX = 0x10, VIRTIO_PCI_COMMON_NUMQ = 0x12,
                          VIRTIO_PCI_COMMON_STATUS = 0x14, VIRTIO_PCI_COMMON_CFGGENERATION = 0x15,
                          VIRTIO_PCI_COMMON_Q_SELECT = 0x16, VIRTIO_PCI_COMMON_Q_SIZE = 0x18,
                          VIRTIO_PCI_COMMON_Q_MSIX = 0x1a, VIRTIO_PCI_COMMON_Q_ENABLE = 0x1c,
                          VIRTIO_PCI_COMMON_Q_NOFF = 0x1e, VIRTIO_PCI_COMMON_Q_DESCLO = 0x20,
                          VIRTIO_PCI_COMMON_Q_DESCHI = 0x24, VIRTIO_PCI_COMMON_Q_AVAILLO = 0x28,
                          VIRTIO_PCI_COMMON_Q_AVAILHI = 0x2c, VIRTIO_PCI_COMMON_Q_USEDLO = 0x30,
                          VIRTIO_PCI_COMMON_Q_USEDHI = 0x34, VIRTIO_PCI_COMMON_Q_NDATA = 0x38,
                          VIRTIO_PCI_COMMON_Q_RESET = 0x3a;
// PCI 3.0 §6.8.2: MSI-X.
inline constexpr std::uint8_t PCI_CAP_ID_MSIX = 0x11, PCI_CAP_ID_VNDR = 0x09;
inline constexpr std::uint16_t PCI_MSIX_FLAGS_ENABLE = 0x8000, PCI_MSIX_FLAGS_MASKALL = 0x4000;

// Where the transport's interrupts go. Called under the interrupt lock.
struct VirtioInterrupts {
    virtual ~VirtioInterrupts() = default;
    // Send the message of MSI-X table entry `vector` (PCI 3.0 §6.8.2).
    virtual void msix(std::uint16_t vector, std::uint64_t address, std::uint32_t data) = 0;
    virtual void intx(bool level) = 0;             // INTA# level (MSI-X disabled)
};

class VirtioPciDevice : public PciFunction,
                        public VirtioTransport,
                        public BusDevice,
                        public std::enable_shared_from_this<VirtioPciDevice> {
public:
    static constexpr unsigned kBar = 4;
    static constexpr std::uint64_t kBarSize = 0x8000;
    static constexpr std::uint64_t kCommonOffset = 0x0000, kIsrOffset = 0x1000,
                                   kDeviceOffset = 0x2000, kNotifyOffset = 0x3000,
                                   kMsixTableOffset = 0x4000, kMsixPbaOffset = 0x5000,
                                   kRegionSize = 0x1000;
    static constexpr std::uint32_t kNotifyOffMultiplier = 4;
    static constexpr std::uint16_t kMaxQueues = 255;   // table (queues + 1) fits 4 KiB
    static constexpr std::uint16_t kSubsystemId = 0x1100;

    // Throws std::invalid_argument on bad arguments or a device that cannot fit.
    VirtioPciDevice(std::shared_ptr<VirtioDevice> device, GuestMemory& mem,
                    std::shared_ptr<VirtioInterrupts> irq, std::uint32_t class_code);
    ~VirtioPciDevice() override;

    // The BAR region, offsets relative to the BAR base.
    void read(std::uint64_t offset, std::span<std::uint8_t> data) override { bar_read(offset, data, true); }
    void write(std::uint64_t offset, std::span<const std::uint8_t> data) override;
    std::shared_ptr<BusDevice> bar_device() { return shared_from_this(); }

    // VirtioTransport.
    void interrupt_queue(std::uint16_t q) override;
    void interrupt_config() override;
    void needs_reset() override;
    std::uint64_t driver_features() const override { return driver_features_.load(); }
    bool dma_enabled() const override { return bus_master_.load(); }

    std::uint64_t bar_gpa() const { return bar_gpa_.load(); }

    // The VMM's hook, set before the VM runs: gets the BAR's address and
    // memory decode after every change of either (under the bridge lock: it
    // may remap the MMIO bus but not touch the PIO bus or the bridge).
    void set_bar_hook(std::function<void(std::uint64_t gpa, bool decode)> hook) { bar_hook_ = std::move(hook); }

protected:
    void on_bar_moved(unsigned index, std::uint64_t old_addr, std::uint64_t new_addr) override;
    void on_command_write(std::uint16_t old_cmd, std::uint16_t new_cmd) override;
    void on_config_write(unsigned offset, unsigned size) override;

private:
    struct QueueRegs {
        std::uint16_t max = 0;
        std::uint16_t size = 0;
        bool enabled = false;
        std::uint64_t desc = 0, driver = 0, device = 0;
        std::uint64_t& address(std::uint64_t off) {   // of the field at common-cfg offset `off`
            if (off < VIRTIO_PCI_COMMON_Q_AVAILLO) return desc;
            return off < VIRTIO_PCI_COMMON_Q_USEDLO ? driver : device;
        }
    };

    // Region handlers; `size` is 1..8. Reads return false for "all-ones".
    bool common_read(std::uint64_t off, std::size_t size, std::uint64_t& v);
    void common_write(std::uint64_t off, std::size_t size, std::uint64_t v);
    void write_status(std::uint8_t v);
    void reset_locked();                 // ctrl_mu_ held
    void enable_queue(std::uint16_t q);  // ctrl_mu_ held
    bool queue_setup_allowed(std::uint16_t q) const;
    bool msix_read(std::uint64_t off, std::size_t size, std::uint64_t& v) const;
    void msix_write(std::uint64_t off, std::size_t size, std::uint64_t v);
    void bar_read(std::uint64_t offset, std::span<std::uint8_t> data, bool side_effects);

    // irq_mu_ held.
    void raise_locked(std::uint16_t vector, std::uint8_t isr_bit);   // MSI-X vector, else ISR bit and INTx
    void signal_vector_locked(std::uint16_t vector);
    void deliver_pending_locked();
    void update_intx_locked();
    bool entry_masked_locked(std::uint16_t v) const { return (msix_table_[v][3] & 1) != 0; }

    void pci_cfg_window(unsigned offset, unsigned size);
    void notify_bar_hook();

    std::shared_ptr<VirtioDevice> device_;
    GuestMemory& mem_;
    std::shared_ptr<VirtioInterrupts> irq_;
    std::uint64_t offered_ = 0;
    std::size_t config_size_ = 0;

    // Control state (ctrl_mu_).
    std::mutex ctrl_mu_;
    std::uint32_t dfselect_ = 0, gfselect_ = 0;
    std::uint16_t queue_select_ = 0;
    std::vector<QueueRegs> qregs_;
    std::vector<Virtqueue> queues_;
    std::atomic<std::uint8_t> status_{0};
    std::atomic<std::uint8_t> generation_{0};
    std::atomic<std::uint64_t> driver_features_{0};

    // Interrupt state (irq_mu_).
    mutable std::mutex irq_mu_;
    std::uint8_t isr_ = 0;
    bool intx_level_ = false;
    bool intx_disabled_ = false;
    bool msix_enabled_ = false;
    bool msix_masked_ = false;
    std::uint16_t config_vector_ = VIRTIO_MSI_NO_VECTOR;
    std::vector<std::uint16_t> queue_vector_;
    std::vector<std::array<std::uint32_t, 4>> msix_table_;
    std::vector<std::uint64_t> pba_;
    std::vector<std::uint64_t> held_;   // vectors signalled while bus mastering was off
    std::atomic<bool> bus_master_{false};   // written under irq_mu_

    // Capability offsets in config space.
    std::uint8_t msix_cap_ = 0;
    std::uint8_t pci_cfg_cap_ = 0;

    std::atomic<std::uint64_t> bar_gpa_{0};
    std::function<void(std::uint64_t, bool)> bar_hook_;
    RateLimit log_limit_{5};
};

} // namespace kguest
