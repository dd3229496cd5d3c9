// libFuzzer target: the data connection's stream decoders (ReadFrame, and
// FrameReader against it), frame header validation, error replies and the
// merging of queued INVAL frames, on bytes as a peer would send them.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <unistd.h>

#include "daemon/transport/frame.h"

using svm::transport::FrameHeader;
using svm::transport::InvalPayload;

// The stream decoder: every frame ReadFrame accepts from these bytes is
// whole and within its limit; it ends on an error, never a hang or a crash.
static void DecodeStream(const uint8_t* data, size_t size) {
  int p[2];
  if (size > 60000 || ::pipe(p) != 0) return;
  if (::write(p[1], data, size) != static_cast<ssize_t>(size)) std::abort();
  ::close(p[1]);
  FrameHeader h;
  std::vector<uint8_t> payload;
  while (svm::transport::ReadFrame(p[0], &h, &payload, 8192).ok()) {
    if (payload.size() != h.payload_len || h.payload_len > 8192) std::abort();
  }
  ::close(p[0]);
}

// The buffered decoder (FrameReader, the tcp exporter's) returns exactly
// the frames ReadFrame returns from the same bytes, and ends with the same
// status code, whatever its buffer's size (the first byte picks one).
static void DecodeBuffered(const uint8_t* data, size_t size) {
  if (size == 0 || size > 60000) return;
  const size_t capacity = 32 + data[0] * 4;
  auto decode = [&](bool buffered, std::vector<std::vector<uint8_t>>* frames) {
    int p[2];
    if (::pipe(p) != 0) std::abort();
    if (::write(p[1], data + 1, size - 1) != static_cast<ssize_t>(size - 1)) std::abort();
    ::close(p[1]);
    svm::transport::FrameReader reader(p[0], capacity);
    FrameHeader h;
    std::vector<uint8_t> payload;
    absl::Status st;
    for (;;) {
      st = buffered ? reader.Next(&h, &payload, 8192) : svm::transport::ReadFrame(p[0], &h, &payload, 8192);
      if (!st.ok()) break;
      std::vector<uint8_t> f(reinterpret_cast<const uint8_t*>(&h), reinterpret_cast<const uint8_t*>(&h) + sizeof(h));
      f.insert(f.end(), payload.begin(), payload.end());
      frames->push_back(std::move(f));
    }
    ::close(p[0]);
    return st.code();
  };
  std::vector<std::vector<uint8_t>> plain, buffered;
  if (decode(false, &plain) != decode(true, &buffered) || plain != buffered) std::abort();
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  DecodeStream(data, size);
  DecodeBuffered(data, size);
  if (size < sizeof(FrameHeader)) return 0;
  FrameHeader h;
  std::memcpy(&h, data, sizeof(h));
  (void)svm::transport::ValidateHeader(h);
  // A queued frame (the rest of the input) absorbing an INVAL made of its
  // own tail: never grows the frame, never reads past it.
  std::vector<uint8_t> queued(data, data + size);
  InvalPayload next{};
  if (size >= sizeof(FrameHeader) + sizeof(InvalPayload)) {
    std::memcpy(&next, data + size - sizeof(next), sizeof(next));
  }
  const size_t before = queued.size();
  (void)svm::transport::MergeInvalFrame(queued, next);
  if (queued.size() != before) std::abort();
  // A FETCH_RESP error reply as a peer sends it: fixed part, then message.
  if (size >= sizeof(FrameHeader) + sizeof(svm::transport::FetchRespPayload)) {
    svm::transport::FetchRespPayload r;
    std::memcpy(&r, data + sizeof(FrameHeader), sizeof(r));
    const size_t tail = size - sizeof(FrameHeader) - sizeof(r);
    (void)svm::transport::FetchErrorStatus(
        r, absl::string_view(reinterpret_cast<const char*>(data) + sizeof(FrameHeader) + sizeof(r), tail));
    (void)svm::transport::FromInvalPayload(next);
  }
  return 0;
}
