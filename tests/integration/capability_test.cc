// Capabilities, not inspection (DESIGN.md section 6, issue 11): a client
// proves its right to memory with a svm_shim range fd it attached itself,
// deposited on its session socket; svmd needs no CAP_SYS_PTRACE.
//
// Natively (no shim): forged descriptors are refused with INVALID_ARGUMENT
// and svmd keeps serving. In the VM tier (SVM_TEST_SOURCE=shim, root): an
// unprivileged user exports its own memory through a svmd started without
// CAP_SYS_PTRACE and CAP_SYS_ADMIN, and its attempt on another user's
// process is refused by the kernel and reported as PERMISSION_DENIED.
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <linux/capability.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <string>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/ascii.h"
#include "common/fd.h"
#include "daemon/session/abi.h"
#include "driver-shim/include/uapi/linux/svm_shim.h"
#include "gtest/gtest.h"
#include "svm/v1/control.grpc.pb.h"
#include "tests/integration/harness.h"

namespace svm::testing {
namespace {

namespace abi = session::abi;
constexpr uint64_t kPage = 4096;
constexpr uid_t kUser = 65534;
constexpr gid_t kUserGroup = 65534;

// A session socket driven by hand, as a hostile client would.
class RawSession {
 public:
  static std::unique_ptr<RawSession> Connect(const std::string& path) {
    auto s = std::unique_ptr<RawSession>(new RawSession());
    s->sock_ = UniqueFd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    sockaddr_un sun{};
    sun.sun_family = AF_UNIX;
    std::snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path.c_str());
    if (::connect(s->sock_.get(), reinterpret_cast<sockaddr*>(&sun), sizeof(sun)) != 0) return nullptr;
    abi::HelloMsg h{};
    h.h.type = abi::kHello;
    h.h.len = sizeof(h);
    h.magic = abi::kMagic;
    h.version = abi::kVersion;
    if (abi::SendMsg(s->sock_.get(), &h, sizeof(h), nullptr, 0) != 0) return nullptr;
    alignas(8) char buf[abi::kMaxMsg];
    int fds[4], nfds = 0;
    const ssize_t n = abi::RecvMsg(s->sock_.get(), buf, sizeof(buf), fds, &nfds);
    for (int i = 0; i < nfds; ++i) ::close(fds[i]);
    if (n != sizeof(abi::HelloOkMsg)) return nullptr;
    return s;
  }

  // Sends a kDeposit carrying fds; the token, or svmd's error.
  absl::StatusOr<uint64_t> Deposit(const std::vector<int>& fds) {
    abi::DepositMsg m{};
    m.h.type = abi::kDeposit;
    m.h.len = sizeof(m);
    if (int err = abi::SendMsg(sock_.get(), &m, sizeof(m), fds.data(), static_cast<int>(fds.size()));
        err != 0) {
      return ErrnoStatus(err, "send deposit");
    }
    alignas(8) char buf[abi::kMaxMsg];
    int got[4], ngot = 0;
    const ssize_t n = abi::RecvMsg(sock_.get(), buf, sizeof(buf), got, &ngot);
    for (int i = 0; i < ngot; ++i) ::close(got[i]);
    if (n <= 0) return absl::UnavailableError("svmd closed the session");
    abi::MsgHeader h;
    std::memcpy(&h, buf, sizeof(h));
    if (h.type == abi::kError) {
      abi::ErrorMsg e{};
      std::memcpy(&e, buf, std::min<size_t>(static_cast<size_t>(n), sizeof(e)));
      return absl::Status(static_cast<absl::StatusCode>(e.code),
                          std::string(e.text, std::min<size_t>(e.text_len, sizeof(e.text))));
    }
    if (h.type != abi::kDepositOk || n != sizeof(abi::DepositOkMsg)) {
      return absl::InternalError(absl::StrCat("unexpected answer type ", h.type));
    }
    abi::DepositOkMsg ok;
    std::memcpy(&ok, buf, sizeof(ok));
    return ok.token;
  }

