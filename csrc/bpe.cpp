// Byte-level BPE: the training hot loop (pair counting and merging) and word encoding.
//
// setup.py entry:
//   Pybind11Extension("megalm._bpe_cpp", ["csrc/bpe.cpp"], cxx_std=17, extra_compile_args=["-O3"])
// Without it, megalm/data/_native.py compiles this file on first use; without a compiler,
// megalm/data/tokenizer/bpe_train.py and bpe.py run the same algorithms in Python.
//
// Training works on the unique pre-token words of the corpus with their counts. Each word starts
// as its bytes (token id = byte value). Pair counts are kept in a hash map, and for every pair the
// list of words that contain it. The most frequent pair is chosen with a lazy max-heap: an entry
// whose count is out of date is pushed again with the current count. Merging (a, b) -> new only
// changes the counts of pairs that overlap an occurrence of (a, b), so only the words holding the
// pair are rewritten; the pairs that grow are exactly those containing the new token, and they are
// pushed once the merge is done.
//
// Tie-breaking, shared with the Python fallback: the highest count wins; among equal counts the
// smallest (left id, right id). The result is therefore independent of hash-map iteration order.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <queue>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using Pair = uint64_t;  // (left << 32) | right

inline Pair make_pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}
inline int32_t left_of(Pair p) { return static_cast<int32_t>(p >> 32); }
inline int32_t right_of(Pair p) { return static_cast<int32_t>(p & 0xffffffffu); }

struct Candidate {
    int64_t count;
    Pair pair;
};

// std::priority_queue pops the "largest": the highest count, then the smallest pair.
struct CandidateOrder {
    bool operator()(const Candidate& x, const Candidate& y) const {
        if (x.count != y.count) return x.count < y.count;
        return x.pair > y.pair;
    }
};

std::vector<std::pair<int32_t, int32_t>> train_merges(const std::vector<std::string>& words_in,
                                                      const std::vector<int64_t>& counts_in,
                                                      int64_t num_merges, int64_t min_frequency) {
    if (words_in.size() != counts_in.size()) throw std::invalid_argument("words and counts differ in length");
    std::vector<std::vector<int32_t>> words(words_in.size());
    std::unordered_map<Pair, int64_t> counts;
    std::unordered_map<Pair, std::vector<int32_t>> where;
    counts.reserve(1 << 16);
    where.reserve(1 << 16);

    for (size_t w = 0; w < words_in.size(); ++w) {
        const std::string& s = words_in[w];
        auto& ids = words[w];
        ids.reserve(s.size());
        for (unsigned char c : s) ids.push_back(c);
        for (size_t j = 0; j + 1 < ids.size(); ++j) {
            Pair p = make_pair_key(ids[j], ids[j + 1]);
            counts[p] += counts_in[w];
            auto& list = where[p];
            if (list.empty() || list.back() != static_cast<int32_t>(w)) list.push_back(static_cast<int32_t>(w));
        }
    }

    std::priority_queue<Candidate, std::vector<Candidate>, CandidateOrder> heap;
    for (const auto& kv : counts) heap.push({kv.second, kv.first});

    std::vector<std::pair<int32_t, int32_t>> merges;
    std::vector<int32_t> merged;
    std::vector<Pair> grown;
    {
        py::gil_scoped_release release;
        while (static_cast<int64_t>(merges.size()) < num_merges && !heap.empty()) {
            Candidate top = heap.top();
            heap.pop();
            auto it = counts.find(top.pair);
            int64_t current = it == counts.end() ? 0 : it->second;
            if (current != top.count) {
                if (current > 0) heap.push({current, top.pair});
                continue;
            }
            if (current < min_frequency || current <= 0) break;

            const int32_t a = left_of(top.pair), b = right_of(top.pair);
            const int32_t token = 256 + static_cast<int32_t>(merges.size());
            merges.emplace_back(a, b);

            std::vector<int32_t> holders = std::move(where[top.pair]);
            where.erase(top.pair);
            grown.clear();
            for (int32_t w : holders) {
                auto& ids = words[w];
                const int64_t wc = counts_in[w];
                merged.clear();
                bool found = false;
                for (size_t i = 0; i < ids.size();) {
                    if (i + 1 < ids.size() && ids[i] == a && ids[i + 1] == b) {
                        merged.push_back(token);
                        found = true;
                        i += 2;
                    } else {
                        merged.push_back(ids[i]);
                        i += 1;
                    }
                }
                if (!found) continue;
                for (size_t j = 0; j + 1 < ids.size(); ++j) counts[make_pair_key(ids[j], ids[j + 1])] -= wc;
                for (size_t j = 0; j + 1 < merged.size(); ++j) {
                    Pair p = make_pair_key(merged[j], merged[j + 1]);
                    counts[p] += wc;
                    if (merged[j] == token || merged[j + 1] == token) {
                        auto& list = where[p];
                        if (list.empty()) grown.push_back(p);
                        if (list.empty() || list.back() != w) list.push_back(w);
                    }
                }
                ids.swap(merged);
            }
            counts.erase(top.pair);
            for (Pair p : grown) heap.push({counts[p], p});
        }
    }
    return merges;
}

