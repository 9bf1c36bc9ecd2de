// The one binding file: op schemas of the fastattn namespace and the Python module fastattn._C.
// The CPU kernels register implementations of these ops from csrc/cpu/, the CUDA kernels from
// csrc/cuda/ (TORCH_LIBRARY_IMPL(fastattn, CPU/CUDA, m)). The schemas must stay equal to
// FWD_SCHEMA/BWD_SCHEMA in fastattn/ops.py (a test compares them).
#include <Python.h>
#include <torch/library.h>

#define FASTATTN_BLOCK_ARGS \
  "Tensor? kv_num_blocks, Tensor? kv_indices, Tensor? full_kv_num_blocks, Tensor? full_kv_indices, "
#define FASTATTN_PARTIAL_ARGS "Tensor? partial_masks, Tensor? partial_tile_ids, "
#define FASTATTN_COMMON_TAIL \
  "int block_size_q, int block_size_k, float scale, int? window_left, int? window_right, float softcap, float dropout_p, int seed"

TORCH_LIBRARY(fastattn, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? alibi_slopes, Tensor? key_lengths, "
        "Tensor? query_lengths, " FASTATTN_BLOCK_ARGS FASTATTN_PARTIAL_ARGS FASTATTN_COMMON_TAIL ") -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
        "Tensor? alibi_slopes, Tensor? key_lengths, Tensor? query_lengths, " FASTATTN_BLOCK_ARGS
        "Tensor? q_num_blocks, Tensor? q_indices, Tensor? full_q_num_blocks, Tensor? full_q_indices, "
        FASTATTN_PARTIAL_ARGS FASTATTN_COMMON_TAIL ", bool compute_dbias, Tensor? dlse=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // The Hopper forward (csrc/cuda/sm90): attention_fwd's schema; calls it does not cover go on to
  // attention_fwd. Has a CUDA kernel only in builds with FASTATTN_WITH_SM90.
  m.def("attention_fwd_sm90(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? alibi_slopes, "
        "Tensor? key_lengths, Tensor? query_lengths, " FASTATTN_BLOCK_ARGS FASTATTN_PARTIAL_ARGS FASTATTN_COMMON_TAIL
        ") -> (Tensor, Tensor)");
  // attention_with_kvcache's kernel (csrc/cpu/decode.cpp; fastattn/kvcache.py): writes k/v (B, Lnew, Hkv, *)
  // into the cache at cache_seqlens, then attends q (B, Lq, Hq, D) to the cache read in place --
  // contiguous (B_cache, L_max, Hkv, D) or paged (num_pages, page_size, Hkv, D) through block_table.
  // Returns out (B, Lq, Hq, Dv) and lse (B, Hq, Lq) float32.
  m.def("decode_attention(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
        "Tensor cache_seqlens, Tensor? block_table, Tensor? cache_batch_idx, Tensor? alibi_slopes, Tensor? sinks, "
        "float scale, int? window_left, int? window_right, float softcap, int num_splits) -> (Tensor, Tensor)");
  // Packed variable-length sequences (csrc/cpu/varlen.cpp): q (total_q, Hq, D), k/v (total_k, Hkv, D),
  // cu_seqlens int32 (num_seqs + 1,); out (total_q, Hq, Dv) and lse (Hq, total_q) in the accumulation
  // dtype. Must stay equal to VARLEN_FWD_SCHEMA/VARLEN_BWD_SCHEMA in fastattn/ops.py.
  m.def("varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
        "int max_seqlen_k, Tensor? alibi_slopes, float scale, int? window_left, int? window_right, float softcap, "
        "float dropout_p=0., int seed=0) -> (Tensor, Tensor)");
  m.def("varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? alibi_slopes, float scale, "
        "int? window_left, int? window_right, float softcap, Tensor? dlse=None, float dropout_p=0., int seed=0) "
        "-> (Tensor, Tensor, Tensor)");
  // Linear attention's core (csrc/cpu/linear_attention.cpp); schemas equal to fastattn/linear/ops.py.
  m.def("linear_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? initial_state, bool causal, int chunk_size) "
        "-> (Tensor, Tensor)");
  m.def("linear_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? initial_state, Tensor? dstate, "
        "bool causal, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_attention_fused_fwd(Tensor q, Tensor k, Tensor v, Tensor? initial_state, bool causal, "
        "int chunk_size, int feature_map, bool normalize, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("linear_attention_fused_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor denom, "
        "Tensor? initial_state, Tensor? dstate, bool causal, int chunk_size, int feature_map, bool normalize, "
        "float scale) -> (Tensor, Tensor, Tensor, Tensor)");
}

#ifdef FASTATTN_WITH_CUDA
namespace fastattn {
namespace cuda {
const char* kernel_image_error(int device);  // csrc/cuda/attention_fwd.cu
}  // namespace cuda
}  // namespace fastattn
#endif

namespace {

// fastattn._C.cuda_kernel_image_error(device: int) -> str | None: why the CUDA kernels have no image
// for that GPU (an architecture newer than the build's), None when they can run there.
PyObject* cuda_kernel_image_error(PyObject*, PyObject* args) {
  int device = 0;
  if (!PyArg_ParseTuple(args, "i", &device)) return nullptr;
#ifdef FASTATTN_WITH_CUDA
  const char* error = fastattn::cuda::kernel_image_error(device);
  if (error != nullptr) return PyUnicode_FromString(error);
  Py_RETURN_NONE;
#else
  return PyUnicode_FromString("fastattn._C was built without CUDA kernels");
#endif
}

PyObject* build_info(PyObject*, PyObject*) {
#ifdef FASTATTN_WITH_CUDA
  return Py_BuildValue("{s:O}", "cuda", Py_True);
#else
  return Py_BuildValue("{s:O}", "cuda", Py_False);
#endif
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How the extension was built: {'cuda': bool}."},
    {"cuda_kernel_image_error", cuda_kernel_image_error, METH_VARARGS,
     "cuda_kernel_image_error(device) -> str | None: why the CUDA kernels cannot run on that GPU."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastattn's compiled kernels (ops under torch.ops.fastattn).", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
