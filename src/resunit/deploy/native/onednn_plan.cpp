// A network's forward pass as a fixed list of oneDNN primitives: created once, then run.
//
// Why this exists: at small sizes (ResNet-20 at batch 1) a forward is ~20 convolutions of
// ~10 µs each, and what a framework does between them costs as much again. PyTorch's oneDNN
// Graph bridge spends ~125 µs of serial work per forward there (BENCHMARKS.md, "Where that
// forward's time goes"). Here each layer is one `primitive::execute` on buffers laid out when
// the plan was built: no tensor allocation, no dispatch, no layout decision per call.
//
// The plan is built from Python (resunit/deploy/onednn_plan.py), which walks the folded
// model's graph and calls the `plan_*` functions below in execution order. Values are
// numbered by the caller; each new value gets memory from an arena slot that the caller
// releases after the value's last reader, so a deep network reuses a few buffers.
//
// A C interface (loaded with ctypes) so that building needs no Python headers: every
// function returns 0 on success or -1 with the message kept for `plan_error`.

#include <dnnl.hpp>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using dnnl::algorithm;
using dnnl::memory;
using dnnl::prop_kind;
using tag = memory::format_tag;
using dt = memory::data_type;

struct Step {
  dnnl::primitive primitive;
  std::unordered_map<int, memory> args;
};

// One block of memory that values whose lifetimes do not overlap take turns in.
struct Slot {
  std::shared_ptr<void> data;
  size_t bytes = 0;
  bool busy = false;
};

void* aligned_bytes(size_t bytes) {
  void* p = nullptr;
  // 64 bytes: one AVX-512 register, and oneDNN's own alignment for its buffers.
  if (posix_memalign(&p, 64, std::max<size_t>(bytes, 64)) != 0) throw std::bad_alloc();
  return p;
}

class Plan {
 public:
  Plan() : engine_(dnnl::engine::kind::cpu, 0), stream_(engine_) {}

  void input(int id, int64_t n, int64_t c, int64_t h, int64_t w, bool channels_last) {
    memory::desc d({n, c, h, w}, dt::f32, channels_last ? tag::nhwc : tag::nchw);
    values_[id] = memory(d, engine_, DNNL_MEMORY_NONE);  // the caller's tensor, per call
    input_ = id;
  }

  // dst = relu?(conv(src) + bias [+ dst]). With `accumulate`, dst already holds the other
  // addend (the residual unit's shortcut) and the convolution adds into it: oneDNN's sum
  // post-op, which saves reading and writing the sum once more.
  void convolution(int src, int dst, const float* weight, const float* bias, int64_t out_c,
                   int64_t in_c, int64_t groups, const int64_t* kernel, const int64_t* stride,
                   const int64_t* padding, const int64_t* dilation, bool accumulate, bool relu) {
    const memory::desc src_desc = value(src).get_desc();
    const memory::dims in = src_desc.get_dims();
    memory::dims out_hw(2);
    for (int i = 0; i < 2; ++i) {
      const int64_t span = dilation[i] * (kernel[i] - 1) + 1;
      out_hw[i] = (in[2 + i] + 2 * padding[i] - span) / stride[i] + 1;
    }
    const memory::dims user_dims =
        groups == 1 ? memory::dims{out_c, in_c / groups, kernel[0], kernel[1]}
                    : memory::dims{groups, out_c / groups, in_c / groups, kernel[0], kernel[1]};
    const memory::desc weights_any(user_dims, dt::f32, tag::any);
    const memory::desc bias_desc({out_c}, dt::f32, tag::x);
    const memory::desc dst_desc =
        accumulate ? value(dst).get_desc()
                   : memory::desc({in[0], out_c, out_hw[0], out_hw[1]}, dt::f32, tag::any);
    dnnl::post_ops ops;
    if (accumulate) ops.append_sum(1.f);
    if (relu) ops.append_eltwise(algorithm::eltwise_relu, 0.f, 0.f);
    const dnnl::primitive_attr attr = attributes(ops);
    // oneDNN counts dilation from 0 (no gaps), PyTorch from 1.
    const memory::dims gaps{dilation[0] - 1, dilation[1] - 1};
    dnnl::convolution_forward::primitive_desc pd(
        engine_, prop_kind::forward_inference, algorithm::convolution_direct, src_desc,
        weights_any, bias ? bias_desc : memory::desc(), dst_desc, {stride[0], stride[1]}, gaps,
        {padding[0], padding[1]}, {padding[0], padding[1]}, attr);
    Step step{dnnl::convolution_forward(pd), {}};
    step.args[DNNL_ARG_SRC] = value(src);
    step.args[DNNL_ARG_WEIGHTS] =
        constant(pd.weights_desc(), user_dims, groups == 1 ? tag::oihw : tag::goihw, weight);
    if (bias) step.args[DNNL_ARG_BIAS] = constant(bias_desc, {out_c}, tag::x, bias);
    if (!accumulate) define(dst, pd.dst_desc());
    step.args[DNNL_ARG_DST] = value(dst);
    add_step(std::move(step), pd.scratchpad_desc());
  }

