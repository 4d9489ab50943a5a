#include "scheduler.h"

#include <algorithm>
#include <atomic>
#include <cassert>
#include <limits>
#include <stdexcept>

namespace tokenspeed {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

std::string named(const char* name, int64_t value) {
  return std::string(name) + "=" + std::to_string(value);
}

// Slots are int32 (page * page_size + offset), so the whole pool must index in int32.
SchedulerConfig validated(const SchedulerConfig& c) {
  if (c.num_pages < 1 || c.num_pages > kInt32Max)
    throw std::invalid_argument(named("num_pages", c.num_pages) + " must be in [1, 2^31)");
  if (c.page_size < 1 || c.page_size > kInt32Max)
    throw std::invalid_argument(named("page_size", c.page_size) + " must be in [1, 2^31)");
  if (c.num_pages * c.page_size > kInt32Max)
    throw std::invalid_argument(named("num_pages", c.num_pages) + " x " +
                                named("page_size", c.page_size) +
                                " slots do not fit int32 slot indices");
  if (c.max_batch_tokens < 1 || c.max_batch_tokens > kInt32Max)
    throw std::invalid_argument(named("max_batch_tokens", c.max_batch_tokens) +
                                " must be in [1, 2^31)");
  if (c.max_batch_requests < 1 || c.max_batch_requests > kInt32Max)
    throw std::invalid_argument(named("max_batch_requests", c.max_batch_requests) +
                                " must be in [1, 2^31)");
  return c;
}

uint64_t next_scheduler_uid() {
  static std::atomic<uint64_t> counter{1};
  return counter.fetch_add(1);
}

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& config)
    : config_(validated(config)),
      page_size_(static_cast<int32_t>(config.page_size)),
      uid_(next_scheduler_uid()),
      allocator_(static_cast<int32_t>(config.num_pages)),
      cache_(allocator_, static_cast<int32_t>(config.page_size), config.route_keys ? 2 : 1) {}

Scheduler::~Scheduler() { assert(find_violation().empty()); }

const int32_t* Scheduler::page_keys(const Request& r, int32_t first) const {
  if (!config_.route_keys) return r.tokens.data() + int64_t(first) * page_size_;
  return r.keys.data() + int64_t(first) * 2 * page_size_;
}

int32_t Scheduler::pages_for(int64_t tokens) const {
  return static_cast<int32_t>((tokens + page_size_ - 1) / page_size_);
}

void Scheduler::add(int64_t request_id, std::vector<int32_t> token_ids, int64_t logprob_start,
                    const std::vector<int32_t>& route_ids) {
  const std::string who = "request " + std::to_string(request_id) + ": ";
  if (requests_.count(request_id))
    throw std::invalid_argument(who + "id is already waiting or running");
  const int64_t length = static_cast<int64_t>(token_ids.size());
  if (length == 0) throw std::invalid_argument(who + "token_ids is empty");
  if (length > kInt32Max - 1)
    throw std::invalid_argument(who + named("length", length) + " does not fit int32 positions");
  for (int64_t i = 0; i < length; ++i)
    if (token_ids[i] < 0)
      throw std::invalid_argument(who + "token_ids[" + std::to_string(i) + "] is " +
                                  std::to_string(token_ids[i]) + ", token ids must be >= 0");
  if (logprob_start < 0 || logprob_start > length - 1)
    throw std::invalid_argument(who + named("logprob_start", logprob_start) +
                                " must be in [0, " + std::to_string(length - 1) +
                                "] for " + std::to_string(length) + " tokens");
  if (pages_for(length) > config_.num_pages)
    throw std::invalid_argument(who + std::to_string(length) + " tokens need " +
                                std::to_string(pages_for(length)) + " pages of " +
                                std::to_string(page_size_) + ", the pool has only " +
                                named("num_pages", config_.num_pages));
  if (!route_ids.empty()) {
    if (!config_.route_keys)
      throw std::invalid_argument(who + "route_ids given, but the scheduler has no route_keys");
    if (int64_t(route_ids.size()) != length)
      throw std::invalid_argument(who + named("route_ids", int64_t(route_ids.size())) +
                                  " ids for " + std::to_string(length) + " tokens");
    for (int64_t i = 0; i < length; ++i)
      if (route_ids[i] < 0)
        throw std::invalid_argument(who + "route_ids[" + std::to_string(i) + "] is " +
                                    std::to_string(route_ids[i]) + ", must be >= 0");
  }
  auto r = std::make_unique<Request>();
  if (config_.route_keys) {
    const int64_t full = length / page_size_;
    r->keys.assign(size_t(full * 2 * page_size_), 0);
    for (int64_t p = 0; p < full; ++p) {
      int32_t* block = r->keys.data() + p * 2 * page_size_;
      std::copy_n(token_ids.begin() + p * page_size_, page_size_, block);
      if (!route_ids.empty())
        std::copy_n(route_ids.begin() + p * page_size_, page_size_, block + page_size_);
    }
  }
  r->id = request_id;
  r->uid = next_request_uid_++;
  r->tokens = std::move(token_ids);
  r->logprob_start = static_cast<int32_t>(logprob_start);
  waiting_.push_back(r.get());
  requests_.emplace(request_id, std::move(r));
}

