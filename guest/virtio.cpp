// virtio-pci modern transport and split virtqueues, driver side (see
// virtio.hpp). Section numbers are VIRTIO 1.2's.
#include "virtio.hpp"
#include "cpu.hpp"
#include "lib.hpp"

// 4.1.4.3 struct virtio_pci_common_cfg offsets.
enum : u32 { CC_DFSELECT = 0x00, CC_DF = 0x04, CC_GFSELECT = 0x08, CC_GF = 0x0c, CC_MSIX = 0x10,
             CC_NUMQ = 0x12, CC_STATUS = 0x14, CC_CFGGEN = 0x15, CC_Q_SELECT = 0x16, CC_Q_SIZE = 0x18,
             CC_Q_MSIX = 0x1a, CC_Q_ENABLE = 0x1c, CC_Q_NOFF = 0x1e, CC_Q_DESC = 0x20, CC_Q_DRIVER = 0x28,
             CC_Q_DEVICE = 0x30, CC_SIZE = 0x38 };
// 4.1.4 virtio_pci_cap.cfg_type.
enum : u8 { CAP_COMMON = 1, CAP_NOTIFY = 2, CAP_ISR = 3, CAP_DEVICE = 4 };

// Store -> load ordering (the one x86 reorders): a locked instruction.
static inline void full_fence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- split virtqueue (2.7) ----------------------------------------------------

// Byte offsets in the used area: flags, idx, ring, avail_event.
static inline volatile u16& used_idx(volatile u8* used) { return *reinterpret_cast<volatile u16*>(used + 2); }
static inline volatile VirtqUsedElem& used_elem(volatile u8* used, u16 i) {
    return reinterpret_cast<volatile VirtqUsedElem*>(used + 4)[i];
}
static inline volatile u16& avail_event(volatile u8* used, u16 size) {
    return *reinterpret_cast<volatile u16*>(used + 4 + 8 * usize(size));
}

void Virtq::set_buffer(u16 id, void* buf, u32 len, bool device_writes) {
    desc[id].addr = u64(buf);
    desc[id].len = len;
    desc[id].flags = device_writes ? VIRTQ_DESC_F_WRITE : 0;
    desc[id].next = 0;
}

void Virtq::set_desc(u16 id, const volatile void* buf, u32 len, u16 flags, u16 next) {
    desc[id].addr = u64(buf);
    desc[id].len = len;
    desc[id].flags = flags;
    desc[id].next = next;
}

void Virtq::push(u16 id) {
    avail[2 + (avail_idx & (size - 1))] = id;  // ring[]: after flags and idx
    ++avail_idx;
}

void Virtq::publish() {
    // 2.7.13.2: the ring entries before the index (x86 keeps stores in order).
    barrier();
    avail[1] = avail_idx;
    // 2.7.13.3 / 2.7.10: the index store before reading the device's
    // suppression state, or a device going to sleep could miss the update.
    full_fence();
    u16 old = kicked_idx;
    bool kick;
    if (event_idx) {
        // vring_need_event(avail_event, new, old), 2.7.10.
        u16 ev = avail_event(used, size);
        kick = u16(avail_idx - ev - 1) < u16(avail_idx - old);
    } else {
        kick = !(*reinterpret_cast<volatile u16*>(used) & 1);  // VIRTQ_USED_F_NO_NOTIFY
    }
    kicked_idx = avail_idx;
    if (kick) {
        // 4.1.4.4: write the queue's index at its notify address.
        mmio_write<u16>(notify_addr, index);
        ++kicks;
    }
}

bool Virtq::has_used() const { return used_idx(used) != last_used; }

bool Virtq::pop(u16* id, u32* len) {
    for (;;) {
        if (used_idx(used) == last_used) return false;
        barrier();  // the index before the entry (x86 keeps loads in order)
        volatile VirtqUsedElem& e = used_elem(used, last_used & (size - 1));
        u32 i = e.id, l = e.len;
        ++last_used;
        if (i >= size) { ++bad_used; continue; }  // a device bug: skip the entry
        *id = u16(i);
        *len = l;
        return true;
    }
}

