// The client side of the VM control API (see api.hpp): ApiClient makes one
// HTTP request per connection on a VM's UNIX socket, under a deadline, and
// cli_main() implements the control subcommands of the kguest binary (list,
// info, stats, balloon, resize, pause, resume, stop; see cli_usage()). Exit status: 0
// done, 1 the VM could not be reached, refused, or (balloon or resize --wait) did not
// get there in time, 2 bad usage. Beast stays inside api_client.cpp.
#pragma once

#include "devices/base/error.hpp"

#include <chrono>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace kguest {

struct ApiResponse {
    unsigned status = 0;
    nlohmann::json body;  // null when the response had no body (204)
    bool ok() const { return status >= 200 && status < 300; }
    // body["error"] when there is one, else "HTTP <status>".
    std::string error() const;
};

class ApiClient {
public:
    explicit ApiClient(std::string socket_path, std::chrono::milliseconds timeout = std::chrono::seconds(5));

    // `endpoint` is "vm.info" (put under /api/v1/) or a full "/api/v1/..." path.
    // Throws SysError naming the call and the socket when the VM cannot be
    // reached or does not answer in time (ETIMEDOUT); any HTTP status is returned.
    ApiResponse request(std::string_view method, std::string_view endpoint,
                        const nlohmann::json& body = nullptr) const;
    ApiResponse get(std::string_view endpoint) const { return request("GET", endpoint); }

private:
    std::string path_;
    std::chrono::milliseconds timeout_;
};

// Where VMs put their sockets: $XDG_RUNTIME_DIR/kguest, /run/kguest for root, or /tmp/kguest-$UID.
std::string default_socket_dir();
// default_socket_dir() + "/NAME.sock"; throws UsageError for a name with '/'
// or a directory that check_socket_dir refuses.
std::string socket_for(const std::string& name);
// Throws UsageError unless `dir` (which must exist) is a directory owned by
// us or root that nobody else can write to, or that has the sticky bit (as
// /tmp): otherwise another user could replace a VM's socket with their own.
void check_socket_dir(const std::string& dir);

// Splits "--flag=value" and "--flag value" uniformly for the subcommands'
// parsers; `prefix` ("balloon: ") starts each of its messages.
class Args {
public:
    Args(int argc, char** argv, int first, std::string prefix = "")
        : v_(argv + first, argv + argc), prefix_(std::move(prefix)) {}
    bool done() const { return i_ >= v_.size(); }
    std::string flag() {
        pending_.reset();
        std::string a = v_[i_++];
        if (auto eq = a.find('='); a.rfind("--", 0) == 0 && eq != std::string::npos) {
            pending_ = a.substr(eq + 1);
            return a.substr(0, eq);
        }
        return a;
    }
    std::string value(const std::string& flag) {
        if (pending_) return *std::exchange(pending_, std::nullopt);
        if (done()) throw UsageError(prefix_ + flag + " needs a value");
        return v_[i_++];
    }
    // The `=VALUE` of `--flag=VALUE`, for flags whose value is optional.
    std::optional<std::string> optional_value() { return std::exchange(pending_, std::nullopt); }
    // The next argument, unless there is none or it is a flag ("--..."):
    // for flags whose value may also follow after a space (`--rng src=PATH`).
    std::optional<std::string> optional_next_value() {
        if (pending_) return std::exchange(pending_, std::nullopt);
        if (done() || v_[i_].rfind("--", 0) == 0) return std::nullopt;
        return v_[i_++];
    }
    void no_value(const std::string& flag) {
        if (pending_) throw UsageError(prefix_ + flag + " takes no value");
    }

private:
    std::vector<std::string> v_;
    std::string prefix_;
    std::size_t i_ = 0;
    std::optional<std::string> pending_;
};

// The usage lines of these subcommands, for `kguest --help`.
const char* cli_usage();

// argv[1] is the subcommand. Prints errors itself as one line; returns the exit status.
int cli_main(int argc, char** argv);

} // namespace kguest
