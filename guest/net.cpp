// virtio-net driver, minimal IPv4 stack and the net-echo / net-ping /
// net-bench test modes (see net.hpp). Section numbers are VIRTIO 1.2's.
//
// Buffers: receive (queue 0) and transmit (queue 1) own one 2 KiB buffer per
// descriptor, each starting with the 12-byte virtio_net_hdr (5.1.6, VERSION_1);
// receive buffers are always all posted, transmit ones come from a free list.
// With VIRTIO_NET_F_MRG_RXBUF a packet spanning num_buffers receive buffers is
// gathered into one assembly buffer. Lengths from the wire or the device are
// checked before use.
#include "net.hpp"
#include "cpu.hpp"
#include "lib.hpp"
#include "pci.hpp"
#include "tests.hpp"
#include "virtio.hpp"

namespace {

constexpr u16 kVirtioVendor = 0x1af4, kVirtioNetDevice = 0x1041;  // 4.1.2.1: 0x1040 + device ID 1
// 5.1.3 feature bits.
constexpr u64 NET_F_MTU = 1ull << 3, NET_F_MAC = 1ull << 5, NET_F_MRG_RXBUF = 1ull << 15,
              NET_F_STATUS = 1ull << 16;
constexpr u64 kWantedFeatures = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | NET_F_MTU | NET_F_MAC |
                                NET_F_MRG_RXBUF | NET_F_STATUS;
// 5.1.4 struct virtio_net_config offsets.
constexpr u32 CFG_MAC = 0, CFG_STATUS = 6, CFG_MTU = 10;
// Our IDT vectors and MSI-X table entries.
constexpr u8 kVecConfig = 0x50, kVecRx = 0x51, kVecTx = 0x52, kVecTimer = 0x53;
constexpr u16 kEntryConfig = 0, kEntryRx = 1, kEntryTx = 2;
constexpr u16 kRxQueue = 0, kTxQueue = 1;  // 5.1.2: receiveq1, transmitq1
constexpr u32 kBufSize = 2048, kHdrLen = 12;
constexpr u32 kMaxFrame = kBufSize - kHdrLen;  // what one transmit buffer holds
constexpr u32 kAsmSize = 16384;                // largest merged receive packet we accept

alignas(4096) u8 rxq_mem[kQueueMemSize];
alignas(4096) u8 txq_mem[kQueueMemSize];
alignas(4096) u8 rx_bufs[kMaxQueueSize][kBufSize];
alignas(4096) u8 tx_bufs[kMaxQueueSize][kBufSize];
alignas(64) u8 rx_asm[kAsmSize];

// Zero-initialised .bss (no constructors run in this guest): net_bringup() sets the rest.
struct NetDev {
    VirtioPci vp;
    Virtq rx, tx;
    bool msix, tsc_deadline, mrg;
    u8 mac[6];
    u32 mtu;
    u16 tx_free[kMaxQueueSize];
    u16 tx_nfree;
    bool tx_busy[kMaxQueueSize];
    bool rx_posted[kMaxQueueSize];  // receive buffer i is the device's
    u32 asm_len;
    u16 asm_left;  // merged-packet buffers still to come
    bool asm_bad;
    volatile u64 irq_rx, irq_tx, irq_config;
    u64 halts;
    u64 late_wakeups;  // timer ended a halt with used buffers waiting
    bool busy_poll;  // net_poll=1: spin instead of halting
    u64 tsc_hz;
    // IPv4 configuration (host byte order).
    u32 ip, mask, gw;
    u16 ip_id;
};
NetDev dev;
int g_init_state = 0;  // 0 not tried, 1 up, -1 failed

inline u16 get16(const u8* p) { return u16((p[0] << 8) | p[1]); }
inline u32 get32(const u8* p) { return (u32(p[0]) << 24) | (u32(p[1]) << 16) | (u32(p[2]) << 8) | p[3]; }
inline void put16(u8* p, u16 v) { p[0] = u8(v >> 8); p[1] = u8(v); }
inline void put32(u8* p, u32 v) { p[0] = u8(v >> 24); p[1] = u8(v >> 16); p[2] = u8(v >> 8); p[3] = u8(v); }

// RFC 1071 ones' complement sum of big-endian 16-bit words, folded and added
// to `sum`: summed eight bytes at a time in little-endian order and swapped at
// the end (RFC 1071 2(B)). p must start at an even offset of the stream.
typedef u64 __attribute__((may_alias, aligned(1))) u64_unaligned;
typedef u16 __attribute__((may_alias, aligned(1))) u16_unaligned;
u32 csum_add(u32 sum, const u8* p, u32 n) {
    u64 acc = 0;
    for (; n >= 8; p += 8, n -= 8) {
        u64 v = *reinterpret_cast<const u64_unaligned*>(p);
        acc += v;
        acc += acc < v;  // end-around carry
    }
    acc = (acc & 0xffffffffull) + (acc >> 32);
    for (; n >= 2; p += 2, n -= 2) acc += *reinterpret_cast<const u16_unaligned*>(p);
    if (n) acc += p[0];  // the odd last byte is the high half of a big-endian word
    while (acc >> 16) acc = (acc & 0xffff) + (acc >> 16);
    u32 be = u32(((acc & 0xff) << 8) | (acc >> 8));
    u32 s = sum + be;
    return (s & 0xffff) + (s >> 16);
}
u16 csum_fold(u32 sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return u16(~sum);
}
// Packet copies and compares, eight bytes per step: where each guest memory
// access is slow (PVM, TCG), rep movsb and byte loops dominate a packet's cost.
void copy(void* d, const void* s, usize n) {
    usize q = n / 8, r = n % 8;
    asm volatile("rep movsq; mov %3, %%rcx; rep movsb" : "+D"(d), "+S"(s), "+c"(q) : "r"(r) : "memory");
}
bool same(const u8* a, const u8* b, u32 n) {
    for (; n >= 8; a += 8, b += 8, n -= 8)
        if (*reinterpret_cast<const u64_unaligned*>(a) != *reinterpret_cast<const u64_unaligned*>(b)) return false;
    for (; n; ++a, ++b, --n) if (*a != *b) return false;
    return true;
}
// RFC 1624 eqn. 3: checksum `hc` after a 16-bit word of the data changed from m to m2.
u16 csum_update(u16 hc, u16 m, u16 m2) {
    u32 s = u32(u16(~hc)) + u32(u16(~m)) + m2;
    return csum_fold(s);
}

u32 pseudo_sum(u32 src, u32 dst, u8 proto, u32 len) {
    u8 ph[12];
    put32(ph, src); put32(ph + 4, dst); ph[8] = 0; ph[9] = proto; put16(ph + 10, u16(len));
    return csum_add(0, ph, 12);
}

const u8 kBroadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
constexpr u16 ETH_IPV4 = 0x0800, ETH_ARP = 0x0806;
constexpr u8 IP_ICMP = 1, IP_UDP = 17;
constexpr u32 kEthLen = 14, kIpLen = 20, kUdpLen = 8, kIcmpLen = 8;

void irq_rx(Frame*) { dev.irq_rx = dev.irq_rx + 1; lapic_eoi(); }
void irq_tx(Frame*) { dev.irq_tx = dev.irq_tx + 1; lapic_eoi(); }
void irq_config(Frame*) { dev.irq_config = dev.irq_config + 1; lapic_eoi(); }
// A safety net, no longer known to be needed: during a wait the timer re-arms
// itself, so a halt ends within one period whatever interrupt went missing.
// (Added for guests seen halted for good in the nested TCG sandbox, whose
// cause was a lost EOI, see lapic_eoi in cpu.hpp, which this could not help.)
volatile u64 g_wait_rearm_tsc;  // 0 outside net_wait
void irq_timer(Frame*) {
    if (g_wait_rearm_tsc) wrmsr(MSR_IA32_TSC_DEADLINE, rdtsc() + g_wait_rearm_tsc);
    lapic_eoi();
}

u64 ns_to_tsc(u64 ns) { return u64((unsigned __int128)ns * dev.tsc_hz / 1000000000ull); }

void tx_reap() {
    u16 id;
    u32 len;
    while (dev.tx.pop(&id, &len)) {
        if (!dev.tx_busy[id]) continue;  // not ours to free (device bug)
        dev.tx_busy[id] = false;
        dev.tx_free[dev.tx_nfree++] = id;
    }
}

// A transmit buffer with its virtio_net_hdr zeroed (no offloads: 5.1.6.2),
// or null if none frees up within 100 ms. *id names it for tx_commit().
u8* tx_begin(u16* id) {
    if (dev.tx_nfree == 0) tx_reap();
    u64 give_up = 0;
    while (dev.tx_nfree == 0) {
        u64 now = kvmclock_ns();
        if (!give_up) give_up = now + 100000000ull;
        if (now >= give_up) return nullptr;
        net_wait(give_up);
        tx_reap();
    }
    *id = dev.tx_free[--dev.tx_nfree];
    u8* b = tx_bufs[*id];
    memset(b, 0, kHdrLen);
    return b + kHdrLen;
}

void tx_commit(u16 id, u32 frame_len) {
    u8* f = tx_bufs[id] + kHdrLen;
    if (frame_len < 60) { memset(f + frame_len, 0, 60 - frame_len); frame_len = 60; }  // Ethernet minimum
    dev.tx_busy[id] = true;
    dev.tx.set_len(id, kHdrLen + frame_len);
    dev.tx.push(id);
    dev.tx.publish();
    ++g_net_stats.tx;
}

void eth_header(u8* f, const u8 dst[6], u16 type) {
    memcpy(f, dst, 6);
    memcpy(f + 6, dev.mac, 6);
    put16(f + 12, type);
}

// Fills Ethernet + IPv4 headers in front of an L4 payload already written
// at f + 34, and sends. DF set: we never fragment.
void ip_send(u16 id, u8* f, const u8 dst_mac[6], u32 dst_ip, u8 proto, u32 l4_len) {
    eth_header(f, dst_mac, ETH_IPV4);
    u8* ip = f + kEthLen;
    ip[0] = 0x45; ip[1] = 0;
    put16(ip + 2, u16(kIpLen + l4_len));
    put16(ip + 4, dev.ip_id++);
    put16(ip + 6, 0x4000);  // DF
    ip[8] = 64; ip[9] = proto;
    put16(ip + 10, 0);
    put32(ip + 12, dev.ip); put32(ip + 16, dst_ip);
    put16(ip + 10, csum_fold(csum_add(0, ip, kIpLen)));
    tx_commit(id, kEthLen + kIpLen + l4_len);
}

u32 max_ip_payload() {
    u32 frame_cap = kMaxFrame - kEthLen;
    return (dev.mtu < frame_cap ? dev.mtu : frame_cap) - kIpLen;
}

// ---- ARP (RFC 826) -------------------------------------------------------------------

struct ArpEntry { u32 ip; u8 mac[6]; bool valid; };
ArpEntry arp_cache[8];
unsigned arp_victim;

ArpEntry* arp_find(u32 ip) {
    for (ArpEntry& e : arp_cache) if (e.valid && e.ip == ip) return &e;
    return nullptr;
}
void arp_learn(u32 ip, const u8 mac[6], bool create) {
    if (ip == 0 || (mac[0] & 1)) return;  // no multicast/broadcast senders
    ArpEntry* e = arp_find(ip);
    if (!e && !create) return;
    if (!e) { e = &arp_cache[arp_victim]; arp_victim = (arp_victim + 1) % 8; }
    e->ip = ip;
    memcpy(e->mac, mac, 6);
    e->valid = true;
}

void arp_send(u16 op, const u8 dst_mac[6], const u8 target_mac[6], u32 target_ip) {
    u16 id;
    u8* f = tx_begin(&id);
    if (!f) return;
    eth_header(f, dst_mac, ETH_ARP);
    u8* a = f + kEthLen;
    put16(a, 1); put16(a + 2, ETH_IPV4); a[4] = 6; a[5] = 4; put16(a + 6, op);
    memcpy(a + 8, dev.mac, 6); put32(a + 14, dev.ip);
    memcpy(a + 18, target_mac, 6); put32(a + 24, target_ip);
    tx_commit(id, kEthLen + 28);
}

void arp_input(const u8* a, u32 len) {
    if (len < 28 || get16(a) != 1 || get16(a + 2) != ETH_IPV4 || a[4] != 6 || a[5] != 4) { ++g_net_stats.dropped; return; }
    u16 op = get16(a + 6);
    u32 spa = get32(a + 14), tpa = get32(a + 24);
    bool for_us = tpa == dev.ip;
    arp_learn(spa, a + 8, for_us);  // RFC 826 merge: update, create only when addressed to us
    ++g_net_stats.arp;
    if (op == 1 && for_us) arp_send(2, a + 8, a + 8, spa);  // reply to the asker
}

// ---- IPv4, ICMP, UDP -------------------------------------------------------------------

void icmp_input(const u8* src_mac, u32 src_ip, const u8* m, u32 len) {
    if (len < kIcmpLen || csum_fold(csum_add(0, m, len)) != 0) { ++g_net_stats.dropped; return; }
    if (m[0] == 8 && m[1] == 0 && len > max_ip_payload()) { ++g_net_stats.dropped; return; }  // no room to answer
    ++g_net_stats.icmp;
    if (m[0] == 0 && m[1] == 0) {  // echo reply
        if (g_echo_reply_handler) g_echo_reply_handler(src_ip, get16(m + 4), get16(m + 6), rdtsc());
        return;
    }
    if (m[0] != 8 || m[1] != 0) return;  // only echo requests need an answer
    u16 id;
    u8* f = tx_begin(&id);
    if (!f) return;
    u8* r = f + kEthLen + kIpLen;
    copy(r, m, len);
    r[0] = 0;  // echo reply: same identifier, sequence and data (RFC 792)
    put16(r + 2, csum_update(get16(m + 2), 0x0800, 0x0000));  // only the type changed
    ip_send(id, f, src_mac, src_ip, IP_ICMP, len);
}

void udp_input(const u8* src_mac, u32 src_ip, u32 dst_ip, const u8* u, u32 len) {
    if (len < kUdpLen) { ++g_net_stats.dropped; return; }
    u32 ulen = get16(u + 4);
    if (ulen < kUdpLen || ulen > len) { ++g_net_stats.dropped; return; }
    // A zero checksum means none was computed (RFC 768); verify any other.
    if (get16(u + 6) != 0 && csum_fold(csum_add(pseudo_sum(src_ip, dst_ip, IP_UDP, ulen), u, ulen)) != 0) {
        ++g_net_stats.dropped;
        return;
    }
    ++g_net_stats.udp;
    if (g_udp_handler)
        g_udp_handler({src_mac, src_ip, get16(u), get16(u + 2), u + kUdpLen, ulen - kUdpLen, get16(u + 6), rdtsc()});
}

void ipv4_input(const u8* src_mac, const u8* ip, u32 len) {
    if (len < kIpLen || (ip[0] >> 4) != 4) { ++g_net_stats.dropped; return; }
    u32 hlen = u32(ip[0] & 0xf) * 4, total = get16(ip + 2);
    if (hlen < kIpLen || total < hlen || total > len) { ++g_net_stats.dropped; return; }
    if (csum_fold(csum_add(0, ip, hlen)) != 0) { ++g_net_stats.dropped; return; }
    u32 dst = get32(ip + 16), src = get32(ip + 12);
    if (dst != dev.ip) { ++g_net_stats.dropped; return; }
    // No answers to unspecified, loopback, multicast or broadcast sources.
    if (src == 0 || (src >> 24) == 127 || src >= 0xe0000000u || (dev.mask != ~0u && (src | dev.mask) == ~0u)) {
        ++g_net_stats.dropped;
        return;
    }
    if (get16(ip + 6) & 0x3fff) { ++g_net_stats.dropped; return; }  // MF or a fragment offset: no reassembly
    // Options (hlen > 20) are skipped; the trailing Ethernet padding (len > total) ignored.
    const u8* l4 = ip + hlen;
    u32 l4_len = total - hlen;
    if (ip[9] == IP_ICMP) icmp_input(src_mac, src, l4, l4_len);
    else if (ip[9] == IP_UDP) udp_input(src_mac, src, dst, l4, l4_len);
    else ++g_net_stats.dropped;
}

void eth_input(const u8* f, u32 len) {
    ++g_net_stats.rx;
    if (len < kEthLen) { ++g_net_stats.dropped; return; }
    if (memcmp(f, dev.mac, 6) != 0 && memcmp(f, kBroadcast, 6) != 0) { ++g_net_stats.dropped; return; }
    u16 type = get16(f + 12);
    if (type == ETH_ARP) arp_input(f + kEthLen, len - kEthLen);
    else if (type == ETH_IPV4) ipv4_input(f + 6, f + kEthLen, len - kEthLen);
    else ++g_net_stats.dropped;
}

void asm_append(const u8* p, u32 n) {
    if (dev.asm_len + n > kAsmSize) { dev.asm_bad = true; return; }
    copy(rx_asm + dev.asm_len, p, n);
    dev.asm_len += n;
}

// One used receive buffer: a whole packet, or part of a merged one (5.1.6.4).
void rx_buffer(u16 id, u32 len) {
    if (len > kBufSize) len = kBufSize;  // the device cannot have written more than we gave
    const u8* b = rx_bufs[id];
    if (dev.asm_left) {  // a continuation buffer: no header
        asm_append(b, len);
        if (--dev.asm_left == 0) {
            if (dev.asm_bad) { ++g_net_stats.rx; ++g_net_stats.dropped; }
            else eth_input(rx_asm, dev.asm_len);
        }
        return;
    }
    if (len < kHdrLen) { ++g_net_stats.rx; ++g_net_stats.dropped; return; }
    u16 nbuf = dev.mrg ? u16(b[10] | (b[11] << 8)) : 1;  // num_buffers, little-endian
    if (nbuf <= 1) { eth_input(b + kHdrLen, len - kHdrLen); return; }
    if (nbuf > dev.rx.size) { ++g_net_stats.rx; ++g_net_stats.dropped; return; }  // more than it could have used
    dev.asm_len = 0;
    dev.asm_bad = false;
    asm_append(b + kHdrLen, len - kHdrLen);
    dev.asm_left = u16(nbuf - 1);
}

}  // namespace

