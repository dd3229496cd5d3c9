// Real DAX end to end through svmd, and its teardown "like a CPU access".
// Runs in the VM tier (tests/vm/dax-guest.sh), where the guest has an
// emulated pmem region: the test process maps device-dax ($SVM_DAX_DEV,
// 2 MiB aligned) or a file on an fsdax mount ($SVM_DAX_DIR, MAP_SYNC) and
// exports its own range through daemon A; daemon B imports it and reads.
// The transport is $SVM_TEST_TRANSPORT: tcp (staged) or rdma (zero-copy:
// pinned on 6.1, ODP on 7.x). Skips when the mode is not configured.
//
// Teardown: while B reads in a loop, the device is disabled (daxctl
// disable-device) or the file truncated and its filesystem unmounted.
// Required: that completes within 10 s (svmd holds no page or pgmap
// reference; a pinned registration is released when the invalidation is
// acknowledged), B receives the invalidation, and every read after it
// fails with FAILED_PRECONDITION — never stale or foreign bytes.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"

#ifndef MAP_SYNC
#define MAP_SYNC 0x80000
#endif
#ifndef MAP_SHARED_VALIDATE
#define MAP_SHARED_VALIDATE 0x03
#endif

namespace svm::testing {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kHuge = 2 << 20;
constexpr uint64_t kLen = 4 * kHuge;  // 8 MiB: 2048 pages, 4 PMD mappings

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? "" : v;
}

// Word w of the export holds seed << 40 | w: every byte says where it is.
void Fill(uint8_t* p, uint64_t len, uint64_t seed) {
  auto* w = reinterpret_cast<uint64_t*>(p);
  for (uint64_t i = 0; i < len / 8; ++i) w[i] = (seed << 40) | i;
}

// "" when [off, off + data.size()) is exactly what Fill(seed) stored.
std::string Mismatch(const std::string& data, uint64_t off, uint64_t seed) {
  for (uint64_t b = 0; b + 8 <= data.size(); b += 8) {
    uint64_t v;
    std::memcpy(&v, data.data() + b, 8);
    const uint64_t want = (seed << 40) | ((off + b) / 8);
    if (v != want) return absl::StrCat("offset ", off + b, ": 0x", absl::Hex(v), " != 0x", absl::Hex(want));
  }
  return "";
}

int Shell(const std::string& cmd) { return std::system(cmd.c_str()); }

// Whether the export must be read zero-copy on this transport and kernel:
// only with ODP (7.x). A pinned registration (6.1) of DAX memory is refused
// (SharedMapping::dax) and the export is staged.
bool ExpectZeroCopy() { return TestTransport() == "rdma" && Env("SVM_EXPECT_ODP") == "1"; }
bool ExpectPinnedRefusal() { return TestTransport() == "rdma" && Env("SVM_EXPECT_ODP") == "0"; }

std::string FileText(const std::string& path) {
  std::string out;
  if (FILE* f = std::fopen(path.c_str(), "r")) {
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
    std::fclose(f);
  }
  return out;
}

// B reads the whole import in a loop. Every successful read must be the
// filled content; once stop_ok is set (the invalidation arrived) every read
// must fail with FAILED_PRECONDITION.
class ReadLoop {
 public:
  ReadLoop(Daemon& d, std::string name, uint64_t seed) : name_(std::move(name)), seed_(seed) {
    thread_ = std::thread([this, c = std::shared_ptr<Client>(d.Connect())] {
      while (!stop_) {
        const bool must_fail = invalidated_.load();
        auto got = ReadBytes(*c, name_, 0, kLen);
        if (got.ok()) {
          ++ok_;
          std::string m = Mismatch(*got, 0, seed_);
          if (must_fail) m = absl::StrCat("read succeeded after the invalidation; ", m);
          if (!m.empty()) {
            absl::MutexLock l(&mu_);
            if (bad_.empty()) bad_ = m;
          }
        } else {
          ++failed_;
          if (must_fail && got.status().code() != absl::StatusCode::kFailedPrecondition) {
            absl::MutexLock l(&mu_);
            if (bad_.empty()) bad_ = absl::StrCat("read failed with ", got.status().ToString());
          }
          absl::SleepFor(absl::Milliseconds(5));
        }
      }
    });
  }
  // From now on reads must fail (call once B has the invalidation, after
  // the reads in flight finished: give them a moment).
  void Invalidated() {
    absl::SleepFor(Scaled(absl::Milliseconds(200)));
    invalidated_ = true;
  }
  std::string Stop() {
    stop_ = true;
    thread_.join();
    absl::MutexLock l(&mu_);
    return bad_;
  }
  uint64_t ok() const { return ok_; }
  uint64_t failed() const { return failed_; }

