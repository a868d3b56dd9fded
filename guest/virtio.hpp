// virtio-pci modern transport and split virtqueues, driver side, for the small
// guest (VIRTIO 1.2: 4.1 PCI transport, 3.1.1 initialisation, 2.7 split
// virtqueues with VIRTIO_F_EVENT_IDX). Everything lives in static storage,
// addresses are identity-mapped, and interrupts arrive through MSI-X on vectors
// the caller registers. Indexes and lengths the device writes are checked.
#pragma once

#include "arch.hpp"
#include "pci.hpp"

// 2.1 device status bits.
enum : u8 { VIRTIO_STATUS_ACKNOWLEDGE = 1, VIRTIO_STATUS_DRIVER = 2, VIRTIO_STATUS_DRIVER_OK = 4,
            VIRTIO_STATUS_FEATURES_OK = 8, VIRTIO_STATUS_NEEDS_RESET = 64, VIRTIO_STATUS_FAILED = 128 };
// 6 reserved feature bits used here.
constexpr u64 VIRTIO_F_EVENT_IDX = 1ull << 29, VIRTIO_F_VERSION_1 = 1ull << 32;
constexpr u16 VIRTIO_NO_VECTOR = 0xffff;  // 4.1.5.1.2

// 2.7.5 - 2.7.8: the split virtqueue's three areas.
struct VirtqDesc { u64 addr; u32 len; u16 flags, next; };
enum : u16 { VIRTQ_DESC_F_NEXT = 1, VIRTQ_DESC_F_WRITE = 2 };
struct VirtqUsedElem { u32 id, len; };
constexpr u16 kMaxQueueSize = 256;

// One split virtqueue. Descriptor i is bound to the caller's buffer i
// (set_buffer), so buffers go and come back by index: no descriptor free list.
// Plain data (no constructors run in this guest): zero-initialise it.
struct Virtq {
    u16 index, size;
    volatile VirtqDesc* desc;
    volatile u16* avail;  // flags, idx, ring[size], used_event
    volatile u8* used;    // flags, idx, ring[size] {id, len}, avail_event
    u16 avail_idx, kicked_idx;  // our copy of avail->idx; its value at the last kick
    u16 last_used;              // next used entry to read
    u64 notify_addr;
    bool event_idx;
    u64 kicks, bad_used;

    void set_buffer(u16 id, void* buf, u32 len, bool device_writes);
    // Descriptor `id` as one link of a chain (2.7.5): flags may hold
    // VIRTQ_DESC_F_NEXT (then `next` is the following link) and _WRITE.
    void set_desc(u16 id, const volatile void* buf, u32 len, u16 flags, u16 next);
    void set_len(u16 id, u32 len) { desc[id].len = len; }
    // Puts buffer `id` in the avail ring (not yet visible: publish()).
    void push(u16 id);
    // Makes pushed buffers visible and notifies the device if it asked to be
    // (2.7.13.2-2.7.13.4; avail_event with EVENT_IDX, else used->flags).
    void publish();
    // The next used buffer, false when none. Rejects ids >= size (bad_used).
    bool pop(u16* id, u32* len);
    bool has_used() const;
    // Asks for an interrupt at the next used buffer (2.7.10) and says whether
    // one is already there, which the caller must process instead of sleeping.
    bool enable_interrupts();
    // Asks for no interrupt soon (with EVENT_IDX, used_event half the ring ahead).
    void disable_interrupts();
};

struct VirtioPci {
    PciAddr pci;
    u64 common, device_cfg, notify_base;
    u32 notify_mult, notify_len, device_cfg_len;
    u64 msix_table;  // 0: no MSI-X
    u16 msix_size;   // table entries
    u8 msix_cap;
    u64 features;    // negotiated

    // Finds the capabilities (4.1.4), sets up BARs; false when a required
    // structure is missing.
    bool probe(PciAddr a);
    // 3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, feature negotiation,
    // FEATURES_OK and its re-check. `wanted` must include VERSION_1.
    bool negotiate(u64 wanted);
    // MSI-X (PCI 3.0 §6.8.2): table entry `entry` -> this CPU, `vector`,
    // unmasked; the function enabled. False without MSI-X or entry out of range.
    bool msix_route(u16 entry, u8 vector);
    void msix_enable();
    // 4.1.5.1.2: config_msix_vector; returns what the device kept (0xffff: refused).
    u16 set_config_vector(u16 entry);
    // 4.1.5.1.3: sets up queue q (size capped at kMaxQueueSize, areas in `mem`
    // of at least queue_mem_size()) with MSI-X entry `vector_entry`
    // (VIRTIO_NO_VECTOR for none). *vector_ok says whether the device kept it.
    bool setup_queue(u16 q, Virtq* vq, u8* mem, u16 vector_entry, bool* vector_ok);
    void driver_ok();
    void reset();
    u8 status();
    u8 cfg_read8(u32 off) { return off < device_cfg_len ? mmio_read<u8>(device_cfg + off) : 0; }
    u16 cfg_read16(u32 off) { return off + 2 <= device_cfg_len ? mmio_read<u16>(device_cfg + off) : 0; }
    u32 cfg_read32(u32 off) { return off + 4 <= device_cfg_len ? mmio_read<u32>(device_cfg + off) : 0; }
    // A 64-bit field as two 32-bit reads, retried until config_generation
    // is the same before and after (4.1.3.1, 2.5.1).
    u64 cfg_read64(u32 off);
    u8 config_generation();
};
// Bytes of static memory one queue needs (desc, avail, used; page-aligned areas).
constexpr usize kQueueMemSize = 3 * 4096;
