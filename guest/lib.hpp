// The guest's tiny runtime: serial output, formatted printing, the exit port,
// string helpers, the RAM map and a spinlock. No libc here.
#pragma once

#include "arch.hpp"

// The test-exit port shared with kguest (devices/exit_port.hpp) and QEMU's
// isa-debug-exit (iobase=0xf4): a 32-bit write ends the VM. kguest exits with
// the value written; QEMU exits with (value << 1) | 1.
constexpr u16 kExitPort = 0xf4;
constexpr u16 kCom1 = 0x3f8;

[[noreturn]] void guest_exit(u32 status);

void serial_init();
void print(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void format(char* buf, usize size, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
[[noreturn]] void panic(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

usize strlen(const char* s);
bool str_eq(const char* a, const char* b, usize n);
// Value of `key=` in a space-separated command line, copied into out; false if absent.
bool cmdline_get(const char* cmdline, const char* key, char* out, usize size);
// Is `word` one of the comma-separated items of `list`?
bool list_has(const char* list, const char* word);
u64 parse_u64(const char* s, bool* ok);
// The number after `key=` in the command line, or `def` when absent; a value
// that is not a number is ignored with a line naming `who` and the knob.
u64 cmdline_u64(const char* cmdline, const char* key, u64 def, const char* who);

// Shell sort; the pct-th percentile of n sorted values (0 when n is 0).
void sort_u32(u32* a, u32 n);
u32 percentile(const u32* sorted, u32 n, u32 pct);

// The PVH memory map's RAM entries (the first kMaxRamRanges non-empty ones) and their total.
struct RamRange { u64 addr, size; };
constexpr u32 kMaxRamRanges = 64;
extern RamRange g_ram[kMaxRamRanges];
extern u32 g_nram;
extern u64 g_ram_total;
void ram_add(u64 addr, u64 size);

extern "C" void* memset(void* d, int c, usize n);
extern "C" void* memcpy(void* d, const void* s, usize n);
extern "C" int memcmp(const void* a, const void* b, usize n);

class SpinLock {
public:
    void lock() { while (__atomic_exchange_n(&v_, 1, __ATOMIC_ACQUIRE)) while (__atomic_load_n(&v_, __ATOMIC_RELAXED)) cpu_relax(); }
    void unlock() { __atomic_store_n(&v_, 0, __ATOMIC_RELEASE); }
private:
    int v_ = 0;
};
