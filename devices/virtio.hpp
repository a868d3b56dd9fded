// The transport-independent half of a virtio device (VIRTIO 1.2 sections 2
// and 3). A VirtioDevice (virtio-net, virtio-balloon) describes what it
// offers (device type, features, queues, configuration space) and does the
// work once the driver has set DRIVER_OK; a transport (virtio-pci, 4.1)
// owns device status, feature negotiation, queue setup and interrupts, and is
// reached only through the small VirtioTransport interface.
//
// Threading: the transport calls activate/reset/read_config/write_config/
// accept_features under its control lock, on the vCPU thread doing the
// access; queue_notify runs on the kicking vCPU thread with no transport lock
// held. The VirtioTransport calls are safe from any thread, including from
// inside those callbacks.
#pragma once

#include "devices/virtqueue.hpp"
#include "devices/base/event_loop.hpp"
#include "devices/base/guest_memory.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace kguest {

// 2.1: device status bits.
inline constexpr std::uint8_t VIRTIO_CONFIG_S_ACKNOWLEDGE = 1, VIRTIO_CONFIG_S_DRIVER = 2,
                              VIRTIO_CONFIG_S_DRIVER_OK = 4, VIRTIO_CONFIG_S_FEATURES_OK = 8,
                              VIRTIO_CONFIG_S_NEEDS_RESET = 64, VIRTIO_CONFIG_S_FAILED = 128;

// 6: reserved (device-independent) feature bit numbers.
inline constexpr unsigned VIRTIO_F_INDIRECT_DESC = 28, VIRTIO_F_EVENT_IDX = 29, VIRTIO_F_VERSION_1 = 32,
                          VIRTIO_F_RING_PACKED = 34, VIRTIO_F_SR_IOV = 37, VIRTIO_F_NOTIFICATION_DATA = 38,
                          VIRTIO_F_NOTIF_CONFIG_DATA = 39, VIRTIO_F_RING_RESET = 40;

constexpr std::uint64_t virtio_bit(unsigned feature) { return std::uint64_t{1} << feature; }

// What a device may ask of its transport. Safe from any thread.
class VirtioTransport {
public:
    // 2.3 / 2.7.7.2: used buffers in queue `q`; dropped before DRIVER_OK.
    virtual void interrupt_queue(std::uint16_t q) = 0;
    // 2.5.1 / 4.1.4.3: bumps config_generation and notifies.
    virtual void interrupt_config() = 0;
    // 2.1.2: an unrecoverable error: sets DEVICE_NEEDS_RESET and notifies.
    virtual void needs_reset() = 0;
    // The features the driver accepted (valid once FEATURES_OK is set).
    virtual std::uint64_t driver_features() const = 0;
    // Whether the device may touch guest memory (PCI: Bus Master Enable,
    // PCI 3.0 6.2.2). While false a device processes no queue; the transport
    // holds its interrupts and kicks every queue once it turns true again.
    virtual bool dma_enabled() const { return true; }

protected:
    ~VirtioTransport() = default;
};

class VirtioDevice {
public:
    virtual ~VirtioDevice() = default;

    // 5: the virtio device ID (1 network, 5 balloon, ...).
    virtual std::uint16_t device_id() const = 0;
    // Offered features (the transport adds VERSION_1, removes what it lacks).
    virtual std::uint64_t device_features() const = 0;
    // 3.1.1 step 5: a last check of the driver's choice; false refuses FEATURES_OK.
    virtual bool accept_features(std::uint64_t /*features*/) { return true; }

    // Queue count (fixed for the device's lifetime) and each queue's maximum
    // size: a power of 2 up to 32768, or 0 for "not available" (4.1.4.3).
    virtual std::uint16_t num_queues() const = 0;
    virtual std::uint16_t max_queue_size(std::uint16_t q) const = 0;

    // 4.1.4.6: the transport only passes accesses inside [0, config_size()).
    virtual std::size_t config_size() const = 0;
    virtual void read_config(std::uint64_t offset, std::span<std::uint8_t> data) = 0;
    virtual void write_config(std::uint64_t offset, std::span<const std::uint8_t> data) = 0;

    // 3.1.1 step 8: the driver set DRIVER_OK. `queues` holds every queue;
    // those the driver enabled are ready() (and stay valid until reset()).
    virtual void activate(std::span<Virtqueue> queues, GuestMemory& mem) = 0;
    // 2.4: device_status 0 (also before any activate): stop touching the queues.
    virtual void reset() = 0;
    // 2.9 / 4.1.5.2: the driver kicked queue `q` (only after DRIVER_OK).
    virtual void queue_notify(std::uint16_t q) = 0;
    // KVM_IOEVENTFD: before the VM runs, the VMM may offer one eventfd per
    // queue (fds[q], signalled on a write to q's notify address, owned by the
    // VMM). A device that returns true reads them itself and treats a signal
    // like queue_notify(q), which stays valid either way; the first call wins.
    virtual bool take_notify_fds(std::span<const int> /*fds*/) { return false; }

    // Names the device's own thread, if it has one ("net0", "disk0", "rng").
    virtual void set_thread_name(const std::string& /*name*/) {}

    // Called by the transport that hosts the device (null to detach).
    void attach(VirtioTransport* transport) { transport_ = transport; }

protected:
    VirtioTransport* transport() const { return transport_; }
    // Shorthands that are no-ops while detached.
    void notify_used(std::uint16_t q) { if (transport_ != nullptr) transport_->interrupt_queue(q); }
    void notify_config_changed() { if (transport_ != nullptr) transport_->interrupt_config(); }
    void fail() { if (transport_ != nullptr) transport_->needs_reset(); }
    bool dma_enabled() const { return transport_ == nullptr || transport_->dma_enabled(); }

private:
    VirtioTransport* transport_ = nullptr;
};

// A device whose queues its own EventLoop serves (devices/base/event_loop.hpp):
// a kick only wakes the loop, the transport's ioeventfds go straight to it,
// and the loop's thread carries the device's name. The derived device makes
// loop_ at the end of its constructor (so the loop starts once everything it
// serves exists) and stops it first thing in its destructor (so the loop's
// thread is joined before the members it uses go).
class LoopDevice : public VirtioDevice {
public:
    void queue_notify(std::uint16_t q) final { loop_->kick(q); }
    bool take_notify_fds(std::span<const int> fds) final { return loop_->watch_queues(fds); }
    void set_thread_name(const std::string& name) final { loop_->set_thread_name(name); }
    // Waits until the loop has nothing left to do (tests).
    bool settle() { return loop_->wait_idle(); }

protected:
    std::unique_ptr<EventLoop> loop_;
};

} // namespace kguest
