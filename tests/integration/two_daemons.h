// The fixture most two-node suites start from: two daemons of the test's
// transport (the parameter: "tcp", "rdma"; the rdma instances skip without
// an active RDMA port), node A exporting and node B importing, and a
// client of each.
#ifndef SVM_TESTS_INTEGRATION_TWO_DAEMONS_H_
#define SVM_TESTS_INTEGRATION_TWO_DAEMONS_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tests/integration/harness.h"

namespace svm::testing {

class TwoDaemons : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    SVM_GATE_TRANSPORT(GetParam());
    auto a = Daemon::Start(Node("A"));
    ASSERT_TRUE(a.ok()) << a.status();
    a_ = std::move(*a);
    auto b = Daemon::Start(Node("B"));
    ASSERT_TRUE(b.ok()) << b.status();
    b_ = std::move(*b);
    ca_ = a_->Connect();
    cb_ = b_->Connect();
    ASSERT_NE(ca_, nullptr);
    ASSERT_NE(cb_, nullptr);
  }

  // A daemon of this test's transport.
  Daemon::Options Node(const std::string& name, std::vector<std::string> extra = {}) {
    return {.node = name, .dir = dir_.path(), .extra = std::move(extra), .transport = GetParam()};
  }

  TempDir dir_;
  std::unique_ptr<Daemon> a_, b_;
  std::unique_ptr<Client> ca_, cb_;
};

}  // namespace svm::testing

#endif  // SVM_TESTS_INTEGRATION_TWO_DAEMONS_H_
