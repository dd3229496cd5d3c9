// common/proc_parse: the /proc/PID/maps and /proc/PID/status parsers, on
// lines the kernel writes and on lines it never would.
#include "common/proc_parse.h"

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace svm::proc {
namespace {

TEST(ParseMapsLine, KernelLines) {
  auto m = ParseMapsLine("7f3c1a2b3000-7f3c1a2b5000 rw-s 00002000 00:01 1234       /memfd:svm (deleted)");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->start, 0x7f3c1a2b3000u);
  EXPECT_EQ(m->end, 0x7f3c1a2b5000u);
  EXPECT_EQ(m->perms, "rw-s");
  EXPECT_TRUE(m->shared());
  EXPECT_TRUE(m->readable());
  EXPECT_EQ(m->offset, 0x2000u);
  EXPECT_EQ(m->dev_major, 0u);
  EXPECT_EQ(m->dev_minor, 1u);
  EXPECT_EQ(m->inode, 1234u);
  EXPECT_EQ(m->path, "/memfd:svm (deleted)") << "spaces in a path are kept";

  auto anon = ParseMapsLine("55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0 ");
  ASSERT_TRUE(anon.ok()) << anon.status();
  EXPECT_EQ(anon->path, "");
  EXPECT_FALSE(anon->shared());
  auto dev = ParseMapsLine("7f0000000000-7f0000200000 r--s 00000000 fd:1a 99 /dev/dax0.0");
  ASSERT_TRUE(dev.ok()) << dev.status();
  EXPECT_EQ(dev->dev_major, 0xfdu);
  EXPECT_EQ(dev->dev_minor, 0x1au);
}

TEST(ParseMapsLine, MalformedLinesAreErrorsNotDefaults) {
  for (const char* bad : {
           "",
           "garbage",
           "1000 rw-p 0 00:00 0",                       // no dash
           "2000-1000 rw-p 00000000 00:00 0",           // end before start
           "1000-1000 rw-p 00000000 00:00 0",           // empty
           "1000-zz00 rw-p 00000000 00:00 0",           // not hex
           "1000-2000 rw-p 00000000 00:00",             // no inode
           "1000-2000 rwxps 00000000 00:00 0",          // 5 permission characters
           "1000-2000 rw-p 0000000g 00:00 0",           // offset not hex
           "1000-2000 rw-p 00000000 0000 0",            // device without colon
           "1000-2000 rw-p 00000000 00:00 -1",          // negative inode
           "10000000000000000-10000000000000001 rw-p 0 00:00 0",  // 17 hex digits
       }) {
    EXPECT_FALSE(ParseMapsLine(bad).ok()) << "'" << bad << "'";
  }
}

TEST(ParseStatus, FieldsAndMalformedValues) {
  auto st = ParseStatus(
      "Name:\tsvmd\nUid:\t1000\t1001\t1002\t1003\nGid:\t50\t51\t52\t53\n"
      "CapEff:\t0000000000080000\nVmPin:\t    2048 kB\n");
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(st->has_ids);
  EXPECT_EQ(st->uid[1], 1001u);
  EXPECT_EQ(st->gid[3], 53u);
  EXPECT_TRUE(st->has_cap_eff);
  EXPECT_EQ(st->cap_eff, 1ull << 19);
  EXPECT_EQ(st->vm_pin_bytes, 2048u * 1024);

  auto partial = ParseStatus("Name:\tx\nUid:\t1\t1\t1\t1\n");
  ASSERT_TRUE(partial.ok());
  EXPECT_FALSE(partial->has_ids) << "no Gid: line";
  EXPECT_FALSE(ParseStatus("Uid:\t1\t2\t3\n").ok()) << "three ids";
  EXPECT_FALSE(ParseStatus("Uid:\t1\t2\t3\t-4\nGid:\t0\t0\t0\t0\n").ok());
  EXPECT_FALSE(ParseStatus("CapEff:\tnothex\n").ok());
  EXPECT_FALSE(ParseStatus("VmPin:\t12 MB\n").ok());
}

TEST(ParseStatus, ThisProcess) {
  auto text = ReadSmallFile("/proc/self/status");
  ASSERT_TRUE(text.ok()) << text.status();
  auto st = ParseStatus(*text);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(st->has_ids);
  EXPECT_EQ(st->uid[0], getuid());
  EXPECT_EQ(st->gid[1], getegid());
  EXPECT_TRUE(st->has_cap_eff);
}

TEST(ParseMapsLine, EveryLineOfThisProcess) {
  auto text = ReadSmallFile("/proc/self/maps");
  ASSERT_TRUE(text.ok()) << text.status();
  size_t lines = 0, start = 0;
  while (start < text->size()) {
    size_t nl = text->find('\n', start);
    if (nl == std::string::npos) nl = text->size();
    const std::string line = text->substr(start, nl - start);
    EXPECT_TRUE(ParseMapsLine(line).ok()) << line;
    ++lines;
    start = nl + 1;
  }
  EXPECT_GT(lines, 5u);
  EXPECT_FALSE(ReadSmallFile("/proc/self/no-such-file").ok());
}

}  // namespace
}  // namespace svm::proc
