// The guest's test modes, selected by test=... on its command line.
#pragma once

bool test_timer(const char* cmdline, unsigned ncpus);
bool test_idle(const char* cmdline);
bool test_port80(const char* cmdline);
bool test_smp(unsigned ncpus, unsigned online);
bool test_hostile(const char* cmdline);
bool test_pci();
bool test_spinlock(const char* cmdline, unsigned ncpus);  // spinlock.cpp
bool test_net_echo(const char* cmdline);                   // net.cpp
bool test_net_ping(const char* cmdline);
bool test_net_bench(const char* cmdline);
bool test_tlb(const char* cmdline);                        // tlb.cpp
bool test_balloon(const char* cmdline);                    // balloon.cpp
bool test_mem(const char* cmdline);                        // mem.cpp
bool test_blk(const char* cmdline);                        // blk.cpp
bool test_blk_bench(const char* cmdline);
bool test_blk_log(const char* cmdline);
bool test_rng(const char* cmdline);                        // rng.cpp