  // dst = relu?(scale * (src - mean) / sqrt(var + eps) + shift): a BatchNorm that no
  // convolution precedes (a pre-activation unit's), with its statistics.
  void batch_norm(int src, int dst, const float* scale, const float* shift, const float* mean,
                  const float* var, float eps, bool relu) {
    using flags = dnnl::normalization_flags;
    const memory::desc src_desc = value(src).get_desc();
    flags f = flags::use_global_stats | flags::use_scale | flags::use_shift;
    if (relu) f = f | flags::fuse_norm_relu;
    dnnl::batch_normalization_forward::primitive_desc pd(
        engine_, prop_kind::forward_inference, src_desc, src_desc, eps, f, attributes({}));
    const int64_t c = src_desc.get_dims()[1];
    const memory::desc vec({c}, dt::f32, tag::x);
    define(dst, pd.dst_desc());
    Step step{dnnl::batch_normalization_forward(pd), {}};
    step.args[DNNL_ARG_SRC] = value(src);
    step.args[DNNL_ARG_SCALE] = constant(vec, {c}, tag::x, scale);
    step.args[DNNL_ARG_SHIFT] = constant(vec, {c}, tag::x, shift);
    step.args[DNNL_ARG_MEAN] = constant(vec, {c}, tag::x, mean);
    step.args[DNNL_ARG_VARIANCE] = constant(vec, {c}, tag::x, var);
    step.args[DNNL_ARG_DST] = value(dst);
    add_step(std::move(step), pd.scratchpad_desc());
  }

  // dst = relu?(a + b), for sums no convolution could take in.
  void add(int a, int b, int dst, bool relu) {
    dnnl::post_ops ops;
    if (relu) ops.append_eltwise(algorithm::eltwise_relu, 0.f, 0.f);
    const memory::desc a_desc = value(a).get_desc();
    dnnl::binary::primitive_desc pd(engine_, algorithm::binary_add, a_desc,
                                    value(b).get_desc(), a_desc, attributes(ops));
    define(dst, pd.dst_desc());
    Step step{dnnl::binary(pd), {}};
    step.args[DNNL_ARG_SRC_0] = value(a);
    step.args[DNNL_ARG_SRC_1] = value(b);
    step.args[DNNL_ARG_DST] = value(dst);
    add_step(std::move(step), pd.scratchpad_desc());
  }

  void relu(int src, int dst) {
    const memory::desc d = value(src).get_desc();
    dnnl::eltwise_forward::primitive_desc pd(engine_, prop_kind::forward_inference,
                                             algorithm::eltwise_relu, d, d, 0.f, 0.f,
                                             attributes({}));
    define(dst, pd.dst_desc());
    Step step{dnnl::eltwise_forward(pd), {}};
    step.args[DNNL_ARG_SRC] = value(src);
    step.args[DNNL_ARG_DST] = value(dst);
    add_step(std::move(step), pd.scratchpad_desc());
  }

