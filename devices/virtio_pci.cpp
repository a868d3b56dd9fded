// The virtio-pci modern transport (see virtio_pci.hpp). The BAR is decoded by
// region; within a region only the natural widths and offsets are honoured
// (4.1.3.1), plus 8-byte accesses to the 64-bit queue addresses and MSI-X
// table entries. Everything else reads all-ones and is dropped on write.
#include "devices/virtio_pci.hpp"

#include <algorithm>
#include <bit>
#include <stdexcept>
#include <string>

namespace kguest {

namespace {

constexpr std::uint16_t kVirtioPciVendor = 0x1af4;
constexpr std::uint16_t kVirtioPciModernBase = 0x1040;   // 4.1.2.1

// Features this transport cannot honour, whatever the device offers.
constexpr std::uint64_t kTransportUnsupported =
    virtio_bit(VIRTIO_F_RING_PACKED) | virtio_bit(VIRTIO_F_SR_IOV) |
    virtio_bit(VIRTIO_F_NOTIFICATION_DATA) | virtio_bit(VIRTIO_F_NOTIF_CONFIG_DATA) |
    virtio_bit(VIRTIO_F_RING_RESET);

std::uint64_t load_le(std::span<const std::uint8_t> d) {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < d.size() && i < 8; ++i) v |= std::uint64_t{d[i]} << (8 * i);
    return v;
}

void store_le(std::span<std::uint8_t> d, std::uint64_t v) {
    for (std::size_t i = 0; i < d.size() && i < 8; ++i) d[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

bool natural(std::size_t size) { return size == 1 || size == 2 || size == 4 || size == 8; }

// 4.1.4.3: the 64-bit queue addresses, whole or as two 32-bit halves.
bool queue_address(std::uint64_t off, std::size_t size) {
    return off >= VIRTIO_PCI_COMMON_Q_DESCLO && off < VIRTIO_PCI_COMMON_Q_NDATA &&
           (size == 8 ? off % 8 == 0 : size == 4 && off % 4 == 0);
}

// 4.1.4: struct virtio_pci_cap after cap_vndr/cap_next: cap_len, cfg_type,
// bar, id, padding[2], offset, length, then `extra` (notify_off_multiplier
// or pci_cfg_data).
std::vector<std::uint8_t> virtio_cap(std::uint8_t cfg_type, std::uint8_t bar, std::uint32_t offset,
                                     std::uint32_t length, bool with_extra, std::uint32_t extra = 0) {
    std::vector<std::uint8_t> b(with_extra ? 18 : 14, 0);
    b[0] = static_cast<std::uint8_t>(b.size() + 2);   // cap_len counts vndr and next
    b[1] = cfg_type;
    b[2] = bar;
    store_le(std::span(b).subspan(6, 4), offset);
    store_le(std::span(b).subspan(10, 4), length);
    if (with_extra) store_le(std::span(b).subspan(14, 4), extra);
    return b;
}

} // namespace

VirtioPciDevice::VirtioPciDevice(std::shared_ptr<VirtioDevice> device, GuestMemory& mem,
                                 std::shared_ptr<VirtioInterrupts> irq, std::uint32_t class_code)
    : device_(std::move(device)), mem_(mem), irq_(std::move(irq)) {
    if (!device_ || !irq_) throw std::invalid_argument("virtio-pci: null device or interrupt sink");
    const std::uint16_t nq = device_->num_queues();
    if (nq == 0 || nq > kMaxQueues) throw std::invalid_argument("virtio-pci: bad queue count");
    config_size_ = device_->config_size();
    if (config_size_ > kRegionSize) throw std::invalid_argument("virtio-pci: device config too large");
    if (device_->device_id() > 0xffff - kVirtioPciModernBase)
        throw std::invalid_argument("virtio-pci: bad device id");

    qregs_.resize(nq);
    queues_.reserve(nq);
    for (std::uint16_t q = 0; q < nq; ++q) {
        const std::uint16_t max = device_->max_queue_size(q);
        if (max > kVirtqMaxSize || (max != 0 && !std::has_single_bit(max)))
            throw std::invalid_argument("virtio-pci: bad max queue size for queue " + std::to_string(q));
        qregs_[q].max = qregs_[q].size = max;
        queues_.emplace_back(mem_);
    }
    queue_vector_.assign(nq, VIRTIO_MSI_NO_VECTOR);
    msix_table_.assign(nq + 1u, {0, 0, 0, 1});
    pba_.assign((nq + 1u + 63) / 64, 0);
    held_.assign(pba_.size(), 0);
    offered_ = (device_->device_features() | virtio_bit(VIRTIO_F_VERSION_1)) & ~kTransportUnsupported;

    // 4.1.2: identity.
    set_ids(kVirtioPciVendor, static_cast<std::uint16_t>(kVirtioPciModernBase + device_->device_id()));
    set_class(class_code, 1);
    set_config(pci::kSubsystemVendor, 2, kVirtioPciVendor);
    set_config(pci::kSubsystemId, 2, kSubsystemId);
    set_config(pci::kInterruptPin, 1, 1);   // INTA#; header type 0
    set_bar(kBar, kBarSize, BarKind::kMem64);

    // 4.1.4: the virtio capabilities, then MSI-X.
    auto add = [this](const std::vector<std::uint8_t>& body, const std::vector<std::uint8_t>& wmask = {}) {
        return add_capability(PCI_CAP_ID_VNDR, body, wmask);
    };
    add(virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, kBar, kCommonOffset, kRegionSize, false));
    add(virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, kBar, kNotifyOffset, nq * kNotifyOffMultiplier, true,
                   kNotifyOffMultiplier));
    add(virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, kBar, kIsrOffset, kRegionSize, false));
    if (config_size_ != 0)
        add(virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, kBar, kDeviceOffset, static_cast<std::uint32_t>(config_size_),
                       false));
    // 4.1.4.9: bar, offset, length and pci_cfg_data are driver-writable.
    std::vector<std::uint8_t> cfg_mask(18, 0);
    cfg_mask[2] = 0xff;
    std::fill(cfg_mask.begin() + 6, cfg_mask.end(), 0xff);
    pci_cfg_cap_ = add(virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, true), cfg_mask);

    // PCI 3.0 §6.8.2: Message Control (table size - 1, enable, function
    // mask), Table offset/BIR, PBA offset/BIR.
    std::vector<std::uint8_t> msix(10, 0), msix_mask(10, 0);
    store_le(std::span(msix).subspan(0, 2), nq);   // N - 1 with N = nq + 1
    store_le(std::span(msix).subspan(2, 4), kMsixTableOffset | kBar);
    store_le(std::span(msix).subspan(6, 4), kMsixPbaOffset | kBar);
    msix_mask[1] = static_cast<std::uint8_t>((PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL) >> 8);
    msix_cap_ = add_capability(PCI_CAP_ID_MSIX, msix, msix_mask);

    device_->attach(this);
}

