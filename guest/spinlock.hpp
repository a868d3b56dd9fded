// A fair ticket spinlock in two flavours, chosen at boot (lock=native|pv).
//
// Native: take a ticket, spin until it is served. In a VM it collapses under
// vCPU overcommit: when the host preempts the holder or the next waiter, every
// other waiter spins away its time slice.
//
// Paravirt (KVM_FEATURE_PV_UNHALT): a waiter spins a bounded number of times,
// then says which lock and ticket it waits for and halts. The unlocker wakes
// the waiter whose ticket is now served with KVM_HC_KICK_CPU
// (Documentation/virt/kvm/x86/hypercalls.rst: a0 = flags, a1 = APIC ID).
//
// The uncontended paths are inline; the pv unlock is a locked add (a full
// barrier) plus one load of the sleeper count, the price Linux's pv ticket
// locks paid (arch/x86/include/asm/spinlock.h, 3.12-4.1).
#pragma once

#include "arch.hpp"

struct alignas(64) TicketLock {
    volatile u32 head = 0;      // the ticket being served
    volatile u32 tail = 0;      // the next ticket to hand out
    volatile u32 sleepers = 0;  // waiters that announced a halt (pv only)
};

// Slow paths and the kick, out of line (guest/spinlock.cpp).
void native_lock_wait(TicketLock& l, u32 ticket);
void pv_lock_wait(TicketLock& l, u32 ticket);
void pv_kick_waiter(TicketLock& l, u32 ticket);

template <bool Pv>
inline void ticket_lock(TicketLock& l) {
    u32 t = __atomic_fetch_add(&l.tail, 1, __ATOMIC_ACQUIRE);
    if (__builtin_expect(__atomic_load_n(&l.head, __ATOMIC_ACQUIRE) == t, 1)) return;
    if constexpr (Pv) pv_lock_wait(l, t); else native_lock_wait(l, t);
}

template <bool Pv>
inline void ticket_unlock(TicketLock& l) {
    if constexpr (Pv) {
        // Full barrier between the new head and reading `sleepers`; a waiter
        // does the reverse, so one of the two always sees the other.
        u32 next = __atomic_add_fetch(&l.head, 1, __ATOMIC_SEQ_CST);
        if (__builtin_expect(__atomic_load_n(&l.sleepers, __ATOMIC_RELAXED) != 0, 0)) pv_kick_waiter(l, next);
    } else {
        // Only the holder writes head: a plain release store.
        __atomic_store_n(&l.head, l.head + 1, __ATOMIC_RELEASE);
    }
}

// Is the pv lock usable (PV_UNHALT offered)? Also picks the hypercall instruction.
bool pv_spinlock_init();