  // Max pooling, or average pooling over the window's cells inside the image. Padding may
  // differ per side: PyTorch's ceil_mode is more padding at the bottom and right.
  void pool(int src, int dst, bool max, const int64_t* kernel, const int64_t* stride,
            const int64_t* pad_before, const int64_t* pad_after) {
    const memory::desc src_desc = value(src).get_desc();
    const memory::dims in = src_desc.get_dims();
    memory::dims out_hw(2);
    for (int i = 0; i < 2; ++i) {
      out_hw[i] = (in[2 + i] + pad_before[i] + pad_after[i] - kernel[i]) / stride[i] + 1;
    }
    const memory::desc dst_any({in[0], in[1], out_hw[0], out_hw[1]}, dt::f32, tag::any);
    dnnl::pooling_forward::primitive_desc pd(
        engine_, prop_kind::forward_inference,
        max ? algorithm::pooling_max : algorithm::pooling_avg_exclude_padding, src_desc, dst_any,
        {stride[0], stride[1]}, {kernel[0], kernel[1]}, {0, 0}, {pad_before[0], pad_before[1]},
        {pad_after[0], pad_after[1]}, attributes({}));
    define(dst, pd.dst_desc());
    Step step{dnnl::pooling_forward(pd), {}};
    step.args[DNNL_ARG_SRC] = value(src);
    step.args[DNNL_ARG_DST] = value(dst);
    add_step(std::move(step), pd.scratchpad_desc());
  }

  // A fully connected layer on (n, c) rows, or on a pooled (n, c, 1, 1) map that PyTorch
  // flattened into such rows (the caller refuses anything else); dst is plain rows.
  void linear(int src, int dst, const float* weight, const float* bias, int64_t out_c,
              int64_t in_features, bool relu) {
    const memory::desc src_desc = value(src).get_desc();
    const memory::dims in = src_desc.get_dims();
    int64_t features = 1;
    for (size_t i = 1; i < in.size(); ++i) features *= in[i];
    // The weight array holds out_c rows of in_features: never read past it.
    if (features != in_features) throw std::runtime_error("linear: input size does not match");
    memory::dims user_dims{out_c, in[1]};
    if (in.size() == 4) user_dims = {out_c, in[1], in[2], in[3]};
    const tag user_tag = in.size() == 4 ? tag::oihw : tag::oi;
    const memory::desc weights_any(user_dims, dt::f32, tag::any);
    const memory::desc bias_desc({out_c}, dt::f32, tag::x);
    const memory::desc dst_desc({in[0], out_c}, dt::f32, tag::nc);
    dnnl::post_ops ops;
    if (relu) ops.append_eltwise(algorithm::eltwise_relu, 0.f, 0.f);
    dnnl::inner_product_forward::primitive_desc pd(
        engine_, prop_kind::forward_inference, src_desc, weights_any,
        bias ? bias_desc : memory::desc(), dst_desc, attributes(ops));
    Step step{dnnl::inner_product_forward(pd), {}};
    step.args[DNNL_ARG_SRC] = value(src);
    step.args[DNNL_ARG_WEIGHTS] = constant(pd.weights_desc(), user_dims, user_tag, weight);
    if (bias) step.args[DNNL_ARG_BIAS] = constant(bias_desc, {out_c}, tag::x, bias);
    define(dst, pd.dst_desc());
    step.args[DNNL_ARG_DST] = value(dst);
    add_step(std::move(step), pd.scratchpad_desc());
  }

  // The value's slot may serve later values: every step reading it has been added.
  void release(int id) {
    auto it = slot_of_.find(id);
    if (it != slot_of_.end()) slots_[it->second].busy = false;
  }

