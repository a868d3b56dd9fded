// libFuzzer target: the control API's request handling (vmm/app/api.*)
// without a socket. The input is the raw bytes a client sends; they go
// through Boost.Beast's request parser with the limits the server uses
// (ApiLimits' defaults), then api_dispatch() against a fake VmControl, and
// the reply is serialised as the server does (invalid UTF-8 replaced), as
// many requests as the bytes hold (keep-alive, pipelined). Nothing may
// crash, hit UB, throw out of api_dispatch() or answer a status outside the
// documented set. Single-threaded: libFuzzer calls LLVMFuzzerTestOneInput on
// one thread.
#include "vmm/app/api.hpp"

#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/http.hpp>

#include <cstdint>
#include <string>
#include <string_view>

using namespace kguest;
namespace http = boost::beast::http;

namespace {

// Answers like a running VM with a balloon; pause/resume alternate refusals.
struct FakeVm final : VmControl {
    bool paused = false;
    VmInfo info() override {
        VmInfo i;
        i.name = "fuzz";
        i.paused = paused;
        i.cpus = 2;
        i.memory = 256ull << 20;
        i.balloon = VmInfo::Balloon{1 << 20, 1 << 20};
        return i;
    }
    VmCounters counters() override {
        VmCounters c;
        c.nets.resize(1);
        c.balloon.emplace();
        c.exits.kvm_note = "fuzz";
        return c;
    }
    ControlError resize(std::uint64_t bytes) override {
        return bytes > (240ull << 20) ? ControlError::balloon_too_large : ControlError::none;
    }
    ControlError pause() override {
        if (paused) return ControlError::already_paused;
        paused = true;
        return ControlError::none;
    }
    ControlError resume() override {
        if (!paused) return ControlError::not_paused;
        paused = false;
        return ControlError::none;
    }
    ControlError shutdown() override { return ControlError::none; }
    ControlError power_button() override { return ControlError::none; }
};

bool documented(unsigned status) {
    switch (status) {
    case 200: case 204: case 400: case 404: case 405: case 409: case 500: return true;
    default: return false;
    }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const ApiLimits limits;
    FakeVm vm;
    std::string_view rest(reinterpret_cast<const char*>(data), size);
    for (int n = 0; n < 16 && !rest.empty(); ++n) {
        http::request_parser<http::string_body> parser;
        parser.body_limit(limits.body_limit);
        parser.header_limit(static_cast<std::uint32_t>(limits.header_limit));
        parser.eager(true);
        boost::beast::error_code ec;
        while (!parser.is_done() && !rest.empty()) {
            const std::size_t used = parser.put(boost::asio::buffer(rest.data(), rest.size()), ec);
            rest.remove_prefix(used);
            if (ec == http::error::need_more) ec = {};
            if (ec || used == 0) break;
        }
        if (!ec && !parser.is_done()) parser.put_eof(ec);   // the client closed its end
        if (ec || !parser.is_done()) return 0;   // the server answers 4xx or closes: no dispatch
        const auto& req = parser.get();
        const ApiReply reply = api_dispatch(vm, std::string_view(req.method_string().data(), req.method_string().size()),
                                            std::string_view(req.target().data(), req.target().size()), req.body());
        if (!documented(reply.status)) __builtin_trap();
        if (reply.status != 204)
            (void)reply.body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
        if (!req.keep_alive()) return 0;
    }
    return 0;
}
