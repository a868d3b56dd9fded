// Port 0x80, the POST-code / "I/O delay" port (Linux's native_io_delay()).
// A guest's writes must never reach the real port (CVE-2017-1000407: flooding
// it hung hosts), so it is always emulated: writes of any width and `rep`
// count are counted and the low byte of the last one seen is the POST code;
// reads return 0xff, as on QEMU's pc machine.
//
// Writes can also complete inside KVM without an exit (vmm/port80_kvm.hpp
// wires that and hands the counts over through add_absorbed()): coalesced PIO
// (exact counts and last code) or KVM_IOEVENTFD (the value written is lost).
// The userspace path stays as the fallback (`--port80 exit`).
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
    // 0x80-0x83, so that a wide access at 0x80 lands here too; only accesses
    // that start at 0x80 count.
    static constexpr std::uint16_t kPort = 0x80;
    static constexpr std::uint64_t kLen = 4;

    void read(std::uint64_t offset, std::span<std::uint8_t> data) override;
    void write(std::uint64_t offset, std::span<const std::uint8_t> data) override;

    // The in-kernel path: `sync` calls add_absorbed to catch up; set once,
    // before the VM runs.
    void set_absorber(std::function<void()> sync) { sync_ = std::move(sync); }
    bool absorbed() const { return static_cast<bool>(sync_); }
    // `n` writes completed inside KVM; `last`: the newest one's low byte, or -1.
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
