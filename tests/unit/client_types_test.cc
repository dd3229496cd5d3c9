// libsvm's public result types (svm/types.h) against the control API's
// messages: every field of every message survives FromProto then ToProto
// (a field added to the proto but not to the public types fails here), and
// the invalidation kinds agree by value and by name.
#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>

#include <cctype>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/proto_convert.h"
#include "svm/types.h"

namespace svm {
namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;

// Sets every field of m, recursively, to a value that differs from the
// default and from the other fields (counter: the next value).
void FillEveryField(Message* m, uint64_t* counter) {
  const auto* d = m->GetDescriptor();
  const auto* r = m->GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    const int n = f->is_repeated() ? 2 : 1;
    for (int k = 0; k < n; ++k) {
      const uint64_t v = ++*counter;
      const std::string s = absl::StrCat(f->name(), "-", v);
      switch (f->cpp_type()) {
        case FieldDescriptor::CPPTYPE_STRING:
          f->is_repeated() ? r->AddString(m, f, s) : r->SetString(m, f, s);
          break;
        case FieldDescriptor::CPPTYPE_UINT64:
          f->is_repeated() ? r->AddUInt64(m, f, v) : r->SetUInt64(m, f, v);
          break;
        case FieldDescriptor::CPPTYPE_UINT32:
          f->is_repeated() ? r->AddUInt32(m, f, v) : r->SetUInt32(m, f, v);
          break;
        case FieldDescriptor::CPPTYPE_INT32:
          f->is_repeated() ? r->AddInt32(m, f, v) : r->SetInt32(m, f, v);
          break;
        case FieldDescriptor::CPPTYPE_INT64:
          f->is_repeated() ? r->AddInt64(m, f, v) : r->SetInt64(m, f, v);
          break;
        case FieldDescriptor::CPPTYPE_BOOL:
          ASSERT_FALSE(f->is_repeated()) << f->full_name();
          r->SetBool(m, f, true);
          break;
        case FieldDescriptor::CPPTYPE_ENUM: {
          const auto* e = f->enum_type();
          const int value = e->value(e->value_count() - 1)->number();
          f->is_repeated() ? r->AddEnumValue(m, f, value) : r->SetEnumValue(m, f, value);
          break;
        }
        case FieldDescriptor::CPPTYPE_MESSAGE:
          FillEveryField(f->is_repeated() ? r->AddMessage(m, f) : r->MutableMessage(m, f), counter);
          break;
        default:
          FAIL() << f->full_name() << ": a field type the test does not fill";
      }
    }
  }
}

template <typename M>
void ExpectRoundTrip() {
  M m;
  uint64_t counter = 0;
  FillEveryField(&m, &counter);
  if (::testing::Test::HasFatalFailure()) return;
  const M back = internal::ToProto(internal::FromProto(m));
  std::string diff;
  google::protobuf::util::MessageDifferencer differ;
  differ.ReportDifferencesToString(&diff);
  EXPECT_TRUE(differ.Compare(m, back)) << M::descriptor()->full_name() << " loses fields:\n" << diff;
  // And the defaults: an unset message stays unset (e.g. StatusResponse.rdma).
  const M empty_back = internal::ToProto(internal::FromProto(M()));
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(M(), empty_back))
      << M::descriptor()->full_name() << ": " << empty_back.ShortDebugString();
}

TEST(ClientTypes, ExportInfoCarriesEveryField) { ExpectRoundTrip<v1::ExportInfo>(); }
TEST(ClientTypes, ImportInfoCarriesEveryField) { ExpectRoundTrip<v1::ImportInfo>(); }
TEST(ClientTypes, InvalidationCarriesEveryField) { ExpectRoundTrip<v1::Invalidation>(); }
TEST(ClientTypes, SyncResultCarriesEveryField) { ExpectRoundTrip<v1::SyncResponse>(); }
TEST(ClientTypes, DaemonStatusCarriesEveryField) { ExpectRoundTrip<v1::StatusResponse>(); }

TEST(ClientTypes, DaemonStatusFields) {
  v1::StatusResponse m;
  m.set_uptime_ms(90500);
  m.mutable_rdma()->set_device("rxe0");
  (*m.mutable_counters())["reads"] = 7;
  const DaemonStatus s = internal::FromProto(m);
  EXPECT_EQ(s.uptime, absl::Milliseconds(90500));
  ASSERT_TRUE(s.rdma.has_value());
  EXPECT_EQ(s.rdma->device, "rxe0");
  EXPECT_EQ(s.counters.at("reads"), 7u);
  EXPECT_FALSE(internal::FromProto(v1::StatusResponse()).rdma.has_value());
}

// InvalidationKind has the wire enum's values; its names are the wire
// names without the prefix, in lower case (svmctl watch --verbose).
TEST(ClientTypes, InvalidationKindsMatchTheWireEnum) {
  const auto* e = v1::InvalidationKind_descriptor();
  for (int i = 0; i < e->value_count(); ++i) {
    std::string want = e->value(i)->name().substr(std::string("INVALIDATION_KIND_").size());
    for (char& c : want) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    const auto kind = static_cast<InvalidationKind>(e->value(i)->number());
    EXPECT_EQ(InvalidationKindName(kind), want) << e->value(i)->name();
    v1::Invalidation m;
    m.set_kind(static_cast<v1::InvalidationKind>(e->value(i)->number()));
    EXPECT_EQ(internal::FromProto(m).kind, kind);
  }
  EXPECT_EQ(InvalidationKindName(static_cast<InvalidationKind>(1000)), "unspecified");
}

}  // namespace
}  // namespace svm
