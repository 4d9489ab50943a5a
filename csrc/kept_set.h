/*
 * The sampler filters' kept set of one row from its candidates (tokenspeed/layers/
 * sampler_filters.py, docs/design.md): the threshold tau (the kept set is {x >= tau}) and
 * the kept mass S' = sum e^(x - ref_m), W' = sum e^(x - ref_m) (x - ref_m), plus whether
 * the row needs a pass over its logits, which the candidates alone cannot settle. Such a
 * row either asks for the mass of {x >= tau} at one threshold (returned as its tau), which
 * a second call given that pass's sums settles, or needs the top-p search (tau NaN). The
 * decisions are kept_set_steps, once; the CPU op gives them a row's candidates as arrays
 * (kept_set_row), the CUDA op a warp's registers (cuda/kept_set.cuh).
 *
 * Every step is the fp32 arithmetic of sampler_filters._kept_set_steps, in its order:
 * the sums over the candidates are its pairwise halvings (row_sum) and its step-doubling
 * prefix sums (row_cumsum), so that a row's bits are its own whatever the batch, and the
 * same as the Python steps where the exponentials agree.
 */
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define TS_HOST_DEVICE __host__ __device__
#else
#define TS_HOST_DEVICE
#endif

namespace tokenspeed {

constexpr int kMaxKeptCandidates = 64;

struct KeptSet {
  float tau, s, w;
  bool pending;
};

namespace kept_set_detail {

TS_HOST_DEVICE inline float max_of(float a, float b) { return a > b ? a : b; }

}  // namespace kept_set_detail

// The steps' decisions, written once over a row's candidate list. List (the CPU's arrays,
// RowList below, or a warp's registers, cuda/kept_set.cuh) gives the sums over the
// candidates, in the Python steps' order:
//   mass(tau, s, w): row_sum of e = e^(x - ref_m) and e (x - ref_m) over the x >= tau;
//   top_p(tau_k, bound, tau_p, dropped): over the top-k set {x >= tau_k}, each x's kept
//     mass strictly above its group of equal values (row_cumsum); tau_p the least x whose
//     mass is < bound (+inf if none), dropped whether any mass is >= bound.
// values, ids: the row's kc (1..64) candidates, descending, ties to the lower id, id -1
// past the row; ref_m, big_s, big_w: the merged row state (S and W relative to ref_m);
// top_k (0 = off), top_p (1 = off), min_p (0 = off): the row's filters; pass_s, pass_w:
// the sums of a pass over the row at the threshold an earlier call asked for, or NaN.
// At most one step of a row needs a pass: a tie across the list's end at the k-th place
// leaves tau >= tau_k = the last candidate, so the final set is then the top-k set or
// inside the list.
template <typename List>
TS_HOST_DEVICE inline KeptSet kept_set_steps(const List& list, const float* values,
                                             const int64_t* ids, int kc, float ref_m,
                                             float big_s, float big_w, int64_t top_k,
                                             float top_p, float min_p, float pass_s,
                                             float pass_w) {
  using kept_set_detail::max_of;
  const float neg = -INFINITY;
  const float last = values[kc - 1];
  const bool complete = ids[kc - 1] < 0;  // the candidates are every column of the row
  auto inside_list = [&](float tau) { return complete || last < tau; };

  // top-k: the k-th largest x; its set's mass from the list unless a tie runs past it
  const bool has_k = top_k > 0, has_p = top_p < 1.f;
  const float tau_m = min_p > 0.f ? ref_m + logf(min_p) : neg;
  int kth = static_cast<int>(top_k - 1);
  kth = kth < 0 ? 0 : (kth > kc - 1 ? kc - 1 : kth);
  const float tau_k = has_k ? values[kth] : neg;
  float s_k = big_s, w_k = big_w;
  if (has_k) list.mass(tau_k, s_k, w_k);
  const bool has_pass = !(pass_s != pass_s);  // not NaN
  const bool short_k = has_k && !inside_list(tau_k) && (has_p || tau_m <= tau_k);
  if (short_k && has_pass) {
    s_k = pass_s;
    w_k = pass_w;
  }

  // top-p over the top-k set: a token is dropped when the kept mass strictly above its
  // value is >= p * S_k; ties share their group's first position
  float tau_p;
  bool dropped;
  list.top_p(tau_k, top_p * s_k, tau_p, dropped);
  const bool known_p = has_k || dropped || complete;
  if (!has_p) tau_p = neg;
  const bool search = has_p && !known_p;

  const float tau = max_of(max_of(tau_k, tau_p), tau_m);
  float s_kept, w_kept;
  list.mass(tau, s_kept, w_kept);
  const bool open_set = tau == neg;
  if (open_set) {
    s_kept = big_s;
    w_kept = big_w;
  }
  const bool at_k = has_k && tau == tau_k && !open_set;  // the top-k set, its mass summed
  if (at_k) {
    s_kept = s_k;
    w_kept = w_k;
  }
  const bool need = !open_set && !at_k && !inside_list(tau);
  if (need && has_pass && !search) {
    s_kept = pass_s;
    w_kept = pass_w;
  }
  // a pending row's tau: the threshold of the pass it asks for, NaN for the search
  if (search) return {NAN, s_kept, w_kept, true};
  if (!has_pass && short_k) return {tau_k, s_kept, w_kept, true};
  if (!has_pass && need) return {tau, s_kept, w_kept, true};
  return {tau, s_kept, w_kept, false};
}

// A row's candidates as arrays, a row at a time (the CPU op).
struct RowList {
  const float* values;
  int kc;
  float e[kMaxKeptCandidates], ew[kMaxKeptCandidates];

