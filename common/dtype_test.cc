#include "common/dtype.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "gtest/gtest.h"

namespace prehoc {
namespace {

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

uint32_t ToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Independent reference for IEEE half -> float using ldexp.
float ReferenceF16(uint16_t h) {
  const bool negative = (h & 0x8000u) != 0;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    v = mant == 0 ? std::numeric_limits<float>::infinity()
                  : std::numeric_limits<float>::quiet_NaN();
  } else {
    v = std::ldexp(static_cast<float>(1024 + mant), exp - 25);
  }
  return negative ? -v : v;
}

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(DTypeSize(DType::kF32), 4);
  EXPECT_EQ(DTypeSize(DType::kF16), 2);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2);
  EXPECT_EQ(DTypeSize(DType::kI32), 4);
  EXPECT_EQ(DTypeSize(DType::kI64), 8);
  EXPECT_EQ(DTypeName(DType::kF32), "F32");
  EXPECT_EQ(DTypeName(DType::kF16), "F16");
  EXPECT_EQ(DTypeName(DType::kBF16), "BF16");
  EXPECT_EQ(DTypeName(DType::kI32), "I32");
  EXPECT_EQ(DTypeName(DType::kI64), "I64");
}

TEST(DTypeTest, Bf16ToFloatSpecialValues) {
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(Bf16ToFloat(0xbf80), -1.0f);
  EXPECT_EQ(Bf16ToFloat(0x4049), FromBits(0x40490000u));  // ~3.140625
  EXPECT_EQ(Bf16ToFloat(0x4049), 3.140625f);
  EXPECT_EQ(Bf16ToFloat(0x0000), 0.0f);
  EXPECT_FALSE(std::signbit(Bf16ToFloat(0x0000)));
  EXPECT_TRUE(std::signbit(Bf16ToFloat(0x8000)));
  EXPECT_EQ(Bf16ToFloat(0x8000), 0.0f);
  // Smallest subnormal: 2^-133. Largest subnormal: (127/128) * 2^-126.
  EXPECT_EQ(Bf16ToFloat(0x0001), std::ldexp(1.0f, -133));
  EXPECT_EQ(Bf16ToFloat(0x007f), std::ldexp(127.0f, -133));
  EXPECT_EQ(Bf16ToFloat(0x8001), -std::ldexp(1.0f, -133));
  EXPECT_EQ(Bf16ToFloat(0x0080), std::numeric_limits<float>::min());
  EXPECT_EQ(Bf16ToFloat(0x7f80), std::numeric_limits<float>::infinity());
  EXPECT_EQ(Bf16ToFloat(0xff80), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(Bf16ToFloat(0x7fc0)));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(0x7f81)));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(0xffc0)));
  // Largest finite bf16: (2 - 2^-7) * 2^127.
  EXPECT_EQ(Bf16ToFloat(0x7f7f), std::ldexp(255.0f, 120));
}

TEST(DTypeTest, FloatToBf16ExactValues) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(-2.0f), 0xc000);
  EXPECT_EQ(FloatToBf16(0.0f), 0x0000);
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(FloatToBf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(FloatToBf16(std::ldexp(1.0f, -133)), 0x0001);
}

TEST(DTypeTest, FloatToBf16RoundsToNearestEven) {
  // Exactly halfway, lower neighbour even: round down.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808000u)), 0x3f80);
  // Exactly halfway, lower neighbour odd: round up to even.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f818000u)), 0x3f82);
  // Just above / below halfway.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(FloatToBf16(FromBits(0x3f807fffu)), 0x3f80);
  EXPECT_EQ(FloatToBf16(FromBits(0x3f81ffffu)), 0x3f82);
  // Negative values round symmetrically.
  EXPECT_EQ(FloatToBf16(FromBits(0xbf808000u)), 0xbf80);
  EXPECT_EQ(FloatToBf16(FromBits(0xbf818000u)), 0xbf82);
  // Carry into the exponent: 1.99999 rounds to 2.
  EXPECT_EQ(FloatToBf16(FromBits(0x3fffffffu)), 0x4000);
  // Subnormals round the same way.
  EXPECT_EQ(FloatToBf16(FromBits(0x00008000u)), 0x0000);
  EXPECT_EQ(FloatToBf16(FromBits(0x00018000u)), 0x0002);
  EXPECT_EQ(FloatToBf16(FromBits(0x00008001u)), 0x0001);
  // The largest float overflows to infinity; the largest value that rounds
  // down stays finite.
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(FloatToBf16(FromBits(0x7f7f7fffu)), 0x7f7f);
}

TEST(DTypeTest, FloatToBf16KeepsNan) {
  // Quiet NaN and NaNs whose payload lives only in the low 16 bits (a naive
  // truncation would turn 0x7f800001 into infinity).
  for (uint32_t bits : {0x7fc00000u, 0x7f800001u, 0x7f80ffffu, 0xff800001u,
                        0x7fffffffu, 0xffc00000u}) {
    uint16_t b = FloatToBf16(FromBits(bits));
    EXPECT_TRUE(std::isnan(Bf16ToFloat(b))) << std::hex << bits;
    EXPECT_EQ(b & 0x8000u, (bits >> 16) & 0x8000u) << std::hex << bits;
  }
}

TEST(DTypeTest, Bf16RoundTripsEveryValue) {
  for (uint32_t b = 0; b <= 0xffffu; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const float f = Bf16ToFloat(bits);
    EXPECT_EQ(ToBits(f), b << 16);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(f))));
    } else {
      ASSERT_EQ(FloatToBf16(f), bits) << std::hex << b;
    }
  }
}

TEST(DTypeTest, F16ToFloatSpecialValues) {
  EXPECT_EQ(F16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(F16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(F16ToFloat(0x3555), FromBits(0x3eaaa000u));  // ~1/3
  EXPECT_EQ(F16ToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(F16ToFloat(0xfbff), -65504.0f);
  EXPECT_EQ(F16ToFloat(0x0400), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_EQ(F16ToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(F16ToFloat(0x0200), std::ldexp(1.0f, -15));
  EXPECT_EQ(F16ToFloat(0x03ff), std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(F16ToFloat(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToFloat(0x0000), 0.0f);
  EXPECT_FALSE(std::signbit(F16ToFloat(0x0000)));
  EXPECT_TRUE(std::signbit(F16ToFloat(0x8000)));
  EXPECT_EQ(F16ToFloat(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(F16ToFloat(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(F16ToFloat(0x7e00)));
  EXPECT_TRUE(std::isnan(F16ToFloat(0x7c01)));
  EXPECT_TRUE(std::isnan(F16ToFloat(0xfe00)));
}

TEST(DTypeTest, F16ToFloatMatchesReferenceForEveryValue) {
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    const float got = F16ToFloat(bits);
    const float want = ReferenceF16(bits);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << h;
    } else {
      ASSERT_EQ(got, want) << std::hex << h;
      ASSERT_EQ(std::signbit(got), std::signbit(want)) << std::hex << h;
    }
  }
}

}  // namespace
}  // namespace prehoc