bool Virtq::enable_interrupts() {
    if (event_idx) avail[2 + size] = last_used;  // used_event: interrupt when the device passes it
    else avail[0] = 0;                          // clear VIRTQ_AVAIL_F_NO_INTERRUPT
    full_fence();                               // publish before re-checking the used index
    return has_used();
}

void Virtq::disable_interrupts() {
    if (event_idx) avail[2 + size] = u16(last_used + 0x8000);
    else avail[0] = 1;
}

// ---- transport (4.1) -------------------------------------------------------------

u8 VirtioPci::status() { return mmio_read<u8>(common + CC_STATUS); }
static void set_status(u64 common, u8 s) { mmio_write<u8>(common + CC_STATUS, s); }
u8 VirtioPci::config_generation() { return mmio_read<u8>(common + CC_CFGGEN); }

u64 VirtioPci::cfg_read64(u32 off) {
    u64 v = 0;
    for (int tries = 0; tries < 10; ++tries) {
        u8 g = config_generation();
        v = cfg_read32(off) | (u64(cfg_read32(off + 4)) << 32);
        if (config_generation() == g) break;
    }
    return v;
}

bool VirtioPci::probe(PciAddr a) {
    pci = a;
    PciBar bars[6];
    pci_setup_bars(a, bars);
    unsigned steps = 0;
    for (u8 c = pci_cap_next(a, 0); c && steps < 48; c = pci_cap_next(a, c), ++steps) {
        u8 id = pci_read8(a, c);
        if (id == PCI_CAP_ID_MSIX && !msix_cap) {
            // Message Control (table size - 1 in bits 10:0), table offset/BIR.
            u16 mc = pci_read16(a, c + 2);
            u32 tbl = pci_read32(a, c + 4);
            u8 bir = tbl & 7;
            if (bir < 6 && bars[bir].addr) {
                msix_cap = c;
                msix_size = u16((mc & 0x7ff) + 1);
                msix_table = bars[bir].addr + (tbl & ~7u);
            }
            continue;
        }
        if (id != PCI_CAP_ID_VNDR) continue;
        // 4.1.4 virtio_pci_cap: cap_len 2, cfg_type 3, bar 4, offset 8, length 12; notify multiplier 16.
        u8 cap_len = pci_read8(a, c + 2), type = pci_read8(a, c + 3), bar = pci_read8(a, c + 4);
        u32 off = pci_read32(a, c + 8), len = pci_read32(a, c + 12);
        if (cap_len < 16 || bar > 5 || !bars[bar].addr) continue;  // 4.1.4.1: ignore unusable ones
        if (u64(off) + len > bars[bar].size) continue;  // outside its BAR
        u64 at = bars[bar].addr + off;
        // 4.1.4.1: the first capability of each type the driver can use.
        switch (type) {
        case CAP_COMMON: if (!common && len >= CC_SIZE) common = at; break;
        case CAP_DEVICE: if (!device_cfg) { device_cfg = at; device_cfg_len = len; } break;
        case CAP_NOTIFY:
            if (!notify_base && cap_len >= 20 && len >= 2) {
                notify_base = at;
                notify_len = len;
                notify_mult = pci_read32(a, c + 16);
            }
            break;
        }
    }
    return common && notify_base;
}

void VirtioPci::reset() {
    // 4.1.4.3.2: write 0, then wait until device_status reads 0.
    set_status(common, 0);
    for (int i = 0; i < 1000000 && status() != 0; ++i) cpu_relax();
}

bool VirtioPci::negotiate(u64 wanted) {
    reset();
    set_status(common, VIRTIO_STATUS_ACKNOWLEDGE);                          // 3.1.1 step 2
    set_status(common, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);   // step 3
    u64 offered = 0;
    for (u32 sel = 0; sel < 2; ++sel) {                                     // step 4
        mmio_write<u32>(common + CC_DFSELECT, sel);
        offered |= u64(mmio_read<u32>(common + CC_DF)) << (32 * sel);
    }
    features = offered & wanted;
    if (!(features & VIRTIO_F_VERSION_1)) { set_status(common, VIRTIO_STATUS_FAILED); return false; }
    for (u32 sel = 0; sel < 2; ++sel) {
        mmio_write<u32>(common + CC_GFSELECT, sel);
        mmio_write<u32>(common + CC_GF, u32(features >> (32 * sel)));
    }
    u8 s = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK;
    set_status(common, s);                                                  // step 5
    if (!(status() & VIRTIO_STATUS_FEATURES_OK)) {                          // step 6
        set_status(common, s | VIRTIO_STATUS_FAILED);
        return false;
    }
    return true;
}

