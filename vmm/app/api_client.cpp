// The API client and the control subcommands (see api_client.hpp). A request
// runs as an async chain (connect, write, read) on a private io_context for at
// most the client's timeout, so a hung VM cannot hang the CLI. The CLI prints
// the JSON or aligned "key: value" lines with sizes in MiB.
#include "vmm/app/api_client.hpp"
#include "vmm/app/api.hpp"
#include "devices/base/size.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <dirent.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <thread>
#include <unistd.h>
#include <utility>

namespace kguest {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

std::string ApiResponse::error() const {
    if (body.is_object() && body.contains("error") && body["error"].is_string())
        return body["error"].get<std::string>();
    return "HTTP " + std::to_string(status);
}

ApiClient::ApiClient(std::string socket_path, std::chrono::milliseconds timeout)
    : path_(std::move(socket_path)), timeout_(timeout) {}

ApiResponse ApiClient::request(std::string_view method, std::string_view endpoint, const json& body) const {
    std::string target = endpoint.substr(0, 1) == "/" ? std::string(endpoint) : "/api/v1/" + std::string(endpoint);
    http::verb verb = http::string_to_verb(beast::string_view(method.data(), method.size()));
    if (verb == http::verb::unknown) throw std::invalid_argument("ApiClient: unknown method " + std::string(method));
    if (path_.empty() || path_.size() >= sizeof(sockaddr_un{}.sun_path))
        throw SysError("connect " + path_, ENAMETOOLONG);

    http::request<http::string_body> req{verb, target, 11};
    req.set(http::field::host, "localhost");
    req.set(http::field::user_agent, "kguest/" KGUEST_VERSION);
    req.set(http::field::accept, "application/json");
    if (!body.is_null()) {
        req.set(http::field::content_type, "application/json");
        req.body() = body.dump();
    }
    req.keep_alive(false);
    req.prepare_payload();

    asio::io_context io{1};
    asio::local::stream_protocol::socket sock(io);
    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    parser.body_limit(16u << 20);
    const char* stage = "connect";
    beast::error_code result;
    bool done = false;
    auto finish = [&](beast::error_code ec) {
        result = ec;
        done = true;
    };
    sock.async_connect(asio::local::stream_protocol::endpoint(path_), [&](beast::error_code ec) {
        if (ec) return finish(ec);
        stage = "write";
        http::async_write(sock, req, [&](beast::error_code wec, std::size_t) {
            if (wec) return finish(wec);
            stage = "read";
            http::async_read(sock, buffer, parser, [&](beast::error_code rec, std::size_t) { finish(rec); });
        });
    });
    io.run_for(timeout_);
    bool timed_out = !done;
    if (timed_out) {
        beast::error_code ignored;
        sock.close(ignored);
        io.run();  // lets the cancelled chain finish
    }
    std::string where = std::string(stage) + " " + path_;
    if (timed_out) throw SysError(where + " (" + std::string(method) + " " + target + ")", ETIMEDOUT);
    if (result) {
        if (result.category() == boost::system::system_category()) throw SysError(where, result.value());
        if (result == asio::error::eof || result == http::error::end_of_stream || result == http::error::partial_message)
            throw SysError(where + ": the VM closed the connection", ECONNRESET);
        throw std::runtime_error(where + ": " + result.message());
    }

    ApiResponse r;
    r.status = parser.get().result_int();
    const std::string& text = parser.get().body();
    if (!text.empty()) {
        r.body = json::parse(text, nullptr, false);
        if (r.body.is_discarded())
            throw std::runtime_error(path_ + ": " + target + ": the response is not JSON (HTTP " +
                                     std::to_string(r.status) + ")");
    }
    return r;
}

std::string default_socket_dir() {
    if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg != nullptr && *xdg != '\0')
        return std::string(xdg) + "/kguest";
    if (::geteuid() == 0) return "/run/kguest";
    return "/tmp/kguest-" + std::to_string(::getuid());
}

