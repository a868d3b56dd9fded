// The guest's test modes, selected by test=... on its command line.
#pragma once

bool test_timer(const char* cmdline, unsigned ncpus);
bool test_idle(const char* cmdline);
bool test_port80(const char* cmdline);
bool test_smp(unsigned ncpus, unsigned online);
bool test_hostile(const char* cmdline);
bool test_pci();
bool test_spinlock(const char* cmdline, unsigned ncpus);  // guest/spinlock.cpp
// guest/net.cpp: virtio-net over virtio-pci and a minimal IPv4 stack.
bool test_net_echo(const char* cmdline);
bool test_net_ping(const char* cmdline);
bool test_net_bench(const char* cmdline);
// guest/tlb.cpp: pointer-chase latency over working sets of growing size (TLB misses).
bool test_tlb(const char* cmdline);
// guest/balloon.cpp: virtio-balloon driver following the host's target, page patterns checked.
bool test_balloon(const char* cmdline);
