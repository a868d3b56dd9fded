// The 8042 controller model (see i8042.hpp). Command numbers are Linux's
// drivers/input/serio/i8042.h and the PC AT Technical Reference's.
#include "devices/i8042.hpp"

#include <algorithm>

namespace kguest {

namespace {
constexpr std::uint8_t STR_OBF = 0x01;  // output buffer full: a byte waits on 0x60
constexpr std::uint8_t STR_SYS = 0x04;  // system flag: POST passed (bit 1, IBF, stays 0)
constexpr std::uint8_t CTR_KBDDIS = 0x10;
enum : std::uint8_t {
    CMD_READ_CTR = 0x20, CMD_WRITE_CTR = 0x60, CMD_SELF_TEST = 0xaa, CMD_KBD_DISABLE = 0xad,
    CMD_KBD_ENABLE = 0xae, CMD_WRITE_OUTPUT = 0xd1, CMD_PULSE_RESET = 0xfe,
};
constexpr std::uint8_t kSelfTestOk = 0x55;
constexpr std::uint8_t OUT_SYS_RESET = 0x01;  // output port bit 0: 0 holds the CPU in reset
} // namespace

void I8042::PortDevice::read(std::uint64_t offset, std::span<std::uint8_t> data) {
    std::fill(data.begin(), data.end(), 0xff);
    if (offset == 0 && !data.empty()) data[0] = ctl_.read_port(command_);
}

void I8042::PortDevice::write(std::uint64_t offset, std::span<const std::uint8_t> data) {
    if (offset == 0 && !data.empty()) ctl_.write_port(command_, data[0]);
}

std::uint8_t I8042::read_port(bool command) {
    std::lock_guard lock(mu_);
    if (command) return STR_SYS | (out_full_ ? STR_OBF : 0);
    out_full_ = false;
    return out_;  // with nothing new, the last byte again (as the real latch does)
}

void I8042::write_port(bool command, std::uint8_t v) {
    bool reset = false;
    {
        std::lock_guard lock(mu_);
        if (command) {
            pending_ = 0;  // a new command abandons one still waiting for its data byte
            switch (v) {
            case CMD_READ_CTR: out_ = command_byte_; out_full_ = true; break;
            case CMD_SELF_TEST: out_ = kSelfTestOk; out_full_ = true; break;
            case CMD_KBD_DISABLE: command_byte_ |= CTR_KBDDIS; break;
            case CMD_KBD_ENABLE: command_byte_ &= ~CTR_KBDDIS; break;
            case CMD_WRITE_CTR:
            case CMD_WRITE_OUTPUT: pending_ = v; break;
            case CMD_PULSE_RESET: reset = true; break;
            default: KGUEST_LOG_LIMITED(log_limit_, "i8042: command 0x%02x ignored", v);
            }
        } else if (pending_ == CMD_WRITE_CTR) {
            command_byte_ = v;
            pending_ = 0;
        } else if (pending_ == CMD_WRITE_OUTPUT) {
            reset = !(v & OUT_SYS_RESET);
            pending_ = 0;
        } else {
            // A byte for the keyboard, and there is none: dropped.
            KGUEST_LOG_LIMITED(log_limit_, "i8042: keyboard byte 0x%02x dropped (no keyboard)", v);
        }
    }
    if (reset && reset_) reset_();  // unlocked: the callback may stop vCPUs or access us
}

} // namespace kguest
