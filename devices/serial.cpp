// The 16550A register model (see serial.hpp).
#include "devices/serial.hpp"
#include "devices/base/log.hpp"
#include "devices/base/timeline.hpp"

#include <cerrno>
#include <unistd.h>

namespace kguest {

namespace {
// Register offsets and bits from the PC16550D data sheet.
enum : unsigned { RBR_THR = 0, IER = 1, IIR_FCR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7 };
constexpr std::uint8_t IER_RDI = 0x01, IER_THRI = 0x02;
constexpr std::uint8_t IIR_NO_INT = 0x01, IIR_THRI = 0x02, IIR_RDI = 0x04, IIR_FIFO = 0xc0;
constexpr std::uint8_t LCR_DLAB = 0x80;
constexpr std::uint8_t MCR_LOOP = 0x10;
constexpr std::uint8_t LSR_DR = 0x01, LSR_OE = 0x02, LSR_THRE = 0x20, LSR_TEMT = 0x40;
constexpr std::uint8_t MSR_CTS = 0x10, MSR_DSR = 0x20, MSR_DCD = 0x80;
constexpr std::uint8_t FCR_ENABLE = 0x01, FCR_CLEAR_RX = 0x02;
} // namespace

Serial::Serial(int out_fd, std::function<void(bool)> set_irq)
    : out_fd_(out_fd), set_irq_(std::move(set_irq)) {}

void Serial::read(std::uint64_t offset, std::span<std::uint8_t> data) {
    std::lock_guard lock(mu_);
    // Byte registers; a wider access fills the rest with ones.
    data[0] = offset < 8 ? read_reg(static_cast<unsigned>(offset)) : 0xff;
    for (std::size_t i = 1; i < data.size(); ++i) data[i] = 0xff;
}

void Serial::write(std::uint64_t offset, std::span<const std::uint8_t> data) {
    std::lock_guard lock(mu_);
    if (offset < 8) write_reg(static_cast<unsigned>(offset), data[0]);
}

std::uint8_t Serial::read_reg(unsigned reg) {
    bool dlab = lcr_ & LCR_DLAB;
    switch (reg) {
    case RBR_THR: {
        if (dlab) return dll_;
        if (rx_.empty()) return 0;
        std::uint8_t b = rx_.front();
        rx_.pop_front();
        update_irq();
        return b;
    }
    case IER: return dlab ? dlm_ : ier_;
    case IIR_FCR: {
        std::uint8_t iir = IIR_NO_INT;
        if ((ier_ & IER_RDI) && !rx_.empty()) {
            iir = IIR_RDI;
        } else if ((ier_ & IER_THRI) && thre_pending_) {
            iir = IIR_THRI;
            thre_pending_ = false;  // reading IIR with THRI as the source clears it
            update_irq();
        }
        return iir | ((fcr_ & FCR_ENABLE) ? IIR_FIFO : 0);
    }
    case LCR: return lcr_;
    case MCR: return mcr_;
    case LSR: {
        std::uint8_t lsr = LSR_THRE | LSR_TEMT | (rx_.empty() ? 0 : LSR_DR) | (overrun_ ? LSR_OE : 0);
        overrun_ = false;
        return lsr;
    }
    case MSR:
        if (mcr_ & MCR_LOOP) {
            // Loopback wires DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
            return static_cast<std::uint8_t>(((mcr_ & 0x01) << 5) | ((mcr_ & 0x02) << 3) |
                                             ((mcr_ & 0x04) << 4) | ((mcr_ & 0x08) << 4));
        }
        return MSR_DCD | MSR_DSR | MSR_CTS;
    case SCR: return scr_;
    }
    return 0xff;
}

void Serial::write_reg(unsigned reg, std::uint8_t v) {
    bool dlab = lcr_ & LCR_DLAB;
    switch (reg) {
    case RBR_THR:
        if (dlab) {
            dll_ = v;
        } else {
            if (mcr_ & MCR_LOOP) {
                if (rx_.size() < kRxLimit) rx_.push_back(v); else overrun_ = true;
            } else {
                transmit(v);
            }
            thre_pending_ = true;  // transmitted at once: THR is empty again
        }
        break;
    case IER:
        if (dlab) {
            dlm_ = v;
        } else {
            // Enabling THRI with an empty THR raises the interrupt right away.
            if (!(ier_ & IER_THRI) && (v & IER_THRI)) thre_pending_ = true;
            ier_ = v & 0x0f;
        }
        break;
    case IIR_FCR:
        fcr_ = v & (FCR_ENABLE | 0xc0);
        if (v & FCR_CLEAR_RX) rx_.clear();
        break;
    case LCR: lcr_ = v; break;
    case MCR: mcr_ = v & 0x1f; break;
    case SCR: scr_ = v; break;
    default: break;  // LSR and MSR are read-only
    }
    update_irq();
}

void Serial::transmit(std::uint8_t b) {
    ++tx_bytes_;
    boot_console_output(b);
    if (out_fd_ < 0) return;
    // Never block a vCPU (it holds this lock and the PIO bus's): a byte the
    // console does not take now (a slow or unread pipe, a closed one) is lost
    // and counted, as a real UART without flow control would lose it.
    if (write_nowait(out_fd_, &b, 1) != 1) ++tx_dropped_;
}

void Serial::update_irq() {
    bool level = ((ier_ & IER_RDI) && !rx_.empty()) || ((ier_ & IER_THRI) && thre_pending_);
    // Not gated by MCR.OUT2 (as QEMU), so a guest forgetting OUT2 still gets interrupts.
    if (level != irq_level_) {
        irq_level_ = level;
        if (set_irq_) set_irq_(level);
    }
}

void Serial::set_output(int out_fd) {
    std::lock_guard lock(mu_);
    out_fd_ = out_fd;
}

void Serial::receive(std::span<const std::uint8_t> bytes) {
    std::lock_guard lock(mu_);
    for (std::uint8_t b : bytes) {
        if (rx_.size() < kRxLimit) rx_.push_back(b); else overrun_ = true;
    }
    update_irq();
}

std::uint64_t Serial::tx_bytes() const {
    std::lock_guard lock(mu_);
    return tx_bytes_;
}

std::uint64_t Serial::tx_dropped() const {
    std::lock_guard lock(mu_);
    return tx_dropped_;
}

} // namespace kguest
