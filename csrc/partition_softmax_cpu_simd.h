// The vectorised CPU kernels of the fused CARP loss, written once for a lane count kLanes.
//
// Not a normal header: partition_softmax_cpu.cpp includes it once per instruction set,
// inside a namespace that defines kLanes (the native fp32 width: 4 for SSE/NEON, 8 for
// AVX2) and the macro CARP_SIMD_TARGET (the target attribute of the entry points). GCC
// vector types of a width the target lacks are lowered poorly, so each build runs at its
// native width rather than one width everywhere. Summation orders follow kLanes, so the
// two builds agree to rounding, and each is deterministic on its own.
//
// Entry points: forward_item and backward_item (see partition_softmax_cpu.cpp for the work
// decomposition). Everything else is always inlined into them, so it is compiled for their
// target.

typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));

CARP_INLINE VecF splat(float v) { return VecF{} + v; }

CARP_INLINE VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The tail of a slice, padded with `pad` (-inf for a max, 0 for sums and products), so the
// tail goes through the same vector code and never leaves a scalar remainder to special-case.
CARP_INLINE VecF load_tail(const float* p, int64_t n, float pad) {
  VecF v = splat(pad);
  std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(float));
  return v;
}

CARP_INLINE void store(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }

CARP_INLINE void store_tail(float* p, VecF v, int64_t n) {
  std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(float));
}

CARP_INLINE float horizontal_sum(VecF v) {
  float lane[kLanes];
  std::memcpy(lane, &v, sizeof(v));
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lane[l] += lane[l + width];
  }
  return lane[0];
}

CARP_INLINE float horizontal_max(VecF v) {
  float lane[kLanes];
  std::memcpy(lane, &v, sizeof(v));
  float m = lane[0];
  for (int64_t l = 1; l < kLanes; ++l) m = (m > lane[l] || m != m) ? m : lane[l];
  return m;
}

// NaN-propagating, so that a NaN logit gives a NaN loss as it does in the reference.
CARP_INLINE VecF vmax(VecF a, VecF b) { return (a > b) | (a != a) ? a : b; }

// exp(x) for the shifted logits x - max <= 0 of a softmax, to about 1 ulp.
// exp(x) = 2^n * exp(r) with n = round(x / ln 2) and |r| <= ln(2)/2; exp(r) by its Taylor
// series to degree 7 (truncation error < 6e-9 relative, a tenth of an ulp). Inputs below
// ln(FLT_MIN) give 0: such a probability is below 1e-38 of the row's largest and cannot
// move any fp32 sum it enters. This avoids a denormal 2^n, and maps -inf (and padding) to 0.
CARP_INLINE VecF exp_nonpositive(VecF x) {
  const float kMinArg = -87.33654f;  // ln(FLT_MIN)
  const float kMaxArg = 88.37626f;   // ln(FLT_MAX): only reached by inconsistent stats
  // Adding 1.5 * 2^23 rounds to an integer (round-to-nearest) held in the low mantissa bits.
  const float kShifter = 12582912.0f;
  const float kLog2e = 1.44269504f;
  const float kLn2Hi = 0.693145752f;  // ln 2 split so that n * kLn2Hi is exact
  const float kLn2Lo = 1.42860677e-06f;

  // Written so that a NaN fails both comparisons and flows through to the result.
  VecF xc = x < kMinArg ? splat(kMinArg) : x;
  xc = xc > kMaxArg ? splat(kMaxArg) : xc;
  const VecF shifted = xc * kLog2e + kShifter;
  const VecF n = shifted - kShifter;
  VecF r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;

  VecF poly = splat(1.0f / 5040.0f);
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;

  const VecI n_int = (VecI)shifted - (VecI)splat(kShifter);
  const VecF two_to_n = (VecF)((n_int + 127) << 23);
  const VecF result = poly * two_to_n;
  return x < kMinArg ? splat(0.0f) : result;
}

// ---- Slice primitives: n floats, contiguous ------------------------------------------
// Reductions keep kChains independent accumulators: one chain would wait on the FP
// latency (3-4 cycles) every vector. The chain count is a constant, so the order is too.

constexpr int64_t kChains = 4;
constexpr int64_t kBlock = kChains * kLanes;

