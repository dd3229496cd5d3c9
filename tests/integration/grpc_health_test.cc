// svmd's control socket and peer port answer gRPC's standard health
// checking and server reflection protocols, through stubs generated from
// proto/grpc/ (real daemon, real channels).
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <set>

#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "tests/integration/harness.h"

namespace svm::testing {
namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;
namespace refl = grpc::reflection::v1alpha;

std::unique_ptr<grpc::ClientContext> Deadline(absl::Duration d = absl::Seconds(5)) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + Scaled(d)));
  return ctx;
}

// Check(service): the status, or the call's error code as a negative number.
int Check(grpc::Channel& ch, const std::string& service) {
  auto stub = Health::NewStub(std::shared_ptr<grpc::Channel>(&ch, [](grpc::Channel*) {}));
  HealthCheckRequest req;
  req.set_service(service);
  HealthCheckResponse resp;
  auto ctx = Deadline();
  grpc::Status st = stub->Check(ctx.get(), req, &resp);
  return st.ok() ? resp.status() : -static_cast<int>(st.error_code());
}

std::set<std::string> ListServices(const std::shared_ptr<grpc::Channel>& ch) {
  auto stub = refl::ServerReflection::NewStub(ch);
  auto ctx = Deadline();
  auto stream = stub->ServerReflectionInfo(ctx.get());
  refl::ServerReflectionRequest req;
  req.set_list_services("*");
  std::set<std::string> out;
  if (!stream->Write(req)) return out;
  stream->WritesDone();
  refl::ServerReflectionResponse resp;
  while (stream->Read(&resp)) {
    for (const auto& s : resp.list_services_response().service()) out.insert(s.name());
  }
  EXPECT_TRUE(stream->Finish().ok());
  return out;
}

class GrpcHealth : public ::testing::Test {
 protected:
  void SetUp() override {
    auto d = Daemon::Start({.node = "h", .dir = dir_.path()});
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = std::move(*d);
    control_ = grpc::CreateChannel(daemon_->control(), grpc::InsecureChannelCredentials());
    peer_ = grpc::CreateChannel(daemon_->peer(), grpc::InsecureChannelCredentials());
  }
  TempDir dir_;
  std::unique_ptr<Daemon> daemon_;
  std::shared_ptr<grpc::Channel> control_, peer_;
};

TEST_F(GrpcHealth, BothEndpointsAreServingOverallAndPerService) {
  EXPECT_EQ(Check(*control_, ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(Check(*control_, "svm.v1.Control"), HealthCheckResponse::SERVING);
  EXPECT_EQ(Check(*peer_, ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(Check(*peer_, "svm.v1.Peer"), HealthCheckResponse::SERVING);
  // Each endpoint vouches only for the service it serves.
  EXPECT_EQ(Check(*peer_, "svm.v1.Control"), -grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Check(*control_, "svm.v1.Peer"), -grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Check(*control_, "no.such.Service"), -grpc::StatusCode::NOT_FOUND);
}

TEST_F(GrpcHealth, ShutdownIsAnnouncedAsNotServingToWatchers) {
  auto stub = Health::NewStub(peer_);
  HealthCheckRequest req;
  auto ctx = Deadline(absl::Seconds(10));
  auto watch = stub->Watch(ctx.get(), req);
  HealthCheckResponse resp;
  ASSERT_TRUE(watch->Read(&resp));
  ASSERT_EQ(resp.status(), HealthCheckResponse::SERVING);
  daemon_->process().Signal(SIGTERM);
  ASSERT_TRUE(watch->Read(&resp)) << "the watch ended without a NOT_SERVING update";
  EXPECT_EQ(resp.status(), HealthCheckResponse::NOT_SERVING);
  ctx->TryCancel();
}

TEST_F(GrpcHealth, ReflectionListsEachEndpointsServices) {
  const std::set<std::string> control = ListServices(control_);
  EXPECT_TRUE(control.contains("svm.v1.Control")) << ::testing::PrintToString(control);
  EXPECT_TRUE(control.contains("grpc.health.v1.Health")) << ::testing::PrintToString(control);
  EXPECT_FALSE(control.contains("svm.v1.Peer"));
  const std::set<std::string> peer = ListServices(peer_);
  EXPECT_TRUE(peer.contains("svm.v1.Peer")) << ::testing::PrintToString(peer);
  EXPECT_TRUE(peer.contains("grpc.health.v1.Health")) << ::testing::PrintToString(peer);
  EXPECT_FALSE(peer.contains("svm.v1.Control")) << "the control API must not be on the network";
}

}  // namespace
}  // namespace svm::testing
