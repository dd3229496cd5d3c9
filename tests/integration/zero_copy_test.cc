// The zero-copy path: an export backed by a memfd (svm::ExportableMemory)
// is registered by the exporting daemon and read by the importer with
// one-sided RDMA READs. Needs an active RDMA device (the VM tier's rxe0):
// skips without one, fails instead with $SVM_EXPECT_RDMA=1.
//
// $SVM_EXPECT_ODP=1 / 0 asserts the registration the exporter used (odp on
// the 7.x guest, pinned on 6.1), so a silent fallback cannot pass.
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"

namespace svm::testing {
namespace {

constexpr uint64_t kPage = 4096;

uint64_t Counter(Client& c, const std::string& name) {
  auto st = c.Status();
  if (!st.ok()) return 0;
  auto it = st->counters.find(name);
  return it == st->counters.end() ? 0 : it->second;
}

// "odp" / "pinned" as $SVM_EXPECT_ODP asks, or "" (either).
std::string ExpectedRegistration() {
  const char* e = std::getenv("SVM_EXPECT_ODP");
  if (e == nullptr || *e == '\0') return "";
  return std::string(e) == "1" ? "odp" : "pinned";
}

// The version a page holds: svm-exporter's `stamp V` writes V << 32 | page
// into every word; 0 for a zero page; -1 when the page is neither (torn
// pages are possible only while a stamp is in progress, so callers that
// need a clean page check after the stamp returned).
int64_t VersionOf(const char* page, uint64_t index) {
  uint64_t first;
  std::memcpy(&first, page, 8);
  for (uint64_t w = 1; w < kPage / 8; ++w) {
    uint64_t v;
    std::memcpy(&v, page + w * 8, 8);
    if (v != first) return -1;
  }
  if (first == 0) return 0;
  if ((first & 0xffffffffu) != index) return -1;
  return static_cast<int64_t>(first >> 32);
}

// Imports name from the daemon at host on c, expects the zero-copy path,
// reads its first pages once and checks each carries version (one
// zero-copy read, counted).
void ExpectZeroCopyImportReads(Client& c, const std::string& host, const std::string& name,
                               uint64_t pages, int64_t version) {
  ASSERT_TRUE(c.Import(host, name).ok());
  auto imp = ImportOf(c, name);
  ASSERT_TRUE(imp.ok()) << imp.status();
  EXPECT_TRUE(absl::StartsWith(imp->path, "zero-copy/")) << imp->path;
  const uint64_t zc_before = Counter(c, "zero_copy_reads");
  auto got = ReadBytes(c, name, 0, pages * kPage);
  ASSERT_TRUE(got.ok()) << got.status();
  for (uint64_t p = 0; p < pages; ++p) ASSERT_EQ(VersionOf(got->data() + p * kPage, p), version) << p;
  EXPECT_EQ(Counter(c, "zero_copy_reads"), zc_before + 1);
}

class ZeroCopy : public ::testing::Test {
 protected:
  void SetUp() override {
    SVM_GATE_TRANSPORT("rdma");
    for (auto* d : {&a_, &b_}) {
      Daemon::Options o;
      o.node = d == &a_ ? "A" : "B";
      o.dir = dir_.path();
      o.transport = "rdma";
      auto s = Daemon::Start(o);
      ASSERT_TRUE(s.ok()) << s.status();
      *d = std::move(*s);
    }
    ca_ = a_->Connect();
    cb_ = b_->Connect();
    ASSERT_NE(ca_, nullptr);
    ASSERT_NE(cb_, nullptr);
  }

  std::unique_ptr<Exporter> Export(const std::string& name, uint64_t pages, const std::string& backing) {
    Exporter::Options o;
    o.daemon = a_.get();
    o.name = name;
    o.pages = pages;
    o.backing = backing;
    o.log_path = absl::StrCat(dir_.path(), "/exporter-", name, ".log");
    auto e = Exporter::Start(o);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(*e) : nullptr;
  }

