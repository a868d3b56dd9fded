// virtio-blk (VIRTIO 1.2 section 5.2), the device half: serves block requests
// from one or more request queues (MQ) on a BlockImage (block_image.hpp).
// A request (5.2.6) is a 16-byte header {le32 type, le32 reserved, le64
// sector} in the readable part, the data, and one status byte, the last
// writable byte. IN/OUT go through io_uring readv/writev straight between the
// image and guest RAM (the iovecs come from DescChain::append_iovecs, no
// copy); FLUSH is an fdatasync; DISCARD punches holes and WRITE_ZEROES
// zeroes ranges (fallocate), GET_ID returns the 20-byte serial. With
// writeback=0 (CONFIG_WCE) or without FLUSH negotiated, writes carry
// RWF_DSYNC, so an OUT completes only once it is on stable storage.
//
// Threading: the device runs on its own EventLoop (devices/base/event_loop.hpp
// documents the model); only the loop thread touches the queues, guest memory
// and the requests after construction. Up to a queue's size requests per
// queue are in flight; a used element is published only after its request
// completed, with the bytes written into guest memory (status included) as
// its length, and interrupts go out once per batch of completions.
// queue_notify() only kicks the loop. activate(), reset() and
// take_notify_fds() run their part on the loop and wait for it; reset() also
// waits until no request is in flight, so after it returns no I/O writes into
// guest memory. read_config/write_config run under the transport's lock
// (writeback is an atomic); counters() is safe from any thread. Nothing on
// the guest-driven paths throws: a request that cannot carry a status (no
// header, no writable status byte) is a broken ring, which puts that queue
// (only) into DEVICE_NEEDS_RESET with one rate-limited log line; every other
// bad request gets IOERR or UNSUPP.
#pragma once

#include "devices/block_image.hpp"
#include "devices/virtio.hpp"
#include "devices/base/event_loop.hpp"
#include "devices/base/log.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace kguest {

// 5.2.3: feature bits.
inline constexpr unsigned VIRTIO_BLK_F_SIZE_MAX = 1, VIRTIO_BLK_F_SEG_MAX = 2, VIRTIO_BLK_F_RO = 5,
                          VIRTIO_BLK_F_BLK_SIZE = 6, VIRTIO_BLK_F_FLUSH = 9, VIRTIO_BLK_F_CONFIG_WCE = 11,
                          VIRTIO_BLK_F_MQ = 12, VIRTIO_BLK_F_DISCARD = 13, VIRTIO_BLK_F_WRITE_ZEROES = 14;
// 5.2.6: request types and status values.
inline constexpr std::uint32_t VIRTIO_BLK_T_IN = 0, VIRTIO_BLK_T_OUT = 1, VIRTIO_BLK_T_FLUSH = 4,
                               VIRTIO_BLK_T_GET_ID = 8, VIRTIO_BLK_T_DISCARD = 11, VIRTIO_BLK_T_WRITE_ZEROES = 13;
inline constexpr std::uint8_t VIRTIO_BLK_S_OK = 0, VIRTIO_BLK_S_IOERR = 1, VIRTIO_BLK_S_UNSUPP = 2;
// 5.2.6: struct virtio_blk_discard_write_zeroes flags.
inline constexpr std::uint32_t VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;

// 5.2.6: struct virtio_blk_req's header, little-endian.
struct VirtioBlkReqHdr {
    std::uint32_t type;
    std::uint32_t reserved;
    std::uint64_t sector;
};
static_assert(sizeof(VirtioBlkReqHdr) == 16);

// 5.2.6: struct virtio_blk_discard_write_zeroes.
struct VirtioBlkDiscardSeg {
    std::uint64_t sector;
    std::uint32_t num_sectors;
    std::uint32_t flags;
};
static_assert(sizeof(VirtioBlkDiscardSeg) == 16);

// 5.2.4: struct virtio_blk_config (through the secure erase fields, unused).
struct __attribute__((packed)) VirtioBlkConfig {
    std::uint64_t capacity;   // in 512-byte sectors
    std::uint32_t size_max;
    std::uint32_t seg_max;
    std::uint16_t cylinders;
    std::uint8_t heads;
    std::uint8_t sectors;
    std::uint32_t blk_size;
    std::uint8_t physical_block_exp;
    std::uint8_t alignment_offset;
    std::uint16_t min_io_size;
    std::uint32_t opt_io_size;
    std::uint8_t writeback;
    std::uint8_t unused0;
    std::uint16_t num_queues;
    std::uint32_t max_discard_sectors;
    std::uint32_t max_discard_seg;
    std::uint32_t discard_sector_alignment;
    std::uint32_t max_write_zeroes_sectors;
    std::uint32_t max_write_zeroes_seg;
    std::uint8_t write_zeroes_may_unmap;
    std::uint8_t unused1[3];
    std::uint32_t max_secure_erase_sectors;
    std::uint32_t max_secure_erase_seg;
    std::uint32_t secure_erase_sector_alignment;
};
static_assert(sizeof(VirtioBlkConfig) == 72);