VirtioPciDevice::~VirtioPciDevice() {
    device_->reset();   // the device stops using the queues (and us)
    device_->attach(nullptr);
}

// ---- BAR dispatch ----

void VirtioPciDevice::bar_read(std::uint64_t offset, std::span<std::uint8_t> data, bool side_effects) {
    std::fill(data.begin(), data.end(), 0xff);
    const std::size_t n = data.size();
    if (!natural(n) || offset >= kBarSize || n > kRegionSize - offset % kRegionSize) return;
    const std::uint64_t region = offset - offset % kRegionSize, off = offset % kRegionSize;
    std::uint64_t v = 0;
    switch (region) {
    case kCommonOffset: {
        std::lock_guard lock(ctrl_mu_);
        if (common_read(off, n, v)) store_le(data, v);
        return;
    }
    case kIsrOffset: {
        // 4.1.4.5: reading clears the ISR and de-asserts INTx.
        if (off != 0 || n > 4) return;
        std::lock_guard lock(irq_mu_);
        store_le(data, isr_);
        if (side_effects) {
            isr_ = 0;
            update_intx_locked();
        }
        return;
    }
    case kDeviceOffset: {
        if (off + n > config_size_) return;
        std::lock_guard lock(ctrl_mu_);
        device_->read_config(off, data);
        return;
    }
    case kMsixTableOffset:
    case kMsixPbaOffset:
        if (msix_read(offset - kMsixTableOffset, n, v)) store_le(data, v);
        return;
    default:
        return;   // notify region reads, unused space: all-ones
    }
}

