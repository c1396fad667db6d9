#include "common.h"

// Serving's distinct history positions: (used [U], inverse [M]), the positions of one history
// of n behaviors that `indices` [M] or its last `window` behaviors read, ascending, and each
// index's row among them (used[inverse[i]] = indices[i]; the window is used's last rows). A
// mark per position, instead of torch's fill, nonzero, cumsum and gather over the history.
std::vector<torch::Tensor> distinct_positions(torch::Tensor indices, int64_t n, int64_t window) {
  TORCH_CHECK(0 <= window && window <= n, "distinct_positions: window ", window, " outside [0, ",
              n, "]");
  indices = indices.to(torch::kInt64).contiguous();
  const int64_t m = indices.numel();
  const int64_t* idx = indices.data_ptr<int64_t>();
  check_ids(idx, m, n, "distinct_positions: index", c10::str("history of ", n));
  std::vector<int64_t> rank(n, -1);  // -1: not read; then the position's row among the used
  for (int64_t i = 0; i < m; ++i) rank[idx[i]] = 0;
  std::fill(rank.begin() + (n - window), rank.end(), 0);
  std::vector<int64_t> used;
  for (int64_t p = 0; p < n; ++p)
    if (rank[p] == 0) rank[p] = used.size(), used.push_back(p);
  auto inverse = torch::empty({m}, torch::kInt64);
  int64_t* inv = inverse.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) inv[i] = rank[idx[i]];
  auto out = torch::empty({(int64_t)used.size()}, torch::kInt64);
  std::copy(used.begin(), used.end(), out.data_ptr<int64_t>());
  return {out, inverse};
}

// rows [U, D_0 + D_1 + ..]: row u is [tables[0][ids[0][p]], tables[1][ids[1][p]], ..] with
// p = positions[u] (or u without positions): the rows of several tables, each read through its
// own id list, side by side, copied once (any one dtype; no autograd).
torch::Tensor gather_rows(std::vector<torch::Tensor> tables, std::vector<torch::Tensor> ids,
                          torch::Tensor positions, bool has_positions) {
  TORCH_CHECK(!tables.empty() && tables.size() == ids.size(),
              "gather_rows: a list of ids per table");
  const int64_t n = ids[0].numel();
  int64_t width = 0;
  for (size_t i = 0; i < tables.size(); ++i) {
    TORCH_CHECK(tables[i].dim() == 2 && tables[i].dtype() == tables[0].dtype(),
                "gather_rows: tables must be 2-D of one dtype");
    TORCH_CHECK(ids[i].dim() == 1 && ids[i].numel() == n, "gather_rows: id lists of one length");
    tables[i] = tables[i].contiguous();
    ids[i] = ids[i].to(torch::kInt64).contiguous();
    width += tables[i].size(1);
  }
  positions = positions.to(torch::kInt64).contiguous();
  const int64_t U = has_positions ? positions.numel() : n;
  const int64_t* pos = has_positions ? positions.data_ptr<int64_t>() : nullptr;
  if (pos) check_ids(pos, U, n, "gather_rows: position", c10::str(n, " ids"));
  const int64_t elem = tables[0].element_size();
  auto out = torch::empty({U, width}, tables[0].options());
  char* o = static_cast<char*>(out.data_ptr());
  int64_t column = 0;
  for (size_t i = 0; i < tables.size(); ++i) {
    const char* t = static_cast<const char*>(tables[i].data_ptr());
    const int64_t* id = ids[i].data_ptr<int64_t>();
    const int64_t rows = tables[i].size(0), bytes = tables[i].size(1) * elem;
    for (int64_t u = 0; u < U; ++u) {
      const int64_t r = id[pos ? pos[u] : u];
      TORCH_CHECK(0 <= r && r < rows, "gather_rows: id ", r, " outside the table of ", rows,
                  " rows");
      std::memcpy(o + (u * width + column) * elem, t + r * bytes, bytes);
    }
    column += tables[i].size(1);
  }
  return out;
}

TORCH_LIBRARY_IMPL(longseq, CPU, m) {
  m.impl("distinct_positions", [](torch::Tensor indices, int64_t n, int64_t window) {
    return two(distinct_positions(indices, n, window));
  });
  m.impl("gather_rows", [](std::vector<torch::Tensor> tables, std::vector<torch::Tensor> ids,
                           std::optional<torch::Tensor> positions) {
    const bool has_positions = positions.has_value();
    return gather_rows(tables, ids,
                       has_positions ? *positions : torch::zeros({0}, torch::kInt64),
                       has_positions);
  });
}
