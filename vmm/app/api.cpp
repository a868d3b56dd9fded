// The API server (see api.hpp): socket setup with plain syscalls, so every
// failure names its call and errno; then one thread running an Asio
// io_context with one Session per client. A Session reads one request at a
// time under a deadline (idle wait, request, response write), answers it
// through api_dispatch() and waits for the next one (keep-alive) or closes.
// A deadline is a steady_timer that cancels the socket; a generation counter
// makes a late timer harmless.
#include "vmm/app/api.hpp"
#include "vmm/app/api_client.hpp"
#include "vmm/app/ch_config.hpp"
#include "devices/base/error.hpp"
#include "devices/base/log.hpp"
#include "devices/base/thread_start.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <cerrno>
#include <pthread.h>
#include <cstring>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <thread>
#include <unistd.h>

namespace kguest {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using json = nlohmann::json;
using Socket = asio::local::stream_protocol::socket;

// Routing, independent of sockets.

namespace {

constexpr std::string_view kPrefix = "/api/v1/";
constexpr std::size_t kMaxRequestFds = 16;   // kMaxNetQueuePairs TAP queues

ApiReply error_reply(unsigned status, const std::string& message) {
    return ApiReply{status, json{{"error", message}}, {}, {}};
}

ApiReply control_reply(ControlError err) {
    if (err == ControlError::none) return ApiReply{204, nullptr, {}, {}};
    return error_reply(409, control_message(err));
}

json info_json(const VmInfo& i) {
    json j = {
        {"name", i.name},
        // Cloud Hypervisor's VmInfo.state names (libvirt and Kata compare them).
        {"state", !i.state.empty() ? i.state : i.paused ? "Paused" : "Running"},
        {"cpus", i.cpus},
        {"memory", i.memory},
        {"backing", backing_name(i.backing)},
        {"hugepage_backed_bytes", i.hugepage_backed_bytes},
        {"rss_bytes", i.rss_bytes},
        {"vmm_rss_bytes", i.vmm_rss_bytes},
    };
    if (i.balloon) j["balloon"] = {{"target_bytes", i.balloon->target_bytes}, {"actual_bytes", i.balloon->actual_bytes}};
    if (!i.disks.empty()) {
        json& d = j["disks"] = json::array();
        for (const VmInfo::Disk& k : i.disks)
            d.push_back({{"path", k.path}, {"size", k.size}, {"readonly", k.readonly}, {"queues", k.queues}});
    }
    // Cloud Hypervisor's memory_actual_size: what the guest has now, boot
    // RAM plus what virtio-mem plugged, less what the balloon holds.
    std::uint64_t actual = i.memory;
    if (i.virtio_mem) actual += i.virtio_mem->plugged_bytes;
    if (i.balloon) actual -= std::min(actual, i.balloon->actual_bytes);
    j["memory_actual_size"] = actual;
    if (!i.config.is_null()) j["config"] = i.config;
    if (i.virtio_mem) {
        const VmInfo::VirtioMem& m = *i.virtio_mem;
        j["memory_max"] = m.max_bytes;
        j["virtio_mem"] = {{"region_bytes", m.region_bytes},
                           {"plugged_bytes", m.plugged_bytes},
                           {"requested_bytes", m.requested_bytes},
                           {"hugepage_backed_bytes", m.hugepage_backed_bytes},
                           {"rss_bytes", m.rss_bytes}};
    }
    return j;
}

json counters_json(const VmCounters& c) {
    json j;
    j["port80"] = {{"writes", c.port80.writes}, {"reads", c.port80.reads}, {"last_code", c.port80.last_code}};
    for (std::size_t i = 0; i < c.nets.size(); ++i) {
        const NetCounters& n = c.nets[i];
        j["net" + std::to_string(i)] = {{"rx_packets", n.rx_packets}, {"rx_bytes", n.rx_bytes}, {"rx_dropped", n.rx_dropped},
                                        {"tx_packets", n.tx_packets}, {"tx_bytes", n.tx_bytes}, {"tx_dropped", n.tx_dropped}};
    }
    for (std::size_t i = 0; i < c.disks.size(); ++i) {
        const BlkCounters& d = c.disks[i];
        j["disk" + std::to_string(i)] = {{"read_requests", d.reads},       {"read_bytes", d.read_bytes},
                                         {"write_requests", d.writes},     {"write_bytes", d.write_bytes},
                                         {"flush_requests", d.flushes},    {"discard_requests", d.discards},
                                         {"discard_bytes", d.discard_bytes}, {"errors", d.errors}};
    }
    if (c.balloon) {
        const BalloonCounters& bc = c.balloon->counters;
        json b = {{"inflated_pages", bc.tracker.inflated_pages},
                  {"regions_released", bc.tracker.regions_released},
                  {"released_bytes", bc.tracker.bytes_released},
                  {"discarded_bytes", bc.tracker.bytes_discarded},
                  {"reported_bytes", bc.tracker.reported_bytes},
                  {"bad_pfns", bc.tracker.bad_pfns},
                  {"bad_chains", bc.bad_chains}};
        const BalloonStats& st = c.balloon->stats;
        if (st.valid) {
            // libvirt's virDomainMemoryStatTags names and units (KiB), as `virsh dommemstat`.
            json s;
            for (const auto& v : st.values) s[v.name] = v.libvirt_value;
            s["last_update"] = st.last_update_unix_s;
            b["stats"] = s;
        }
        j["balloon"] = b;
    }
    if (c.rng)
        j["rng"] = {{"bytes", c.rng->bytes}, {"requests", c.rng->requests}, {"throttled", c.rng->throttled},
                    {"bad_chains", c.rng->bad_chains}};
    json& e = j["exits"] = {{"userspace", json::array()}};
    for (const ExitCount& x : c.exits.userspace)
        e["userspace"].push_back({{"reason", x.reason}, {"count", x.count}, {"handling_ns", x.handling_ns}});
    if (c.exits.kvm) {
        e["kvm"] = json::object();
        for (const KvmStat& st : *c.exits.kvm) e["kvm"][st.name] = st.value;
    } else {
        e["kvm_note"] = c.exits.kvm_note;
    }
    return j;
}

ApiReply do_resize(VmControl& vm, std::string_view body) {
    json req = json::parse(body.begin(), body.end(), nullptr, false);
    if (req.is_discarded()) return error_reply(400, "malformed JSON body");
    if (!req.is_object())
        return error_reply(400, "body must be a JSON object: {\"desired_ram\": BYTES} or {\"desired_balloon\": BYTES}");
    for (const auto& item : req.items())
        if (item.key() != "desired_ram" && item.key() != "desired_balloon" && item.key() != "desired_vcpus")
            return error_reply(400, "unknown field '" + item.key() + "'");
    // Fields sent as null are ignored: Cloud Hypervisor's ch-remote sends them so.
    auto given = [&](const char* k) { return req.contains(k) && !req[k].is_null(); };
    const VmInfo info = vm.info();
    if (info.state == "NotCreated" || info.state == "Created" || info.state == "Shutdown")
        return control_reply(ControlError::not_running);
    if (given("desired_vcpus")) {
        const json& v = req["desired_vcpus"];
        if (!v.is_number_unsigned() || v.get<std::uint64_t>() != info.cpus)
            return error_reply(400, "desired_vcpus must equal the VM's " + std::to_string(info.cpus) +
                                        " vCPUs (kguest does not hot-plug vCPUs)");
    }
    bool has_ram = given("desired_ram"), has_balloon = given("desired_balloon");
    if (has_ram && has_balloon) return error_reply(400, "need exactly one of desired_ram or desired_balloon");
    if (!has_ram && !has_balloon) {
        if (given("desired_vcpus")) return control_reply(ControlError::none);
        return error_reply(400, "need exactly one of desired_ram or desired_balloon");
    }
    const char* key = has_ram ? "desired_ram" : "desired_balloon";
    const json& v = req[key];
    if (!v.is_number_unsigned()) return error_reply(400, std::string(key) + " must be a non-negative integer (bytes)");
    std::uint64_t n = v.get<std::uint64_t>();

    // virtio-balloon's num_pages is a le32 count of 4 KiB pages (VIRTIO 1.2 5.5.6).
    auto balloon_reply = [&](std::uint64_t balloon) {
        constexpr std::uint64_t kMaxBalloon = std::uint64_t{UINT32_MAX} << 12;
        if ((balloon >> 12) > UINT32_MAX)
            return error_reply(400, std::string(key) + " " + std::to_string(n) + " asks for a balloon of " +
                                        std::to_string(balloon) + " bytes; virtio-balloon counts 4 KiB pages in 32 bits (at most " +
                                        std::to_string(kMaxBalloon) + " bytes)");
        return control_reply(vm.resize(balloon));
    };
    const std::uint64_t memory = info.memory;
    std::uint64_t floor = std::min(kMinGuestRam, memory);
    if (!has_ram) {
        if (n > memory - floor)
            return error_reply(400, "desired_balloon " + std::to_string(n) + " would leave the guest less than " +
                                        std::to_string(floor) + " bytes");
        return balloon_reply(n);
    }
    // desired_ram: the guest's total memory (Cloud Hypervisor's meaning).
    const std::uint64_t max = info.virtio_mem ? info.virtio_mem->max_bytes : memory;
    if (n > max)
        return error_reply(400, "desired_ram " + std::to_string(n) + " exceeds the VM's " +
                                    (info.virtio_mem ? "--memory-max (" : "memory (no --memory-max: ") +
                                    std::to_string(max) + " bytes)");
    if (n < floor)
        return error_reply(400, "desired_ram " + std::to_string(n) + " is below the floor of " +
                                    std::to_string(floor) + " bytes");
    if (n > memory) {
        // Above the boot size: virtio-mem plugs the difference, the balloon gives all back.
        constexpr std::uint64_t kBlock = 2ull << 20;   // virtio-mem's block size
        if (n % kBlock != 0)
            return error_reply(400, "desired_ram " + std::to_string(n) + " above the boot size must be a multiple of 2 MiB");
        if (ControlError e = vm.resize_hotplug(n - memory); e != ControlError::none) return control_reply(e);
        return control_reply(info.balloon ? vm.resize(0) : ControlError::none);
    }
    // At or below the boot size: unplug everything, then the balloon takes the rest.
    if (n < memory && !info.balloon)
        return error_reply(400, "desired_ram " + std::to_string(n) + " is below the boot size (" +
                                    std::to_string(memory) + " bytes) and the VM has no balloon (--balloon)");
    if (info.virtio_mem)
        if (ControlError e = vm.resize_hotplug(0); e != ControlError::none) return control_reply(e);
    if (!info.balloon && info.virtio_mem) return control_reply(ControlError::none);
    return balloon_reply(memory - n);
}

} // namespace

const char* control_message(ControlError e) {
    switch (e) {
    case ControlError::none: return "";
    case ControlError::already_paused: return "already paused";
    case ControlError::not_paused: return "not paused";
    case ControlError::pause_failed: return "the vCPUs did not stop (is the VM stopping?)";
    case ControlError::no_balloon: return "this VM has no balloon (start it with --balloon)";
    case ControlError::balloon_too_large: return "desired_balloon is larger than guest RAM";
    case ControlError::no_virtio_mem: return "this VM has no virtio-mem device (start it with --memory-max)";
    case ControlError::hotplug_too_large: return "requested size is not a multiple of 2 MiB or exceeds the virtio-mem region";
    case ControlError::not_running: return "the VM is not running (vm.boot it first)";
    }
    return "refused";
}

Refusal VmControl::add_net(NetConfig, std::vector<Fd>) { return fixed_vm(); }

namespace {

ApiReply refusal_reply(const Refusal& r) {
    if (!r) return ApiReply{204, nullptr, {}, {}};
    return error_reply(r.status, r.message);
}

// A JSON object body, or the 400 that says why not.
std::optional<json> object_body(std::string_view body, ApiReply& err) {
    json j = json::parse(body.begin(), body.end(), nullptr, false);
    if (j.is_discarded()) {
        err = error_reply(400, "malformed JSON body");
        return std::nullopt;
    }
    if (!j.is_object()) {
        err = error_reply(400, "body must be a JSON object");
        return std::nullopt;
    }
    return j;
}

ApiReply do_lifecycle(VmControl& vm, std::string_view name, std::string_view body, std::vector<Fd>& fds) {
    ApiReply err;
    try {
        if (name == "vm.create") {
            auto j = object_body(body, err);
            if (!j) return err;
            return refusal_reply(vm.create(vm_config_from_ch(*j)));
        }
        if (name == "vm.add-net") {
            auto j = object_body(body, err);
            if (!j) return err;
            NetConfig n = net_from_ch(*j, kMacLater, "vm.add-net");
            // With fds the TAP queues come from the client, one per queue pair.
            if (!fds.empty() && fds.size() != n.queue_pairs)
                return error_reply(400, "vm.add-net: " + std::to_string(fds.size()) + " fds for " +
                                            std::to_string(n.queue_pairs) + " queue pairs (num_queues / 2)");
            if (fds.empty() && n.target.empty())
                return error_reply(400, "vm.add-net.tap: missing (name a TAP interface or pass its fds)");
            return refusal_reply(vm.add_net(std::move(n), std::move(fds)));
        }
        if (name == "vm.add-disk") {
            auto j = object_body(body, err);
            if (!j) return err;
            return refusal_reply(vm.add_disk(disk_from_ch(*j, "vm.add-disk")));
        }
    } catch (const ChConfigError& e) {
        return error_reply(400, e.what());
    }
    if (name == "vm.boot") return refusal_reply(vm.boot());
    if (name == "vm.reboot") return refusal_reply(vm.reboot());
    if (name == "vm.delete") return refusal_reply(vm.remove());
    // vmm.shutdown: answered first, then the VMM ends.
    if (Refusal r = vm.can_shutdown_vmm()) return refusal_reply(r);
    ApiReply reply{204, nullptr, {}, {}};
    reply.after_write = [&vm] { vm.shutdown_vmm(); };
    return reply;
}

} // namespace

ApiReply api_dispatch(VmControl& vm, std::string_view method, std::string_view target, std::string_view body,
                      std::vector<Fd> fds) {
    struct Route {
        std::string_view name, method;
    };
    static constexpr Route routes[] = {
        {"vmm.ping", "GET"},      {"vm.info", "GET"},         {"vm.counters", "GET"},   {"vm.resize", "PUT"},
        {"vm.pause", "PUT"},      {"vm.resume", "PUT"},       {"vm.shutdown", "PUT"},   {"vm.create", "PUT"},
        {"vm.add-net", "PUT"},    {"vm.add-disk", "PUT"},     {"vm.boot", "PUT"},       {"vm.reboot", "PUT"},
        {"vm.delete", "PUT"},     {"vm.power-button", "PUT"}, {"vmm.shutdown", "PUT"},
    };
    std::string_view path = target.substr(0, target.find('?'));
    const Route* route = nullptr;
    if (path.substr(0, kPrefix.size()) == kPrefix)
        for (const Route& r : routes)
            if (path.substr(kPrefix.size()) == r.name) route = &r;
    if (route == nullptr) return error_reply(404, "no such endpoint: " + std::string(path));
    if (method != route->method) {
        ApiReply r = error_reply(405, std::string(route->name) + " takes " + std::string(route->method));
        r.allow = route->method;
        return r;
    }
    try {
        const std::string_view name = route->name;
        if (name == "vmm.ping") return ApiReply{200, json{{"version", KGUEST_VERSION}, {"pid", ::getpid()}}, {}, {}};
        if (name == "vm.info") {
            const VmInfo i = vm.info();
            if (i.state == "NotCreated") return error_reply(409, "vm.info: no VM (vm.create first)");
            return ApiReply{200, info_json(i), {}, {}};
        }
        if (name == "vm.counters") return ApiReply{200, counters_json(vm.counters()), {}, {}};
        if (name == "vm.resize") return do_resize(vm, body);
        if (name == "vm.pause") return control_reply(vm.pause());
        if (name == "vm.resume") return control_reply(vm.resume());
        if (name == "vm.shutdown") return control_reply(vm.shutdown());
        if (name == "vm.power-button") return control_reply(vm.power_button());
        return do_lifecycle(vm, name, body, fds);
    } catch (const std::exception& e) {
        return error_reply(500, std::string(route->name) + ": " + e.what());
    }
}

// The server.

struct ApiServer::Impl {
    Impl(const std::string& p, VmControl& v, ApiLimits l) : path(p), vm(v), limits(l) {}