  // The plan's result is `id`, written in plain row-major layout into the caller's tensor.
  void finish(int id, int64_t* dims, int* rank) {
    const memory::desc d = value(id).get_desc();
    const memory::dims shape = d.get_dims();
    const tag plain = shape.size() == 2 ? tag::nc : tag::nchw;
    const memory::desc plain_desc(shape, dt::f32, plain);
    // A blocked layout inside, or the input itself (a model that computes nothing): one
    // reorder (a copy) into the caller's tensor. Otherwise the last step writes the caller's
    // tensor directly: output_ is then the value's own memory object (a shared handle), so
    // rebinding it per call rebinds that step's destination too.
    if (d != plain_desc || id == input_) {
      output_ = memory(plain_desc, engine_, DNNL_MEMORY_NONE);
      Step step{dnnl::reorder(value(id), output_), {}};
      step.args[DNNL_ARG_FROM] = value(id);
      step.args[DNNL_ARG_TO] = output_;
      steps_.push_back(std::move(step));
    } else {
      output_ = value(id);
    }
    *rank = static_cast<int>(shape.size());
    std::copy(shape.begin(), shape.end(), dims);
    scratchpad_ = memory(memory::desc({static_cast<int64_t>(scratchpad_bytes_)}, dt::u8, tag::x),
                         engine_);
    for (auto& step : steps_) {
      if (step.args.count(DNNL_ARG_SCRATCHPAD)) step.args[DNNL_ARG_SCRATCHPAD] = scratchpad_;
    }
  }

  void run(void* in, void* out, int threads) {
    // The caller's thread count (torch.get_num_threads()); OpenMP keeps it per thread, and
    // a Python thread that never ran a torch op would otherwise use every core.
    if (threads > 0 && omp_get_max_threads() != threads) omp_set_num_threads(threads);
    values_.at(input_).set_data_handle(in);
    output_.set_data_handle(out);
    for (auto& step : steps_) step.primitive.execute(stream_, step.args);
    stream_.wait();
  }

 private:
  static dnnl::primitive_attr attributes(const dnnl::post_ops& ops) {
    dnnl::primitive_attr attr;
    attr.set_post_ops(ops);
    // One scratchpad for the whole plan (steps run one after another), not one per call.
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return attr;
  }

  memory& value(int id) {
    auto it = values_.find(id);
    if (it == values_.end()) throw std::runtime_error("value " + std::to_string(id) + " unknown");
    return it->second;
  }

  // Give value `id` the layout `desc` and memory from a free slot (or a new one).
  void define(int id, const memory::desc& desc) {
    if (values_.count(id)) throw std::runtime_error("value " + std::to_string(id) + " defined twice");
    const size_t bytes = desc.get_size();
    int best = -1;
    for (int i = 0; i < static_cast<int>(slots_.size()); ++i) {
      if (!slots_[i].busy && (best < 0 || slots_[i].bytes > slots_[best].bytes)) best = i;
    }
    if (best < 0) {
      slots_.push_back(Slot{});
      best = static_cast<int>(slots_.size()) - 1;
    }
    Slot& slot = slots_[best];
    if (slot.bytes < bytes) {
      // The values that used the old block keep pointing at it (their memory objects do
      // not own it): keep it allocated for them, and give this value a larger block.
      old_blocks_.push_back(slot.data);
      slot.data.reset(aligned_bytes(bytes), std::free);
      slot.bytes = bytes;
    }
    slot.busy = true;
    slot_of_[id] = best;
    values_[id] = memory(desc, engine_, slot.data.get());
  }

  // Weights and biases: copied from the caller's (plain) array into oneDNN's chosen layout.
  memory constant(const memory::desc& want, const memory::dims& dims, tag user, const float* p) {
    memory from(memory::desc(dims, dt::f32, user), engine_, const_cast<float*>(p));
    memory to(want, engine_);
    dnnl::reorder(from, to).execute(stream_, from, to);
    stream_.wait();
    return to;
  }

  void add_step(Step step, const memory::desc& scratchpad) {
    scratchpad_bytes_ = std::max(scratchpad_bytes_, scratchpad.get_size());
    step.args[DNNL_ARG_SCRATCHPAD] = memory();  // bound to the shared one in finish()
    steps_.push_back(std::move(step));
  }

