// Random driver for the scheduler without Python, built by tests/test_scheduler_sanitize.py
// with -fsanitize=address,undefined (and assertions on):
//   standalone_fuzz <seed> <num_ops>
// It plays the engine with a shadow K/V pool. A batch runs as the model does: first
// every entry stores its chunk (each slot gets the hash of the token prefix it ends, the
// writer's weight version, and which batch and entry wrote it), then every entry
// attends to [0, end). It checks that every attended position holds this request's
// prefix, from its weight version, written by a completed batch or by the same or an
// earlier entry of this batch; that no slot is written twice in a batch and no page is
// written while another request holds it (except a sibling placed later in the same
// batch that matched it); that each scored position is emitted exactly once and in
// order; and the scheduler's invariants after every operation. Exit status 0 means all
// held.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <set>
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
  std::vector<uint64_t> prefix;  // prefix[p]: hash of tokens[0, p], what K/V at p depends on
  int32_t start = 0;
  int32_t next_scored = 0;  // next position expected in score rows
  int32_t admitted_version = -1;
  int64_t admit_batch = -1;
  int32_t cached_len = 0;
  std::vector<int32_t> pages;
};

struct Slot {
  int32_t token = -1;
  uint64_t prefix = 0;
  int32_t version = -1;
  int64_t batch = -1;  // sequence number of the batch that wrote it
  size_t entry = 0;
};

std::vector<uint64_t> prefix_hashes(const std::vector<int32_t>& tokens) {
  std::vector<uint64_t> out(tokens.size());
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (size_t i = 0; i < tokens.size(); ++i) {
    h = (h ^ uint64_t(uint32_t(tokens[i]))) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 29;
    out[i] = h;
  }
  return out;
}

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
    if (op < 24) add();
    else if (op < 30) add_siblings();
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
           " batches, " + std::to_string(st.prefix_hit_tokens) + " hit tokens (" +
           std::to_string(st.same_batch_hit_tokens) + " in the writer's batch), " +
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
    add_request(std::move(tokens), pick(4) == 0 ? length - 1 : int32_t(pick(length)));
  }

  // A GRPO group: several completions of one prompt, added together.
  void add_siblings() {
    const std::vector<int32_t>& prompt = prefixes_[pick(prefixes_.size())];
    for (uint32_t n = 2 + pick(4); n > 0; --n) {
      std::vector<int32_t> tokens = prompt;
      const size_t tail = 1 + pick(2 * size_t(config_.page_size) + 4);
      for (size_t i = 0; i < tail; ++i) tokens.push_back(int32_t(pick(6)));
      add_request(std::move(tokens), int32_t(prompt.size()) - 1);
    }
  }

  void add_request(std::vector<int32_t> tokens, int32_t start) {
    const int32_t length = int32_t(tokens.size());
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
    s.prefix = prefix_hashes(tokens);
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
    const int64_t seq = batches_;
    std::map<int64_t, size_t> entry_of;  // request id -> its entry in this batch
    for (size_t i = 0; i < b.entries.size(); ++i) {
      const auto& e = b.entries[i];
      auto it = shadows_.find(e.request_id);
      check(it != shadows_.end(), "entry for an unknown request");
      check(entry_of.emplace(e.request_id, i).second, "two entries of one request");
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
        s.admit_batch = seq;
        s.cached_len = e.cached_len;
        s.pages = e.pages;
        arrivals_.erase(std::find(arrivals_.begin(), arrivals_.end(), e.request_id));
      }
      check(e.pages == s.pages && e.cached_len == s.cached_len, "pages changed");
      check(b.kv_lens[i] == e.end, "kv_lens");
      check(b.cu_seqlens_q[i + 1] - b.cu_seqlens_q[i] == e.end - e.begin, "cu_seqlens length");
    }
    // Who holds each page, to check that a page is written only while nobody else needs
    // its K/V: the only other holders allowed are siblings that matched it in this batch,
    // placed after its writer.
    std::map<int32_t, std::vector<std::pair<int64_t, size_t>>> holders;
    for (const auto& [id, s] : shadows_)
      for (size_t k = 0; k < s.pages.size(); ++k) holders[s.pages[k]].emplace_back(id, k);
    // Store: every entry's chunk, before any attention of this batch.
    for (size_t i = 0; i < b.entries.size(); ++i) {
      const auto& e = b.entries[i];
      const Shadow& s = shadows_.at(e.request_id);
      const int32_t row0 = b.cu_seqlens_q[i];
      for (int32_t pos = e.begin; pos < e.end; ++pos) {
        const size_t row = size_t(row0 + pos - e.begin);
        check(b.positions[row] == pos && b.input_ids[row] == s.tokens[size_t(pos)], "token row");
        const int32_t slot = b.slot_mapping[row];
        const int32_t page = slot / ps;
        check(page == e.pages[size_t(pos / ps)] && slot % ps == pos % ps, "slot mapping");
        for (const auto& [id, k] : holders[page]) {
          if (id == e.request_id) continue;
          const Shadow& other = shadows_.at(id);
          const auto at = entry_of.find(id);
          check(int32_t(k) < other.cached_len / ps && other.admit_batch == seq &&
                    at != entry_of.end() && at->second > i,
                "writes a page another request holds");
        }
        Slot& dst = kv_[size_t(slot)];
        check(dst.batch != seq, "slot written twice in one batch");
        dst = Slot{s.tokens[size_t(pos)], s.prefix[size_t(pos)], s.admitted_version, seq, i};
      }
    }
    // Attend: [0, end) through the page table.
    size_t scored = 0;
    for (size_t i = 0; i < b.entries.size(); ++i) {
      const auto& e = b.entries[i];
      Shadow& s = shadows_.at(e.request_id);
      const int32_t length = int32_t(s.tokens.size());
      for (int32_t pos = 0; pos < e.end; ++pos) {
        const int32_t page = b.page_table[i * size_t(b.max_pages) + size_t(pos / ps)];
        check(page == e.pages[size_t(pos / ps)], "page table row");
        const Slot& slot = kv_[size_t(page) * ps + size_t(pos % ps)];
        check(slot.token == s.tokens[size_t(pos)] && slot.prefix == s.prefix[size_t(pos)],
              "attended slot holds another prefix's K/V");
        // Pre-flush K/V is never read by a request admitted after the flush.
        check(slot.version == s.admitted_version, "attended slot holds another weight version");
        check(slot.batch == seq ? slot.entry <= i : completed_.count(slot.batch) != 0,
              "attended slot written by a later entry or an uncompleted batch");
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
    outstanding_.push_back({batch, seq});
    ++batches_;
  }

  void complete(size_t index) {
    if (index >= outstanding_.size()) return;
    std::shared_ptr<Batch> batch = outstanding_[index].first;
    completed_.insert(outstanding_[index].second);
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
  std::vector<std::pair<std::shared_ptr<Batch>, int64_t>> outstanding_;  // with sequence
  std::set<int64_t> completed_;
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
