// The 16550A UART model: transmit to the fd, register file (DLAB, scratch,
// FCR/IIR), THR-empty and receive interrupts, loopback, overrun, and odd
// access widths and offsets.
#include "devices/serial.hpp"

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <memory>
#include <string>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

namespace kguest {
namespace {

enum : unsigned { RBR_THR = 0, IER = 1, IIR_FCR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7 };

class SerialUart : public ::testing::Test {
protected:
    void SetUp() override {
        ASSERT_EQ(::pipe2(fds_, O_NONBLOCK | O_CLOEXEC), 0);
        uart_ = std::make_unique<Serial>(fds_[1], [this](bool level) { irqs_.push_back(level); });
    }
    void TearDown() override {
        ::close(fds_[0]);
        ::close(fds_[1]);
    }

    void out(std::uint64_t reg, std::uint8_t v) { uart_->write(reg, std::span<const std::uint8_t>(&v, 1)); }
    std::uint8_t in(std::uint64_t reg) {
        std::uint8_t v = 0xaa;
        uart_->read(reg, {&v, 1});
        return v;
    }
    void receive(const std::string& s) {
        uart_->receive({reinterpret_cast<const std::uint8_t*>(s.data()), s.size()});
    }
    std::string drain() {
        std::string got;
        char buf[256];
        ssize_t n;
        while ((n = ::read(fds_[0], buf, sizeof buf)) > 0) got.append(buf, static_cast<std::size_t>(n));
        return got;
    }

