// daemon/transport/frame: the header check every received frame passes
// before its payload is read. Anything it lets through is trusted.
#include "daemon/transport/frame.h"

#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "daemon/source/mirror_source.h"

#include "gtest/gtest.h"

namespace svm::transport {
namespace {

FrameHeader Good(FrameType t = FrameType::kFetch, uint32_t len = sizeof(FetchPayload)) {
  FrameHeader h;
  h.type = static_cast<uint8_t>(t);
  h.payload_len = len;
  h.id = 7;
  return h;
}

TEST(Frame, LayoutIsTheWireFormat) {
  // The header is sent with memcpy: its layout is the protocol.
  EXPECT_EQ(sizeof(FrameHeader), 32u);
  EXPECT_EQ(offsetof(FrameHeader, magic), 0u);
  EXPECT_EQ(offsetof(FrameHeader, version), 4u);
  EXPECT_EQ(offsetof(FrameHeader, type), 5u);
  EXPECT_EQ(offsetof(FrameHeader, flags), 6u);
  EXPECT_EQ(offsetof(FrameHeader, payload_len), 8u);
  EXPECT_EQ(offsetof(FrameHeader, id), 16u);
  FrameHeader h;
  unsigned char b[4];
  std::memcpy(b, &h.magic, 4);
  EXPECT_EQ(std::string(reinterpret_cast<char*>(b), 4), "SVMD");
  EXPECT_EQ(sizeof(InvalAckPayload), 16u);
}

TEST(Frame, AcceptsEveryKnownType) {
  for (FrameType t : {FrameType::kHello, FrameType::kFetch, FrameType::kFetchResp, FrameType::kInval,
                      FrameType::kInvalAck}) {
    EXPECT_TRUE(ValidateHeader(Good(t)).ok()) << static_cast<int>(t);
  }
}

TEST(Frame, AcceptsEmptyAndMaximalPayload) {
  EXPECT_TRUE(ValidateHeader(Good(FrameType::kHello, 0)).ok());
  EXPECT_TRUE(ValidateHeader(Good(FrameType::kFetchResp, kMaxPayload)).ok());
  // The largest legal response: a full fetch plus its fixed part.
  EXPECT_GE(kMaxPayload, kMaxFetchPages * 4096 + sizeof(FetchRespPayload));
}

TEST(Frame, RejectsBadMagic) {
  for (uint32_t m : {0u, 0x53564d44u /* byte-swapped */, kFrameMagic + 1, 0xffffffffu}) {
    FrameHeader h = Good();
    h.magic = m;
    auto st = ValidateHeader(h);
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << std::hex << m;
  }
}

TEST(Frame, RejectsBadVersion) {
  for (uint8_t v : {0, 2, 255}) {
    FrameHeader h = Good();
    h.version = v;
    EXPECT_EQ(ValidateHeader(h).code(), absl::StatusCode::kDataLoss) << int{v};
  }
}

TEST(Frame, RejectsUnknownType) {
  for (uint8_t t : {0, 6, 7, 128, 255}) {
    FrameHeader h = Good();
    h.type = t;
    EXPECT_EQ(ValidateHeader(h).code(), absl::StatusCode::kDataLoss) << int{t};
  }
}

TEST(Frame, RejectsOversizePayload) {
  for (uint32_t len : {kMaxPayload + 1, kMaxPayload * 2, 0xffffffffu}) {
    FrameHeader h = Good(FrameType::kFetchResp, len);
    EXPECT_EQ(ValidateHeader(h).code(), absl::StatusCode::kDataLoss) << len;
  }
}

TEST(Frame, ErrorsSayWhatIsWrong) {
  FrameHeader h = Good();
  h.magic = 0x12345678;
  EXPECT_NE(std::string(ValidateHeader(h).message()).find("magic"), std::string::npos);
  h = Good();
  h.type = 9;
  EXPECT_NE(std::string(ValidateHeader(h).message()).find("type"), std::string::npos);
}

std::vector<uint8_t> InvalFrame(const InvalPayload& p) {
  FrameHeader h = Good(FrameType::kInval, sizeof(p));
  std::vector<uint8_t> f(sizeof(h) + sizeof(p));
  std::memcpy(f.data(), &h, sizeof(h));
  std::memcpy(f.data() + sizeof(h), &p, sizeof(p));
  return f;
}

InvalPayload PayloadOf(const std::vector<uint8_t>& f) {
  InvalPayload p;
  std::memcpy(&p, f.data() + sizeof(FrameHeader), sizeof(p));
  return p;
}

constexpr uint32_t K(source::ChangeKind k) { return static_cast<uint32_t>(k); }

TEST(MergeInvalFrame, AStormOfOneExportCollapsesIntoTheQueuedInval) {
  auto f = InvalFrame({9, 10, 2, 100, K(source::ChangeKind::kUnmap), 0, 5000});
  ASSERT_TRUE(MergeInvalFrame(f, {9, 4, 1, 101, K(source::ChangeKind::kUnmap), 0, 6000}));
  ASSERT_TRUE(MergeInvalFrame(f, {9, 20, 3, 103, K(source::ChangeKind::kUnmap), 0, 4000}));
  InvalPayload m = PayloadOf(f);
  EXPECT_EQ(m.export_id, 9u);
  EXPECT_EQ(m.first_page, 4u);   // union of 10+2, 4+1, 20+3
  EXPECT_EQ(m.npages, 19u);
  EXPECT_EQ(m.seq, 103u);        // the newest
  EXPECT_EQ(m.kind, K(source::ChangeKind::kUnmap));
  EXPECT_EQ(m.detected_ns, 4000u);  // the earliest
  ASSERT_TRUE(MergeInvalFrame(f, {9, 4, 1, 104, K(source::ChangeKind::kWrite), 0, 7000}));
  EXPECT_EQ(PayloadOf(f).kind, K(source::ChangeKind::kOverflow));
  EXPECT_EQ(PayloadOf(f).seq, 104u);
}

TEST(MergeInvalFrame, OtherExportsTerminalKindsAndOtherFramesAreLeftAlone) {
  auto f = InvalFrame({9, 0, 1, 1, K(source::ChangeKind::kUnmap), 0, 0});
  const auto before = f;
  EXPECT_FALSE(MergeInvalFrame(f, {8, 0, 1, 2, K(source::ChangeKind::kUnmap), 0, 0}));
  EXPECT_FALSE(MergeInvalFrame(f, {9, 0, 1, 2, K(source::ChangeKind::kExit), 0, 0}));
  EXPECT_FALSE(MergeInvalFrame(f, {9, 0, 1, 2, K(source::ChangeKind::kUnexport), 0, 0}));
  EXPECT_EQ(f, before);
  auto exit = InvalFrame({9, 0, 4, 3, K(source::ChangeKind::kExit), 0, 0});
  EXPECT_FALSE(MergeInvalFrame(exit, {9, 0, 1, 4, K(source::ChangeKind::kUnmap), 0, 0}));
  // A response (any frame but an INVAL) never absorbs an INVAL.
  FrameHeader h = Good(FrameType::kFetchResp, sizeof(InvalPayload));
  std::vector<uint8_t> resp(sizeof(h) + sizeof(InvalPayload));
  std::memcpy(resp.data(), &h, sizeof(h));
  EXPECT_FALSE(MergeInvalFrame(resp, {0, 0, 1, 4, K(source::ChangeKind::kUnmap), 0, 0}));
}

}  // namespace
}  // namespace svm::transport
