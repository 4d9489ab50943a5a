// Request scheduler: decides which positions of which requests the next forward pass
// computes, and where their K/V lives.
//
// A request is L token ids with logprob_start: the hidden state at position p scores
// token p + 1, so positions [logprob_start, L - 1) are scored. Every position [0, L) is
// computed (K/V for all of them, so all full pages can be cached), except a prefix
// found in the cache, which is capped at floor(logprob_start / page_size) pages so the
// position at logprob_start is always recomputed.
//
// Admission reserves all ceil(L / page_size) pages of a request at once, so admitted
// requests always finish; a request that cannot get its pages waits, and later ones wait
// behind it (first come, first served). Each batch takes running requests first, then
// admits waiting ones, chunking the last one to fit max_batch_tokens.
//
// Requests share K/V while in flight (GRPO: one prompt, several completions submitted
// together). A request's full pages enter the prefix cache as soon as the chunk that
// completes them is placed in a batch: every layer of a batch stores the K/V of all its
// tokens before any attention of that batch reads, so a request placed later in the same
// batch may match them, and so may any batch scheduled after that batch is completed.
// Pages written by another uncompleted batch are never matched (see try_admit for what
// the request does then).
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "page_allocator.h"
#include "radix_cache.h"

namespace tokenspeed {

struct SchedulerConfig {
  int64_t num_pages = 0;
  int64_t page_size = 0;
  int64_t max_batch_tokens = 0;
  int64_t max_batch_requests = 256;
  bool enable_prefix_cache = true;
  // Requests carry one more id per position (route_ids of add) that the prefix cache
  // compares along with the tokens: K/V is shared only where both agree.
  bool route_keys = false;
};

// One request's chunk [begin, end) in a batch.
struct BatchEntry {
  int64_t request_id = 0;
  int32_t begin = 0;
  int32_t end = 0;
  int32_t cached_len = 0;   // tokens of this request served by the prefix cache
  int32_t score_begin = 0;  // scored positions [begin + score_begin, begin + score_end)
  int32_t score_end = 0;
  std::vector<int32_t> pages;  // all pages of the request, [0, L)
  uint64_t request_uid = 0;    // tells a re-added request apart from an aborted one
};

// Flat int32 arrays, ready to wrap as tensors. N tokens, B entries, S scored rows.
struct Batch {
  uint64_t scheduler_uid = 0;
  uint64_t batch_uid = 0;
  std::vector<BatchEntry> entries;
  int32_t max_pages = 0;               // page_table row length: max ceil(end / page_size)
  std::vector<int32_t> input_ids;      // [N] token id of each computed position
  std::vector<int32_t> positions;      // [N]
  std::vector<int32_t> slot_mapping;   // [N] page * page_size + offset
  std::vector<int32_t> page_table;     // [B, max_pages] pages covering [0, end), 0-padded
  std::vector<int32_t> cu_seqlens_q;   // [B + 1]
  std::vector<int32_t> kv_lens;        // [B] = end
  std::vector<int32_t> score_rows;     // [S] rows of the N tokens whose logits score
  std::vector<int32_t> score_targets;  // [S] token at position + 1 of each score row
};

struct SchedulerStats {
  int64_t total_pages = 0, free_pages = 0, cached_pages = 0, owned_pages = 0;
  int64_t prefix_hit_tokens = 0, inserted_pages = 0, evicted_pages = 0;
  int64_t same_batch_hit_tokens = 0;  // of prefix_hit_tokens, on pages their own batch writes
  int64_t waiting = 0, running = 0;
};

enum class PageState : int32_t { kFree = 0, kOwned = 1, kCached = 2 };

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Throws std::invalid_argument (naming the value) for a duplicate id, no tokens, a
  // negative token, logprob_start outside [0, L - 1], or more pages than the pool has.
  // route_ids (route_keys only; empty means all 0): one id >= 0 per position, part of the
  // prefix cache's key.
  void add(int64_t request_id, std::vector<int32_t> token_ids, int64_t logprob_start,
           const std::vector<int32_t>& route_ids = {});
  // Null when nothing can run now. Requests in an uncompleted batch are not scheduled
  // again until it is completed. Batches must run in the order they were scheduled and
  // whole: an entry may read K/V that an earlier entry of the same batch writes.
  std::shared_ptr<Batch> schedule();
  // Marks the batch's chunks computed; returns the ids that finished, in entry order.
  // Entries of requests aborted since schedule() are skipped.
  std::vector<int64_t> complete(const Batch& batch);
  // A running request's pages are released; pages others matched stay theirs (and
  // cached, to be read once the batch writing them is completed: the batch still runs).
  void abort(int64_t request_id);
  // The weights changed: cached K/V must never be matched again.
  void flush();

  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  SchedulerStats stats() const;
  const SchedulerConfig& config() const { return config_; }

  std::vector<PageState> page_states() const;
  int32_t refcount(int32_t page) const { return allocator_.refcount(page); }
  // Token ids of a page held by the prefix cache; empty if it is not in the cache.
  std::vector<int32_t> cached_tokens(int32_t page) const;
  // Empty when every invariant holds (pages free xor owned xor cached, refcounts equal to
  // the running requests holding each page, tree structure), else the first violation.
  std::string find_violation() const;

 private:
  struct Request {
    int64_t id = 0;
    uint64_t uid = 0;
    std::vector<int32_t> tokens;
    // with route_keys: the cache key of each full page, its tokens then its route ids
    std::vector<int32_t> keys;
    int32_t logprob_start = 0;
    std::vector<int32_t> pages;  // set at admission
    int32_t cached_len = 0;
    int32_t computed = 0;        // K/V of [0, computed) is written
    int32_t scheduled = 0;       // [0, scheduled) is written or in an uncompleted batch
    int32_t linked = 0;          // pages[0, linked) are its path in the prefix cache
    bool diverged = false;       // the cache held another copy of pages[linked]
    uint64_t admit_batch = 0;    // the batch of its first chunk
    uint64_t cache_epoch = 0;    // flush count at admission
    bool running = false;
    bool in_flight = false;      // a chunk is in an uncompleted batch
    bool finished = false;
    int32_t length() const { return static_cast<int32_t>(tokens.size()); }
  };

  enum class Admission { kAdmitted, kNoPages, kPrefixInFlight };
  int32_t pages_for(int64_t tokens) const;
  // The cache keys of r's full pages [first, ...) (its tokens, or its keys).
  const int32_t* page_keys(const Request& r, int32_t first) const;
  Admission try_admit(Request& r, uint64_t batch);
  void release_pages(Request& r);
  void append_entry(Batch& batch, Request& r, int32_t num_tokens, uint64_t batch_uid);
  void fill_arrays(Batch& batch) const;

  const SchedulerConfig config_;
  const int32_t page_size_;
  const uint64_t uid_;
  PageAllocator allocator_;
  RadixCache cache_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> requests_;
  std::deque<Request*> waiting_;  // arrival order
  std::vector<Request*> running_; // admission order, which is arrival order
  // Uncompleted batches, each with the cache pages it writes.
  std::unordered_map<uint64_t, std::vector<int32_t>> outstanding_batches_;
  std::vector<int32_t> building_pages_;  // pages linked by the batch being built
  uint64_t next_request_uid_ = 1;
  uint64_t next_batch_uid_ = 1;
  uint64_t cache_epoch_ = 0;
  std::vector<int32_t> scratch_pages_;
  int64_t prefix_hit_tokens_ = 0, inserted_pages_ = 0, evicted_pages_ = 0;
  int64_t same_batch_hit_tokens_ = 0;
};

}  // namespace tokenspeed