 private:
  const std::string name_;
  const uint64_t seed_;
  std::atomic<bool> stop_{false}, invalidated_{false};
  std::atomic<uint64_t> ok_{0}, failed_{0};
  absl::Mutex mu_;
  std::string bad_;
  std::thread thread_;
};

class Dax : public ::testing::Test {
 protected:
  void StartDaemons() {
    for (auto* d : {&a_, &b_}) {
      Daemon::Options o;
      o.node = d == &a_ ? "A" : "B";
      o.dir = dir_.path();
      auto s = Daemon::Start(o);
      ASSERT_TRUE(s.ok()) << s.status();
      *d = std::move(*s);
    }
    ca_ = a_->Connect();
    cb_ = b_->Connect();
    ASSERT_NE(ca_, nullptr);
    ASSERT_NE(cb_, nullptr);
  }

  // Exports [mem, mem + kLen), imports it on B, checks the path, the content
  // and that an invalidation and a Sync work.
  void ExportImportRead(const std::string& name, uint8_t* mem, uint64_t seed,
                        bool invalidate_and_sync = true) {
    auto ex = ca_->Export(name, mem, kLen);
    ASSERT_TRUE(ex.ok()) << ex.status();
    auto info = ExportOf(*ca_, name);
    ASSERT_TRUE(info.ok()) << info.status();
    if (ExpectZeroCopy()) {
      // The zero-copy path is offered once registered: wait for it.
      const absl::Time until = absl::Now() + Scaled(absl::Seconds(5));
      while (!absl::StartsWith(info->path, "zero-copy/odp") && absl::Now() < until) {
        absl::SleepFor(absl::Milliseconds(50));
        info = ExportOf(*ca_, name);
        ASSERT_TRUE(info.ok()) << info.status();
      }
      EXPECT_TRUE(absl::StartsWith(info->path, "zero-copy/odp")) << info->path;
    }
    if (ExpectPinnedRefusal()) {
      // The refusal is decided right after the export, and logged.
      const std::string log = absl::StrCat(dir_.path(), "/A.log");
      const absl::Time until = absl::Now() + Scaled(absl::Seconds(5));
      while (!absl::StrContains(FileText(log), "must not be pinned long-term") && absl::Now() < until) {
        absl::SleepFor(absl::Milliseconds(50));
      }
      EXPECT_TRUE(absl::StrContains(FileText(log), "must not be pinned long-term")) << log;
      info = ExportOf(*ca_, name);
      ASSERT_TRUE(info.ok()) << info.status();
      EXPECT_FALSE(absl::StrContains(info->path, "zero-copy")) << info->path;
    }
    std::printf("dax: export '%s' path %s\n", name.c_str(), info->path.c_str());
    ASSERT_TRUE(cb_->Import(a_->peer(), name).ok());
    auto imp = ImportOf(*cb_, name);
    ASSERT_TRUE(imp.ok());
    std::printf("dax: import '%s' path %s\n", name.c_str(), imp->path.c_str());
    if (ExpectZeroCopy()) {
      EXPECT_EQ(imp->path, "zero-copy/odp");
    }
    auto got = ReadBytes(*cb_, name, 0, kLen);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(Mismatch(*got, 0, seed), "");
    auto part = ReadBytes(*cb_, name, kHuge - 96, 200);
    ASSERT_TRUE(part.ok()) << part.status();
    ASSERT_EQ(Mismatch(*part, kHuge - 96, seed), "");
    if (!invalidate_and_sync) return;
    // Invalidate: drop two pages of the mapping (the exporter's CPU would
    // fault them in again from the same media); B hears of it.
    auto watch = cb_->Watch(name);
    ASSERT_TRUE(watch.ok());
    ASSERT_EQ(madvise(mem + 5 * kPage, 2 * kPage, MADV_DONTNEED), 0) << std::strerror(errno);
    auto ev = WaitForPage(**watch, 5, Scaled(absl::Seconds(5)));
    ASSERT_TRUE(ev.ok()) << ev.status();
    auto again = ReadBytes(*cb_, name, 0, kLen);
    ASSERT_TRUE(again.ok()) << again.status();
    ASSERT_EQ(Mismatch(*again, 0, seed), "");
    auto s = ca_->Sync(name);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->subscribers_acked, 1u);
  }

  // Waits for an invalidation of name on w (any page).
  void AwaitInvalidation(WatchStream& w, const std::string& what) {
    auto ev = w.Next(Scaled(absl::Seconds(10)));
    ASSERT_TRUE(ev.ok()) << what << ": no invalidation reached the importer: " << ev.status();
  }

  void ExpectExporterReadFails(const std::string& name) {
    std::string buf(kPage, '\0');
    auto r = ca_->Read(name, 0, absl::MakeSpan(reinterpret_cast<uint8_t*>(buf.data()), buf.size()));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  }

  TempDir dir_;
  std::unique_ptr<Daemon> a_, b_;
  std::unique_ptr<Client> ca_, cb_;
};