// Per-disk request counters for vm.counters (data bytes, status excluded).
struct BlkCounters {
    std::uint64_t reads = 0, read_bytes = 0;
    std::uint64_t writes = 0, write_bytes = 0;
    std::uint64_t flushes = 0;
    std::uint64_t discards = 0, discard_bytes = 0;          // DISCARD and WRITE_ZEROES
    std::uint64_t errors = 0;                              // requests answered IOERR or UNSUPP
};

class VirtioBlk final : public LoopDevice {
public:
    static constexpr std::uint16_t kQueueSize = 256;
    static constexpr std::uint32_t kSegMax = kQueueSize - 2;   // data segments besides header and status
    static constexpr std::uint32_t kSizeMax = 1u << 20;        // bytes per segment
    static constexpr std::uint32_t kMaxDiscardSectors = 1u << 22;   // 2 GiB per segment
    static constexpr std::uint32_t kMaxDiscardSeg = 32;

    // Starts the event loop. `queues` request queues (1..kMaxBlkQueues); with
    // `discard`, DISCARD and WRITE_ZEROES are offered. Throws SysError, or
    // std::invalid_argument on a bad queue count.
    VirtioBlk(std::unique_ptr<BlockImage> image, unsigned queues, bool discard);
    ~VirtioBlk() override;   // resets, then stops and joins the loop

    VirtioBlk(const VirtioBlk&) = delete;
    VirtioBlk& operator=(const VirtioBlk&) = delete;

    // VirtioDevice.
    std::uint16_t device_id() const override { return 2; }
    std::uint64_t device_features() const override { return features_; }
    std::uint16_t num_queues() const override { return num_queues_; }
    std::uint16_t max_queue_size(std::uint16_t q) const override { return q < num_queues_ ? kQueueSize : 0; }
    std::size_t config_size() const override { return sizeof(VirtioBlkConfig); }
    void read_config(std::uint64_t offset, std::span<std::uint8_t> data) override;
    void write_config(std::uint64_t offset, std::span<const std::uint8_t> data) override;
    void activate(std::span<Virtqueue> queues, GuestMemory& mem) override;
    void reset() override;

    const BlockImage& image() const { return *image_; }
    BlkCounters counters() const;
    bool writeback() const { return writeback_.load(std::memory_order_relaxed) != 0; }
    // Waits until the loop has no queue left to service (tests).

private:
    struct Req;
    struct Queue;

    bool service(std::uint16_t q);
    bool start(std::uint16_t q, const DescChain& c);
    void submit_io(Req& r);
    void submit_range(Req& r);
    void io_done(Req& r, int res);
    void finish(Req& r, std::uint8_t status);
    std::uint8_t check_ranges(Req& r, const DescChain& c);
    void do_activate(std::span<Virtqueue> queues, GuestMemory& mem, std::uint64_t features);
    bool queue_error(std::uint16_t q, const char* reason);   // false, for `return queue_error(...)`
    void maybe_notify(std::uint16_t q);

    // Fixed at construction.
    std::unique_ptr<BlockImage> image_;
    std::uint16_t num_queues_;
    bool discard_;
    std::uint64_t features_;
    VirtioBlkConfig config_{};
    std::atomic<std::uint8_t> writeback_{1};

    // Loop-thread state.
    bool active_ = false;
    bool quiescing_ = false;   // reset() waits: completions touch no ring
    std::span<Virtqueue> queues_;
    GuestMemory* mem_ = nullptr;
    std::uint64_t negotiated_ = 0;
    std::vector<std::unique_ptr<Queue>> q_;
    RateLimit log_limit_{5};

    // Requests in flight (loop thread writes; reset() waits on it).
    std::atomic<unsigned> in_flight_{0};
    std::atomic<std::uint64_t> reads_{0}, read_bytes_{0}, writes_{0}, write_bytes_{0}, flushes_{0}, discards_{0},
        discard_bytes_{0}, errors_{0};
};

} // namespace kguest