Scheduler::Admission Scheduler::try_admit(Request& r, uint64_t batch) {
  const int32_t total = pages_for(r.length());
  std::vector<int32_t>& matched = scratch_pages_;
  matched.clear();
  // A prefix that runs on into pages another uncompleted batch writes: the request waits
  // (and, first come first served, so do those behind it) until that batch is completed
  // and the pages become matchable, instead of computing a copy of them. This is what
  // lets a group of siblings share a prompt whose writer is in flight, and it costs
  // nothing when batches are completed before the next is scheduled (the engine's loop):
  // then every running request's next chunk is placed in the batch before any admission,
  // so nothing a waiting request could match is written elsewhere, and a writer chunked
  // over several batches is matched page by page as each of its batches completes or
  // is being built. It never deadlocks: the pages it waits for belong to a batch that is
  // already scheduled, and completing it makes them matchable.
  if (config_.enable_prefix_cache &&
      cache_.match(page_keys(r, 0), r.logprob_start / page_size_, batch, matched))
    return Admission::kPrefixInFlight;
  const int32_t need = total - static_cast<int32_t>(matched.size());
  // Matched pages nobody references are counted as evictable, but this request is
  // about to hold them, so they cannot make room for its other pages.
  int32_t matched_unreferenced = 0;
  for (int32_t page : matched) matched_unreferenced += allocator_.refcount(page) == 0;
  if (allocator_.num_free() + cache_.num_unreferenced() - matched_unreferenced < need)
    return Admission::kNoPages;

  int32_t same_batch = 0;
  for (int32_t page : matched) {
    cache_.acquire(page);
    same_batch += cache_.writer(page) != 0;
  }
  if (!allocator_.can_allocate(need))
    evicted_pages_ += cache_.evict(need - allocator_.num_free());
  assert(allocator_.can_allocate(need));
  r.pages.assign(matched.begin(), matched.end());
  allocator_.allocate(need, r.pages);
  r.cached_len = static_cast<int32_t>(matched.size()) * page_size_;
  r.computed = r.scheduled = r.cached_len;
  r.linked = static_cast<int32_t>(matched.size());
  r.admit_batch = batch;
  r.cache_epoch = cache_epoch_;
  r.running = true;
  prefix_hit_tokens_ += r.cached_len;
  same_batch_hit_tokens_ += int64_t(same_batch) * page_size_;
  assert(r.cached_len <= r.logprob_start);
  return Admission::kAdmitted;
}

void Scheduler::release_pages(Request& r) {
  for (int32_t page : r.pages) {
    if (cache_.contains(page)) {
      cache_.release(page);
    } else if (allocator_.release(page)) {
      allocator_.free(page);
    }
  }
  r.pages.clear();
}