    std::string path;
    VmControl& vm;
    ApiLimits limits;
    std::size_t sessions = 0;  // live Sessions; API thread only
    dev_t dev = 0;             // identity of the socket file we bound,
    ino_t ino = 0;             // so the destructor never unlinks another's
    // Sessions refer to the members above, so the io_context (whose
    // destruction frees the last Sessions) comes after them.
    asio::io_context io{1};
    asio::local::stream_protocol::acceptor acceptor{io};
    asio::steady_timer retry{io};  // backs off accept() after EMFILE and friends
    std::thread thread;

    void accept();
    void start();   // accepting, on the API thread
};

namespace {

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n"; }

class Session : public std::enable_shared_from_this<Session> {
public:
    Session(Socket s, ApiServer::Impl& srv) : socket_(std::move(s)), timer_(srv.io), srv_(srv) { ++srv_.sessions; }
    ~Session() { --srv_.sessions; }

    void start() { wait_request(); }

private:
    // Waits for the first byte of the next request (keep-alive idle time).
    void wait_request() {
        if (buffer_.size() > 0) return read_request();  // pipelined
        arm(srv_.limits.idle_timeout);
        socket_.async_wait(Socket::wait_read, [self = shared_from_this()](beast::error_code ec) {
            self->disarm();
            if (ec || !self->receive_first_bytes()) return self->close();
            self->read_request();
        });
    }

