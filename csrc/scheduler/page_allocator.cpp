#include "page_allocator.h"

#include <cassert>
#include <cstddef>

namespace tokenspeed {

PageAllocator::PageAllocator(int32_t num_pages)
    : free_bits_((static_cast<std::size_t>(num_pages) + 63) / 64, ~uint64_t{0}),
      refcount_(num_pages, 0),
      num_free_(num_pages) {
  if (num_pages % 64 != 0) free_bits_.back() = (uint64_t{1} << (num_pages % 64)) - 1;
}

int32_t PageAllocator::next_free(int32_t from) const {
  assert(num_free_ > 0);
  const std::size_t words = free_bits_.size();
  std::size_t w = static_cast<std::size_t>(from) / 64;
  uint64_t bits = free_bits_[w] & (~uint64_t{0} << (from % 64));
  // at most one lap: the word `from` lies in is revisited whole at the end
  for (std::size_t seen = 0; bits == 0 && seen <= words; ++seen) {
    w = w + 1 == words ? 0 : w + 1;
    bits = free_bits_[w];
  }
  assert(bits != 0);
  return static_cast<int32_t>(w * 64 + __builtin_ctzll(bits));
}

void PageAllocator::allocate(int32_t n, std::vector<int32_t>& out) {
  assert(n >= 0 && can_allocate(n));
  out.reserve(out.size() + n);  // the only step that can throw, before any change
  int32_t at = cursor_;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t page = next_free(at);
    assert(refcount_[page] == 0);
    free_bits_[page / 64] &= ~(uint64_t{1} << (page % 64));
    refcount_[page] = 1;
    out.push_back(page);
    at = page + 1 == num_pages() ? 0 : page + 1;
  }
  num_free_ -= n;
  num_referenced_ += n;
  cursor_ = at;
}

void PageAllocator::retain(int32_t page) {
  assert(page >= 0 && page < num_pages() && !is_free(page));
  if (refcount_[page]++ == 0) ++num_referenced_;
}

bool PageAllocator::release(int32_t page) {
  assert(page >= 0 && page < num_pages() && !is_free(page));
  assert(refcount_[page] > 0 && "page released more often than retained");
  if (--refcount_[page] != 0) return false;
  --num_referenced_;
  return true;
}

void PageAllocator::free(int32_t page) {
  assert(page >= 0 && page < num_pages());
  assert(!is_free(page) && "double free of a page");
  assert(refcount_[page] == 0 && "freeing a page that is still referenced");
  free_bits_[page / 64] |= uint64_t{1} << (page % 64);
  ++num_free_;
}

}  // namespace tokenspeed