void check_socket_dir(const std::string& dir) {
    struct stat st {};
    if (::lstat(dir.c_str(), &st) != 0) throw_errno("lstat " + dir);
    if (!S_ISDIR(st.st_mode)) throw UsageError("api socket directory " + dir + " is not a directory");
    if (st.st_uid != ::geteuid() && st.st_uid != 0)
        throw UsageError("api socket directory " + dir + " belongs to uid " + std::to_string(st.st_uid) +
                         ", not to us (uid " + std::to_string(::geteuid()) + ") or root; refusing it");
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0 && (st.st_mode & S_ISVTX) == 0)
        throw UsageError("api socket directory " + dir + " is writable by others (mode " +
                         std::to_string((st.st_mode >> 6) & 7) + std::to_string((st.st_mode >> 3) & 7) +
                         std::to_string(st.st_mode & 7) + ", no sticky bit); refusing it");
}

std::string socket_for(const std::string& name) {
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
        throw UsageError("VM name '" + name + "': need a name without slashes");
    const std::string dir = default_socket_dir();
    if (::access(dir.c_str(), F_OK) == 0) check_socket_dir(dir);   // missing: the connect says so
    return dir + "/" + name + ".sock";
}

// The subcommands.

namespace {

constexpr const char* kCliUsage =
    "usage: kguest list [--json]\n"
    "       kguest info NAME [--json]\n"
    "       kguest stats NAME [--json]\n"
    "       kguest balloon NAME --target SIZE [--wait] [--timeout SECONDS] [--json]\n"
    "       kguest resize NAME --memory SIZE [--wait] [--timeout SECONDS] [--json]\n"
    "       kguest pause|resume|stop|power-button NAME\n"
    "NAME may be replaced by --api-socket PATH; --json prints the VM's JSON as is.\n"
    "balloon: SIZE is the guest's size once the balloon holds the rest (K/M/G suffixes);\n"
    "  --wait polls until the balloon gets there, for --timeout seconds (default 60).\n"
    "resize: SIZE is the guest's total memory: above its --memory through virtio-mem (up to\n"
    "  --memory-max, in 2M blocks), below it by unplugging all and inflating the balloon;\n"
    "  --wait shows progress until the guest got there, for --timeout seconds (default 60).\n";

struct CliOptions {
    std::string cmd;
    std::optional<std::string> name, socket, target, memory;
    std::optional<double> timeout_s;
    bool json = false, wait = false, help = false;
};

CliOptions parse_cli(int argc, char** argv) {
    CliOptions o;
    o.cmd = argv[1];
    const bool resize = o.cmd == "resize";
    const bool balloon = o.cmd == "balloon" || resize;   // the same --wait and --timeout
    Args args(argc, argv, 2, o.cmd + ": ");
    while (!args.done()) {
        std::string a = args.flag();
        if (a == "--help" || a == "-h") {
            o.help = true;
        } else if (a == "--json") {
            args.no_value(a);
            o.json = true;
        } else if (a == "--api-socket" && o.cmd != "list") {
            o.socket = args.value(a);
            if (o.socket->empty()) throw UsageError(o.cmd + ": --api-socket needs a path");
        } else if (a == "--memory" && resize) {
            o.memory = args.value(a);
        } else if (a == "--target" && o.cmd == "balloon") {
            o.target = args.value(a);
        } else if (a == "--wait" && balloon) {
            args.no_value(a);
            o.wait = true;
        } else if (a == "--timeout" && balloon) {
            std::string v = args.value(a);
            char* end = nullptr;
            double s = std::strtod(v.c_str(), &end);
            if (v.empty() || *end != '\0' || !std::isfinite(s) || s <= 0 || s > 1e6)
                throw UsageError(o.cmd + ": --timeout '" + v + "': need a number of seconds");
            o.timeout_s = s;
        } else if (a.rfind("-", 0) == 0) {
            throw UsageError(o.cmd + ": unknown option '" + a + "' (see kguest " + o.cmd + " --help)");
        } else if (o.cmd != "list" && !o.name) {
            o.name = a;
        } else {
            throw UsageError(o.cmd + ": unexpected argument '" + a + "'");
        }
    }
    if (o.help) return o;
    if (o.cmd != "list") {
        if (o.name && o.socket) throw UsageError(o.cmd + ": give NAME or --api-socket PATH, not both");
        if (!o.name && !o.socket) throw UsageError(o.cmd + ": need a VM NAME or --api-socket PATH");
    }
    if (o.cmd == "balloon" && !o.target) throw UsageError("balloon: --target SIZE is required");
    if (resize && !o.memory) throw UsageError("resize: --memory SIZE is required");
    if (o.timeout_s && !o.wait) throw UsageError(o.cmd + ": --timeout only makes sense with --wait");
    return o;
}

std::string mib(std::uint64_t bytes) {
    char buf[48];
    if (bytes % (1u << 20) == 0)
        std::snprintf(buf, sizeof buf, "%llu MiB", static_cast<unsigned long long>(bytes >> 20));
    else if (bytes >= (1u << 20))
        std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / (1u << 20));
    else  // small counters (bytes sent by a device...) would all read "0.0 MiB"
        std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
    return buf;
}