bool VirtioPci::msix_route(u16 entry, u8 vector) {
    if (!msix_table || entry >= msix_size) return false;
    u64 e = msix_table + 16ull * entry;
    // Address: this CPU's LAPIC (physical); data: fixed, edge, the vector (SDM vol. 3, 11.11).
    mmio_write<u32>(e + 0, 0xfee00000u | (apic_id() << 12));
    mmio_write<u32>(e + 4, 0);
    mmio_write<u32>(e + 8, vector);
    mmio_write<u32>(e + 12, 0);  // vector control: unmasked
    return true;
}

void VirtioPci::msix_enable() {
    if (!msix_cap) return;
    u16 mc = pci_read16(pci, msix_cap + 2);
    mc = u16((mc | 0x8000) & ~0x4000);  // MSI-X enable, function mask off
    pci_write16(pci, msix_cap + 2, mc);
    // With MSI-X on, INTx is off by definition; say so in Command too.
    pci_write16(pci, PCI_COMMAND, u16(pci_read16(pci, PCI_COMMAND) | PCI_CMD_INTX_DISABLE));
}

u16 VirtioPci::set_config_vector(u16 entry) {
    mmio_write<u16>(common + CC_MSIX, entry);
    return mmio_read<u16>(common + CC_MSIX);
}

bool VirtioPci::setup_queue(u16 q, Virtq* vq, u8* mem, u16 vector_entry, bool* vector_ok) {
    // 4.1.5.1.3: select, read the maximum size, write ours and the areas.
    if (q >= mmio_read<u16>(common + CC_NUMQ)) return false;
    mmio_write<u16>(common + CC_Q_SELECT, q);
    u16 max = mmio_read<u16>(common + CC_Q_SIZE);
    if (max == 0 || mmio_read<u16>(common + CC_Q_ENABLE)) return false;  // absent, or live before reset
    u16 size = 1;
    while (u32(size) * 2 <= max && size * 2 <= kMaxQueueSize) size = u16(size * 2);  // 2.7: a power of 2
    memset(mem, 0, kQueueMemSize);
    *vq = Virtq{};
    vq->index = q;
    vq->size = size;
    vq->desc = reinterpret_cast<volatile VirtqDesc*>(mem);          // 16-byte aligned (2.7: table 2.7.5)
    vq->avail = reinterpret_cast<volatile u16*>(mem + 4096);        // 2-byte aligned
    vq->used = mem + 8192;                                          // 4-byte aligned
    vq->event_idx = (features & VIRTIO_F_EVENT_IDX) != 0;
    // 4.1.4.4: the queue's notify address; it must lie inside the notify region.
    u64 notify_off = u64(mmio_read<u16>(common + CC_Q_NOFF)) * notify_mult;
    if (notify_off + 2 > notify_len) return false;
    vq->notify_addr = notify_base + notify_off;
    mmio_write<u16>(common + CC_Q_SIZE, size);
    auto write64 = [&](u32 off, u64 v) {  // two 32-bit halves, low first (4.1.3.1)
        mmio_write<u32>(common + off, u32(v));
        mmio_write<u32>(common + off + 4, u32(v >> 32));
    };
    write64(CC_Q_DESC, u64(vq->desc));
    write64(CC_Q_DRIVER, u64(vq->avail));
    write64(CC_Q_DEVICE, u64(vq->used));
    mmio_write<u16>(common + CC_Q_MSIX, vector_entry);
    *vector_ok = mmio_read<u16>(common + CC_Q_MSIX) == vector_entry && vector_entry != VIRTIO_NO_VECTOR;
    mmio_write<u16>(common + CC_Q_ENABLE, 1);
    return true;
}

void VirtioPci::driver_ok() {
    set_status(common, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK |
                           VIRTIO_STATUS_DRIVER_OK);
}
