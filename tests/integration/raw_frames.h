// A test's own end of a tcp data connection, speaking svm's frames
// (daemon/transport/frame.h) byte by byte, as a hostile or minimal peer
// would: tests that drive the exporter's data port without an importing
// svmd (tls_test, limits_test) derive their connection from it.
#ifndef SVM_TESTS_INTEGRATION_RAW_FRAMES_H_
#define SVM_TESTS_INTEGRATION_RAW_FRAMES_H_

#include <sys/socket.h>

#include <cstring>
#include <string>

#include "common/fd.h"
#include "daemon/transport/frame.h"

namespace svm::testing {

class RawFrames {
 protected:
  // One frame: header, then payload; false when the socket is gone.
  bool Send(transport::FrameType type, uint64_t id, const void* payload, size_t len) {
    transport::FrameHeader h;
    h.type = static_cast<uint8_t>(type);
    h.payload_len = static_cast<uint32_t>(len);
    h.id = id;
    std::string frame(reinterpret_cast<const char*>(&h), sizeof(h));
    frame.append(static_cast<const char*>(payload), len);
    return ::send(fd_.get(), frame.data(), frame.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(frame.size());
  }
  // The next frame; false on a closed socket, a timeout (SO_RCVTIMEO) or a
  // header no svmd would send.
  bool Receive(transport::FrameHeader* h, std::string* payload) {
    if (!ReadAll(h, sizeof(*h)) || h->magic != transport::kFrameMagic ||
        h->payload_len > transport::kMaxPayload) {
      return false;
    }
    payload->resize(h->payload_len);
    return ReadAll(payload->data(), payload->size());
  }

  // HELLO with the session token; true when the exporter answered HELLO.
  bool Hello(const std::string& token) {
    transport::FrameHeader h;
    std::string payload;
    return Send(transport::FrameType::kHello, 0, token.data(), token.size()) && Receive(&h, &payload) &&
           h.type == static_cast<uint8_t>(transport::FrameType::kHello);
  }
  // The next FETCH answer, skipping the exporter's INVALs (which come in
  // between): its header in *h, its status in *p, the whole payload (status
  // first) in *payload. False on a closed socket or any other frame.
  bool NextFetchResp(transport::FrameHeader* h, transport::FetchRespPayload* p, std::string* payload) {
    do {
      if (!Receive(h, payload)) return false;
    } while (h->type == static_cast<uint8_t>(transport::FrameType::kInval));
    if (h->type != static_cast<uint8_t>(transport::FrameType::kFetchResp) || payload->size() < sizeof(*p)) {
      return false;
    }
    std::memcpy(p, payload->data(), sizeof(*p));
    return true;
  }

  UniqueFd fd_;

 private:
  bool ReadAll(void* dst, size_t len) {
    auto* p = static_cast<char*>(dst);
    while (len > 0) {
      const ssize_t n = ::recv(fd_.get(), p, len, 0);
      if (n <= 0) return false;
      p += n;
      len -= static_cast<size_t>(n);
    }
    return true;
  }
};

}  // namespace svm::testing

#endif  // SVM_TESTS_INTEGRATION_RAW_FRAMES_H_