void VirtioPciDevice::write(std::uint64_t offset, std::span<const std::uint8_t> data) {
    const std::size_t n = data.size();
    if (!natural(n) || offset >= kBarSize || n > kRegionSize - offset % kRegionSize) return;
    const std::uint64_t region = offset - offset % kRegionSize, off = offset % kRegionSize;
    const std::uint64_t v = load_le(data);
    switch (region) {
    case kCommonOffset: {
        std::lock_guard lock(ctrl_mu_);
        common_write(off, n, v);
        return;
    }
    case kDeviceOffset: {
        if (off + n > config_size_) return;
        std::lock_guard lock(ctrl_mu_);
        device_->write_config(off, data);
        return;
    }
    case kNotifyOffset: {
        // 4.1.4.4: queue q's notify address is 4q; the value written is
        // ignored. No lock: the device gets the kick on this thread.
        if (off % kNotifyOffMultiplier != 0 || n > kNotifyOffMultiplier) return;
        const std::uint64_t q = off / kNotifyOffMultiplier;
        const std::uint8_t st = status_.load();
        // Without bus mastering the kick is dropped: setting it kicks every queue.
        if (q >= queues_.size() || (st & VIRTIO_CONFIG_S_DRIVER_OK) == 0 ||
            (st & VIRTIO_CONFIG_S_NEEDS_RESET) != 0 || !bus_master_.load())
            return;
        device_->queue_notify(static_cast<std::uint16_t>(q));
        return;
    }
    case kMsixTableOffset:
        msix_write(off, n, v);
        return;
    default:
        return;   // ISR is read-only, PBA too (PCI 3.0 §6.8.2.10)
    }
}

// ---- Common configuration (4.1.4.3) ----

bool VirtioPciDevice::common_read(std::uint64_t off, std::size_t size, std::uint64_t& v) {
    auto is = [&](unsigned field, std::size_t width) { return off == field && size == width; };
    const std::uint16_t qs = queue_select_;
    QueueRegs* q = qs < qregs_.size() ? &qregs_[qs] : nullptr;
    const std::uint64_t drv = driver_features_.load();
    if (is(VIRTIO_PCI_COMMON_DFSELECT, 4)) v = dfselect_;
    else if (is(VIRTIO_PCI_COMMON_DF, 4)) v = dfselect_ < 2 ? static_cast<std::uint32_t>(offered_ >> (32 * dfselect_)) : 0;
    else if (is(VIRTIO_PCI_COMMON_GFSELECT, 4)) v = gfselect_;
    else if (is(VIRTIO_PCI_COMMON_GF, 4)) v = gfselect_ < 2 ? static_cast<std::uint32_t>(drv >> (32 * gfselect_)) : 0;
    else if (is(VIRTIO_PCI_COMMON_MSIX, 2)) {
        std::lock_guard lock(irq_mu_);
        v = config_vector_;
    } else if (is(VIRTIO_PCI_COMMON_NUMQ, 2)) v = qregs_.size();
    else if (is(VIRTIO_PCI_COMMON_STATUS, 1)) v = status_.load();
    else if (is(VIRTIO_PCI_COMMON_CFGGENERATION, 1)) v = generation_.load();
    else if (is(VIRTIO_PCI_COMMON_Q_SELECT, 2)) v = qs;
    // An out-of-range queue_select reads queue_size 0: "not available".
    else if (is(VIRTIO_PCI_COMMON_Q_SIZE, 2)) v = q ? q->size : 0;
    else if (is(VIRTIO_PCI_COMMON_Q_MSIX, 2)) {
        std::lock_guard lock(irq_mu_);
        v = q ? queue_vector_[qs] : VIRTIO_MSI_NO_VECTOR;
    } else if (is(VIRTIO_PCI_COMMON_Q_ENABLE, 2)) v = q ? q->enabled : 0;
    else if (is(VIRTIO_PCI_COMMON_Q_NOFF, 2)) v = q ? qs : 0;
    else if (is(VIRTIO_PCI_COMMON_Q_NDATA, 2) || is(VIRTIO_PCI_COMMON_Q_RESET, 2)) v = 0;
    else if (queue_address(off, size)) {
        const std::uint64_t a = q ? q->address(off) : 0;
        v = size == 8 ? a : static_cast<std::uint32_t>(a >> (off % 8 == 0 ? 0 : 32));
    } else {
        return false;
    }
    return true;
}

