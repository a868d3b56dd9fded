// For the `kvm`-labelled suites: open /dev/kvm or fail. A kvm test that skips
// itself would count as passed without having run, so it fails instead,
// unless the user opted out with KGUEST_ALLOW_NO_KVM=1 (unit tests only).
#pragma once

#include "vmm/kvm.hpp"

#include <cstdlib>
#include <cstring>
#include <gtest/gtest.h>
#include <memory>

namespace kguest::test {

inline bool allow_no_kvm() {
    const char* v = std::getenv("KGUEST_ALLOW_NO_KVM");
    return v != nullptr && std::strcmp(v, "1") == 0;
}

} // namespace kguest::test

// Declares `std::unique_ptr<kguest::Kvm> kvm` in the calling test body.
#define KGUEST_OPEN_KVM(kvm)                                                              \
    std::unique_ptr<::kguest::Kvm> kvm;                                                   \
    try {                                                                                 \
        kvm = std::make_unique<::kguest::Kvm>();                                          \
    } catch (const std::exception& e) {                                                   \
        if (::kguest::test::allow_no_kvm()) GTEST_SKIP() << "no usable KVM: " << e.what(); \
        FAIL() << "no usable KVM (" << e.what()                                           \
               << "); run through scripts/sandbox, or set KGUEST_ALLOW_NO_KVM=1 to skip";  \
    }