  dnnl::engine engine_;
  dnnl::stream stream_;
  std::unordered_map<int, memory> values_;
  std::unordered_map<int, int> slot_of_;
  std::vector<Slot> slots_;
  std::vector<std::shared_ptr<void>> old_blocks_;
  std::vector<Step> steps_;
  memory output_;
  memory scratchpad_;
  size_t scratchpad_bytes_ = 0;
  int input_ = -1;
};

// Errors cross the C boundary as a return code and a message kept per plan.
struct Handle {
  Plan plan;
  std::string error;
};

template <typename F>
int guarded(Handle* h, F&& f) {
  try {
    f(h->plan);
    return 0;
  } catch (const dnnl::error& e) {
    h->error = std::string("oneDNN: ") + e.what() + " (status " + std::to_string(e.status) + ")";
  } catch (const std::exception& e) {
    h->error = e.what();
  }
  return -1;
}

}  // namespace

extern "C" {

void* plan_new() {
  try {
    return new Handle();
  } catch (...) {  // no exception may cross into C: the caller sees a null handle
    return nullptr;
  }
}
void plan_free(void* h) { delete static_cast<Handle*>(h); }
const char* plan_error(void* h) { return static_cast<Handle*>(h)->error.c_str(); }

int plan_input(void* h, int id, int64_t n, int64_t c, int64_t height, int64_t width,
               int channels_last) {
  return guarded(static_cast<Handle*>(h),
                 [&](Plan& p) { p.input(id, n, c, height, width, channels_last != 0); });
}

int plan_convolution(void* h, int src, int dst, const float* weight, const float* bias,
                     int64_t out_c, int64_t in_c, int64_t groups, const int64_t* kernel,
                     const int64_t* stride, const int64_t* padding, const int64_t* dilation,
                     int accumulate, int relu) {
  return guarded(static_cast<Handle*>(h), [&](Plan& p) {
    p.convolution(src, dst, weight, bias, out_c, in_c, groups, kernel, stride, padding,
                  dilation, accumulate != 0, relu != 0);
  });
}

int plan_batch_norm(void* h, int src, int dst, const float* scale, const float* shift,
                    const float* mean, const float* var, float eps, int relu) {
  return guarded(static_cast<Handle*>(h), [&](Plan& p) {
    p.batch_norm(src, dst, scale, shift, mean, var, eps, relu != 0);
  });
}

int plan_add(void* h, int a, int b, int dst, int relu) {
  return guarded(static_cast<Handle*>(h), [&](Plan& p) { p.add(a, b, dst, relu != 0); });
}

int plan_relu(void* h, int src, int dst) {
  return guarded(static_cast<Handle*>(h), [&](Plan& p) { p.relu(src, dst); });
}

int plan_pool(void* h, int src, int dst, int max, const int64_t* kernel, const int64_t* stride,
              const int64_t* pad_before, const int64_t* pad_after) {
  return guarded(static_cast<Handle*>(h), [&](Plan& p) {
    p.pool(src, dst, max != 0, kernel, stride, pad_before, pad_after);
  });
}

int plan_linear(void* h, int src, int dst, const float* weight, const float* bias,
                int64_t out_c, int64_t in_features, int relu) {
  return guarded(static_cast<Handle*>(h), [&](Plan& p) {
    p.linear(src, dst, weight, bias, out_c, in_features, relu != 0);
  });
}

int plan_release(void* h, int id) {
  return guarded(static_cast<Handle*>(h), [&](Plan& p) { p.release(id); });
}

int plan_finish(void* h, int id, int64_t* dims, int* rank) {
  return guarded(static_cast<Handle*>(h), [&](Plan& p) { p.finish(id, dims, rank); });
}

int plan_run(void* h, void* in, void* out, int threads) {
  return guarded(static_cast<Handle*>(h), [&](Plan& p) { p.run(in, out, threads); });
}

}  // extern "C"