bool VirtioPciDevice::queue_setup_allowed(std::uint16_t q) const {
    // 3.1.1 step 7 / 4.1.4.3.2: after FEATURES_OK, before DRIVER_OK, while
    // not enabled.
    const std::uint8_t st = status_.load();
    return q < qregs_.size() && (st & VIRTIO_CONFIG_S_FEATURES_OK) != 0 &&
           (st & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED)) == 0 &&
           !qregs_[q].enabled;
}

void VirtioPciDevice::common_write(std::uint64_t off, std::size_t size, std::uint64_t v) {
    auto is = [&](unsigned field, std::size_t width) { return off == field && size == width; };
    const std::uint16_t qs = queue_select_;
    if (is(VIRTIO_PCI_COMMON_DFSELECT, 4)) {
        dfselect_ = static_cast<std::uint32_t>(v);
    } else if (is(VIRTIO_PCI_COMMON_GFSELECT, 4)) {
        gfselect_ = static_cast<std::uint32_t>(v);
    } else if (is(VIRTIO_PCI_COMMON_GF, 4)) {
        // 3.1.1 step 4: features are written before FEATURES_OK and frozen after.
        if (gfselect_ >= 2 || (status_.load() & VIRTIO_CONFIG_S_FEATURES_OK) != 0) return;
        const unsigned shift = 32 * gfselect_;
        std::uint64_t drv = driver_features_.load();
        drv = (drv & ~(std::uint64_t{0xffffffff} << shift)) | (v & 0xffffffff) << shift;
        driver_features_.store(drv);
    } else if (is(VIRTIO_PCI_COMMON_MSIX, 2)) {
        // 4.1.5.1.2: a vector the table lacks reads back NO_VECTOR.
        std::lock_guard lock(irq_mu_);
        config_vector_ = v < msix_table_.size() ? static_cast<std::uint16_t>(v) : VIRTIO_MSI_NO_VECTOR;
    } else if (is(VIRTIO_PCI_COMMON_STATUS, 1)) {
        write_status(static_cast<std::uint8_t>(v));
    } else if (is(VIRTIO_PCI_COMMON_Q_SELECT, 2)) {
        queue_select_ = static_cast<std::uint16_t>(v);
    } else if (is(VIRTIO_PCI_COMMON_Q_SIZE, 2)) {
        // 2.7: a power of 2, at most the maximum.
        if (queue_setup_allowed(qs) && v != 0 && std::has_single_bit(v) && v <= qregs_[qs].max)
            qregs_[qs].size = static_cast<std::uint16_t>(v);
    } else if (is(VIRTIO_PCI_COMMON_Q_MSIX, 2)) {
        if (qs >= qregs_.size()) return;
        std::lock_guard lock(irq_mu_);
        queue_vector_[qs] = v < msix_table_.size() ? static_cast<std::uint16_t>(v) : VIRTIO_MSI_NO_VECTOR;
    } else if (is(VIRTIO_PCI_COMMON_Q_ENABLE, 2)) {
        // Writing 0 is not allowed without VIRTIO_F_RING_RESET: ignored.
        if (v == 1 && queue_setup_allowed(qs)) enable_queue(qs);
    } else if (queue_address(off, size)) {
        if (!queue_setup_allowed(qs)) return;
        std::uint64_t& a = qregs_[qs].address(off);
        if (size == 8) a = v;
        else if (off % 8 == 0) a = (a & ~std::uint64_t{0xffffffff}) | (v & 0xffffffff);
        else a = (a & 0xffffffff) | (v & 0xffffffff) << 32;
    }
    // Read-only fields and odd accesses: dropped.
}

