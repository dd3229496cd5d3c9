// Two machines (the VM tier's two guests, tests/vm/nodes/README.md): node A
// here, node B on the other guest ($SVM_TEST_REMOTE, see harness.h). The
// bytes B reads must cross the wire between them: the transmit counter of
// A's NIC ($SVM_TEST_WIRE_DEV) moves by at least the bytes read. Skips
// without $SVM_TEST_WIRE_DEV (one machine: nothing to check).
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
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

INSTANTIATE_TEST_SUITE_P(Tcp, TwoGuests, ::testing::Values("tcp"),
                         [](const auto& i) { return i.param; });
INSTANTIATE_TEST_SUITE_P(Rdma, TwoGuests, ::testing::Values("rdma"),
                         [](const auto& i) { return i.param; });

}  // namespace
}  // namespace svm::testing
