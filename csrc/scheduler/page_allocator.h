// Fixed pool of KV-cache pages (page p holds slots [p * page_size, (p + 1) * page_size)).
//
// The allocator only counts references: a page is free, or held by one or more
// references. What a page with no reference left becomes (free again, or an evictable
// prefix-cache page) is decided by the caller, so the allocator never frees on its own.
//
// Pages are handed out next fit: ascending from where the last allocation ended, wrapping
// at the end of the pool. A request's pages then lie consecutively in the cache wherever
// the pool ahead is free (a fresh pool, or one drained in the order it was filled), and
// the attention kernel loads a tile of consecutive small pages as one TMA box. (A stack
// of freed pages handed a request back its predecessors' pages in reverse.)
#pragma once

#include <cstdint>
#include <vector>

namespace tokenspeed {

class PageAllocator {
 public:
  explicit PageAllocator(int32_t num_pages);

  int32_t num_pages() const { return static_cast<int32_t>(refcount_.size()); }
  int32_t num_free() const { return num_free_; }
  int32_t num_referenced() const { return num_referenced_; }
  bool can_allocate(int32_t n) const { return n <= num_free(); }

  // Appends n pages to out, each with one reference. Requires can_allocate(n).
  void allocate(int32_t n, std::vector<int32_t>& out);
  // One more reference on a page that is not free (it may have none: a cached page).
  void retain(int32_t page);
  // One reference less; true when none is left.
  bool release(int32_t page);
  // Back to the pool; the page must not be free already and must have no reference.
  void free(int32_t page);

  int32_t refcount(int32_t page) const { return refcount_[page]; }
  bool is_free(int32_t page) const { return (free_bits_[page / 64] >> (page % 64)) & 1u; }

 private:
  // The first free page at or after `from`, wrapping; requires a free page.
  int32_t next_free(int32_t from) const;

  std::vector<uint64_t> free_bits_;  // bit p % 64 of word p / 64: page p is free
  std::vector<int32_t> refcount_;
  int32_t num_free_ = 0;
  int32_t num_referenced_ = 0;  // pages with refcount > 0
  int32_t cursor_ = 0;          // where the next allocation starts looking
};

}  // namespace tokenspeed