NetStats g_net_stats;
void (*g_udp_handler)(const UdpPacket&);
void (*g_echo_reply_handler)(u32, u16, u16, u64);

void net_wait(u64 deadline_ns) {
    // Without MSI-X nothing wakes us for a packet: poll every 100 µs.
    u64 now = kvmclock_ns();
    if (now >= deadline_ns) return;
    if (dev.busy_poll) { cpu_relax(); return; }
    // With MSI-X a halt still ends within 5 ms, so a lost wake-up costs 5 ms,
    // not the test (2.7.10: with EVENT_IDX one lost interrupt stalls a queue).
    u64 cap = dev.msix ? 5000000ull : 100000ull;
    u64 until = deadline_ns - now > cap ? now + cap : deadline_ns;
    if (!dev.tsc_deadline) {
        if (!dev.msix || deadline_ns != ~0ull) {
            cpu_relax();  // no timer to end a halt: spin
            return;
        }
        until = ~0ull;  // halt until the interrupt
    }
    cli();
    // 2.7.10: ask for an interrupt at the next used buffer, then re-check.
    bool pending = dev.rx.enable_interrupts();
    if (dev.tx_nfree == 0) pending |= dev.tx.enable_interrupts();
    if (!pending) {
        if (until != ~0ull) {
            g_wait_rearm_tsc = ns_to_tsc(until - now);
            wrmsr(MSR_IA32_TSC_DEADLINE, rdtsc() + g_wait_rearm_tsc);
        }
        ++dev.halts;
        u64 irqs = dev.irq_rx + dev.irq_tx;
        sti_hlt();  // any interrupt ends it: the caller re-checks everything
        cli();
        if (until != ~0ull) {
            g_wait_rearm_tsc = 0;
            wrmsr(MSR_IA32_TSC_DEADLINE, 0);
        }
        // Woken by the timer with used buffers waiting: an interrupt was lost or late.
        if (dev.irq_rx + dev.irq_tx == irqs && (dev.rx.has_used() || dev.tx.has_used())) ++dev.late_wakeups;
    }
    // Busy again: no interrupts until the next wait (NAPI-style).
    dev.rx.disable_interrupts();
    dev.tx.disable_interrupts();
    sti();
}

