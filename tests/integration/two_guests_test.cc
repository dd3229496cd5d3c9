// Two machines (the VM tier's two guests, tests/vm/nodes/README.md): node A
// here, node B on the other guest ($SVM_TEST_REMOTE, see harness.h). The
// bytes B reads must cross the wire between them: the transmit counter of
// A's NIC ($SVM_TEST_WIRE_DEV) moves by at least the bytes read. Skips
// without $SVM_TEST_WIRE_DEV (one machine: nothing to check).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/integration/convergence.h"
#include "tests/integration/harness.h"

namespace svm::testing {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kPages = 4096;  // 16 MiB

uint64_t NicCounter(const std::string& dev, const std::string& name) {
  std::ifstream in(absl::StrCat("/sys/class/net/", dev, "/statistics/", name));
  uint64_t v = 0;
  in >> v;
  return v;
}

class TwoGuests : public ::testing::TestWithParam<std::string> {};

TEST_P(TwoGuests, BytesReadOnTheOtherNodeCrossTheWire) {
  SVM_GATE_TRANSPORT(GetParam());
  const char* dev_env = std::getenv("SVM_TEST_WIRE_DEV");
  if (dev_env == nullptr || *dev_env == '\0') GTEST_SKIP() << "no SVM_TEST_WIRE_DEV: one machine";
  const std::string dev = dev_env;
  ASSERT_TRUE(std::ifstream(absl::StrCat("/sys/class/net/", dev, "/statistics/tx_bytes")).good())
      << "no network device " << dev;
  TempDir dir;
  auto a = Daemon::Start({.node = "A", .dir = dir.path(), .transport = GetParam()});
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = Daemon::Start({.node = "B", .dir = dir.path(), .transport = GetParam()});
  ASSERT_TRUE(b.ok()) << b.status();
  auto e = Exporter::Start({.daemon = a->get(), .name = "wire", .pages = kPages, .fill = 'W',
                            .log_path = absl::StrCat(dir.path(), "/exporter.log")});
  ASSERT_TRUE(e.ok()) << e.status();
  auto cb = (*b)->Connect();
  ASSERT_NE(cb, nullptr);
  auto imp = cb->Import((*a)->peer(), "wire");
  ASSERT_TRUE(imp.ok()) << imp.status();
  const uint64_t tx0 = NicCounter(dev, "tx_bytes"), rx0 = NicCounter(dev, "rx_bytes");
  auto r = ReadBytes(*cb, "wire", 0, kPages * kPage, /*fresh=*/true);
  const uint64_t tx1 = NicCounter(dev, "tx_bytes"), rx1 = NicCounter(dev, "rx_bytes");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, std::string(kPages * kPage, 'W'));
  auto info = ImportOf(*cb, "wire");
  std::printf("%s: %s read %llu bytes on node B (path %s); node A's %s sent %llu bytes, received %llu\n",
              GetParam().c_str(), (*a)->peer().c_str(),
              static_cast<unsigned long long>(kPages * kPage),
              info.ok() ? info->path.c_str() : "?", dev.c_str(),
              static_cast<unsigned long long>(tx1 - tx0), static_cast<unsigned long long>(rx1 - rx0));
  EXPECT_GE(tx1 - tx0, kPages * kPage) << "the bytes read did not leave node A through " << dev;
}

// Runs a shell command here (node A); its output on failure.
absl::Status Sh(const std::string& cmd) {
  auto r = RunCommand({"/bin/sh", "-c", cmd});
  if (r.exit_code != 0) return absl::InternalError(absl::StrCat(cmd, ": exit ", r.exit_code, ": ", r.out, r.err));
  return absl::OkStatus();
}