void VirtioPciDevice::write_status(std::uint8_t v) {
    if (v == 0) {
        reset_locked();
        return;
    }
    // 2.1.2: the driver never clears a bit nor sets DEVICE_NEEDS_RESET.
    const std::uint8_t cur = status_.load();
    std::uint8_t add = static_cast<std::uint8_t>(v & ~cur & ~VIRTIO_CONFIG_S_NEEDS_RESET);
    const std::uint8_t next = cur | add;
    if ((add & VIRTIO_CONFIG_S_FEATURES_OK) != 0) {
        // 3.1.1 step 5 / 6.1: offered features with VERSION_1, after
        // ACKNOWLEDGE and DRIVER.
        const std::uint64_t drv = driver_features_.load();
        const bool ok = (next & VIRTIO_CONFIG_S_ACKNOWLEDGE) != 0 && (next & VIRTIO_CONFIG_S_DRIVER) != 0 &&
                        (drv & ~offered_) == 0 && (drv & virtio_bit(VIRTIO_F_VERSION_1)) != 0 &&
                        device_->accept_features(drv);
        if (!ok) add &= static_cast<std::uint8_t>(~VIRTIO_CONFIG_S_FEATURES_OK);
    }
    if ((add & VIRTIO_CONFIG_S_DRIVER_OK) != 0) {
        const std::uint8_t with = cur | add;
        if ((with & VIRTIO_CONFIG_S_FEATURES_OK) == 0 ||
            (with & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET)) != 0)
            add &= static_cast<std::uint8_t>(~VIRTIO_CONFIG_S_DRIVER_OK);
    }
    status_.fetch_or(add);
    if ((add & VIRTIO_CONFIG_S_DRIVER_OK) != 0) device_->activate(queues_, mem_);
}

void VirtioPciDevice::reset_locked() {
    // 2.4 / 4.1.4.3.1: the device stops, then everything is back to initial.
    device_->reset();
    for (std::size_t i = 0; i < queues_.size(); ++i) {
        queues_[i].reset();
        QueueRegs& q = qregs_[i];
        q = QueueRegs{q.max, q.max, false, 0, 0, 0};
    }
    dfselect_ = gfselect_ = 0;
    queue_select_ = 0;
    driver_features_.store(0);
    status_.store(0);
    std::lock_guard lock(irq_mu_);
    isr_ = 0;
    config_vector_ = VIRTIO_MSI_NO_VECTOR;
    std::fill(queue_vector_.begin(), queue_vector_.end(), VIRTIO_MSI_NO_VECTOR);
    std::fill(pba_.begin(), pba_.end(), 0);
    std::fill(held_.begin(), held_.end(), 0);
    update_intx_locked();
}

void VirtioPciDevice::enable_queue(std::uint16_t qi) {
    QueueRegs& q = qregs_[qi];
    Virtqueue& vq = queues_[qi];
    const std::uint64_t drv = driver_features_.load();
    vq.reset();
    vq.set_event_idx((drv & virtio_bit(VIRTIO_F_EVENT_IDX)) != 0);
    vq.set_indirect((drv & virtio_bit(VIRTIO_F_INDIRECT_DESC)) != 0);
    if (q.size != 0 && vq.configure(q.size, q.desc, q.driver, q.device)) {
        q.enabled = true;
        return;
    }
    KGUEST_LOG_LIMITED(log_limit_, "virtio-pci %04x: queue %u: cannot enable: %s",
                       static_cast<unsigned>(kVirtioPciModernBase + device_->device_id()),
                       static_cast<unsigned>(qi), q.size == 0 ? "queue not available" : vq.error().reason);
    needs_reset();
}

// ---- Interrupts (4.1.4.5, 4.1.5.1.2-4) ----

void VirtioPciDevice::interrupt_queue(std::uint16_t q) {
    if (q >= queue_vector_.size() || (status_.load() & VIRTIO_CONFIG_S_DRIVER_OK) == 0) return;
    std::lock_guard lock(irq_mu_);
    raise_locked(queue_vector_[q], VIRTIO_PCI_ISR_QUEUE);
}

