// Conversions between libsvm's public result types (svm/types.h) and the
// control API's generated messages. Private to libsvm and svmctl (whose
// --json output is the messages' JSON): never installed, so the public
// headers name no generated type.
#ifndef SVM_CLIENT_PROTO_CONVERT_H_
#define SVM_CLIENT_PROTO_CONVERT_H_

#include "svm/types.h"
#include "svm/v1/control.pb.h"

namespace svm::internal {

ExportInfo FromProto(const v1::ExportInfo& m);
ImportInfo FromProto(const v1::ImportInfo& m);
Invalidation FromProto(const v1::Invalidation& m);
SyncResult FromProto(const v1::SyncResponse& m);
DaemonStatus FromProto(const v1::StatusResponse& m);

// The inverse of FromProto: ToProto(FromProto(m)) equals m field by field.
v1::ExportInfo ToProto(const ExportInfo& x);
v1::ImportInfo ToProto(const ImportInfo& x);
v1::Invalidation ToProto(const Invalidation& x);
v1::SyncResponse ToProto(const SyncResult& x);
v1::StatusResponse ToProto(const DaemonStatus& x);

}  // namespace svm::internal

#endif  // SVM_CLIENT_PROTO_CONVERT_H_
