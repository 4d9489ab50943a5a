// Random driver for the scheduler without Python, built by tests/test_scheduler_sanitize.py
// with -fsanitize=address,undefined (and assertions on):
//   standalone_fuzz <seed> <num_ops>
// It plays the engine: every batch "writes" (token, weight version) into a shadow K/V
// pool at its slots, and checks that every position a chunk attends to holds the
// request's own token, that each scored position is emitted exactly once and in order,
// and the scheduler's invariants after every operation. Exit status 0 means all held.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "scheduler.h"

namespace {

using tokenspeed::Batch;
using tokenspeed::Scheduler;
using tokenspeed::SchedulerConfig;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "standalone_fuzz: %s\n", what.c_str());
  std::exit(1);
}

void check(bool ok, const std::string& what) {
  if (!ok) fail(what);
}

struct Shadow {
  std::vector<int32_t> tokens;
  int32_t start = 0;
  int32_t next_scored = 0;  // next position expected in score rows
  int32_t admitted_version = -1;
};

struct Slot {
  int32_t token = -1;
  int32_t version = -1;
};

class Driver {
 public:
  Driver(uint64_t seed) : rng_(seed) {
    const int32_t page_sizes[] = {1, 2, 16};
    config_.page_size = page_sizes[pick(3)];
    config_.num_pages = 2 + pick(config_.page_size == 16 ? 8 : 40);
    config_.max_batch_tokens = 1 + pick(80);
    config_.max_batch_requests = 1 + pick(6);
    config_.enable_prefix_cache = pick(5) != 0;
    sched_ = std::make_unique<Scheduler>(config_);
    kv_.resize(size_t(config_.num_pages * config_.page_size));
    for (auto& prefix : prefixes_) {
      prefix.resize(size_t(config_.page_size) * (1 + pick(3)) + pick(3));
      for (auto& t : prefix) t = int32_t(pick(6));
    }
  }

  void step() {
    const uint32_t op = pick(100);
    if (op < 30) add();
    else if (op < 60) schedule();
    else if (op < 88) complete(pick(outstanding_.size() + 1));
    else if (op < 98) abort();
    else flush();
    verify();
  }

  void drain() {
    for (int64_t rounds = 0; sched_->has_work() || !outstanding_.empty(); ++rounds) {
      check(rounds < 1000000, "drain does not terminate");
      while (!outstanding_.empty()) complete(0);
      schedule();
      check(!outstanding_.empty() || !sched_->has_work(), "work left but nothing schedulable");
      verify();
    }
    const auto st = sched_->stats();
    check(st.owned_pages == 0 && st.free_pages + st.cached_pages == st.total_pages,
          "pages leaked after drain");
    check(shadows_.empty(), "requests never finished");
  }

  std::string summary() const {
    const auto st = sched_->stats();
    return "page_size " + std::to_string(config_.page_size) + ", " +
           std::to_string(config_.num_pages) + " pages, " + std::to_string(batches_) +
           " batches, " + std::to_string(st.prefix_hit_tokens) + " hit tokens, " +
           std::to_string(st.inserted_pages) + " inserted, " +
           std::to_string(st.evicted_pages) + " evicted, " + std::to_string(version_) +
           " flushes";
  }

 private:
  uint32_t pick(size_t n) { return n == 0 ? 0 : uint32_t(rng_() % n); }

  void add() {
    std::vector<int32_t> tokens;
    if (pick(3) != 0) tokens = prefixes_[pick(prefixes_.size())];
    const size_t tail = 1 + pick(3 * size_t(config_.page_size) + 6);
    for (size_t i = 0; i < tail; ++i) tokens.push_back(int32_t(pick(6)));
    const int32_t length = int32_t(tokens.size());
    const int32_t start = pick(4) == 0 ? length - 1 : int32_t(pick(length));
    const int64_t id = int64_t(pick(64));
    const bool fits = (length + config_.page_size - 1) / config_.page_size <= config_.num_pages;
    const bool valid = fits && !shadows_.count(id);
    try {
      sched_->add(id, tokens, start);
      check(valid, "add accepted an invalid request");
    } catch (const std::invalid_argument&) {
      check(!valid, "add refused a valid request");
      return;
    }
    Shadow& s = shadows_[id];
    s.tokens = tokens;
    s.start = start;
    s.next_scored = start;
    arrivals_.push_back(id);
  }

