// The small guest's virtio-balloon driver (VIRTIO 1.2 section 5.5) over the
// virtio-pci transport (virtio.hpp), and test=balloon (balloon.cpp).
//
// Memory it manages: every 2 MiB-aligned block of RAM (as the PVH memory map
// reports it, balloon_add_ram()) that lies wholly above the guest image and
// below the 32-bit PCI hole (0xc0000000), where the boot page tables
// identity-map it. Each block is free (owned by the test, which keeps a
// pattern in every 4 KiB page), ballooned, or, for at most one block at a
// time, partly ballooned (when the host's target is not a multiple of 512
// pages). The balloon takes whole blocks from the top of RAM downward and
// gives whole blocks back, so the host can return whole 2 MiB regions (and
// keep THP backing for the rest).
#pragma once

#include "arch.hpp"

// Called by kmain for each RAM entry (type 1) of the PVH memory map.
void balloon_add_ram(u64 addr, u64 size);
