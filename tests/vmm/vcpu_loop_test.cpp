// The vCPU loop's pause and stop controls without KVM: a loop with no vCPUs
// still runs the same locking between pause()/resume() on one thread and
// request_stop()/wait() on another (the control API against the end of
// run_vm). A pause that fails must leave the VM running, not half-paused.
#include "vmm/vcpu_loop.hpp"
#include "devices/base/bus.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace kguest {
namespace {

TEST(VcpuLoop, PauseRacingTheEndOfRunFailsCleanly) {
    for (int round = 0; round < 50; ++round) {
        std::vector<Vcpu> none;
        Bus pio{"PIO"}, mmio{"MMIO"};
        VcpuLoop loop(none, 0, pio, mmio, {});
        loop.start();
        std::atomic<bool> go{true};
        std::thread api([&] {
            while (go.load()) {
                if (loop.pause()) {
                    EXPECT_TRUE(loop.paused());
                    loop.resume();
                }
            }
        });
        std::this_thread::sleep_for(std::chrono::microseconds(50 * round));
        loop.request_stop(3);
        EXPECT_EQ(loop.wait(), 3);
        go.store(false);
        api.join();
        // After the end: pause is refused and does not leave `paused` set.
        EXPECT_FALSE(loop.pause());
        EXPECT_FALSE(loop.paused());
        EXPECT_EQ(loop.wait(), 3);   // a second wait joins nothing
    }
}

} // namespace
} // namespace kguest
