// The MC146818 register model (see rtc.hpp). Register numbers and bits are
// those of Linux's include/linux/mc146818rtc.h; the update protocol that of
// drivers/rtc/rtc-mc146818-lib.c (set SET in status B, write the time, restore
// status B). The clock is the host's plus `offset_`: no timer of ours.
#include "devices/rtc.hpp"

#include <algorithm>
#include <chrono>
#include <ctime>

namespace kguest {

namespace {
enum : unsigned {
    SECONDS = 0x00, MINUTES = 0x02, HOURS = 0x04, DAY_OF_WEEK = 0x06, DAY_OF_MONTH = 0x07,
    MONTH = 0x08, YEAR = 0x09, REG_A = 0x0a, REG_B = 0x0b, REG_C = 0x0c, REG_D = 0x0d,
    CENTURY = 0x32,  // where QEMU and the ACPI FADT "century" field put it
};
constexpr std::uint8_t RTC_UIP = 0x80;                                      // status A
constexpr std::uint8_t RTC_SET = 0x80, RTC_DM_BINARY = 0x04, RTC_24H = 0x02;  // status B
constexpr std::uint8_t RTC_VRT = 0x80;                                      // status D
constexpr std::uint8_t kHourPm = 0x80;  // hour register's PM flag in 12-hour mode
// Status A after reset: 32.768 kHz time base (DV=010), 1024 Hz rate (RS=0110).
constexpr std::uint8_t kRegADefault = 0x26;
// 0000-01-01 and 9999-12-31 23:59:59 UTC: the range a century byte can show.
constexpr std::int64_t kMinTime = -62167219200, kMaxTime = 253402300799;
constexpr std::int64_t kDay = 86400;

bool is_time_reg(unsigned r) {
    return r == SECONDS || r == MINUTES || r == HOURS || (r >= DAY_OF_WEEK && r <= YEAR) || r == CENTURY;
}
std::int64_t floor_div(std::int64_t a, std::int64_t b) { return a / b - (a % b < 0 ? 1 : 0); }
std::int64_t floor_mod(std::int64_t a, std::int64_t b) { return a - floor_div(a, b) * b; }
} // namespace

Rtc::Rtc(std::uint64_t ram_below_4g, std::uint64_t ram_above_4g, std::function<std::int64_t()> now_unix_seconds)
    : now_(std::move(now_unix_seconds)) {
    constexpr std::uint64_t KiB = 1024, MiB = 1024 * KiB;
    auto set16 = [this](unsigned reg, std::uint64_t v) {
        v = std::min<std::uint64_t>(v, 0xffff);
        cmos_[reg] = static_cast<std::uint8_t>(v);
        cmos_[reg + 1] = static_cast<std::uint8_t>(v >> 8);
    };
    // QEMU pc_cmos_init: base memory and memory above 1 MiB in KiB, RAM above
    // 16 MiB and above 4 GiB (3 bytes) in 64 KiB units.
    set16(0x15, std::min<std::uint64_t>(ram_below_4g / KiB, 640));
    std::uint64_t ext = ram_below_4g > MiB ? (ram_below_4g - MiB) / KiB : 0;
    set16(0x17, ext);
    set16(0x30, ext);
    set16(0x34, ram_below_4g > 16 * MiB ? (ram_below_4g - 16 * MiB) / (64 * KiB) : 0);
    std::uint64_t high = std::min<std::uint64_t>(ram_above_4g / (64 * KiB), 0xffffff);
    cmos_[0x5b] = static_cast<std::uint8_t>(high);
    cmos_[0x5c] = static_cast<std::uint8_t>(high >> 8);
    cmos_[0x5d] = static_cast<std::uint8_t>(high >> 16);

    cmos_[REG_A] = kRegADefault;
    cmos_[REG_B] = RTC_24H;  // 24-hour, BCD: what PC firmware leaves
    store_time(now());
}

std::int64_t Rtc::now() const {
    std::int64_t t;
    if (now_) {
        t = now_();
    } else {
        timespec ts{};
        ::clock_gettime(CLOCK_REALTIME, &ts);
        t = ts.tv_sec;
    }
    return std::clamp<std::int64_t>(t, 0, kMaxTime);
}

void Rtc::store_time(std::int64_t t) {
    using namespace std::chrono;
    t = std::clamp(t, kMinTime, kMaxTime);
    const bool binary = cmos_[REG_B] & RTC_DM_BINARY;
    auto enc = [binary](std::int64_t v) {
        return static_cast<std::uint8_t>(binary ? v : ((v / 10) << 4) | (v % 10));
    };
    const sys_days day{days{floor_div(t, kDay)}};
    const year_month_day ymd{day};
    const std::int64_t sec = floor_mod(t, kDay), hour = sec / 3600;
    const int y = static_cast<int>(ymd.year());
    cmos_[SECONDS] = enc(sec % 60);
    cmos_[MINUTES] = enc(sec / 60 % 60);
    if (cmos_[REG_B] & RTC_24H)
        cmos_[HOURS] = enc(hour);
    else  // 12, 1, ..., 11 with PM flagged (the MC146818 data sheet's table)
        cmos_[HOURS] = static_cast<std::uint8_t>(enc(hour % 12 == 0 ? 12 : hour % 12) | (hour >= 12 ? kHourPm : 0));
    cmos_[DAY_OF_WEEK] = enc(weekday{day}.c_encoding() + 1);  // Sunday is 1
    cmos_[DAY_OF_MONTH] = enc(static_cast<unsigned>(ymd.day()));
    cmos_[MONTH] = enc(static_cast<unsigned>(ymd.month()));
    cmos_[YEAR] = enc(y % 100);
    cmos_[CENTURY] = enc(y / 100);
}

// The guest may have written anything (bad BCD, month 13): clamp what a
// calendar needs and let the rest add up; the day of week is ignored.
std::int64_t Rtc::load_time() const {
    using namespace std::chrono;
    const bool binary = cmos_[REG_B] & RTC_DM_BINARY;
    auto dec = [binary](std::uint8_t v) -> std::int64_t { return binary ? v : (v >> 4) * 10 + (v & 0x0f); };
    std::int64_t hour;
    if (cmos_[REG_B] & RTC_24H)
        hour = dec(cmos_[HOURS]);
    else
        hour = dec(cmos_[HOURS] & ~kHourPm) % 12 + ((cmos_[HOURS] & kHourPm) ? 12 : 0);
    const int y = static_cast<int>(dec(cmos_[CENTURY]) * 100 + dec(cmos_[YEAR]));
    const unsigned m = static_cast<unsigned>(std::clamp<std::int64_t>(dec(cmos_[MONTH]), 1, 12));
    const std::int64_t d = std::clamp<std::int64_t>(dec(cmos_[DAY_OF_MONTH]), 1, 31);
    const sys_days first{year_month_day{year{y}, month{m}, day{1}}};
    return (first.time_since_epoch().count() + d - 1) * kDay + hour * 3600 + dec(cmos_[MINUTES]) * 60 +
           dec(cmos_[SECONDS]);
}

std::uint8_t Rtc::read_reg(unsigned reg) {
    if (is_time_reg(reg)) {
        // With SET the registers hold what the guest is writing; otherwise
        // they show the running clock.
        if (!(cmos_[REG_B] & RTC_SET)) store_time(now() + offset_);
        return cmos_[reg];
    }
    switch (reg) {
    case REG_A: return cmos_[REG_A] & ~RTC_UIP;  // never "update in progress"
    case REG_C: return 0;                         // no interrupt flags: none are emulated
    case REG_D: return RTC_VRT;                   // battery good, RAM and time valid
    }
    return cmos_[reg];
}

void Rtc::write_reg(unsigned reg, std::uint8_t v) {
    const std::int64_t n = now();
    if (is_time_reg(reg)) {
        if (cmos_[REG_B] & RTC_SET) {
            cmos_[reg] = v;  // takes effect when SET is cleared
        } else {
            // A write while the clock runs sets it at once (QEMU does the same).
            store_time(n + offset_);
            cmos_[reg] = v;
            offset_ = load_time() - n;
        }
        return;
    }
    switch (reg) {
    case REG_A:
        // UIP is read-only; divider resets do not stop the clock (SET does).
        cmos_[REG_A] = v & ~RTC_UIP;
        return;
    case REG_B: {
        const bool was_set = cmos_[REG_B] & RTC_SET, set = v & RTC_SET;
        if (was_set && !set) offset_ = load_time() - n;  // in the format they were written in
        cmos_[REG_B] = v;
        if (!was_set && set) store_time(n + offset_);     // freeze: the guest edits a snapshot
        return;
    }
    case REG_C:
    case REG_D: return;  // read-only
    }
    cmos_[reg] = v;
}

void Rtc::read(std::uint64_t offset, std::span<std::uint8_t> data) {
    std::lock_guard lock(mu_);
    for (std::size_t i = 0; i < data.size(); ++i) {
        if (offset >= kLen || i >= kLen - offset) {
            data[i] = 0xff;  // past port 0x71 (only reachable by calling us directly)
        } else if (offset + i == 0) {
            data[i] = index_;
        } else {
            data[i] = read_reg(index_ & 0x7f);  // bit 7 is the NMI mask, not part of the index
        }
    }
}

void Rtc::write(std::uint64_t offset, std::span<const std::uint8_t> data) {
    std::lock_guard lock(mu_);
    for (std::size_t i = 0; i < data.size(); ++i) {
        if (offset >= kLen || i >= kLen - offset) return;
        if (offset + i == 0)
            index_ = data[i];  // the NMI-disable bit is ignored: we never raise an NMI
        else
            write_reg(index_ & 0x7f, data[i]);
    }
}

std::int64_t Rtc::offset_seconds() const {
    std::lock_guard lock(mu_);
    return offset_;
}

} // namespace kguest