  TempDir dir_;
  std::unique_ptr<Daemon> a_, b_;
  std::unique_ptr<Client> ca_, cb_;
};

TEST_F(ZeroCopy, MemfdExportIsReadWithOneSidedReadsAndPrivateMemoryIsStaged) {
  auto shared = Export("shared", 64, "memfd");
  auto priv = Export("private", 16, "anon");
  ASSERT_NE(shared, nullptr);
  ASSERT_NE(priv, nullptr);
  ASSERT_EQ(shared->Command("stamp 3").value_or("?"), "ok");

  auto ex = ExportOf(*ca_, "shared");
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_TRUE(absl::StartsWith(ex->path, "zero-copy/")) << ex->path;
  const std::string want = ExpectedRegistration();
  if (!want.empty()) {
    EXPECT_TRUE(absl::StartsWith(ex->path, "zero-copy/" + want)) << ex->path;
  }
  auto exp = ExportOf(*ca_, "private");
  ASSERT_TRUE(exp.ok()) << exp.status();
  EXPECT_FALSE(absl::StrContains(exp->path, "zero-copy")) << exp->path;

  ASSERT_TRUE(cb_->Import(a_->peer(), "shared").ok());
  ASSERT_TRUE(cb_->Import(a_->peer(), "private").ok());
  auto imp = ImportOf(*cb_, "shared");
  ASSERT_TRUE(imp.ok()) << imp.status();
  EXPECT_TRUE(absl::StartsWith(imp->path, "zero-copy/")) << imp->path;
  if (!want.empty()) {
    EXPECT_EQ(imp->path, "zero-copy/" + want);
  }
  auto impp = ImportOf(*cb_, "private");
  ASSERT_TRUE(impp.ok()) << impp.status();
  EXPECT_TRUE(absl::StartsWith(impp->path, "staged/")) << impp->path;

  // Reads of the shared export never reach the exporter daemon's CPU: its
  // fetch counter stays where it is while the importer's zero-copy reads grow.
  const uint64_t served_before = Counter(*ca_, "fetches_served");
  const uint64_t zc_before = Counter(*cb_, "zero_copy_reads");
  for (int i = 0; i < 10; ++i) {
    // Unaligned offsets and lengths: READs are byte-granular.
    const uint64_t off = static_cast<uint64_t>(i) * 5 * kPage + 100;
    auto got = ReadBytes(*cb_, "shared", off, 3 * kPage + 7);
    ASSERT_TRUE(got.ok()) << got.status();
    for (uint64_t b = 0; b < got->size(); b += 8) {
      const uint64_t at = off + b;
      // Every byte of word (at / 8) of page p is a byte of 3 << 32 | p.
      const uint64_t p = at / kPage;
      const uint64_t word = (uint64_t{3} << 32) | p;
      uint8_t expect = reinterpret_cast<const uint8_t*>(&word)[at % 8];
      ASSERT_EQ(static_cast<uint8_t>((*got)[b]), expect) << "offset " << at;
    }
  }
  // Zero-copy reads are not cached. A read of whole pages lands where the
  // client's session takes it from: on ODP (7.x) the READs write the
  // session's data area itself (registered in the link's domain for local
  // writes only), svmd copies nothing; on pinned devices (6.1) they land
  // in the connection's receive slots and are copied out (counted).
  const bool zc_odp = absl::EndsWith(imp->path, "/odp");
  const uint64_t copied_before = Counter(*cb_, "transport_bytes_copied");
  auto whole = ReadBytes(*cb_, "shared", 0, 64 * kPage);
  ASSERT_TRUE(whole.ok()) << whole.status();
  for (uint64_t p = 0; p < 64; ++p) ASSERT_EQ(VersionOf(whole->data() + p * kPage, p), 3) << p;
  EXPECT_EQ(Counter(*ca_, "fetches_served"), served_before);
  EXPECT_EQ(Counter(*cb_, "zero_copy_reads"), zc_before + 11);
  EXPECT_EQ(Counter(*cb_, "transport_bytes_copied"), copied_before + (zc_odp ? 0 : 64 * kPage))
      << (zc_odp ? "a zero-copy READ of whole pages was copied by svmd" : "pinned: the slot copy");

  // The private export is staged: the exporter serves it. A fresh read
  // (cached nowhere) lands in a receive slot and is copied into the
  // reader's buffer. A cached read lands in the claimed pages of the shared
  // cache file: on ODP (7.x) the exporter's RDMA WRITE puts the pages there
  // itself, nothing is copied; on pinned devices (6.1) the slot is copied
  // into them (a pinned registration of the file would keep the pages an
  // invalidation punches out).
  const bool odp = absl::EndsWith(impp->path, "/odp");
  if (!want.empty()) {
    EXPECT_EQ(impp->path, "staged/" + want);
  }
  uint64_t copied = Counter(*cb_, "transport_bytes_copied");
  ASSERT_TRUE(ReadBytes(*cb_, "private", 0, 4 * kPage, /*fresh=*/true).ok());
  EXPECT_GT(Counter(*ca_, "fetches_served"), served_before);
  EXPECT_EQ(Counter(*cb_, "transport_bytes_copied"), copied + 4 * kPage);
  copied = Counter(*cb_, "transport_bytes_copied");
  uint64_t landed = Counter(*cb_, "cache_pages_landed");
  ASSERT_TRUE(ReadBytes(*cb_, "private", 4 * kPage, 8 * kPage).ok());
  EXPECT_EQ(Counter(*cb_, "cache_pages_landed"), landed + 8);
  EXPECT_EQ(Counter(*cb_, "transport_bytes_copied"), copied + (odp ? 0 : 8 * kPage))
      << (odp ? "a fetch into the shared cache was copied" : "pinned: the slot copy");
  // An invalidation punches pages 5 and 6 out of the cache file; the next
  // cached read fetches them again into the same file, and the reader sees
  // the new bytes (not the punched-out ones, not zeros).
  auto w = cb_->Watch("private");
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_EQ(priv->Command("remap 5 2 66").value_or("?"), "ok");  // munmap + mmap + fill 'B'
  ASSERT_TRUE(WaitForPage(**w, 5, absl::Seconds(10)).ok());
  copied = Counter(*cb_, "transport_bytes_copied");
  landed = Counter(*cb_, "cache_pages_landed");
  const uint64_t past_lease = Counter(*cb_, "reads_past_lease");
  auto again = ReadBytes(*cb_, "private", 4 * kPage, 8 * kPage);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->substr(kPage, 2 * kPage), std::string(2 * kPage, 'B')) << "the refetched pages";
  // Only the two punched pages are fetched again, unless the importer's
  // lease lapsed meanwhile (a heartbeat late on a loaded host, seen once
  // under TCG): then no cached page may be served and all eight are.
  const uint64_t refetched = Counter(*cb_, "reads_past_lease") > past_lease ? 8 : 2;
  EXPECT_EQ(Counter(*cb_, "cache_pages_landed"), landed + refetched);
  EXPECT_EQ(Counter(*cb_, "transport_bytes_copied"), copied + (odp ? 0 : refetched * kPage));

