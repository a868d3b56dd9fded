// A 16550A UART, the PC's COM1 at port 0x3f8 with IRQ 4: the guest console.
// Transmitted bytes go straight to the console fd (no baud-rate pacing, and
// never waiting for its reader: what it cannot take is dropped and counted);
// host bytes land in a receive FIFO and raise the "data available" interrupt.
// Registers follow the PC16550D data sheet, loopback mode (MCR bit 4)
// included, as Linux's 8250 driver may probe it.
#pragma once

#include "devices/base/bus.hpp"

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>

namespace kguest {

class Serial : public BusDevice {
public:
    static constexpr std::uint16_t kCom1Base = 0x3f8;
    static constexpr unsigned kCom1Irq = 4;

    // `out_fd` receives transmitted bytes (-1: discard); `set_irq(level)` is
    // called when the interrupt level changes.
    Serial(int out_fd, std::function<void(bool)> set_irq);

    void read(std::uint64_t offset, std::span<std::uint8_t> data) override;
    void write(std::uint64_t offset, std::span<const std::uint8_t> data) override;

    // Where transmitted bytes go from now on (-1: discard), e.g. a console
    // socket's client that connected or left. Once it returns no transmit
    // uses the old fd any more: the caller may close it.
    void set_output(int out_fd);

    // Host → guest: queue input bytes (dropped beyond kRxLimit, as an overrun).
    void receive(std::span<const std::uint8_t> bytes);
    std::uint64_t tx_bytes() const;
    // Transmitted bytes the console fd did not take (a reader not keeping up, or gone).
    std::uint64_t tx_dropped() const;

    static constexpr std::size_t kRxLimit = 4096;

private:
    std::uint8_t read_reg(unsigned reg);
    void write_reg(unsigned reg, std::uint8_t v);
    void transmit(std::uint8_t b);
    void update_irq();

    mutable std::mutex mu_;
    int out_fd_;
    std::function<void(bool)> set_irq_;
    bool irq_level_ = false;
    std::deque<std::uint8_t> rx_;
    std::uint8_t ier_ = 0, lcr_ = 0, mcr_ = 0, scr_ = 0, fcr_ = 0;
    std::uint8_t dll_ = 0x0c, dlm_ = 0;  // 9600 baud until the guest says otherwise
    bool thre_pending_ = false;          // THR-empty interrupt waiting for an IIR read
    bool overrun_ = false;
    std::uint64_t tx_bytes_ = 0;
    std::uint64_t tx_dropped_ = 0;
};

} // namespace kguest