CARP_INLINE float slice_max(const float* x, int64_t n) {
  VecF acc[kChains] = {splat(-kInf), splat(-kInf), splat(-kInf), splat(-kInf)};
  int64_t c = 0;
  for (; c + kBlock <= n; c += kBlock) {
    for (int64_t k = 0; k < kChains; ++k) acc[k] = vmax(acc[k], load(x + c + k * kLanes));
  }
  for (; c + kLanes <= n; c += kLanes) acc[0] = vmax(acc[0], load(x + c));
  if (c < n) acc[0] = vmax(acc[0], load_tail(x + c, n - c, -kInf));
  return horizontal_max(vmax(vmax(acc[0], acc[1]), vmax(acc[2], acc[3])));
}

CARP_INLINE float combine_sum(const VecF (&acc)[kChains]) {
  return horizontal_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// e = exp(x - m); returns sum(e).
CARP_INLINE float exp_shifted(const float* x, float m, float* e, int64_t n) {
  VecF acc[kChains] = {};
  int64_t c = 0;
  for (; c + kBlock <= n; c += kBlock) {
    for (int64_t k = 0; k < kChains; ++k) {
      const VecF v = exp_nonpositive(load(x + c + k * kLanes) - m);
      store(e + c + k * kLanes, v);
      acc[k] += v;
    }
  }
  for (; c + kLanes <= n; c += kLanes) {
    const VecF v = exp_nonpositive(load(x + c) - m);
    store(e + c, v);
    acc[0] += v;
  }
  if (c < n) {
    // -inf padding: exp gives 0 there, so the padding lanes add nothing to the sum.
    const VecF v = exp_nonpositive(load_tail(x + c, n - c, -kInf) - m);
    store_tail(e + c, v, n - c);
    acc[0] += v;
  }
  return combine_sum(acc);
}

// Student slices with NT teacher views: e = exp(x - m) into e, and in the same pass
// dots[j] = <e, q_j>; returns sum(e). The agreements are then r * dots[j] (r = 1 / sum), so
// the probabilities need no pass of their own. Two chains per accumulator are plenty: the
// exp between two additions hides the latency.
template <int NT>
CARP_INLINE float exp_shifted_with_dots(const float* x, float m, float* e, const float* q,
                                        int64_t q_stride, float* dots, int64_t n) {
  VecF sum[2] = {};
  VecF acc[NT][2] = {};
  int64_t c = 0;
  for (; c + 2 * kLanes <= n; c += 2 * kLanes) {
    for (int64_t k = 0; k < 2; ++k) {
      const int64_t o = c + k * kLanes;
      const VecF v = exp_nonpositive(load(x + o) - m);
      store(e + o, v);
      sum[k] += v;
      for (int j = 0; j < NT; ++j) acc[j][k] += v * load(q + j * q_stride + o);
    }
  }
  for (; c + kLanes <= n; c += kLanes) {
    const VecF v = exp_nonpositive(load(x + c) - m);
    store(e + c, v);
    sum[0] += v;
    for (int j = 0; j < NT; ++j) acc[j][0] += v * load(q + j * q_stride + c);
  }
  if (c < n) {
    const VecF v = exp_nonpositive(load_tail(x + c, n - c, -kInf) - m);  // 0 in the padding
    store_tail(e + c, v, n - c);
    sum[0] += v;
    for (int j = 0; j < NT; ++j) acc[j][0] += v * load_tail(q + j * q_stride + c, n - c, 0.0f);
  }
  for (int j = 0; j < NT; ++j) dots[j] = horizontal_sum(acc[j][0] + acc[j][1]);
  return horizontal_sum(sum[0] + sum[1]);
}

// total += e * r
CARP_INLINE void accumulate_scaled(const float* e, float r, float* total, int64_t n) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) store(total + c, load(total + c) + load(e + c) * r);
  for (; c < n; ++c) total[c] += e[c] * r;
}

// p *= r, then total += p.
CARP_INLINE void scale_and_accumulate(float* p, float r, float* total, int64_t n) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    const VecF v = load(p + c) * r;
    store(p + c, v);
    store(total + c, load(total + c) + v);
  }
  for (; c < n; ++c) {
    p[c] *= r;
    total[c] += p[c];
  }
}

CARP_INLINE float dot(const float* a, const float* b, int64_t n) {
  VecF acc[kChains] = {};
  int64_t c = 0;
  for (; c + kBlock <= n; c += kBlock) {
    for (int64_t k = 0; k < kChains; ++k) {
      acc[k] += load(a + c + k * kLanes) * load(b + c + k * kLanes);
    }
  }
  for (; c + kLanes <= n; c += kLanes) acc[0] += load(a + c) * load(b + c);
  if (c < n) acc[0] += load_tail(a + c, n - c, 0.0f) * load_tail(b + c, n - c, 0.0f);
  return combine_sum(acc);
}