 private:
  RawSession() = default;
  UniqueFd sock_;
};

class Capabilities : public ::testing::Test {
 protected:
  void SetUp() override {
    auto d = Daemon::Start({.node = "A", .dir = dir_.path()});
    ASSERT_TRUE(d.ok()) << d.status();
    d_ = std::move(*d);
    c_ = d_->Connect();
    ASSERT_NE(c_, nullptr);
    auto st = c_->Status();
    ASSERT_TRUE(st.ok()) << st.status();
    session_path_ = st->session_socket;
  }

  // The Export call as any client can make it, naming a token.
  absl::StatusOr<v1::ExportInfo> ExportWithToken(uint64_t token, uint64_t addr, uint64_t len) {
    auto stub = v1::Control::NewStub(grpc::CreateChannel(d_->control(), grpc::InsecureChannelCredentials()));
    v1::ExportRequest req;
    req.set_name("tok");
    req.set_addr(addr);
    req.set_len(len);
    req.set_range_token(token);
    v1::ExportResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = stub->Export(&ctx, req, &resp);
    if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
    return resp.info();
  }

  TempDir dir_;
  std::unique_ptr<Daemon> d_;
  std::unique_ptr<Client> c_;
  std::string session_path_;
};

// Anything but a range fd is refused where it arrives; the session and svmd
// carry on.
TEST_F(Capabilities, ForgedDescriptorsAreRejected) {
  auto s = RawSession::Connect(session_path_);
  ASSERT_NE(s, nullptr);
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  UniqueFd r(p[0]), w(p[1]);
  UniqueFd null(::open("/dev/null", O_RDWR | O_CLOEXEC));
  UniqueFd memfd(::memfd_create("forged", MFD_CLOEXEC));
  ASSERT_TRUE(null.valid() && memfd.valid());
  std::vector<std::pair<std::string, int>> forged = {
      {"pipe", r.get()}, {"/dev/null", null.get()}, {"memfd", memfd.get()}};
  // The shim's device itself is not a range fd either.
  UniqueFd dev(::open("/dev/svm_shim", O_RDWR | O_CLOEXEC));
  if (dev.valid()) forged.push_back({"/dev/svm_shim", dev.get()});
  for (const auto& [what, fd] : forged) {
    auto t = s->Deposit({fd});
    EXPECT_TRUE(absl::IsInvalidArgument(t.status())) << what << ": " << t.status();
    EXPECT_TRUE(absl::StrContains(t.status().message(), "not a svm_shim range fd"))
        << what << ": " << t.status();
  }
  // None, or two at once.
  auto none = s->Deposit({});
  EXPECT_TRUE(absl::IsInvalidArgument(none.status())) << none.status();
  auto two = s->Deposit({r.get(), null.get()});
  EXPECT_TRUE(absl::IsInvalidArgument(two.status())) << two.status();
  // svmd serves on.
  auto st = c_->Status();
  EXPECT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(d_->process().running(), true);
}

// A token nobody deposited (or another process's) names nothing.
TEST_F(Capabilities, UnknownTokenIsNotFound) {
  void* p = ::mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  auto info = ExportWithToken(0x1234567890abcdefull, reinterpret_cast<uint64_t>(p), kPage);
  EXPECT_TRUE(absl::IsNotFound(info.status())) << info.status();
  ::munmap(p, kPage);
}

// The capability bits of /proc/PID/status field (CapEff, CapBnd).
uint64_t CapField(pid_t pid, const std::string& field) {
  std::ifstream f(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(f, line)) {
    if (absl::StartsWith(line, field + ":")) {
      uint64_t v = 0;
      std::string hex = line.substr(field.size() + 1);
      absl::StripAsciiWhitespace(&hex);
      if (absl::SimpleHexAtoi(hex, &v)) return v;
    }
  }
  return ~0ull;
}

class ShimCapabilities : public ::testing::Test {
 protected:
  void SetUp() override {
    if (TestSource() != "shim") GTEST_SKIP() << "needs svm_shim (the VM tier: SVM_TEST_SOURCE=shim)";
    if (::geteuid() != 0) GTEST_SKIP() << "needs root to drop capabilities and set up users";
    // Every process this test starts from now on (svmd, svmctl, exporters)
    // runs without CAP_SYS_PTRACE and CAP_SYS_ADMIN, root or not: what the
    // unit's CapabilityBoundingSet= gives svmd. (Irreversible: this is the
    // binary's last suite to need them.)
    ASSERT_EQ(::prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE, 0, 0, 0), 0) << std::strerror(errno);
    ASSERT_EQ(::prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0), 0) << std::strerror(errno);
    // The udev rule's group access: the test user's group may open the shim.
    ASSERT_EQ(::stat("/dev/svm_shim", &dev_st_), 0);
    ASSERT_EQ(::chown("/dev/svm_shim", 0, kUserGroup), 0);
    ASSERT_EQ(::chmod("/dev/svm_shim", 0660), 0);
    restore_ = true;
    auto d = Daemon::Start({.node = "A", .dir = dir_.path()});
    ASSERT_TRUE(d.ok()) << d.status();
    d_ = std::move(*d);
    c_ = d_->Connect();
    ASSERT_NE(c_, nullptr);
  }
  void TearDown() override {
    if (restore_) {
      (void)::chown("/dev/svm_shim", dev_st_.st_uid, dev_st_.st_gid);
      (void)::chmod("/dev/svm_shim", dev_st_.st_mode & 07777);
    }
  }

  TempDir dir_;
  struct stat dev_st_{};
  bool restore_ = false;
  std::unique_ptr<Daemon> d_;
  std::unique_ptr<Client> c_;
};