void Scheduler::append_entry(Batch& batch, Request& r, int32_t num_tokens, uint64_t batch_uid) {
  assert(!r.in_flight && num_tokens > 0 && r.computed + num_tokens <= r.length());
  BatchEntry e;
  e.request_id = r.id;
  e.request_uid = r.uid;
  e.begin = r.computed;
  e.end = r.computed + num_tokens;
  e.cached_len = r.cached_len;
  // Scored positions [max(begin, start), min(end, L - 1)), from this request alone.
  const int32_t lo = std::min(std::max(e.begin, r.logprob_start), e.end);
  const int32_t hi = std::max(std::min(e.end, r.length() - 1), lo);
  e.score_begin = lo - e.begin;
  e.score_end = hi - e.begin;
  e.pages = r.pages;
  r.in_flight = true;
  r.scheduled = e.end;
  // The pages this chunk completes become matchable by the entries placed after it.
  // A request links only its own chain: once the cache holds another copy of one of its
  // pages (a page past a match cap, or one computed concurrently) it stops, and its
  // remaining pages are inserted when it finishes, as they would have been before.
  const int32_t full = e.end / page_size_;
  if (config_.enable_prefix_cache && r.cache_epoch == cache_epoch_ && !r.diverged &&
      r.linked < full) {
    const int32_t parent = r.linked == 0 ? RadixCache::kNoParent : r.pages[r.linked - 1];
    const int32_t n = full - r.linked;
    const int32_t linked = cache_.extend(parent, page_keys(r, r.linked),
                                         r.pages.data() + r.linked, n, batch_uid);
    building_pages_.insert(building_pages_.end(), r.pages.begin() + r.linked,
                           r.pages.begin() + r.linked + linked);
    inserted_pages_ += linked;
    r.linked += linked;
    r.diverged = linked < n;
  }
  batch.entries.push_back(std::move(e));
}

std::shared_ptr<Batch> Scheduler::schedule() {
  auto batch = std::make_shared<Batch>();
  const uint64_t uid = next_batch_uid_;
  building_pages_.clear();
  int32_t budget = static_cast<int32_t>(config_.max_batch_tokens);
  const size_t max_entries = static_cast<size_t>(config_.max_batch_requests);
  for (Request* r : running_) {
    if (budget == 0 || batch->entries.size() == max_entries) break;
    if (r->in_flight) continue;
    const int32_t n = std::min(r->length() - r->computed, budget);
    append_entry(*batch, *r, n, uid);
    budget -= n;
  }
  while (!waiting_.empty() && budget > 0 && batch->entries.size() < max_entries) {
    Request& r = *waiting_.front();
    if (try_admit(r, uid) != Admission::kAdmitted) break;  // later requests wait behind it
    waiting_.pop_front();
    running_.push_back(&r);
    const int32_t n = std::min(r.length() - r.computed, budget);
    append_entry(*batch, r, n, uid);
    budget -= n;
  }
  if (batch->entries.empty()) return nullptr;
  batch->scheduler_uid = uid_;
  batch->batch_uid = next_batch_uid_++;
  outstanding_batches_.emplace(batch->batch_uid, building_pages_);
  fill_arrays(*batch);
  return batch;
}

