// How a transport puts its endpoint message (proto/svm/v1/transport.proto)
// into the opaque bytes of SessionOffer::endpoint and BeginConnect(): packed
// in a google.protobuf.Any, so that bytes of another transport are refused
// by type instead of being misread. For the transports' .cc files only (the
// seam itself knows nothing of protobuf).
#ifndef SVM_DAEMON_TRANSPORT_ENDPOINT_CODEC_H_
#define SVM_DAEMON_TRANSPORT_ENDPOINT_CODEC_H_

#include <string>
#include <string_view>

#include "google/protobuf/any.pb.h"
#include "google/protobuf/message.h"

namespace svm::transport {

inline std::string PackEndpoint(const google::protobuf::Message& m) {
  google::protobuf::Any any;
  any.PackFrom(m);
  return any.SerializeAsString();
}

// False (m unspecified) when bytes are not an Any holding m's type.
inline bool UnpackEndpoint(std::string_view bytes, google::protobuf::Message* m) {
  google::protobuf::Any any;
  return any.ParseFromArray(bytes.data(), static_cast<int>(bytes.size())) && any.UnpackTo(m);
}

}  // namespace svm::transport

#endif  // SVM_DAEMON_TRANSPORT_ENDPOINT_CODEC_H_
