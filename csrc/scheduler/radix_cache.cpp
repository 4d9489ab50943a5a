#include "radix_cache.h"

#include <cassert>
#include <cstring>

namespace tokenspeed {

RadixCache::RadixCache(PageAllocator& allocator, int32_t page_size, int32_t key_width)
    : allocator_(allocator),
      page_size_(page_size),
      block_len_(page_size * key_width),
      in_tree_(allocator.num_pages(), 0),
      parent_(allocator.num_pages(), kRoot),
      num_children_(allocator.num_pages(), 0),
      hash_(allocator.num_pages(), 0),
      last_use_(allocator.num_pages(), 0),
      writer_(allocator.num_pages(), 0),
      tokens_(int64_t(allocator.num_pages()) * page_size * key_width, 0) {}

uint64_t RadixCache::hash_block(const int32_t* block) const {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a over 32-bit words, then a splitmix finish
  for (int32_t i = 0; i < block_len_; ++i) {
    h ^= uint32_t(block[i]);
    h *= 0x100000001b3ull;
  }
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

bool RadixCache::same_tokens(int32_t page, const int32_t* block) const {
  return std::memcmp(page_tokens(page), block, sizeof(int32_t) * size_t(block_len_)) == 0;
}

bool RadixCache::is_evictable(int32_t page) const {
  return in_tree_[page] && num_children_[page] == 0 && allocator_.refcount(page) == 0;
}

bool RadixCache::match(const int32_t* tokens, int32_t max_pages, uint64_t batch,
                       std::vector<int32_t>& out) const {
  int32_t node = kRoot;
  for (int32_t i = 0; i < max_pages; ++i) {
    const int32_t* block = tokens + int64_t(i) * block_len_;
    const auto it = children_.find(ChildKey{node, hash_block(block)});
    if (it == children_.end() || !same_tokens(it->second, block)) return false;
    node = it->second;
    if (writer_[node] != 0 && writer_[node] != batch) return true;
    out.push_back(node);
  }
  return false;
}

void RadixCache::acquire(int32_t page) {
  assert(in_tree_[page]);
  if (allocator_.refcount(page) == 0) {
    if (num_children_[page] == 0) evictable_.erase({last_use_[page], page});
    --num_unreferenced_;
  }
  allocator_.retain(page);
}

void RadixCache::release(int32_t page) {
  assert(in_tree_[page]);
  if (!allocator_.release(page)) return;
  ++num_unreferenced_;
  last_use_[page] = ++clock_;
  if (num_children_[page] == 0) evictable_.emplace(last_use_[page], page);
}

void RadixCache::link(int32_t page, int32_t parent, uint64_t hash, const int32_t* block,
                      uint64_t writer) {
  assert(!in_tree_[page] && allocator_.refcount(page) > 0);
  in_tree_[page] = 1;
  writer_[page] = writer;
  parent_[page] = parent;
  num_children_[page] = 0;
  hash_[page] = hash;
  std::memcpy(&tokens_[int64_t(page) * block_len_], block, sizeof(int32_t) * size_t(block_len_));
  children_.emplace(ChildKey{parent, hash}, page);
  ++num_nodes_;
  if (parent != kRoot) {
    if (is_evictable(parent)) evictable_.erase({last_use_[parent], parent});
    ++num_children_[parent];
  }
}

void RadixCache::unlink(int32_t page) {
  assert(in_tree_[page] && num_children_[page] == 0);
  children_.erase(ChildKey{parent_[page], hash_[page]});
  in_tree_[page] = 0;
  writer_[page] = 0;
  --num_nodes_;
  const int32_t parent = parent_[page];
  if (parent != kRoot) {
    --num_children_[parent];
    if (is_evictable(parent)) evictable_.emplace(last_use_[parent], parent);
  }
}

int32_t RadixCache::insert(const int32_t* tokens, const int32_t* pages, int32_t n) {
  int32_t node = kRoot;
  int32_t taken = 0;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t* block = tokens + int64_t(i) * block_len_;
    const uint64_t h = hash_block(block);
    const auto it = children_.find(ChildKey{node, h});
    if (it != children_.end()) {
      if (!same_tokens(it->second, block)) break;  // hash collision: the rest stays uncached
      // Written pages never hang below one still being written (find_violation), so
      // the rest stays uncached rather than wait for that batch.
      if (writer_[it->second] != 0) break;
      node = it->second;
      continue;
    }
    link(pages[i], node, h, block, 0);
    node = pages[i];
    ++taken;
  }
  return taken;
}

int32_t RadixCache::extend(int32_t parent, const int32_t* tokens, const int32_t* pages,
                           int32_t n, uint64_t batch) {
  assert(batch != 0 && (parent == kRoot || in_tree_[parent]));
  int32_t node = parent;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t* block = tokens + int64_t(i) * block_len_;
    const uint64_t h = hash_block(block);
    if (children_.count(ChildKey{node, h})) return i;
    link(pages[i], node, h, block, batch);
    node = pages[i];
  }
  return n;
}