  void schedule() {
    std::shared_ptr<Batch> batch = sched_->schedule();
    if (!batch) {
      check(!outstanding_.empty() || !sched_->has_work(), "idle scheduler returned no batch");
      return;
    }
    const Batch& b = *batch;
    const int32_t ps = int32_t(config_.page_size);
    check(b.entries.size() <= size_t(config_.max_batch_requests), "too many entries");
    check(b.input_ids.size() <= size_t(config_.max_batch_tokens), "too many tokens");
    check(b.cu_seqlens_q.size() == b.entries.size() + 1 && b.cu_seqlens_q[0] == 0, "cu_seqlens");
    size_t scored = 0;
    for (size_t i = 0; i < b.entries.size(); ++i) {
      const auto& e = b.entries[i];
      auto it = shadows_.find(e.request_id);
      check(it != shadows_.end(), "entry for an unknown request");
      Shadow& s = it->second;
      const int32_t length = int32_t(s.tokens.size());
      check(0 <= e.begin && e.begin < e.end && e.end <= length, "chunk bounds");
      check(e.cached_len % ps == 0 && e.cached_len <= s.start / ps * ps, "cache cap");
      if (s.admitted_version < 0) {  // first chunk: admission
        check(e.begin == e.cached_len, "first chunk starts after the cached prefix");
        // First come, first served: everything that arrived earlier was admitted.
        for (int64_t earlier : arrivals_) {
          if (earlier == e.request_id) break;
          check(shadows_.at(earlier).admitted_version >= 0, "admitted out of arrival order");
        }
        s.admitted_version = version_;
        arrivals_.erase(std::find(arrivals_.begin(), arrivals_.end(), e.request_id));
      }
      check(b.kv_lens[i] == e.end, "kv_lens");
      const int32_t row0 = b.cu_seqlens_q[i];
      check(b.cu_seqlens_q[i + 1] - row0 == e.end - e.begin, "cu_seqlens length");
      // Attention reads [0, begin) through the page table: it must hold this request's
      // tokens, from the current weights when the request started after the last flush.
      for (int32_t pos = 0; pos < e.end; ++pos) {
        const int32_t page = b.page_table[i * size_t(b.max_pages) + size_t(pos / ps)];
        check(page == e.pages[size_t(pos / ps)], "page table row");
        if (pos >= e.begin) continue;
        const Slot& slot = kv_[size_t(page) * ps + size_t(pos % ps)];
        check(slot.token == s.tokens[size_t(pos)], "attended slot holds another token");
        check(s.admitted_version != version_ || slot.version == version_,
              "attended slot holds K/V from before a flush");
      }
      for (int32_t pos = e.begin; pos < e.end; ++pos) {
        const size_t row = size_t(row0 + pos - e.begin);
        check(b.positions[row] == pos && b.input_ids[row] == s.tokens[size_t(pos)], "token row");
        const int32_t slot = b.slot_mapping[row];
        check(sched_->refcount(slot / ps) == 1 && sched_->cached_tokens(slot / ps).empty(),
              "writes into a shared or cached page");
        kv_[size_t(slot)] = Slot{s.tokens[size_t(pos)], version_};
      }
      const int32_t lo = std::min(std::max(e.begin, s.start), e.end);
      const int32_t hi = std::max(std::min(e.end, length - 1), lo);
      check(e.score_begin == lo - e.begin && e.score_end == hi - e.begin, "score offsets");
      for (int32_t off = e.score_begin; off < e.score_end; ++off, ++scored) {
        check(scored < b.score_rows.size(), "score rows too short");
        const int32_t pos = b.positions[size_t(b.score_rows[scored])];
        check(pos == e.begin + off && pos == s.next_scored, "scored position out of order");
        check(b.score_targets[scored] == s.tokens[size_t(pos) + 1], "score target");
        ++s.next_scored;
      }
    }
    check(scored == b.score_rows.size(), "extra score rows");
    outstanding_.push_back(batch);
    ++batches_;
  }

  void complete(size_t index) {
    if (index >= outstanding_.size()) return;
    std::shared_ptr<Batch> batch = outstanding_[index];
    outstanding_.erase(outstanding_.begin() + long(index));
    for (int64_t id : sched_->complete(*batch)) {
      const Shadow& s = shadows_.at(id);
      check(s.next_scored == std::max<int32_t>(s.start, int32_t(s.tokens.size()) - 1),
            "finished before every scored position was emitted");
      shadows_.erase(id);
    }
    bool refused = false;
    try {
      sched_->complete(*batch);
    } catch (const std::invalid_argument&) {
      refused = true;
    }
    check(refused, "a batch was completed twice");
  }

  void abort() {
    const int64_t id = int64_t(pick(64));
    const bool known = shadows_.count(id) != 0;
    try {
      sched_->abort(id);
      check(known, "abort accepted an unknown id");
    } catch (const std::invalid_argument&) {
      check(!known, "abort refused a known id");
      return;
    }
    shadows_.erase(id);
    const auto it = std::find(arrivals_.begin(), arrivals_.end(), id);
    if (it != arrivals_.end()) arrivals_.erase(it);
  }

  void flush() {
    sched_->flush();
    ++version_;
    check(sched_->stats().cached_pages == 0, "flush left cached pages");
  }

  void verify() {
    const std::string violation = sched_->find_violation();
    check(violation.empty(), "invariant: " + violation);
    const auto st = sched_->stats();
    check(st.free_pages + st.cached_pages + st.owned_pages == st.total_pages, "page states");
    // Cached pages hold exactly the tokens whose K/V was written into them.
    const int32_t ps = int32_t(config_.page_size);
    for (int32_t p = 0; p < int32_t(config_.num_pages); ++p) {
      const std::vector<int32_t> cached = sched_->cached_tokens(p);
      for (size_t i = 0; i < cached.size(); ++i) {
        const Slot& slot = kv_[size_t(p) * ps + i];
        check(slot.token == cached[i] && slot.version == version_, "cached page content");
      }
    }
  }

  std::mt19937_64 rng_;
  SchedulerConfig config_;
  std::unique_ptr<Scheduler> sched_;
  std::vector<std::vector<int32_t>> prefixes_ = std::vector<std::vector<int32_t>>(3);
  std::vector<Slot> kv_;
  std::map<int64_t, Shadow> shadows_;
  std::vector<int64_t> arrivals_;  // waiting requests, in arrival order
  std::vector<std::shared_ptr<Batch>> outstanding_;
  int32_t version_ = 0;
  int64_t batches_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <seed> <num_ops>\n", argv[0]);
    return 2;
  }
  const uint64_t seed = std::strtoull(argv[1], nullptr, 10);
  const long num_ops = std::strtol(argv[2], nullptr, 10);
  Driver driver(seed);
  for (long i = 0; i < num_ops; ++i) driver.step();
  driver.drain();
  std::printf("seed %llu: %ld ops ok (%s)\n", static_cast<unsigned long long>(seed), num_ops,
              driver.summary().c_str());
  return 0;
}
