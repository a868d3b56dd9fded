// x86 instructions the guest needs, as inline functions.
#pragma once

using u8 = unsigned char;
using u16 = unsigned short;
using u32 = unsigned int;
using u64 = unsigned long;
using i64 = long;
using usize = unsigned long;
static_assert(sizeof(u64) == 8 && sizeof(u32) == 4);

inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
inline void outw(u16 port, u16 v) { asm volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
inline void outl(u16 port, u32 v) { asm volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
inline u8 inb(u16 port) { u8 v; asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
inline u16 inw(u16 port) { u16 v; asm volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
inline u32 inl(u16 port) { u32 v; asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
inline void rep_outsb(u16 port, const void* src, usize n) {
    asm volatile("rep outsb" : "+S"(src), "+c"(n) : "d"(port) : "memory");
}
inline void rep_insb(u16 port, void* dst, usize n) {
    asm volatile("rep insb" : "+D"(dst), "+c"(n) : "d"(port) : "memory");
}

inline u64 rdtsc() {
    u32 lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64(hi) << 32) | lo;
}
inline void wrmsr(u32 msr, u64 v) { asm volatile("wrmsr" ::"c"(msr), "a"(u32(v)), "d"(u32(v >> 32))); }
struct Cpuid { u32 a, b, c, d; };
inline Cpuid cpuid(u32 leaf, u32 sub = 0) {
    Cpuid r;
    asm volatile("cpuid" : "=a"(r.a), "=b"(r.b), "=c"(r.c), "=d"(r.d) : "a"(leaf), "c"(sub));
    return r;
}
inline void cpu_relax() { asm volatile("pause" ::: "memory"); }
inline void sti() { asm volatile("sti" ::: "memory"); }
inline void cli() { asm volatile("cli" ::: "memory"); }
// sti; hlt back to back: an interrupt cannot slip in between (STI's shadow).
inline void sti_hlt() { asm volatile("sti; hlt" ::: "memory"); }
inline void barrier() { asm volatile("" ::: "memory"); }
// Disables interrupts and says whether they were on, for irq_restore().
inline bool irq_save() {
    u64 flags;
    asm volatile("pushfq; popq %0; cli" : "=r"(flags)::"memory");
    return (flags & (1u << 9)) != 0;  // RFLAGS.IF
}
inline void irq_restore(bool were_on) { if (were_on) sti(); }
template <typename T> inline T mmio_read(u64 addr) { return *reinterpret_cast<volatile T*>(addr); }
template <typename T> inline void mmio_write(u64 addr, T v) { *reinterpret_cast<volatile T*>(addr) = v; }