bool net_poll() {
    bool did = false;
    u16 id;
    u32 len;
    unsigned n = 0;
    // A bounded batch, then give transmit completions a turn.
    while (n < dev.rx.size && dev.rx.pop(&id, &len)) {
        ++n;
        if (!dev.rx_posted[id]) continue;  // returned twice: a device bug, never post it twice
        dev.rx_posted[id] = false;
        rx_buffer(id, len);
        dev.rx.push(id);  // straight back to the device (5.1.6.3)
        dev.rx_posted[id] = true;
    }
    if (n) { dev.rx.publish(); did = true; }
    u16 before = dev.tx_nfree;
    tx_reap();
    return did || dev.tx_nfree != before;
}

bool net_resolve(u32 ip, u8 mac[6], u64 timeout_ms) {
    u32 hop = ip;
    if ((ip & dev.mask) != (dev.ip & dev.mask)) {
        if (!dev.gw) return false;
        hop = dev.gw;
    }
    u64 end = kvmclock_ns() + timeout_ms * 1000000ull;
    for (;;) {
        if (ArpEntry* e = arp_find(hop)) { memcpy(mac, e->mac, 6); return true; }
        if (kvmclock_ns() >= end) return false;
        const u8 zero[6] = {};
        arp_send(1, kBroadcast, zero, hop);
        u64 retry = kvmclock_ns() + 200000000ull;  // ask again every 200 ms
        if (retry > end) retry = end;
        while (!arp_find(hop) && kvmclock_ns() < retry)
            if (!net_poll()) net_wait(retry);
    }
}

