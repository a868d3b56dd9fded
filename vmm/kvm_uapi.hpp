// <linux/kvm.h>, made safe for C++. Hack: Linux 6.1's uapi headers (Debian
// 12) declare flexible arrays with __DECLARE_FLEX_ARRAY, an anonymous struct
// holding an empty struct, which C++ sizes at one byte: kvm_cpuid2 becomes 12
// bytes, not 8, and every ioctl number derived from such a size
// (KVM_SET_CPUID2, KVM_SET_GSI_ROUTING...) is wrong (KVM answers EINVAL). We
// define the macro as a zero-length array first. Never include <linux/kvm.h>.
#pragma once

#include <linux/stddef.h>
#undef __DECLARE_FLEX_ARRAY
#define __DECLARE_FLEX_ARRAY(TYPE, NAME) TYPE NAME[0]
#include <linux/kvm.h>

#include <cstddef>

static_assert(sizeof(kvm_cpuid2) == 8 && offsetof(kvm_cpuid2, entries) == 8, "kvm_cpuid2 layout");
static_assert(sizeof(kvm_msrs) == 8 && offsetof(kvm_msrs, entries) == 8, "kvm_msrs layout");
static_assert(sizeof(kvm_irq_routing) == 8 && offsetof(kvm_irq_routing, entries) == 8, "kvm_irq_routing layout");
