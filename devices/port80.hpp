// Port 0x80, the POST-code / "I/O delay" port. Linux's native_io_delay()
// writes it around slow ISA accesses and firmware writes POST codes to it. A
// guest's writes must never reach the real port (CVE-2017-1000407: flooding it
// hung hosts), so it is always emulated here:
//   - writes of any width and any `rep` count are accepted and counted; the
//     low byte of the last one we see is kept as the POST code;
//   - reads return 0xff, what QEMU's pc machine returns (an empty ISA slot).
//
// Cheap paths, both completing writes inside KVM without an exit to us:
//   - coalesced PIO (KVM_CAP_COALESCED_PIO, preferred): KVM appends every
//     write (port, width, data) to a ring page it shares with us; we drain
//     the ring after each vCPU exit and whenever the counters are read. A
//     full ring (about 170 entries) makes the next write exit to us, and that
//     exit drains it. Counts and the last code are exact.
//   - KVM_IOEVENTFD (PIO flag, length 0 = any width, no datamatch): KVM only
//     bumps an eventfd counter, so the value written is lost and `last_code`
//     is the last code that came through userspace.
// `rep outs` is absorbed by both (KVM's kernel_pio walks the batch). The
// userspace path stays as the fallback and for comparison (`--port80 exit`).
#pragma once

#include "vmm/bus.hpp"
#include "vmm/fd.hpp"
#include "vmm/kvm_uapi.hpp"

#include <atomic>
#include <cstdint>
#include <mutex>

namespace kguest {

class Vm;

class Port80 : public BusDevice {
public:
    // The bus range covers 0x80-0x83 so that a 16- or 32-bit access at 0x80
    // (which on ISA spans the next ports) lands here too; only accesses that
    // start at 0x80 count. 0x81-0x83 (DMA page registers on a PC) read 0xff.
    static constexpr std::uint16_t kPort = 0x80;
    static constexpr std::uint64_t kLen = 4;
    static constexpr std::uint8_t kReadValue = 0xff;

    void read(std::uint64_t offset, std::span<std::uint8_t> data) override;
    void write(std::uint64_t offset, std::span<const std::uint8_t> data) override;

    // Registers an in-kernel write path: coalesced PIO when `ring` (the
    // coalesced MMIO page of a vCPU mapping, or null if the host has none) is
    // given and KVM accepts the zone, else an ioeventfd. False (and nothing
    // changes) when the host KVM refuses both; the userspace path then serves
    // every write.
    bool absorb_in_kernel(Vm& vm, kvm_coalesced_mmio_ring* ring);
    bool absorbed() const { return eventfd_.valid() || ring_ != nullptr; }
    // Reads writes from `ring` from now on (absorb_in_kernel does this after
    // KVM accepted the zone; unit tests hand it a made-up ring page).
    void attach_ring(kvm_coalesced_mmio_ring* ring) { ring_ = ring; }
    // Takes the queued coalesced writes (a no-op without a ring). Any thread;
    // call it before handling an exit, so that the codes stay in order.
    void drain();

    // Writes so far, both paths together.
    std::uint64_t writes();
    std::uint64_t reads() const { return reads_.load(); }
    std::uint8_t last_code() const { return last_.load(); }

private:
    std::atomic<std::uint64_t> user_writes_{0}, reads_{0};
    std::atomic<std::uint8_t> last_{0};
    std::mutex mu_;
    std::uint64_t kernel_writes_ = 0;
    Fd eventfd_;
    kvm_coalesced_mmio_ring* ring_ = nullptr;  // shared with KVM: it writes `last`, we write `first`
};

} // namespace kguest