  RowList(const float* values_, int kc_, float ref_m) : values(values_), kc(kc_) {
    for (int i = 0; i < kc; ++i) {
      const float d = values[i] - ref_m;
      e[i] = values[i] == -INFINITY ? 0.f : expf(d);
      ew[i] = e[i] > 0.f ? e[i] * d : 0.f;
    }
  }

  // zero padding to a power of two, then the halves added elementwise until one is left
  void mass(float tau, float& s, float& w) const {
    float a[kMaxKeptCandidates], b[kMaxKeptCandidates];
    int width = 1;
    while (width < kc) width *= 2;
    for (int i = 0; i < width; ++i) {
      const float keep = i < kc && values[i] >= tau ? 1.f : 0.f;
      a[i] = i < kc ? e[i] * keep : 0.f;
      b[i] = i < kc ? ew[i] * keep : 0.f;
    }
    for (int half = width / 2; half >= 1; half /= 2)
      for (int i = 0; i < half; ++i) {
        a[i] = a[i] + a[i + half];
        b[i] = b[i] + b[i + half];
      }
    s = a[0];
    w = b[0];
  }

  void top_p(float tau_k, float bound, float& tau_p, bool& dropped) const {
    float ek[kMaxKeptCandidates], cum[kMaxKeptCandidates];
    for (int i = 0; i < kc; ++i) {
      ek[i] = e[i] * (values[i] >= tau_k ? 1.f : 0.f);
      cum[i] = ek[i];
    }
    for (int step = 1; step < kc; step *= 2)
      for (int i = kc - 1; i >= step; --i) cum[i] = cum[i] + cum[i - step];
    tau_p = INFINITY;
    dropped = false;
    int group_first = 0;
    for (int i = 0; i < kc; ++i) {
      if (i > 0 && values[i] != values[i - 1]) group_first = i;
      if (!(values[i] >= tau_k)) continue;
      const float above = cum[group_first] - ek[group_first];
      if (above < bound) {
        tau_p = values[i] < tau_p ? values[i] : tau_p;
      } else if (above >= bound) {
        dropped = true;
      }
    }
  }
};

inline KeptSet kept_set_row(const float* values, const int64_t* ids, int kc, float ref_m,
                            float big_s, float big_w, int64_t top_k, float top_p,
                            float min_p, float pass_s, float pass_w) {
  return kept_set_steps(RowList(values, kc, ref_m), values, ids, kc, ref_m, big_s, big_w,
                        top_k, top_p, min_p, pass_s, pass_w);
}

}  // namespace tokenspeed
