# The environment every benchmark script runs under (sourced by bench/*.sh after `cd` to the repo root).
# Offline data and hub; one thread per process (MKL with 2 threads on a shared 2-core machine is much
# slower than 1); torch's own CPU kernels (softmax, norms, elementwise) come in AVX2 and AVX512
# builds that round differently, and the committed numbers were computed with the AVX2 ones:
# pinning them reproduces those numbers bit for bit on AVX512 machines too (unpinned: ~1e-5 drift).
export NSVD_LM_DATA_DIR="${NSVD_LM_DATA_DIR:-$(cd "$ROOT/../shared/data" && pwd)}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export ATEN_CPU_CAPABILITY="${ATEN_CPU_CAPABILITY:-avx2}"