void Scheduler::fill_arrays(Batch& b) const {
  const size_t num_entries = b.entries.size();
  int64_t num_tokens = 0, num_scored = 0;
  int32_t max_pages = 1;
  for (const BatchEntry& e : b.entries) {
    num_tokens += e.end - e.begin;
    num_scored += e.score_end - e.score_begin;
    max_pages = std::max(max_pages, pages_for(e.end));
  }
  b.max_pages = max_pages;
  b.input_ids.resize(num_tokens);
  b.positions.resize(num_tokens);
  b.slot_mapping.resize(num_tokens);
  b.page_table.assign(num_entries * size_t(max_pages), 0);
  b.cu_seqlens_q.resize(num_entries + 1);
  b.kv_lens.resize(num_entries);
  b.score_rows.resize(num_scored);
  b.score_targets.resize(num_scored);

  int32_t row = 0, scored = 0;
  b.cu_seqlens_q[0] = 0;
  for (size_t i = 0; i < num_entries; ++i) {
    const BatchEntry& e = b.entries[i];
    const std::vector<int32_t>& tokens = requests_.at(e.request_id)->tokens;
    for (int32_t pos = e.begin; pos < e.end; ++pos, ++row) {
      b.input_ids[row] = tokens[pos];
      b.positions[row] = pos;
      b.slot_mapping[row] = e.pages[pos / page_size_] * page_size_ + pos % page_size_;
    }
    const int32_t first_row = row - (e.end - e.begin);
    for (int32_t off = e.score_begin; off < e.score_end; ++off, ++scored) {
      b.score_rows[scored] = first_row + off;
      b.score_targets[scored] = tokens[e.begin + off + 1];
    }
    std::copy_n(e.pages.begin(), pages_for(e.end), b.page_table.begin() + i * max_pages);
    b.cu_seqlens_q[i + 1] = row;
    b.kv_lens[i] = e.end;
  }
  assert(row == num_tokens && scored == num_scored);
}

std::vector<int64_t> Scheduler::complete(const Batch& batch) {
  if (batch.scheduler_uid != uid_ || !outstanding_batches_.count(batch.batch_uid))
    throw std::invalid_argument(named("batch", int64_t(batch.batch_uid)) +
                                " is not outstanding: completed already, or from another "
                                "Scheduler");
  {
    const auto it = outstanding_batches_.find(batch.batch_uid);
    for (int32_t page : it->second) cache_.mark_written(page, batch.batch_uid);
    outstanding_batches_.erase(it);
  }
  std::vector<int64_t> finished;
  std::vector<Request*> done;
  for (const BatchEntry& e : batch.entries) {
    const auto it = requests_.find(e.request_id);
    if (it == requests_.end() || it->second->uid != e.request_uid) continue;  // aborted
    Request& r = *it->second;
    assert(r.running && r.in_flight && r.computed == e.begin);
    r.in_flight = false;
    r.computed = e.end;
    if (r.computed < r.length()) continue;
    // Its chain was linked as it was scheduled, up to a page the cache held another copy
    // of; the pages past that one are all written now and go in below the cached copy.
    if (config_.enable_prefix_cache && r.cache_epoch == cache_epoch_ && r.diverged)
      inserted_pages_ += cache_.insert(page_keys(r, 0), r.pages.data(), r.length() / page_size_);
    release_pages(r);
    r.finished = true;
    finished.push_back(r.id);
    done.push_back(&r);
  }
  if (!done.empty()) {
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [](const Request* r) { return r->finished; }),
                   running_.end());
    for (const Request* r : done) requests_.erase(r->id);
  }
  return finished;
}

void Scheduler::abort(int64_t request_id) {
  const auto it = requests_.find(request_id);
  if (it == requests_.end())
    throw std::invalid_argument(named("request_id", request_id) + " is not waiting or running");
  Request* r = it->second.get();
  if (r->running) {
    release_pages(*r);
    running_.erase(std::find(running_.begin(), running_.end(), r));
  } else {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), r));
  }
  requests_.erase(it);
}

void Scheduler::flush() {
  cache_.flush();
  ++cache_epoch_;  // running requests admitted before now are not inserted at finish
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats s;
  s.total_pages = allocator_.num_pages();
  s.free_pages = allocator_.num_free();
  s.cached_pages = cache_.num_unreferenced();
  s.owned_pages = allocator_.num_referenced();
  s.prefix_hit_tokens = prefix_hit_tokens_;
  s.same_batch_hit_tokens = same_batch_hit_tokens_;
  s.inserted_pages = inserted_pages_;
  s.evicted_pages = evicted_pages_;
  s.waiting = static_cast<int64_t>(waiting_.size());
  s.running = static_cast<int64_t>(running_.size());
  return s;
}

std::vector<PageState> Scheduler::page_states() const {
  std::vector<PageState> states(allocator_.num_pages());
  for (int32_t p = 0; p < allocator_.num_pages(); ++p)
    states[p] = allocator_.is_free(p)           ? PageState::kFree
                : allocator_.refcount(p) > 0    ? PageState::kOwned
                                                : PageState::kCached;
  return states;
}

