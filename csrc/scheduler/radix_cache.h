// Prefix cache: a radix tree whose nodes are full KV pages, keyed by the page's tokens.
//
// A node is one page; its path from the root spells the token prefix whose K/V the path's
// pages hold, so a match of k pages means positions [0, k * page_size) need no compute.
// Only full pages enter the tree. A page enters as soon as the batch that writes it is
// scheduled, tagged with that batch's uid (its writer), and is written once that batch is
// completed. Within one batch every layer stores the K/V of all the batch's tokens before
// any of its attention reads, so a page may be read by the batch that writes it and by
// any batch scheduled after that one completed, never by another batch: match() takes
// the batch being built and stops at a page some other, uncompleted batch writes.
//
// References come from the PageAllocator: a tree page with references is in use by
// running requests and is never evicted; one without is evictable, least recently used
// leaf first. References always cover a whole root path (a request holds everything it
// matched), so every unreferenced page can eventually be reached by leaf eviction.
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "page_allocator.h"

namespace tokenspeed {

class RadixCache {
 public:
  // A page's key is its page_size tokens, or with key_width 2 its tokens followed by
  // one more id per position (the engine's routing ids, see Scheduler::add): two pages
  // match only when every token and every such id agree. `tokens` arguments below then
  // hold key_width * page_size ints per page.
  RadixCache(PageAllocator& allocator, int32_t page_size, int32_t key_width = 1);

  // Appends the pages of the longest cached prefix of tokens (at most max_pages full
  // pages; tokens must hold max_pages * page_size ids) that a batch with uid `batch` may
  // read: written, or written by `batch` itself. Returns true when the prefix went on
  // into a page another uncompleted batch writes (it would be readable once that batch
  // is completed). Changes nothing.
  bool match(const int32_t* tokens, int32_t max_pages, uint64_t batch,
             std::vector<int32_t>& out) const;

  bool contains(int32_t page) const { return in_tree_[page] != 0; }
  // A running request starts / stops using a tree page. Released to no reference, the
  // page stays cached and becomes evictable.
  void acquire(int32_t page);
  void release(int32_t page);

  // Adds n full pages (pages[i] holds tokens[i * page_size, (i + 1) * page_size)) below
  // the path they extend. The caller holds a reference on each page. Blocks already
  // cached keep their existing page, so the caller's copy is not taken into the tree
  // (contains() says which were). Returns the number of pages taken.
  // The pages are written.
  int32_t insert(const int32_t* tokens, const int32_t* pages, int32_t n);
  // Adds n full pages written by the uncompleted batch `batch` as a chain below parent
  // (a cached page, or kNoParent for the root), stopping at the first block the tree
  // already holds there (another copy of it, or a hash collision). The caller holds a
  // reference on each page. Returns the number linked.
  int32_t extend(int32_t parent, const int32_t* tokens, const int32_t* pages, int32_t n,
                 uint64_t batch);
  // The batch `batch` is completed: the page is written, if it is still the copy that
  // batch wrote (not evicted or flushed meanwhile).
  void mark_written(int32_t page, uint64_t batch);
  // The uncompleted batch writing a cached page; 0 once written.
  uint64_t writer(int32_t page) const { return writer_[page]; }

  // Frees up to n unreferenced pages, least recently used leaf first; returns how many.
  int32_t evict(int32_t n);
  // Empties the tree. Unreferenced pages are freed (returned count); referenced ones
  // leave the tree and stay with their requests, to be freed when those release them.
  int32_t flush();

  int32_t num_pages() const { return num_nodes_; }
  int32_t num_unreferenced() const { return num_unreferenced_; }
  // The key of a cached page (its tokens first).
  const int32_t* page_tokens(int32_t page) const { return &tokens_[int64_t(page) * block_len_]; }

  // Empty when every structural invariant holds, else the first violation found.
  std::string find_violation() const;

  static constexpr int32_t kNoParent = -1;

 private:
  static constexpr int32_t kRoot = kNoParent;
  struct ChildKey {
    int32_t parent;
    uint64_t hash;
    bool operator==(const ChildKey& o) const { return parent == o.parent && hash == o.hash; }
  };
  struct ChildKeyHash {
    size_t operator()(const ChildKey& k) const {
      return static_cast<size_t>(k.hash ^ (uint64_t(uint32_t(k.parent)) * 0x9E3779B97F4A7C15ull));
    }
  };

  uint64_t hash_block(const int32_t* block) const;
  bool same_tokens(int32_t page, const int32_t* block) const;
  bool is_evictable(int32_t page) const;
  void link(int32_t page, int32_t parent, uint64_t hash, const int32_t* block, uint64_t writer);
  void unlink(int32_t page);

  PageAllocator& allocator_;
  const int32_t page_size_;
  const int32_t block_len_;  // ints per page key: page_size * key_width
  // Per page, meaningful while in_tree_:
  std::vector<uint8_t> in_tree_;
  std::vector<int32_t> parent_;
  std::vector<int32_t> num_children_;
  std::vector<uint64_t> hash_;
  std::vector<uint64_t> last_use_;
  std::vector<uint64_t> writer_;  // batch uid still writing the page, 0 once written
  std::vector<int32_t> tokens_;  // [num_pages * page_size]
  // A block hash may collide; matches compare the stored tokens, so a collision only
  // leaves a block uncached.
  std::unordered_map<ChildKey, int32_t, ChildKeyHash> children_;
  std::set<std::pair<uint64_t, int32_t>> evictable_;  // (last_use, page) of unreferenced leaves
  uint64_t clock_ = 0;
  int32_t num_nodes_ = 0;
  int32_t num_unreferenced_ = 0;
};

}  // namespace tokenspeed