  // Stores are read live (no Sync needed on this path).
  ASSERT_EQ(shared->Command("stamp 9").value_or("?"), "ok");
  auto after = ReadBytes(*cb_, "shared", 0, 64 * kPage);
  ASSERT_TRUE(after.ok()) << after.status();
  for (uint64_t p = 0; p < 64; ++p) ASSERT_EQ(VersionOf(after->data() + p * kPage, p), 9) << p;
}

// The capability bits of /proc/PID/status field (CapEff, CapBnd); ~0 unread.
uint64_t CapField(pid_t pid, const std::string& field) {
  std::ifstream f(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(f, line)) {
    uint64_t v = 0;
    if (absl::StartsWith(line, field + ":") &&
        absl::SimpleHexAtoi(absl::StripAsciiWhitespace(line.substr(field.size() + 1)), &v)) {
      return v;
    }
  }
  return ~0ull;
}

// Protection, end to end: with TLS, each peer identity is handed the rkey
// of a registration of its own, made in the protection domain its data
// connections live in. Two importers with different certificates both read
// the export zero-copy, byte-exact, without the exporter's CPU: the key the
// exporter registers for at DescribeExport is the one its queue pairs for
// that peer were made under at SetupData.
TEST(ZeroCopyTls, EachPeerIdentityReadsThroughARegistrationOfItsOwn) {
  SVM_GATE_TRANSPORT("rdma");
  TempDir dir;
  const std::string pki = absl::StrCat(dir.path(), "/pki");
  ASSERT_EQ(MakeTestCa(pki, {"node-a", "node-b", "node-c"}), 0);
  std::map<std::string, std::unique_ptr<Daemon>> d;
  for (const char* node : {"node-a", "node-b", "node-c"}) {
    Daemon::Options o;
    o.node = node;
    o.dir = dir.path();
    o.transport = "rdma";
    o.extra = TlsFlagsFor(pki, node);
    auto s = Daemon::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    d[node] = std::move(*s);
  }
  Exporter::Options eo;
  eo.daemon = d["node-a"].get();
  eo.name = "shared";
  eo.pages = 32;
  eo.backing = "memfd";
  auto ex = Exporter::Start(eo);
  ASSERT_TRUE(ex.ok()) << ex.status();
  ASSERT_EQ((*ex)->Command("stamp 5").value_or("?"), "ok");
  auto ca = d["node-a"]->Connect();
  ASSERT_NE(ca, nullptr);
  const uint64_t served_before = Counter(*ca, "fetches_served");
  for (const char* node : {"node-b", "node-c"}) {
    SCOPED_TRACE(node);
    auto c = d[node]->Connect();
    ASSERT_NE(c, nullptr);
    ExpectZeroCopyImportReads(*c, d["node-a"]->peer(), "shared", 32, 5);
  }
  EXPECT_EQ(Counter(*ca, "fetches_served"), served_before) << "a read reached the exporter's CPU";
  EXPECT_EQ(Counter(*ca, "zero_copy_peer_registration_failures"), 0u);
}

// Capabilities, not inspection: a svmd without CAP_SYS_ADMIN and
// CAP_SYS_PTRACE (what the packaged unit grants) cannot open
// /proc/PID/map_files, yet serves a client's ExportableMemory zero-copy:
// libsvm deposits the memfd beside the range fd, and svm_shim vouches that
// the range maps it (SVM_SHIM_IOC_RANGE_OBJECT). Needs the shim (the VM
// tier) and root (to start svmd without the two).
TEST_F(ZeroCopy, ClientMemfdIsServedZeroCopyBySvmdWithoutCapSysAdmin) {
  if (TestSource() != "shim") GTEST_SKIP() << "needs svm_shim (the VM tier: SVM_TEST_SOURCE=shim)";
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to start svmd without capabilities";
  // svmd as the unit starts it: neither capability in its bounding,
  // inheritable or effective set (util-linux setpriv, in front of svmd).
  const std::string wrapper = absl::StrCat(dir_.path(), "/svmd-without-caps");
  {
    std::ofstream w(wrapper);
    w << "#!/bin/sh\nexec setpriv --bounding-set -sys_admin,-sys_ptrace --inh-caps -sys_admin,-sys_ptrace "
      << SvmdPath() << " \"$@\"\n";
  }
  ASSERT_EQ(::chmod(wrapper.c_str(), 0755), 0);
  const char* was = std::getenv("SVM_TEST_SVMD");
  const std::string before = was != nullptr ? was : "";
  ASSERT_EQ(::setenv("SVM_TEST_SVMD", wrapper.c_str(), 1), 0);
  auto c = Daemon::Start({.node = "C", .dir = dir_.path(), .transport = "rdma"});
  if (was != nullptr) {
    ::setenv("SVM_TEST_SVMD", before.c_str(), 1);
  } else {
    ::unsetenv("SVM_TEST_SVMD");
  }
  ASSERT_TRUE(c.ok()) << c.status();
  constexpr uint64_t kAdmin = 1ull << 21, kPtrace = 1ull << 19;  // CAP_SYS_ADMIN, CAP_SYS_PTRACE
  const pid_t pid = (*c)->process().pid();
  ASSERT_EQ(CapField(pid, "CapBnd") & (kAdmin | kPtrace), 0u) << "svmd kept CAP_SYS_ADMIN/PTRACE";
  ASSERT_EQ(CapField(pid, "CapEff") & (kAdmin | kPtrace), 0u);
  auto cc = (*c)->Connect();
  ASSERT_NE(cc, nullptr);

  Exporter::Options o;
  o.daemon = c->get();
  o.name = "mine";
  o.pages = 16;
  o.backing = "memfd";
  o.log_path = absl::StrCat(dir_.path(), "/exporter-mine.log");
  auto e = Exporter::Start(o);
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_EQ((*e)->Command("stamp 5").value_or("?"), "ok");
  auto ex = ExportOf(*cc, "mine");
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ(ex->source, "shim");
  EXPECT_TRUE(absl::StartsWith(ex->path, "zero-copy/")) << ex->path;
  ExpectZeroCopyImportReads(*cb_, (*c)->peer(), "mine", 16, 5);
}

// The exporter rewrites, truncates and re-populates its memfd while the
// importer reads it as fast as it can. Reads may fail (pages past the end
// behave like a truncated file mapping) but a successful read only ever
// returns pages of a version that was written (or zero pages): never freed
// or foreign memory. After each re-population the new content is what is
// read (a pinned registration of the old pages would keep serving them),
// invalidations arrive, and the zero-copy path comes back.
TEST_F(ZeroCopy, RewriteTruncateRepopulateNeverReturnsForeignOrFreedMemory) {
  constexpr uint64_t kPages = 32;
  auto shared = Export("churn", kPages, "memfd");
  ASSERT_NE(shared, nullptr);
  ASSERT_EQ(shared->Command("stamp 1").value_or("?"), "ok");
  ASSERT_TRUE(cb_->Import(a_->peer(), "churn").ok());
  auto watch = cb_->Watch("churn");
  ASSERT_TRUE(watch.ok()) << watch.status();

  std::atomic<int64_t> max_version{1};
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads_ok{0}, reads_failed{0};
  std::string bad;
  std::thread reader([&] {
    auto c = b_->Connect();
    while (!stop) {
      auto got = ReadBytes(*c, "churn", 0, kPages * kPage);
      if (!got.ok()) {
        ++reads_failed;
        continue;
      }
      ++reads_ok;
      const int64_t limit = max_version.load();
      for (uint64_t p = 0; p < kPages && bad.empty(); ++p) {
        const int64_t v = VersionOf(got->data() + p * kPage, p);
        // -1 only for a page torn by a concurrent stamp, whose words are
        // all of the page's own index at the old or new version.
        if (v == -1) {
          for (uint64_t w = 0; w < kPage / 8; ++w) {
            uint64_t x;
            std::memcpy(&x, got->data() + p * kPage + w * 8, 8);
            if (x != 0 && ((x & 0xffffffffu) != p || static_cast<int64_t>(x >> 32) > limit)) {
              bad = absl::StrCat("page ", p, " word ", w, " holds 0x", absl::Hex(x));
              break;
            }
          }
        } else if (v > limit) {
          bad = absl::StrCat("page ", p, " has version ", v, " > ", limit);
        }
      }
    }
  });

  uint64_t invalidations = 0;
  auto drain = [&](absl::Duration wait) {
    while (true) {
      auto ev = (*watch)->Next(wait);
      if (!ev.ok()) return;
      ++invalidations;
      wait = absl::Milliseconds(1);
    }
  };
  for (int64_t v = 2; v <= 6; ++v) {
    const uint64_t seen = invalidations;
    ASSERT_EQ(shared->Command("truncate").value_or("?"), "ok");
    ASSERT_EQ(shared->Command("regrow").value_or("?"), "ok");
    max_version = v;
    ASSERT_EQ(shared->Command(absl::StrCat("stamp ", v)).value_or("?"), "ok");
    // The truncation reaches the importer as an invalidation...
    drain(Scaled(absl::Seconds(5)));
    EXPECT_GT(invalidations, seen) << "cycle " << v;
    // ...after which reads show the new version: the registration of the
    // truncated pages was replaced or withdrawn, never kept.
    const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(5));
    int64_t wrong_page = -1, wrong_version = -2;
    do {
      auto got = ReadBytes(*cb_, "churn", 0, kPages * kPage);
      if (!got.ok()) continue;
      wrong_page = -1;
      for (uint64_t p = 0; p < kPages && wrong_page < 0; ++p) {
        const int64_t got_v = VersionOf(got->data() + p * kPage, p);
        if (got_v != v) {
          wrong_page = static_cast<int64_t>(p);
          wrong_version = got_v;
        }
      }
      if (wrong_page < 0) break;
      absl::SleepFor(absl::Milliseconds(20));
    } while (absl::Now() < deadline);
    ASSERT_EQ(wrong_page, -1) << "cycle " << v << ": page " << wrong_page << " still reads version "
                              << wrong_version;
  }
  stop = true;
  reader.join();
  EXPECT_TRUE(bad.empty()) << bad;
  EXPECT_GE(invalidations, 5u);
  EXPECT_GT(reads_ok.load(), 0u);
  std::printf("churn: %lu reads ok, %lu failed, %lu invalidations\n",
              static_cast<unsigned long>(reads_ok.load()),
              static_cast<unsigned long>(reads_failed.load()),
              static_cast<unsigned long>(invalidations));