TEST_F(ShimCapabilities, UserExportsOwnMemoryThroughSvmdWithoutPtrace) {
  constexpr uint64_t kPtrace = 1ull << CAP_SYS_PTRACE, kAdmin = 1ull << CAP_SYS_ADMIN;
  const pid_t svmd = d_->process().pid();
  EXPECT_EQ(CapField(svmd, "CapEff") & (kPtrace | kAdmin), 0u) << "svmd kept CAP_SYS_PTRACE/ADMIN";
  EXPECT_EQ(CapField(svmd, "CapBnd") & (kPtrace | kAdmin), 0u);

  auto e = Exporter::Start({.daemon = d_.get(), .name = "mine", .pages = 8, .uid = kUser,
                            .gid = kUserGroup, .log_path = absl::StrCat(dir_.path(), "/exporter.log")});
  ASSERT_TRUE(e.ok()) << e.status();
  auto info = ExportOf(*c_, "mine");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->pid, (*e)->pid());
  EXPECT_EQ(info->source, "shim");
  // svmd reads it through the deposited range fd: page p holds p + 1.
  auto r = ReadBytes(*c_, "mine", 0, 8 * kPage, /*fresh=*/true);
  ASSERT_TRUE(r.ok()) << r.status();
  for (uint64_t p = 0; p < 8; ++p) {
    uint64_t word;
    std::memcpy(&word, r->data() + p * kPage, sizeof(word));
    EXPECT_EQ(word, p + 1) << "page " << p;
  }
  // And the range fd's notifier reports the user's mapping changes.
  auto w = c_->Watch("mine");
  ASSERT_TRUE(w.ok()) << w.status();
  auto reply = (*e)->Command("dontneed 3 1");
  ASSERT_TRUE(reply.ok() && absl::StartsWith(*reply, "ok")) << (reply.ok() ? *reply : reply.status().ToString());
  auto ev = WaitForPage(**w, 3, Scaled(absl::Seconds(10)));
  EXPECT_TRUE(ev.ok()) << ev.status();
}

