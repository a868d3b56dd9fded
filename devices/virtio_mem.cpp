// virtio-mem device model (VIRTIO 1.2 section 5.15): configuration space,
// the guest-request queue its EventLoop serves, and the plugged-block bitmap
// (see virtio_mem.hpp).
#include "devices/virtio_mem.hpp"

#include <atomic>
#include <cstring>
#include <stdexcept>

namespace kguest {

namespace {

const MemoryRegion& hotplug_of(const GuestMemory& mem) {
    const MemoryRegion* r = mem.hotplug_region();
    if (r == nullptr) throw std::invalid_argument("virtio-mem needs a hotplug region (--memory-max)");
    return *r;
}

const char* resp_name(std::uint16_t r) {
    switch (r) {
    case VIRTIO_MEM_RESP_ACK: return "ACK";
    case VIRTIO_MEM_RESP_NACK: return "NACK";
    case VIRTIO_MEM_RESP_BUSY: return "BUSY";
    default: return "ERROR";
    }
}

} // namespace

VirtioMem::VirtioMem(GuestMemory& mem)
    : mem_(mem), addr_(hotplug_of(mem).gpa.value()), region_size_(hotplug_of(mem).size),
      blocks_(region_size_ / kBlockSize) {
    loop_ = std::make_unique<EventLoop>("virtio-mem", 1, [this](std::uint16_t q) { return service(q); });
}

VirtioMem::~VirtioMem() { loop_->stop(); }

std::uint64_t VirtioMem::device_features() const {
    return virtio_bit(VIRTIO_F_INDIRECT_DESC) | virtio_bit(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE);
}

// ---- Configuration space (5.15.4) ----

VirtioMemConfig VirtioMem::config() const {
    VirtioMemConfig c{};
    c.block_size = kBlockSize;
    c.addr = addr_;
    c.region_size = region_size_;
    c.usable_region_size = region_size_;
    std::lock_guard lock(mu_);
    c.plugged_size = plugged_;
    c.requested_size = requested_;
    return c;
}

void VirtioMem::read_config(std::uint64_t offset, std::span<std::uint8_t> data) {
    const VirtioMemConfig c = config();
    std::uint8_t img[sizeof c];
    std::memcpy(img, &c, sizeof c);   // le fields: the host is little-endian
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = offset + i < sizeof img ? img[offset + i] : 0xff;
}

bool VirtioMem::set_requested_size(std::uint64_t bytes) {
    if (bytes % kBlockSize != 0 || bytes > region_size_) return false;
    {
        std::lock_guard lock(mu_);
        requested_ = bytes;
    }
    notify_config_changed();   // 5.15.4: MUST notify on a requested_size change
    return true;
}

VirtioMemCounters VirtioMem::counters() const {
    std::lock_guard lock(mu_);
    return counters_;
}

bool VirtioMem::block_plugged(std::uint64_t i) const {
    auto in = std::make_shared<std::atomic<bool>>(false);
    loop_->run_and_wait([this, in, i] { in->store(mem_.hotplug_block_plugged(i)); });
    return in->load();
}

// ---- Lifecycle ----

void VirtioMem::activate(std::span<Virtqueue> queues, GuestMemory& /*mem*/) {
    loop_->run_and_wait([this, queues] {
        queues_ = queues;
        // A request added and kicked before DRIVER_OK lost its kick.
        if (service(0)) loop_->mark(0);
    });
}

void VirtioMem::reset() {
    // 5.15.5: the blocks keep their state; only the queue is forgotten.
    loop_->run_and_wait([this] { queues_ = {}; });
}

// ---- The queue, on the loop ----

bool VirtioMem::service(std::uint16_t q) {
    // Bus Master Enable off (PCI 3.0 6.2.2): nothing until the transport kicks again.
    if (q != 0 || queues_.empty() || !queues_[0].ready() || !dma_enabled()) return false;
    Virtqueue& vq = queues_[0];
    bool broken = false;
    const Virtqueue::Pass pass = vq.service(kBudget, [&](const DescChain& chain) {
        // 5.15.6: a 24-byte request, then room for the 10-byte response.
        if (chain.readable_len() < kRequestSize || chain.writable_len() < kResponseSize) {
            broken = true;
            return false;
        }
        std::uint16_t st = 0;
        const std::uint16_t resp = handle(chain, st);
        std::uint8_t out[kResponseSize] = {};
        out[0] = static_cast<std::uint8_t>(resp);
        out[1] = static_cast<std::uint8_t>(resp >> 8);
        out[8] = static_cast<std::uint8_t>(st);
        out[9] = static_cast<std::uint8_t>(st >> 8);
        chain.write(mem_, 0, out, sizeof out);   // fits: checked above
        vq.push_used(chain.head(), kResponseSize);
        std::lock_guard lock(mu_);
        ++counters_.requests;
        switch (resp) {
        case VIRTIO_MEM_RESP_ACK: ++counters_.acks; break;
        case VIRTIO_MEM_RESP_NACK: ++counters_.nacks; break;
        case VIRTIO_MEM_RESP_BUSY: ++counters_.busy; break;
        default: ++counters_.errors; break;
        }
        return true;
    });
    if (pass == Virtqueue::Pass::error || broken) {
        {
            std::lock_guard lock(mu_);
            ++counters_.bad_chains;
        }
        KGUEST_LOG_LIMITED(log_limit_, "virtio-mem: guest-request: %s; device needs reset",
                           broken ? "a request chain shorter than 24 readable + 10 writable bytes"
                                  : vq.error().reason);
        fail();
    }
    if (!vq.failed() && vq.needs_notification()) notify_used(0);
    return pass == Virtqueue::Pass::more;
}

std::uint16_t VirtioMem::handle(const DescChain& chain, std::uint16_t& st) {
    // 5.15.6: le16 type, 6 bytes padding, then { le64 addr; le16 nb_blocks;
    // 6 bytes padding } (the same layout for PLUG, UNPLUG and STATE). The
    // device MUST ignore the padding.
    std::uint8_t req[kRequestSize];
    if (!chain.read(mem_, 0, req, sizeof req)) return VIRTIO_MEM_RESP_ERROR;   // cannot happen: length checked
    const std::uint16_t type = static_cast<std::uint16_t>(req[0] | req[1] << 8);
    std::uint64_t addr = 0;
    std::memcpy(&addr, req + 8, 8);
    const std::uint16_t nb = static_cast<std::uint16_t>(req[16] | req[17] << 8);
    switch (type) {
    case VIRTIO_MEM_REQ_PLUG: return plug(addr, nb);
    case VIRTIO_MEM_REQ_UNPLUG: return unplug(addr, nb);
    case VIRTIO_MEM_REQ_UNPLUG_ALL: return unplug_all();
    case VIRTIO_MEM_REQ_STATE: return state(addr, nb, st);
    default:
        KGUEST_LOG_LIMITED(log_limit_, "virtio-mem: unknown request type %u: ERROR", static_cast<unsigned>(type));
        return VIRTIO_MEM_RESP_ERROR;
    }
}

bool VirtioMem::valid_range(std::uint64_t addr, std::uint16_t nb, std::uint64_t& first) const {
    // 5.15.6, PLUG request (and the same for UNPLUG and STATE): ERROR "if addr is not
    // aligned to the block_size ..., if nb_blocks is not greater than 0, or if
    // any memory block outside of the usable device-managed memory region is
    // covered by the request". No sum below can overflow.
    if (nb == 0 || addr % kBlockSize != 0 || addr < addr_) return false;
    const std::uint64_t off = addr - addr_;
    if (off >= region_size_ || std::uint64_t{nb} * kBlockSize > region_size_ - off) return false;
    first = off / kBlockSize;
    return true;
}

void VirtioMem::reject(const char* what, std::uint64_t addr, std::uint16_t nb, std::uint16_t resp) {
    KGUEST_LOG_LIMITED(log_limit_, "virtio-mem: %s of %u block(s) at 0x%llx: %s", what, static_cast<unsigned>(nb),
                       static_cast<unsigned long long>(addr), resp_name(resp));
}

std::uint16_t VirtioMem::plug(std::uint64_t addr, std::uint16_t nb) {
    std::uint64_t first = 0;
    if (!valid_range(addr, nb, first)) {
        reject("PLUG outside the region, unaligned or empty", addr, nb, VIRTIO_MEM_RESP_ERROR);
        return VIRTIO_MEM_RESP_ERROR;
    }
    const std::uint64_t bytes = std::uint64_t{nb} * kBlockSize;
    {
        std::lock_guard lock(mu_);
        if (plugged_ + bytes > requested_) {   // both at most region_size_: no overflow
            reject("PLUG past requested_size", addr, nb, VIRTIO_MEM_RESP_NACK);
            return VIRTIO_MEM_RESP_NACK;
        }
    }
    // 5.15.6, PLUG request: ERROR "if any memory block covered by the request is already plugged".
    for (std::uint64_t i = first; i < first + nb; ++i)
        if (mem_.hotplug_block_plugged(i)) {
            reject("PLUG of a plugged block", addr, nb, VIRTIO_MEM_RESP_ERROR);
            return VIRTIO_MEM_RESP_ERROR;
        }
    // Nothing to map: the region is mapped for KVM already, and the guest's
    // first touch of a block faults a (huge) page in.
    for (std::uint64_t i = first; i < first + nb; ++i) mem_.set_hotplug_block_plugged(i, true);
    std::lock_guard lock(mu_);
    plugged_ += bytes;
    return VIRTIO_MEM_RESP_ACK;
}

bool VirtioMem::discard(std::uint64_t first, std::uint64_t count) {
    return mem_.discard(Gpa(addr_ + first * kBlockSize), count * kBlockSize);
}

std::uint16_t VirtioMem::unplug(std::uint64_t addr, std::uint16_t nb) {
    std::uint64_t first = 0;
    if (!valid_range(addr, nb, first)) {
        reject("UNPLUG outside the region, unaligned or empty", addr, nb, VIRTIO_MEM_RESP_ERROR);
        return VIRTIO_MEM_RESP_ERROR;
    }
    // 5.15.6, UNPLUG request: ERROR "if any memory block covered by the request is already unplugged".
    for (std::uint64_t i = first; i < first + nb; ++i)
        if (!mem_.hotplug_block_plugged(i)) {
            reject("UNPLUG of an unplugged block", addr, nb, VIRTIO_MEM_RESP_ERROR);
            return VIRTIO_MEM_RESP_ERROR;
        }
    // 5.15.6, UNPLUG request: BUSY "if the request can currently not be processed".
    if (!discard(first, nb)) {
        reject("UNPLUG: madvise(MADV_DONTNEED) failed", addr, nb, VIRTIO_MEM_RESP_BUSY);
        return VIRTIO_MEM_RESP_BUSY;
    }
    for (std::uint64_t i = first; i < first + nb; ++i) mem_.set_hotplug_block_plugged(i, false);
    std::lock_guard lock(mu_);
    plugged_ -= std::uint64_t{nb} * kBlockSize;
    return VIRTIO_MEM_RESP_ACK;
}

std::uint16_t VirtioMem::unplug_all() {
    // Every run of plugged blocks goes back in one madvise. At most blocks_
    // bits are walked: bounded by the region, not by the guest.
    bool ok = true;
    for (std::uint64_t i = 0; i < blocks_;) {
        if (!mem_.hotplug_block_plugged(i)) {
            ++i;
            continue;
        }
        std::uint64_t j = i;
        while (j < blocks_ && mem_.hotplug_block_plugged(j)) ++j;
        if (discard(i, j - i)) {
            for (std::uint64_t k = i; k < j; ++k) mem_.set_hotplug_block_plugged(k, false);
            std::lock_guard lock(mu_);
            plugged_ -= (j - i) * kBlockSize;
        } else {
            ok = false;
        }
        i = j;
    }
    if (!ok) {
        reject("UNPLUG_ALL: madvise(MADV_DONTNEED) failed", addr_, 0, VIRTIO_MEM_RESP_BUSY);
        return VIRTIO_MEM_RESP_BUSY;   // 5.15.6, UNPLUG ALL request: MAY reject with BUSY
    }
    return VIRTIO_MEM_RESP_ACK;   // plugged_size is 0 (5.15.6, UNPLUG ALL request)
}

std::uint16_t VirtioMem::state(std::uint64_t addr, std::uint16_t nb, std::uint16_t& out) {
    std::uint64_t first = 0;
    if (!valid_range(addr, nb, first)) {
        reject("STATE outside the region, unaligned or empty", addr, nb, VIRTIO_MEM_RESP_ERROR);
        return VIRTIO_MEM_RESP_ERROR;
    }
    std::uint64_t n_plugged = 0;
    for (std::uint64_t i = first; i < first + nb; ++i) n_plugged += mem_.hotplug_block_plugged(i);
    out = n_plugged == nb ? VIRTIO_MEM_STATE_PLUGGED
        : n_plugged == 0  ? VIRTIO_MEM_STATE_UNPLUGGED
                          : VIRTIO_MEM_STATE_MIXED;
    return VIRTIO_MEM_RESP_ACK;
}

} // namespace kguest