  // The exporter re-registers once the object is whole again; the importer
  // asks again within a second of reading.
  const absl::Time deadline = absl::Now() + Scaled(absl::Seconds(10));
  std::string path;
  while (absl::Now() < deadline) {
    ASSERT_TRUE(ReadBytes(*cb_, "churn", 0, kPage).ok());
    auto imp = ImportOf(*cb_, "churn");
    ASSERT_TRUE(imp.ok());
    path = imp->path;
    if (absl::StartsWith(path, "zero-copy/")) break;
    absl::SleepFor(absl::Milliseconds(200));
  }
  EXPECT_TRUE(absl::StartsWith(path, "zero-copy/")) << path;
}

// A range that stops mapping the object (the exporter unmaps it and maps
// private memory in its place) is no longer read zero-copy: the importer's
// reads see the new private content through the staged path.
TEST_F(ZeroCopy, RemappedRangeFallsBackToTheStagedPath) {
  auto shared = Export("moved", 8, "memfd");
  ASSERT_NE(shared, nullptr);
  ASSERT_EQ(shared->Command("stamp 5").value_or("?"), "ok");
  ASSERT_TRUE(cb_->Import(a_->peer(), "moved").ok());
  auto before = ReadBytes(*cb_, "moved", 0, 8 * kPage);
  ASSERT_TRUE(before.ok()) << before.status();
  ASSERT_EQ(VersionOf(before->data(), 0), 5);
  auto watch = cb_->Watch("moved");
  ASSERT_TRUE(watch.ok());
  // remap: munmap + private anonymous mmap at the same address, filled 0x7e.
  ASSERT_EQ(shared->Command("remap 0 8 126").value_or("?"), "ok");
  auto ev = (*watch)->Next(Scaled(absl::Seconds(5)));
  ASSERT_TRUE(ev.ok()) << ev.status();
  auto got = ReadBytes(*cb_, "moved", 0, 8 * kPage, /*fresh=*/true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, std::string(8 * kPage, '\x7e'));
  auto imp = ImportOf(*cb_, "moved");
  ASSERT_TRUE(imp.ok());
  EXPECT_TRUE(absl::StartsWith(imp->path, "staged/")) << imp->path;
  auto ex = ExportOf(*ca_, "moved");
  ASSERT_TRUE(ex.ok());
  EXPECT_FALSE(absl::StrContains(ex->path, "zero-copy")) << ex->path;
}

}  // namespace
}  // namespace svm::testing