bool udp_send(const u8 dst_mac[6], u32 dst_ip, u16 src_port, u16 dst_port, const void* data, u32 len, u16 csum) {
    if (len + kUdpLen > max_ip_payload()) return false;
    u16 id;
    u8* f = tx_begin(&id);
    if (!f) return false;
    u8* u = f + kEthLen + kIpLen;
    put16(u, src_port); put16(u + 2, dst_port); put16(u + 4, u16(kUdpLen + len)); put16(u + 6, 0);
    copy(u + kUdpLen, data, len);
    if (!csum) {
        u16 c = csum_fold(csum_add(pseudo_sum(dev.ip, dst_ip, IP_UDP, kUdpLen + len), u, kUdpLen + len));
        csum = c ? c : 0xffff;  // 0 would mean "no checksum" (RFC 768)
    }
    put16(u + 6, csum);
    ip_send(id, f, dst_mac, dst_ip, IP_UDP, kUdpLen + len);
    return true;
}

bool icmp_echo_send(const u8 dst_mac[6], u32 dst_ip, u16 ident, u16 seq, const void* data, u32 len) {
    if (len + kIcmpLen > max_ip_payload()) return false;
    u16 id;
    u8* f = tx_begin(&id);
    if (!f) return false;
    u8* m = f + kEthLen + kIpLen;
    m[0] = 8; m[1] = 0; put16(m + 2, 0); put16(m + 4, ident); put16(m + 6, seq);
    copy(m + kIcmpLen, data, len);
    put16(m + 2, csum_fold(csum_add(0, m, kIcmpLen + len)));
    ip_send(id, f, dst_mac, dst_ip, IP_ICMP, kIcmpLen + len);
    return true;
}