// p = exp(x - m) * r, the softmax as the forward computed it.
CARP_INLINE void recompute_probs(const float* x, float m, float r, float* p, int64_t n) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) store(p + c, exp_nonpositive(load(x + c) - m) * r);
  if (c < n) {
    store_tail(p + c, exp_nonpositive(load_tail(x + c, n - c, -kInf) - m) * r, n - c);
  }
}

CARP_INLINE VecF grad_wrt_probs(const float* grad_total, const WeightedTeachers& t, int64_t c) {
  VecF d = load(grad_total + c);
  for (int64_t j = 0; j < t.count; ++j) d += t.weight[j] * load(t.probs[j] + c);
  return d;
}

// From the student slice x and its stats: p into `p`, dL/dp into `dp`; returns <p, dL/dp>.
// dL/dp = dL/dS_g + sum_j dL/da_j q_j.
CARP_INLINE float probs_and_grad(const float* x, float m, float r, const float* grad_total,
                                 const WeightedTeachers& t, float* p, float* dp, int64_t n) {
  VecF acc[kChains] = {};
  int64_t c = 0;
  for (; c + kBlock <= n; c += kBlock) {
    for (int64_t k = 0; k < kChains; ++k) {
      const int64_t o = c + k * kLanes;
      const VecF pv = exp_nonpositive(load(x + o) - m) * r;
      const VecF dv = grad_wrt_probs(grad_total, t, o);
      store(p + o, pv);
      store(dp + o, dv);
      acc[k] += pv * dv;
    }
  }
  for (; c + kLanes <= n; c += kLanes) {
    const VecF pv = exp_nonpositive(load(x + c) - m) * r;
    const VecF dv = grad_wrt_probs(grad_total, t, c);
    store(p + c, pv);
    store(dp + c, dv);
    acc[0] += pv * dv;
  }
  float tail = 0.0f;
  if (c < n) {
    store_tail(p + c, exp_nonpositive(load_tail(x + c, n - c, -kInf) - m) * r, n - c);
    for (; c < n; ++c) {
      float d = grad_total[c];
      for (int64_t j = 0; j < t.count; ++j) d += t.weight[j] * t.probs[j][c];
      dp[c] = d;
      tail += p[c] * d;
    }
  }
  return combine_sum(acc) + tail;
}

// out = p * (dp - s)
CARP_INLINE void softmax_backward(const float* p, const float* dp, float s, float* out, int64_t n) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) store(out + c, load(p + c) * (load(dp + c) - s));
  for (; c < n; ++c) out[c] = p[c] * (dp[c] - s);
}

// The student views of one (b, g): stats, agreements with the teacher probabilities q
// ([Vt, P]), the consistency terms, and total += p. NT is the number of teacher views
// when it is small enough to keep one accumulator per view in registers; NT = 0 takes any
// number and computes the agreements in separate passes over p.
template <int NT>
CARP_INLINE void student_slices(const ForwardItem& a, int64_t b, int64_t group, const float* q,
                                float* total, Scratch& scratch, double* loss) {
  const LossShape& s = a.shape;
  const int64_t P = s.partition_size;
  const int64_t slice = b * s.num_groups + group;
  float* e = scratch.probs.data();
  float dots[NT > 0 ? NT : 1];
  for (int64_t i = 0; i < s.num_student; ++i) {
    const float* x = slice_as_float(a.student, (i * s.batch + b) * s.num_groups * P + group * P, P,
                                    scratch.widened.data());
    float* stats = a.student_stats + (i * s.batch * s.num_groups + slice) * 2;
    const float m = slice_max(x, P);
    float r;
    if constexpr (NT > 0) {
      r = 1.0f / exp_shifted_with_dots<NT>(x, m, e, q, P, dots, P);
      accumulate_scaled(e, r, total, P);
    } else {
      r = 1.0f / exp_shifted(x, m, e, P);
      scale_and_accumulate(e, r, total, P);  // e now holds p
    }
    stats[0] = m;
    stats[1] = r;
    for (int64_t j = 0; j < s.num_teacher; ++j) {
      float agreement;
      if constexpr (NT > 0) {
        agreement = r * dots[j];
      } else {
        agreement = dot(e, q + j * P, P);
      }
      a.agreement[((i * s.num_teacher + j) * s.batch) * s.num_groups + slice] = agreement;
      if (i != j) *loss += pair_loss(agreement);
    }
  }
}

