// Python binding of the scheduler (pybind11 only, no torch headers).
//
// Batch arrays are exposed as int32 buffer objects that share the batch's memory and
// keep it alive, so torch.frombuffer(b.input_ids, dtype=torch.int32) is zero-copy and
// stays valid for as long as the tensor does.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <limits>
#include <string>

#include "scheduler.h"

namespace py = pybind11;
using tokenspeed::Batch;
using tokenspeed::BatchEntry;
using tokenspeed::Scheduler;
using tokenspeed::SchedulerConfig;

namespace {

// One int32 array of a batch, viewed through the buffer protocol.
struct Int32Array {
  std::shared_ptr<Batch> owner;
  std::vector<int32_t>* data;
};

using ArrayField = std::vector<int32_t> Batch::*;

Int32Array array_of(const std::shared_ptr<Batch>& batch, ArrayField field) {
  return Int32Array{batch, &((*batch).*field)};
}

int32_t checked_token(int64_t value, size_t index, const std::string& name) {
  if (value < 0 || value > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument(name + "[" + std::to_string(index) + "] is " +
                                std::to_string(value) + ", ids must be in [0, 2^31)");
  return static_cast<int32_t>(value);
}

template <typename T>
void read_strided(const py::buffer_info& info, std::vector<int32_t>& out,
                  const std::string& name) {
  const char* base = static_cast<const char*>(info.ptr);
  for (py::ssize_t i = 0; i < info.shape[0]; ++i) {
    T v;
    std::memcpy(&v, base + i * info.strides[0], sizeof(T));
    out.push_back(checked_token(static_cast<int64_t>(v), size_t(i), name));
  }
}

// Token ids from a 1-D integer buffer (array.array, numpy), anything with tolist()
// (torch.Tensor), or a sequence of Python ints.
std::vector<int32_t> to_token_ids(const py::handle& obj, const std::string& name = "token_ids") {
  std::vector<int32_t> out;
  if (PyObject_CheckBuffer(obj.ptr()) && !py::isinstance<py::bytes>(obj) &&
      !py::isinstance<py::bytearray>(obj)) {
    const py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request();
    if (info.ndim != 1)
      throw py::type_error(name + " must be 1-D, got a buffer of " +
                           std::to_string(info.ndim) + " dimensions");
    const char kind = info.format.empty() ? '?' : info.format.back();
    const bool is_signed = kind == 'b' || kind == 'h' || kind == 'i' || kind == 'l' || kind == 'q';
    const bool is_unsigned = kind == 'B' || kind == 'H' || kind == 'I' || kind == 'L' || kind == 'Q';
    if (!is_signed && !is_unsigned)
      throw py::type_error(name + " must hold integers, got buffer format '" + info.format + "'");
    out.reserve(size_t(info.shape[0]));
    switch (info.itemsize * (is_signed ? 1 : -1)) {
      case 1: read_strided<int8_t>(info, out, name); break;
      case 2: read_strided<int16_t>(info, out, name); break;
      case 4: read_strided<int32_t>(info, out, name); break;
      case 8: read_strided<int64_t>(info, out, name); break;
      case -1: read_strided<uint8_t>(info, out, name); break;
      case -2: read_strided<uint16_t>(info, out, name); break;
      case -4: read_strided<uint32_t>(info, out, name); break;
      case -8: read_strided<int64_t>(info, out, name); break;  // values >= 2^63 read negative: refused
      default: throw py::type_error(name + ": unsupported item size " +
                                    std::to_string(info.itemsize));
    }
    return out;
  }
  py::object seq = py::reinterpret_borrow<py::object>(obj);
  if (py::hasattr(seq, "tolist") && !py::isinstance<py::list>(seq)) seq = seq.attr("tolist")();
  if (!py::isinstance<py::sequence>(seq) || py::isinstance<py::str>(seq))
    throw py::type_error(name + " must be a 1-D sequence of ints, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  // one pass over the items as an array (a list's own; other sequences copied once)
  const py::object fast = py::reinterpret_steal<py::object>(
      PySequence_Fast(seq.ptr(), (name + " must be a sequence").c_str()));
  if (!fast) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
  PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
  out.reserve(size_t(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    // a plain int is read as it is (no reference taken); other int-likes (numpy, 0-d
    // tensors) through __index__, whose result `index` owns
    PyObject* as_int = items[i];
    py::object index;
    if (!PyLong_CheckExact(as_int)) {
      index = py::reinterpret_steal<py::object>(PyNumber_Index(as_int));
      if (!index) {
        PyErr_Clear();
        throw py::type_error(name + "[" + std::to_string(i) + "] is not an int: " +
                             std::string(py::repr(as_int)));
      }
      as_int = index.ptr();
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(as_int, &overflow);
    if (overflow != 0)
      throw std::invalid_argument(name + "[" + std::to_string(i) + "] is " +
                                  std::string(py::str(as_int)) + ", ids must be in [0, 2^31)");
    out.push_back(checked_token(v, size_t(i), name));
  }
  return out;
}

py::list to_list(const std::vector<int32_t>& v) {
  py::list out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = py::int_(v[i]);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tokenspeed scheduler: paged KV allocation, radix prefix cache, chunked prefill";

  py::class_<Int32Array>(m, "Int32Array", py::buffer_protocol(),
                         "int32 array of a Batch; torch.frombuffer(x, dtype=torch.int32) "
                         "shares its memory (an empty array has no buffer torch accepts)")
      .def_buffer([](Int32Array& a) {
        return py::buffer_info(a.data->data(), sizeof(int32_t),
                               py::format_descriptor<int32_t>::format(), 1,
                               {py::ssize_t(a.data->size())}, {py::ssize_t(sizeof(int32_t))},
                               /*readonly=*/false);
      })
      .def("__len__", [](const Int32Array& a) { return a.data->size(); })
      .def("tolist", [](const Int32Array& a) { return to_list(*a.data); })
      .def("__repr__", [](const Int32Array& a) {
        return "Int32Array(" + std::string(py::repr(to_list(*a.data))) + ")";
      });

  py::class_<BatchEntry>(m, "BatchEntry")
      .def_readonly("request_id", &BatchEntry::request_id)
      .def_readonly("begin", &BatchEntry::begin)
      .def_readonly("end", &BatchEntry::end)
      .def_readonly("cached_len", &BatchEntry::cached_len)
      .def_readonly("score_begin", &BatchEntry::score_begin)
      .def_readonly("score_end", &BatchEntry::score_end)
      .def_property_readonly("pages", [](const BatchEntry& e) { return to_list(e.pages); })
      .def("__repr__", [](const BatchEntry& e) {
        return "BatchEntry(request_id=" + std::to_string(e.request_id) +
               ", begin=" + std::to_string(e.begin) + ", end=" + std::to_string(e.end) +
               ", cached_len=" + std::to_string(e.cached_len) +
               ", score=[" + std::to_string(e.score_begin) + ", " +
               std::to_string(e.score_end) + "))";
      });

  auto batch = py::class_<Batch, std::shared_ptr<Batch>>(m, "Batch");
  batch.def_property_readonly("entries", [](const Batch& b) { return b.entries; })
      .def_property_readonly("num_tokens", [](const Batch& b) { return b.input_ids.size(); })
      .def_property_readonly("num_requests", [](const Batch& b) { return b.entries.size(); })
      .def_property_readonly("num_scored", [](const Batch& b) { return b.score_rows.size(); })
      .def_readonly("max_pages", &Batch::max_pages)
      .def("__repr__", [](const Batch& b) {
        return "Batch(num_requests=" + std::to_string(b.entries.size()) +
               ", num_tokens=" + std::to_string(b.input_ids.size()) +
               ", num_scored=" + std::to_string(b.score_rows.size()) + ")";
      });
  const std::pair<const char*, ArrayField> arrays[] = {
      {"input_ids", &Batch::input_ids},       {"positions", &Batch::positions},
      {"slot_mapping", &Batch::slot_mapping}, {"page_table", &Batch::page_table},
      {"cu_seqlens_q", &Batch::cu_seqlens_q}, {"kv_lens", &Batch::kv_lens},
      {"score_rows", &Batch::score_rows},     {"score_targets", &Batch::score_targets}};
  for (const auto& [name, field] : arrays)
    batch.def_property_readonly(name, [field = field](const std::shared_ptr<Batch>& b) {
      return array_of(b, field);
    });

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init([](int64_t num_pages, int64_t page_size, int64_t max_batch_tokens,
                       int64_t max_batch_requests, bool enable_prefix_cache, bool route_keys) {
             SchedulerConfig c;
             c.num_pages = num_pages;
             c.page_size = page_size;
             c.max_batch_tokens = max_batch_tokens;
             c.max_batch_requests = max_batch_requests;
             c.enable_prefix_cache = enable_prefix_cache;
             c.route_keys = route_keys;
             return std::make_unique<Scheduler>(c);
           }),
           py::arg("num_pages"), py::arg("page_size"), py::arg("max_batch_tokens"),
           py::arg("max_batch_requests") = 256, py::arg("enable_prefix_cache") = true,
           py::arg("route_keys") = false)
      .def("add",
           [](Scheduler& s, int64_t request_id, const py::object& token_ids,
              int64_t logprob_start, const py::object& route_ids) {
             s.add(request_id, to_token_ids(token_ids), logprob_start,
                   route_ids.is_none() ? std::vector<int32_t>{} : to_token_ids(route_ids, "route_ids"));
           },
           py::arg("request_id"), py::arg("token_ids"), py::arg("logprob_start"),
           py::arg("route_ids") = py::none(),
           "Queue a request; positions [logprob_start, len(token_ids) - 1) are scored. "
           "route_ids (a scheduler built with route_keys): one id >= 0 per position that "
           "the prefix cache compares along with the tokens (default all 0).")
      .def("schedule", &Scheduler::schedule,
           "The next batch, or None when nothing can run now. Run batches whole and in "
           "the order they were scheduled: an entry may read K/V an earlier entry of the "
           "same batch writes.")
      .def("complete", &Scheduler::complete, py::arg("batch"),
           "Mark a batch computed; returns the ids that finished, in entry order.")
      .def("abort", &Scheduler::abort, py::arg("request_id"),
           "Drop a request; pages other requests share stay theirs.")
      .def("flush", &Scheduler::flush,
           "Weights changed: drop unreferenced cached pages; running requests' pages are "
           "never matched or cached again.")
      .def("has_work", &Scheduler::has_work)
      .def("stats", [](const Scheduler& s) {
        const tokenspeed::SchedulerStats st = s.stats();
        py::dict d;
        d["total_pages"] = st.total_pages;
        d["free_pages"] = st.free_pages;
        d["cached_pages"] = st.cached_pages;
        d["owned_pages"] = st.owned_pages;
        d["prefix_hit_tokens"] = st.prefix_hit_tokens;
        d["same_batch_hit_tokens"] = st.same_batch_hit_tokens;
        d["inserted_pages"] = st.inserted_pages;
        d["evicted_pages"] = st.evicted_pages;
        d["waiting"] = st.waiting;
        d["running"] = st.running;
        return d;
      })
      .def_property_readonly("num_pages", [](const Scheduler& s) { return s.config().num_pages; })
      .def_property_readonly("page_size", [](const Scheduler& s) { return s.config().page_size; })
      .def_property_readonly("max_batch_tokens",
                             [](const Scheduler& s) { return s.config().max_batch_tokens; })
      .def_property_readonly("max_batch_requests",
                             [](const Scheduler& s) { return s.config().max_batch_requests; })
      .def_property_readonly("route_keys", [](const Scheduler& s) { return s.config().route_keys; })
      .def_property_readonly("enable_prefix_cache",
                             [](const Scheduler& s) { return s.config().enable_prefix_cache; })
      .def("page_states", [](const Scheduler& s) {
             py::list out;
             for (auto st : s.page_states()) out.append(static_cast<int32_t>(st));
             return out;
           },
           "Per page: 0 free, 1 owned by running requests, 2 cached and unreferenced.")
      .def("refcounts", [](const Scheduler& s) {
        std::vector<int32_t> out(size_t(s.config().num_pages));
        for (size_t p = 0; p < out.size(); ++p) out[p] = s.refcount(int32_t(p));
        return to_list(out);
      })
      .def("cached_tokens", [](const Scheduler& s, int32_t page) -> py::object {
             std::vector<int32_t> t = s.cached_tokens(page);
             if (t.empty()) return py::none();
             return to_list(t);
           },
           py::arg("page"), "Token ids a prefix-cache page holds, or None.")
      .def("check_invariants", [](const Scheduler& s) {
             const std::string violation = s.find_violation();
             if (!violation.empty()) throw std::logic_error("scheduler invariant: " + violation);
           },
           "Raise RuntimeError naming the first broken invariant.");

  // The engine's validation of every call's ids (tokenspeed/inputs.py) in one pass: its
  // Python checks (the items' types, then min and max) took ~50 ns a token, most of the
  // host's work before a call's first batch (bench/NOTES.md).
  m.def("first_bad_id",
        [](const py::list& tokens, int64_t vocab) -> int64_t {
          const Py_ssize_t n = PyList_GET_SIZE(tokens.ptr());
          for (Py_ssize_t i = 0; i < n; ++i) {
            PyObject* t = PyList_GET_ITEM(tokens.ptr(), i);
            if (!PyLong_CheckExact(t)) return i;
            int overflow = 0;
            const long long v = PyLong_AsLongLongAndOverflow(t, &overflow);
            if (overflow != 0 || v < 0 || v >= vocab) return i;
          }
          return -1;
        },
        py::arg("tokens"), py::arg("vocab"),
        "The index of the first item of the list that is not a plain int (bool and other "
        "int subclasses are not) in [0, vocab), or -1 when there is none.");
}
