// GPT dataset index builders: the sample index and the blending index.
//
// setup.py entry:
//   Pybind11Extension("megalm._dataset_cpp", ["csrc/dataset_helpers.cpp"], cxx_std=17,
//                     extra_compile_args=["-O3", "-ffp-contract=off"])
// megalm/data/helpers.py holds the numpy / Python versions, which give identical arrays.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

// Sample i starts at token position i * seq_length of the stream formed by the documents in
// document_index order, and takes seq_length + 1 tokens. Row i of the result is
// (position in document_index, token offset in that document) of that start, where the
// document is the one with start <= position < end (empty documents are never chosen).
py::array_t<int64_t> build_sample_index(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes,
                                        py::array_t<int32_t, py::array::c_style | py::array::forcecast> document_index,
                                        int64_t seq_length, int64_t num_samples) {
    if (seq_length <= 0) throw std::invalid_argument("seq_length must be positive");
    auto sz = sizes.unchecked<1>();
    auto doc = document_index.unchecked<1>();
    const int64_t num_docs = doc.shape(0);
    py::array_t<int64_t> result({num_samples, static_cast<int64_t>(2)});
    auto out = result.mutable_unchecked<2>();
    {
        py::gil_scoped_release release;
        int64_t pos = 0;        // position in document_index
        int64_t doc_start = 0;  // stream position of the first token of document_index[pos]
        for (int64_t i = 0; i < num_samples; ++i) {
            const int64_t target = i * seq_length;
            while (pos < num_docs && doc_start + sz(doc(pos)) <= target) {
                doc_start += sz(doc(pos));
                ++pos;
            }
            if (pos >= num_docs) throw std::out_of_range("num_samples needs more tokens than document_index holds");
            out(i, 0) = pos;
            out(i, 1) = target - doc_start;
        }
    }
    return result;
}

// Sample i of a blend goes to the dataset that lags its target share the most:
// argmax_d (weights[d] * max(i, 1) - taken[d]), the first such d on ties.
py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                                 int64_t size) {
    auto w = weights.unchecked<1>();
    const int64_t n = w.shape(0);
    if (n <= 0 || n > 32767) throw std::invalid_argument("between 1 and 32767 datasets can be blended");
    py::array_t<int16_t> dataset_index(size);
    py::array_t<int64_t> dataset_sample_index(size);
    auto di = dataset_index.mutable_unchecked<1>();
    auto dsi = dataset_sample_index.mutable_unchecked<1>();
    {
        py::gil_scoped_release release;
        std::vector<int64_t> taken(n, 0);
        for (int64_t i = 0; i < size; ++i) {
            const double seen = static_cast<double>(i > 1 ? i : 1);
            int64_t best = 0;
            double best_error = w(0) * seen - static_cast<double>(taken[0]);
            for (int64_t d = 1; d < n; ++d) {
                const double error = w(d) * seen - static_cast<double>(taken[d]);
                if (error > best_error) {
                    best_error = error;
                    best = d;
                }
            }
            di(i) = static_cast<int16_t>(best);
            dsi(i) = taken[best]++;
        }
    }
    return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(_dataset_cpp, m) {
    m.doc() = "GPT dataset index builders (megalm)";
    m.def("build_sample_index", &build_sample_index, py::arg("sizes"), py::arg("document_index"),
          py::arg("seq_length"), py::arg("num_samples"));
    m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"));
}