    int fds_[2] = {-1, -1};
    std::vector<bool> irqs_;
    std::unique_ptr<Serial> uart_;
};

TEST_F(SerialUart, TransmitsToTheFd) {
    out(RBR_THR, 'h');
    out(RBR_THR, 'i');
    EXPECT_EQ(drain(), "hi");
    EXPECT_EQ(uart_->tx_bytes(), 2u);
    EXPECT_EQ(in(LSR), 0x60);  // THRE | TEMT, no data
    EXPECT_TRUE(irqs_.empty());  // IER is 0
}

TEST_F(SerialUart, DivisorLatchDoesNotTransmit) {
    out(LCR, 0x83);  // DLAB, 8N1
    EXPECT_EQ(in(RBR_THR), 0x0c);  // 9600 baud at reset
    EXPECT_EQ(in(IER), 0x00);
    out(RBR_THR, 0x01);
    out(IER, 0x02);
    EXPECT_EQ(in(RBR_THR), 0x01);
    EXPECT_EQ(in(IER), 0x02);
    EXPECT_EQ(in(LCR), 0x83);
    out(LCR, 0x03);
    EXPECT_EQ(in(IER), 0x00);      // the real IER was not written
    EXPECT_EQ(in(RBR_THR), 0x00);  // empty receiver
    EXPECT_EQ(drain(), "");
    EXPECT_EQ(uart_->tx_bytes(), 0u);
    EXPECT_TRUE(irqs_.empty());
}

TEST_F(SerialUart, ScratchRegister) {
    out(SCR, 0x5a);
    EXPECT_EQ(in(SCR), 0x5a);
    out(SCR, 0xa5);
    EXPECT_EQ(in(SCR), 0xa5);
}

TEST_F(SerialUart, ThrEmptyInterrupt) {
    EXPECT_EQ(in(IIR_FCR), 0x01);  // no interrupt pending
    out(IER, 0x02);                // enabling THRI with an empty THR fires at once
    EXPECT_EQ(irqs_, (std::vector<bool>{true}));
    EXPECT_EQ(in(IER), 0x02);
    EXPECT_EQ(in(IIR_FCR), 0x02);
    EXPECT_EQ(irqs_, (std::vector<bool>{true, false}));  // the IIR read cleared it
    EXPECT_EQ(in(IIR_FCR), 0x01);
    out(RBR_THR, 'x');  // transmitted at once: THR empty again
    EXPECT_EQ(irqs_, (std::vector<bool>{true, false, true}));
    EXPECT_EQ(in(IIR_FCR), 0x02);
    EXPECT_EQ(irqs_, (std::vector<bool>{true, false, true, false}));
    out(IER, 0x00);
    out(RBR_THR, 'y');
    EXPECT_EQ(irqs_.size(), 4u);  // disabled: no interrupt
    EXPECT_EQ(drain(), "xy");
}

TEST_F(SerialUart, ReceiveRaisesDataInterrupt) {
    receive("ab");
    EXPECT_EQ(in(LSR), 0x61);  // DR
    EXPECT_TRUE(irqs_.empty());
    EXPECT_EQ(in(IIR_FCR), 0x01);
    out(IER, 0x01);
    EXPECT_EQ(irqs_, (std::vector<bool>{true}));
    EXPECT_EQ(in(IIR_FCR), 0x04);
    EXPECT_EQ(in(RBR_THR), 'a');
    EXPECT_EQ(irqs_.size(), 1u);  // still data
    EXPECT_EQ(in(RBR_THR), 'b');
    EXPECT_EQ(irqs_, (std::vector<bool>{true, false}));
    EXPECT_EQ(in(LSR), 0x60);
    EXPECT_EQ(in(RBR_THR), 0x00);
    receive("c");  // with RDI already enabled
    EXPECT_EQ(irqs_, (std::vector<bool>{true, false, true}));
    EXPECT_EQ(in(RBR_THR), 'c');
    EXPECT_EQ(irqs_, (std::vector<bool>{true, false, true, false}));
}

TEST_F(SerialUart, ReceiveTakesPriorityOverThri) {
    out(IER, 0x03);
    receive("z");
    EXPECT_EQ(in(IIR_FCR), 0x04);
    EXPECT_EQ(in(RBR_THR), 'z');
    EXPECT_EQ(in(IIR_FCR), 0x02);  // THRI still pending underneath
    EXPECT_EQ(irqs_.back(), false);
}

TEST_F(SerialUart, Loopback) {
    EXPECT_EQ(in(MSR), 0xb0);  // DCD | DSR | CTS outside loopback
    out(MCR, 0x1b);            // LOOP | OUT2 | RTS | DTR
    EXPECT_EQ(in(MCR), 0x1b);
    out(RBR_THR, 'x');
    out(RBR_THR, 'y');
    EXPECT_EQ(drain(), "");
    EXPECT_EQ(uart_->tx_bytes(), 0u);
    EXPECT_EQ(in(LSR), 0x61);
    EXPECT_EQ(in(RBR_THR), 'x');
    EXPECT_EQ(in(RBR_THR), 'y');
    const std::pair<std::uint8_t, std::uint8_t> wiring[] = {
        {0x10, 0x00}, {0x11, 0x20}, {0x12, 0x10}, {0x14, 0x40}, {0x18, 0x80}, {0x1f, 0xf0}};
    for (auto [mcr, msr] : wiring) {
        out(MCR, mcr);
        EXPECT_EQ(in(MSR), msr) << int(mcr);
    }
    out(MCR, 0x03);
    out(RBR_THR, 'z');
    EXPECT_EQ(drain(), "z");
}

TEST_F(SerialUart, FifoControl) {
    out(IIR_FCR, 0x01);
    EXPECT_EQ(in(IIR_FCR), 0xc1);
    out(IIR_FCR, 0xc1);  // trigger level bits do not leak into IIR
    EXPECT_EQ(in(IIR_FCR), 0xc1);
    receive("abc");
    out(IIR_FCR, 0x03);  // clear the receive FIFO
    EXPECT_EQ(in(LSR), 0x60);
    out(IIR_FCR, 0x00);
    EXPECT_EQ(in(IIR_FCR), 0x01);
}

TEST_F(SerialUart, OverrunDropsBeyondTheLimit) {
    std::string big(Serial::kRxLimit + 10, '\0');
    for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i);
    receive(big);
    EXPECT_EQ(in(LSR), 0x63);  // DR | OE
    EXPECT_EQ(in(LSR), 0x61);  // OE clears on read
    for (std::size_t i = 0; i < Serial::kRxLimit; ++i) ASSERT_EQ(in(RBR_THR), static_cast<std::uint8_t>(i)) << i;
    EXPECT_EQ(in(LSR), 0x60);  // the extra 10 bytes were dropped
}

TEST_F(SerialUart, WideAndOutOfRangeAccesses) {
    std::uint8_t wide[4] = {0, 0, 0, 0};
    uart_->read(LSR, wide);
    EXPECT_EQ(wide[0], 0x60);
    EXPECT_EQ(wide[1], 0xff);
    EXPECT_EQ(wide[3], 0xff);
    receive("ab");
    uart_->read(RBR_THR, wide);  // one register, one byte popped
    EXPECT_EQ(wide[0], 'a');
    EXPECT_EQ(wide[1], 0xff);
    EXPECT_EQ(in(RBR_THR), 'b');
    const std::uint8_t data[4] = {'p', 'q', 'r', 's'};
    uart_->write(RBR_THR, data);
    EXPECT_EQ(drain(), "p");
    std::uint8_t far[2] = {0, 0};
    uart_->read(8, far);
    EXPECT_EQ(far[0], 0xff);
    EXPECT_EQ(far[1], 0xff);
    uart_->read(UINT64_MAX, far);
    EXPECT_EQ(far[0], 0xff);
    uart_->write(8, data);
    uart_->write(UINT64_MAX, data);
    EXPECT_EQ(drain(), "");
    EXPECT_EQ(uart_->tx_bytes(), 1u);
}

TEST(Serial, DiscardsWithoutAnFd) {
    Serial uart(-1, nullptr);
    const std::uint8_t b = 'x';
    uart.write(0, {&b, 1});
    std::uint8_t ier = 0x02;
    uart.write(1, {&ier, 1});  // no IRQ callback: must not crash
    EXPECT_EQ(uart.tx_bytes(), 1u);
}

} // namespace
} // namespace kguest

