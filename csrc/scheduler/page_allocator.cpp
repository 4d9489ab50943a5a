#include "page_allocator.h"

#include <cassert>

namespace tokenspeed {

PageAllocator::PageAllocator(int32_t num_pages)
    : refcount_(num_pages, 0), is_free_(num_pages, 1) {
  free_list_.reserve(num_pages);
  for (int32_t p = num_pages - 1; p >= 0; --p) free_list_.push_back(p);  // hands out 0, 1, ...
}

void PageAllocator::allocate(int32_t n, std::vector<int32_t>& out) {
  assert(n >= 0 && can_allocate(n));
  for (int32_t i = 0; i < n; ++i) {
    const int32_t page = free_list_.back();
    free_list_.pop_back();
    assert(is_free_[page] && refcount_[page] == 0);
    is_free_[page] = 0;
    refcount_[page] = 1;
    out.push_back(page);
  }
  num_referenced_ += n;
}

void PageAllocator::retain(int32_t page) {
  assert(page >= 0 && page < num_pages() && !is_free_[page]);
  if (refcount_[page]++ == 0) ++num_referenced_;
}

bool PageAllocator::release(int32_t page) {
  assert(page >= 0 && page < num_pages() && !is_free_[page]);
  assert(refcount_[page] > 0 && "page released more often than retained");
  if (--refcount_[page] != 0) return false;
  --num_referenced_;
  return true;
}

void PageAllocator::free(int32_t page) {
  assert(page >= 0 && page < num_pages());
  assert(!is_free_[page] && "double free of a page");
  assert(refcount_[page] == 0 && "freeing a page that is still referenced");
  is_free_[page] = 1;
  free_list_.push_back(page);
}

}  // namespace tokenspeed