void VirtioPciDevice::interrupt_config() {
    generation_.fetch_add(1);
    std::lock_guard lock(irq_mu_);
    raise_locked(config_vector_, VIRTIO_PCI_ISR_CONFIG);
}

void VirtioPciDevice::needs_reset() {
    // 2.1.2: a configuration change notification, even before DRIVER_OK.
    const std::uint8_t old = status_.fetch_or(VIRTIO_CONFIG_S_NEEDS_RESET);
    if ((old & VIRTIO_CONFIG_S_NEEDS_RESET) != 0) return;
    std::lock_guard lock(irq_mu_);
    raise_locked(config_vector_, VIRTIO_PCI_ISR_CONFIG);
}

void VirtioPciDevice::raise_locked(std::uint16_t vector, std::uint8_t isr_bit) {
    if (msix_enabled_) {
        signal_vector_locked(vector);
    } else {
        isr_ |= isr_bit;
        update_intx_locked();
    }
}

void VirtioPciDevice::signal_vector_locked(std::uint16_t vector) {
    if (vector >= msix_table_.size()) return;   // NO_VECTOR: no interrupt
    if (!bus_master_.load()) {   // an MSI-X message is a memory write: held
        held_[vector / 64] |= std::uint64_t{1} << (vector % 64);
        return;
    }
    if (msix_masked_ || entry_masked_locked(vector)) {
        pba_[vector / 64] |= std::uint64_t{1} << (vector % 64);   // PCI 3.0 §6.8.2.10
        return;
    }
    const auto& e = msix_table_[vector];
    irq_->msix(vector, std::uint64_t{e[0]} | std::uint64_t{e[1]} << 32, e[2]);
}

void VirtioPciDevice::deliver_pending_locked() {
    if (!msix_enabled_ || msix_masked_ || !bus_master_.load()) return;
    for (std::uint16_t v = 0; v < msix_table_.size(); ++v) {
        const std::uint64_t bit = std::uint64_t{1} << (v % 64);
        if ((pba_[v / 64] & bit) != 0 && !entry_masked_locked(v)) {
            pba_[v / 64] &= ~bit;
            const auto& e = msix_table_[v];
            irq_->msix(v, std::uint64_t{e[0]} | std::uint64_t{e[1]} << 32, e[2]);
        }
    }
}

void VirtioPciDevice::update_intx_locked() {
    // INTx is off while MSI-X is enabled (PCI 3.0 §6.8.2) or Command bit 10 set.
    const bool level = isr_ != 0 && !msix_enabled_ && !intx_disabled_;
    if (level == intx_level_) return;
    intx_level_ = level;
    irq_->intx(level);
}

bool VirtioPciDevice::msix_read(std::uint64_t off, std::size_t size, std::uint64_t& v) const {
    // `off` is relative to the table; the PBA follows at kMsixPbaOffset.
    if ((size != 4 && size != 8) || off % size != 0) return false;
    std::lock_guard lock(irq_mu_);
    const std::uint64_t pba_off = kMsixPbaOffset - kMsixTableOffset;
    if (off < pba_off) {
        const std::uint64_t entry = off / 16, word = off % 16 / 4;
        if (entry >= msix_table_.size()) return false;
        v = msix_table_[entry][word];
        if (size == 8) v |= std::uint64_t{msix_table_[entry][word + 1]} << 32;
        return true;
    }
    off -= pba_off;
    if (off / 8 >= pba_.size()) return false;
    v = pba_[off / 8] >> (off % 8 * 8);
    if (size == 4) v &= 0xffffffff;
    return true;
}

void VirtioPciDevice::msix_write(std::uint64_t off, std::size_t size, std::uint64_t v) {
    if ((size != 4 && size != 8) || off % size != 0) return;
    const std::uint64_t entry = off / 16, word = off % 16 / 4;
    std::lock_guard lock(irq_mu_);
    if (entry >= msix_table_.size()) return;
    auto& e = msix_table_[entry];
    for (std::uint64_t i = 0; i < size / 4; ++i) {
        const auto w = static_cast<std::uint32_t>(v >> (32 * i));
        if (word + i == 3) e[3] = w & 1;   // only the mask bit of Vector Control
        else e[word + i] = w;
    }
    deliver_pending_locked();   // an unmask delivers what was pending
}