namespace kguest {
namespace {

// A console whose reader does not keep up (stdout a pipe nobody reads, in
// the blocking mode a shell leaves it in) must never block the vCPU that
// writes THR: the bytes it cannot take are dropped and counted.
TEST(SerialConsole, FullBlockingPipeDropsAndCountsInsteadOfBlocking) {
    int p[2];
    ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
    // Fill the pipe, then put its (shared) description back in blocking mode.
    ASSERT_EQ(::fcntl(p[1], F_SETFL, O_NONBLOCK), 0);
    std::vector<char> junk(65536, 'x');
    while (::write(p[1], junk.data(), junk.size()) > 0) {}
    ASSERT_EQ(::fcntl(p[1], F_SETFL, 0), 0);

    Serial uart(p[1], [](bool) {});
    std::atomic<bool> done{false};
    std::thread vcpu([&] {
        for (int i = 0; i < 100; ++i) {
            const std::uint8_t b = 'a';
            uart.write(0, std::span<const std::uint8_t>(&b, 1));
        }
        done.store(true);
    });
    for (int i = 0; i < 500 && !done.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    const bool finished = done.load();
    if (!finished) {   // blocked in write(2): unblock it so the test can end
        ::fcntl(p[0], F_SETFL, O_NONBLOCK);
        while (!done.load()) {
            char buf[65536];
            (void)!::read(p[0], buf, sizeof buf);
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
    }
    vcpu.join();
    EXPECT_TRUE(finished) << "a THR write blocked on the full console pipe";
    EXPECT_EQ(uart.tx_bytes(), 100u);
    EXPECT_EQ(uart.tx_dropped(), finished ? 100u : 0u);
    ::close(p[0]);
    ::close(p[1]);
}

// A console whose reader is gone: EPIPE (SIGPIPE is ignored by kguest's
// main; here the test ignores it too), dropped and counted.
TEST(SerialConsole, ClosedPipeDropsAndCounts) {
    int p[2];
    ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
    ::close(p[0]);
    struct sigaction ign {}, old {};
    ign.sa_handler = SIG_IGN;
    ASSERT_EQ(::sigaction(SIGPIPE, &ign, &old), 0);
    Serial uart(p[1], [](bool) {});
    const std::uint8_t b = 'z';
    uart.write(0, std::span<const std::uint8_t>(&b, 1));
    EXPECT_EQ(uart.tx_dropped(), 1u);
    ::sigaction(SIGPIPE, &old, nullptr);
    ::close(p[1]);
}

} // namespace
} // namespace kguest