void RadixCache::mark_written(int32_t page, uint64_t batch) {
  if (in_tree_[page] && writer_[page] == batch) writer_[page] = 0;
}

int32_t RadixCache::evict(int32_t n) {
  int32_t evicted = 0;
  while (evicted < n && !evictable_.empty()) {
    const int32_t page = evictable_.begin()->second;
    evictable_.erase(evictable_.begin());
    unlink(page);
    --num_unreferenced_;
    allocator_.free(page);
    ++evicted;
  }
  return evicted;
}

int32_t RadixCache::flush() {
  int32_t freed = 0;
  for (int32_t page = 0; page < allocator_.num_pages(); ++page) {
    if (!in_tree_[page]) continue;
    in_tree_[page] = 0;
    num_children_[page] = 0;
    writer_[page] = 0;
    if (allocator_.refcount(page) == 0) {
      allocator_.free(page);
      ++freed;
    }
  }
  assert(freed == num_unreferenced_);
  children_.clear();
  evictable_.clear();
  num_nodes_ = 0;
  num_unreferenced_ = 0;
  return freed;
}

std::string RadixCache::find_violation() const {
  const int32_t n = allocator_.num_pages();
  std::vector<int32_t> children(n, 0);
  int32_t nodes = 0, unreferenced = 0, evictable = 0;
  for (int32_t p = 0; p < n; ++p) {
    if (!in_tree_[p]) continue;
    ++nodes;
    const std::string at = "cached page " + std::to_string(p) + ": ";
    if (allocator_.is_free(p)) return at + "is also free";
    const auto it = children_.find(ChildKey{parent_[p], hash_[p]});
    if (it == children_.end() || it->second != p) return at + "missing from its parent's children";
    if (hash_[p] != hash_block(page_tokens(p))) return at + "hash does not match its tokens";
    const int32_t parent = parent_[p];
    if (parent != kRoot) {
      if (!in_tree_[parent]) return at + "parent " + std::to_string(parent) + " is not cached";
      ++children[parent];
      if (allocator_.refcount(p) > 0 && allocator_.refcount(parent) == 0)
        return at + "referenced below an unreferenced parent";
      // A batch writes a chain from its first page on, so a written page never hangs
      // below one still being written (what match() walks past must be readable).
      if (writer_[p] == 0 && writer_[parent] != 0) return at + "written below an unwritten parent";
    }
    if (allocator_.refcount(p) == 0) ++unreferenced;
  }
  for (int32_t p = 0; p < n; ++p) {
    if (!in_tree_[p]) continue;
    if (children[p] != num_children_[p]) return "cached page " + std::to_string(p) + ": child count";
    const bool listed = evictable_.count({last_use_[p], p}) != 0;
    if (listed != is_evictable(p))
      return "cached page " + std::to_string(p) + (listed ? ": listed evictable but is not"
                                                          : ": evictable but not listed");
    evictable += listed;
  }
  if (nodes != num_nodes_ || size_t(nodes) != children_.size()) return "node count";
  if (unreferenced != num_unreferenced_) return "unreferenced count";
  if (size_t(evictable) != evictable_.size()) return "evictable set holds pages outside the tree";
  return {};
}

}  // namespace tokenspeed