// ---- PCI configuration space hooks ----

void VirtioPciDevice::on_bar_moved(unsigned index, std::uint64_t, std::uint64_t new_addr) {
    if (index != kBar) return;
    bar_gpa_.store(new_addr);
    notify_bar_hook();
}

void VirtioPciDevice::on_command_write(std::uint16_t old_cmd, std::uint16_t new_cmd) {
    const bool master = (new_cmd & pci::kCommandMaster) != 0;
    const bool master_on = master && !bus_master_.load();
    {
        std::lock_guard lock(irq_mu_);
        intx_disabled_ = (new_cmd & pci::kCommandIntxDisable) != 0;
        update_intx_locked();
        bus_master_.store(master);
        if (master_on) {
            // What was signalled meanwhile goes out now (or pends in the PBA
            // if its vector is masked).
            for (std::uint16_t v = 0; v < msix_table_.size(); ++v) {
                const std::uint64_t bit = std::uint64_t{1} << (v % 64);
                if ((held_[v / 64] & bit) == 0) continue;
                held_[v / 64] &= ~bit;
                if (msix_enabled_) signal_vector_locked(v);
            }
            deliver_pending_locked();
        }
    }
    if ((old_cmd ^ new_cmd) & pci::kCommandMemory) notify_bar_hook();
    // Kicks dropped or ignored meanwhile (the device processed no queue):
    // every queue gets one now.
    const std::uint8_t st = status_.load();
    if (master_on && (st & VIRTIO_CONFIG_S_DRIVER_OK) != 0 && (st & VIRTIO_CONFIG_S_NEEDS_RESET) == 0)
        for (std::uint16_t q = 0; q < queues_.size(); ++q) device_->queue_notify(q);
}

void VirtioPciDevice::notify_bar_hook() {
    const BarAddress b = bar_address(kBar);
    if (bar_hook_) bar_hook_(b.address, b.decode);
}

void VirtioPciDevice::on_config_write(unsigned offset, unsigned size) {
    const unsigned end = offset + size;
    const unsigned ctl = msix_cap_ + 2u;
    if (offset < ctl + 2 && end > ctl) {
        const auto flags = static_cast<std::uint16_t>(config_read(ctl, 2));
        std::lock_guard lock(irq_mu_);
        msix_enabled_ = (flags & PCI_MSIX_FLAGS_ENABLE) != 0;
        msix_masked_ = (flags & PCI_MSIX_FLAGS_MASKALL) != 0;
        update_intx_locked();
        deliver_pending_locked();
    }
    if (offset < pci_cfg_cap_ + 20u && end > pci_cfg_cap_ + 4u) pci_cfg_window(offset, size);
}

void VirtioPciDevice::pci_cfg_window(unsigned offset, unsigned size) {
    // 4.1.4.9: the driver picks a BAR, offset and length (1, 2 or 4); a write
    // to pci_cfg_data writes there. Config reads are invisible to us, so every
    // write refreshes the data field from the BAR (without clearing the ISR).
    const unsigned cap = pci_cfg_cap_, data_off = cap + 16;
    const std::uint32_t bar = config_read(cap + 4, 1);
    const std::uint32_t off = config_read(cap + 8, 4);
    const std::uint32_t len = config_read(cap + 12, 4);
    if (bar != kBar || (len != 1 && len != 2 && len != 4) || off % len != 0 || off >= kBarSize) return;
    std::array<std::uint8_t, 4> buf{};
    if (offset < data_off + 4 && offset + size > data_off) {
        store_le(buf, config_read(data_off, 4));
        write(off, std::span<const std::uint8_t>(buf.data(), len));
    }
    buf.fill(0);
    bar_read(off, std::span(buf.data(), len), false);
    set_config(data_off, 4, static_cast<std::uint32_t>(load_le(buf)));
}

} // namespace kguest