u32 net_max_udp_payload() { return max_ip_payload() - kUdpLen; }

bool parse_ipv4(const char* s, u32* ip, const char** end) {
    u32 v = 0;
    for (int i = 0; i < 4; ++i) {
        if (*s < '0' || *s > '9') return false;
        u32 part = 0;
        for (int d = 0; *s >= '0' && *s <= '9'; ++d, ++s) {
            if (d == 3) return false;
            part = part * 10 + u32(*s - '0');
        }
        if (part > 255) return false;
        v = (v << 8) | part;
        if (i < 3 && *s++ != '.') return false;
    }
    *ip = v;
    if (end) *end = s;
    return true;
}

void format_ipv4(u32 ip, char out[16]) {
    format(out, 16, "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 0xff, (ip >> 8) & 0xff, ip & 0xff);
}

// ---- device bring-up (3.1.1, 4.1.5, 5.1.5) --------------------------------------------------

static bool net_config(const char* cmdline) {
    char buf[40];
    const char* end;
    if (!cmdline_get(cmdline, "ip", buf, sizeof buf) || !parse_ipv4(buf, &dev.ip, &end)) {
        print("net: need ip=ADDR/PREFIX on the command line\n");
        return false;
    }
    u32 prefix = 24;
    if (*end == '/') {
        bool ok;
        prefix = u32(parse_u64(end + 1, &ok));
        if (!ok || prefix > 32) { print("net: bad prefix in ip=%s\n", buf); return false; }
    } else if (*end) {
        print("net: bad ip=%s\n", buf);
        return false;
    }
    dev.mask = prefix ? ~0u << (32 - prefix) : 0;
    if (cmdline_get(cmdline, "gw", buf, sizeof buf) && (!parse_ipv4(buf, &dev.gw, &end) || *end)) {
        print("net: bad gw=%s\n", buf);
        return false;
    }
    return true;
}

// net_bars=reassign: forget the NIC's memory BARs so that pci_setup_bars()
// places them itself, as without firmware (QEMU's SeaBIOS never leaves that).
static void forget_bars(PciAddr a) {
    pci_write16(a, PCI_COMMAND, u16(pci_read16(a, PCI_COMMAND) & ~PCI_CMD_MEMORY));
    for (unsigned i = 0; i < 6; ++i) {
        u32 lo = pci_read32(a, PCI_BAR0 + 4 * i);
        if (lo & 1) continue;
        pci_write32(a, PCI_BAR0 + 4 * i, 0);
        if (((lo >> 1) & 3) == 2 && i < 5) pci_write32(a, PCI_BAR0 + 4 * ++i, 0);
    }
}

static bool net_bringup(const char* cmdline) {
    PciAddr a;
    if (!pci_find(kVirtioVendor, kVirtioNetDevice, &a)) { print("net: no virtio-net (1af4:1041) on bus 0\n"); return false; }
    char opt[16];
    if (cmdline_get(cmdline, "net_bars", opt, sizeof opt) && str_eq(opt, "reassign", 9)) forget_bars(a);
    VirtioPci& vp = dev.vp;
    if (!vp.probe(a)) { print("net: %02x:%02x.%x lacks the virtio common/notify capabilities\n", a.bus, a.slot, a.func); return false; }
    if (!vp.negotiate(kWantedFeatures)) { print("net: feature negotiation failed (VERSION_1 or FEATURES_OK)\n"); return false; }
    dev.mrg = (vp.features & NET_F_MRG_RXBUF) != 0;
    dev.mtu = 1500;
    dev.ip_id = 1;
    // MSI-X: entry 0 configuration changes, 1 receive, 2 transmit; with a
    // smaller table, everything shares entry 0.
    set_irq_handler(kVecConfig, irq_config);
    set_irq_handler(kVecRx, irq_rx);
    set_irq_handler(kVecTx, irq_tx);
    set_irq_handler(kVecTimer, irq_timer);
    u16 e_rx = VIRTIO_NO_VECTOR, e_tx = VIRTIO_NO_VECTOR, e_cfg = VIRTIO_NO_VECTOR;
    if (vp.msix_size >= 3) {
        vp.msix_route(kEntryConfig, kVecConfig); vp.msix_route(kEntryRx, kVecRx); vp.msix_route(kEntryTx, kVecTx);
        e_cfg = kEntryConfig; e_rx = kEntryRx; e_tx = kEntryTx;
    } else if (vp.msix_size >= 1) {
        vp.msix_route(0, kVecRx);
        e_cfg = e_rx = e_tx = 0;
    }
    if (e_rx != VIRTIO_NO_VECTOR) vp.msix_enable();
    bool cfg_ok = e_cfg != VIRTIO_NO_VECTOR && vp.set_config_vector(e_cfg) == e_cfg;
    bool rx_vec = false, tx_vec = false;
    if (!vp.setup_queue(kRxQueue, &dev.rx, rxq_mem, e_rx, &rx_vec) ||
        !vp.setup_queue(kTxQueue, &dev.tx, txq_mem, e_tx, &tx_vec)) {
        print("net: queue setup failed\n");
        vp.reset();
        return false;
    }
    dev.msix = rx_vec;  // interrupts for receive are what waiting needs
    if (e_rx != VIRTIO_NO_VECTOR && !(rx_vec && tx_vec && cfg_ok))
        print("net: device refused MSI-X vectors (config %d rx %d tx %d): polling\n", cfg_ok, rx_vec, tx_vec);
    // Receive buffers: all posted before DRIVER_OK (3.1.1 step 7 allows it).
    for (u16 i = 0; i < dev.rx.size; ++i) {
        dev.rx.set_buffer(i, rx_bufs[i], kBufSize, true);
        dev.rx.push(i);
        dev.rx_posted[i] = true;
    }
    for (u16 i = 0; i < dev.tx.size; ++i) {
        dev.tx.set_buffer(i, tx_bufs[i], kBufSize, false);
        dev.tx_busy[i] = false;
        dev.tx_free[i] = u16(dev.tx.size - 1 - i);
    }
    dev.tx_nfree = dev.tx.size;
    dev.rx.disable_interrupts();
    dev.tx.disable_interrupts();
    // 5.1.5: MAC from the configuration space (read until config_generation is stable, 4.1.4.3.1).
    if (vp.features & NET_F_MAC) {
        for (int tries = 0; tries < 10; ++tries) {
            u8 g = vp.config_generation();
            for (u32 i = 0; i < 6; ++i) dev.mac[i] = vp.cfg_read8(CFG_MAC + i);
            if (vp.config_generation() == g) break;
        }
    } else {
        const u8 fixed[6] = {0x52, 0x54, 0x00, 0x4b, 0x47, 0x01};  // locally administered
        memcpy(dev.mac, fixed, 6);
    }
    if (vp.features & NET_F_MTU) {
        u32 m = vp.cfg_read16(CFG_MTU);
        if (m >= 576 && m < dev.mtu) dev.mtu = m;  // larger than 1500: we keep 1500 (no big receive buffers)
    }
    vp.driver_ok();  // 3.1.1 step 8
    dev.rx.publish();
    dev.tsc_hz = tsc_hz();
    dev.tsc_deadline = (cpuid(1).c & (1u << 24)) != 0;
    if (dev.tsc_deadline) lapic_write(LAPIC_LVTT, (2u << 17) | kVecTimer);  // TSC-deadline mode
    return true;
}

bool net_init(const char* cmdline) {
    if (g_init_state) return g_init_state > 0;
    g_init_state = -1;
    char opt[8];
    dev.busy_poll = cmdline_get(cmdline, "net_poll", opt, sizeof opt) && opt[0] == '1';
    if (!net_config(cmdline) || !net_bringup(cmdline)) {
        print("RESULT net-init ok=0\n");
        return false;
    }
    g_init_state = 1;
    char ip[16];
    format_ipv4(dev.ip, ip);
    u32 prefix = u32(__builtin_popcount(dev.mask));
    u16 link = (dev.vp.features & NET_F_STATUS) ? u16(dev.vp.cfg_read16(CFG_STATUS) & 1) : 1;
    print("RESULT net-init mac=%02x:%02x:%02x:%02x:%02x:%02x ip=%s/%u msix=%d features=%#lx queue_size=%u mtu=%u "
          "mrg_rxbuf=%d event_idx=%d link=%u pci=%02x:%02x.%x ok=1\n",
          dev.mac[0], dev.mac[1], dev.mac[2], dev.mac[3], dev.mac[4], dev.mac[5], ip, prefix, dev.msix ? 1 : 0,
          dev.vp.features, dev.rx.size, dev.mtu, dev.mrg ? 1 : 0, dev.rx.event_idx ? 1 : 0, link,
          dev.vp.pci.bus, dev.vp.pci.slot, dev.vp.pci.func);
    // Tell the neighbours where we are (a gratuitous ARP request).
    const u8 zero[6] = {};
    arp_send(1, kBroadcast, zero, dev.ip);
    return true;
}

void net_shutdown() {
    if (g_init_state <= 0) return;
    dev.vp.reset();
    if (dev.tsc_deadline) { wrmsr(MSR_IA32_TSC_DEADLINE, 0); lapic_write(LAPIC_LVTT, 1u << 16); }
    g_init_state = 0;
}

namespace {

u32 tsc_delta_ns(u64 t0, u64 t1) {
    u64 ns = kvmclock_ns_at(t1) - kvmclock_ns_at(t0);
    return u32(ns > 0xffffffffull ? 0xffffffffull : ns);
}

// net-echo state.
u16 echo_port;
bool echo_stop;
void echo_udp(const UdpPacket& p) {
    if (p.dst_port != echo_port) return;
    // The reply's checksum equals the request's: the pseudo-header addresses
    // and the ports only swap places, and ones' complement sums commute.
    udp_send(p.src_mac, p.src_ip, p.dst_port, p.src_port, p.data, p.len, p.csum);
    if (p.len == 11 && memcmp(p.data, "kguest-stop", 11) == 0) echo_stop = true;
}

// net-ping / net-bench state: the reply being waited for.
constexpr u16 kPingIdent = 0x6b67;  // "kg"
u16 want_seq;
bool got_reply;
u64 reply_tsc;
u32 want_ip;
void ping_reply(u32 src, u16 ident, u16 seq, u64 tsc) {
    if (src == want_ip && ident == kPingIdent && seq == want_seq && !got_reply) { got_reply = true; reply_tsc = tsc; }
}

constexpr u32 kMaxSamples = 100000;
u32 rtt_ns[kMaxSamples];

// Runs the stack until `done` or kvmclock reaches deadline.
template <typename Done> void run_until(u64 deadline, Done done) {
    while (!done() && kvmclock_ns() < deadline)
        if (!net_poll()) net_wait(deadline);
}

// net-bench state: the echo being waited for.
u32 bench_seq, bench_size, bench_peer;
u16 bench_peer_port, bench_port;
bool bench_got, bench_bad;
u64 bench_tsc;
u8 bench_payload[2048];
void bench_udp(const UdpPacket& p) {
    if (p.src_ip != bench_peer || p.src_port != bench_peer_port || p.dst_port != bench_port) return;
    if (p.len != bench_size || get32(p.data) != bench_seq) return;  // a late echo of an earlier one
    if (!same(p.data, bench_payload, bench_size)) bench_bad = true;
    bench_got = true;
    bench_tsc = p.rx_tsc;
}

}  // namespace

bool test_net_echo(const char* cmdline) {
    if (!net_init(cmdline)) {
        print("RESULT net-echo rx=0 tx=0 arp=0 icmp=0 udp=0 dropped=0 ok=0\n");
        return false;
    }
    echo_port = u16(cmdline_u64(cmdline, "udp_port", 7777, "net"));
    u64 ms = cmdline_u64(cmdline, "net_ms", 0, "net");
    u64 deadline = ms ? kvmclock_ns() + ms * 1000000ull : ~0ull;
    char ip[16];
    format_ipv4(dev.ip, ip);
    print("net-echo: %s, UDP port %u, %s\n", ip, echo_port, ms ? "until net_ms or kguest-stop" : "until kguest-stop");
    NetStats s0 = g_net_stats;
    echo_stop = false;
    g_udp_handler = echo_udp;
    run_until(deadline, [] { return echo_stop; });
    // Let the last reply leave before anyone resets the device.
    u64 drain = kvmclock_ns() + 100000000ull;
    run_until(drain, [] { return dev.tx_nfree == dev.tx.size; });
    g_udp_handler = nullptr;
    const NetStats& s = g_net_stats;
    NetStats d = {s.rx - s0.rx, s.tx - s0.tx, s.arp - s0.arp, s.icmp - s0.icmp, s.udp - s0.udp,
                  s.dropped - s0.dropped};
    print("net-echo: %s, %lu halts (%lu ended by the timer with work waiting), %lu receive and %lu transmit interrupts, %lu kicks, %lu bad used entries\n",
          echo_stop ? "stopped by kguest-stop" : "net_ms elapsed", dev.halts, dev.late_wakeups, u64(dev.irq_rx), u64(dev.irq_tx),
          dev.rx.kicks + dev.tx.kicks, dev.rx.bad_used + dev.tx.bad_used);
    print("RESULT net-echo rx=%lu tx=%lu arp=%lu icmp=%lu udp=%lu dropped=%lu ok=1\n", d.rx, d.tx, d.arp, d.icmp,
          d.udp, d.dropped);
    return true;
}

bool test_net_ping(const char* cmdline) {
    u64 count = cmdline_u64(cmdline, "count", 10, "net");
    if (count > kMaxSamples) count = kMaxSamples;
    char buf[40];
    u32 target = 0;
    const char* end;
    u8 mac[6];
    bool ok_arg = cmdline_get(cmdline, "ping", buf, sizeof buf) && parse_ipv4(buf, &target, &end) && !*end;
    if (!ok_arg) print("net-ping: need ping=ADDR\n");
    else if (!net_init(cmdline) || !net_resolve(target, mac, 3000)) { print("net-ping: %s unreachable (ARP)\n", buf); ok_arg = false; }
    if (!ok_arg) {
        print("RESULT net-ping sent=0 received=0 rtt_p50_us=0 ok=0\n");
        return false;
    }
    u64 sent = 0, received = 0;
    u8 payload[56];
    for (u32 i = 0; i < sizeof payload; ++i) payload[i] = u8(0x20 + i);
    want_ip = target;
    g_echo_reply_handler = ping_reply;
    for (u64 i = 0; i < count; ++i) {
        want_seq = u16(i + 1);
        got_reply = false;
        u64 t0 = rdtsc();
        if (!icmp_echo_send(mac, target, kPingIdent, want_seq, payload, sizeof payload)) continue;
        ++sent;
        run_until(kvmclock_ns() + 1000000000ull, [] { return got_reply; });
        if (got_reply) rtt_ns[received++] = tsc_delta_ns(t0, reply_tsc);
    }
    g_echo_reply_handler = nullptr;
    u32 n = u32(received);
    sort_u32(rtt_ns, n);
    u32 p50 = percentile(rtt_ns, n, 50), mx = n ? rtt_ns[n - 1] : 0;
    bool ok = sent == count && received == sent;
    print("net-ping: rtt max %u.%03u us\n", mx / 1000, mx % 1000);
    print("RESULT net-ping sent=%lu received=%lu rtt_p50_us=%u.%03u ok=%d\n", sent, received, p50 / 1000, p50 % 1000,
          ok ? 1 : 0);
    return ok;
}

bool test_net_bench(const char* cmdline) {
    u64 count = cmdline_u64(cmdline, "count", 1000, "net"), size = cmdline_u64(cmdline, "size", 64, "net");
    u64 timeout_ms = cmdline_u64(cmdline, "timeout_ms", 1000, "net");
    if (count > kMaxSamples) count = kMaxSamples;
    char buf[40];
    const char* end;
    bool ok_arg = cmdline_get(cmdline, "peer", buf, sizeof buf) && parse_ipv4(buf, &bench_peer, &end) && *end == ':';
    bool ok_port = false;
    if (ok_arg) { u64 p = parse_u64(end + 1, &ok_port); bench_peer_port = u16(p); ok_port &= p > 0 && p < 65536; }
    u8 mac[6];
    if (!ok_arg || !ok_port) print("net-bench: need peer=ADDR:PORT\n");
    else if (!net_init(cmdline)) ok_arg = false;
    else if (size < 4 || size > net_max_udp_payload()) { print("net-bench: size must be 4..%u\n", net_max_udp_payload()); ok_arg = false; }
    else if (!net_resolve(bench_peer, mac, 3000)) { print("net-bench: %s unreachable (ARP)\n", buf); ok_arg = false; }
    if (!ok_arg || !ok_port) {
        print("RESULT net-bench count=%lu size=%lu lost=%lu rtt_p50_us=0 rtt_p99_us=0 pps=0 ok=0\n", count, size, count);
        return false;
    }
    bench_size = u32(size);
    bench_port = 40000 + u16(rdtsc() % 20000);
    for (u32 j = 4; j < bench_size; ++j) bench_payload[j] = u8(j * 7 + (j >> 8));
    g_udp_handler = bench_udp;
    u64 lost = 0, bad = 0, n = 0;
    u64 start = kvmclock_ns();
    for (u64 i = 0; i < count; ++i) {
        bench_seq = u32(i);
        put32(bench_payload, bench_seq);  // the rest: a pattern written once
        bench_got = bench_bad = false;
        u64 t0 = rdtsc();
        if (!udp_send(mac, bench_peer, bench_port, bench_peer_port, bench_payload, bench_size)) { ++lost; continue; }
        run_until(kvmclock_ns() + timeout_ms * 1000000ull, [] { return bench_got; });
        if (!bench_got) { ++lost; continue; }
        if (bench_bad) ++bad;
        rtt_ns[n++] = tsc_delta_ns(t0, bench_tsc);
    }
    u64 elapsed = kvmclock_ns() - start;
    g_udp_handler = nullptr;
    sort_u32(rtt_ns, u32(n));
    u32 p50 = percentile(rtt_ns, u32(n), 50), p99 = percentile(rtt_ns, u32(n), 99);
    u64 pps = elapsed ? n * 1000000000ull / elapsed : 0;
    print("RESULT net-bench count=%lu size=%lu lost=%lu rtt_p50_us=%u.%03u rtt_p99_us=%u.%03u pps=%lu bad=%lu ok=%d\n",
          count, size, lost, p50 / 1000, p50 % 1000, p99 / 1000, p99 % 1000, pps, bad, lost == 0 && bad == 0 ? 1 : 0);
    return lost == 0 && bad == 0;
}
