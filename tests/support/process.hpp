// Running build/kguest (or QEMU) as a child process from a test: captured
// stdout/stderr, exit status, wall and CPU time, a hard timeout, and an
// optional signal sent after a delay. Header-only; tests only.
#pragma once

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <sys/resource.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace kguest::test {

struct ProcResult {
    int status = -1;       // exit status, or 128 + signal
    bool timed_out = false;
    std::string out, err;
    double wall_s = 0, cpu_s = 0;
};

inline std::string slurp(const std::string& path) {
    std::ifstream f(path);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// Forks `argv` with stdin from /dev/null and stdout/stderr into the two fds.
// With KGUEST_TEST_SECCOMP=MODE set, every `kguest run` and bare
// `kguest --api-socket ...` gets `--seccomp MODE`
// (scripts/seccomp-audit runs the kvm suite with `log`).
inline pid_t spawn(std::vector<std::string> argv, int out_fd, int err_fd) {
    const char* seccomp = std::getenv("KGUEST_TEST_SECCOMP");
    if (seccomp != nullptr && *seccomp != '\0' && argv.size() > 1 && argv[1] == "run" &&
        argv[0].ends_with("/kguest"))
        argv.insert(argv.begin() + 2, {"--seccomp", seccomp});
    else if (seccomp != nullptr && *seccomp != '\0' && argv.size() > 1 && argv[1].starts_with("--api-socket") &&
             argv[0].ends_with("/kguest"))   // a bare VMM
        argv.insert(argv.end(), {"--seccomp", seccomp});
    pid_t pid = fork();
    if (pid == 0) {
        int null = open("/dev/null", O_RDONLY);
        dup2(null, 0);
        dup2(out_fd, 1);
        dup2(err_fd, 2);
        std::vector<char*> args;
        for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        execvp(args[0], args.data());
        std::perror("execvp");
        _exit(127);
    }
    return pid;
}

// A forked child's wait status and what it wrote on stderr.
struct Child {
    int wstatus = 0;
    std::string err;
};

// Runs `body` in a forked child with stderr into a pipe; the child exits 0
// when body returns.
inline Child in_child(const std::function<void()>& body) {
    int p[2];
    if (::pipe(p) != 0) return {};
    std::fflush(nullptr);
    pid_t pid = ::fork();
    if (pid == 0) {
        ::dup2(p[1], STDERR_FILENO);
        ::close(p[0]);
        body();
        ::_exit(0);
    }
    ::close(p[1]);
    Child c;
    char buf[512];
    ssize_t n;
    while ((n = ::read(p[0], buf, sizeof buf)) > 0) c.err.append(buf, static_cast<std::size_t>(n));
    ::close(p[0]);
    ::waitpid(pid, &c.wstatus, 0);
    return c;
}

// Each thread of process `pid`: name, state, user/system ticks, last CPU
// and where it sleeps (for a stalled VM's failure message).
inline std::string threads_of(pid_t pid) {
    std::string out;
    std::error_code ec;   // the process may be gone: then no lines
    for (const auto& t : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task", ec)) {
        std::string stat = slurp(t.path().string() + "/stat"), wchan = slurp(t.path().string() + "/wchan");
        out += "  " + stat.substr(0, 160) + " wchan=" + wchan + "\n";
    }
    return out;
}

// Runs argv to its end or for at most timeout_s. On timeout the child's
// threads are described in err (where each one sleeps: a hung VM's only
// evidence), then it gets SIGTERM, which makes kguest stop and print its
// summary, and SIGKILL 5 s later if it is still there.
inline ProcResult run_process(const std::vector<std::string>& argv, int timeout_s, int signal = 0,
                              int signal_after_ms = 0) {
    char out_path[] = "/tmp/kguest-test-out.XXXXXX";
    char err_path[] = "/tmp/kguest-test-err.XXXXXX";
    int out_fd = mkstemp(out_path), err_fd = mkstemp(err_path);
    ProcResult r;
    if (out_fd < 0 || err_fd < 0) return r;
    auto t0 = std::chrono::steady_clock::now();
    pid_t pid = spawn(argv, out_fd, err_fd);
    bool signalled = false;
    std::string hung;
    int wstatus = 0;
    rusage ru{};
    for (;;) {
        pid_t w = wait4(pid, &wstatus, WNOHANG, &ru);
        if (w == pid) break;
        auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
        if (signal && !signalled && ms >= signal_after_ms) {
            kill(pid, signal);
            signalled = true;
        }
        if (ms > timeout_s * 1000LL && !r.timed_out) {
            r.timed_out = true;
            hung = "timed out after " + std::to_string(timeout_s) + " s; its threads:\n" + threads_of(pid);
            kill(pid, SIGTERM);
        }
        if (r.timed_out && ms > (timeout_s + 5) * 1000LL) kill(pid, SIGKILL);
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    r.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.cpu_s = ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    r.status = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : 128 + WTERMSIG(wstatus);
    close(out_fd);
    close(err_fd);
    r.out = slurp(out_path);
    r.err = slurp(err_path) + hung;
    unlink(out_path);
    unlink(err_path);
    return r;
}

// A child process running while the test talks to it (a VM serving the
// network, passt): output into temp files, killed if still running when
// the object goes.
class Background {
public:
    explicit Background(const std::vector<std::string>& argv) {
        char out_path[] = "/tmp/kguest-bg-out.XXXXXX";
        char err_path[] = "/tmp/kguest-bg-err.XXXXXX";
        int out_fd = mkstemp(out_path), err_fd = mkstemp(err_path);
        out_path_ = out_path;
        err_path_ = err_path;
        t0_ = std::chrono::steady_clock::now();
        pid_ = spawn(argv, out_fd, err_fd);
        close(out_fd);
        close(err_fd);
    }
    Background(const Background&) = delete;
    Background& operator=(const Background&) = delete;
    ~Background() {
        if (pid_ > 0 && !done_) {
            kill(pid_, SIGKILL);
            waitpid(pid_, nullptr, 0);
        }
        unlink(out_path_.c_str());
        unlink(err_path_.c_str());
    }
    std::string out() const { return slurp(out_path_); }
    std::string err() const { return slurp(err_path_); }
    bool running() {
        if (done_) return false;
        int ws = 0;
        if (waitpid(pid_, &ws, WNOHANG) == pid_) finish(ws);
        return !done_;
    }
    // Waits until stdout contains `text`; false on timeout or exit.
    bool wait_for_output(const std::string& text, int timeout_s) {
        auto end = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
        while (std::chrono::steady_clock::now() < end) {
            if (out().find(text) != std::string::npos) return true;
            if (!running()) return out().find(text) != std::string::npos;
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        return false;
    }
    // Waits for the exit (SIGKILL after the timeout) and returns the result.
    ProcResult wait(int timeout_s) {
        auto end = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
        while (running() && std::chrono::steady_clock::now() < end) std::this_thread::sleep_for(std::chrono::milliseconds(10));
        if (running()) {
            r_.timed_out = true;
            kill(pid_, SIGKILL);
            int ws = 0;
            waitpid(pid_, &ws, 0);
            finish(ws);
        }
        r_.out = out();
        r_.err = err();
        return r_;
    }
    pid_t pid() const { return pid_; }

private:
    void finish(int ws) {
        done_ = true;
        r_.status = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
        r_.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    }
    pid_t pid_ = -1;
    bool done_ = false;
    ProcResult r_;
    std::string out_path_, err_path_;
    std::chrono::steady_clock::time_point t0_;
};

// Parses the guest's `RESULT name k=v k=v ...` lines; the lines for `name`,
// each as a key → value map.
inline std::vector<std::map<std::string, std::string>> results(const std::string& text, const std::string& name) {
    std::vector<std::map<std::string, std::string>> rows;
    std::istringstream in(text);
    std::string line;
    while (std::getline(in, line)) {
        if (!line.empty() && line.back() == '\r') line.pop_back();
        std::istringstream words(line);
        std::string tag, n;
        if (!(words >> tag >> n) || tag != "RESULT" || n != name) continue;
        std::map<std::string, std::string> kv;
        std::string w;
        while (words >> w)
            if (auto eq = w.find('='); eq != std::string::npos) kv[w.substr(0, eq)] = w.substr(eq + 1);
        rows.push_back(kv);
    }
    return rows;
}

inline const std::string kKguest = KGUEST_BINARY_DIR "/kguest";
inline const std::string kGuestElf = KGUEST_BINARY_DIR "/guest/guest.elf";

// argv of `kguest run` booting the small guest with `cmdline`, plus `extra` flags.
inline std::vector<std::string> kguest_run(const std::string& cmdline, unsigned cpus,
                                           std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {kKguest, "run", "--kernel", kGuestElf, "--cmdline", cmdline, "--cpus", std::to_string(cpus)};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
}

// PVM, the software-only KVM some CI hosts run: no kvm_amd/kvm_intel quirks,
// and kguest hides the hypercall-based PV features there (see Machine).
inline bool run_ok(const std::vector<std::string>& argv) { return run_process(argv, 30).status == 0; }

// A persistent TAP interface with a host address, removed at the end (for
// the network tests; needs root and /dev/net/tun).
class Tap {
public:
    Tap(std::string name, const std::string& cidr) : name_(std::move(name)) {
        run_ok({"ip", "link", "del", name_});   // a leftover from a killed run
        ok_ = run_ok({"ip", "tuntap", "add", name_, "mode", "tap"}) && run_ok({"ip", "addr", "add", cidr, "dev", name_}) &&
              run_ok({"ip", "link", "set", name_, "up"});
    }
    ~Tap() { run_ok({"ip", "link", "del", name_}); }
    Tap(const Tap&) = delete;
    Tap& operator=(const Tap&) = delete;
    bool ok() const { return ok_; }
    const std::string& name() const { return name_; }

private:
    std::string name_;
    bool ok_ = false;
};

inline bool host_is_pvm() { return access("/sys/module/kvm_pvm", F_OK) == 0; }

} // namespace kguest::test