// Writes the item's sum of -log clamp(a) over its pairs i != j to *loss.
CARP_SIMD_TARGET void forward_item(const ForwardItem& a, int64_t group, int64_t chunk,
                                   Scratch& scratch, double* loss) {
  const LossShape& s = a.shape;
  const int64_t P = s.partition_size;
  const int64_t width = s.num_groups * P;
  float* total = a.prob_partial + (chunk * s.num_groups + group) * P;
  std::fill(total, total + P, 0.0f);
  float* q = scratch.teacher_probs.data();
  *loss = 0.0;

  const int64_t b_end = std::min(s.batch, (chunk + 1) * a.batch_per_chunk);
  for (int64_t b = chunk * a.batch_per_chunk; b < b_end; ++b) {
    const int64_t slice = b * s.num_groups + group;  // index of (b, g) in [B, G]
    if (b + 1 < b_end) {
      prefetch_logits(a.teacher, s, b + 1, group);
      prefetch_logits(a.student, s, b + 1, group);
    }
    for (int64_t j = 0; j < s.num_teacher; ++j) {
      const float* x = slice_as_float(a.teacher, (j * s.batch + b) * width + group * P, P,
                                      scratch.widened.data());
      float* stats = a.teacher_stats + (j * s.batch * s.num_groups + slice) * 2;
      stats[0] = slice_max(x, P);
      stats[1] = 1.0f / exp_shifted(x, stats[0], q + j * P, P);
      scale_and_accumulate(q + j * P, stats[1], total, P);
    }
    switch (s.num_teacher) {
      case 1: student_slices<1>(a, b, group, q, total, scratch, loss); break;
      case 2: student_slices<2>(a, b, group, q, total, scratch, loss); break;
      case 3: student_slices<3>(a, b, group, q, total, scratch, loss); break;
      case 4: student_slices<4>(a, b, group, q, total, scratch, loss); break;
      default: student_slices<0>(a, b, group, q, total, scratch, loss); break;
    }
  }
}

CARP_SIMD_TARGET void backward_item(const BackwardItem& a, int64_t b, int64_t group,
                                    Scratch& scratch) {
  const LossShape& s = a.shape;
  const int64_t P = s.partition_size;
  const int64_t width = s.num_groups * P;
  const int64_t slice = b * s.num_groups + group;
  float* q = scratch.teacher_probs.data();
  float* p = scratch.probs.data();
  float* dp = scratch.work.data();
  const float* grad_total = a.grad_prob_sum + group * P;

  for (int64_t j = 0; j < s.num_teacher; ++j) {
    const float* x =
        slice_as_float(a.teacher, (j * s.batch + b) * width + group * P, P, scratch.widened.data());
    const float* stats = a.teacher_stats + (j * s.batch * s.num_groups + slice) * 2;
    recompute_probs(x, stats[0], stats[1], q + j * P, P);
  }
  for (int64_t i = 0; i < s.num_student; ++i) {
    const int64_t offset = (i * s.batch + b) * width + group * P;
    const float* x = slice_as_float(a.student, offset, P, scratch.widened.data());
    const float* stats = a.student_stats + (i * s.batch * s.num_groups + slice) * 2;

    WeightedTeachers terms{0, scratch.teacher_weight.data(), scratch.teacher_term.data()};
    for (int64_t j = 0; j < s.num_teacher; ++j) {
      const float agreement =
          a.agreement[((i * s.num_teacher + j) * s.batch) * s.num_groups + slice];
      // The diagonal pair is not a term; a clamped agreement passes no gradient.
      if (i == j || !(agreement >= kAgreementMin && agreement <= kAgreementMax)) continue;
      const float w = -a.grad_per_term / agreement;
      scratch.teacher_weight[terms.count] = w;
      scratch.teacher_term[terms.count] = q + j * P;
      ++terms.count;
    }
    const float p_dot_dp = probs_and_grad(x, stats[0], stats[1], grad_total, terms, p, dp, P);

    if (a.student.dtype == at::kFloat) {
      softmax_backward(p, dp, p_dot_dp, static_cast<float*>(a.grad_student) + offset, P);
      continue;
    }
    // Half precision: the fp32 result goes through the scratch before it is narrowed.
    softmax_backward(p, dp, p_dot_dp, dp, P);
    if (a.student.dtype == at::kBFloat16) {
      auto* out = static_cast<c10::BFloat16*>(a.grad_student) + offset;
      for (int64_t c = 0; c < P; ++c) out[c] = static_cast<c10::BFloat16>(dp[c]);
    } else {
      auto* out = static_cast<c10::Half*>(a.grad_student) + offset;
      for (int64_t c = 0; c < P; ++c) out[c] = static_cast<c10::Half>(dp[c]);
    }
  }
}
