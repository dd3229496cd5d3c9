// The checks svmd makes on control and peer requests before acting on them
// (daemon/service/requests.h). The same functions run under
// tests/fuzz/control_request_fuzz and peer_request_fuzz; these are the
// boundary cases by name, and the regression test for peer text reaching
// the log unescaped.
#include "daemon/service/requests.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

namespace svm::service {
namespace {

v1::ExportRequest Export(uint64_t addr, uint64_t len) {
  v1::ExportRequest r;
  r.set_name("demo");
  r.set_addr(addr);
  r.set_len(len);
  return r;
}

TEST(ValidateExportRequest, AcceptsPageAlignedRangesBelowTheTopOfTheAddressSpace) {
  EXPECT_TRUE(ValidateExportRequest(Export(4096, 65536)).ok());
  EXPECT_TRUE(ValidateExportRequest(Export(~uint64_t{8191}, 4096)).ok());
  // Ending at 2^64 wraps addr + len to 0: refused like any overflow.
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateExportRequest(Export(~uint64_t{4095}, 4096))));
}

TEST(ValidateExportRequest, RefusesEmptyUnalignedAndWrappingRanges) {
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateExportRequest(Export(4096, 0))));
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateExportRequest(Export(4097, 4096))));
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateExportRequest(Export(4096, 100))));
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateExportRequest(Export(~uint64_t{4095}, 8192))));
  v1::ExportRequest r = Export(4096, 4096);
  r.set_pid(-1);
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateExportRequest(r)));
}

TEST(ValidateExportRequest, AccessListEntriesAreIdentities) {
  for (const std::string& bad : {std::string(), std::string("a,b"), std::string("a b"), std::string("a\nb"),
                                 std::string(256, 'x')}) {
    v1::ExportRequest r = Export(4096, 4096);
    r.add_allow("node-b");
    r.add_allow(bad);
    EXPECT_TRUE(absl::IsInvalidArgument(ValidateExportRequest(r))) << bad;
  }
  v1::ExportRequest r = Export(4096, 4096);
  for (int i = 0; i < 65; ++i) r.add_allow(absl::StrCat("node-", i));
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateExportRequest(r)));
  r.mutable_allow()->RemoveLast();
  EXPECT_TRUE(ValidateExportRequest(r).ok());
}

TEST(ValidateImportRequest, PeerNeedsAPortAndTheLocalNameIsAName) {
  v1::ImportRequest r;
  r.set_name("demo");
  r.set_peer("[fe80::1]:7470");
  EXPECT_TRUE(ValidateImportRequest(r).ok());
  r.set_peer("10.0.0.1:0");
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateImportRequest(r)));
  r.set_peer("10.0.0.1");
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateImportRequest(r)));
  r.set_peer("10.0.0.1:7470");
  r.set_as("-demo");
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateImportRequest(r)));
}

TEST(ValidateReadRequest, LengthIsBoundedAndTheRangeMustNotWrap) {
  v1::ReadRequest r;
  r.set_name("demo");
  r.set_len(kMaxReadBytes);
  EXPECT_TRUE(ValidateReadRequest(r).ok());
  r.set_len(kMaxReadBytes + 1);
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateReadRequest(r)));
  r.set_len(0);
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateReadRequest(r)));
  r.set_len(2);
  r.set_offset(UINT64_MAX);
  EXPECT_TRUE(absl::IsOutOfRange(ValidateReadRequest(r)));
}

TEST(CheckAllowed, AnEmptyListAdmitsEveryPeerAndAListOnlyItsIdentities) {
  const std::vector<std::string> none, list = {"node-b", "spiffe://svm/node-c"};
  EXPECT_TRUE(CheckAllowed(none, {}).ok());
  EXPECT_TRUE(CheckAllowed(list, std::vector<std::string>{"x", "spiffe://svm/node-c"}).ok());
  EXPECT_TRUE(absl::IsPermissionDenied(CheckAllowed(list, {})));
  EXPECT_TRUE(absl::IsPermissionDenied(CheckAllowed(list, std::vector<std::string>{"node-B"})));
}

TEST(RefusalLogLine, NamesThePeerItsIdentitiesAndTheExport) {
  const std::vector<std::string> ids = {"node-c"};
  EXPECT_EQ(RefusalLogLine("ipv4:10.0.0.3:5000", ids, "secret", "the export is not shared with this peer"),
            "peer ipv4:10.0.0.3:5000 (node-c) refused export 'secret': the export is not shared with this peer");
  EXPECT_EQ(RefusalLogLine("ipv4:10.0.0.3:5000", {}, "secret", "no"),
            "peer ipv4:10.0.0.3:5000 (unauthenticated) refused export 'secret': no");
}

// A peer chooses the export name it asks for and (through its certificate)
// its identities: none of it may start a new log line or carry terminal
// controls.
TEST(RefusalLogLine, PeerTextCannotBreakTheLogLine) {
  const std::vector<std::string> ids = {"node-c\n[warn] forged", "\x1b[2J"};
  const std::string line = RefusalLogLine("ipv4:10.0.0.3:5000", ids, "x\r\nforged", "why");
  for (unsigned char c : line) EXPECT_TRUE(c >= 0x20 && c < 0x7f) << line;
  EXPECT_NE(line.find("node-c\\n[warn] forged"), std::string::npos) << line;
  EXPECT_EQ(LogSafe(std::string(300, 'a')), std::string(256, 'a') + "...");
}

}  // namespace
}  // namespace svm::service
