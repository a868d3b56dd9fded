// The guest runtime (see lib.hpp). Output goes to COM1 by polling the line
// status register: no interrupts needed, works before anything else is set up.
#include "lib.hpp"

static SpinLock print_lock;

void guest_exit(u32 status) {
    outl(kExitPort, status);
    // Only reached when nothing listens on the exit port: halt forever.
    for (;;) { cli(); asm volatile("hlt"); }
}

void serial_init() {
    outb(kCom1 + 1, 0x00);  // IER: no interrupts
    outb(kCom1 + 3, 0x80);  // LCR: DLAB on
    outb(kCom1 + 0, 0x01);  // divisor 1 = 115200 baud
    outb(kCom1 + 1, 0x00);
    outb(kCom1 + 3, 0x03);  // 8N1, DLAB off
    outb(kCom1 + 2, 0x07);  // FCR: FIFOs on and cleared
    outb(kCom1 + 4, 0x03);  // MCR: DTR | RTS
}

static void raw_putc(char c) {
    // LSR bit 5 (THRE): ready for a byte. Bounded wait: never hang on a dead UART.
    for (int i = 0; i < 100000 && !(inb(kCom1 + 5) & 0x20); ++i) cpu_relax();
    outb(kCom1, static_cast<u8>(c));
}

static void putc(char c) {
    if (c == '\n') raw_putc('\r');
    raw_putc(c);
}

static void puts(const char* s) {
    print_lock.lock();
    while (*s) putc(*s++);
    print_lock.unlock();
}

static void emit(char*& p, char* end, char c) { if (p < end) *p++ = c; }

static void vformat(char* buf, usize size, const char* fmt, __builtin_va_list ap) {
    char* p = buf;
    char* end = buf + size - 1;
    for (; *fmt; ++fmt) {
        if (*fmt != '%') { emit(p, end, *fmt); continue; }
        ++fmt;
        char pad = ' ';
        bool alt = false;
        if (*fmt == '#') { alt = true; ++fmt; }
        if (*fmt == '0') { pad = '0'; ++fmt; }
        int width = 0;
        while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
        int longs = 0;
        while (*fmt == 'l') { ++longs; ++fmt; }
        char tmp[24];
        int n = 0;
        switch (*fmt) {
        case 's': {
            const char* s = __builtin_va_arg(ap, const char*);
            if (!s) s = "(null)";
            int len = static_cast<int>(strlen(s));
            for (int i = len; i < width; ++i) emit(p, end, ' ');
            while (*s) emit(p, end, *s++);
            continue;
        }
        case 'c': emit(p, end, static_cast<char>(__builtin_va_arg(ap, int))); continue;
        case '%': emit(p, end, '%'); continue;
        case 'd': case 'u': case 'x': {
            u64 v;
            bool neg = false;
            if (*fmt == 'd') {
                i64 s = longs ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
                neg = s < 0;
                v = neg ? u64(-s) : u64(s);
            } else {
                v = longs ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32);
            }
            unsigned base = *fmt == 'x' ? 16 : 10;
            if (alt && base == 16) { emit(p, end, '0'); emit(p, end, 'x'); }
            do { tmp[n++] = "0123456789abcdef"[v % base]; v /= base; } while (v);
            if (neg) tmp[n++] = '-';
            for (int i = n; i < width; ++i) emit(p, end, pad);
            while (n) emit(p, end, tmp[--n]);
            continue;
        }
        default: emit(p, end, '?'); continue;
        }
    }
    *p = 0;
}

void format(char* buf, usize size, const char* fmt, ...) {
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    vformat(buf, size, fmt, ap);
    __builtin_va_end(ap);
}

void print(const char* fmt, ...) {
    char buf[512];
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    vformat(buf, sizeof buf, fmt, ap);
    __builtin_va_end(ap);
    puts(buf);
}

