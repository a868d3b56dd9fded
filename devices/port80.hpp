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
// This model knows nothing of KVM: the layer that wires devices to KVM
// (vmm/port80_kvm.hpp) registers the in-kernel path, reads what KVM absorbed
// and hands it over through add_absorbed(); writes() asks it to catch up first.
//
// Threading: read/write on vCPU threads, counters from any thread.
#pragma once

#include "devices/base/bus.hpp"

#include <atomic>
#include <cstdint>
#include <functional>

namespace kguest {

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

    // The in-kernel path: `sync` brings the absorbed writes up to date (by
    // calling add_absorbed); set once, before the VM runs.
    void set_absorber(std::function<void()> sync) { sync_ = std::move(sync); }
    bool absorbed() const { return static_cast<bool>(sync_); }
    // `n` writes completed inside KVM; `last` is the low byte of the newest
    // one when KVM kept the values (-1 when it did not).
    void add_absorbed(std::uint64_t n, int last);

    // Writes so far, both paths together.
    std::uint64_t writes();
    std::uint64_t reads() const { return reads_.load(); }
    std::uint8_t last_code() const { return last_.load(); }

private:
    std::atomic<std::uint64_t> user_writes_{0}, reads_{0};
    std::atomic<std::uint8_t> last_{0};
    std::atomic<std::uint64_t> kernel_writes_{0};
    std::function<void()> sync_;
};

} // namespace kguest
