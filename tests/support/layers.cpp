// The include-layer check (see layers.hpp): a line scanner, not a
// preprocessor, so an include inside `#if 0` or a block comment still counts.
#include "tests/support/layers.hpp"

#include <algorithm>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string_view>

namespace kguest::test {
namespace {

namespace fs = std::filesystem;

struct Layer {
    std::string_view folder;
    int rank;
};

constexpr Layer kLayers[] = {
    {"devices/base/", 0}, {"devices/", 1}, {"balloon/", 2}, {"vmm/", 3}, {"vmm/app/", 4},
};
constexpr std::string_view kScanned[] = {"devices", "balloon", "vmm"};
constexpr std::string_view kOutside[] = {"tests/", "guest/"};
constexpr int kVmmRank = 3;  // the lowest layer that may include KVM headers
constexpr std::string_view kSourceExtensions[] = {".h", ".hpp", ".c", ".cc", ".cpp"};

const Layer* layer_of(std::string_view rel) {
    const Layer* best = nullptr;
    for (const Layer& l : kLayers)
        if (rel.starts_with(l.folder) && (!best || l.folder.size() > best->folder.size())) best = &l;
    return best;
}

std::string describe(const Layer& l) { return "layer " + std::to_string(l.rank) + " " + std::string(l.folder); }

struct Include {
    std::string name;
    bool angled;
};

// `#include "x"` or `# include <x>`, with any blanks around the '#'.
std::optional<Include> parse_include(std::string_view line) {
    auto skip_blanks = [&] {
        while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
    };
    skip_blanks();
    if (!line.starts_with('#')) return std::nullopt;
    line.remove_prefix(1);
    skip_blanks();
    if (!line.starts_with("include")) return std::nullopt;
    line.remove_prefix(7);
    skip_blanks();
    if (line.empty() || (line.front() != '"' && line.front() != '<')) return std::nullopt;
    const bool angled = line.front() == '<';
    const auto end = line.find(angled ? '>' : '"', 1);
    if (end == std::string_view::npos) return std::nullopt;
    return Include{std::string(line.substr(1, end - 1)), angled};
}

bool is_kvm_header(std::string_view name) {
    return name.starts_with("linux/kvm") || name.starts_with("asm/kvm");
}

// The path relative to root, or nullopt when it lies outside root.
std::optional<std::string> under_root(const fs::path& p, const fs::path& root) {
    const fs::path rel = p.lexically_normal().lexically_relative(root);
    if (rel.empty() || *rel.begin() == "..") return std::nullopt;
    return rel.generic_string();
}

// Where the include lands, relative to root: the first existing candidate in
// the compiler's order; an unresolved quoted include by its spelling; an
// unresolved angled one is a system header (nullopt).
std::optional<std::string> resolve(const Include& inc, const fs::path& dir, const fs::path& root) {
    if (!inc.angled && fs::is_regular_file(dir / inc.name)) return under_root(dir / inc.name, root);
    if (fs::is_regular_file(root / inc.name)) return under_root(root / inc.name, root);
    if (inc.angled) return std::nullopt;
    return under_root((inc.name.starts_with("./") || inc.name.starts_with("../") ? dir : root) / inc.name, root);
}

void check_file(const fs::path& path, const fs::path& root, LayerReport& report) {
    const std::string rel = *under_root(path, root);
    const Layer& own = *layer_of(rel);
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot read " + path.string());
    ++report.files;
    std::string line;
    for (int n = 1; std::getline(in, line); ++n) {
        const auto inc = parse_include(line);
        if (!inc) continue;
        ++report.includes;
        const std::string spelled = inc->angled ? "<" + inc->name + ">" : "\"" + inc->name + "\"";
        auto flag = [&](std::string why) { report.violations.push_back({rel, n, spelled, std::move(why)}); };
        if (inc->angled && is_kvm_header(inc->name) && own.rank < kVmmRank) {
            flag("a KVM header in " + describe(own) + ", below vmm/");
            continue;
        }
        const auto target = resolve(*inc, path.parent_path(), root);
        if (!target) continue;
        const std::string as = *target == inc->name ? "" : ", i.e. " + *target;
        for (std::string_view outside : kOutside)
            if (target->starts_with(outside)) flag(std::string(outside) + " is outside the product" + as);
        if (const Layer* to = layer_of(*target); to && to->rank > own.rank)
            flag(describe(*to) + " above " + describe(own) + as);
    }
}

} // namespace

std::string to_string(const LayerViolation& v) {
    return v.file + ":" + std::to_string(v.line) + ": includes " + v.include + " (" + v.why + ")";
}

LayerReport check_layers(const fs::path& root_in) {
    const fs::path root = fs::absolute(root_in).lexically_normal();
    LayerReport report;
    for (std::string_view top : kScanned) {
        const fs::path dir = root / top;
        if (!fs::is_directory(dir)) throw std::runtime_error("no " + std::string(top) + "/ under " + root.string());
        std::vector<fs::path> files;
        for (const auto& e : fs::recursive_directory_iterator(dir)) {
            const std::string ext = e.path().extension().string();
            if (e.is_regular_file() && std::ranges::find(kSourceExtensions, ext) != std::end(kSourceExtensions))
                files.push_back(e.path());
        }
        std::ranges::sort(files);
        for (const fs::path& f : files) check_file(f, root, report);
    }
    std::ranges::stable_sort(report.violations, {}, [](const LayerViolation& v) { return v.file; });
    return report;
}

} // namespace kguest::test