    // A request's first bytes, read with recvmsg for the file descriptors a
    // client may send with them (SCM_RIGHTS: vm.add-net's TAP fds, which
    // libvirt and Kata attach to the sendmsg that carries the request). Beast
    // parses them from buffer_ and reads the rest; fds on later segments are
    // closed by the kernel, as recv without a control buffer drops them.
    // False when the client is gone.
    bool receive_first_bytes() {
        fds_.clear();
        const std::size_t room = std::min<std::size_t>(buffer_.max_size() - buffer_.size(), 4096);
        if (room == 0) return true;
        auto space = buffer_.prepare(room);
        iovec iov{space.data(), space.size()};
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxRequestFds)];
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        const ssize_t n = ::recvmsg(socket_.native_handle(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) return errno == EAGAIN || errno == EINTR;   // Beast's read waits again
        if (n == 0) return false;
        buffer_.commit(static_cast<std::size_t>(n));
        for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (std::size_t i = 0; i < count; ++i) {
                int fd;
                std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                fds_.emplace_back(fd);
            }
        }
        // MSG_CTRUNC: the kernel closed the fds that did not fit; the
        // request then gets its fds short and a 400 from vm.add-net.
        return true;
    }

    void read_request() {
        parser_.emplace();
        parser_->body_limit(srv_.limits.body_limit);
        parser_->header_limit(static_cast<std::uint32_t>(srv_.limits.header_limit));
        arm(srv_.limits.request_timeout);
        http::async_read_header(socket_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, std::size_t) {
            if (ec) return self->on_read(ec);
            self->continue_body();
        });
    }

    // `Expect: 100-continue` (RFC 9110 10.1.1): libcurl sends it with an
    // upload of unknown size, as libvirt's ch driver makes for every
    // body-less PUT (CURLOPT_UPLOAD, ch_monitor.c), and then waits a second
    // for the interim answer before sending the (empty, chunked) body.
    void continue_body() {
        auto read_body = [self = shared_from_this()] {
            http::async_read(self->socket_, self->buffer_, *self->parser_,
                             [self](beast::error_code ec, std::size_t) { self->on_read(ec); });
        };
        if (parser_->is_done() || !beast::iequals(parser_->get()[http::field::expect], "100-continue"))
            return read_body();
        static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
        asio::async_write(socket_, asio::buffer(kContinue.data(), kContinue.size()),
                          [self = shared_from_this(), read_body](beast::error_code ec, std::size_t) {
                              if (ec) return self->on_read(ec);
                              read_body();
                          });
    }

    void on_read(beast::error_code ec) {
        bool timed_out = timed_out_;
        disarm();
        if (ec) {
            // An error answer, then the connection closes.
            auto refuse = [this](unsigned status, const std::string& why) { send(error_reply(status, why), false, 11); };
            if (timed_out) {
                if (parser_->got_some() || buffer_.size() > 0)
                    return refuse(408, "request not complete within " +
                                           std::to_string(srv_.limits.request_timeout.count()) + " ms");
                return close();
            }
            if (ec == http::error::end_of_stream || ec == http::error::partial_message) return close();
            if (ec == http::error::body_limit)
                return refuse(413, "body over " + std::to_string(srv_.limits.body_limit) + " bytes");
            if (ec == http::error::header_limit)
                return refuse(431, "header over " + std::to_string(srv_.limits.header_limit) + " bytes");
            if (ec.category() == http::make_error_code(http::error::bad_method).category())
                return refuse(400, "malformed HTTP request: " + ec.message());
            return close();  // an I/O error: the client is gone
        }
        const auto& req = parser_->get();
        auto method = req.method_string();
        auto target = req.target();
        const std::string& body = req.body();
        ApiReply reply = api_dispatch(srv_.vm, std::string_view(method.data(), method.size()),
                                      std::string_view(target.data(), target.size()), body, std::move(fds_));
        fds_.clear();
        send(std::move(reply), req.keep_alive(), req.version());
    }

    void send(ApiReply reply, bool keep_alive, unsigned version) {
        res_ = {};
        res_.version(version == 10 ? 10 : 11);
        res_.result(reply.status);
        res_.set(http::field::server, "kguest/" KGUEST_VERSION);
        if (!reply.allow.empty()) res_.set(http::field::allow, reply.allow);
        if (reply.status != 204) {
            res_.set(http::field::content_type, "application/json");
            res_.body() = dump(reply.body);
            res_.prepare_payload();
        }
        res_.keep_alive(keep_alive);
        arm(srv_.limits.write_timeout);
        after_write_ = std::move(reply.after_write);
        http::async_write(socket_, res_, [self = shared_from_this(), keep_alive](beast::error_code ec, std::size_t) {
            self->disarm();
            if (auto after = std::exchange(self->after_write_, nullptr)) after();
            if (ec || !keep_alive) return self->close();
            self->wait_request();
        });
    }

    void close() {
        disarm();
        beast::error_code ignored;
        socket_.shutdown(Socket::shutdown_both, ignored);
        socket_.close(ignored);
    }

    // One deadline at a time: the timer cancels whatever the socket is doing.
    void arm(std::chrono::milliseconds after) {
        timed_out_ = false;
        timer_.expires_after(after);
        timer_.async_wait([self = shared_from_this(), gen = ++gen_](beast::error_code ec) {
            if (ec || gen != self->gen_) return;
            self->timed_out_ = true;
            beast::error_code ignored;
            self->socket_.cancel(ignored);
        });
    }
    void disarm() {
        ++gen_;
        timed_out_ = false;
        timer_.cancel();
    }

    Socket socket_;
    asio::steady_timer timer_;
    ApiServer::Impl& srv_;
    beast::flat_buffer buffer_{8192};
    std::optional<http::request_parser<http::string_body>> parser_;
    http::response<http::string_body> res_;
    std::vector<Fd> fds_;                  // received with the request being read
    std::function<void()> after_write_;    // the answer's ApiReply::after_write
    std::uint64_t gen_ = 0;
    bool timed_out_ = false;
};

