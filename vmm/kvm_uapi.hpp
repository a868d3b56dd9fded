// <linux/kvm.h>, made safe for C++. Hack: Linux 6.1's uapi headers (Debian
// 12) declare flexible arrays with __DECLARE_FLEX_ARRAY, an anonymous struct
// holding an empty struct; C++ gives an empty struct one byte, so in C++
// struct kvm_cpuid2 is 12 bytes instead of 8, its entries move, and every
// ioctl number derived from its size (KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2,
// KVM_SET_MSRS, KVM_SET_GSI_ROUTING...) is wrong, which KVM answers with
// EINVAL. We define the macro as the plain zero-length array (a GNU extension
// C++ compilers accept) before the kernel headers see it. Include this, never
// <linux/kvm.h> directly.
#pragma once

#include <linux/stddef.h>
#undef __DECLARE_FLEX_ARRAY
#define __DECLARE_FLEX_ARRAY(TYPE, NAME) TYPE NAME[0]
#include <linux/kvm.h>

#include <cstddef>

static_assert(sizeof(kvm_cpuid2) == 8 && offsetof(kvm_cpuid2, entries) == 8, "kvm_cpuid2 layout");
static_assert(sizeof(kvm_msrs) == 8 && offsetof(kvm_msrs, entries) == 8, "kvm_msrs layout");
static_assert(sizeof(kvm_irq_routing) == 8 && offsetof(kvm_irq_routing, entries) == 8, "kvm_irq_routing layout");