std::vector<int32_t> Scheduler::cached_tokens(int32_t page) const {
  if (page < 0 || page >= allocator_.num_pages())
    throw std::invalid_argument(named("page", page) + " is outside the pool of " +
                                std::to_string(allocator_.num_pages()));
  if (!cache_.contains(page)) return {};
  const int32_t* t = cache_.page_tokens(page);
  return std::vector<int32_t>(t, t + page_size_);
}

std::string Scheduler::find_violation() const {
  const int32_t n = allocator_.num_pages();
  std::vector<int32_t> holders(n, 0);
  for (const Request* r : running_) {
    const std::string at = "request " + std::to_string(r->id) + ": ";
    if (!r->running || r->finished) return at + "in the running list but not running";
    if (int32_t(r->pages.size()) != pages_for(r->length())) return at + "page count";
    if (r->cached_len % page_size_ || r->cached_len > r->logprob_start / page_size_ * page_size_)
      return at + "cached prefix reaches into the scored window";
    if (r->computed < r->cached_len || r->computed >= r->length() ||
        r->scheduled < r->computed || r->scheduled > r->length() ||
        (!r->in_flight && r->scheduled != r->computed) ||
        (r->in_flight && r->scheduled == r->computed))
      return at + "progress";
    if (r->linked < r->cached_len / page_size_ || r->linked > r->scheduled / page_size_)
      return at + "linked pages";
    for (size_t i = 0; i < r->pages.size(); ++i) {
      const int32_t page = r->pages[i];
      const int32_t index = static_cast<int32_t>(i);
      if (page < 0 || page >= n) return at + "page id out of range";
      ++holders[page];
      const std::string which = "page " + std::to_string(page) + " ";
      if (index < r->cached_len / page_size_) {
        // A matched page is written, or written by the batch it was admitted in, which
        // is then still uncompleted: its first chunk reads the page in that very batch.
        if (cache_.contains(page) && cache_.writer(page) != 0 &&
            (cache_.writer(page) != r->admit_batch || !r->in_flight ||
             r->computed != r->cached_len))
          return at + which + "matched before the batch writing it";
      } else if ((index + 1) * page_size_ > r->scheduled) {
        // Pages no scheduled chunk has completed are its alone and not matchable.
        if (allocator_.refcount(page) != 1 || cache_.contains(page))
          return at + which + "it has yet to write is shared or cached";
      } else if (cache_.contains(page) && index >= r->linked) {
        return at + which + "is cached but not on its linked chain";
      }
    }
  }
  for (const Request* r : waiting_)
    if (r->running || !r->pages.empty()) return "waiting request holds pages";
  if (running_.size() + waiting_.size() != requests_.size()) return "request count";
  int32_t free = 0, referenced = 0;
  for (int32_t p = 0; p < n; ++p) {
    const std::string at = "page " + std::to_string(p) + ": ";
    const int32_t ref = allocator_.refcount(p);
    if (ref < 0) return at + "negative refcount";
    if (ref != holders[p])
      return at + "refcount " + std::to_string(ref) + " but " + std::to_string(holders[p]) +
             " running requests hold it";
    if (allocator_.is_free(p)) {
      ++free;
      if (ref != 0 || cache_.contains(p)) return at + "free but referenced or cached";
    } else if (ref > 0) {
      ++referenced;
    } else if (!cache_.contains(p)) {
      return at + "leaked: not free, not referenced, not cached";
    }
  }
  if (free != allocator_.num_free()) return "the free page count differs from the pages marked free";
  if (referenced != allocator_.num_referenced()) return "referenced page count";
  for (int32_t p = 0; p < n; ++p)
    if (cache_.contains(p) && cache_.writer(p) != 0 &&
        !outstanding_batches_.count(cache_.writer(p)))
      return "cached page " + std::to_string(p) + ": its writer batch is not outstanding";
  return cache_.find_violation();
}

}  // namespace tokenspeed