// Answers a client over the connection limit: one non-blocking send, then close.
void refuse_busy(Socket& s) {
    static const std::string response = [] {
        std::string body = dump(json{{"error", "too many API connections"}});
        return "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: " +
               std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
    }();
    (void)::send(s.native_handle(), response.data(), response.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    beast::error_code ignored;
    s.close(ignored);
}

// mkdir -p with mode 0700; refuses a directory that belongs to someone else
// or that others may write (who could pre-create /tmp/kguest-$UID, or use a
// shared directory, and watch or replace our socket): check_socket_dir.
void make_socket_dir(const std::string& dir) {
    if (dir.empty()) return;
    for (std::size_t pos = 1; pos <= dir.size(); ++pos) {
        if (pos != dir.size() && dir[pos] != '/') continue;
        std::string prefix = dir.substr(0, pos);
        if (::mkdir(prefix.c_str(), 0700) != 0 && errno != EEXIST) throw_errno("mkdir " + prefix);
    }
    check_socket_dir(dir);
}

sockaddr_un socket_address(const std::string& path) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.empty() || path.size() >= sizeof addr.sun_path)
        throw SysError("api socket path '" + path + "'", ENAMETOOLONG);
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    return addr;
}

// Removes `path` if it is a socket nobody listens on; throws if served or not a socket.
void remove_stale_socket(const std::string& path, const sockaddr_un& addr) {
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) {
        if (errno == ENOENT) return;
        throw_errno("lstat " + path);
    }
    if (!S_ISSOCK(st.st_mode))
        throw std::runtime_error("api socket path " + path + " exists and is not a socket; not replacing it");
    int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (probe < 0) throw_errno("socket(AF_UNIX)");
    int rc = ::connect(probe, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
    int err = errno;
    ::close(probe);
    // EAGAIN: a listener whose backlog is full is still a live server.
    if (rc == 0 || err == EAGAIN || err == EINPROGRESS)
        throw std::runtime_error("api socket " + path +
                                 " is served by another process (a VM with this name is running?)");
    if (err != ECONNREFUSED) throw SysError("connect " + path, err);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) throw_errno("unlink stale socket " + path);
}

} // namespace

