// LineVector (common/cache_line.h): every block starts on a cache line and no two blocks share
// one, whatever the element type and count, vector<bool> included; the vectors behave as
// std::vector otherwise; line_padded rounds counts up to whole lines.
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "common/cache_line.h"

using imgtx_test::check;

namespace {

uintptr_t line_of(const void* p) { return reinterpret_cast<uintptr_t>(p) / imgtx::kCacheLine; }

template <class T>
void test_blocks_own_their_lines(const char* type) {
  // Small vectors allocated in a row, as a caller allocates its workers' scratch.
  std::vector<imgtx::LineVector<T>> vs;
  for (size_t n = 1; n <= 40; ++n) vs.emplace_back(n, T(1));
  bool aligned = true, apart = true, values = true;
  for (size_t i = 0; i < vs.size(); ++i) {
    const T* first = vs[i].data();
    const T* last = first + vs[i].size() - 1;
    aligned &= reinterpret_cast<uintptr_t>(first) % imgtx::kCacheLine == 0;
    for (size_t j = 0; j < vs.size(); ++j) {
      if (i == j) continue;
      const T* other = vs[j].data();
      const T* other_last = other + vs[j].size() - 1;
      apart &= line_of(last) < line_of(other) || line_of(other_last) < line_of(first);
    }
    for (const T& x : vs[i]) values &= x == T(1);
  }
  check(aligned, std::string("LineVector<") + type + "> blocks start on a cache line");
  check(apart, std::string("LineVector<") + type + "> blocks share no cache line");
  check(values, std::string("LineVector<") + type + "> holds its values");
}

void test_bool_vector() {
  imgtx::LineVector<bool> bits(1000, false);
  for (size_t i = 0; i < bits.size(); i += 3) bits[i] = true;
  size_t set = 0;
  for (bool b : bits) set += b;
  bits.resize(2000, true);  // grows through the allocator's rebind to the bit word type
  for (size_t i = 1000; i < bits.size(); ++i) set += bits[i];
  check(set == 334 + 1000, "LineVector<bool> stores and grows its bits");
}

// A worker's scratch struct is declared alignas(kCacheLine) and kept in a LineVector: every
// element on a line boundary, and a vector that grows and shrinks many times (each block freed
// through the pointer the allocator records before it) keeps its contents.
void test_aligned_structs() {
  struct alignas(imgtx::kCacheLine) Worker {
    float m = 0.0f;
    imgtx::LineVector<float> row;
  };
  imgtx::LineVector<Worker> ws;
  bool aligned = true, kept = true;
  for (int round = 0; round < 50; ++round) {
    ws.resize(size_t(1 + round % 7));
    for (size_t i = 0; i < ws.size(); ++i) {
      aligned &= reinterpret_cast<uintptr_t>(&ws[i]) % imgtx::kCacheLine == 0;
      ws[i].m = float(i);
      ws[i].row.assign(size_t(1 + (round * 5 + i) % 37), float(round));
    }
    for (size_t i = 0; i < ws.size(); ++i)
      kept &= ws[i].m == float(i) && ws[i].row.back() == float(round);
  }
  check(aligned, "LineVector of alignas(kCacheLine) structs: every element on a line");
  check(kept, "LineVector of structs holding LineVectors keeps its values through resizes");
}

void test_line_padded() {
  using imgtx::line_padded;
  check(line_padded<float>(1) == 16 && line_padded<float>(16) == 16 &&
            line_padded<float>(17) == 32 && line_padded<double>(9) == 16 &&
            line_padded<double>(0) == 0,
        "line_padded rounds an element count up to whole cache lines");
}

}  // namespace

void run_cache_line_tests() {
  test_line_padded();
  test_blocks_own_their_lines<float>("float");
  test_blocks_own_their_lines<double>("double");
  test_blocks_own_their_lines<int64_t>("int64_t");
  test_blocks_own_their_lines<char>("char");
  test_bool_vector();
  test_aligned_structs();
}