using Lines = std::vector<std::pair<std::string, std::string>>;

// Nested objects become dotted keys, array elements KEY.0, KEY.1, ...;
// "*_bytes" and "memory" values print in MiB.
void flatten(const json& j, const std::string& key, Lines& out) {
    if (j.is_object() && !j.empty()) {
        for (const auto& item : j.items()) flatten(item.value(), key.empty() ? item.key() : key + "." + item.key(), out);
        return;
    }
    if (j.is_array() && !j.empty()) {
        for (std::size_t i = 0; i < j.size(); ++i) flatten(j[i], key + "." + std::to_string(i), out);
        return;
    }
    std::string k = key, v;
    bool bytes = k.ends_with("_bytes");
    if ((bytes || k == "memory" || k == "memory_max" || k.ends_with(".memory")) && j.is_number_unsigned()) {
        if (bytes) k.resize(k.size() - 6);
        v = mib(j.get<std::uint64_t>());
    } else if (j.is_string()) {
        v = j.get<std::string>();
    } else {
        v = j.dump(-1, ' ', false, json::error_handler_t::replace);
    }
    out.emplace_back(k, v);
}

void print_lines(const Lines& lines) {
    std::size_t width = 0;
    for (const auto& l : lines) width = std::max(width, l.first.size());
    for (const auto& l : lines)
        std::printf("%-*s %s\n", static_cast<int>(width + 1), (l.first + ":").c_str(), l.second.c_str());
}