void ApiServer::Impl::accept() {
    acceptor.async_accept([this](beast::error_code ec, Socket s) {
        if (ec == asio::error::operation_aborted || !acceptor.is_open()) return;
        if (ec) {
            static RateLimit limit;
            KGUEST_LOG_LIMITED(limit, "api: accept on %s: %s", path.c_str(), ec.message().c_str());
            retry.expires_after(std::chrono::milliseconds(100));
            retry.async_wait([this](beast::error_code e) {
                if (!e) accept();
            });
            return;
        }
        if (sessions >= limits.max_connections)
            refuse_busy(s);
        else
            std::make_shared<Session>(std::move(s), *this)->start();
        accept();
    });
}

ApiServer::ApiServer(const std::string& socket_path, VmControl& vm, ApiLimits limits)
    : impl_(std::make_unique<Impl>(socket_path, vm, limits)) {
    sockaddr_un addr = socket_address(socket_path);
    if (auto slash = socket_path.rfind('/'); slash != std::string::npos && slash != 0)
        make_socket_dir(socket_path.substr(0, slash));
    remove_stale_socket(socket_path, addr);

    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) throw_errno("socket(AF_UNIX)");
    // Closes the socket, removes its file once bound, and throws.
    auto fail = [&](const std::string& call, int err, bool bound) {
        ::close(fd);
        if (bound) ::unlink(socket_path.c_str());
        throw SysError(call, err);
    };
    if (::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) fail("bind " + socket_path, errno, false);
    // Nobody can connect before listen(), so the chmod leaves no window.
    struct stat st {};
    if (::chmod(socket_path.c_str(), 0600) != 0 || ::stat(socket_path.c_str(), &st) != 0)
        fail("chmod " + socket_path, errno, true);
    impl_->dev = st.st_dev;
    impl_->ino = st.st_ino;
    if (::listen(fd, 64) != 0) fail("listen " + socket_path, errno, true);
    beast::error_code ec;
    impl_->acceptor.assign(asio::local::stream_protocol(), fd, ec);
    if (ec) fail("api acceptor " + socket_path, ec.value(), true);
    impl_->start();
}