// The zero-copy path's object, deposited beside the range fd: svmd takes
// it only on the kernel's word that the range maps it (svm_shim's
// SVM_SHIM_IOC_RANGE_OBJECT); a forged one (another memfd, /dev/null, a
// pipe) is refused where it arrives, and the right one is accepted.
TEST_F(ShimCapabilities, ForgedObjectBesideARangeFdIsRefused) {
  UniqueFd mfd(::memfd_create("mine", MFD_CLOEXEC)), other(::memfd_create("forged", MFD_CLOEXEC));
  ASSERT_TRUE(mfd.valid() && other.valid());
  ASSERT_EQ(::ftruncate(mfd.get(), 4 * kPage), 0);
  ASSERT_EQ(::ftruncate(other.get(), 4 * kPage), 0);
  void* p = ::mmap(nullptr, 4 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, mfd.get(), 0);
  ASSERT_NE(p, MAP_FAILED);
  absl::Cleanup unmap = [p] { ::munmap(p, 4 * kPage); };
  UniqueFd dev(::open("/dev/svm_shim", O_RDWR | O_CLOEXEC));
  ASSERT_TRUE(dev.valid()) << std::strerror(errno);
  auto attach = [&] {
    svm_shim_attach a{};
    a.flags = SVM_SHIM_ATTACH_PID;
    a.target = static_cast<uint64_t>(::getpid());
    a.start = reinterpret_cast<uint64_t>(p);
    a.length = 4 * kPage;
    a.queue_len = 64;
    return UniqueFd(::ioctl(dev.get(), SVM_SHIM_IOC_ATTACH, &a));
  };
  auto status = c_->Status();
  ASSERT_TRUE(status.ok()) << status.status();
  auto s = RawSession::Connect(status->session_socket);
  ASSERT_NE(s, nullptr);
  int pfd[2];
  ASSERT_EQ(::pipe2(pfd, O_CLOEXEC), 0);
  UniqueFd r(pfd[0]), w(pfd[1]);
  UniqueFd null(::open("/dev/null", O_RDWR | O_CLOEXEC));
  for (int forged : {other.get(), null.get(), r.get()}) {
    UniqueFd range = attach();
    ASSERT_TRUE(range.valid()) << std::strerror(errno);
    auto t = s->Deposit({range.get(), forged});
    EXPECT_TRUE(absl::IsInvalidArgument(t.status())) << t.status();
    EXPECT_TRUE(absl::StrContains(t.status().message(), "not a shared mapping of that object"))
        << t.status();
  }
  UniqueFd range = attach();
  ASSERT_TRUE(range.valid());
  auto t = s->Deposit({range.get(), mfd.get()});
  EXPECT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE(c_->Status().ok());
}

TEST_F(ShimCapabilities, AnotherUsersProcessIsRefusedByTheKernel) {
  // A process of another user (root): the test user may not ptrace it.
  auto victim = Subprocess::Start({.argv = {"/bin/sleep", "60"},
                                   .log_path = absl::StrCat(dir_.path(), "/victim.log")});
  ASSERT_TRUE(victim.ok()) << victim.status();
  auto r = RunCommand({SvmctlPath(), "--daemon", d_->control(), "export", "--pid",
                       std::to_string((*victim)->pid()), "--addr", "0x400000", "--len", "4096",
                       "--name", "theirs"},
                      Scaled(absl::Seconds(20)), kUser, kUserGroup);
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_TRUE(absl::StrContains(r.err, "PERMISSION_DENIED")) << r.err;
  // Refused by the kernel at the attach, not by svmd's inspection.
  EXPECT_TRUE(absl::StrContains(r.err, "the kernel refused to attach")) << r.err;
  auto info = ExportOf(*c_, "theirs");
  EXPECT_TRUE(absl::IsNotFound(info.status())) << info.status();
}

}  // namespace
}  // namespace svm::testing
