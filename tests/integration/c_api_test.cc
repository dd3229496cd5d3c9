// The C API (client/include/svm/svm.h) against real daemons; the calls
// themselves are made from C (c_api_flow.c).
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "svm/svm.h"
#include "tests/integration/harness.h"

extern "C" int svm_c_flow(const char* target_a, const char* target_b, const char* peer_a, char* err,
                          size_t errlen);

namespace svm::testing {
namespace {

TEST(CApi, ExportImportReadWatchSyncMapFromC) {
  TempDir dir;
  auto a = Daemon::Start({.node = "A", .dir = dir.path(), .transport = "tcp"});
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = Daemon::Start({.node = "B", .dir = dir.path(), .transport = "tcp"});
  ASSERT_TRUE(b.ok()) << b.status();
  char err[512] = "";
  const int step = svm_c_flow((*a)->control().c_str(), (*b)->control().c_str(), (*a)->peer().c_str(), err,
                              sizeof(err));
  EXPECT_EQ(step, 0) << err;
}

TEST(CApi, ConnectWithoutADaemonIsUnavailableWithAMessage) {
  svm_client* c = reinterpret_cast<svm_client*>(1);
  EXPECT_EQ(svm_connect("unix:/nonexistent/svmd.sock", &c), SVM_UNAVAILABLE);
  EXPECT_EQ(c, nullptr);
  EXPECT_NE(std::string(svm_last_error()).find("UNAVAILABLE"), std::string::npos) << svm_last_error();
  EXPECT_EQ(svm_connect(nullptr, &c), SVM_INVALID_ARGUMENT);
  svm_disconnect(nullptr);  // ignored
}

}  // namespace
}  // namespace svm::testing
