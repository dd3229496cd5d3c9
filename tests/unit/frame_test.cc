// daemon/transport/frame: the header check every received frame passes
// before its payload is read. Anything it lets through is trusted.
#include "daemon/transport/frame.h"

#include <cstddef>
#include <cstring>
#include <string>

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

}  // namespace
}  // namespace svm::transport
