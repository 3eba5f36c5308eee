"""A weight-only int8 matrix-vector product for CPU decoding: ``y = (x @ q.T) * scale`` with ``q`` int8.

Decoding one token at batch 1 multiplies a vector by every weight matrix once, so its speed is how fast the
weights stream from memory: int8 weights are a quarter of float32's bytes. On an AVX-512 server CPU, torch's own
int8 kernels (``aten._weight_int8pack_mm``, ``torch._int_mm``) read int8 weights from DRAM at about 6 GB/s
while MKL streams float32 at 14 GB/s: they save three quarters of the bytes and spend most of it back. This
kernel streams int8 at 11-14 GB/s (``benchmarks/README.md``):

* four weight rows per pass, with four independent AVX-512 accumulators (one accumulator would be bound by the
  latency of its adds);
* a software prefetch 16 KB ahead, into L2: a core has about 16 L1 miss buffers, which alone cap a stream from
  DRAM near 10 GB/s (prefetching into L1 measured 10 GB/s, into L2 11-14 GB/s, none 6 GB/s);
* activations stay float32 (only the weights are quantized), and the ``M`` rows of ``x`` (a small batch) reuse
  each weight block while it is in L1, so a few rows cost little more than one.

It is C with AVX-512 intrinsics, compiled once with the system C compiler (the same one ``torch.compile`` needs on
CPU) into ``~/.cache/mmgpt/kernels`` (``$MMGPT_CACHE/kernels``) and called through ``ctypes`` from a
``torch.library`` custom op, so it runs inside a compiled decode step too. Loading a library runs its code, so the
cache is checked first: the directory must be the user's alone (it is made 0700; one owned by another user or
writable by group or others is refused, with a warning), links are not followed, and a library is loaded only if its
bytes hash to the sha256 recorded beside it at build time; otherwise it is rebuilt (under a lock, written atomically).
Where it cannot be built (no compiler, no AVX-512, not x86-64), or with ``MMGPT_INT8_KERNEL=0`` in the environment,
``int8_gemv_available()`` is False and callers use torch's kernel.

The same library holds the float32 kernel of ``mmgpt.generation.f32_gemm``. One library, because glibc's
``dlopen`` takes a name it has opened before for that library, and every library here is opened as
``/proc/self/fd/N``: a second library opened under a descriptor number the first one had would be the first one again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import platform
import secrets
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

#define ROWS 4                  /* weight rows per pass: four independent accumulators hide the FMA latency */
#define PREFETCH_BYTES 16384    /* how far ahead of the rows being summed to prefetch */

static inline __m512 load_i8x16(const int8_t* p, __mmask16 mask) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

/* The rows [n, n + rows) of y = x @ w.T * scale, for every row of x. */
static inline __attribute__((always_inline)) void block(
    const float* x, const int8_t* w, const float* scale, float* y, const int8_t* end,
    int64_t M, int64_t N, int64_t K, int64_t n, const int rows
) {
    const int8_t* blk = w + n * K;
    const int8_t* ahead = blk + PREFETCH_BYTES;
    for (int64_t m = 0; m < M; m++) {
        const float* xm = x + m * K;
        __m512 acc[ROWS];
        for (int i = 0; i < rows; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
            /* One cache line per step, so the prefetches keep pace with the loads. Into L2 (T2), not L1: a core
               has only ~16 L1 miss buffers, which cap DRAM streaming near 10 GB/s; L2 tracks many more. */
            if (m == 0 && ahead + ROWS * k < end) _mm_prefetch((const char*)(ahead + ROWS * k), _MM_HINT_T2);
            __m512 xv = _mm512_maskz_loadu_ps(mask, xm + k);
            for (int i = 0; i < rows; i++) acc[i] = _mm512_fmadd_ps(xv, load_i8x16(blk + i * K + k, mask), acc[i]);
        }
        for (int i = 0; i < rows; i++) y[m * N + n + i] = _mm512_reduce_add_ps(acc[i]) * scale[n + i];
    }
}

/* y (M, N) = x (M, K) @ w (N, K).T * scale (N,); all contiguous, x / scale / y float32, w int8. */
void mmgpt_int8_gemv(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N, int64_t K) {
    const int8_t* end = w + N * K;
    int64_t n = 0;
    for (; n + ROWS <= N; n += ROWS) block(x, w, scale, y, end, M, N, K, n, ROWS);  /* ROWS constant: unrolled */
    if (n < N) block(x, w, scale, y, end, M, N, K, n, (int)(N - n));
}

/* ---- float32: the kernel of mmgpt.generation.f32_gemm (one library: see the module docstring) ---- */

#define NR 32    /* output columns per panel: two AVX-512 registers */
#define MR 8     /* rows per pass over a panel: 2 x 8 accumulators, half the registers */

/* Rows [m, m + rows) of y, columns [n, n + 32) (masked at the right edge), from the panel p (K x 32). Prefetches
   the panel `next` (or nothing if NULL) one row of 32 weights per step, keeping pace with the loads. */
static inline __attribute__((always_inline)) void tile(
    const float* x, const float* p, const float* next, float* y, int64_t K, int64_t N, int64_t n, int64_t m,
    const int rows, __mmask16 lo, __mmask16 hi
) {
    __m512 a0[MR], a1[MR];
    for (int i = 0; i < rows; i++) { a0[i] = _mm512_setzero_ps(); a1[i] = _mm512_setzero_ps(); }
    for (int64_t k = 0; k < K; k++) {
        if (next) {
            _mm_prefetch((const char*)(next + k * NR), _MM_HINT_T2);
            _mm_prefetch((const char*)(next + k * NR + 16), _MM_HINT_T2);
        }
        __m512 w0 = _mm512_loadu_ps(p + k * NR), w1 = _mm512_loadu_ps(p + k * NR + 16);
        for (int i = 0; i < rows; i++) {
            __m512 xv = _mm512_set1_ps(x[(m + i) * K + k]);
            a0[i] = _mm512_fmadd_ps(xv, w0, a0[i]);
            a1[i] = _mm512_fmadd_ps(xv, w1, a1[i]);
        }
    }
    for (int i = 0; i < rows; i++) {
        _mm512_mask_storeu_ps(y + (m + i) * N + n, lo, a0[i]);
        _mm512_mask_storeu_ps(y + (m + i) * N + n + 16, hi, a1[i]);
    }
}

/* y (M, N) = x (M, K) @ w.T, w given as p (ceil(N / 32), K, 32): its panels of 32 rows, transposed, zero-padded. */
void mmgpt_f32_gemm(const float* x, const float* p, float* y, int64_t M, int64_t N, int64_t K) {
    const int64_t panels = (N + NR - 1) / NR;
    for (int64_t j = 0; j < panels; j++) {
        const float* panel = p + j * K * NR;
        const float* next = j + 1 < panels ? panel + K * NR : 0;
        const int64_t n = j * NR, left = N - n;
        const __mmask16 lo = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        const __mmask16 hi = left >= 32 ? (__mmask16)0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1u);
        int64_t m = 0;
        for (; m + MR <= M; m += MR, next = 0) tile(x, panel, next, y, K, N, n, m, MR, lo, hi);  /* prefetch once */
        switch (M - m) {  /* constant row counts: the loops over rows unroll */
            case 7: tile(x, panel, next, y, K, N, n, m, 7, lo, hi); break;
            case 6: tile(x, panel, next, y, K, N, n, m, 6, lo, hi); break;
            case 5: tile(x, panel, next, y, K, N, n, m, 5, lo, hi); break;
            case 4: tile(x, panel, next, y, K, N, n, m, 4, lo, hi); break;
            case 3: tile(x, panel, next, y, K, N, n, m, 3, lo, hi); break;
            case 2: tile(x, panel, next, y, K, N, n, m, 2, lo, hi); break;
            case 1: tile(x, panel, next, y, K, N, n, m, 1, lo, hi); break;
        }
    }
}
"""
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-shared", "-fPIC"]
# A library in this directory is code that this process runs, so the directory must be the user's alone (made 0700;
# an existing one owned by another user, or writable by group or others, is refused), and a library is loaded only
# if its bytes hash to the sha256 recorded beside it when it was built (`_load`).
_CACHE = Path(os.environ.get("MMGPT_CACHE", Path.home() / ".cache" / "mmgpt")) / "kernels"
# MMGPT_INT8_KERNEL=0 turns the kernel off: Int8Linear then uses torch's int8 kernel, the path of CPUs without
# AVX-512 (to compare the two, or to try that path here). Unset or 1: the kernel wherever it can be built.
KERNEL_SWITCH = "MMGPT_INT8_KERNEL"