// A zero-copy read whose READ responses the wire drops: node A's egress
// drops every RoCEv2 packet (UDP port 4791) with a tc filter on clsact,
// which leaves the peer's TCP control connection and the node agent alone
// and coexists with the netem phase's root qdisc. The importing daemon (node
// B) runs with an ack timeout of 4 s (retry count 7: its QP would give up
// on its own only after about half a minute), so the read must fail by
// svmd's own fetch deadline (ClientConn::Tick: "zero-copy read timed out"),
// UNAVAILABLE, and the data connection is closed; once the wire carries
// RoCE again, a later read succeeds over a new one.
TEST_P(TwoGuests, AZeroCopyReadTheWireDropsTimesOutAndALaterReadRecovers) {
  SVM_GATE_TRANSPORT(GetParam());
  if (GetParam() != "rdma") GTEST_SKIP() << "the zero-copy path is rdma's";
  const char* dev_env = std::getenv("SVM_TEST_WIRE_DEV");
  const char* modroot = std::getenv("SVM_VM_MODROOT");
  if (dev_env == nullptr || *dev_env == '\0' || modroot == nullptr) {
    GTEST_SKIP() << "no SVM_TEST_WIRE_DEV / SVM_VM_MODROOT: not node A of the two-guest tier";
  }
  const std::string dev = dev_env;
  constexpr int kFetchTimeoutMs = 2000;
  TempDir dir;
  auto a = Daemon::Start({.node = "A", .dir = dir.path(), .transport = GetParam()});
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = Daemon::Start({.node = "B",
                          .dir = dir.path(),
                          .extra = {"--rdma-ack-timeout-ms", "4000", "--fetch-timeout-ms",
                                    std::to_string(kFetchTimeoutMs)},
                          .transport = GetParam()});
  ASSERT_TRUE(b.ok()) << b.status();
  constexpr uint64_t kZcPages = 256;  // 1 MiB: several READs in flight
  auto e = Exporter::Start({.daemon = a->get(), .name = "zc", .pages = kZcPages, .fill = 'Z',
                            .backing = "memfd", .log_path = absl::StrCat(dir.path(), "/exporter.log")});
  ASSERT_TRUE(e.ok()) << e.status();
  auto cb = (*b)->Connect();
  ASSERT_NE(cb, nullptr);
  ASSERT_TRUE(cb->Import((*a)->peer(), "zc").ok());
  auto info = ImportOf(*cb, "zc");
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_TRUE(absl::StartsWith(info->path, "zero-copy/")) << info->path;
  auto first = ReadBytes(*cb, "zc", 0, kZcPages * kPage, /*fresh=*/true);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(*first, std::string(kZcPages * kPage, 'Z'));
  const uint64_t zc0 = Counter(*cb, "zero_copy_reads");

  ASSERT_TRUE(Sh(absl::StrCat("modprobe -d '", modroot, "' -a sch_ingress cls_u32 act_gact && tc qdisc add dev ",
                              dev, " clsact && tc filter add dev ", dev,
                              " egress protocol ip prio 1 u32 match ip protocol 17 0xff match ip dport 4791 0xffff"
                              " action drop"))
                  .ok());
  struct Undo {
    std::string dev;
    ~Undo() {
      if (!dev.empty()) (void)Sh(absl::StrCat("tc qdisc del dev ", dev, " clsact"));
    }
  } undo{dev};
  const absl::Time t0 = absl::Now();
  auto dropped = ReadBytes(*cb, "zc", 0, kZcPages * kPage, /*fresh=*/true);
  const absl::Duration took = absl::Now() - t0;
  std::printf("a zero-copy read over a wire that drops RoCE: %s after %s\n",
              dropped.ok() ? "ok" : dropped.status().ToString().c_str(), absl::FormatDuration(took).c_str());
  EXPECT_TRUE(absl::IsUnavailable(dropped.status())) << dropped.status();
  EXPECT_TRUE(absl::StrContains(dropped.status().message(), "zero-copy read timed out")) << dropped.status();
  // By the fetch deadline, not the QP's retries (7 x 4 s); with room for
  // TCG's pauses and the remote client's round trips.
  EXPECT_LT(took, absl::Milliseconds(kFetchTimeoutMs) + Scaled(absl::Seconds(3)));
  ASSERT_TRUE(Sh(absl::StrCat("tc qdisc del dev ", dev, " clsact")).ok());
  undo.dev.clear();

  const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(30));
  absl::StatusOr<std::string> again = absl::UnknownError("not read");
  while (absl::Now() < deadline) {
    again = ReadBytes(*cb, "zc", 0, kZcPages * kPage, /*fresh=*/true);
    if (again.ok()) break;
    absl::SleepFor(absl::Milliseconds(200));
  }
  ASSERT_TRUE(again.ok()) << "no read succeeded after the wire recovered: " << again.status();
  EXPECT_EQ(*again, std::string(kZcPages * kPage, 'Z'));
  auto after = ImportOf(*cb, "zc");
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_TRUE(absl::StartsWith(after->path, "zero-copy/")) << after->path;
  EXPECT_GT(Counter(*cb, "zero_copy_reads"), zc0) << "the recovered read did not take the zero-copy path";
}

INSTANTIATE_TEST_SUITE_P(Tcp, TwoGuests, ::testing::Values("tcp"),
                         [](const auto& i) { return i.param; });
INSTANTIATE_TEST_SUITE_P(Rdma, TwoGuests, ::testing::Values("rdma"),
                         [](const auto& i) { return i.param; });

}  // namespace
}  // namespace svm::testing
