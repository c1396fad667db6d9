// The `longseq` operators: every schema, defined once. Each family's .cpp registers its CPU
// kernel (TORCH_LIBRARY_IMPL(longseq, CPU, m)); the fake (meta) kernels and the attention's
// autograd formula are registered from Python (torchrec_longseq/retrieval/kernels.py). Jagged
// segments are (starts [B], ends [B]) into the N history values; "shared": one history read by
// all B candidates (serving). Outputs whose size depends on the data ((indices [M], lengths [B])
// and the like) are new tensors; no operator mutates or aliases an input.
#include <torch/library.h>

TORCH_LIBRARY(longseq, m) {
  // ETA: Hamming top-k, signatures read from the item and category tables by id
  m.def("hamming_topk_by_id(Tensor item_table, Tensor item_ids, Tensor item_targets, "
        "Tensor category_table, Tensor category_ids, Tensor category_targets, Tensor starts, "
        "Tensor ends, int k) -> (Tensor indices, Tensor lengths)");
  m.def("hamming_topk_shared(Tensor item_table, Tensor item_ids, Tensor item_targets, "
        "Tensor category_table, Tensor category_ids, Tensor category_targets, int k) "
        "-> (Tensor indices, Tensor lengths)");
  // SIM: hard search (the k most recent behaviors of the target's category)
  m.def("hard_topk(Tensor categories, Tensor targets, Tensor starts, Tensor ends, int k) "
        "-> (Tensor indices, Tensor lengths)");
  m.def("hard_topk_shared(Tensor categories, Tensor targets, int k) "
        "-> (Tensor indices, Tensor lengths)");
  // float top-k per segment (SIM soft search)
  m.def("float_topk(Tensor scores, Tensor starts, Tensor ends, int k) "
        "-> (Tensor indices, Tensor lengths)");
  // TWIN: scores read by id, top-k per segment
  m.def("twin_topk_by_id(Tensor item_rows, Tensor items, Tensor category_rows, "
        "Tensor categories, Tensor queries, Tensor bias, Tensor starts, Tensor ends, int k, "
        "float scale, bool shared) -> (Tensor indices, Tensor lengths)");
  // SDIM: colliding distinct (item, category) pairs per segment
  m.def("sdim_collisions(Tensor item_codes, Tensor items, Tensor category_codes, "
        "Tensor categories, Tensor target_items, Tensor target_categories, Tensor starts, "
        "Tensor ends, int tau, int groups_per_word) "
        "-> (Tensor positions, Tensor lengths, Tensor weights)");
  // SimHash sign bits packed into int64 words
  m.def("pack_signs(Tensor projections) -> Tensor");
  // jagged target attention with the key projection absorbed: (agg [B, H, K], weights [M, H])
  m.def("attention_forward(Tensor qa, Tensor keys, Tensor offsets, Tensor? bias, "
        "Tensor? index) -> (Tensor agg, Tensor weights)");
  // its gradients per position: (dqa [B, H, K], dkeys [M, K], dlogits [M, H])
  m.def("attention_backward(Tensor grad, Tensor qa, Tensor keys, Tensor offsets, "
        "Tensor weights, Tensor? index) -> (Tensor dqa, Tensor dkeys, Tensor dlogits)");
  // serving: the distinct history positions a request reads; rows of several tables side by side
  m.def("distinct_positions(Tensor indices, SymInt n, SymInt window) -> (Tensor used, Tensor inverse)");
  m.def("gather_rows(Tensor[] tables, Tensor[] ids, Tensor? positions) -> Tensor");
}