_lib: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the kernel cannot be used, once that is known


class UnsafeKernelCacheError(RuntimeError):
    """The kernel cache directory is not the current user's alone, so no library in it can be trusted."""


def _uid() -> int:
    return os.geteuid()  # a function of its own so that tests can play another user


def _not_private(st: os.stat_result) -> str | None:
    """Why a file or directory with this ``stat`` is not to be trusted, or ``None``: another user owns it, or someone
    besides its owner may write it."""
    if st.st_uid != _uid():
        return f"is owned by uid {st.st_uid}, not by the current user (uid {_uid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _open_cache(cache: Path) -> int:
    """The cache directory (made 0700 if missing), checked and opened. Every later file operation is relative to
    the descriptor, so a directory put at the path after this check is never used."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(cache, 0o700)
    try:
        # O_NOFOLLOW: a symbolic link at the path could lead to anyone's directory.
        fd = os.open(cache, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:  # Linux says ENOTDIR for a link there, not ELOOP: lstat tells
        link = e.errno == errno.ELOOP or (os.path.lexists(cache) and stat.S_ISLNK(os.lstat(cache).st_mode))
        kind = "a symbolic link (not followed)" if link else f"not a directory ({e.strerror})"
        raise UnsafeKernelCacheError(
            f"refusing the kernel cache {cache}: it is {kind}. Remove it, or set MMGPT_CACHE to a directory of your own"
        ) from e
    problem = _not_private(os.fstat(fd))
    if problem is not None:
        os.close(fd)
        raise UnsafeKernelCacheError(
            f"refusing the kernel cache {cache}: it {problem}, so a library in it may not be the one mmgpt built. "
            f"Make it yours alone (chmod 700 {cache}) or remove it, or set MMGPT_CACHE to a directory of your own"
        )
    return fd


def _open_trusted(dir_fd: int, name: str) -> tuple[int | None, str | None]:
    """``name`` in the cache opened for reading if it is a regular file of the current user's that only they may
    write; else ``(None, why)``, ``why`` ``None`` when there is no such file."""
    try:
        # O_NOFOLLOW: a link is never followed. O_NONBLOCK: a FIFO planted there cannot block the open.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, "is a symbolic link (not followed)" if e.errno == errno.ELOOP else f"cannot be read ({e.strerror})"
    st = os.fstat(fd)
    problem = "is not a regular file" if not stat.S_ISREG(st.st_mode) else _not_private(st)
    if problem is not None:
        os.close(fd)
        return None, problem
    return fd, None


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _dlopen(path: str) -> ctypes.CDLL:
    return ctypes.CDLL(path)  # a function of its own so that tests can see what is loaded


def _load_verified(dir_fd: int, cache: Path, stem: str, key: str) -> tuple[ctypes.CDLL | None, str | None]:
    """``stem.so`` loaded if its build record ``stem.json`` is for this source, compiler and flags (``key``) and its
    bytes hash to the sha256 recorded there; else ``(None, why)``, ``why`` ``None`` when nothing was built yet."""
    fd, why = _open_trusted(dir_fd, f"{stem}.json")
    if fd is None:
        return None, why and f"its build record {stem}.json {why}"
    try:
        raw = _read_all(fd)
    finally:
        os.close(fd)
    try:
        record = json.loads(raw)
        if record["build_key"] != key:  # a 16-hex-digit prefix of another key: as good as impossible, but cheap
            return None, f"its build record {stem}.json is for another source, compiler or flags"
        expected = record["so_sha256"]
    except (ValueError, KeyError, TypeError):
        return None, f"its build record {stem}.json is not one that mmgpt wrote"
    fd, why = _open_trusted(dir_fd, f"{stem}.so")
    if fd is None:
        return None, why and f"the library {why}"
    try:
        if hashlib.sha256(_read_all(fd)).hexdigest() != expected:
            return None, "its sha256 differs from the one recorded when it was built (the file changed on disk)"
        # Loaded through the descriptor just hashed, so the bytes checked are the bytes mapped even if another file
        # is renamed to the path meanwhile. Without /proc (macOS), by path: in a directory only this user can write.
        # (glibc matches a name it has loaded before and returns that library: an earlier one, verified as well.)
        proc = f"/proc/self/fd/{fd}"
        return _dlopen(proc if os.path.exists(proc) else str(cache / f"{stem}.so")), None
    finally:
        os.close(fd)


def _write_atomic(dir_fd: int, name: str, data: bytes) -> None:
    """``data`` as ``name`` in the cache: written under a fresh temporary name, flushed to disk, then renamed over
    ``name``, so that no reader ever sees it half-written (a rename replaces a link at ``name``, never follows it)."""
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)  # the rename itself survives a crash


@contextlib.contextmanager
def _build_lock(dir_fd: int, stem: str):
    """One builder at a time, across processes; the kernel drops the lock if its holder dies."""
    import fcntl  # POSIX only, like the rest of the build

    fd = os.open(f"{stem}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _build(dir_fd: int, stem: str, key: str, cc: str) -> None:
    # Compiled in a fresh private directory (mkdtemp: mode 0700, unguessable name), then copied into the cache.
    with tempfile.TemporaryDirectory(prefix="mmgpt-kernel-") as tmp:
        src, out = Path(tmp) / "int8_gemv.c", Path(tmp) / "int8_gemv.so"
        src.write_text(_SOURCE)
        done = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed to build the kernel: {done.stderr.strip()[-500:]}")
        library = out.read_bytes()
    record = dict(build_key=key, so_sha256=hashlib.sha256(library).hexdigest(),
                  source_sha256=hashlib.sha256(_SOURCE.encode()).hexdigest(), cc=cc, flags=_FLAGS)
    # The library first, then its record: a reader that finds the new record finds the new library complete. One
    # that comes in between sees the old record with the new library, a mismatch, and waits for the lock.
    _write_atomic(dir_fd, f"{stem}.so", library)
    _write_atomic(dir_fd, f"{stem}.json", json.dumps(record, indent=1).encode())


def _load(cache: Path) -> ctypes.CDLL:
    """The kernel from ``cache``, built there first if it is missing or fails its check."""
    if os.name != "posix" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"needs x86-64 Linux or macOS, this is {platform.machine()} {platform.system()}")
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        raise RuntimeError(f"needs AVX-512, this CPU offers {torch.backends.cpu.get_cpu_capability()}")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    key = hashlib.sha256("\n".join([_SOURCE, cc, *_FLAGS]).encode()).hexdigest()  # what the library is built from
    stem = f"int8_gemv-{key[:16]}"
    dir_fd = _open_cache(cache)
    try:
        lib, _ = _load_verified(dir_fd, cache, stem, key)
        if lib is None:
            with _build_lock(dir_fd, stem):
                # Checked again under the lock: another process may have just built it, or been mid-build above.
                lib, why = _load_verified(dir_fd, cache, stem, key)
                if lib is None:
                    if why is not None:
                        warnings.warn(f"not loading the cached int8 kernel {cache / stem}.so: {why}; rebuilding it",
                                      RuntimeWarning, stacklevel=2)
                    _build(dir_fd, stem, key, cc)
                    lib, why = _load_verified(dir_fd, cache, stem, key)
                    if lib is None:
                        raise RuntimeError(f"the int8 kernel just built in {cache} fails its own check: {why}")
    finally:
        os.close(dir_fd)
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mmgpt_int8_gemv.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.mmgpt_int8_gemv.restype = None
    lib.mmgpt_f32_gemm.argtypes = [ptr, ptr, ptr, i64, i64, i64]
    lib.mmgpt_f32_gemm.restype = None
    return lib


def load_kernel_library() -> ctypes.CDLL:
    """The library of mmgpt's kernels (this one and those of ``mmgpt.generation.f32_gemm``), built on first use,
    whatever ``MMGPT_INT8_KERNEL`` says (each module has its own switch).

    Raises:
        RuntimeError: it cannot be built here (not x86-64, no AVX-512, no C compiler, a failed build).
        UnsafeKernelCacheError: the kernel cache is not the user's alone.
    """
    return _load(_CACHE)


def int8_gemv_available() -> bool:
    """Whether the kernel is built and loadable here (built on first call; a failure is remembered).

    ``MMGPT_INT8_KERNEL=0`` in the environment (read at the first call) turns it off, as on a CPU without AVX-512:
    callers then use torch's int8 kernel. A kernel cache (``$MMGPT_CACHE/kernels``, default
    ``~/.cache/mmgpt/kernels``) that is not the user's alone is refused with a warning that says what to fix.
    """
    global _lib, _unavailable
    if _lib is None and _unavailable is None:
        switch = os.environ.get(KERNEL_SWITCH) or "1"
        if switch not in ("0", "1"):
            raise ValueError(f"{KERNEL_SWITCH}={switch!r} in the environment: expected 0 (use torch's int8 kernel) or "
                             "1 (the default: this kernel wherever it can be built)")
        if switch == "0":
            _unavailable = f"turned off by {KERNEL_SWITCH}=0"
        else:
            try:
                _lib = _load(_CACHE)
            except UnsafeKernelCacheError as e:
                # Unlike a missing compiler, a state to fix: say so rather than only running slower.
                _unavailable = str(e)
                warnings.warn(f"the int8 kernel is not used: {e}", RuntimeWarning, stacklevel=2)
            except (OSError, RuntimeError) as e:
                _unavailable = str(e)
    return _lib is not None


def int8_gemv_unavailable_reason() -> str | None:
    """Why ``int8_gemv_available()`` is False (``None`` when it is True)."""
    int8_gemv_available()
    return _unavailable


def _int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Checked here because a wrong dtype or shape would not raise in C but read out of bounds.
    if x.dtype != torch.float32 or weight.dtype != torch.int8 or scale.dtype != torch.float32:
        raise TypeError(f"expected float32 x, int8 weight, float32 scale; got {x.dtype}, {weight.dtype}, {scale.dtype}")
    if x.dim() != 2 or weight.dim() != 2 or x.size(1) != weight.size(1) or scale.numel() != weight.size(0):
        raise ValueError(f"expected x (M, K), weight (N, K), scale (N,); got {tuple(x.shape)}, {tuple(weight.shape)}, "
                         f"{tuple(scale.shape)}")
    if _lib is None and not int8_gemv_available():
        raise RuntimeError(f"the int8 kernel is not available: {_unavailable}")
    x, weight, scale = x.contiguous(), weight.contiguous(), scale.contiguous()  # no copies when already so
    (M, K), N = x.shape, weight.size(0)
    y = x.new_empty(M, N)
    _lib.mmgpt_int8_gemv(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), y.data_ptr(), M, N, K)
    return y


# A torch operator, so that a torch.compile'd decode step calls it as one opaque kernel instead of breaking its graph
# at the ctypes call. Defined through torch.library.Library rather than the custom_op decorator: the op is called
# ~120 times per token, and the plain registration dispatches in about half the time (5 us instead of 9).
_library = torch.library.Library("mmgpt", "FRAGMENT")
_library.define("int8_gemv(Tensor x, Tensor weight, Tensor scale) -> Tensor")
_library.impl("int8_gemv", _int8_gemv, "CPU")


@torch.library.register_fake("mmgpt::int8_gemv", lib=_library)
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.size(0), weight.size(0))


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x @ weight.T) * scale``: x ``(M, K)`` float32, weight ``(N, K)`` int8, scale ``(N,)`` float32 -> ``(M, N)``.

    The operator ``torch.ops.mmgpt.int8_gemv``. Meant for small ``M`` (decoding): each row of ``x`` costs one pass
    of float32 arithmetic over the weights, which stay in cache between rows.
    """
    return torch.ops.mmgpt.int8_gemv(x, weight, scale)