// Encodes pre-token words with a fixed merge table: repeatedly merge the adjacent pair of lowest
// rank, all of its occurrences left to right, until no adjacent pair has a rank.
class Encoder {
  public:
    Encoder(const std::vector<int32_t>& byte_ids, const std::vector<std::tuple<int32_t, int32_t, int32_t>>& merges) {
        if (byte_ids.size() != 256) throw std::invalid_argument("byte_ids must have 256 entries");
        byte_ids_ = byte_ids;
        ranks_.reserve(merges.size() * 2);
        for (size_t r = 0; r < merges.size(); ++r) {
            const auto& m = merges[r];
            ranks_[make_pair_key(std::get<0>(m), std::get<1>(m))] = {static_cast<int32_t>(r), std::get<2>(m)};
        }
    }

    std::vector<int32_t> encode(const std::string& word) const {
        std::vector<int32_t> ids;
        ids.reserve(word.size());
        for (unsigned char c : word) ids.push_back(byte_ids_[c]);
        std::vector<int32_t> out;
        while (ids.size() >= 2) {
            int32_t best_rank = INT32_MAX, best_token = -1;
            Pair best = 0;
            for (size_t j = 0; j + 1 < ids.size(); ++j) {
                auto it = ranks_.find(make_pair_key(ids[j], ids[j + 1]));
                if (it != ranks_.end() && it->second.first < best_rank) {
                    best_rank = it->second.first;
                    best_token = it->second.second;
                    best = it->first;
                }
            }
            if (best_token < 0) break;
            const int32_t a = left_of(best), b = right_of(best);
            out.clear();
            for (size_t i = 0; i < ids.size();) {
                if (i + 1 < ids.size() && ids[i] == a && ids[i + 1] == b) {
                    out.push_back(best_token);
                    i += 2;
                } else {
                    out.push_back(ids[i]);
                    i += 1;
                }
            }
            ids.swap(out);
        }
        return ids;
    }

    std::vector<std::vector<int32_t>> encode_many(const std::vector<std::string>& words) const {
        std::vector<std::vector<int32_t>> result(words.size());
        py::gil_scoped_release release;
        for (size_t i = 0; i < words.size(); ++i) result[i] = encode(words[i]);
        return result;
    }

  private:
    std::vector<int32_t> byte_ids_;
    std::unordered_map<Pair, std::pair<int32_t, int32_t>> ranks_;  // pair -> (rank, merged token)
};

}  // namespace

PYBIND11_MODULE(_bpe_cpp, m) {
    m.doc() = "Byte-level BPE training and encoding (megalm)";
    m.def("train_merges", &train_merges, py::arg("words"), py::arg("counts"), py::arg("num_merges"),
          py::arg("min_frequency"),
          "Learn up to num_merges merges from unique words (bytes) with counts; merge i makes token 256 + i.");
    py::class_<Encoder>(m, "Encoder")
        .def(py::init<const std::vector<int32_t>&, const std::vector<std::tuple<int32_t, int32_t, int32_t>>&>(),
             py::arg("byte_ids"), py::arg("merges"))
        .def("encode", &Encoder::encode, py::arg("word"))
        .def("encode_many", &Encoder::encode_many, py::arg("words"));
}