// Prints an object with `first` keys leading, in that order, the rest sorted.
void print_object(const json& j, std::initializer_list<const char*> first = {}) {
    if (!j.is_object()) {
        std::printf("%s\n", j.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
        return;
    }
    Lines lines;
    for (const char* k : first)
        if (j.contains(k)) flatten(j[k], k, lines);
    for (const auto& item : j.items())
        if (std::find_if(first.begin(), first.end(), [&](const char* k) { return item.key() == k; }) == first.end())
            flatten(item.value(), item.key(), lines);
    print_lines(lines);
}

// vm.counters' "exits": the top 20 userspace reasons (the API sorts them),
// then KVM's nonzero counters, largest first.
void print_exits(const json& e) {
    if (!e.is_object()) return;
    Lines lines;
    for (const json& x : e.value("userspace", json::array())) {
        if (lines.size() == 20) break;
        const auto n = x.value("count", 0ull);
        const double us = x.value("handling_ns", 0.0) / 1e3;
        char v[64];
        std::snprintf(v, sizeof v, "%llu, %.1f us each", n, n ? us / static_cast<double>(n) : 0.0);
        lines.emplace_back("  " + x.value("reason", std::string("?")), v);
    }
    std::printf("exits to userspace (count, handling time):\n");
    print_lines(lines);
    if (!e.contains("kvm")) {
        std::printf("exits in KVM: %s\n", e.value("kvm_note", std::string()).c_str());
        return;
    }
    std::vector<std::pair<std::uint64_t, std::string>> kvm;
    for (const auto& it : e["kvm"].items())
        if (it.value().get<std::uint64_t>() > 0) kvm.emplace_back(it.value().get<std::uint64_t>(), it.key());
    std::sort(kvm.rbegin(), kvm.rend());
    lines.clear();
    for (const auto& [v, name] : kvm) lines.emplace_back("  " + name, std::to_string(v));
    std::printf("exits in KVM (nonzero counters, all vCPUs):\n");
    print_lines(lines);
}

void print_json(const json& j) {
    std::printf("%s\n", j.dump(2, ' ', false, json::error_handler_t::replace).c_str());
}

// A VM addressed by NAME or --api-socket.
struct Target {
    std::string label;  // for messages
    ApiClient client;
};

Target target_of(const CliOptions& o) {
    if (o.socket) return Target{*o.socket, ApiClient(*o.socket)};
    return Target{*o.name, ApiClient(socket_for(*o.name))};
}

// The body of a successful call, or an exception with the server's message.
json call(const Target& t, std::string_view method, std::string_view endpoint, const json& body = nullptr) {
    ApiResponse r;
    try {
        r = t.client.request(method, endpoint, body);
    } catch (const SysError& e) {
        bool absent = e.err() == ENOENT || e.err() == ECONNREFUSED;
        throw std::runtime_error(t.label + ": cannot reach the VM: " + e.what() +
                                 (absent ? " (is the VM running?)" : ""));
    }
    if (!r.ok())
        throw std::runtime_error(t.label + ": " + std::string(endpoint) + ": " + r.error() + " (HTTP " +
                                 std::to_string(r.status) + ")");
    return r.body;
}

std::uint64_t uint_field(const json& j, const char* key, const std::string& what) {
    if (!j.is_object() || !j.contains(key) || !j[key].is_number_unsigned())
        throw std::runtime_error(what + ": the VM reports no '" + key + "'");
    return j[key].get<std::uint64_t>();
}

int cmd_list(const CliOptions& o) {
    std::string dir = default_socket_dir();
    if (::access(dir.c_str(), F_OK) == 0) check_socket_dir(dir);
    std::vector<std::string> names;
    if (DIR* d = ::opendir(dir.c_str())) {
        while (dirent* e = ::readdir(d)) {
            std::string n = e->d_name;
            if (n.size() > 5 && n.ends_with(".sock")) names.push_back(n.substr(0, n.size() - 5));
        }
        ::closedir(d);
    } else if (errno != ENOENT) {
        throw_errno("opendir " + dir);
    }
    std::sort(names.begin(), names.end());
    json all = json::array();
    std::vector<std::array<std::string, 3>> rows;
    for (const std::string& name : names) {
        std::string path = dir + "/" + name + ".sock";
        struct stat st {};
        if (::lstat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
        ApiClient c(path, std::chrono::seconds(2));
        json info;
        try {
            if (!c.get("vmm.ping").ok()) continue;
            ApiResponse r = c.get("vm.info");
            if (!r.ok() || !r.body.is_object()) continue;
            info = r.body;
        } catch (const std::exception&) {
            continue;  // stale socket, or a VM on its way out
        }
        std::string state = info.value("state", std::string("?"));
        std::string memory = info.contains("memory") && info["memory"].is_number_unsigned()
                                 ? mib(info["memory"].get<std::uint64_t>())
                                 : "?";
        rows.push_back({name, state, memory});
        info["socket"] = path;
        if (!info.contains("name")) info["name"] = name;
        all.push_back(info);
    }
    if (o.json) {
        print_json(all);
        return 0;
    }
    std::size_t w0 = 4, w1 = 5;
    for (const auto& r : rows) {
        w0 = std::max(w0, r[0].size());
        w1 = std::max(w1, r[1].size());
    }
    std::printf("%-*s  %-*s  %s\n", static_cast<int>(w0), "NAME", static_cast<int>(w1), "STATE", "MEMORY");
    for (const auto& r : rows)
        std::printf("%-*s  %-*s  %s\n", static_cast<int>(w0), r[0].c_str(), static_cast<int>(w1), r[1].c_str(),
                    r[2].c_str());
    return 0;
}

int cmd_balloon(const CliOptions& o) {
    auto size = parse_size(*o.target);
    if (!size) throw UsageError("balloon: --target '" + *o.target + "': need a size like 256M or 2G");
    Target t = target_of(o);
    std::uint64_t memory = uint_field(call(t, "GET", "vm.info"), "memory", t.label);
    if (*size > memory)
        throw UsageError("balloon: --target " + *o.target + " is more than the VM's memory (" + mib(memory) + ")");
    call(t, "PUT", "vm.resize", json{{"desired_ram", *size}});
    const std::uint64_t desired = memory - *size;
    if (!o.wait) {
        if (o.json)
            print_json(json{{"memory", memory}, {"desired_ram", *size}, {"desired_balloon", desired}});
        else
            std::printf("%s: balloon target %s (guest %s of %s)\n", t.label.c_str(), mib(desired).c_str(),
                        mib(*size).c_str(), mib(memory).c_str());
        return 0;
    }

    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(o.timeout_s.value_or(60.0)));
    std::optional<std::uint64_t> last;
    for (;;) {
        json info = call(t, "GET", "vm.info");
        if (!info.is_object() || !info.contains("balloon") || !info["balloon"].is_object())
            throw std::runtime_error(t.label + ": the VM has no balloon");
        const json& b = info["balloon"];
        std::uint64_t actual = uint_field(b, "actual_bytes", t.label + ": balloon");
        // The VMM may round what we asked for (pages); its own target is the goal.
        std::uint64_t goal = b.contains("target_bytes") && b["target_bytes"].is_number_unsigned()
                                 ? b["target_bytes"].get<std::uint64_t>()
                                 : desired;
        std::uint64_t diff = actual > goal ? actual - goal : goal - actual;
        bool reached = diff < 4096;
        if (!o.json && (!last || *last != actual || reached)) {
            std::printf("%s: balloon %s of %s, guest %s%s\n", t.label.c_str(), mib(actual).c_str(),
                        mib(goal).c_str(), mib(memory - std::min(actual, memory)).c_str(),
                        reached ? " (reached)" : "");
            std::fflush(stdout);
        }
        last = actual;
        auto now = Clock::now();
        if (reached || now >= deadline) {
            if (o.json) print_json(info);
            if (reached) return 0;
            std::fflush(stdout);
            std::fprintf(stderr, "kguest: %s: balloon holds %s, not %s, after %g s\n", t.label.c_str(),
                         mib(actual).c_str(), mib(goal).c_str(), o.timeout_s.value_or(60.0));
            return 1;
        }
        std::this_thread::sleep_for(std::min<Clock::duration>(std::chrono::milliseconds(200), deadline - now));
    }
}

// kguest resize: vm.resize's desired_ram, then (--wait) vm.info until
// virtio-mem's plugged size and the balloon reached their targets.
int cmd_resize(const CliOptions& o) {
    auto size = parse_size(*o.memory);
    if (!size) throw UsageError("resize: --memory '" + *o.memory + "': need a size like 3G");
    Target t = target_of(o);
    json info = call(t, "GET", "vm.info");
    const std::uint64_t memory = uint_field(info, "memory", t.label);
    const bool has_mem = info.contains("virtio_mem"), has_balloon = info.contains("balloon");
    const std::uint64_t max = has_mem ? uint_field(info, "memory_max", t.label) : memory;
    if (*size > max)
        throw UsageError("resize: --memory " + *o.memory + " is more than the VM's " +
                         (has_mem ? "--memory-max (" + mib(max) + ")"
                                  : "memory (" + mib(memory) + "; start it with --memory-max to grow it)"));
    if (*size > memory && *size % (2u << 20) != 0)
        throw UsageError("resize: --memory " + *o.memory + ": above the boot size it must be a multiple of 2M");
    if (*size < memory && !has_balloon)
        throw UsageError("resize: --memory " + *o.memory + " is below the boot size (" + mib(memory) +
                         ") and the VM has no balloon (start it with --balloon)");
    call(t, "PUT", "vm.resize", json{{"desired_ram", *size}});
    if (!o.wait) {
        if (o.json)
            print_json(json{{"memory", memory}, {"desired_ram", *size}});
        else
            std::printf("%s: resizing to %s (boot %s)\n", t.label.c_str(), mib(*size).c_str(), mib(memory).c_str());
        return 0;
    }
    const double timeout = o.timeout_s.value_or(60.0);
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout));
    std::string last;
    for (;;) {
        info = call(t, "GET", "vm.info");
        std::uint64_t plugged = 0, requested = 0, actual = 0, target = 0;
        if (has_mem && info.contains("virtio_mem")) {
            plugged = uint_field(info["virtio_mem"], "plugged_bytes", t.label + ": virtio_mem");
            requested = uint_field(info["virtio_mem"], "requested_bytes", t.label + ": virtio_mem");
        }
        if (has_balloon && info.contains("balloon")) {
            actual = uint_field(info["balloon"], "actual_bytes", t.label + ": balloon");
            target = uint_field(info["balloon"], "target_bytes", t.label + ": balloon");
        }
        const bool mem_done = plugged == requested;
        const bool balloon_done = (actual > target ? actual - target : target - actual) < 4096;
        const bool reached = mem_done && balloon_done;
        std::string line = t.label + ": guest " + mib(memory + plugged - std::min(actual, memory + plugged)) + " (boot " +
                           mib(memory) + (has_mem ? ", plugged " + mib(plugged) + " of " + mib(requested) : "") +
                           (has_balloon ? ", balloon " + mib(actual) + " of " + mib(target) : "") + ")";
        if (!o.json && (line != last || reached)) {
            std::printf("%s%s\n", line.c_str(), reached ? " (reached)" : "");
            std::fflush(stdout);
        }
        last = line;
        const auto now = Clock::now();
        if (reached || now >= deadline) {
            if (o.json) print_json(info);
            if (reached) return 0;
            std::fflush(stdout);
            std::fprintf(stderr, "kguest: %s: not there after %g s: %s\n", t.label.c_str(), timeout,
                         !mem_done ? (plugged == 0 && requested != 0
                                          ? "virtio-mem has nothing plugged (guest not responding, or no virtio_mem driver)"
                                          : "virtio-mem plugged size is not the requested size (guest not responding, or it "
                                            "cannot free memory to unplug)")
                                   : "the balloon has not reached its target (guest not responding)");
            return 1;
        }
        std::this_thread::sleep_for(std::min<Clock::duration>(std::chrono::milliseconds(200), deadline - now));
    }
}