// ------------------------------------------------------------ device-dax

class DevDax : public Dax {
 protected:
  void SetUp() override {
    dev_ = Env("SVM_DAX_DEV");
    if (dev_.empty()) GTEST_SKIP() << "SVM_DAX_DEV not set (no device-dax configured)";
    name_ = dev_.substr(dev_.rfind('/') + 1);
    StartDaemons();
  }
  void TearDown() override {
    if (mem_ != nullptr) munmap(mem_, kLen);
    if (fd_ >= 0) close(fd_);
    if (disabled_) Shell(absl::StrCat("daxctl enable-device ", name_, " >/dev/null 2>&1"));
  }
  void Map(uint64_t seed) {
    const absl::Time until = absl::Now() + Scaled(absl::Seconds(5));
    while (access(dev_.c_str(), F_OK) != 0 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(50));
    fd_ = open(dev_.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd_, 0) << dev_ << ": " << std::strerror(errno);
    void* p = mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    ASSERT_NE(p, MAP_FAILED) << std::strerror(errno);
    mem_ = static_cast<uint8_t*>(p);
    Fill(mem_, kLen, seed);
  }
  void Unmap() {
    munmap(mem_, kLen);
    mem_ = nullptr;
    close(fd_);
    fd_ = -1;
  }
  // daxctl disable-device; returns how long it took.
  absl::Duration Disable() {
    const absl::Time t0 = absl::Now();
    EXPECT_EQ(Shell(absl::StrCat("daxctl disable-device ", name_, " >/dev/null 2>&1")), 0);
    disabled_ = true;
    return absl::Now() - t0;
  }
  void Enable() {
    ASSERT_EQ(Shell(absl::StrCat("daxctl enable-device ", name_, " >/dev/null 2>&1")), 0);
    disabled_ = false;
  }

  std::string dev_, name_;
  int fd_ = -1;
  uint8_t* mem_ = nullptr;
  bool disabled_ = false;
};

// Export, import, read, invalidate, Sync; then the device is disabled while
// exported, imported (zero-copy registered with ODP) and read in a loop;
// then enabled again and exported again.
TEST_F(DevDax, DisableWhileReadLikeACpuAccessThenReEnable) {
  ASSERT_NO_FATAL_FAILURE(Map(32));
  ASSERT_NO_FATAL_FAILURE(ExportImportRead("devdax", mem_, 32));
  auto watch = cb_->Watch("devdax");
  ASSERT_TRUE(watch.ok());
  ReadLoop loop(*b_, "devdax", 32);
  absl::SleepFor(Scaled(absl::Milliseconds(300)));
  const absl::Duration took = Disable();
  std::printf("dax: disable-device took %s with the range exported, imported and read\n",
              absl::FormatDuration(took).c_str());
  EXPECT_LT(took, Scaled(absl::Seconds(10)));
  ASSERT_NO_FATAL_FAILURE(AwaitInvalidation(**watch, "disable-device"));
  loop.Invalidated();
  absl::SleepFor(Scaled(absl::Milliseconds(400)));
  const std::string bad = loop.Stop();
  EXPECT_EQ(bad, "");
  std::printf("dax: reads %lu ok, %lu failed\n", static_cast<unsigned long>(loop.ok()),
              static_cast<unsigned long>(loop.failed()));
  auto r = ReadBytes(*cb_, "devdax", 0, kPage);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  ExpectExporterReadFails("devdax");

  // Re-enable, map again, export again under the same name.
  Unmap();
  ASSERT_TRUE(ca_->Unexport("devdax").ok());
  ASSERT_NO_FATAL_FAILURE(Enable());
  ASSERT_NO_FATAL_FAILURE(Map(33));
  auto ex = ca_->Export("devdax", mem_, kLen);
  ASSERT_TRUE(ex.ok()) << ex.status();
  const absl::Time until = absl::Now() + Scaled(absl::Seconds(10));
  absl::StatusOr<std::string> got;
  do {
    got = ReadBytes(*cb_, "devdax", 0, kLen);
    if (got.ok() && Mismatch(*got, 0, 33).empty()) break;
    // The importer re-imports after the export was withdrawn.
    (void)cb_->Import(a_->peer(), "devdax");
    absl::SleepFor(Scaled(absl::Milliseconds(100)));
  } while (absl::Now() < until);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(Mismatch(*got, 0, 33), "");
}

