// The include-layer check (tests/support/layers.hpp) over the real tree, and
// over a made-up tree with deliberately bad includes, so the check is seen to
// fail when a file includes a layer above its own.
#include "tests/support/layers.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace kguest::test {
namespace {

namespace fs = std::filesystem;

TEST(Layers, ProductIncludesPointOnlyDown) {
    const LayerReport report = check_layers(KGUEST_SOURCE_DIR);
    // An empty scan (a wrong root, a parser that matches nothing) must not pass.
    EXPECT_GE(report.files, 40u);
    EXPECT_GE(report.includes, 300u);
    for (const LayerViolation& v : report.violations) ADD_FAILURE() << to_string(v);
}

class TempTree {
public:
    TempTree() {
        char tmpl[] = "/tmp/kguest-layers-test.XXXXXX";
        if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
        root_ = tmpl;
    }
    ~TempTree() {
        std::error_code ec;
        fs::remove_all(root_, ec);
    }
    TempTree(const TempTree&) = delete;
    TempTree& operator=(const TempTree&) = delete;

    void write(const std::string& rel, const std::string& text) const {
        fs::create_directories((root_ / rel).parent_path());
        std::ofstream(root_ / rel) << text;
    }
    const fs::path& root() const { return root_; }

private:
    fs::path root_;
};

std::vector<std::string> strings(const LayerReport& r) {
    std::vector<std::string> out;
    for (const LayerViolation& v : r.violations) out.push_back(to_string(v));
    return out;
}

// Every layer, with includes that are all allowed.
void write_clean_tree(const TempTree& t) {
    t.write("devices/base/log.hpp", "#pragma once\n#include <string>\n");
    t.write("devices/base/bus.hpp", "#include \"devices/base/log.hpp\"\n#include \"log.hpp\"\n");
    t.write("devices/serial.hpp", "#include \"devices/base/bus.hpp\"\n#include <linux/if_tun.h>\n");
    t.write("devices/serial.cpp", "#include \"devices/serial.hpp\"\n// #include \"vmm/kvm.hpp\" in a comment\n");
    t.write("balloon/balloon.hpp", "#include \"devices/serial.hpp\"\n#include \"../devices/base/bus.hpp\"\n");
    t.write("vmm/kvm_uapi.hpp", "#include <linux/kvm.h>\n");
    t.write("vmm/kvm.hpp", "#include \"kvm_uapi.hpp\"\n#include \"balloon/balloon.hpp\"\n#include <nlohmann/json.hpp>\n");
    t.write("vmm/app/api.hpp", "#include \"vmm/kvm.hpp\"\n#include \"vmm/app/api.hpp\"\n");
    t.write("guest/lib.hpp", "#include \"vmm/app/api.hpp\"\n");  // outside the check
    t.write("tests/process.hpp", "#include \"vmm/app/api.hpp\"\n");
    t.write("devices/README.txt", "#include \"vmm/kvm.hpp\"\n");  // not a source file
}

TEST(Layers, CleanTreePasses) {
    TempTree t;
    write_clean_tree(t);
    const LayerReport r = check_layers(t.root());
    EXPECT_EQ(r.files, 8u);
    EXPECT_EQ(r.includes, 14u);
    EXPECT_TRUE(r.violations.empty()) << ::testing::PrintToString(strings(r));
}

TEST(Layers, NamesEachBadInclude) {
    TempTree t;
    write_clean_tree(t);
    t.write("devices/base/fd.cpp", "#include <cerrno>\n#include \"devices/serial.hpp\"\n");
    t.write("devices/rtc.cpp", "#include \"devices/base/log.hpp\"\n"
                               "#include \"vmm/kvm.hpp\"\n"
                               "  #  include \"../vmm/app/api.hpp\"\n"
                               "#include <linux/kvm.h>\n"
                               "#include <vmm/kvm_uapi.hpp>\n");
    t.write("devices/base/sub/x.hpp", "#include \"../../../balloon/balloon.hpp\"\n");
    t.write("balloon/tracker.hpp", "#include \"tests/process.hpp\"\n#include \"vmm/kvm.hpp\"\n");
    t.write("vmm/loader.cpp", "#include \"../guest/lib.hpp\"\n#include \"app/api.hpp\"\n");
    const std::vector<std::string> want = {
        "balloon/tracker.hpp:1: includes \"tests/process.hpp\" (tests/ is outside the product)",
        "balloon/tracker.hpp:2: includes \"vmm/kvm.hpp\" (layer 3 vmm/ above layer 2 balloon/)",
        "devices/base/fd.cpp:2: includes \"devices/serial.hpp\" (layer 1 devices/ above layer 0 devices/base/)",
        "devices/base/sub/x.hpp:1: includes \"../../../balloon/balloon.hpp\" "
        "(layer 2 balloon/ above layer 0 devices/base/, i.e. balloon/balloon.hpp)",
        "devices/rtc.cpp:2: includes \"vmm/kvm.hpp\" (layer 3 vmm/ above layer 1 devices/)",
        "devices/rtc.cpp:3: includes \"../vmm/app/api.hpp\" (layer 4 vmm/app/ above layer 1 devices/, i.e. vmm/app/api.hpp)",
        "devices/rtc.cpp:4: includes <linux/kvm.h> (a KVM header in layer 1 devices/, below vmm/)",
        "devices/rtc.cpp:5: includes <vmm/kvm_uapi.hpp> (layer 3 vmm/ above layer 1 devices/)",
        "vmm/loader.cpp:1: includes \"../guest/lib.hpp\" (guest/ is outside the product, i.e. guest/lib.hpp)",
        "vmm/loader.cpp:2: includes \"app/api.hpp\" (layer 4 vmm/app/ above layer 3 vmm/, i.e. vmm/app/api.hpp)",
    };
    EXPECT_EQ(strings(check_layers(t.root())), want);
}

TEST(Layers, MissingFolderIsAnError) {
    TempTree t;
    t.write("devices/serial.hpp", "");
    t.write("vmm/kvm.hpp", "");
    EXPECT_THROW(check_layers(t.root()), std::runtime_error);  // no balloon/
}

} // namespace
} // namespace kguest::test