int run_cli(int argc, char** argv) {
    if (argc < 2) throw UsageError("no command given (see kguest --help)");
    CliOptions o = parse_cli(argc, argv);
    if (o.help) {
        std::fputs(kCliUsage, stdout);
        return 0;
    }
    if (o.cmd == "list") return cmd_list(o);
    if (o.cmd == "balloon") return cmd_balloon(o);
    if (o.cmd == "resize") return cmd_resize(o);
    if (o.cmd == "info" || o.cmd == "stats") {
        Target t = target_of(o);
        json j = call(t, "GET", o.cmd == "info" ? "vm.info" : "vm.counters");
        if (o.json)
            print_json(j);
        else if (o.cmd == "info")
            print_object(j, {"name", "state", "cpus", "memory", "memory_max", "backing", "hugepage_backed_bytes",
                             "rss_bytes", "virtio_mem", "balloon", "disks"});
        else {   // the exits get a block of their own
            json exits = j.contains("exits") ? j["exits"] : json();
            j.erase("exits");
            print_object(j);
            print_exits(exits);
        }
        return 0;
    }
    struct Action {
        const char *cmd, *endpoint, *done;
    };
    static constexpr Action actions[] = {
        {"pause", "vm.pause", "paused"}, {"resume", "vm.resume", "resumed"}, {"stop", "vm.shutdown", "stopping"},
        {"power-button", "vm.power-button", "power button pressed"}};
    for (const Action& a : actions) {
        if (o.cmd != a.cmd) continue;
        Target t = target_of(o);
        json j = call(t, "PUT", a.endpoint);
        if (o.json) {
            if (!j.is_null()) print_json(j);
        } else {
            std::printf("%s: %s\n", t.label.c_str(), a.done);
        }
        return 0;
    }
    throw UsageError("unknown command '" + o.cmd + "' (see kguest --help)");
}

} // namespace

const char* cli_usage() { return kCliUsage; }

int cli_main(int argc, char** argv) {
    try {
        return run_cli(argc, argv);
    } catch (const std::exception& e) {
        std::fflush(stdout);
        std::fprintf(stderr, "kguest: %s\n", e.what());
        return dynamic_cast<const UsageError*>(&e) ? 2 : 1;
    }
}

} // namespace kguest