// The reverse order: the export is withdrawn while B reads, then the
// device is disabled.
TEST_F(DevDax, UnexportWhileReadThenDisable) {
  ASSERT_NO_FATAL_FAILURE(Map(34));
  ASSERT_NO_FATAL_FAILURE(ExportImportRead("devdax", mem_, 34, /*invalidate_and_sync=*/false));
  auto watch = cb_->Watch("devdax");
  ASSERT_TRUE(watch.ok());
  ReadLoop loop(*b_, "devdax", 34);
  absl::SleepFor(Scaled(absl::Milliseconds(300)));
  ASSERT_TRUE(ca_->Unexport("devdax").ok());
  ASSERT_NO_FATAL_FAILURE(AwaitInvalidation(**watch, "unexport"));
  const absl::Duration took = Disable();
  std::printf("dax: disable-device took %s after the unexport\n", absl::FormatDuration(took).c_str());
  EXPECT_LT(took, Scaled(absl::Seconds(10)));
  absl::SleepFor(Scaled(absl::Milliseconds(300)));
  const std::string bad = loop.Stop();
  // Every read that succeeded returned the exported bytes (never foreign);
  // once withdrawn and disabled, the import reads nothing.
  auto r = ReadBytes(*cb_, "devdax", 0, kPage);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(bad, "");
}

// ------------------------------------------------------------------ fsdax

class FsDax : public Dax {
 protected:
  void SetUp() override {
    dir_path_ = Env("SVM_DAX_DIR");
    if (dir_path_.empty()) GTEST_SKIP() << "SVM_DAX_DIR not set (no fsdax mount configured)";
    StartDaemons();
  }
  void TearDown() override {
    if (mem_ != nullptr) munmap(mem_, kLen);
    if (fd_ >= 0) close(fd_);
  }
  void Map(uint64_t seed) {
    const std::string path = absl::StrCat(dir_path_, "/svm-dax-", getpid());
    fd_ = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ASSERT_GE(fd_, 0) << path << ": " << std::strerror(errno);
    unlink(path.c_str());
    ASSERT_EQ(fallocate(fd_, 0, 0, kLen), 0) << std::strerror(errno);
    void* p = mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_SHARED_VALIDATE | MAP_SYNC, fd_, 0);
    ASSERT_NE(p, MAP_FAILED) << "MAP_SYNC (the mapping must be DAX): " << std::strerror(errno);
    mem_ = static_cast<uint8_t*>(p);
    Fill(mem_, kLen, seed);
  }

  std::string dir_path_;
  int fd_ = -1;
  uint8_t* mem_ = nullptr;
};

// Export, import, read, invalidate, Sync; then the file is truncated while exported, imported and read in a loop: B is
// invalidated and its reads fail; then the exporter unmaps and closes the
// file and the filesystem must unmount within 10 s (svmd holds no
// reference to the file once the invalidation was acknowledged).
TEST_F(FsDax, TruncateWhileReadThenUnmount) {
  const std::string mnt = Env("SVM_DAX_MNT");
  ASSERT_NO_FATAL_FAILURE(Map(42));
  ASSERT_NO_FATAL_FAILURE(ExportImportRead("fsdax", mem_, 42));
  auto watch = cb_->Watch("fsdax");
  ASSERT_TRUE(watch.ok());
  ReadLoop loop(*b_, "fsdax", 42);
  absl::SleepFor(Scaled(absl::Milliseconds(300)));
  ASSERT_EQ(ftruncate(fd_, 0), 0);
  ASSERT_NO_FATAL_FAILURE(AwaitInvalidation(**watch, "truncate"));
  loop.Invalidated();
  absl::SleepFor(Scaled(absl::Milliseconds(400)));
  const std::string bad = loop.Stop();
  EXPECT_EQ(bad, "");
  std::printf("dax: reads %lu ok, %lu failed\n", static_cast<unsigned long>(loop.ok()),
              static_cast<unsigned long>(loop.failed()));
  ExpectExporterReadFails("fsdax");
  munmap(mem_, kLen);
  mem_ = nullptr;
  close(fd_);
  fd_ = -1;
  if (mnt.empty()) return;
  // umount retried (EBUSY) until svmd let go of the file, at most 10 s (x5
  // under SVM_TEST_SLOW: the VM tier under TCG).
  const absl::Time t0 = absl::Now();
  int rc;
  while ((rc = umount(mnt.c_str())) != 0 && errno == EBUSY && absl::Now() - t0 < Scaled(absl::Seconds(10))) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  const absl::Duration took = absl::Now() - t0;
  std::printf("dax: umount took %s\n", absl::FormatDuration(took).c_str());
  ASSERT_EQ(rc, 0) << "umount " << mnt << ": " << std::strerror(errno);
  EXPECT_LT(took, Scaled(absl::Seconds(10)));
  // Mounted again for the next test (dax-guest.sh passes the device).
  const std::string dev = Env("SVM_DAX_PMEM");
  if (!dev.empty()) {
    ASSERT_EQ(Shell(absl::StrCat("mount -o dax ", dev, " ", mnt)), 0);
  }
}

}  // namespace
}  // namespace svm::testing
