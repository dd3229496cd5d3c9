// daemon/transport/frame: the header check every received frame passes
// before its payload is read. Anything it lets through is trusted.
#include "daemon/transport/frame.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "common/fd.h"

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

// ------------------------------------------------ the one frame builder

TEST(MakeFrame, HeaderFixedPartAndTail) {
  const uint64_t fixed = 0x1122334455667788;
  const std::string tail = "tail bytes";
  auto f = MakeFrame(FrameType::kFetchResp, 42, &fixed, sizeof(fixed), tail.data(), tail.size());
  ASSERT_EQ(f.size(), sizeof(FrameHeader) + sizeof(fixed) + tail.size());
  FrameHeader h;
  std::memcpy(&h, f.data(), sizeof(h));
  EXPECT_TRUE(ValidateHeader(h).ok());
  EXPECT_EQ(h.type, static_cast<uint8_t>(FrameType::kFetchResp));
  EXPECT_EQ(h.id, 42u);
  EXPECT_EQ(h.payload_len, sizeof(fixed) + tail.size());
  EXPECT_EQ(std::memcmp(f.data() + sizeof(h), &fixed, sizeof(fixed)), 0);
  EXPECT_EQ(std::string(f.begin() + sizeof(h) + sizeof(fixed), f.end()), tail);
}

// What an exporter sends for a failed fetch is what the importer returns,
// also when the message had to be cut to fit one rdma receive buffer.
TEST(MakeFetchError, RoundTripsThroughFetchErrorStatusAndIsCutToFit) {
  for (size_t max : {kMaxFrame, size_t{512}}) {
    const std::string msg(1000, 'm');
    auto f = MakeFetchError(7, absl::NotFoundError(msg), max);
    ASSERT_LE(f.size(), max);
    FrameHeader h;
    std::memcpy(&h, f.data(), sizeof(h));
    EXPECT_EQ(h.type, static_cast<uint8_t>(FrameType::kFetchResp));
    EXPECT_EQ(h.id, 7u);
    ASSERT_EQ(h.payload_len, f.size() - sizeof(h));
    FetchRespPayload r;
    std::memcpy(&r, f.data() + sizeof(h), sizeof(r));
    const std::string got(f.begin() + sizeof(h) + sizeof(r), f.end());
    absl::Status st = FetchErrorStatus(r, got);
    EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
    EXPECT_EQ(std::string(st.message()), msg.substr(0, std::min(msg.size(), max - sizeof(h) - sizeof(r))));
  }
}

TEST(FetchErrorStatus, MalformedErrorsAreDataLoss) {
  FetchRespPayload ok_code{static_cast<uint32_t>(absl::StatusCode::kInternal), 3, 0};
  EXPECT_EQ(FetchErrorStatus(ok_code, "abc").code(), absl::StatusCode::kInternal);
  FetchRespPayload zero{0, 0, 0};
  EXPECT_EQ(FetchErrorStatus(zero, "").code(), absl::StatusCode::kDataLoss) << "code 0 is not an error";
  FetchRespPayload unknown{17, 0, 0};
  EXPECT_EQ(FetchErrorStatus(unknown, "").code(), absl::StatusCode::kDataLoss);
  FetchRespPayload short_msg{static_cast<uint32_t>(absl::StatusCode::kInternal), 4, 0};
  EXPECT_EQ(FetchErrorStatus(short_msg, "abc").code(), absl::StatusCode::kDataLoss);
}

