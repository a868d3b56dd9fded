// virtio-mem (VIRTIO 1.2 section 5.15), the device half: a guest-physical
// region above all RAM (GuestMemory's hotplug region, not RAM for E820),
// split into 2 MiB blocks, one transparent huge page each. The host sets
// requested_size; the driver plugs and unplugs blocks on the one queue
// (guest-request) until plugged_size matches. Which blocks are plugged is
// GuestMemory's map of the hotplug region (hotplug_block_plugged()), which
// this device alone writes and the balloon reads. Plugging costs nothing up
// front (the mapping is MAP_NORESERVE, the guest's first touch faults a huge
// page in); unplugged blocks go back to the host at once (MADV_DONTNEED) and
// read as zero afterwards.
//
// Requests (5.15.6): PLUG, UNPLUG, UNPLUG_ALL, STATE, answered as the device
// requirements of each request in 5.15.6 say: ERROR for an unaligned address, zero
// blocks, a range reaching outside the usable region, plugging a plugged
// block or unplugging an unplugged one; NACK for a PLUG that would take
// plugged_size past requested_size (5.15: "Once the plugged_size is greater
// or equal to the requested_size, requests to plug memory blocks will be
// rejected"; Linux's uapi header names NACK for it); BUSY when the host could
// not give the memory back; ERROR for an unknown request type. A chain too
// short for the 24-byte request or the 10-byte response is a broken ring:
// DEVICE_NEEDS_RESET.
//
// usable_region_size is the whole region from the start (5.15.4: "MUST set
// usable_region_size to requested_size or greater"), so it never changes.
// Feature offered: VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE (the driver must not
// read unplugged blocks; nothing else of the device depends on it). Not
// offered: ACPI_PXM (node_id reads 0; kguest has one NUMA node).
//
// Reset: 5.15.5 "The device MUST NOT change the state of memory blocks during
// device reset", so a reset forgets the queue and keeps the bitmap; the
// driver finds plugged_size > 0 and sends UNPLUG_ALL (Linux does). kguest
// never restarts a guest, so the system reset that SHOULD unplug everything
// (5.15.6) does not happen.
//
// Threading: the device runs on its own EventLoop (devices/base/event_loop.hpp).
// Only the loop thread touches the queue, writes the plugged-block map and
// calls madvise; a kick only flags the queue and each pass serves at most
// kBudget requests. The host-side
// calls (set_requested_size, status, counters) may come from any thread and
// never wait for the loop: they take a short lock (mu_) that the loop takes
// only to publish plugged_size and counters.
//
// The guest is hostile: every address and count is checked without overflow
// (nb_blocks is a le16, so one request covers at most 65535 blocks: 128 GiB),
// each rejected request is counted and logged (rate-limited).
#pragma once

#include "devices/virtio.hpp"
#include "devices/virtqueue.hpp"
#include "devices/base/event_loop.hpp"
#include "devices/base/log.hpp"

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>

namespace kguest {

// 5.15.3: feature bits.
inline constexpr unsigned VIRTIO_MEM_F_ACPI_PXM = 0, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1;
// 5.15.6: request and response types, block states.
inline constexpr std::uint16_t VIRTIO_MEM_REQ_PLUG = 0, VIRTIO_MEM_REQ_UNPLUG = 1, VIRTIO_MEM_REQ_UNPLUG_ALL = 2,
                               VIRTIO_MEM_REQ_STATE = 3;
inline constexpr std::uint16_t VIRTIO_MEM_RESP_ACK = 0, VIRTIO_MEM_RESP_NACK = 1, VIRTIO_MEM_RESP_BUSY = 2,
                               VIRTIO_MEM_RESP_ERROR = 3;
inline constexpr std::uint16_t VIRTIO_MEM_STATE_PLUGGED = 0, VIRTIO_MEM_STATE_UNPLUGGED = 1,
                               VIRTIO_MEM_STATE_MIXED = 2;

// 5.15.4: the configuration space, little-endian (as the host).
struct VirtioMemConfig {
    std::uint64_t block_size;
    std::uint16_t node_id;
    std::uint8_t padding[6];
    std::uint64_t addr;
    std::uint64_t region_size;
    std::uint64_t usable_region_size;
    std::uint64_t plugged_size;
    std::uint64_t requested_size;
};
static_assert(sizeof(VirtioMemConfig) == 56);

struct VirtioMemCounters {
    std::uint64_t requests = 0;
    std::uint64_t acks = 0, nacks = 0, busy = 0, errors = 0;
    std::uint64_t bad_chains = 0;   // malformed rings or short requests: DEVICE_NEEDS_RESET
};

class VirtioMem : public LoopDevice {
public:
    static constexpr std::uint64_t kBlockSize = kHugePageSize;
    static constexpr std::uint16_t kQueueSize = 128;
    static constexpr int kBudget = 16;   // requests per service pass
    static constexpr std::size_t kRequestSize = 24, kResponseSize = 10;   // 5.15.6

    // Manages mem's hotplug region (throws std::invalid_argument without
    // one). Starts the loop; throws SysError.
    explicit VirtioMem(GuestMemory& mem);
    ~VirtioMem() override;

    // The host's side. requested_size must be a multiple of kBlockSize and
    // at most region_size: false otherwise, nothing changed. A change sends a
    // configuration change notification (5.15.4).
    bool set_requested_size(std::uint64_t bytes);
    VirtioMemConfig config() const;
    VirtioMemCounters counters() const;
    // For tests (asks the loop): whether block i is plugged; settling.
    bool block_plugged(std::uint64_t i) const;

    // VirtioDevice.
    std::uint16_t device_id() const override { return 24; }
    std::uint64_t device_features() const override;
    std::uint16_t num_queues() const override { return 1; }
    std::uint16_t max_queue_size(std::uint16_t q) const override { return q == 0 ? kQueueSize : 0; }
    std::size_t config_size() const override { return sizeof(VirtioMemConfig); }
    void read_config(std::uint64_t offset, std::span<std::uint8_t> data) override;
    void write_config(std::uint64_t, std::span<const std::uint8_t>) override {}   // 5.15.4: read-only
    void activate(std::span<Virtqueue> queues, GuestMemory& mem) override;
    void reset() override;

private:
    // On the loop.
    bool service(std::uint16_t q);
    std::uint16_t handle(const DescChain& chain, std::uint16_t& state);
    // ERROR unless [addr, addr + nb * block) is aligned, non-empty and inside
    // the usable region; then `first` is its first block index.
    bool valid_range(std::uint64_t addr, std::uint16_t nb, std::uint64_t& first) const;
    std::uint16_t plug(std::uint64_t addr, std::uint16_t nb);
    std::uint16_t unplug(std::uint64_t addr, std::uint16_t nb);
    std::uint16_t unplug_all();
    std::uint16_t state(std::uint64_t addr, std::uint16_t nb, std::uint16_t& out);
    bool discard(std::uint64_t first, std::uint64_t count);
    void reject(const char* what, std::uint64_t addr, std::uint16_t nb, std::uint16_t resp);

    GuestMemory& mem_;
    const std::uint64_t addr_, region_size_, blocks_;

    mutable std::mutex mu_;   // never held across guest-driven work
    std::uint64_t requested_ = 0;
    std::uint64_t plugged_ = 0;   // bytes, published by the loop
    VirtioMemCounters counters_;

    // Loop thread only.
    std::span<Virtqueue> queues_;     // empty while not active
    RateLimit log_limit_{5};
};

} // namespace kguest