void panic(const char* fmt, ...) {
    char buf[512];
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    vformat(buf, sizeof buf, fmt, ap);
    __builtin_va_end(ap);
    print("PANIC: %s\n", buf);
    guest_exit(3);
}

usize strlen(const char* s) { usize n = 0; while (s[n]) ++n; return n; }

bool str_eq(const char* a, const char* b, usize n) {
    for (usize i = 0; i < n; ++i) if (a[i] != b[i]) return false;
    return true;
}

bool cmdline_get(const char* cmdline, const char* key, char* out, usize size) {
    if (!cmdline) return false;
    usize klen = strlen(key);
    const char* p = cmdline;
    while (*p) {
        while (*p == ' ') ++p;
        const char* word = p;
        while (*p && *p != ' ') ++p;
        usize wlen = static_cast<usize>(p - word);
        if (wlen > klen && word[klen] == '=' && str_eq(word, key, klen)) {
            usize n = wlen - klen - 1;
            if (n >= size) n = size - 1;
            memcpy(out, word + klen + 1, n);
            out[n] = 0;
            return true;
        }
    }
    return false;
}

bool list_has(const char* list, const char* word) {
    usize wlen = strlen(word);
    const char* p = list;
    while (*p) {
        const char* item = p;
        while (*p && *p != ',') ++p;
        if (static_cast<usize>(p - item) == wlen && str_eq(item, word, wlen)) return true;
        if (*p == ',') ++p;
    }
    return false;
}

u64 parse_u64(const char* s, bool* ok) {
    u64 v = 0;
    *ok = *s != 0;
    for (; *s; ++s) {
        if (*s < '0' || *s > '9') { *ok = false; return 0; }
        v = v * 10 + u64(*s - '0');
    }
    return v;
}

extern "C" void* memset(void* d, int c, usize n) {
    auto* p = static_cast<u8*>(d);
    while (n--) *p++ = static_cast<u8>(c);
    return d;
}
extern "C" void* memcpy(void* d, const void* s, usize n) {
    void* dst = d;
    asm volatile("rep movsb" : "+D"(dst), "+S"(s), "+c"(n) : : "memory");
    return d;
}
extern "C" void* memmove(void* d, const void* s, usize n) {
    auto* dp = static_cast<u8*>(d);
    auto* sp = static_cast<const u8*>(s);
    if (dp < sp) { while (n--) *dp++ = *sp++; }
    else { dp += n; sp += n; while (n--) *--dp = *--sp; }
    return d;
}
extern "C" int memcmp(const void* a, const void* b, usize n) {
    auto* x = static_cast<const u8*>(a);
    auto* y = static_cast<const u8*>(b);
    for (usize i = 0; i < n; ++i) if (x[i] != y[i]) return x[i] < y[i] ? -1 : 1;
    return 0;
}

RamRange g_ram[kMaxRamRanges];
u32 g_nram;
u64 g_ram_total;
void ram_add(u64 addr, u64 size) {
    g_ram_total += size;
    if (g_nram < kMaxRamRanges && size) g_ram[g_nram++] = {addr, size};
}

void sort_u32(u32* a, u32 n) {
    for (u32 gap = n / 2; gap > 0; gap /= 2)
        for (u32 i = gap; i < n; ++i)
            for (u32 j = i; j >= gap && a[j - gap] > a[j]; j -= gap) { u32 t = a[j]; a[j] = a[j - gap]; a[j - gap] = t; }
}

u32 percentile(const u32* sorted, u32 n, u32 pct) {
    if (!n) return 0;
    u32 i = u32(u64(n) * pct / 100);
    return sorted[i < n ? i : n - 1];
}

u64 cmdline_u64(const char* cmdline, const char* key, u64 def, const char* who) {
    char buf[24];
    bool ok;
    if (!cmdline_get(cmdline, key, buf, sizeof buf)) return def;
    u64 v = parse_u64(buf, &ok);
    if (ok) return v;
    print("%s: ignoring bad %s=%s\n", who, key, buf);
    return def;
}
