// The small guest's network path: a virtio-net driver (VIRTIO 1.2 section
// 5.1) over the virtio-pci transport (virtio.hpp), and a minimal IPv4 stack:
// Ethernet, ARP (answers for us, resolves peers into a small cache), IPv4 (no
// fragments, options skipped), ICMP echo (both ways) and UDP. Single-threaded:
// everything runs on the CPU that called net_init(); waits halt with MSI-X
// plus a TSC-deadline timer. The test modes built on it are in net.cpp.
#pragma once

#include "arch.hpp"

struct NetStats {
    u64 rx, tx, arp, icmp, udp, dropped;  // frames in/out; ARP, ICMP and UDP packets handled; frames dropped
};
extern NetStats g_net_stats;

// Initialises the virtio-net device with ip=ADDR/PREFIX and gw=ADDR from the
// command line; prints the RESULT net-init line. Later calls return the same.
bool net_init(const char* cmdline);
void net_shutdown();  // device reset, timer vector masked

// Processes every received frame and completed transmission; true if there was any.
bool net_poll();
// Halts until the device has something for us or kvmclock passes deadline_ns
// (~0: no timeout). May return early (any interrupt): re-check and call again.
void net_wait(u64 deadline_ns);

// Resolves the next hop for `ip` (itself on our prefix, else gw=) by ARP,
// retrying for up to timeout_ms. False when unreachable.
bool net_resolve(u32 ip, u8 mac[6], u64 timeout_ms);
// Sends a UDP datagram; false when it does not fit or no transmit buffer
// frees up. The checksum is computed unless the caller knows it (csum != 0).
bool udp_send(const u8 dst_mac[6], u32 dst_ip, u16 src_port, u16 dst_port, const void* data, u32 len, u16 csum = 0);
bool icmp_echo_send(const u8 dst_mac[6], u32 dst_ip, u16 id, u16 seq, const void* data, u32 len);

// Upcalls for the test modes (null: the packets are counted and dropped).
struct UdpPacket {
    const u8* src_mac;
    u32 src_ip;
    u16 src_port, dst_port;
    const u8* data;
    u32 len;
    u16 csum;    // as received (0: none was sent)
    u64 rx_tsc;  // when the stack saw it
};
extern void (*g_udp_handler)(const UdpPacket&);
extern void (*g_echo_reply_handler)(u32 src_ip, u16 id, u16 seq, u64 rx_tsc);

u32 net_max_udp_payload();
// "a.b.c.d" at s; *end gets the first character after it. False if malformed.
bool parse_ipv4(const char* s, u32* ip, const char** end);
void format_ipv4(u32 ip, char out[16]);