ApiServer::ApiServer(Fd listening, VmControl& vm, ApiLimits limits)
    : impl_(std::make_unique<Impl>("fd " + std::to_string(listening.get()), vm, limits)) {
    int accepting = 0, type = 0, family = 0;
    socklen_t len = sizeof accepting;
    if (::getsockopt(listening.get(), SOL_SOCKET, SO_ACCEPTCONN, &accepting, &len) != 0)
        throw SysError("getsockopt SO_ACCEPTCONN on api socket " + impl_->path, errno);
    len = sizeof type;
    if (::getsockopt(listening.get(), SOL_SOCKET, SO_TYPE, &type, &len) != 0) throw_errno("getsockopt SO_TYPE");
    len = sizeof family;
    if (::getsockopt(listening.get(), SOL_SOCKET, SO_DOMAIN, &family, &len) != 0) throw_errno("getsockopt SO_DOMAIN");
    if (!accepting || type != SOCK_STREAM || family != AF_UNIX)
        throw UsageError("--api-socket " + impl_->path + ": not a listening UNIX stream socket");
    const int fl = ::fcntl(listening.get(), F_GETFL);
    if (fl < 0 || ::fcntl(listening.get(), F_SETFL, fl | O_NONBLOCK) != 0) throw_errno("fcntl O_NONBLOCK (api socket)");
    if (::fcntl(listening.get(), F_SETFD, FD_CLOEXEC) != 0) throw_errno("fcntl FD_CLOEXEC (api socket)");
    beast::error_code ec;
    impl_->acceptor.assign(asio::local::stream_protocol(), listening.get(), ec);
    if (ec) throw SysError("api acceptor " + impl_->path, ec.value());
    (void)listening.release();   // the acceptor owns it now
    impl_->start();
}

void ApiServer::Impl::start() {
    accept();
    thread = std::thread([this] {
        ::pthread_setname_np(::pthread_self(), "api");   // before confinement: glibc uses prctl for itself
        thread_started(ThreadKind::api);
        for (;;) {
            try {
                io.run();
                return;
            } catch (const std::exception& e) {
                log_msg("api: %s", e.what());
            }
        }
    });
}

ApiServer::~ApiServer() {
    impl_->io.stop();
    if (impl_->thread.joinable()) impl_->thread.join();
    beast::error_code ignored;
    impl_->acceptor.close(ignored);
    struct stat st {};
    if (impl_->ino != 0 && ::lstat(impl_->path.c_str(), &st) == 0 && st.st_dev == impl_->dev && st.st_ino == impl_->ino)
        ::unlink(impl_->path.c_str());
    // impl_'s destruction closes the remaining client connections.
}

} // namespace kguest
