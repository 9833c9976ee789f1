#include "worker/kv_cache.h"

#include <set>

#include "gtest/gtest.h"
#include "gmock/gmock.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;

TEST(PageAllocatorTest, AllocatesDistinctPagesAndAccounts) {
  PageAllocator a(10);
  auto p1 = a.Allocate(4);
  ASSERT_TRUE(p1.ok());
  auto p2 = a.Allocate(6);
  ASSERT_TRUE(p2.ok());
  std::set<int32_t> all(p1->begin(), p1->end());
  all.insert(p2->begin(), p2->end());
  EXPECT_EQ(all.size(), 10u);
  EXPECT_EQ(*all.begin(), 0);
  EXPECT_EQ(*all.rbegin(), 9);
  EXPECT_EQ(a.num_free(), 0);
  EXPECT_EQ(a.num_used(), 10);
  ASSERT_TRUE(a.Free(*p1).ok());
  EXPECT_EQ(a.num_free(), 4);
  ASSERT_TRUE(a.Free(*p2).ok());
  EXPECT_EQ(a.num_used(), 0);
}

TEST(PageAllocatorTest, ExhaustionIsAllOrNothing) {
  PageAllocator a(5);
  ASSERT_TRUE(a.Allocate(3).ok());
  auto r = a.Allocate(3);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(r.status().message(), HasSubstr("requested 3 pages, 2 of 5 free"));
  EXPECT_EQ(a.num_free(), 2);
  EXPECT_TRUE(a.Allocate(2).ok());
  EXPECT_TRUE(a.Allocate(0).ok());
}

TEST(PageAllocatorTest, RejectsDoubleFreeAndOutOfRangeWithoutChangingState) {
  PageAllocator a(4);
  auto p = a.Allocate(2);
  ASSERT_TRUE(p.ok());
  std::vector<int32_t> twice = {(*p)[0], (*p)[0]};
  EXPECT_EQ(a.Free(twice).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(a.num_used(), 2);
  std::vector<int32_t> bad = {(*p)[1], 7};
  EXPECT_THAT(a.Free(bad).message(), HasSubstr("out of range"));
  EXPECT_EQ(a.num_used(), 2);
  ASSERT_TRUE(a.Free(*p).ok());
  EXPECT_THAT(a.Free(*p).message(), HasSubstr("not allocated"));
}

TEST(KvCacheTest, PagesAndHeadsDoNotOverlap) {
  KvCache c(KvCacheShape{2, 3, 4, 16, 5});
  EXPECT_EQ(c.bytes(), 2u * 2 * 5 * 3 * 16 * 4 * sizeof(float));
  std::set<const float*> starts;
  for (int l = 0; l < 2; ++l)
    for (int p = 0; p < 5; ++p)
      for (int h = 0; h < 3; ++h) {
        starts.insert(c.K(l, p, h));
        starts.insert(c.V(l, p, h));
      }
  EXPECT_EQ(starts.size(), 2u * 5 * 3 * 2);
  c.K(1, 4, 2)[16 * 4 - 1] = 7.0f;  // last element of the last block is addressable
  EXPECT_EQ(c.K(1, 4, 2)[63], 7.0f);
  EXPECT_EQ(PagesFor(0, 16), 0);
  EXPECT_EQ(PagesFor(16, 16), 1);
  EXPECT_EQ(PagesFor(17, 16), 2);
}

}  // namespace
}  // namespace prehoc
