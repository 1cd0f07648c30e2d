"""Every tolerance the tests use, in one table (mirrored in docs/testing.md)."""

# Central finite differences in float64 against hand-derived gradients.
FD_STEP = 1e-6
FD_RTOL = 1e-5
FD_ATOL = 1e-8
# Distance every drawn pre-activation keeps from a kink (ReLU at 0, jumps at theta, kernel
# window edges, top-k gaps), enforced with assume(); one FD step moves one by ~10 * FD_STEP.
KINK_MARGIN = 1e-3

# float64 SAE goldens written by reference/sae_goldens.py (PyTorch autograd, float64).
GOLDEN64_RTOL = 1e-10
GOLDEN64_ATOL = 1e-12

# A float64 computation against an independent float64 NumPy reference of the same math.
REF64_RTOL = 1e-10
REF64_ATOL = 1e-12

# float32 computations compared with float64 ones of the same math.
F32_RTOL = 2e-4
F32_ATOL = 1e-5

# Gemma 2 logits and sites against transformers (eager, float32): float32 rounding.
GEMMA_RTOL = 1e-4
GEMMA_ATOL = 1e-4

# NumPy vs CuPy on the same inputs (different BLAS, summation orders).
XP64_RTOL = 1e-10
XP32_RTOL = 1e-4

# Latent-sharded vs unsharded (tests/mpi_worker.py): one step's loss and gradients in float64
# (only the order of the sum over shards differs), and a short float32 training run on 2 shards
# against 1 shard (rounding differences carried through a few Adam steps).
SHARD64_RTOL = 1e-12
SHARD32_RTOL = 1e-5
SHARD32_ATOL = 1e-6

# A real corpus's Gemma 3 characters per token (tests/test_corpora.py, with a tokenizer.json) vs the
# ratio measured once and stored in minisae.data.corpora (a new corpus release moves it a little).
CHARS_PER_TOKEN_RTOL = 0.05