TEST(CheckFetchPages, OneToTheLimit) {
  EXPECT_EQ(CheckFetchPages(0, 8).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(CheckFetchPages(1, 8).ok());
  EXPECT_TRUE(CheckFetchPages(8, 8).ok());
  EXPECT_EQ(CheckFetchPages(9, 8).code(), absl::StatusCode::kInvalidArgument);
}

TEST(InvalPayload, RoundTripsAnInvalRecord) {
  const InvalRecord r{3, 4, 5, 6, source::ChangeKind::kRemap, 7};
  const InvalRecord back = FromInvalPayload(ToInvalPayload(r));
  EXPECT_EQ(back.export_id, 3u);
  EXPECT_EQ(back.first_page, 4u);
  EXPECT_EQ(back.npages, 5u);
  EXPECT_EQ(back.seq, 6u);
  EXPECT_EQ(back.kind, source::ChangeKind::kRemap);
  EXPECT_EQ(back.detected_ns, 7u);
  EXPECT_EQ(ToInvalPayload(r).pad, 0u);
}

// FrameReader: the exporter's reader of a tcp data connection. Frames
// written back to back come out whole and in order, several per read; a
// payload larger than its buffer is read straight into place; the ends of
// the stream are reported as ReadFrame reports them.
std::vector<uint8_t> Stream(const std::vector<std::vector<uint8_t>>& frames) {
  std::vector<uint8_t> out;
  for (const auto& f : frames) out.insert(out.end(), f.begin(), f.end());
  return out;
}

std::vector<uint8_t> Bytes(size_t n, uint8_t seed) {
  std::vector<uint8_t> b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(seed + i * 7);
  return b;
}

TEST(FrameReader, SplitsAStreamIntoItsFramesWithFewReads) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  const FetchPayload f{3, 4, 5, 0};
  std::vector<std::vector<uint8_t>> frames;
  std::vector<std::vector<uint8_t>> payloads;
  for (int i = 0; i < 5; ++i) {
    frames.push_back(MakeFrame(FrameType::kFetch, 100 + i, &f, sizeof(f)));
    payloads.emplace_back(reinterpret_cast<const uint8_t*>(&f), reinterpret_cast<const uint8_t*>(&f) + sizeof(f));
  }
  // Payloads around the reader's buffer (256 bytes here): inside it,
  // across its end, larger than it, and empty.
  for (size_t n : {100u, 200u, 1000u, 0u, 255u}) {
    payloads.push_back(Bytes(n, static_cast<uint8_t>(n)));
    frames.push_back(MakeFrame(FrameType::kFetchResp, 200 + n, payloads.back().data(), n));
  }
  const auto all = Stream(frames);
  ASSERT_TRUE(WriteFull(a.get(), all.data(), all.size()).ok());
  a.Reset();  // then a clean end of stream
  FrameReader reader(b.get(), 256);
  for (size_t i = 0; i < frames.size(); ++i) {
    FrameHeader h;
    std::vector<uint8_t> payload;
    ASSERT_TRUE(reader.Next(&h, &payload).ok()) << "frame " << i;
    FrameHeader want;
    std::memcpy(&want, frames[i].data(), sizeof(want));
    EXPECT_EQ(h.id, want.id) << "frame " << i;
    EXPECT_EQ(h.type, want.type) << "frame " << i;
    EXPECT_EQ(payload, payloads[i]) << "frame " << i;
    // The five FETCHes came with one read: while one is returned, the next
    // is already in.
    if (i < 4) {
      EXPECT_GT(reader.buffered(), 0u) << "frame " << i;
    }
  }
  FrameHeader h;
  std::vector<uint8_t> payload;
  EXPECT_EQ(reader.Next(&h, &payload).code(), absl::StatusCode::kOutOfRange);
}

TEST(FrameReader, EndsOfTheStreamInsideAFrameAreDataLoss) {
  const FetchPayload f{3, 4, 5, 0};
  const auto frame = MakeFrame(FrameType::kFetch, 1, &f, sizeof(f));
  for (size_t cut : {size_t{1}, sizeof(FrameHeader) - 1, sizeof(FrameHeader), frame.size() - 1}) {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    UniqueFd a(sv[0]), b(sv[1]);
    ASSERT_TRUE(WriteFull(a.get(), frame.data(), frame.size()).ok());
    ASSERT_TRUE(WriteFull(a.get(), frame.data(), cut).ok());
    a.Reset();
    FrameReader reader(b.get(), 64);
    FrameHeader h;
    std::vector<uint8_t> payload;
    ASSERT_TRUE(reader.Next(&h, &payload).ok());
    EXPECT_EQ(reader.Next(&h, &payload).code(), absl::StatusCode::kDataLoss) << "cut after " << cut;
  }
}

TEST(FrameReader, RefusesABadHeaderAndAPayloadOverItsLimit) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  const auto big = Bytes(100, 1);
  const auto frame = MakeFrame(FrameType::kHello, 1, big.data(), big.size());
  ASSERT_TRUE(WriteFull(a.get(), frame.data(), frame.size()).ok());
  FrameReader reader(b.get());
  FrameHeader h;
  std::vector<uint8_t> payload;
  EXPECT_EQ(reader.Next(&h, &payload, /*max_payload=*/64).code(), absl::StatusCode::kDataLoss);
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd c(sv[0]), d(sv[1]);
  FrameHeader bad = Good();
  bad.magic = 0;
  ASSERT_TRUE(WriteFull(c.get(), &bad, sizeof(bad)).ok());
  FrameReader reader2(d.get());
  EXPECT_EQ(reader2.Next(&h, &payload).code(), absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace svm::transport
